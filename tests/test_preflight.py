"""Pre-flight (``tlops validate`` and the start of ``tlops run``): exact messages, exit code 2,
well under a second, and a failed pre-flight leaves no run directory and no MLflow run."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import digits_config

from tlops import cli
from tlops.config import validate_config
from tlops.preflight import run_checks, timm_names

TLOPS = Path(sys.executable).parent / "tlops"


def _write(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(tmp_path / "work", **sections)))
    return path


def _main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str, float]:
    monkeypatch.setattr(sys, "argv", ["tlops", *argv])
    capsys.readouterr()  # what set-up printed (MLflow creating a store) is not the command's
    t0 = time.perf_counter()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    seconds = time.perf_counter() - t0
    out = capsys.readouterr()
    return code, out.out, out.err, seconds


def _problems(tmp_path, **sections) -> list[str]:
    return run_checks(validate_config(digits_config(tmp_path / "work", **sections)), offline=True)


def _registry(workdir: Path) -> None:
    """An embedded MLflow registry holding digits-source v1 (champion) and v2 (challenger)."""
    from mlflow import MlflowClient

    from tlops.tracking.setup import embedded_uri, use_store

    workdir.mkdir(parents=True, exist_ok=True)
    use_store(embedded_uri(workdir))
    client = MlflowClient()
    client.create_registered_model("digits-source")
    for v, alias in ((1, "champion"), (2, "challenger")):
        client.create_model_version("digits-source", source=str(workdir / f"m{v}"))
        client.set_registered_model_alias("digits-source", alias, str(v))


def _mlflow_runs(workdir: Path) -> list:
    from mlflow import MlflowClient

    from tlops.tracking.setup import embedded_uri, use_store

    use_store(embedded_uri(workdir))
    client = MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


# ---------------------------------------------------------------------- the case, end to end


def test_run_on_a_missing_data_file_fails_at_once_with_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope" / "yelp.tsv"
    cfg = _write(tmp_path, data={"source": str(missing)})
    code, out, err, seconds = _main(monkeypatch, capsys, "run", "--config", str(cfg))
    assert code == 2, err
    assert err == f"error: pre-flight check failed:\n  data.source: path not found: {missing}\n"
    assert out == ""
    assert seconds < 1.0, f"pre-flight took {seconds:.2f}s"
    assert not (tmp_path / "work").exists()  # no run dir, no MLflow store, no run


def test_run_with_an_unknown_alias_creates_no_mlflow_run_and_lists_the_aliases(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    _registry(work)
    cfg = _write(tmp_path, source={"model": "mlflow:models:/digits-source@champin"})
    code, out, err, seconds = _main(monkeypatch, capsys, "run", "--config", str(cfg))
    assert code == 2, err
    assert err == (
        "error: pre-flight check failed:\n"
        "  source.model: cannot resolve mlflow:models:/digits-source@champin: registered model 'digits-source' "
        "has no alias 'champin'; its aliases: challenger (v2), champion (v1)\n"
    )
    assert seconds < 1.0, f"pre-flight took {seconds:.2f}s"
    assert _mlflow_runs(work) == []
    assert not (work / "runs").exists()


def test_validate_exits_2_on_a_missing_file_and_prints_the_config_when_all_is_well(tmp_path, monkeypatch, capsys):
    cfg = _write(tmp_path, data={"source": str(tmp_path / "gone.csv")})
    code, out, err, _ = _main(monkeypatch, capsys, "validate", "--config", str(cfg))
    assert (code, out) == (2, "")
    assert err == f"error: pre-flight check failed:\n  data.source: path not found: {tmp_path / 'gone.csv'}\n"

    code, out, err, seconds = _main(monkeypatch, capsys, "validate", "--config", str(_write(tmp_path)))
    assert code == 0, err
    assert yaml.safe_load(out)["data"]["source"] == "sklearn:digits"
    assert err.startswith("pre-flight: ok in ") and seconds < 1.0
    assert not (tmp_path / "work").exists()  # validate writes nothing


def test_validate_lists_every_problem_at_once(tmp_path, monkeypatch, capsys):
    cfg = _write(
        tmp_path,
        data={"source": str(tmp_path / "a.tsv")},
        source={"model": str(tmp_path / "no-such-dir"), "weights": str(tmp_path / "w.safetensors")},
    )
    code, _, err, _ = _main(monkeypatch, capsys, "validate", "-c", str(cfg))
    assert code == 2
    assert err.splitlines()[1:] == [
        f"  data.source: path not found: {tmp_path / 'a.tsv'}",
        f"  source.model: model directory not found: {tmp_path / 'no-such-dir'}; valid sources: hf:<hub-id-or-dir>, "
        "hf:pkg:<package>/<dir>, timm:<name>, mlflow:models:/<name>@<alias>, mlflow:models:/<name>/<version>, "
        "<bundle dir>",
        f"  source.weights: file not found: {tmp_path / 'w.safetensors'}",
    ]


def test_the_console_script_fails_fast(tmp_path):
    """The whole command, interpreter start included (what a scheduler waits for)."""
    cfg = _write(tmp_path, data={"source": str(tmp_path / "missing.tsv")})
    t0 = time.perf_counter()
    proc = subprocess.run([str(TLOPS), "run", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.endswith(f"data.source: path not found: {tmp_path / 'missing.tsv'}\n")
    assert seconds < 5.0, seconds  # was ~16 s (the failure came from ingest, after MLflow set-up)
    print(f"\ntlops run on a missing data file: exit 2 after {seconds:.2f}s (process wall time)")


# ---------------------------------------------------------------------- data


def test_columns_are_checked_from_the_header(tmp_path):
    f = tmp_path / "reviews.tsv"
    f.write_text("sentence\tlabel\ngood\t1\n")
    assert _problems(tmp_path, data={"source": str(f)}) == [
        f"data.source: column(s) 'text' not found in {f}; columns are: sentence, label "
        "(if the file has no header row, name its columns with data.columns); "
        "set data.text_column / data.label_column (expected: 'text' for the text and 'label' for the label)"
    ]
    assert _problems(tmp_path, data={"source": str(f), "text_column": "sentence"}) == []


def test_headerless_files_check_the_first_row_against_data_columns(tmp_path, shared_data):
    yelp = shared_data / "sentiment_labelled_sentences" / "yelp_labelled.txt"
    ok = {"source": str(yelp), "format": "tsv", "columns": ["text", "label"], "quoting": "none"}
    assert _problems(tmp_path, data=ok) == []
    assert _problems(tmp_path, data={**ok, "columns": ["text", "label", "extra"]}) == [
        f"data.source: 1 row(s) of {yelp} do not have 3 fields (rows 1); check data.format (delimiter) and data.quoting"
    ]


def test_adapt_from_npz_and_image_folders(tmp_path, shared_data):
    import numpy as np

    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4), np.uint8))
    assert _problems(tmp_path, data={"source": str(bad)}) == [
        f"data.source: {bad} must hold arrays 'x' and 'y' (or x_<split>/y_<split> pairs); it has: images"
    ]
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    assert _problems(tmp_path, data={"source": str(folder)}) == [
        f"data.source: empty class folder(s) in {folder}: cat (no files with extensions .bmp, .gif, .jpeg, .jpg, "
        ".pgm, .png, .ppm, .tif, .tiff, .webp); add images or remove the folder"
    ]
    assert _problems(tmp_path, data={"source": str(shared_data / "hymenoptera" / "hymenoptera_64.npz")}) == []
    (folder / "cat" / "a.png").write_bytes(b"")  # only the names are looked at: decoding is the loader's job
    assert _problems(tmp_path, data={"source": str(folder)}) == []
    adapt = {"source": str(tmp_path / "src.npz")}
    assert _problems(tmp_path, data={"adapt_from": adapt}, train={"strategies": ["coral"]}) == [
        f"data.adapt_from.source: path not found: {tmp_path / 'src.npz'}"
    ]


# ---------------------------------------------------------------------- source models


def test_timm_names_are_read_without_importing_timm():
    code = "import sys, tlops.preflight as p; n = p.timm_names(); print('timm' in sys.modules, 'resnet10t' in n)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
    timm = pytest.importorskip("timm")
    assert timm_names() == set(timm.list_models())


def test_unknown_timm_name_lists_similar_ones(tmp_path):
    (p,) = _problems(tmp_path, source={"model": "timm:resnet10x", "pretrained": False})
    assert p.startswith("source.model: unknown timm model 'resnet10x'; similar names: resnet10t, resnet101, ")
    assert p.endswith(" (see timm.list_models())")


def test_hf_dir_without_weights(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert _problems(tmp_path, source={"model": f"hf:{d}"}) == [
        f"source.model: hf:{d} has no model weights: expected one of model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json (found: config.json); "
        "copy the weights into it (model.save_pretrained(dir) writes model.safetensors)"
    ]


def test_registry_names_versions_and_a_store_that_does_not_exist(tmp_path):
    assert _problems(tmp_path, source={"model": "mlflow:models:/digits-source@champion"}) == [
        "source.model: cannot resolve mlflow:models:/digits-source@champion: the MLflow registry "
        f"{tmp_path / 'work' / 'mlflow.db'} does not exist yet (nothing registered); register digits-source first "
        "or point tracking.uri at its registry"
    ]
    assert not (tmp_path / "work").exists()  # looking did not create the store
    _registry(tmp_path / "work")
    assert _problems(tmp_path, source={"model": "mlflow:models:/digits-source@champion"}) == []
    assert _problems(tmp_path, source={"model": "mlflow:models:/digits-source/2"}) == []
    assert _problems(tmp_path, source={"model": "mlflow:models:/digits-source/7"}) == [
        "source.model: cannot resolve mlflow:models:/digits-source/7: registered model 'digits-source' "
        "has no version 7; its versions: 1, 2"
    ]
    assert _problems(
        tmp_path, source={"model": "timm:resnet10t", "candidates": ["mlflow:models:/digit-source@champion"]}
    ) == [
        "source.candidates[0]: cannot resolve mlflow:models:/digit-source@champion: "
        "no registered model 'digit-source'; registered models: digits-source"
    ]


# ---------------------------------------------------------------------- network


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_server_that_does_not_answer(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.replace("//", "//alice:s3cret@"))  # never echoed
    cfg = _write(tmp_path)
    code, _, err, seconds = _main(monkeypatch, capsys, "validate", "-c", str(cfg))
    assert code == 2
    assert err == (
        f"error: pre-flight check failed:\n  tracking: MLflow tracking server {uri} does not answer (ConnectionError); "
        "start it, fix tracking.uri / MLFLOW_TRACKING_URI, or pass --offline to skip network checks\n"
    )
    assert seconds < 1.0
    code, _, err, _ = _main(monkeypatch, capsys, "validate", "-c", str(cfg), "--offline")
    assert code == 0 and "pre-flight: ok in " in err and "(network checks skipped: --offline)" in err


def test_s3_data_and_buckets(tmp_path, s3):
    from s3srv import BUCKET

    cfg = validate_config(
        digits_config(
            tmp_path / "work",
            data={"source": f"s3://{BUCKET}/data/missing.tsv"},
            features={"cache_dir": "s3://no-such-bucket/features"},
        )
    )
    assert run_checks(cfg, offline=True) == []
    problems = run_checks(cfg)
    assert problems[0] == f"data.source: not found: s3://{BUCKET}/data/missing.tsv"
    assert problems[1].startswith("features.cache_dir: cannot reach bucket s3://no-such-bucket: not found (")
    assert len(problems) == 2
