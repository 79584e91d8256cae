"""Data lineage with REAL git, REAL dvc and a REAL S3 API server (moto) as the DVC remote.

A data repo versions an image folder (sklearn's digits as PNGs) with ``tlops data version``
(dvc add + git commit + dvc push to S3). A fresh clone elsewhere, whose DVC cache is empty,
is the pipeline's ``data.dvc`` reference: the exact data version comes from the S3 remote.
Feature cache and MLflow artifacts live on S3 too. Changing one image changes the rev, the
DVC md5, the dataset hash and the feature-cache key; the old rev still gives the old hash;
and the registered model version leads back to the git rev + DVC md5.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_config
from PIL import Image
from s3srv import BUCKET, SECRET

from tlops.config import validate_config
from tlops.errors import DataError

pytest.importorskip("dvc")

TLOPS = [sys.executable, "-m", "tlops.cli"]


def sh(args: list[str], cwd: Path) -> str:
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


def write_digits(root: Path, per_class: int = 40) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    for label in (0, 1, 2):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        imgs = d.images[d.target == label][:per_class]
        for i, img in enumerate(imgs):
            Image.fromarray((img * 255 / 16).astype(np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture
def data_repo(tmp_path, s3):
    repo = tmp_path / "data-repo"
    repo.mkdir()
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh(["git", "config", "user.email", "ci@tlops.dev"], repo)
    sh(["git", "config", "user.name", "tlops ci"], repo)
    dvc = [sys.executable, "-m", "dvc"]
    sh(dvc + ["init", "-q"], repo)
    sh(dvc + ["config", "core.analytics", "false"], repo)
    sh(dvc + ["remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc-store"], repo)
    sh(dvc + ["remote", "modify", "storage", "endpointurl", s3.endpoint], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "dvc init + S3 remote"], repo)
    write_digits(repo / "data" / "digits")
    return repo


def version(repo: Path, message: str) -> tuple[str, str, str]:
    """``tlops data version`` as a user runs it; returns (rev, md5, full output)."""
    out = sh(TLOPS + ["data", "version", "data/digits", "-m", message], repo)
    m = re.search(r"data/digits: md5 (\S+), (\d+) files at git rev ([0-9a-f]{40}) \(pushed\)", out)
    assert m, out
    assert f"    rev: {m.group(3)}\n    path: data/digits\n" in out
    return m.group(3), m.group(1), out


def lineage_cfg(workdir: Path, clone: Path, rev: str, tracking_uri: str | None = None, **extra):
    return validate_config(
        digits_config(
            workdir,
            # every image lands in a split (no label budget), so any changed file changes the features
            data={
                "source": None,
                "dvc": {"repo": str(clone), "rev": rev, "path": "data/digits"},
                "labels_per_class": None,
            },
            features={"cache_dir": f"s3://{BUCKET}/features"},
            tracking={"artifact_location": f"s3://{BUCKET}/mlflow", "uri": tracking_uri},
            **extra,
        )
    )


@pytest.mark.slow  # 30 s; default suite: step artifacts on S3 (test_step_artifacts_on_s3), real dvc (test_dvc)
def test_dvc_versioned_data_lineage_through_s3(data_repo, tmp_path, s3, monkeypatch, capfd, caplog):
    import mlflow

    from tlops.runners.local import run_pipeline
    from tlops.storage import S3Storage
    from tlops.tracking.setup import use_store

    caplog.set_level("INFO")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)
    rev1, md5_1, out1 = version(data_repo, "digits v1")
    assert md5_1.endswith(".dir") and ", 120 files at" in out1
    assert [k for k in S3Storage().list(f"s3://{BUCKET}/dvc-store") if k.startswith("files/md5/")]

    # a fresh clone elsewhere; the data repo's own DVC cache is gone: data must come from S3
    shutil.rmtree(data_repo / ".dvc" / "cache")
    clone = tmp_path / "elsewhere" / "data-repo"
    sh(["git", "clone", "-q", str(data_repo), str(clone)], tmp_path)
    assert not (clone / "data" / "digits").exists()

    cfg = lineage_cfg(tmp_path / "work", clone, rev1)
    first = run_pipeline(cfg)
    ds = first.artifact("ingest").meta
    assert ds["counts"] == {"train": 60, "val": 24, "test": 36, "unlabelled": 0}  # the 120 images
    assert ds["data_version"] == {
        "data_hash": ds["data_hash"],
        "dvc_repo": str(clone),
        "git_rev": rev1,
        "dvc_path": "data/digits",
        "dvc_md5": md5_1,
    }
    assert ds["source"] == f"dvc:{clone}@{rev1}:data/digits"
    feats1 = first.artifact("extract-features").meta
    assert feats1["cache"] == "miss"

    use_store(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    c = mlflow.MlflowClient()
    tags = c.get_run(first.mlflow_run_id).data.tags
    assert (tags["tlops.data.git_rev"], tags["tlops.data.dvc_md5"]) == (rev1, md5_1)
    assert tags["tlops.feature_cache_key"] == feats1["cache_key"]

    # lineage from the registered model version back to git rev + DVC md5
    reg = first.artifact("register").meta
    mv = c.get_model_version("t-digits", reg["version"])
    assert mv.tags["tlops.data.git_rev"] == rev1 and mv.tags["tlops.data.dvc_md5"] == md5_1
    assert mv.tags["tlops.data.repo"] == str(clone) and mv.tags["tlops.data.path"] == "data/digits"
    assert f"DVC: `data/digits` md5 `{md5_1}` at git rev `{rev1}`" in mv.description
    print(
        f"\nLINEAGE t-digits v{mv.version}: "
        + ", ".join(f"{k}={mv.tags[k]}" for k in sorted(mv.tags) if k.startswith("tlops.data"))
    )

    # MLflow artifacts went to S3 (MLFLOW_S3_ENDPOINT_URL) and the model loads back from there
    assert c.get_run(first.mlflow_run_id).info.artifact_uri.startswith(f"s3://{BUCKET}/mlflow/")
    assert any(k.endswith("MLmodel") for k in S3Storage().list(f"s3://{BUCKET}/mlflow"))
    model = mlflow.pyfunc.load_model("models:/t-digits@challenger")
    from tlops.data.dataset import Dataset

    test = Dataset(first.artifact("ingest")).load("test")
    assert len(model.predict(test.x[:4])) == 4

    # change ONE file of the tracked data: new rev, new md5, new dataset hash, feature-cache miss
    img = data_repo / "data" / "digits" / "1" / "000.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(img)
    rev2, md5_2, _ = version(data_repo, "digits v2: one image replaced")
    assert rev2 != rev1 and md5_2 != md5_1
    sh(["git", "pull", "-q"], clone)
    second = run_pipeline(lineage_cfg(tmp_path / "work", clone, rev2))
    ds2 = second.artifact("ingest").meta
    assert (ds2["data_version"]["git_rev"], ds2["data_version"]["dvc_md5"]) == (rev2, md5_2)
    assert ds2["data_hash"] != ds["data_hash"]
    feats2 = second.artifact("extract-features").meta
    assert feats2["cache"] == "miss" and feats2["cache_key"] != feats1["cache_key"]
    tags2 = c.get_run(second.mlflow_run_id).data.tags
    assert (tags2["tlops.data.git_rev"], tags2["tlops.data.dvc_md5"]) == (rev2, md5_2)
    assert tags2["tlops.feature_cache_key"] == feats2["cache_key"]

    # the old rev still reproduces the old hash, on another "machine" (fresh workdir, same
    # MLflow server), and hits the feature cache on S3 that the first run filled
    store = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    third = run_pipeline(lineage_cfg(tmp_path / "work-2", clone, rev1, tracking_uri=store))
    assert third.artifact("ingest").meta["data_hash"] == ds["data_hash"]
    assert third.artifact("extract-features").meta["cache"] == "hit"

    # credentials never appear in logs, manifests, MLflow params/tags or anything in the workdirs
    logged = capfd.readouterr()
    texts = [logged.out, logged.err, caplog.text]
    for run in (first, second, third):
        r = c.get_run(run.mlflow_run_id).data
        texts += [repr(r.params), repr(r.tags)]
    for t in texts:
        assert SECRET not in t
    for workdir in (tmp_path / "work", tmp_path / "work-2"):
        for f in workdir.rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f


def test_dvc_ref_errors_are_clear(data_repo, tmp_path):
    from tlops.data import dvc_source
    from tlops.steps import ingest

    rev, _, _ = version(data_repo, "digits v1")
    ref = lineage_cfg(tmp_path / "w", data_repo, "no-such-tag").data.dvc
    with pytest.raises(DataError, match=rf"^data.dvc: cannot open {re.escape(str(data_repo))} at rev no-such-tag: "):
        dvc_source.resolve(ref)
    with pytest.raises(DataError) as e:
        dvc_source.resolve(ref.model_copy(update={"rev": rev, "path": "data/nope"}))
    assert str(e.value) == f"data.dvc.path: data/nope not found in {data_repo} at {rev[:12]}"
    with pytest.raises(DataError) as e:
        dvc_source.resolve(ref.model_copy(update={"rev": rev, "path": ".dvcignore"}))
    assert "is not tracked by DVC (run `tlops data version .dvcignore` in that repo" in str(e.value)

    # committed but never pushed, and the local cache is gone: the message says what to check
    (data_repo / "data" / "digits" / "0" / "000.png").write_bytes(
        (data_repo / "data" / "digits" / "0" / "001.png").read_bytes()
    )
    out = sh(TLOPS + ["data", "version", "data/digits", "--no-push"], data_repo)
    rev2 = re.search(r"at git rev ([0-9a-f]{40})", out).group(1)
    assert "(pushed)" not in out
    shutil.rmtree(data_repo / ".dvc" / "cache")
    cfg = lineage_cfg(tmp_path / "w", data_repo, rev2)
    with pytest.raises(DataError) as e:
        ingest.run(cfg, {}, tmp_path / "ds")
    assert str(e.value).startswith("data.dvc: cannot download data/digits (")
    assert f"from the DVC remote of {data_repo} @ {rev2[:12]}: " in str(e.value)
    assert "Was it pushed (`dvc push`)" in str(e.value)
    assert not (tmp_path / "ds").exists()


def test_credentials_in_urls_are_refused(tmp_path):
    from tlops.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate_config(
            digits_config(
                tmp_path,
                data={
                    "source": None,
                    "dvc": {"repo": "https://bot:ghp_secret123@github.com/org/data.git", "path": "d"},
                },
            )
        )
    assert "data.dvc.repo: got 'https://***@github.com/org/data.git': the URL carries credentials" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_config(digits_config(tmp_path, data={"dvc": {"repo": "r", "path": "d"}}))
    assert "data: got" in str(e.value) and "set exactly one of data.source" in str(e.value)
    with pytest.raises(ConfigError, match="tracking.uri: .* set MLFLOW_TRACKING_USERNAME"):
        validate_config(digits_config(tmp_path, tracking={"uri": "https://u:p@mlflow.example.com"}))


@pytest.mark.parametrize("via_cli", [False, True], ids=["api", "cli"])
def test_step_artifacts_on_s3(s3, tmp_path, via_cli, digits_cfg):
    """``tlops step --in/--out s3://``: inputs come down, the output is published manifest-last,
    and republishing a prefix replaces the old artifact without leaving stale files."""
    from tlops import dag
    from tlops.artifacts import read_artifact
    from tlops.config import save_config
    from tlops.runners.step_io import run_step
    from tlops.storage import S3Storage

    cfg = digits_cfg()
    root = f"s3://{BUCKET}/runs/r1"
    if via_cli:
        cfg_file = tmp_path / "c.yaml"
        save_config(cfg, cfg_file)
        sh(TLOPS + ["step", "ingest", "-c", str(cfg_file), "--out", f"{root}/ingest"], tmp_path)
        sh(TLOPS + ["step", "pull-model", "-c", str(cfg_file), "--out", f"{root}/pull-model"], tmp_path)
        out = sh(
            TLOPS
            + [
                "step",
                "extract-features",
                "-c",
                str(cfg_file),
                "--in",
                f"dataset={root}/ingest",
                "--in",
                f"model={root}/pull-model",
                "--out",
                f"{root}/extract-features",
            ],
            tmp_path,
        )
        assert f"extract-features: wrote {root}/extract-features (features," in out
        assert SECRET not in out
    else:
        run_step(dag.get("ingest"), cfg, {}, f"{root}/ingest")
        run_step(dag.get("pull-model"), cfg, {}, f"{root}/pull-model")
        run_step(
            dag.get("extract-features"),
            cfg,
            {"dataset": f"{root}/ingest", "model": f"{root}/pull-model"},
            f"{root}/extract-features",
        )
    st = S3Storage()
    names = st.list(f"{root}/extract-features")
    assert "manifest.json" in names and "features.npz" in names
    st.download_dir(f"{root}/extract-features", tmp_path / "got")
    assert read_artifact(tmp_path / "got", "features").meta["cache_key"]

    # republish ingest with a different config: the old files go, the manifest is the new one
    st.upload_file(tmp_path / "got" / "manifest.json", f"{root}/ingest/stale.json")
    run_step(dag.get("ingest"), validate_config(digits_config(tmp_path / "w2", seed=1)), {}, f"{root}/ingest")
    assert "stale.json" not in st.list(f"{root}/ingest")
    st.download_dir(f"{root}/ingest", tmp_path / "ds")
    assert read_artifact(tmp_path / "ds", "dataset").meta["seed"] == 1

    # an input prefix without a manifest is refused with a clear message
    from tlops.errors import StorageError

    with pytest.raises(StorageError, match=rf"^cannot download s3://{BUCKET}/runs/none: no manifest.json there"):
        run_step(
            dag.get("extract-features"),
            cfg,
            {"dataset": f"s3://{BUCKET}/runs/none", "model": f"{root}/pull-model"},
            str(tmp_path / "x"),
        )
