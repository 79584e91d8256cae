"""Security (issue 8, item 5): credentials, archives, pickled weights, TLS.

* Credentials come only from the environment or secret files: a config that puts one in a URL is
  refused at validation without echoing it, and the env values never reach the compiled KFP
  pipeline YAML, step manifests, MLflow params or logs.
* Archives given as ``data.source`` are extracted safely: path traversal, absolute names, links
  pointing outside and special files are refused with the archive and member named, and nothing
  is written outside the temporary extraction directory.
* Weights load only with safetensors or ``torch.load(weights_only=True)``: a pickle with a
  malicious ``__reduce__`` is refused and never executed.
* The KFP and MLflow endpoints are configurable and TLS-verified by default; turning verification
  off takes an explicit flag / env var and logs a warning.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import REPO, digits_config, error_text, run_cli

from tlops.config import validate_config
from tlops.errors import ConfigError

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIATLOPSTESTKEY0001",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-tlops-s3cr3t-KEY",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzE-tlops-session-token",
    "MLFLOW_TRACKING_USERNAME": "mlflow-bot",
    "MLFLOW_TRACKING_PASSWORD": "mlfl0w-pa55word-tlops",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-tlops-0123",
    "KFP_TOKEN": "kfp-token-tlops-4567",
}
# what a leak would look like (the user name alone is not a secret, but it must not appear either)
NEEDLES = list(SECRETS.values())


def write_config(tmp_path: Path, **sections: Any) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(tmp_path / "work", **sections)))
    return path


@pytest.fixture
def secret_env(monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    return SECRETS


def assert_no_secret(text: str, where: str) -> None:
    for s in NEEDLES:
        assert s not in text, f"secret {s[:6]}... found in {where}"


def grep_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert_no_secret(p.read_bytes().decode("utf-8", "replace"), str(p))


# ================================================================ credentials


CRED_URLS = [
    (
        {"data": {"source": "s3://AKIATLOPSTESTKEY0001:wJalrXUtnFEMI-tlops-s3cr3t-KEY@bucket/data.npz"}},
        "data.source",
        "take S3 credentials from the environment",
    ),
    (
        {"data": {"adapt_from": {"source": "s3://AKIATLOPSTESTKEY0001@bucket/usps.npz"}}},
        "data.adapt_from.source",
        "take S3 credentials from the environment",
    ),
    (
        {
            "data": {
                "source": None,
                "dvc": {"repo": "https://bot:mlfl0w-pa55word-tlops@github.com/o/d.git", "path": "d"},
            }
        },
        "data.dvc.repo",
        "use a git credential helper, GIT_ASKPASS or an SSH key",
    ),
    (
        {"features": {"cache_dir": "s3://AKIATLOPSTESTKEY0001:wJalrXUtnFEMI-tlops-s3cr3t-KEY@bucket/cache"}},
        "features.cache_dir",
        "take S3 credentials from the environment",
    ),
    (
        {"tracking": {"uri": "https://mlflow-bot:mlfl0w-pa55word-tlops@mlflow.example.com"}},
        "tracking.uri",
        "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
    ),
    (
        {"tracking": {"artifact_location": "s3://AKIATLOPSTESTKEY0001:wJalrXUtnFEMI-tlops-s3cr3t-KEY@b/mlflow"}},
        "tracking.artifact_location",
        "take S3 credentials from the environment",
    ),
    (
        {"source": {"model": "hf:https://user:kfp-token-tlops-4567@huggingface.co/x"}},
        "source.model",
        "point at a local directory, or use the MLflow registry",
    ),
    (
        {"source": {"weights": "https://u:kfp-token-tlops-4567@example.com/w.safetensors"}},
        "source.weights",
        "point source.weights at a local file",
    ),
]


@pytest.mark.parametrize("sections, field, fix", CRED_URLS, ids=[c[1] for c in CRED_URLS])
def test_credentials_in_config_urls_are_refused_without_echo(tmp_path, sections, field, fix):
    raw = digits_config(tmp_path / "work")
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    msg = str(e.value)
    line = next(ln for ln in msg.splitlines() if ln.startswith(f"  {field}: "))
    assert re.search(r"got '[a-z0-9+:]+://\*\*\*@", line), line  # the URL is shown, its credentials are not
    assert "the URL carries credentials (user:password@); remove them and " + fix in line
    assert_no_secret(msg, "the error message")


def test_git_ssh_user_is_not_a_credential(tmp_path):
    raw = digits_config(
        tmp_path / "work", data={"source": None, "dvc": {"repo": "ssh://git@github.com/o/d.git", "path": "d"}}
    )
    assert validate_config(raw).data.dvc.repo == "ssh://git@github.com/o/d.git"


def test_compile_refuses_credential_url_and_writes_nothing(monkeypatch, capsys, tmp_path, secret_env):
    cfg = write_config(tmp_path, tracking={"uri": "https://mlflow-bot:mlfl0w-pa55word-tlops@mlflow.example.com"})
    out = tmp_path / "pipeline.yaml"
    rc, stdout, err = run_cli(monkeypatch, capsys, "compile", "--config", str(cfg), "--out", str(out))
    assert rc == 2 and "Traceback" not in err
    assert err == (
        f"error: invalid config {cfg}:\n  tracking.uri: got 'https://***@mlflow.example.com': the URL "
        "carries credentials (user:password@); remove them and set MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)\n"
    )
    assert not out.exists()
    assert_no_secret(stdout + err, "CLI output")


def test_compiled_pipeline_yaml_has_secret_names_not_values(monkeypatch, capsys, caplog, tmp_path, secret_env):
    monkeypatch.delenv("TLOPS_IMAGE", raising=False)
    k8s = {
        "secrets": [
            {
                "name": "tlops-s3",
                "env": {"AWS_ACCESS_KEY_ID": "access-key-id", "AWS_SECRET_ACCESS_KEY": "secret-access-key"},
            },
            {"name": "tlops-mlflow", "env": {"MLFLOW_TRACKING_PASSWORD": "password"}},
        ]
    }
    cfg = write_config(
        tmp_path,
        kubernetes=k8s,
        tracking={"uri": "https://mlflow.example.com"},
        features={"cache_dir": "s3://tlops/features"},
    )
    out = tmp_path / "pipeline.yaml"
    with caplog.at_level(logging.DEBUG):
        rc, stdout, err = run_cli(monkeypatch, capsys, "compile", "--config", str(cfg), "--out", str(out))
    assert rc == 0, err
    text = out.read_text()
    assert_no_secret(text, "the compiled pipeline YAML")
    assert_no_secret(stdout + err + caplog.text, "compile output and logs")
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "tlops-s3", "secret-access-key"):
        assert name in text  # names only: the values come from the Kubernetes Secret at run time


def test_manifests_params_and_logs_hold_no_secret(monkeypatch, capsys, caplog, tmp_path, secret_env):
    from tlops.config import load_config
    from tlops.tracking.setup import flatten

    cfg_file = write_config(tmp_path, tracking={"uri": "https://mlflow.example.com"})
    out = tmp_path / "arts" / "ingest"
    with caplog.at_level(logging.DEBUG):
        rc, stdout, err = run_cli(monkeypatch, capsys, "step", "ingest", "--config", str(cfg_file), "--out", str(out))
    assert rc == 0, err
    grep_tree(out)  # manifest.json (config, metadata) and the data files
    assert_no_secret(stdout + err + caplog.text, "ingest output and logs")
    # what pipeline_run logs as MLflow params: the flattened, validated config
    params = {k: str(v)[:500] for k, v in flatten(load_config(cfg_file).to_dict()).items()}
    assert_no_secret(json.dumps(params), "MLflow params")
    assert "tracking.uri" in params and params["tracking.uri"] == "https://mlflow.example.com"


def test_redact_scrubs_env_secrets_and_url_userinfo(secret_env):
    from tlops.redact import redact, safe_url, scrub_urls

    text = f"failed: key {SECRETS['AWS_SECRET_ACCESS_KEY']} at https://bot:{SECRETS['KFP_TOKEN']}@kfp.example.com/x"
    assert redact(text) == "failed: key *** at https://***@kfp.example.com/x"
    assert scrub_urls("s3://AKIA:x@b/k and git@github.com:o/r.git") == "s3://***@b/k and git@github.com:o/r.git"
    assert safe_url("https://u:p@h:8443/p") == "https://h:8443/p"


# ================================================================ archives


@pytest.fixture
def tmpdir_here(monkeypatch, tmp_path):
    """Temporary extraction dirs go under tmp_path, so the test can see that none is left."""
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _png(seed: int, c: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    arr[..., c] = 220
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image_members(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{cls}/img{i}.png": _png(10 * c + i, c) for c, cls in enumerate(("cat", "dog")) for i in range(6)}


def _zip(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps '../' and '/' as given
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _tar(path: Path, files: dict[str, bytes], links: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in links:
            tf.addfile(info)
    return path


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _ingest(tmp_path: Path, source: Path, **data: Any):
    from tlops.steps import ingest

    raw = digits_config(tmp_path / "work")
    raw["data"] = {"source": str(source), **data}
    return ingest.run(validate_config(raw), {}, tmp_path / "arts" / "ingest")


def _refused(tmp_path: Path, archive: Path, tmpdir_here: Path) -> str:
    from tlops.errors import DataError

    with pytest.raises(DataError) as e:
        _ingest(tmp_path, archive)
    assert not (tmp_path / "arts" / "ingest").exists()
    assert list(tmpdir_here.iterdir()) == [], "the extraction directory was left behind"
    return str(e.value)


REFUSAL_TAIL = (
    "; tlops only extracts regular files and folders that stay inside the archive root. Re-create the "
    "archive from the data folder itself (e.g. cd data && zip -r ../data.zip . / tar czf ../data.tgz .)"
)


def test_zip_and_tgz_image_folders_are_ingested(tmp_path, tmpdir_here):
    z = _zip(tmp_path / "pets.zip", {**_image_members("pets/"), "__MACOSX/pets/._cat": b"junk"})
    art = _ingest(tmp_path, z, split={"val": 0.2, "test": 0.2})
    assert art.meta["classes"] == ["cat", "dog"] and art.meta["archive"] == "pets.zip"
    assert sum(art.meta["counts"].values()) == 12
    t = _tar(tmp_path / "pets.tar.gz", _image_members(), [_link("cat/alias.png", "img0.png", tarfile.SYMTYPE)])
    art = _ingest(tmp_path, t, split={"val": 0.2, "test": 0.2})
    assert art.meta["classes"] == ["cat", "dog"] and art.meta["files"] == 13  # the in-archive link is allowed
    assert list(tmpdir_here.iterdir()) == []


def test_zip_path_traversal_is_refused(tmp_path, tmpdir_here):
    escape = "../" * 30 + str(tmp_path / "escaped.txt").lstrip("/")
    z = _zip(tmp_path / "evil.zip", {**_image_members(), escape: b"owned"})
    msg = _refused(tmp_path, z, tmpdir_here)
    assert msg == (
        f"data.source: refusing to extract {z}: member {escape!r} escapes the target directory "
        "(path traversal with '..')" + REFUSAL_TAIL
    )
    assert not (tmp_path / "escaped.txt").exists()


def test_zip_absolute_path_is_refused(tmp_path, tmpdir_here):
    target = str(tmp_path / "abs.txt")
    z = _zip(tmp_path / "abs.zip", {**_image_members(), target: b"owned"})
    msg = _refused(tmp_path, z, tmpdir_here)
    assert msg == f"data.source: refusing to extract {z}: member {target!r} has an absolute path" + REFUSAL_TAIL
    assert not Path(target).exists()


def test_zip_symlink_outside_is_refused(tmp_path, tmpdir_here):
    z = _zip(tmp_path / "link.zip", _image_members(), symlinks={"cat/passwd.png": "../../../../etc/passwd"})
    msg = _refused(tmp_path, z, tmpdir_here)
    assert msg == (
        f"data.source: refusing to extract {z}: member 'cat/passwd.png' is a symbolic link pointing "
        "outside the archive (../../../../etc/passwd)" + REFUSAL_TAIL
    )


@pytest.mark.parametrize(
    "member, why",
    [
        ("TRAVERSAL", "escapes the target directory (path traversal with '..')"),
        ("ABSOLUTE", "has an absolute path"),
        (_link("cat/evil.png", "/etc/passwd", tarfile.SYMTYPE), "is a symbolic link to an absolute path (/etc/passwd)"),
        (
            _link("cat/evil.png", "../../outside.png", tarfile.SYMTYPE),
            "is a symbolic link pointing outside the archive (../../outside.png)",
        ),
        (
            _link("cat/hard.png", "../outside.png", tarfile.LNKTYPE),
            "is a hardlink pointing outside the archive (../outside.png)",
        ),
        (_link("cat/dev", "", tarfile.CHRTYPE), "is a device file, FIFO or other special file"),
    ],
    ids=["traversal", "absolute", "symlink-absolute", "symlink-outside", "hardlink-outside", "device"],
)
def test_tar_malicious_members_are_refused(tmp_path, tmpdir_here, member, why):
    escape = "../" * 30 + str(tmp_path / "escaped.txt").lstrip("/")
    files, links = _image_members(), []
    if member == "TRAVERSAL":
        files[escape], name = b"owned", escape
    elif member == "ABSOLUTE":
        name = str(tmp_path / "escaped.txt")
        files[name] = b"owned"
    else:
        links, name = [member], member.name
    t = _tar(tmp_path / "evil.tgz", files, links)
    msg = _refused(tmp_path, t, tmpdir_here)
    assert msg == f"data.source: refusing to extract {t}: member {name!r} {why}" + REFUSAL_TAIL
    assert not (tmp_path / "escaped.txt").exists()


def test_truncated_archive(tmp_path, tmpdir_here):
    t = _tar(tmp_path / "cut.tar.gz", _image_members())
    t.write_bytes(t.read_bytes()[:300])
    msg = _refused(tmp_path, t, tmpdir_here)
    assert msg.startswith(f"data.source: cannot extract {t} (")
    assert msg.endswith("); the archive is corrupt or truncated")


def test_cli_malicious_archive_exits_1_without_artifact(monkeypatch, capsys, tmp_path, tmpdir_here):
    z = _zip(tmp_path / "evil.zip", {**_image_members(), "../../x.png": b"owned"})
    cfg = write_config(tmp_path, data={"source": str(z), "classes": None, "labels_per_class": None})
    out = tmp_path / "arts" / "ingest"
    rc, stdout, err = run_cli(monkeypatch, capsys, "step", "ingest", "--config", str(cfg), "--out", str(out))
    assert rc == 1 and "Traceback" not in err
    assert error_text(err) == (
        f"error: data.source: refusing to extract {z}: member '../../x.png' escapes the target directory "
        "(path traversal with '..')" + REFUSAL_TAIL + "\n"
    )
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert list(tmpdir_here.iterdir()) == []


# ================================================================ pickled weights


class _Evil:
    """Unpickling this runs ``touch <marker>`` (the pickle holds a GLOBAL os.system call)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"conv1.weight": _Evil(marker)}, path)  # a real torch checkpoint (zip + pickle)
    assert path.stat().st_size > 0 and not marker.exists()
    return path


def test_malicious_pt_weights_file_is_refused_not_executed(tmp_path):
    """``source.weights: <file>.pt`` (what pull-model loads into a timm backbone)."""
    import torch

    from tlops.errors import ModelError
    from tlops.models.sources import _load_weights_file

    marker = tmp_path / "PWNED"
    weights = _evil_pickle(tmp_path / "weights.pt", marker)
    with pytest.raises(ModelError) as e:
        _load_weights_file(torch.nn.Conv2d(1, 1, 1), weights)
    msg = str(e.value)
    assert msg.startswith(
        f"source.weights: refused to load {weights}: it holds pickled Python objects, not plain tensors ("
    )
    assert "GLOBAL posix.system" in msg or "GLOBAL os.system" in msg
    assert msg.endswith(
        "tlops loads weights only with safetensors or torch.load(weights_only=True). Convert the file to .safetensors "
        "(safetensors.torch.save_file(state_dict, path)) from a trusted environment"
    )
    assert not marker.exists(), "the pickle was executed"


def test_malicious_hf_pytorch_model_bin_is_refused_not_executed(monkeypatch, capsys, tmp_path, minilm_dir):
    import shutil

    d = tmp_path / "hf-model"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, d / name)
    marker = tmp_path / "PWNED"
    _evil_pickle(d / "pytorch_model.bin", marker)
    cfg = write_config(tmp_path, source={"model": f"hf:{d}"})
    out = tmp_path / "arts" / "pull-model"
    rc, stdout, err = run_cli(monkeypatch, capsys, "step", "pull-model", "--config", str(cfg), "--out", str(out))
    assert rc == 1 and "Traceback" not in err
    assert error_text(err).startswith(f"error: source.model: refused to load hf:{d}: it holds pickled Python objects")
    assert not marker.exists(), "the pickle was executed"
    assert not out.exists()


def test_no_unsafe_deserialisation_in_the_library():
    """Every torch.load passes weights_only=True; nothing calls pickle.load or np.load(allow_pickle=True)."""
    bad = []
    for p in (REPO / "src" / "tlops").rglob("*.py"):
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{p.name}: {m.group(0)}")
        for pat in (r"allow_pickle\s*=\s*True", r"\bpickle\.loads?\(", r"\bjoblib\.load\(", r"cloudpickle\.loads?\("):
            bad += [f"{p.name}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert bad == []


# ================================================================ TLS


def test_kfp_client_verifies_tls_by_default_and_warns_when_off(caplog):
    from fake_kfp_server import FakeKfpServer

    from tlops.kfp import client as kfp_client
    from tlops.kfp.cli import NO_VERIFY_SSL

    assert NO_VERIFY_SSL.default is False  # the CLI flag is opt-in: --no-verify-ssl
    with FakeKfpServer() as server, caplog.at_level(logging.WARNING, logger="tlops.kfp.client"):
        url = server.url
        client = kfp_client.connect(url)
        assert client._healthz_api.api_client.configuration.verify_ssl is True
        assert not [r for r in caplog.records if "TLS" in r.getMessage()]
        insecure = kfp_client.connect(url, verify_ssl=False)
        assert insecure._healthz_api.api_client.configuration.verify_ssl is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"TLS certificate verification is OFF for KFP at {url} (--no-verify-ssl): anyone on the path can read "
        "the API token and the pipeline; use it only for a test cluster with a self-signed certificate"
    ]


def test_mlflow_endpoint_is_configurable_and_tls_verified_by_default(monkeypatch, caplog, tmp_path):
    from mlflow.environment_variables import MLFLOW_TRACKING_INSECURE_TLS

    from tlops.tracking.setup import tracking_uri, warn_insecure_tls

    cfg = validate_config(digits_config(tmp_path / "w", tracking={"uri": "https://mlflow.example.com"}))
    assert tracking_uri(cfg) == "https://mlflow.example.com"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://other.example.com")
    assert tracking_uri(cfg) == "https://other.example.com"  # the env wins

    monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS", raising=False)
    assert MLFLOW_TRACKING_INSECURE_TLS.get() is False  # MLflow's own default: verify
    with caplog.at_level(logging.WARNING, logger="tlops.tracking.setup"):
        assert warn_insecure_tls("https://mlflow.example.com") is False
        assert caplog.records == []
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        assert warn_insecure_tls("https://mlflow.example.com") is True
    assert [r.getMessage() for r in caplog.records] == [
        "TLS certificate verification is OFF for the MLflow tracking server https://mlflow.example.com "
        "(MLFLOW_TRACKING_INSECURE_TLS=true); credentials and models travel unverified"
    ]


def test_s3_client_verifies_tls_by_default(monkeypatch, secret_env):
    from tlops.storage import S3Storage

    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    store = S3Storage(endpoint_url="https://minio.example.invalid:9000")
    verify = store.client._endpoint.http_session._verify  # True, or the CA bundle it verifies against
    assert verify is True or (isinstance(verify, str) and Path(verify).is_file()), verify
    assert_no_secret(store.endpoint, "the logged endpoint")
