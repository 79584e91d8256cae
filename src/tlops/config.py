"""Pipeline configuration: one YAML file per pipeline, validated into typed models.

Unknown keys, wrong types and bad values fail before any work starts, with a message that
names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlops.errors import ConfigError
from tlops.hashing import hash_json
from tlops.training import strategies as strategy_registry  # torch-free

# The allowed strategies and what each needs come from the registry (one module per strategy).
STRATEGIES = strategy_registry.names()
# the linear probe's C grid: scikit-learn's LogisticRegressionCV default (Cs=10: 10 values log-spaced over
# 1e-4..1e4, as numpy.logspace computes them; numpy is not imported here)
PROBE_C = tuple(10.0 ** (-4 + i * (8 / 9)) for i in range(10))
ADAPT_STRATEGIES = tuple(s.name for s in strategy_registry.REGISTRY.values() if s.needs_adapt_from)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Strict):
    val: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of each class for validation")
    test: float = Field(0.2, gt=0.0, lt=1.0, description="fraction of each class for test")

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test must be < 1 (got {self.val} + {self.test}); nothing left to train on")
        return self


def _no_credentials(url: Optional[str], how: str, *, any_user: bool = False) -> Optional[str]:
    """Config is logged, hashed into manifests, recorded as MLflow params and compiled into KFP
    pipeline YAML: no secrets in it. Credentials come from the environment or secret files.

    ``any_user``: refuse a bare ``user@`` too (for s3:// and http(s):// data and model URLs the
    user part is an access key or a token; ``ssh://git@host`` stays allowed for git repos)."""
    if url and "://" in url:
        # every URL in the value, also one nested in a spec (hf:https://user:token@host/...)
        for m in re.finditer(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/\s@?#]+)@", url):
            scheme, userinfo = m.group(1).lower().rsplit(":", 1)[-1], m.group(2)
            if ":" in userinfo or any_user or scheme in ("http", "https"):
                raise ValueError(f"the URL carries credentials (user:password@); remove them and {how}")
    return url


_S3_CREDS = (
    "take S3 credentials from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an AWS profile or a "
    "Kubernetes Secret via kubernetes.secrets)"
)

MODEL_SOURCES = (
    "hf:<hub-id-or-dir>",
    "hf:pkg:<package>/<dir>",
    "timm:<name>",
    "mlflow:models:/<name>@<alias>",
    "mlflow:models:/<name>/<version>",
    "<bundle dir>",
)
_MLFLOW_MODEL_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def check_model_spec(spec: str) -> str:
    """Syntax of a source-model spec, checked at config validation (nothing is loaded here).

    A bare word that is not an existing directory (``resnet50``) is almost always a missing
    ``timm:`` / ``hf:`` prefix; an unknown ``scheme:`` is refused with the valid ones."""
    spec = spec.strip() if isinstance(spec, str) else spec
    allowed = f"valid sources: {', '.join(MODEL_SOURCES)}"
    if not spec:
        raise ValueError(f"empty model spec; {allowed}")
    _no_credentials(spec, "point at a local directory, or use the MLflow registry (mlflow:models:/...)", any_user=True)
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):", spec)
    if m and len(m.group(1)) > 1:  # C:\... is a Windows drive, not a scheme
        scheme = m.group(1)
        rest = spec[len(scheme) + 1 :]
        if scheme in ("hf", "timm"):
            if not rest or rest in ("pkg:",):
                raise ValueError(f"'{spec}' names no model; e.g. {scheme}:<name>")
            return spec
        if scheme == "mlflow":
            if not _MLFLOW_MODEL_RE.match(rest):
                raise ValueError(
                    f"bad MLflow reference '{spec}'; use mlflow:models:/<name>@<alias> or "
                    "mlflow:models:/<name>/<version>"
                )
            return spec
        raise ValueError(f"Unknown model source '{scheme}:' in '{spec}'; {allowed}")
    if (
        "/" not in spec
        and "\\" not in spec
        and not spec.startswith((".", "~"))
        and not Path(spec).expanduser().is_dir()
    ):
        raise ValueError(
            f"Unknown model source '{spec}': not a prefix spec and no such bundle directory; {allowed} "
            f"(did you mean timm:{spec} or hf:{spec}?)"
        )
    return spec


def spec_modality(spec: str) -> Optional[str]:
    """The modality of a source-model spec when its syntax tells (timm: images, hf: text); None
    for a bundle directory or an MLflow model (known once pull-model has resolved it)."""
    if spec.startswith("timm:"):
        return "image"
    if spec.startswith("hf:"):
        return "text"
    return None


class DvcRef(_Strict):
    repo: str = Field(..., min_length=1, description="git URL or local path of a DVC repo")
    rev: Optional[str] = Field(None, description="git tag, branch or commit (default: HEAD / the default branch)")
    path: str = Field(..., min_length=1, description="path of the data inside the repo (a .dvc-tracked file or dir)")
    remote: Optional[str] = Field(None, description="DVC remote to read from (default: the repo's default remote)")

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        return _no_credentials(v, "use a git credential helper, GIT_ASKPASS or an SSH key")


class SourceDomainConfig(_Strict):
    """Labelled data from the source domain, for domain adaptation (``data.adapt_from``)."""

    source: str = Field(..., description="path, file or s3:// URI of the labelled source-domain data")
    format: Literal["auto", "image-folder", "npz", "csv", "tsv", "sklearn"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    columns: Optional[list[str]] = None
    quoting: Literal["minimal", "none"] = "minimal"
    encoding: str = "utf-8"
    val: float = Field(0.2, gt=0, lt=1, description="fraction held out as source validation (model selection)")
    max_samples: Optional[int] = Field(None, ge=10, description="use at most this many source samples (seeded)")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _no_credentials(v, _S3_CREDS, any_user=True)


class DataConfig(_Strict):
    source: Optional[str] = Field(None, description="path, file, s3:// URI or 'sklearn:digits' (or use data.dvc)")
    dvc: Optional[DvcRef] = Field(None, description="a DVC-versioned dataset: repo, rev, path (instead of source)")
    format: Literal["auto", "image-folder", "npz", "csv", "tsv", "sklearn"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    columns: Optional[list[str]] = Field(None, description="column names when the file has no header row")
    quoting: Literal["minimal", "none"] = Field("minimal", description="'none' = quote characters are text")
    encoding: str = "utf-8"
    classes: Optional[list[Any]] = Field(None, description="keep only these labels (in this order)")
    split: SplitConfig = SplitConfig()
    labels_per_class: Optional[int] = Field(
        None,
        ge=1,
        description="few-shot label budget per class: the train split holds this many labels per class and the "
        "validation split at most this many too (unless val_labels_per_class says otherwise)",
    )
    val_labels_per_class: Optional[int] = Field(
        None,
        ge=1,
        description="labels per class in the validation split (model selection); default: at most "
        "labels_per_class when that is set, else the whole split.val fraction",
    )
    unlabelled: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of the train pool kept unlabelled")
    image_size: Optional[int] = Field(None, ge=4, description="resize image-folder images to this square size")
    min_per_class: int = Field(3, ge=1, description="fail if a class has fewer samples than this")
    adapt_from: Optional[SourceDomainConfig] = Field(
        None,
        description="labelled source-domain data for the domain-adaptation strategies ("
        + ", ".join(ADAPT_STRATEGIES)
        + ")",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, v: Optional[str]) -> Optional[str]:
        return _no_credentials(v, _S3_CREDS, any_user=True)

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.source is None) == (self.dvc is None):
            raise ValueError(
                "set exactly one of data.source (a path, s3:// URI or sklearn:<name>) "
                "and data.dvc (repo, rev, path of a DVC-versioned dataset)"
            )
        return self

    def describe(self) -> str:
        """The data source in one line, with no credentials (for logs, manifests and tags)."""
        if self.dvc is None:
            return self.source or ""
        from tlops.redact import safe_url

        rev = f"@{self.dvc.rev}" if self.dvc.rev else ""
        return f"dvc:{safe_url(self.dvc.repo)}{rev}:{self.dvc.path}"


class SourceConfig(_Strict):
    model: str = Field(..., description="hf:<id|dir>, timm:<name>, mlflow:models:/<name>@<alias>, or a bundle dir")
    candidates: Optional[list[str]] = Field(
        None,
        min_length=1,
        description="more source models to rank against `model` by `selection_score` on the train features; the best "
        "is used",
    )
    selection_score: Literal["logme", "hscore", "transrate"] = Field(
        "logme",
        description="transferability score that ranks `model` and `candidates` on the train features (higher is "
        "better; all three are recorded): logme (LogME), hscore (H-Score, Ledoit-Wolf shrinkage), transrate "
        "(TransRate)",
    )
    pretrained: bool = Field(True, description="timm: load pretrained weights (False = random init)")
    weights: Optional[str] = Field(None, description="timm: local weights file (.safetensors/.pth)")
    in_chans: Optional[int] = Field(None, ge=1, le=4, description="timm: input channels")
    image_size: Optional[int] = Field(None, ge=4, description="timm: input size (default: model's)")
    max_length: int = Field(128, ge=8, description="hf: max tokens per text")
    pooling: Literal["mean", "cls"] = "mean"
    normalize: Literal["auto", "l2", "none"] = Field(
        "auto",
        description="hf: L2-normalise the pooled embedding; auto = what the model's own sentence-transformers "
        "pipeline does (a Normalize module in its modules.json)",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_spec(v)

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        return None if v is None else [check_model_spec(s) for s in v]

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: Optional[str]) -> Optional[str]:
        return _no_credentials(v, "point source.weights at a local file", any_user=True)


class FeaturesConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    cache_dir: Optional[str] = Field(None, description="feature cache (default <workdir>/cache/features)")
    cache: bool = True
    backend: Literal[
        "auto",
        "torch",
        "torch-compile",
        "torch-int8",
        "onnx",
        "onnx-int8",
        "openvino",
        "openvino-bf16",
        "openvino-int8",
    ] = Field(
        "torch",
        description="how extract-features runs the frozen backbone: torch (fp32), torch-compile (torch.compile; "
        "the compile is paid on every run, bench/results/compile.md), torch-int8 (dynamic int8 "
        "Linear layers; text only), onnx (onnxruntime fp32), onnx-int8 (onnxruntime int8: dynamic for text, "
        "static calibrated on the run's images for CNNs), openvino (OpenVINO fp32), openvino-bf16 (the same model "
        "in bfloat16 on CPUs with native bf16, e.g. AMX), openvino-int8 (NNCF static int8 calibrated on the run's "
        "train inputs; the three need the optional extra: pip install 'tlops[openvino]'), "
        "or auto: the fastest installed one whose probe accuracy on a sample "
        "of the run's train/val rows is within 0.3 points of fp32 torch (recorded in the step's metadata). "
        "Part of the feature-cache key; ranking and stacking of candidate models use torch",
    )
    shards: int = Field(
        1,
        ge=1,
        description="extract each split in N contiguous row shards (whole batches each, so the features are "
        "bit-identical to one shard at the same torch thread count), each cached under its own key, then merged "
        "into the normal cache entry: "
        "in-process N worker processes; on KFP a ParallelFor of N tasks (needs a shared features.cache_dir: "
        "s3://...). A rerun after a failed shard recomputes only the missing shards",
    )

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir(cls, v: Optional[str]) -> Optional[str]:
        return _no_credentials(v, _S3_CREDS, any_user=True)


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: Optional[list[str]] = Field(None, description="default: the architecture's attention projections")
    lr: float = Field(1e-3, gt=0, description="learning rate of the adapters")
    merge: bool = Field(True, description="merge the adapters into the weights (else keep base + adapter)")


class SetFitConfig(_Strict):
    pairs_per_sample: int = Field(20, ge=1, description="positive (and as many negative) pairs per labelled text")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=2, description="pairs per step")
    lr: float = Field(2e-5, gt=0)


class AdaptConfig(_Strict):
    epochs: int = Field(10, ge=1, description="passes over the labelled source data")
    batch_size: int = Field(64, ge=2, description="source (and as many target) samples per step")
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    trade_off: float = Field(1.0, ge=0, description="weight of the transfer loss")
    select: Literal["source_val", "last"] = Field("source_val", description="epoch selection: never target labels")
    shot_beta: float = Field(
        0.3,
        ge=0,
        description="shot: weight of the cross-entropy to the self-supervised (cosine-centroid) pseudo-labels next to "
        "information maximisation (0.3 in the SHOT paper; 0.1 in its official digits script; 0 = SHOT-IM)",
    )
    shot_epochs: Optional[int] = Field(
        None, ge=1, description="shot: passes over the unlabelled target after the source training (default: epochs)"
    )
    shot_label_smoothing: float = Field(
        0.1, ge=0, lt=1, description="shot: label smoothing of the source training (SHOT's 0.1)"
    )
    self_train_rounds: int = Field(
        2, ge=1, description="dann-self-train / cdan-self-train: rounds of pseudo-labelling the target and retraining"
    )
    self_train_threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="dann-self-train / cdan-self-train: a target sample is pseudo-labelled when its top predicted "
        "probability is at least this",
    )
    self_train_epochs: int = Field(
        2, ge=1, description="dann-self-train / cdan-self-train: epochs per round over source + pseudo-labelled target"
    )


class TrainConfig(_Strict):
    strategies: list[Literal[STRATEGIES]] = Field(  # type: ignore[valid-type]  (from the registry)
        default_factory=lambda: ["linear-probe"],
        min_length=1,
        description="the strategies to train and compare (`tlops strategies` lists them with what each needs): "
        + ", ".join(STRATEGIES),
    )
    epochs: int = Field(10, ge=1, description="fine-tune epochs")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    head_lr: Optional[float] = Field(None, gt=0, description="head learning rate (default 10x lr)")
    weight_decay: float = Field(1e-4, ge=0)
    eval_every: int = Field(
        0,
        ge=0,
        description="fine-tuning loops (fine-tune, partial-fine-tune, LoRA, LP-FT): also score the validation split "
        "every N optimizer steps, not only at epoch ends (0 = epoch ends only); the best evaluation's weights win",
    )
    patience: int = Field(
        0,
        ge=0,
        description="fine-tuning loops: stop after this many evaluations in a row without a better validation "
        "score (0 = train every epoch)",
    )
    freeze_blocks: int | Literal["auto"] = Field(
        0, description="freeze the first K backbone blocks; 'auto' = cut after the best-probing block"
    )
    layer_decay: Optional[float] = Field(
        None, gt=0, le=1, description="layer-wise LR decay: block i of n trains at lr * d**(n-i)"
    )
    gradual_unfreeze: bool = Field(
        False, description="epoch 1 trains the head; each epoch unfreezes one more block from the top"
    )
    l2sp: float = Field(0.0, ge=0, description="L2-SP strength toward the pretrained weights (0 = off)")
    lora: LoraConfig = LoraConfig()
    setfit: SetFitConfig = SetFitConfig()
    adapt: AdaptConfig = AdaptConfig()
    select_on: Optional[Literal["val", "source_val"]] = Field(
        None, description="pick the strategy on target val or source val (default: source_val with data.adapt_from)"
    )
    probe_scaling: Literal["auto", "standardize", "none"] = Field(
        "auto",
        description="linear probe: standardize = z-score each feature with train statistics (folded into the head), "
        "none = the backbone's features as they are; auto = none (bench/probe.py: standardising lost 7 of 12 settings)",
    )
    probe_c: list[float] = Field(
        default_factory=lambda: [float(c) for c in PROBE_C],
        min_length=1,
        description="linear probe: the inverse L2 strengths (scikit-learn's C) LogisticRegressionCV chooses from "
        "(default: its own 10-value grid, 1e-4..1e4); one value = no search",
    )
    probe_max_iter: int = Field(1000, ge=10, description="linear probe: lbfgs iterations per fit")
    probe_select: Literal["auto", "val", "cv"] = Field(
        "auto",
        description="linear probe: choose C by LogisticRegressionCV's stratified k-fold accuracy on train (cv) or "
        "by validation accuracy (val); auto = cv unless the validation split is larger than train or a class has "
        "a single train label",
    )
    augment: bool = Field(False, description="images: random shifts during fine-tuning")
    threads: Optional[int] = Field(
        None,
        ge=1,
        description="torch CPU threads (default: the usable CPUs; pin 1 on cores shared with other busy processes)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where every training loop runs: auto = CUDA when available, else CPU"
    )
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = autocast in the training loops")
    channels_last: bool = Field(False, description="image models: channels_last memory format")
    compile: bool = Field(False, description="torch.compile the fine-tuned model")
    distributed: Literal["none", "ddp"] = Field(
        "none",
        description="ddp = data-parallel fine-tuning under torchrun (NCCL on GPU, gloo on CPU); "
        "train.batch_size stays the global batch (see tlops.runners.torchrun); the block "
        "{nodes: N, procs_per_node: P, engine: E} means ddp with train.nodes, train.nproc, train.engine",
    )
    nproc: Optional[int] = Field(
        None, ge=1, description="DDP processes per node (default: the number of GPUs, else 2 on CPU)"
    )
    nodes: int = Field(
        1,
        ge=1,
        description="machines of a ddp job (nodes x nproc ranks; with train.distributed: ddp, as nproc); > 1 on a "
        "cluster: the KFP fine-tune task submits a train.engine job; outside a cluster: one torchrun per node on "
        "loopback (tlops.runners.torchrun)",
    )
    engine: Literal["trainjob", "pytorchjob"] = Field(
        "trainjob",
        description="what runs a multi-node job on the cluster: trainjob = Kubeflow Trainer's TrainJob "
        "(trainer.kubeflow.org/v1alpha1), pytorchjob = the Training Operator's PyTorchJob (kubeflow.org/v1)",
    )
    sync_batchnorm: bool = Field(
        True,
        description="ddp: BatchNorm statistics over the global batch, not each rank's share "
        "(nn.SyncBatchNorm on CUDA; all-reduced sums on CPU, see tlops.training.sync_batchnorm)",
    )

    @model_validator(mode="before")
    @classmethod
    def _distributed_block(cls, v: Any) -> Any:
        """``distributed: {nodes: N, procs_per_node: P, engine: E}`` is shorthand for ``distributed: ddp``
        with ``nodes``, ``nproc`` and ``engine`` (one set of fields, two spellings)."""
        if not isinstance(v, dict) or not isinstance(v.get("distributed"), dict):
            return v
        block = dict(v["distributed"])
        unknown = set(block) - {"nodes", "procs_per_node", "engine"}
        if unknown:
            raise ValueError(f"train.distributed: unknown keys {sorted(unknown)} (nodes, procs_per_node, engine)")
        out = {**v, "distributed": "ddp"}
        for key, field in (("nodes", "nodes"), ("procs_per_node", "nproc"), ("engine", "engine")):
            if key in block:
                if field in v and v[field] != block[key]:
                    raise ValueError(f"train.distributed.{key} and train.{field} disagree")
                out[field] = block[key]
        return out

    @property
    def multinode(self) -> bool:
        """A data-parallel job over several machines (``nodes`` counts only with ``distributed: ddp``,
        as ``nproc`` does)."""
        return self.distributed == "ddp" and self.nodes > 1

    @field_validator("strategies", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("probe_c")
    @classmethod
    def _positive_c(cls, v: list[float]) -> list[float]:
        if any(not c > 0 for c in v):
            raise ValueError("every probe_c value must be > 0")
        return v

    @field_validator("freeze_blocks")
    @classmethod
    def _k(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return v


class GatesConfig(_Strict):
    min_accuracy: Optional[float] = Field(None, ge=0, le=1)
    min_gain_over_scratch: Optional[float] = Field(None, ge=-1, le=1)
    must_beat_champion: bool = False
    gain_bound: Literal["point", "lower"] = Field(
        "point",
        description="what min_gain_over_scratch and must_beat_champion compare: the point estimate of the gain, "
        "or the lower end of its paired bootstrap interval (the gain must hold with evaluate.bootstrap.confidence)",
    )


class BootstrapConfig(_Strict):
    resamples: int = Field(2000, ge=100, description="bootstrap resamples of the test split for the intervals")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="coverage of the reported intervals")
    seed: int = Field(0, description="seed of the resampling (the intervals are reproducible)")


class EvaluateConfig(_Strict):
    scratch_baseline: bool = Field(True, description="train the same architecture from random init as a baseline")
    ece_bins: int = Field(15, ge=2)
    bootstrap: BootstrapConfig = Field(
        BootstrapConfig(),
        description="intervals for test accuracy and macro-F1; paired intervals for the gains over scratch and "
        "over the champion",
    )
    gates: GatesConfig = GatesConfig()


class RegisterConfig(_Strict):
    model_name: str = Field(..., min_length=1)
    auto_promote: bool = Field(False, description="set alias 'champion' when all gates pass")


class Toleration(_Strict):
    key: Optional[str] = None
    operator: Literal["Equal", "Exists"] = "Exists"
    value: Optional[str] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None


class GpuConfig(_Strict):
    accelerator_type: str = Field("nvidia.com/gpu", description="resource name of the accelerator")
    accelerator_limit: int = Field(1, ge=1)
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"tlops.dev/node-pool": "gpu"}, description="labels of the GPU node pool"
    )
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    )
    shm_size: Optional[str] = Field("8Gi", description="size of the emptyDir (medium Memory) mounted on /dev/shm")
    cpu_request: Optional[str] = "4"
    memory_request: Optional[str] = "16Gi"
    cpu_limit: Optional[str] = "8"
    memory_limit: Optional[str] = "32Gi"


class ResourcesConfig(_Strict):
    cpu_request: Optional[str] = "1"
    memory_request: Optional[str] = "2Gi"
    cpu_limit: Optional[str] = "2"
    memory_limit: Optional[str] = "8Gi"


class SecretEnv(_Strict):
    name: str = Field(..., min_length=1, description="Kubernetes Secret name")
    env: dict[str, str] = Field(..., min_length=1, description="ENV_VAR: key-in-secret")


class RetryConfig(_Strict):
    count: int = Field(3, ge=0)
    backoff: str = Field("30s", pattern=r"^\d+s$")
    factor: float = Field(2.0, ge=1.0)
    max_backoff: str = Field("600s", pattern=r"^\d+s$")


class KubernetesConfig(_Strict):
    image: Optional[str] = Field(None, description="container image (default: env TLOPS_IMAGE, else tlops:<version>)")
    resources: ResourcesConfig = ResourcesConfig()
    gpu: Optional[GpuConfig] = Field(None, description="fine-tune on a GPU node pool; null = CPU only")
    secrets: list[SecretEnv] = Field(
        default_factory=list, description="Secrets exposed as env vars (S3 and MLflow credentials)"
    )
    retries: RetryConfig = RetryConfig()
    caching: bool = True
    data_version: Optional[str] = Field(
        None, description="immutable data version (DVC md5 / git rev); with it KFP may cache ingest"
    )


class TrackingConfig(_Strict):
    uri: Optional[str] = Field(
        None, description="MLflow tracking URI (default: sqlite under workdir; env MLFLOW_TRACKING_URI wins)"
    )
    experiment: str = "tlops"
    artifact_location: Optional[str] = Field(
        None,
        description="artifact root for a new experiment, e.g. s3://bucket/mlflow (endpoint: MLFLOW_S3_ENDPOINT_URL)",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: Optional[str]) -> Optional[str]:
        return _no_credentials(v, "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")

    @field_validator("artifact_location")
    @classmethod
    def _artifact_location(cls, v: Optional[str]) -> Optional[str]:
        return _no_credentials(v, _S3_CREDS, any_user=True)


# Search-space keys whose values only decide where/how fast training runs, not what it learns.
_TUNE_REFUSED = {
    "train.device": "where training runs",
    "train.threads": "CPU threads",
    "train.distributed": "data-parallel training",
    "train.nproc": "data-parallel processes",
    "train.nodes": "data-parallel machines",
    "train.engine": "the cluster job kind",
    "train.compile": "torch.compile",
    "train.channels_last": "memory format",
}


def train_keys() -> dict[str, Any]:
    """Every leaf of ``train.*`` as a dotted key (``train.lr``, ``train.lora.r``) -> its annotation."""
    out: dict[str, Any] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                out[prefix + name] = ann

    walk(TrainConfig, "train.")
    return out


def int_field(key: str) -> bool:
    """Whether the ``train.*`` field takes integers (``int``, ``Optional[int]``, ``int | 'auto'``)."""
    ann = train_keys()[key]
    return ann is int or int in getattr(ann, "__args__", ())


def with_train_params(train: "TrainConfig", params: dict[str, Any]) -> "TrainConfig":
    """``train`` with dotted ``train.*`` values applied (a scalar for a list field such as
    ``train.probe_c`` becomes a one-element list: one C, no inner search), validated again."""
    d = train.model_dump(mode="json")
    keys = train_keys()
    for key, value in params.items():
        *head, last = key.split(".")[1:]
        cur = d
        for part in head:
            cur = cur[part]
        is_list = getattr(keys.get(key), "__origin__", None) is list
        cur[last] = [value] if is_list and not isinstance(value, list) else value
    return TrainConfig.model_validate(d)


class TuneParam(_Strict):
    """One dimension of the search space: a range (``low``/``high``, optionally ``log``) or ``choices``.

    Int or float follows the ``train.*`` field's own type (``train.epochs`` is searched over ints)."""

    low: Optional[float] = Field(None, description="lower end of a range (inclusive)")
    high: Optional[float] = Field(None, description="upper end of a range (inclusive)")
    log: bool = Field(False, description="sample the range log-uniformly (learning rates, regularisation strengths)")
    choices: Optional[list[Any]] = Field(None, min_length=1, description="a categorical list instead of a range")

    @model_validator(mode="after")
    def _range_or_choices(self) -> "TuneParam":
        ranged = self.low is not None or self.high is not None
        if ranged == (self.choices is not None):
            raise ValueError("give either low and high (a range) or choices (a list)")
        if ranged:
            if self.low is None or self.high is None:
                raise ValueError("a range needs both low and high")
            if not self.low < self.high:
                raise ValueError(f"low must be < high (got {self.low} and {self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"log: true needs low > 0 (got {self.low})")
        elif self.log:
            raise ValueError("log applies to a range, not to choices")
        return self


class TuneConfig(_Strict):
    """``tlops tune``: hyper-parameter search over ``train.*`` (Optuna locally, a Katib Experiment on a cluster)."""

    space: dict[str, TuneParam] = Field(
        ...,
        description="train.* key -> {low, high, log} or {choices}; e.g. train.lr: {low: 1e-5, high: 1e-3, log: true}",
    )
    objective: Literal["auto", "val_acc", "source_val_acc"] = Field(
        "auto",
        description="what a trial is scored on: the selected strategy's validation accuracy (val_acc) or source-domain "
        "validation accuracy (source_val_acc: no target labels); auto = source_val_acc with data.adapt_from, else "
        "val_acc. Test labels are never used",
    )
    direction: Literal["maximize", "minimize"] = Field("maximize", description="accuracies are maximised")
    trials: int = Field(20, ge=1, description="budget: at most this many trials")
    minutes: Optional[float] = Field(10.0, gt=0, description="budget: no new trial starts after this many minutes")
    algorithm: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler (Katib: the same algorithm name)")
    pruning: bool = Field(
        True,
        description="median pruning (Katib: medianstop): stop a trial whose per-epoch validation value is below the "
        "median of earlier trials at the same epoch",
    )
    seed: int = Field(0, description="sampler seed (the trials' training seed stays the config's seed)")

    @field_validator("space")
    @classmethod
    def _keys(cls, v: dict[str, TuneParam]) -> dict[str, TuneParam]:
        if not v:
            raise ValueError("the search space is empty; add train.* keys, e.g. train.lr: {low: 1e-5, high: 1e-3}")
        keys = train_keys()
        for key, p in v.items():
            if key not in keys:
                allowed = ", ".join(k for k in keys if k not in _TUNE_REFUSED)
                raise ValueError(
                    f"unknown search key {key!r}: the search space holds train.* fields; allowed: {allowed}"
                )
            if key in _TUNE_REFUSED:
                raise ValueError(f"{key} cannot be searched ({_TUNE_REFUSED[key]})")
            base = keys[key]
            base = next((a for a in getattr(base, "__args__", ()) if a is not type(None)), base)
            if p.choices is None:
                if base not in (int, float) and getattr(base, "__origin__", None) is not list:
                    raise ValueError(f"{key}: not a number; give choices instead of a range")
                if int_field(key) and not (float(p.low).is_integer() and float(p.high).is_integer()):
                    raise ValueError(f"{key} is an integer field: low and high must be integers")
        return v


# "register" is a field name users expect; pydantic warns that it shadows ABCMeta.register.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class PipelineConfig(_Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    workdir: str = Field(".tlops", description="runs/, cache/ and the embedded MLflow store live here")
    seed: int = 0
    data: DataConfig
    source: SourceConfig
    features: FeaturesConfig = FeaturesConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = Field(...)  # explicit: otherwise pydantic takes ABCMeta.register as default
    tracking: TrackingConfig = TrackingConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    tune: Optional[TuneConfig] = Field(None, description="hyper-parameter search for `tlops tune` (null: none)")

    @model_validator(mode="after")
    def _strategies_fit(self) -> "PipelineConfig":
        """Each strategy's needs (registry): data.adapt_from, source.candidates, the source
        model's modality when its spec tells (else the fine-tune step checks it after pull-model)."""
        errors = self._strategy_problems(self)
        if errors:
            raise ValueError("\n  ".join(errors))
        if self.train.select_on == "source_val" and self.data.adapt_from is None:
            raise ValueError("train.select_on: source_val needs data.adapt_from")
        return self

    def _strategy_problems(self, cfg: "PipelineConfig") -> list[str]:
        specs = [self.source.model, *(self.source.candidates or [])]
        modalities = {spec_modality(m) for m in specs}
        modality = modalities.pop() if len(modalities) == 1 else None
        return strategy_registry.problems(cfg, modality=modality, model=f"source.model {self.source.model}")

    def _strategy_choice_problem(self, value: Any, train: "TrainConfig") -> str | None:
        """Why ``value`` cannot be a ``train.strategies`` choice of the search space (``train``: this
        config's train section with it applied): a trial trains one strategy, on the features extracted
        once for the study (extract-features reads only whether stacking is among the strategies, so a
        choice must keep that as the config has it), and the strategy's needs (data.adapt_from, the
        modality) must hold."""
        if not isinstance(value, str):
            return "a choice is one strategy name (each trial trains one strategy)"
        if (value == "stacking") != ("stacking" in self.train.strategies):
            return (
                "stacking in some trials but not in train.strategies (or the reverse) would change the features "
                "extract-features computes, which every trial shares; list stacking in both or in neither"
            )
        return "; ".join(self._strategy_problems(self.model_copy(update={"train": train}))) or None

    @model_validator(mode="after")
    def _tune_fits(self) -> "PipelineConfig":
        """Every end of every search range and every choice is a valid value of its train.* field,
        and the objective exists for this pipeline."""
        if self.tune is None:
            return self
        if self.tune.objective == "source_val_acc" and self.data.adapt_from is None:
            raise ValueError("tune.objective: source_val_acc needs data.adapt_from")
        for key, p in self.tune.space.items():
            for value in p.choices if p.choices is not None else (p.low, p.high):
                if p.choices is None and int_field(key):
                    value = int(value)
                try:
                    train = with_train_params(self.train, {key: value})
                except ValidationError as e:
                    msg = "; ".join(x["msg"].removeprefix("Value error, ") for x in e.errors())
                    raise ValueError(f"tune.space.{key}: {value!r} is not a valid value: {msg}") from None
                if key == "train.strategies" and (why := self._strategy_choice_problem(value, train)):
                    raise ValueError(f"tune.space.{key}: {value!r} is not a valid choice: {why}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def section_hash(self, *sections: str) -> str:
        d = self.to_dict()
        return hash_json({s: d[s] for s in sections} | {"seed": self.seed})

    @property
    def config_hash(self) -> str:
        return hash_json(self.to_dict())

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for unknown-key messages)."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cur = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cur is None:
            return []
    return sorted(getattr(cur, "model_fields", {}))


def format_validation_error(err: ValidationError, origin: str) -> str:
    from tlops.redact import redact

    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(PipelineConfig, loc)
            lines.append(f"  {path}: unknown key; allowed keys: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"  {path}: required field is missing")
        elif not loc:
            # a whole-config check: its message names the fields; echoing the whole config helps nobody
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {path}: got {e.get('input')!r}: {msg}")
    # A refused credential must not be echoed back (the message is printed and may be logged).
    return redact("\n".join(lines))


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value (e.g. train.epochs=3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        cur = out
        for k in keys[:-1]:
            nxt = cur.get(k)
            if nxt is None:
                nxt = cur[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{k}' is not a section")
            cur = nxt
        cur[keys[-1]] = value
    return out


def validate_config(raw: Any, origin: str = "<dict>") -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {origin}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    raw = apply_overrides(raw, overrides or []) if isinstance(raw, dict) else raw
    # Relative paths in the config are relative to the current directory, like any CLI.
    return validate_config(raw, str(path))


def save_config(cfg: PipelineConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
