"""The ingest step on real data: sklearn digits, real PNG folders, real NPZ files and the
real UCI / Blitzer text files from ../shared/data. Every failure must leave no artifact
(and no temporary directory) behind."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import digits_config

from tlops.artifacts import MANIFEST, SCHEMA_VERSION, read_artifact
from tlops.config import validate_config
from tlops.errors import DataError, TlopsError
from tlops.steps import ingest

TLOPS = Path(sys.executable).parent / "tlops"


# ---------------------------------------------------------------- helpers


def make_cfg(tmp_path: Path, seed: int = 0, **data: Any):
    """digits_config with the ``data`` section replaced (not merged) by ``data``."""
    raw = digits_config(tmp_path / "work")
    raw["seed"] = seed
    raw["data"] = data
    return validate_config(raw)


def digits(tmp_path: Path, seed: int = 0, **data: Any):
    base = {
        "source": "sklearn:digits",
        "classes": [0, 1, 2],
        "split": {"val": 0.2, "test": 0.3},
        "labels_per_class": 15,
    }
    return make_cfg(tmp_path, seed=seed, **{**base, **data})


def ingest_fails(cfg, out: Path) -> str:
    """Run ingest, expect a DataError, check nothing was left behind; return the message."""
    with pytest.raises(DataError) as excinfo:
        ingest.run(cfg, {}, out)
    assert_no_artifact(out)
    return str(excinfo.value)


def assert_no_artifact(out: Path) -> None:
    assert not out.exists(), f"{out} exists after a failed ingest"
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
        assert leftovers == [], f"temporary directories left behind: {leftovers}"
        assert list(out.parent.glob(".*.tmp-*")) == []


def load_split(out: Path, split: str):
    d = out / "splits"
    if (d / f"{split}.npz").exists():
        with np.load(d / f"{split}.npz", allow_pickle=False) as z:
            return z["x"], z["y"]
    rows = [json.loads(line) for line in (d / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows], np.array([r["y"] for r in rows], dtype=np.int64)


def write_images(root: Path, counts: dict[str, int], size: int | dict[str, int] = 12, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        s = size[name] if isinstance(size, dict) else size
        for i in range(n):
            arr = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
            arr[..., c % 3] = 200 + c  # make classes distinguishable
            Image.fromarray(arr).save(d / f"img{i:02d}.png")
    return root


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "arts" / "ingest"


# ---------------------------------------------------------------- sklearn:digits


def test_digits_counts_and_labels_per_class(tmp_path, out):
    from sklearn.datasets import load_digits

    cfg = digits(tmp_path)
    art = ingest.run(cfg, {}, out)
    meta = art.meta
    assert meta["modality"] == "image" and meta["format"] == "sklearn"
    assert meta["classes"] == ["0", "1", "2"]
    assert meta["shape"] == [8, 8]

    target = load_digits().target
    sizes = {c: int((target == c).sum()) for c in (0, 1, 2)}
    exp_test = {str(c): int(round(0.3 * n)) for c, n in sizes.items()}
    exp_val = {str(c): 15 for c in sizes}  # few-shot: validation holds at most labels_per_class too
    assert meta["per_class"]["train"] == {"0": 15, "1": 15, "2": 15}
    assert meta["per_class"]["val"] == exp_val
    assert meta["per_class"]["test"] == exp_test
    assert meta["counts"] == {
        "train": 45,
        "val": sum(exp_val.values()),
        "test": sum(exp_test.values()),
        "unlabelled": 0,
    }

    # The files on disk agree with the metadata; every class is in every labelled split.
    seen = {}
    for split, n in meta["counts"].items():
        x, y = load_split(out, split)
        assert x.shape == (n, 8, 8) and x.dtype == np.uint8
        assert len(y) == n and y.dtype == np.int64
        if split != "unlabelled" and n:
            assert set(y.tolist()) == {0, 1, 2}, f"{split} is not stratified"
            assert Counter(y.tolist()) == {i: meta["per_class"][split][str(i)] for i in range(3)}
        seen[split] = {xi.tobytes() for xi in x}
    assert seen["train"].isdisjoint(seen["test"])
    assert seen["train"].isdisjoint(seen["val"])


def test_digits_manifest_fields(tmp_path, out):
    cfg = digits(tmp_path)
    art = ingest.run(cfg, {}, out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest == art.manifest | {"created_at": manifest["created_at"]}
    assert manifest["kind"] == "dataset"
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert isinstance(manifest["content_hash"], str) and len(manifest["content_hash"]) == 64
    assert manifest["inputs"] == {}
    assert manifest["config"] == cfg.data.model_dump(mode="json")
    assert {"tlops", "python", "numpy"} <= set(manifest["versions"])
    assert manifest["metadata"]["data_hash"] == manifest["metadata"]["data_version"]["data_hash"]
    assert manifest["metadata"]["seed"] == 0
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["test.npz", "train.npz", "unlabelled.npz", "val.npz"]
    # read back through the public reader; no temporary dirs remain next to it
    assert read_artifact(out, "dataset").content_hash == art.content_hash
    assert [p.name for p in out.parent.iterdir()] == ["ingest"]


def test_digits_seed_determinism(tmp_path):
    a = ingest.run(digits(tmp_path, seed=0), {}, tmp_path / "a")
    b = ingest.run(digits(tmp_path, seed=0), {}, tmp_path / "b")
    c = ingest.run(digits(tmp_path, seed=1), {}, tmp_path / "c")
    assert a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash
    # data_hash identifies the data, not the split: independent of the seed
    assert a.meta["data_hash"] == b.meta["data_hash"] == c.meta["data_hash"]
    # same per-class sizes, different members
    assert a.meta["counts"] == c.meta["counts"]
    xa, _ = load_split(tmp_path / "a", "train")
    xc, _ = load_split(tmp_path / "c", "train")
    assert not np.array_equal(xa, xc)


def test_digits_data_hash_depends_on_classes(tmp_path):
    a = ingest.run(digits(tmp_path), {}, tmp_path / "a")
    b = ingest.run(digits(tmp_path, classes=[0, 1, 3]), {}, tmp_path / "b")
    assert a.meta["data_hash"] != b.meta["data_hash"]
    assert b.meta["classes"] == ["0", "1", "3"]


def test_digits_unlabelled_split(tmp_path, out):
    art = ingest.run(digits(tmp_path, labels_per_class=5, unlabelled=0.5), {}, out)
    assert art.meta["counts"]["train"] == 15
    assert art.meta["counts"]["unlabelled"] > 0
    _, y = load_split(out, "unlabelled")
    assert set(y.tolist()) == {-1}


def test_rerun_overwrites_existing_artifact(tmp_path, out):
    first = ingest.run(digits(tmp_path, seed=0), {}, out)
    second = ingest.run(digits(tmp_path, seed=1), {}, out)
    assert read_artifact(out).content_hash == second.content_hash != first.content_hash
    assert [p.name for p in out.parent.iterdir()] == ["ingest"]


# ---------------------------------------------------------------- image folder


def test_image_folder_loads(tmp_path, out):
    root = write_images(tmp_path / "imgs", {"cat": 6, "dog": 6, "fox": 6})
    art = ingest.run(make_cfg(tmp_path, source=str(root)), {}, out)
    meta = art.meta
    assert meta["format"] == "image-folder" and meta["modality"] == "image"
    assert meta["classes"] == ["cat", "dog", "fox"]
    assert meta["files"] == 18
    assert meta["shape"] == [12, 12, 3]
    # 6 per class, val=test=0.2 -> 1 val, 1 test, 4 train per class
    assert meta["counts"] == {"train": 12, "val": 3, "test": 3, "unlabelled": 0}
    for split in ("train", "val", "test"):
        assert set(meta["per_class"][split].values()) == {meta["counts"][split] // 3}
        _, y = load_split(out, split)
        assert set(y.tolist()) == {0, 1, 2}


def test_image_folder_corrupt_image(tmp_path, out):
    root = write_images(tmp_path / "imgs", {"cat": 6, "dog": 6, "fox": 6})
    bad = root / "dog" / "x.png"
    bad.write_bytes(b"this is not a png at all \x00\x01\x02" * 10)
    msg = ingest_fails(make_cfg(tmp_path, source=str(root)), out)
    assert msg.startswith(f"data.source: cannot read 1 image file(s) in {root}:")
    assert f"\n  {bad} (UnidentifiedImageError" in msg
    assert msg.endswith("remove or replace them")


def test_image_folder_truncated_image(tmp_path, out):
    root = write_images(tmp_path / "imgs", {"cat": 6, "dog": 6, "fox": 6})
    good = root / "cat" / "img00.png"
    cut = root / "cat" / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])  # valid header, truncated data
    msg = ingest_fails(make_cfg(tmp_path, source=str(root)), out)
    assert "cannot read 1 image file(s)" in msg and str(cut) in msg


def test_image_folder_empty_class(tmp_path, out):
    root = write_images(tmp_path / "imgs", {"cat": 6, "dog": 6})
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("not an image")
    msg = ingest_fails(make_cfg(tmp_path, source=str(root)), out)
    assert f"data.source: empty class folder(s) in {root}: empty, notes " in msg
    assert ".png" in msg and "add images or remove the folder" in msg


def test_image_folder_without_class_folders(tmp_path, out):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    msg = ingest_fails(make_cfg(tmp_path, source=str(root)), out)
    assert msg == f"data.source: {root} has no class sub-folders; expected {root}/<class>/<image files>"


def test_image_folder_mixed_sizes_needs_image_size(tmp_path, out):
    root = write_images(tmp_path / "imgs", {"cat": 6, "dog": 6, "fox": 6}, size={"cat": 12, "dog": 16, "fox": 12})
    msg = ingest_fails(make_cfg(tmp_path, source=str(root)), out)
    assert f"data.source: images in {root} have different sizes (12x12, 16x16)" in msg
    assert "set data.image_size" in msg

    art = ingest.run(make_cfg(tmp_path, source=str(root), image_size=10), {}, out)
    assert art.meta["shape"] == [10, 10, 3]
    x, _ = load_split(out, "train")
    assert x.shape[1:] == (10, 10, 3)


def test_image_folder_unknown_class_filter(tmp_path, out):
    root = write_images(tmp_path / "imgs", {"cat": 6, "dog": 6})
    msg = ingest_fails(make_cfg(tmp_path, source=str(root), classes=["cat", "cow"]), out)
    assert msg == "data.classes: label(s) cow not found in the data; labels present: cat, dog"


def test_image_folder_class_with_too_few_samples(tmp_path, out):
    root = write_images(tmp_path / "imgs", {"cat": 6, "dog": 6, "rare": 2})
    msg = ingest_fails(make_cfg(tmp_path, source=str(root), split={"val": 0.2, "test": 0.2}), out)
    assert msg.startswith("data: too few samples for the requested split (val=0.2, test=0.2): ")
    assert "'rare' has 2 sample(s), needs at least 3" in msg
    assert "'cat'" not in msg and "'dog'" not in msg
    assert "drop the class with data.classes" in msg

    # dropping the class, as the message suggests, works
    art = ingest.run(make_cfg(tmp_path, source=str(root), classes=["cat", "dog"]), {}, out)
    assert art.meta["classes"] == ["cat", "dog"]


# ---------------------------------------------------------------- NPZ


def test_npz_x_y(tmp_path, out):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    y = np.repeat(np.arange(3), 10)
    np.savez(path, x=rng.integers(0, 256, size=(30, 8, 8), dtype=np.uint8), y=y)
    art = ingest.run(make_cfg(tmp_path, source=str(path)), {}, out)
    assert art.meta["format"] == "npz" and art.meta["arrays"] == ["x"]
    assert art.meta["classes"] == ["0", "1", "2"]
    assert sum(art.meta["counts"].values()) == 30
    assert art.meta["shape"] == [8, 8]


def test_npz_split_pairs_and_float_scaling(tmp_path, out):
    path = tmp_path / "data.npz"
    np.savez(
        path,
        x_train=np.full((12, 6, 6), 1.0, dtype=np.float32),
        y_train=np.repeat([5, 7], 6),
        x_test=np.full((6, 6, 6), 0.5, dtype=np.float32),
        y_test=np.repeat([5, 7], 3),
    )
    art = ingest.run(make_cfg(tmp_path, source=str(path)), {}, out)
    assert sorted(art.meta["arrays"]) == ["x_test", "x_train"]
    assert art.meta["classes"] == ["5", "7"]
    x, _ = load_split(out, "train")
    assert x.dtype == np.uint8 and set(np.unique(x).tolist()) <= {128, 255}


def test_npz_object_array_is_refused(tmp_path, out):
    path = tmp_path / "obj.npz"
    x = np.empty(6, dtype=object)
    for i in range(6):
        x[i] = np.zeros((4, 4), dtype=np.uint8)
    np.savez(path, x=x, y=np.array([0, 0, 0, 1, 1, 1]))
    with pytest.raises(ValueError):  # really needs allow_pickle to read
        with np.load(path, allow_pickle=False) as z:
            z["x"]
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert f"data.source: {path} contains object arrays; tlops never unpickles data" in msg


def test_npz_missing_keys_lists_present_keys(tmp_path, out):
    path = tmp_path / "wrong.npz"
    np.savez(path, images=np.zeros((6, 4, 4), dtype=np.uint8), labels=np.zeros(6))
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert msg == (
        f"data.source: {path} must hold arrays 'x' and 'y' (or x_<split>/y_<split> pairs); it has: images, labels"
    )


def test_npz_bad_shape(tmp_path, out):
    path = tmp_path / "flat.npz"
    np.savez(path, x=np.zeros((6, 16), dtype=np.uint8), y=np.zeros(6))
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert "x must be images shaped (N,H,W) or (N,H,W,C)" in msg and "got x(6, 16), y(6,)" in msg


def test_npz_empty_file(tmp_path, out):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert msg.startswith(f"data.source: cannot read {path}: ")


def test_npz_not_a_zip(tmp_path, out):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"garbage" * 20)
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert msg.startswith(f"data.source: cannot read {path}")


# ---------------------------------------------------------------- CSV / TSV text


def test_yelp_tsv_without_header(tmp_path, out, shared_data):
    src = shared_data / "sentiment_labelled_sentences" / "yelp_labelled.txt"
    cfg = make_cfg(tmp_path, source=str(src), columns=["text", "label"], quoting="none")
    art = ingest.run(cfg, {}, out)
    meta = art.meta
    assert meta["modality"] == "text" and meta["format"] == "tsv"
    assert meta["rows"] == 1000
    assert meta["classes"] == ["0", "1"]
    assert sum(meta["counts"].values()) == 1000
    assert meta["shape"] is None
    for split in ("train", "val", "test"):
        texts, y = load_split(out, split)
        assert len(texts) == meta["counts"][split]
        assert set(y.tolist()) == {0, 1}
        assert all(isinstance(t, str) and t for t in texts)
    # a sentence with a double quote survives as text (quoting: none)
    all_texts = [t for s in ("train", "val", "test") for t in load_split(out, s)[0]]
    assert any('"' in t for t in all_texts)


def test_yelp_label_column_missing(tmp_path, out, shared_data):
    src = shared_data / "sentiment_labelled_sentences" / "yelp_labelled.txt"
    cfg = make_cfg(tmp_path, source=str(src), columns=["text", "label"], quoting="none", label_column="sentiment")
    msg = ingest_fails(cfg, out)
    assert f"data.source: column(s) 'sentiment' not found in {src}; columns are: text, label" in msg
    assert "set data.text_column / data.label_column" in msg


def test_headerless_file_without_columns_hints_data_columns(tmp_path, out, shared_data):
    src = shared_data / "sentiment_labelled_sentences" / "yelp_labelled.txt"
    msg = ingest_fails(make_cfg(tmp_path, source=str(src), quoting="none"), out)
    assert "column(s) 'text', 'label' not found" in msg
    assert "if the file has no header row, name its columns with data.columns" in msg


def test_comma_csv_read_as_tsv_hints_delimiter(tmp_path, out):
    path = tmp_path / "reviews.tsv"
    path.write_text("text,label\n" + "".join(f"review number {i},{i % 2}\n" for i in range(12)))
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert "column(s) 'text', 'label' not found" in msg
    assert "columns are: text,label" in msg
    assert "only one column found: is the delimiter right? the file was read as tsv; try data.format=csv" in msg

    art = ingest.run(make_cfg(tmp_path, source=str(path), format="csv"), {}, out)
    assert art.meta["format"] == "csv" and art.meta["rows"] == 12


def test_tsv_read_as_csv_hints_delimiter(tmp_path, out):
    path = tmp_path / "reviews.csv"
    path.write_text("text\tlabel\n" + "".join(f"review {i}\t{i % 2}\n" for i in range(12)))
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert "the file was read as csv; try data.format=tsv" in msg


def test_non_utf8_file_reports_line(tmp_path, out):
    path = tmp_path / "latin.tsv"
    body = b"text\tlabel\ngood\t1\nbad\t0\ncaf\xe9 au lait\t1\nok\t0\n"
    path.write_bytes(body)
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    pos = body.index(b"\xe9")
    assert msg == (
        f"data.source: {path} is not valid utf-8 (line 4, byte {pos}); convert it to UTF-8 or set data.encoding"
    )
    # the suggested fix works
    rows = "".join(f"t{i}\t{i % 2}\n" for i in range(10)).encode()
    path.write_bytes(body + rows)
    art = ingest.run(make_cfg(tmp_path, source=str(path), encoding="latin-1"), {}, out)
    texts = [t for s in ("train", "val", "test") for t in load_split(out, s)[0]]
    assert "café au lait" in texts and art.meta["rows"] == 14


def test_ragged_rows_are_reported(tmp_path, out):
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\na,1\nb,0,extra\nc,1\nd\n")
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert "2 row(s) of" in msg and "(rows 3, 5)" in msg and "check data.format (delimiter) and data.quoting" in msg


def test_empty_text_file(tmp_path, out):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert ingest_fails(make_cfg(tmp_path, source=str(path)), out) == f"data.source: {path} is empty"


def test_blitzer_books_tsv_gz(tmp_path, out, shared_data):
    src = shared_data / "amazon_multidomain_sentiment" / "books.tsv.gz"
    with gzip.open(src, "rt", encoding="utf-8") as f:
        assert f.readline().rstrip("\n").split("\t") == ["label", "rating", "title", "text"]
    art = ingest.run(make_cfg(tmp_path, source=str(src)), {}, out)
    assert art.meta["format"] == "tsv" and art.meta["modality"] == "text"
    assert art.meta["rows"] == 2000
    assert art.meta["classes"] == ["0", "1"]
    assert sum(art.meta["counts"].values()) == 2000
    for split in ("train", "val", "test"):
        assert set(art.meta["per_class"][split]) == {"0", "1"}
        assert min(art.meta["per_class"][split].values()) > 0


# ---------------------------------------------------------------- sources and split budget


def test_missing_path(tmp_path, out):
    path = tmp_path / "nope" / "data.npz"
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert msg == f"data.source: path not found: {path}"


def test_missing_path_with_explicit_format(tmp_path, out):
    path = tmp_path / "nope.csv"
    msg = ingest_fails(make_cfg(tmp_path, source=str(path), format="csv"), out)
    assert msg == f"data.source: path not found: {path}"


def test_unknown_extension(tmp_path, out):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    msg = ingest_fails(make_cfg(tmp_path, source=str(path)), out)
    assert "cannot tell the format of" in msg and "set data.format" in msg


def test_unknown_sklearn_dataset(tmp_path, out):
    msg = ingest_fails(make_cfg(tmp_path, source="sklearn:iris"), out)
    assert msg == "data.source: unknown built-in dataset 'sklearn:iris'; available: sklearn:digits"


def test_labels_per_class_larger_than_available(tmp_path, out):
    msg = ingest_fails(digits(tmp_path, labels_per_class=500), out)
    assert "too few samples for the requested split (val=0.2, test=0.3, labels_per_class=500)" in msg
    assert "fewer than labels_per_class=500" in msg
    for c in ("'0'", "'1'", "'2'"):
        assert c in msg
    assert "Lower data.split fractions or labels_per_class" in msg


def test_failure_keeps_previous_artifact(tmp_path, out):
    good = ingest.run(digits(tmp_path), {}, out)
    with pytest.raises(DataError):
        ingest.run(digits(tmp_path, labels_per_class=500), {}, out)
    assert read_artifact(out, "dataset").content_hash == good.content_hash
    assert [p.name for p in out.parent.iterdir()] == ["ingest"]


def test_data_error_is_a_tlops_error():
    assert issubclass(DataError, TlopsError)


# ---------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert TLOPS.exists(), f"console script not found at {TLOPS}"
    return subprocess.run([str(TLOPS), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_step_ingest_missing_data_exits_1(tmp_path):
    raw = digits_config(tmp_path / "work")
    missing = tmp_path / "no-such-data"
    raw["data"] = {"source": str(missing)}
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    dest = tmp_path / "arts" / "ingest"
    res = _cli("step", "ingest", "--config", str(cfg_file), "--out", str(dest), cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: data.source: path not found: {missing}"]
    assert "Traceback" not in res.stderr
    assert not dest.exists()
    assert_no_artifact(dest)


def test_cli_step_ingest_writes_artifact(tmp_path):
    cfg_file = tmp_path / "good.yaml"
    cfg_file.write_text(yaml.safe_dump(digits_config(tmp_path / "work")))
    dest = tmp_path / "arts" / "ingest"
    res = _cli("step", "ingest", "--config", str(cfg_file), "--out", str(dest), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"ingest: wrote {dest} (dataset, ")
    art = read_artifact(dest, "dataset")
    assert art.meta["counts"]["train"] == 45
