"""The registered model: slim and pickle-free, loads from its own tlops wheel, guards its inputs.

Against the real sqlite registry of a tiny digits pipeline (fine-tune, so training checkpoints
exist in the workdir): the logged model holds only safetensors weights, bundle.json, the contract
and the tlops wheel; its input contract is exercised through ``mlflow.pyfunc.load_model`` and
through MLflow's own scoring server over HTTP on loopback.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tests.conftest import digits_config


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline
    from tlops.tracking.setup import embedded_uri

    work = tmp_path_factory.mktemp("artifact") / "work"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        # linear-probe is selected (a random-init backbone fine-tuned on 45 images is near chance); fine-tune
        # still writes its epoch checkpoints into the workdir, which must not reach the registered model
        cfg = digits_config(work, train={"strategies": ["linear-probe", "fine-tune"], "epochs": 3, "batch_size": 16})
        res = run_pipeline(validate_config(cfg))
    return SimpleNamespace(work=work, uri=embedded_uri(work), res=res)


@pytest.fixture
def model(reg):
    import mlflow

    from tlops.tracking.setup import use_store

    use_store(reg.uri)
    return mlflow.pyfunc.load_model("models:/t-digits@challenger")


@pytest.fixture
def model_dir(reg, tmp_path):
    import mlflow

    from tlops.tracking.setup import use_store

    use_store(reg.uri)
    return Path(mlflow.artifacts.download_artifacts("models:/t-digits/1", dst_path=str(tmp_path / "m")))


def _digits(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, [0, 1, 2])
    return d.images[keep][:n], d.target[keep][:n]


def _png_b64(a: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_registered_model_is_slim_and_pickle_free(reg, model_dir):
    files = {str(p.relative_to(model_dir)): p.stat().st_size for p in model_dir.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"))], files
    assert not [f for f in files if "checkpoint" in f or "history" in f or "curves" in f], files
    weights = sum(s for f, s in files.items() if f.endswith(".safetensors"))
    total = sum(files.values())
    print(f"\nMODEL SIZE {total} bytes, weights {weights} bytes, ratio {total / weights:.4f}")
    assert weights > 1_000_000 and total <= 1.1 * weights
    assert {"artifacts/contract.json", "artifacts/linear-probe/bundle.json", "MLmodel"} <= set(files)
    # training checkpoints stay in the run's workdir
    assert list(reg.work.glob("runs/*/fine-tune/models/fine-tune/checkpoints/epoch_*.pt"))
    req = (model_dir / "requirements.txt").read_text().split()
    wheel = [r for r in req if r.endswith(".whl")]
    assert wheel and (model_dir / wheel[0]).is_file() and not [r for r in req if r.startswith("tlops==")]


def test_contract_accepts_arrays_png_and_tables_alike(model):
    raw, y = _digits()
    u8 = np.round(raw * 255 / 16).astype(np.uint8)
    ref = model.predict(u8)
    probs = ref[[f"prob_{c}" for c in "012"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (ref["label"].astype(int).to_numpy() == y).mean() >= 0.5
    assert ref["model_name"].unique().tolist() == ["t-digits"] and ref["model_version"].unique().tolist() == ["1"]
    assert ref["model_alias"].iloc[0] == "challenger"
    np.testing.assert_allclose(ref["score"], probs.max(1))

    def same(out):
        np.testing.assert_allclose(out[[f"prob_{c}" for c in "012"]].to_numpy(), probs, atol=1e-5)

    same(model.predict((u8 / 255.0).astype(np.float32)))  # floats 0-1: ingest's rule
    same(model.predict(u8.astype(np.int64)))  # any integer dtype
    same(model.predict(u8[..., None].repeat(3, -1)))  # RGB of a grayscale model
    same(model.predict(pd.DataFrame({"image": [_png_b64(a) for a in u8]})))  # table of base64 PNGs
    same(model.predict(pd.DataFrame(u8.reshape(len(u8), -1))))  # table of flattened pixels
    same(model.predict([base64.b64decode(_png_b64(a)) for a in u8]))  # raw bytes
    # any size: resized by the model's own prepare (trained at 16x16 from 8x8 inputs)
    big = np.kron(u8, np.ones((4, 4), dtype=np.uint8))  # 32x32
    mixed = model.predict([u8[0].tolist(), big[1].tolist()])
    assert mixed["label"].tolist()[0] == ref["label"].iloc[0] and len(mixed) == 2


def test_contract_refuses_other_scales_with_what_it_expected(model):
    from mlflow.exceptions import MlflowException

    raw, _ = _digits(4)
    with pytest.raises(MlflowException, match=r"trained on 0-255 .*sklearn digits are 0-16"):
        model.predict(raw)  # sklearn digits as they come: 0-16 floats
    with pytest.raises(MlflowException, match="already normalised"):
        model.predict(raw - 8.0)
    with pytest.raises(MlflowException, match="expected pixels 0-255"):
        model.predict(raw * 100)
    with pytest.raises(MlflowException, match="flattened square images"):
        model.predict(np.zeros((2, 10)))
    with pytest.raises(MlflowException, match="base64"):
        model.predict(pd.DataFrame({"image": ["not an image!"]}))
    with pytest.raises(MlflowException, match="no inputs"):
        model.predict(np.zeros((0, 8, 8), dtype=np.uint8))


def test_the_pyfunc_class_imports_without_mlflows_type_hint_warning():
    """The model's predict() takes what the contract parses, which no MLflow type hint describes;
    MLflow's hint validation is skipped and prints nothing (it used to, on every import)."""
    r = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import tlops.tracking.pyfunc"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "type hint" not in r.stderr, r.stderr


def test_text_contract_takes_the_text_column_or_the_only_string_column():
    from tlops.serving.contract import Contract, ContractError, build_contract

    c = Contract(build_contract({"preprocessing": {"modality": "text"}, "classes": ["0", "1"]}, model_name="m"))
    assert c.parse(pd.DataFrame({"text": ["a", "b"], "id": [1, 2]})) == ["a", "b"]
    assert c.parse(pd.DataFrame({"review": ["a"], "stars": [4]})) == ["a"]
    assert c.parse({"sentence": np.array(["x", "y"])}) == ["x", "y"]
    assert c.parse(["only"]) == ["only"]
    with pytest.raises(ContractError, match="exactly one string column"):
        c.parse(pd.DataFrame({"title": ["a"], "body": ["b"]}))
    with pytest.raises(ContractError, match="#1 is NoneType"):
        c.parse(["ok", None])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_scoring_server_speaks_the_contract_over_http(model):
    """MLflow's own /invocations (what `mlflow models serve` runs): table formats, base64 PNGs, 400s."""
    import requests
    import uvicorn
    from mlflow.pyfunc import scoring_server

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(scoring_server.init(model), host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{port}/invocations"
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        raw, _ = _digits(3)
        u8 = np.round(raw * 255 / 16).astype(np.uint8)
        bodies = {
            "inputs": {"inputs": u8.tolist()},
            "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[_png_b64(a)] for a in u8]}},
            "dataframe_records": {"dataframe_records": [{"image": _png_b64(a)} for a in u8]},
            "instances b64": {"instances": [{"b64": _png_b64(a)} for a in u8]},
        }
        labels = {}
        for name, body in bodies.items():
            r = requests.post(url, json=body, timeout=30)
            assert r.status_code == 200, (name, r.text)
            rows = r.json()["predictions"]
            assert rows[0]["model_version"] == "1" and set(rows[0]) >= {"label", "score", "prob_0", "model_name"}
            labels[name] = [row["label"] for row in rows]
        assert len({tuple(v) for v in labels.values()}) == 1, labels
        r = requests.post(url, json={"inputs": raw.tolist()}, timeout=30)
        assert r.status_code == 400 and "sklearn digits are 0-16" in r.json()["message"]
    finally:
        server.should_exit = True
        t.join(10)


@pytest.mark.slow
def test_model_loads_in_a_fresh_venv_from_its_logged_wheel(model_dir, tmp_path):
    """Fresh venv (third-party libraries from the project venv, tlops ONLY from the model's wheel)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True)
    project_site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    # a plain path entry: the project's .pth files (the editable tlops hook among them) are not processed
    Path(site.stdout.strip(), "project.pth").write_text(project_site + "\n")
    wheel = next(r for r in (model_dir / "requirements.txt").read_text().split() if r.endswith(".whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site.stdout.strip(), model_dir / wheel],
        check=True,
    )
    script = (
        "import json, sys, numpy as np, mlflow, tlops\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = m.predict(np.full((2, 8, 8), 200, dtype=np.uint8))\n"
        "print(json.dumps({'tlops': tlops.__file__, 'labels': out['label'].tolist()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))}
    r = subprocess.run([py, "-c", script, str(model_dir)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tlops"].startswith(str(venv)), res  # the wheel's tlops, not the checkout
    assert len(res["labels"]) == 2


def test_batch_predict_resumes_after_a_kill_without_redoing_shards(reg, tmp_path):
    from tlops.serving.predict import predict
    from tlops.tracking.setup import use_store

    use_store(reg.uri)
    out = tmp_path / "pred.parquet"

    def killed(k, n):
        if k == 2:
            raise KeyboardInterrupt  # killed after two shards were written

    with pytest.raises(KeyboardInterrupt):
        predict("t-digits@challenger", "sklearn:digits", out, shard_size=500, progress=killed)
    assert not out.exists() and len(list((tmp_path / "pred.parquet.parts").glob("shard-*.parquet"))) == 2
    res = predict("t-digits@challenger", "sklearn:digits", out, shard_size=500)
    assert res["shards"] == 4 and res["reused_shards"] == 2 and res["model_version"] == "1"
    df = pd.read_parquet(out)
    assert len(df) == 1797 and df["row"].tolist() == list(range(1797))
    assert set(df["model_alias"]) == {"challenger"} and set(df["model_version"]) == {"1"}
    np.testing.assert_allclose(df[["prob_0", "prob_1", "prob_2"]].sum(1), 1.0, atol=1e-5)
    seen = df[df["input_label"].isin(["0", "1", "2"])]
    assert (seen["label"] == seen["input_label"]).mean() > 0.5
    jsonl = predict("t-digits/1", "sklearn:digits", tmp_path / "pred.jsonl", shard_size=2000)
    assert jsonl["model_alias"] is None and sum(1 for _ in open(tmp_path / "pred.jsonl")) == 1797
    # the same through the CLI
    from tlops.cli import main

    argv = ["tlops", "predict", "t-digits@challenger", "--data", "sklearn:digits", "--out", str(tmp_path / "c.jsonl")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [*argv, "--shard-size", "1000", "--workdir", str(reg.work)])
        with pytest.raises(SystemExit) as e:
            main()
    assert e.value.code in (0, None) and sum(1 for _ in open(tmp_path / "c.jsonl")) == 1797
