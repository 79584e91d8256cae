"""The ``tune:`` section as a Katib ``Experiment`` (kubeflow.org/v1beta1), for a cluster.

Katib runs the search (its Optuna-based ``tpe`` / ``random`` suggestion services, its
``medianstop`` early stopping); tlops only writes the Experiment. Each trial is a batch ``Job``
running the tlops image:

    tlops tune CONFIG --trial --set train.lr=${trialParameters.lr} ...

which runs ingest, pull-model and extract-features (hits of the shared S3 feature cache when
``features.cache_dir`` is an ``s3://`` prefix, so only the first trial pays for extraction), then
the fine-tune step's training with the trial's values, and prints ``<objective>=<value>`` lines
(every epoch, then the trial's final value) on stdout: Katib's StdOut metrics collector reads
them with its default ``name=value`` filter. The final line is the one that counts
(``metricStrategies: latest``); the per-epoch ones feed medianstop.

Mapping: a float range is a ``double`` parameter (``distribution: logUniform`` with ``log``), an
integer range an ``int`` parameter, ``choices`` a ``categorical`` one (Katib carries every value
as a string; ``--set`` parses it back as YAML). Katib has no study-wide time limit:
``tune.minutes`` bounds each trial's Job (``activeDeadlineSeconds``), ``tune.trials`` is
``maxTrialCount``. The config travels in the Job's environment (it holds no secrets: config
validation refuses credentials); ``kubernetes.secrets`` become env vars from Secrets as in the
KFP tasks, and ``kubernetes.gpu`` places trials on the GPU node pool.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tlops.config import PipelineConfig, int_field, train_keys
from tlops.kfp import RUN_AS
from tlops.tuning.study import _tune, objective_key

API_VERSION = "kubeflow.org/v1beta1"
CONTAINER = "tlops-trial"
CONFIG_ENV = "TLOPS_TUNE_CONFIG"
MEDIANSTOP = {"min_trials_required": "3", "start_step": "1"}  # as Optuna's MedianPruner locally


def param_name(key: str) -> str:
    """``train.lora.r`` -> ``lora-r`` (a Katib parameter / trialParameters name)."""
    return re.sub(r"[^a-z0-9]+", "-", key.removeprefix("train.").lower()).strip("-")


def _parameters(cfg: PipelineConfig) -> list[dict[str, Any]]:
    out = []
    for key, p in _tune(cfg).space.items():
        name = param_name(key)
        if p.choices is not None:
            space: dict[str, Any] = {"list": [_str(c) for c in p.choices]}
            ptype = "categorical"
        elif int_field(key):
            space, ptype = {"min": str(int(p.low)), "max": str(int(p.high))}, "int"
        else:
            space, ptype = {"min": repr(float(p.low)), "max": repr(float(p.high))}, "double"
        if p.choices is None:
            space["distribution"] = "logUniform" if p.log else "uniform"
        out.append({"name": name, "parameterType": ptype, "feasibleSpace": space})
    return out


def _str(v: Any) -> str:
    return v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")


def trial_command(cfg: PipelineConfig) -> list[str]:
    """The trial container's command: the config from the environment, the trial's values as --set."""
    sets = []
    for key in _tune(cfg).space:
        value = f"${{trialParameters.{param_name(key)}}}"
        is_list = getattr(train_keys()[key], "__origin__", None) is list
        sets.append(f"--set {key}={'[' + value + ']' if is_list else value}")
    # no exec: Katib's StdOut collector appends "1>metrics.log 2>&1 && echo completed > <pid file>" to
    # the script of an "sh -c" command (pkg/webhook/v1beta1/pod/utils.go), which must still run after tlops
    script = (
        f'printf "%s" "${CONFIG_ENV}" > /work/config.yaml && '
        f"tlops tune /work/config.yaml --trial --workdir /work/.tlops " + " ".join(sets)
    )
    return ["sh", "-c", script]


def experiment(cfg: PipelineConfig, *, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    """The Katib Experiment for ``cfg.tune`` (see the module docstring)."""
    from tlops.kfp.pipeline import POD_LABELS, image_for

    tc = _tune(cfg)
    key = objective_key(cfg)
    k = cfg.kubernetes
    gpu = k.gpu
    res = gpu if gpu is not None else k.resources
    resources: dict[str, Any] = {
        "requests": {n: v for n, v in (("cpu", res.cpu_request), ("memory", res.memory_request)) if v},
        "limits": {n: v for n, v in (("cpu", res.cpu_limit), ("memory", res.memory_limit)) if v},
    }
    if gpu is not None:
        resources["limits"][gpu.accelerator_type] = str(gpu.accelerator_limit)
    env: list[dict[str, Any]] = [
        {"name": CONFIG_ENV, "value": yaml.safe_dump(cfg.to_dict(), sort_keys=False)},
        {"name": "HOME", "value": "/work"},
    ]
    for s in k.secrets:
        for var, skey in s.env.items():
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": s.name, "key": skey}}})
    container = {
        "name": CONTAINER,
        "image": image_for(cfg),
        "command": trial_command(cfg),
        "env": env,
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "work", "mountPath": "/work"}]
        + ([{"name": "dshm", "mountPath": "/dev/shm"}] if gpu is not None and gpu.shm_size else []),
    }
    volumes: list[dict[str, Any]] = [{"name": "work", "emptyDir": {}}]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "fsGroup": RUN_AS},
        "containers": [container],
        "volumes": volumes,
    }
    if gpu is not None:
        pod["nodeSelector"] = dict(gpu.node_selector)
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in gpu.tolerations]
        if gpu.shm_size:
            volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": gpu.shm_size}})
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # a failed trial is Katib's to count (maxFailedTrialCount), not to retry
        "template": {"metadata": {"labels": dict(POD_LABELS) | {"tlops.dev/role": "tune-trial"}}, "spec": pod},
    }
    if tc.minutes is not None:
        job_spec["activeDeadlineSeconds"] = int(tc.minutes * 60)
    spec: dict[str, Any] = {
        "objective": {
            "type": tc.direction,
            "objectiveMetricName": key,
            "metricStrategies": [{"name": key, "value": "latest"}],
        },
        "algorithm": {"algorithmName": tc.algorithm, "algorithmSettings": [{"name": "seed", "value": str(tc.seed)}]},
        "parallelTrialCount": min(3, tc.trials),
        "maxTrialCount": tc.trials,
        "maxFailedTrialCount": tc.trials,
        "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
        "parameters": _parameters(cfg),
        "trialTemplate": {
            "primaryContainerName": CONTAINER,
            "trialParameters": [
                {"name": param_name(key_), "reference": param_name(key_), "description": key_} for key_ in tc.space
            ],
            "trialSpec": {"apiVersion": "batch/v1", "kind": "Job", "spec": job_spec},
        },
    }
    if tc.pruning:
        spec["earlyStopping"] = {
            "algorithmName": "medianstop",
            "algorithmSettings": [{"name": n, "value": v} for n, v in MEDIANSTOP.items()],
        }
    meta: dict[str, Any] = {"name": name or f"{cfg.name.lower().replace('_', '-').replace('.', '-')}-tune"}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": "Experiment", "metadata": meta, "spec": spec}


def write(manifest: dict[str, Any], out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return out
