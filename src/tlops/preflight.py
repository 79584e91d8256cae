"""Pre-flight: everything about a config that can be checked in about a second without training.

``tlops validate`` runs it, and so does ``tlops run`` before it creates a run directory or an MLflow
run, so a config that cannot work fails at once with exit code 2 and leaves nothing behind.

One function per check; each returns the problems it found as messages that name the config
field, the bad value and what would fix it (an empty list: nothing wrong). What is checked:

- data (``data.source`` and ``data.adapt_from.source``): the file or directory exists and is
  readable, its format is known, a CSV/TSV has the text and label columns (only its first line
  is read), an NPZ holds x/y arrays (its directory only), an image folder has class folders
  with images (one file per class is looked for), a built-in dataset exists; a DVC repo given
  as a local path exists;
- source models (``source.model`` and ``source.candidates``): a local Hugging Face directory
  holds config + weights, a timm name is a timm architecture, a bundle has its files,
  ``source.weights`` exists, a registry name and alias (or version) exist in the MLflow
  registry, listing the aliases (or versions, or models) that do (what an earlier run resolved
  counts while the store is unchanged, :mod:`tlops.tracking.memo`: no MLflow import);
- the tracking store: an MLflow server answers (``/health``), a local store's directory is
  writable;
- S3: every bucket the config names answers, an ``s3://`` data source exists.

Network checks (tracking server, S3) are skipped with ``offline=True``. Not checked here, for
lack of a way that is both cheap and certain: Hugging Face hub ids and timm pretrained weights
(a download), a remote DVC repo, that ``data.classes`` occur in the data (a full read).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

from tlops.config import DataConfig, PipelineConfig, SourceDomainConfig
from tlops.errors import ConfigError, TlopsError

#: seconds a network check waits for an answer
NETWORK_TIMEOUT = 5.0


class PreflightError(ConfigError):
    """The config is valid but cannot run as it stands (exit code 2, nothing was started)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("pre-flight check failed:\n" + "\n".join(f"  {p}" for p in problems))


# ---------------------------------------------------------------------- data


def _readable(path: Path, field: str) -> str | None:
    if not path.exists():
        return f"{field}: path not found: {path}"
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return f"{field}: {path} is not readable (permission denied)"
    return None


def check_data_source(data: DataConfig | SourceDomainConfig, field: str = "data.source") -> list[str]:
    """The data location exists, is readable and holds what its format needs (headers only)."""
    from tlops.data import archives, loaders
    from tlops.errors import DataError

    if getattr(data, "dvc", None) is not None:
        from tlops.data.dvc_source import _is_local

        repo = data.dvc.repo
        if _is_local(repo) and not Path(repo).expanduser().is_dir():
            return [f"data.dvc.repo: local DVC repo not found: {repo}"]
        return []
    source = data.source
    if source.startswith("s3://"):
        return []  # checked with the S3 endpoints (network)
    if data.format == "sklearn" or source.startswith("sklearn:"):
        name = source.split(":", 1)[-1]
        return (
            []
            if name == "digits"
            else [f"{field}: unknown built-in dataset 'sklearn:{name}'; available: sklearn:digits"]
        )
    path = Path(source)
    problem = _readable(path, field)
    if problem:
        return [problem]
    if data.format == "auto" and archives.is_archive(path):
        return []  # the contents are checked when the archive is extracted
    try:
        fmt = loaders.detect_format(source) if data.format == "auto" else data.format
    except DataError as e:
        return [str(e).replace("data.source", field, 1)]
    check = {"csv": _check_delimited, "tsv": _check_delimited, "npz": _check_npz, "image-folder": _check_image_folder}
    problem = check[fmt](data, path, fmt) if fmt in check else None
    return [problem.replace("data.source", field, 1)] if problem else []


def _check_delimited(data: DataConfig | SourceDomainConfig, path: Path, fmt: str) -> str | None:
    """The header (or, with data.columns, the first row) against the columns the config names:
    the loader itself reads a copy of the first line, so the messages are the ones a run gives."""
    import gzip

    from tlops.data import loaders
    from tlops.errors import DataError

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            first = f.readline(1 << 20)
    except OSError as e:
        return f"data.source: cannot read {path}: {e}"
    if not first.strip():
        return f"data.source: {path} is empty" if not first else None
    if data.columns and data.quoting != "none" and b'"' in first:
        first = b""  # a quoted field may continue on the next line: only the names are checked
    with tempfile.TemporaryDirectory(prefix="tlops-preflight-") as tmp:
        head = Path(tmp) / path.name.removesuffix(".gz")
        head.write_bytes(first)
        probe = data.model_copy(update={"source": str(head)})
        try:
            loaders.load_delimited(probe, fmt)
        except DataError as e:
            return str(e).replace(str(head), str(path))
    return None


def _check_npz(data: DataConfig | SourceDomainConfig, path: Path, fmt: str) -> str | None:
    import zipfile

    if not zipfile.is_zipfile(path):
        return f"data.source: cannot read {path}: not an NPZ archive (expected a file written by np.savez)"
    with zipfile.ZipFile(path) as z:
        keys = [n.removesuffix(".npy") for n in z.namelist()]
    if ("x" in keys and "y" in keys) or any(k.startswith("x_") and "y" + k[1:] in keys for k in keys):
        return None
    return f"data.source: {path} must hold arrays 'x' and 'y' (or x_<split>/y_<split> pairs); it has: {', '.join(keys)}"


def _check_image_folder(data: DataConfig | SourceDomainConfig, path: Path, fmt: str) -> str | None:
    from tlops.data.loaders import IMAGE_EXTS

    if not path.is_dir():
        return f"data.source: {path} is not a directory (image-folder format needs one sub-folder per class)"
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        return f"data.source: {path} has no class sub-folders; expected {path}/<class>/<image files>"
    empty = [
        d.name
        for d in class_dirs
        if next((p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()), None) is None
    ]
    if empty:
        return (
            f"data.source: empty class folder(s) in {path}: {', '.join(empty)} "
            f"(no files with extensions {', '.join(sorted(IMAGE_EXTS))}); add images or remove the folder"
        )
    return None


def check_data(cfg: PipelineConfig, offline: bool = False) -> list[str]:
    problems = check_data_source(cfg.data)
    if cfg.data.adapt_from is not None:
        problems += check_data_source(cfg.data.adapt_from, "data.adapt_from.source")
    return problems


# ---------------------------------------------------------------------- source models


def timm_names() -> set[str]:
    """timm's architecture names, read from its sources (``@register_model`` functions) without
    importing timm (which imports torch: seconds); equal to ``timm.list_models()``."""
    import importlib.util

    found = importlib.util.find_spec("timm")
    if found is None or not found.submodule_search_locations:
        return set()
    root = Path(list(found.submodule_search_locations)[0]) / "models"
    pattern = re.compile(r"@register_model\s*\n\s*def\s+(\w+)\s*\(")
    names: set[str] = set()
    for f in root.glob("*.py"):
        names.update(pattern.findall(f.read_text(encoding="utf-8", errors="replace")))
    return names


def _check_timm(name: str, field: str) -> str | None:
    import difflib

    arch = name.split(".", 1)[0]
    names = timm_names()
    if arch in names:
        return None
    try:
        import timm  # a miss in the static index is confirmed by timm itself (deprecated aliases)
    except ImportError:
        return f"{field}: timm:{name} needs timm, which is not installed (pip install timm)"
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(arch, sorted(names), n=8, cutoff=0.6)
    return f"{field}: unknown timm model '{name}'; similar names: {', '.join(close) or 'none'} (see timm.list_models())"


def _registry_store(cfg: PipelineConfig) -> tuple[str, str | None]:
    """(tracking URI, a problem) — an embedded store that does not exist yet holds no models, and
    opening it would create it."""
    from tlops.tracking.setup import tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return uri, f"the MLflow registry {uri.removeprefix('sqlite:///')} does not exist yet (nothing registered)"
    return uri, None


def _check_registry(ref: str, field: str, cfg: PipelineConfig, offline: bool) -> str | None:
    """The registered model and its alias or version exist; if not, say which ones do."""
    from tlops.config import _MLFLOW_MODEL_RE

    m = _MLFLOW_MODEL_RE.match(ref)
    spec = f"mlflow:{ref}"
    uri, missing = _registry_store(cfg)
    if missing:
        return (
            f"{field}: cannot resolve {spec}: {missing}; "
            f"register {m['name']} first or point tracking.uri at its registry"
        )
    from tlops.tracking import memo

    if memo.cached(cfg, ("resolve", ref)) not in (None, memo.MISS):
        return None  # resolved by an earlier run, and the store has not changed since
    if offline and not uri.startswith(("sqlite:", "file:")) and "://" in uri:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tlops.tracking.setup import use_store

    use_store(uri)
    client = MlflowClient()
    name = m["name"]
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            names = sorted(r.name for r in client.search_registered_models(max_results=50))
        except MlflowException:
            names = []
        have = ", ".join(names) or "none"
        return f"{field}: cannot resolve {spec}: no registered model '{name}'; registered models: {have}"
    except Exception as e:  # noqa: BLE001 - a store that cannot be read is reported, not raised
        return f"{field}: cannot resolve {spec}: the MLflow registry at {uri} cannot be read ({type(e).__name__}: {e})"
    aliases = dict(sorted((model.aliases or {}).items()))
    if m["alias"]:
        if m["alias"] in aliases:
            return None
        have = ", ".join(f"{a} (v{v})" for a, v in aliases.items()) or "none"
        alias = m["alias"]
        return f"{field}: cannot resolve {spec}: registered model '{name}' has no alias '{alias}'; its aliases: {have}"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if int(m["version"]) in versions:
        return None
    return (
        f"{field}: cannot resolve {spec}: registered model '{name}' has no version {m['version']}; "
        f"its versions: {', '.join(map(str, versions)) or 'none'}"
    )


def check_model_source(spec: str, field: str, cfg: PipelineConfig, offline: bool = False) -> str | None:
    """One source-model spec resolves: local dirs hold the expected files, names are known."""
    from tlops.errors import ModelError
    from tlops.models.bundle_files import read_spec
    from tlops.models.sources import check_bundle_files, check_hf_dir, parse_spec

    def named(e: TlopsError) -> str:
        return re.sub(r"^source\.model: ", f"{field}: ", str(e))

    try:
        kind, ref = parse_spec(spec)
        if kind == "hf":
            if Path(ref).is_dir():
                check_hf_dir(Path(ref), f"hf:{ref}")
            elif ref.startswith((".", "/", "~")) or ref.count("/") > 1:
                return f"{field}: local model directory not found: {ref}"
        elif kind == "bundle":
            check_bundle_files(Path(ref), read_spec(Path(ref)))
        elif kind == "timm":
            return _check_timm(ref, field)
        elif kind == "mlflow":
            return _check_registry(ref, field, cfg, offline)
    except ModelError as e:
        return named(e)
    return None


def check_models(cfg: PipelineConfig, offline: bool = False) -> list[str]:
    specs = [("source.model", cfg.source.model)]
    specs += [(f"source.candidates[{i}]", s) for i, s in enumerate(cfg.source.candidates or [])]
    problems = [p for field, spec in specs if (p := check_model_source(spec, field, cfg, offline))]
    if cfg.source.weights and not Path(cfg.source.weights).expanduser().is_file():
        problems.append(f"source.weights: file not found: {cfg.source.weights}")
    return problems


# ---------------------------------------------------------------------- tracking and S3


def _writable_dir(path: Path) -> bool:
    """``path`` is a writable directory, or could be created as one."""
    for p in (path, *path.parents):
        if p.exists():
            return p.is_dir() and os.access(p, os.W_OK | os.X_OK)
    return False


def check_tracking(cfg: PipelineConfig, offline: bool = False) -> list[str]:
    """A tracking server answers its ``/health`` endpoint; a local store's directory is writable."""
    from tlops.redact import safe_url
    from tlops.tracking.setup import tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith(("sqlite:///", "file:")):
        where = Path(uri.removeprefix("sqlite:///").removeprefix("file://").removeprefix("file:"))
        where = where.parent if uri.startswith("sqlite:") else where
        if not _writable_dir(where):
            return [f"tracking: the MLflow store directory {where} is not writable; pass --workdir or set tracking.uri"]
        return []
    if not uri.startswith(("http://", "https://")) or offline:
        return []
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        r = requests.get(url, timeout=NETWORK_TIMEOUT)
    except requests.RequestException as e:
        return [
            f"tracking: MLflow tracking server {safe_url(uri)} does not answer ({type(e).__name__}); "
            "start it, fix tracking.uri / MLFLOW_TRACKING_URI, or pass --offline to skip network checks"
        ]
    if r.status_code >= 500:
        return [f"tracking: MLflow tracking server {safe_url(uri)} answers HTTP {r.status_code} on /health"]
    return []


def _s3_uris(cfg: PipelineConfig) -> list[tuple[str, str]]:
    found = [
        ("data.source", cfg.data.source),
        ("data.adapt_from.source", cfg.data.adapt_from.source if cfg.data.adapt_from else None),
        ("features.cache_dir", cfg.features.cache_dir),
        ("tracking.artifact_location", cfg.tracking.artifact_location),
    ]
    return [(f, u) for f, u in found if u and u.startswith("s3://")]


def check_s3(cfg: PipelineConfig, offline: bool = False) -> list[str]:
    """Each bucket the config names answers; an ``s3://`` data source exists (object or prefix)."""
    uris = _s3_uris(cfg)
    if offline or not uris:
        return []
    from tlops.errors import StorageError
    from tlops.storage import S3Storage, split_s3

    store = S3Storage(attempts=1)
    problems = []
    for field, uri in uris:
        try:
            if field.endswith("source"):
                if not (store.exists(uri.rstrip("/")) or store.list(uri)):
                    problems.append(f"{field}: not found: {uri}")
            else:
                bucket = split_s3(uri)[0]
                store._call("reach bucket", f"s3://{bucket}", lambda b=bucket: store.client.head_bucket(Bucket=b))
        except StorageError as e:
            problems.append(f"{field}: {e}")
    return problems


# ---------------------------------------------------------------------- all of it

CHECKS: tuple[Callable[[PipelineConfig, bool], list[str]], ...] = (check_data, check_models, check_tracking, check_s3)


def run_checks(cfg: PipelineConfig, *, offline: bool = False) -> list[str]:
    """Every problem every check finds (all checks run, so one pass shows them all)."""
    return [p for check in CHECKS for p in check(cfg, offline)]


def preflight(cfg: PipelineConfig, *, offline: bool = False) -> float:
    """Raise :class:`PreflightError` listing every problem; return the seconds the checks took."""
    t0 = time.perf_counter()
    problems = run_checks(cfg, offline=offline)
    if problems:
        raise PreflightError(problems)
    return time.perf_counter() - t0
