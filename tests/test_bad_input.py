"""Bad input fails early and clearly (issue 8, item 1).

Each fault goes through the real command line (``tlops.cli.main``: ``tlops step ingest``,
``tlops step pull-model``, ``tlops validate``, ``tlops run``) in-process, and the test checks:

* the exact user-facing message (names the file / field and the fix) on stderr as ``error: ...``,
  with no traceback;
* a non-zero exit status (2 for config errors, 1 for data / model errors);
* no artifact directory and no half-written temporary directory where the step writes;
* that it fails before expensive work: data faults in ingest (the first step), spec faults at
  config validation, model-directory faults in pull-model (before extract-features).

Inputs are tiny files made in ``tmp_path``; nothing trains.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import digits_config, error_text, run_cli

from tlops.artifacts import MANIFEST, read_artifact
from tlops.config import STRATEGIES

# ---------------------------------------------------------------- helpers


def write_config(tmp_path: Path, data: dict | None = None, **sections: Any) -> Path:
    raw = digits_config(tmp_path / "work", **sections)
    if data is not None:
        raw["data"] = data
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} exists after a failed step"
    if out.parent.exists():
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert left == [], f"temporary directories left behind: {left}"


def step_fails(monkeypatch, capsys, tmp_path: Path, cfg: Path, step: str = "ingest", code: int = 1) -> str:
    """``tlops step <step>`` must fail with ``code`` and one ``error:`` message; return the message."""
    out = tmp_path / "arts" / step
    rc, stdout, err = run_cli(monkeypatch, capsys, "step", step, "--config", str(cfg), "--out", str(out))
    assert rc == code, (rc, stdout, err)
    assert "Traceback" not in err
    err = error_text(err)
    assert err.startswith("error: "), err
    assert_nothing_written(out)
    assert not (cfg.parent / "work" / "index").exists() or not any((cfg.parent / "work" / "index").rglob("*"))
    return err.removeprefix("error: ").rstrip("\n")


def ingest_fails(monkeypatch, capsys, tmp_path: Path, data: dict) -> str:
    return step_fails(monkeypatch, capsys, tmp_path, write_config(tmp_path, data))


def write_images(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            arr[..., c % 3] = 200 + c
            Image.fromarray(arr).save(root / name / f"img{i:02d}.png")
    return root


def text_rows(n: int = 12) -> str:
    return "".join(f"review number {i}\t{i % 2}\n" for i in range(n))


# ---------------------------------------------------------------- empty dataset


def test_empty_csv_with_header_only(monkeypatch, capsys, tmp_path):
    path = tmp_path / "reviews.tsv"
    path.write_text("text\tlabel\n")
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(path)})
    assert msg == (
        f"data.source: {path} contains no samples (empty dataset); "
        "point data.source at the data you meant or add samples to it"
    )


def test_empty_npz(monkeypatch, capsys, tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, 8, 8), np.uint8), y=np.zeros(0, np.int64))
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(path)})
    assert msg == (
        f"data.source: {path} contains no samples (empty dataset); "
        "point data.source at the data you meant or add samples to it"
    )


def test_empty_image_folder(monkeypatch, capsys, tmp_path):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("not an image")
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(root)})
    assert msg.startswith(f"data.source: empty class folder(s) in {root}: cat, dog (no files with extensions ")
    assert msg.endswith("); add images or remove the folder")


# ---------------------------------------------------------------- classes with zero / one sample


def test_class_listed_in_config_but_absent(monkeypatch, capsys, tmp_path):
    root = write_images(tmp_path / "imgs", {"cat": 5, "dog": 5})
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(root), "classes": ["cat", "dog", "cow"]})
    assert msg == "data.classes: label(s) cow not found in the data; labels present: cat, dog"


def test_class_with_one_sample(monkeypatch, capsys, tmp_path):
    root = write_images(tmp_path / "imgs", {"cat": 6, "dog": 6, "rare": 1})
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(root), "split": {"val": 0.2, "test": 0.2}})
    assert msg == (
        "data: too few samples for the requested split (val=0.2, test=0.2): 'rare' has 1 sample(s), needs at "
        "least 3. Lower data.split fractions or labels_per_class, add data, or drop the class with data.classes"
    )


# ---------------------------------------------------------------- labels in test not seen in train


def test_npz_test_labels_not_in_train(monkeypatch, capsys, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "presplit.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 255, (12, 8, 8), dtype=np.uint8),
        y_train=np.array([0, 1] * 6),
        x_test=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8),
        y_test=np.array([0, 1, 7, 7, 9, 1]),
    )
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(path)})
    assert msg == (
        f"data.source: {path}: y_test has label(s) not seen in y_train: '7' (2 samples), '9' (1 sample). "
        "Add training samples for these labels to y_train, or drop them with data.classes"
    )


def test_adapt_from_lacks_a_target_class(monkeypatch, capsys, tmp_path):
    rng = np.random.default_rng(0)
    target, source = tmp_path / "target.npz", tmp_path / "source.npz"
    np.savez(target, x=rng.integers(0, 255, (30, 8, 8), dtype=np.uint8), y=np.array([0, 1, 2] * 10))
    np.savez(source, x=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8), y=np.array([0, 1] * 10))
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(target), "adapt_from": {"source": str(source)}})
    assert msg == (
        f"data.adapt_from: {source} has no sample of target class(es) 2: the adapted model would be "
        "tested on labels it never saw in training. Add source-domain samples for them, or drop them "
        "from the target with data.classes"
    )


# ---------------------------------------------------------------- corrupt / truncated images


def test_corrupt_and_truncated_images_are_named(monkeypatch, capsys, tmp_path):
    root = write_images(tmp_path / "imgs", {"cat": 5, "dog": 5})
    garbage = root / "cat" / "img00.png"
    garbage.write_bytes(b"this is not a png")
    truncated = root / "dog" / "img03.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(root)})
    lines = msg.splitlines()
    assert lines[0] == f"data.source: cannot read 2 image file(s) in {root}:"
    assert lines[1].startswith(f"  {garbage} (UnidentifiedImageError: ")
    assert lines[2].startswith(f"  {truncated} (")
    assert lines[-1] == "remove or replace them"


# ---------------------------------------------------------------- non-UTF-8 text


def test_non_utf8_text_names_file_and_line(monkeypatch, capsys, tmp_path):
    path = tmp_path / "latin1.tsv.gz"
    body = (
        ("text\tlabel\n" + text_rows(5)).encode()
        + "caf\u00e9 cr\u00e8me\t1\n".encode("latin-1")
        + text_rows(5).encode()
    )
    path.write_bytes(gzip.compress(body))
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(path)})
    assert msg == (
        f"data.source: {path} is not valid utf-8 (line 7, byte {body.index(b'caf') + 3}); "
        "convert it to UTF-8 or set data.encoding"
    )


# ---------------------------------------------------------------- CSV columns / delimiter


def test_csv_wrong_columns_lists_expected_and_found(monkeypatch, capsys, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars\n" + "".join(f"text {i},{i % 5}\n" for i in range(10)))
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(path)})
    assert msg == (
        f"data.source: column(s) 'text', 'label' not found in {path}; columns are: review, stars "
        "(if the file has no header row, name its columns with data.columns); set data.text_column / "
        "data.label_column (expected: 'text' for the text and 'label' for the label)"
    )


def test_semicolon_delimited_csv_suggests_the_delimiter(monkeypatch, capsys, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text;label\n" + "".join(f"review {i};{i % 2}\n" for i in range(10)))
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(path)})
    assert msg == (
        f"data.source: column(s) 'text', 'label' not found in {path}; columns are: text;label (only one column "
        "found and its header contains ';': the file is ';'-delimited, but tlops reads ',' (data.format=csv) or tab "
        "(data.format=tsv); convert it, e.g. pandas.read_csv(path, sep=';').to_csv('reviews.csv', index=False)); "
        "set data.text_column / data.label_column (expected: 'text' for the text and 'label' for the label)"
    )


def test_tab_file_read_as_csv_suggests_tsv(monkeypatch, capsys, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text\tlabel\n" + text_rows())
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(path)})
    assert (
        "(only one column found: is the delimiter right? the file was read as csv; try data.format=tsv for tab)" in msg
    )
    assert msg.startswith(f"data.source: column(s) 'text', 'label' not found in {path}; columns are: text\tlabel ")


# ---------------------------------------------------------------- duplicates across splits (warn only)


def test_duplicates_across_splits_warn_and_are_recorded(monkeypatch, capsys, caplog, tmp_path):
    path = tmp_path / "dups.tsv"
    rows = [f"unique review {i}\t{i % 2}\n" for i in range(20)] + ["same text again\t0\n"] * 10
    path.write_text("text\tlabel\n" + "".join(rows))
    out = tmp_path / "arts" / "ingest"
    with caplog.at_level(logging.WARNING, logger="tlops.steps.ingest"):
        rc, stdout, err = run_cli(
            monkeypatch,
            capsys,
            "step",
            "ingest",
            "--config",
            str(write_config(tmp_path, {"source": str(path)})),
            "--out",
            str(out),
        )
    assert rc == 0, err
    dups = read_artifact(out, "dataset").meta["duplicates_across_splits"]
    assert set(dups) == {"train/val", "train/test", "val/test"}  # no unlabelled split
    assert sum(dups.values()) > 0
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "leakage" in r.getMessage()]
    assert len(warning) == 1
    counts = ", ".join(f"{k}: {dups[k]}" for k in ("train/val", "train/test", "val/test") if dups[k])
    assert warning[0] == (
        f"ingest: leakage: the same input occurs in more than one split ({counts}); evaluation on inputs seen in "
        f"training is optimistic. Deduplicate {path} (the counts are in the dataset manifest: duplicates_across_splits)"
    )


def test_no_duplicates_recorded_as_zero(tmp_path):
    from tlops.config import validate_config
    from tlops.steps import ingest

    raw = digits_config(tmp_path / "work")
    art = ingest.run(validate_config(raw), {}, tmp_path / "ingest")
    assert art.meta["duplicates_across_splits"] == {"train/val": 0, "train/test": 0, "val/test": 0}


# ---------------------------------------------------------------- NPZ with object arrays


class _Boom:
    """Unpickling this runs ``touch <marker>``: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_npz_with_object_arrays_is_refused_unopened(monkeypatch, capsys, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([_Boom(marker)] * 4, dtype=object), y=np.array([0, 1, 0, 1]))
    with np.load(path, allow_pickle=False) as z:  # the file really holds a pickle
        with pytest.raises(ValueError, match="allow_pickle"):
            z["x"]
    msg = ingest_fails(monkeypatch, capsys, tmp_path, {"source": str(path)})
    assert msg == (
        f"data.source: {path} contains object arrays; tlops never unpickles data. "
        "Save plain numeric arrays (np.savez(path, x=uint8_images, y=labels))"
    )
    assert not marker.exists(), "the pickle in the NPZ was executed"


# ---------------------------------------------------------------- model directory without weights


def test_hf_dir_without_weights(monkeypatch, capsys, tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "bert"}')
    (d / "tokenizer.json").write_text("{}")
    cfg = write_config(tmp_path, source={"model": f"hf:{d}"})
    msg = step_fails(monkeypatch, capsys, tmp_path, cfg, step="pull-model")
    assert msg == (
        f"source.model: hf:{d} has no model weights: expected one of model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin, pytorch_model.bin.index.json (found: config.json, tokenizer.json); copy the weights into "
        "it (model.save_pretrained(dir) writes model.safetensors)"
    )


def test_hf_dir_without_config(monkeypatch, capsys, tmp_path):
    d = tmp_path / "weights-only"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    msg = step_fails(
        monkeypatch, capsys, tmp_path, write_config(tmp_path, source={"model": f"hf:{d}"}), step="pull-model"
    )
    assert msg == (
        f"source.model: hf:{d} has no config.json (not a Hugging Face model directory; found: "
        "model.safetensors); save it with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
    )


def test_bundle_dir_without_weights(monkeypatch, capsys, tmp_path):
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "bundle.json").write_text(
        '{"kind": "timm", "arch": "resnet10t", "model_kwargs": {}, '
        '"weights": "backbone.safetensors", "format": "tlops-bundle", "version": 1}'
    )
    msg = step_fails(monkeypatch, capsys, tmp_path, write_config(tmp_path, source={"model": str(d)}), step="pull-model")
    assert msg == (
        f"source.model: bundle {d} is missing backbone.safetensors (expected next to bundle.json: "
        "backbone.safetensors); re-export the bundle or pull the model again"
    )


def test_plain_dir_is_not_a_bundle(monkeypatch, capsys, tmp_path):
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "config.json").write_text("{}")
    msg = step_fails(monkeypatch, capsys, tmp_path, write_config(tmp_path, source={"model": str(d)}), step="pull-model")
    assert msg.startswith(
        f"source.model: {d} is a directory but not a tlops bundle (no bundle.json); "
        f"it looks like a Hugging Face model directory: use hf:{d}; valid sources: hf:<hub-id-or-dir>"
    )


# ---------------------------------------------------------------- unknown strategy / model spec (config validation)


def _validate_fails(monkeypatch, capsys, cfg: Path) -> str:
    rc, out, err = run_cli(monkeypatch, capsys, "validate", "--config", str(cfg))
    assert rc == 2, (rc, out, err)
    assert out == "" and "Traceback" not in err
    assert not (cfg.parent / "work").exists()  # nothing created before the config is valid
    return err


def test_unknown_strategy_lists_allowed_values(monkeypatch, capsys, tmp_path):
    err = _validate_fails(monkeypatch, capsys, write_config(tmp_path, train={"strategies": ["linear-probe", "lora2"]}))
    line = [ln for ln in err.splitlines() if ln.startswith("  train.strategies.1")]
    assert len(line) == 1 and line[0].startswith("  train.strategies.1: got 'lora2': Input should be ")
    for s in STRATEGIES:
        assert f"'{s}'" in line[0]


@pytest.mark.parametrize(
    "spec, expect",
    [
        (
            "resnet50",
            "source.model: got 'resnet50': Unknown model source 'resnet50': not a prefix spec and no such "
            "bundle directory; valid sources: hf:<hub-id-or-dir>, hf:pkg:<package>/<dir>, timm:<name>, "
            "mlflow:models:/<name>@<alias>, mlflow:models:/<name>/<version>, <bundle dir> "
            "(did you mean timm:resnet50 or hf:resnet50?)",
        ),
        (
            "torchhub:resnet50",
            "source.model: got 'torchhub:resnet50': Unknown model source 'torchhub:' in "
            "'torchhub:resnet50'; valid sources: hf:<hub-id-or-dir>, hf:pkg:<package>/<dir>, "
            "timm:<name>, mlflow:models:/<name>@<alias>, mlflow:models:/<name>/<version>, <bundle dir>",
        ),
        (
            "mlflow:models:/digits",
            "source.model: got 'mlflow:models:/digits': bad MLflow reference "
            "'mlflow:models:/digits'; use mlflow:models:/<name>@<alias> or "
            "mlflow:models:/<name>/<version>",
        ),
        ("timm:", "source.model: got 'timm:': 'timm:' names no model; e.g. timm:<name>"),
    ],
)
def test_unknown_model_spec_lists_valid_sources(monkeypatch, capsys, tmp_path, spec, expect):
    err = _validate_fails(monkeypatch, capsys, write_config(tmp_path, source={"model": spec}))
    assert err == f"error: invalid config {tmp_path / 'cfg.yaml'}:\n  {expect}\n"


def test_unknown_candidate_spec(monkeypatch, capsys, tmp_path):
    err = _validate_fails(monkeypatch, capsys, write_config(tmp_path, source={"candidates": ["timm:resnet10t", "vit"]}))
    assert "  source.candidates: got ['timm:resnet10t', 'vit']: Unknown model source 'vit'" in err


# ---------------------------------------------------------------- `tlops run` stops at the first step


def test_run_stops_in_ingest_before_pulling_the_model(monkeypatch, capsys, tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("text\tlabel\n")
    cfg = write_config(tmp_path, {"source": str(path)})
    rc, out, err = run_cli(monkeypatch, capsys, "run", "--config", str(cfg), "--run-id", "r1")
    assert rc == 1 and "Traceback" not in err
    assert f"error: data.source: {path} contains no samples (empty dataset)" in err
    run_dir = tmp_path / "work" / "runs" / "r1"
    from tlops.dag import DAG

    left = [p.name for p in run_dir.iterdir()]
    assert "config.yaml" in left
    assert not [n for n in left if n in {s.name for s in DAG} or ".tmp-" in n], left  # no step artifact, no temp dir
    assert not (tmp_path / "work" / "index").exists()


def test_good_input_still_passes(monkeypatch, capsys, tmp_path):
    """Control: the same CLI path succeeds on good data (so the failures above are about the data)."""
    path = tmp_path / "ok.tsv"
    path.write_text("text\tlabel\n" + text_rows(20))
    out = tmp_path / "arts" / "ingest"
    rc, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "step",
        "ingest",
        "--config",
        str(write_config(tmp_path, {"source": str(path)})),
        "--out",
        str(out),
    )
    assert rc == 0, err
    assert (out / MANIFEST).is_file()
    assert stdout.startswith(f"ingest: wrote {out} (dataset, ")
