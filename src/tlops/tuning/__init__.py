"""Hyper-parameter search over ``train.*`` (the ``tune:`` config section).

``tlops tune`` runs it locally with Optuna (:mod:`tlops.tuning.study`); on a cluster the same
section compiles to a Katib ``Experiment`` (:mod:`tlops.tuning.katib`) whose trials run
``tlops tune --trial`` in the tlops image. Both score a trial on a validation split only: the
test split is read by the evaluate step, which no trial runs.
"""
