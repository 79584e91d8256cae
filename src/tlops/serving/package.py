"""What a registered model holds: the bundle's inference files, the contract, and the tlops wheel.

Nothing from training rides along (checkpoints with optimizer state, curves, history stay in the
run's workdir) and nothing is pickled: safetensors weights, ``bundle.json``, the tokenizer files,
``contract.json`` and the Python code (``pyfunc_model.py`` + the tlops wheel the requirements
point at, so a fresh environment installs the exact code that wrote the model).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from tlops import __version__
from tlops.errors import ModelError
from tlops.models.bundle_files import BUNDLE_FILE, read_spec
from tlops.serving.contract import CONTRACT_FILE, build_contract

#: third-party libraries the pyfunc needs at inference, pinned to this environment's versions
INFERENCE_PACKAGES = ("torch", "timm", "transformers", "safetensors", "numpy", "pandas", "pillow", "peft")


def bundle_files(spec: dict[str, Any]) -> list[str]:
    """The files (or dirs) of a bundle that inference needs, relative to the bundle dir."""
    return [BUNDLE_FILE, *[spec[k] for k in ("weights", "head", "adapter") if spec.get(k)]]


def export_bundle(src: Path, dst: Path) -> Path:
    """Copy the inference files of the bundle ``src`` to ``dst`` (hard links where possible)."""
    spec = read_spec(src)
    dst.mkdir(parents=True, exist_ok=True)
    for rel in bundle_files(spec):
        s, d = src / rel, dst / rel
        if s.is_dir():
            shutil.copytree(s, d, copy_function=_link_or_copy)
        elif s.is_file():
            _link_or_copy(s, d)
        else:
            raise ModelError(f"{src}: {rel} named in {BUNDLE_FILE} is missing; the bundle is incomplete")
    pickles = [p for p in dst.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")]
    if pickles:
        raise ModelError(f"{src}: refusing to publish pickled files with the model: {[str(p) for p in pickles]}")
    return dst


def _link_or_copy(s: str | Path, d: str | Path) -> None:
    try:
        os.link(s, d)
    except OSError:
        shutil.copy2(s, d)


def weights_bytes(bundle: Path) -> int:
    """Bytes of the bundle's weight files (backbone, head, adapter): the floor of a model's size."""
    total = 0
    for p in bundle.rglob("*.safetensors"):
        total += p.stat().st_size
    return total


# -- the tlops wheel ---------------------------------------------------------------------------
def _source_root() -> Path | None:
    import tlops

    root = Path(tlops.__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "tlops").is_dir() else None


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    files = [root / "pyproject.toml", *sorted((root / "src" / "tlops").rglob("*.py"))]
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_wheel(cache: Path | None = None) -> Path:
    """The wheel of the running tlops: built from the checkout (cached by source hash), or repacked
    from the installed distribution when tlops runs from a wheel (a container, a KFP task)."""
    cache = cache or Path(os.environ.get("TLOPS_WHEEL_CACHE", Path(tempfile.gettempdir()) / "tlops-wheels"))
    root = _source_root()
    key = _tree_hash(root) if root else f"installed-{__version__}"
    out = cache / key
    found = sorted(out.glob("tlops-*.whl")) if out.is_dir() else []
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        if root:
            _build_from_source(root, tmp)
        else:
            _repack_installed(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process published the same wheel first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(out.glob("tlops-*.whl"))[0]


def _build_from_source(root: Path, out: Path) -> None:
    """``pip wheel`` on a copy of the sources (the shared checkout gets no build/ dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tlops"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        shutil.copytree(
            root / "src" / "tlops", src / "src" / "tlops", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
        cmd.append(str(src))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ModelError(f"cannot build the tlops wheel to log with the model: {res.stderr.strip()[-2000:]}")


def _repack_installed(out: Path) -> None:
    """A wheel made of the installed tlops distribution's package files and metadata."""
    from importlib import metadata

    dist = metadata.distribution("tlops")
    info = f"tlops-{dist.version}.dist-info"
    whl = out / f"tlops-{dist.version}-py3-none-any.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files or []:
            rel = str(f).replace(os.sep, "/")
            skip = rel.endswith((".pyc", "RECORD", "INSTALLER", "direct_url.json"))
            if skip or rel.startswith("..") or "__pycache__" in rel:
                continue
            data = Path(f.locate()).read_bytes()
            z.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([rel, f"sha256={digest}", len(data)])
        if not any(n.startswith(f"{info}/WHEEL") for n in z.namelist()):
            wheel_meta = "Wheel-Version: 1.0\nGenerator: tlops\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
            z.writestr(f"{info}/WHEEL", wheel_meta)
            writer.writerow([f"{info}/WHEEL", "", ""])
        writer.writerow([f"{info}/RECORD", "", ""])
        z.writestr(f"{info}/RECORD", record.getvalue())


def requirements(wheel_name: str) -> list[str]:
    """The pyfunc's requirements: the logged tlops wheel (relative to the model dir) + pinned libraries."""
    from importlib import metadata

    pins = [f"artifacts/{wheel_name}"]
    for pkg in INFERENCE_PACKAGES:
        try:
            pins.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return pins


# -- logging the model -------------------------------------------------------------------------
def log_model(*, bundle: Path, model_name: str, train_x: Any, input_example: Any, output_example: Any) -> Any:
    """Log the pyfunc (models-from-code) with the slim bundle, its contract and the tlops wheel."""
    import mlflow
    from mlflow.models import ModelSignature, infer_signature

    from tlops.tracking import pyfunc_model

    with tempfile.TemporaryDirectory() as tmp:
        slim = export_bundle(bundle, Path(tmp) / bundle.name)
        contract = Path(tmp) / CONTRACT_FILE
        contract.write_text(json.dumps(build_contract(read_spec(bundle), model_name=model_name, train_x=train_x)))
        wheel = build_wheel()
        # outputs only: the input contract is enforced by the model (any size/dtype/table format),
        # which MLflow's tensor/column schema enforcement would refuse before it gets there
        signature = ModelSignature(inputs=None, outputs=infer_signature(None, output_example).outputs)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(pyfunc_model.__file__)),  # models-from-code: nothing pickled
            artifacts={"bundle": str(slim), "contract": str(contract), "wheel": str(wheel)},
            signature=signature,
            input_example=input_example,
            pip_requirements=requirements(wheel.name),
        )
