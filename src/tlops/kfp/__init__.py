"""Kubeflow Pipelines support, all of it inside the installed package.

- ``components``: one lightweight Python component per DAG step, generated from ``tlops.dag``;
- ``task``: what a component runs in its container (``run_task``: one step, KFP artifacts as I/O);
- ``pipeline``: the pipeline built from the DAG, Kubernetes settings, compile, ``kfp.local`` runs;
- ``batch_predict``: the ``batch-predict`` pipeline (``tlops predict`` as one task, schedulable);
- ``monitor_adapt``: the ``monitor-and-adapt`` pipeline (``tlops monitor``, then ``tlops adapt`` on a shift);
- ``generated``: the component functions of those tasks outside the DAG;
- ``trainjob``: multi-node fine-tuning as a Kubeflow Trainer ``TrainJob`` or a ``PyTorchJob``;
- ``client``: submit / schedule / list runs against a KFP API server;
- ``cli``: the ``tlops submit``, ``tlops schedule`` and ``tlops runs`` commands.

Nothing here imports ``kfp`` at module level, so ``tlops --help`` stays fast.
"""

#: uid and gid of the image's non-root user (docker/Dockerfile): every pod tlops defines runs as it
RUN_AS = 1000
