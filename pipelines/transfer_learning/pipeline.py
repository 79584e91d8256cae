"""KFP v2 pipeline: the tlops DAG as Kubeflow tasks (built by ``tlops.kfp.pipeline``).

Compile it for a config with either of:

    tlops compile --config configs/digits_target.yaml --out transfer-learning.yaml
    python pipelines/transfer_learning/pipeline.py --config configs/digits_target.yaml --out x.yaml
"""

from tlops.kfp.pipeline import build, build_pipeline  # noqa: F401 - the pipeline for a config

if __name__ == "__main__":
    import sys

    from tlops.cli import main

    sys.argv = ["tlops", "compile", *sys.argv[1:]]
    main()
