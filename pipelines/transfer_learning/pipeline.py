"""KFP v2 pipeline: the tlops DAG as Kubeflow tasks.

Built from ``tlops.dag.DAG`` (no step list here) and compiled with ``tlops compile``:

    tlops compile --config configs/digits_target.yaml --out transfer-learning.yaml
    python pipelines/transfer_learning/pipeline.py --config configs/digits_target.yaml --out x.yaml
"""

from typing import Any, Callable  # no `from __future__ import annotations`: KFP reads real types

from kfp import dsl


def build(cfg: Any, components: dict[str, Any], configure_task: Callable[[Any, Any], None]):
    """Return the ``@dsl.pipeline`` function for one resolved tlops config."""
    import json

    from tlops.dag import DAG

    # One line of JSON (valid YAML): KFP copies defaults into a header comment, line by line.
    config_yaml = json.dumps(cfg.to_dict())
    name = "tlops-" + "".join(c if c.isalnum() else "-" for c in cfg.name.lower()).strip("-")

    @dsl.pipeline(name=name, description=f"tlops transfer learning ({cfg.name}): " + " -> ".join(s.name for s in DAG))
    def transfer_learning(config: str = config_yaml, data_uri: str = "", source_model: str = "", model_name: str = ""):
        tasks: dict[str, Any] = {}
        for spec in DAG:
            upstream = {name: tasks[producer].outputs[name] for name, producer in spec.inputs.items()}
            task = components[spec.name](
                config=config, data_uri=data_uri, source_model=source_model, model_name=model_name, **upstream
            )
            task.set_display_name(spec.name)
            configure_task(task, spec)
            tasks[spec.name] = task

    return transfer_learning


if __name__ == "__main__":
    import sys

    from tlops.cli import main

    sys.argv = ["tlops", "compile", *sys.argv[1:]]
    main()
