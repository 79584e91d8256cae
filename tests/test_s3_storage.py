"""Storage on a REAL S3 API server (moto's threaded server on loopback): artifact dirs with the
manifest uploaded last, multipart uploads, the feature cache shared across machines through
S3, ingest from s3://, and an endpoint that dies mid-upload. Credentials never leak."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_config
from s3srv import BUCKET, KEY_ID, SECRET  # noqa: F401  (the s3 fixture is in conftest)

from tlops.config import validate_config
from tlops.errors import DataError, StorageError
from tlops.features import extract as extract_mod
from tlops.storage import LocalStorage, S3Storage, storage_for


def objects(prefix: str = "") -> list[str]:
    st = S3Storage()
    return [o["Key"] for o in st.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def make_artifact(d: Path, files: dict[str, bytes]) -> Path:
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    (d / "manifest.json").write_text(json.dumps({"kind": "test", "content_hash": "x"}))
    return d


def _client_error(code: str | None, status: int | None, op: str = "Op", message: str = "m"):
    """botocore's ClientError as an S3 server's reply builds it; a missing code or status is left out."""
    from botocore.exceptions import ClientError

    response: dict = {}
    if code is not None:
        response["Error"] = {"Code": code, "Message": message}
    if status is not None:
        response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, op)


def assert_no_secret(*texts: str) -> None:
    for t in texts:
        assert SECRET not in t


# ---------------------------------------------------------------- storage API


@pytest.mark.parametrize("remote", [True, False], ids=["s3", "local"])
def test_dir_round_trip_manifest_last(s3, tmp_path, monkeypatch, remote):
    src = make_artifact(tmp_path / "a", {"features.npz": b"abc" * 1000, "sub/b.txt": b"hello"})
    base = f"s3://{BUCKET}/arts" if remote else str(tmp_path / "store")
    st = storage_for(base)
    order: list[str] = []
    real = type(st).upload_file

    def spy(self, local, uri):
        order.append(Path(local).name)
        return real(self, local, uri)

    monkeypatch.setattr(type(st), "upload_file", spy)
    uri = f"{base}/one"
    st.upload_dir(src, uri)
    if remote:
        assert order[-1] == "manifest.json" and sorted(order) == ["b.txt", "features.npz", "manifest.json"]
    assert st.exists(f"{uri}/manifest.json")
    assert st.list(uri) == ["features.npz", "manifest.json", "sub/b.txt"]
    out = tmp_path / "back"
    st.download_dir(uri, out)
    for rel in ("features.npz", "sub/b.txt", "manifest.json"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    # a prefix without a manifest is refused
    st.delete(f"{uri}/manifest.json") if remote else (Path(uri) / "manifest.json").unlink()
    with pytest.raises(StorageError, match="no manifest.json there"):
        st.download_dir(uri, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    st.delete_prefix(uri)
    assert st.list(uri) == [] and not st.exists(f"{uri}/features.npz")


def test_upload_failing_midway_leaves_no_manifest(s3, tmp_path, monkeypatch):
    src = make_artifact(tmp_path / "a", {"a.bin": b"1", "b.bin": b"2", "c.bin": b"3"})
    st = S3Storage()
    calls = {"n": 0}
    real = st.client.upload_file

    def dies_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-upload")
        return real(*a, **k)

    monkeypatch.setattr(st.client, "upload_file", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        st.upload_dir(src, f"s3://{BUCKET}/half")
    assert objects("half/") == ["half/a.bin"]
    assert not st.exists(f"s3://{BUCKET}/half/manifest.json")
    with pytest.raises(StorageError, match="no manifest.json"):
        st.download_dir(f"s3://{BUCKET}/half", tmp_path / "x")


def test_multipart_upload_with_small_threshold(s3, tmp_path):
    mib = 1024 * 1024
    big = tmp_path / "big.bin"
    payload = np.random.default_rng(0).integers(0, 256, size=11 * mib, dtype=np.uint8).tobytes()
    big.write_bytes(payload)
    st = S3Storage(multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    st.upload_file(big, f"s3://{BUCKET}/big/big.bin")
    etag = st.client.head_object(Bucket=BUCKET, Key="big/big.bin")["ETag"].strip('"')
    assert etag.endswith("-3"), f"expected a 3-part multipart upload, got ETag {etag}"
    st.download_file(f"s3://{BUCKET}/big/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == payload


def test_missing_object_and_bad_uri(s3, tmp_path):
    st = S3Storage()
    assert not st.exists(f"s3://{BUCKET}/nope/manifest.json")
    with pytest.raises(StorageError) as e:
        st.download_file(f"s3://{BUCKET}/nope.bin", tmp_path / "x")
    assert f"cannot download s3://{BUCKET}/nope.bin: not found" in str(e.value)
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
    assert isinstance(storage_for(str(tmp_path)), LocalStorage)


def test_transient_errors_are_retried_then_reported(s3, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TLOPS_S3_BACKOFF", "0.01")
    st = S3Storage()

    def err(code: str, status: int):
        return _client_error(code, status, op="PutObject", message=code)

    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise err("SlowDown" if calls["n"] == 1 else "InternalError", 503 if calls["n"] == 1 else 500)
        return "ok"

    assert st._call("upload x to", f"s3://{BUCKET}/k", flaky) == "ok" and calls["n"] == 3
    assert caplog.text.count("retrying in") == 2

    calls["n"] = 0

    def always_503():
        calls["n"] += 1
        raise err("ServiceUnavailable", 503)

    with pytest.raises(StorageError) as e:
        st._call("upload x to", f"s3://{BUCKET}/k", always_503)
    assert calls["n"] == 4
    assert str(e.value).startswith(
        f"cannot upload x to s3://{BUCKET}/k: endpoint {s3.endpoint} still failing after 4 attempts"
    )

    calls["n"] = 0

    def denied():
        calls["n"] += 1
        raise err("AccessDenied", 403)

    with pytest.raises(StorageError, match="refused it") as e:
        st._call("upload x to", f"s3://{BUCKET}/k", denied)
    assert calls["n"] == 1  # not transient: no retry
    # a missing bucket is reported at once, naming the URI
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(StorageError) as e:
        st.upload_file(tmp_path / "f.bin", "s3://no-such-bucket/k/f.bin")
    assert "cannot upload f.bin to s3://no-such-bucket/k/f.bin" in str(e.value)
    assert_no_secret(str(e.value), caplog.text)


# ---------------------------------------------------------------- feature cache on S3


def _cfg(workdir: Path):
    return validate_config(digits_config(workdir, features={"cache_dir": f"s3://{BUCKET}/features"}))


def _arrays(art):
    with np.load(art.path / "features.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _pipeline_inputs(cfg, root: Path):
    from tlops.steps import ingest, pull_model

    return {"dataset": ingest.run(cfg, {}, root / "ingest"), "model": pull_model.run(cfg, {}, root / "pull")}


def _all_manifests_clean(st: S3Storage, *roots: Path) -> None:
    for key in objects():
        if key.endswith("manifest.json"):
            body = st.client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            assert_no_secret(body)
    for root in roots:
        for mf in root.rglob("manifest.json"):
            assert_no_secret(mf.read_text())


def test_feature_cache_on_s3_shared_across_machines(s3, tmp_path, monkeypatch, caplog, capfd):
    """Unchanged data reuses the cache even across machines sharing the S3 cache."""
    from tlops.steps import extract_features

    caplog.set_level("DEBUG")
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    cfg_a = _cfg(a / "work")
    ins_a = _pipeline_inputs(cfg_a, a)
    before = dict(extract_mod.STATS)
    first = extract_features.run(cfg_a, ins_a, a / "features")
    assert first.meta["cache"] == "miss"
    assert extract_mod.STATS["backbone_batches"] > before["backbone_batches"]
    key = first.meta["cache_key"]
    entry = f"features/{key[:2]}/{key}/"
    assert objects(entry) == [entry + "features.npz", entry + "manifest.json"]

    # machine B: its own workdir, nothing local in common with A
    import tlops.models.bundle as bundle

    cfg_b = _cfg(b / "work")
    ins_b = _pipeline_inputs(cfg_b, b)

    def no_model(*a, **k):
        raise AssertionError("backbone loaded on a cache hit")

    monkeypatch.setattr(bundle, "load_backbone", no_model)
    mark = dict(extract_mod.STATS)
    second = extract_features.run(cfg_b, ins_b, b / "features")
    assert extract_mod.STATS == mark  # zero backbone forwards
    assert second.meta["cache"] == "hit" and second.meta["cache_key"] == key
    assert "cache hit" in caplog.text and "backbone not run" in caplog.text
    x, y = _arrays(first), _arrays(second)
    assert x.keys() == y.keys() == {"train", "val", "test"}
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert not (b / "work" / "cache").exists()  # nothing cached locally on B

    # a second writer of the same key is harmless
    from tlops.features.cache import FeatureCache

    FeatureCache(f"s3://{BUCKET}/features").put(key, x, {"note": "second writer"})
    assert objects(entry) == [entry + "features.npz", entry + "manifest.json"]

    out = capfd.readouterr()
    assert_no_secret(caplog.text, out.out, out.err)
    _all_manifests_clean(S3Storage(), a, b)


def test_endpoint_dies_during_cache_upload(s3, tmp_path, monkeypatch, caplog, capfd):
    """The S3 endpoint goes away mid-upload: StorageError naming endpoint and key, no manifest
    for the key, no local artifact; after a restart on the same port the rerun completes."""
    from tlops.steps import extract_features

    caplog.set_level("DEBUG")
    monkeypatch.setenv("TLOPS_S3_BACKOFF", "0.05")
    monkeypatch.setenv("TLOPS_S3_CLIENT_RETRIES", "0")
    monkeypatch.setenv("TLOPS_S3_CONNECT_TIMEOUT", "2")
    cfg = _cfg(tmp_path / "work")
    ins = _pipeline_inputs(cfg, tmp_path)
    st = S3Storage()
    real = S3Storage.upload_file
    out = tmp_path / "features"
    messages = []

    def restart(reset: bool) -> None:
        s3.start(reset=reset)
        if BUCKET not in [b["Name"] for b in st.client.list_buckets().get("Buckets", [])]:
            st.client.create_bucket(Bucket=BUCKET)  # in-memory state lost: recreate the bucket

    # phase 1: the server dies right before features.npz is put; phase 2: right before manifest.json
    for victim in ("features.npz", "manifest.json"):

        def server_dies_first(self, local, uri, victim=victim):
            if Path(local).name == victim:
                s3.stop()
                assert s3.refused()
            return real(self, local, uri)

        monkeypatch.setattr(S3Storage, "upload_file", server_dies_first)
        with pytest.raises(StorageError) as e:
            extract_features.run(cfg, ins, out)
        msg = str(e.value)
        messages.append(msg)
        assert msg.startswith(f"cannot upload {victim} to s3://{BUCKET}/features/"), msg
        assert f"endpoint {s3.endpoint} unreachable after 4 attempts (EndpointConnectionError" in msg
        assert not out.exists() and list(tmp_path.glob(".features*")) == []
        monkeypatch.setattr(S3Storage, "upload_file", real)
        restart(reset=False)  # moto keeps state in this process: see what the failed run left
        left = objects("features/")
        assert not [k for k in left if k.endswith("manifest.json")], left
        assert len(left) == (0 if victim == "features.npz" else 1)  # a lone features.npz is never trusted

    art = extract_features.run(cfg, ins, out)
    assert art.meta["cache"] == "miss"
    key = art.meta["cache_key"]
    assert msg.split(" to ")[1].startswith(f"s3://{BUCKET}/features/{key[:2]}/{key}/manifest.json:")
    again = extract_features.run(cfg, ins, tmp_path / "features-2")
    assert again.meta["cache"] == "hit"

    # a restarted server that lost everything (fresh bucket): rerun recomputes, then hits
    s3.stop()
    restart(reset=True)
    assert objects() == []
    assert extract_features.run(cfg, ins, tmp_path / "features-3").meta["cache"] == "miss"
    assert extract_features.run(cfg, ins, tmp_path / "features-4").meta["cache"] == "hit"

    captured = capfd.readouterr()
    assert_no_secret(*messages, caplog.text, captured.out, captured.err)
    for m in messages:
        assert KEY_ID not in m
    _all_manifests_clean(st, tmp_path)


# ---------------------------------------------------------------- ingest from S3


def test_ingest_yelp_tsv_from_s3(s3, tmp_path, shared_data, caplog):
    from tlops.steps import ingest

    src = shared_data / "sentiment_labelled_sentences" / "yelp_labelled.txt"
    uri = f"s3://{BUCKET}/data/yelp_labelled.txt"
    S3Storage().upload_file(src, uri)

    def cfg(source: str):
        raw = digits_config(tmp_path / "work")
        raw["data"] = {"source": source, "columns": ["text", "label"], "quoting": "none"}
        return validate_config(raw)

    remote = ingest.run(cfg(uri), {}, tmp_path / "remote")
    local = ingest.run(cfg(str(src)), {}, tmp_path / "local")
    assert remote.meta["format"] == "tsv" and remote.meta["source"] == uri
    assert remote.meta["data_hash"] == local.meta["data_hash"]
    assert remote.meta["counts"] == local.meta["counts"] and sum(remote.meta["counts"].values()) == 1000

    with pytest.raises(DataError) as e:
        ingest.run(cfg(f"s3://{BUCKET}/data/missing.tsv"), {}, tmp_path / "missing")
    assert str(e.value) == f"data.source: not found: s3://{BUCKET}/data/missing.tsv"
    assert not (tmp_path / "missing").exists()
    assert_no_secret(caplog.text, json.dumps(remote.manifest))


def test_ingest_image_folder_prefix_from_s3(s3, tmp_path):
    from PIL import Image

    from tlops.steps import ingest

    st = S3Storage()
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        for i in range(6):
            f = tmp_path / "imgs" / cls / f"{i}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(f)
            st.upload_file(f, f"s3://{BUCKET}/images/{cls}/{i}.png")
    raw = digits_config(tmp_path / "work")
    raw["data"] = {"source": f"s3://{BUCKET}/images", "split": {"val": 0.2, "test": 0.3}}
    art = ingest.run(validate_config(raw), {}, tmp_path / "ds")
    assert art.meta["format"] == "image-folder" and art.meta["classes"] == ["cat", "dog"]
    assert sum(art.meta["counts"].values()) == 12


def test_stamp_fingerprints_objects_and_prefixes_by_name_size_and_etag_without_downloading(s3, monkeypatch):
    """``stamp`` is what pull-model and ingest key an ``s3://`` source by: an object's name and
    content (not where it lives), a prefix's relative names and contents, "missing" for nothing."""
    st = S3Storage()

    def put(key: str, data: bytes) -> None:
        st.client.put_object(Bucket=BUCKET, Key=key, Body=data)

    def stamp(key: str) -> str:
        return st.stamp(f"s3://{BUCKET}/{key}")

    for root in ("st/a", "st/b"):
        put(f"{root}/x.bin", b"one")
        put(f"{root}/sub/y.bin", b"two")
    put("st/c/x.bin", b"one")
    put("st/c/z.bin", b"one")
    put("st/f/ax.bin", b"one")
    put("st/g/bx.bin", b"one")

    def no_download(*a, **k):
        raise AssertionError("stamp downloaded an object")

    monkeypatch.setattr(st.client, "get_object", no_download)
    monkeypatch.setattr(st.client, "download_file", no_download)

    obj = stamp("st/a/x.bin")
    assert obj == stamp("st/c/x.bin")  # the same name and bytes elsewhere
    assert stamp("st/c/z.bin") != obj  # the name counts
    put("st/c/x.bin", b"uno")  # same size, other bytes: another ETag
    assert stamp("st/c/x.bin") != obj

    a = stamp("st/a")
    assert a == stamp("st/a/") == stamp("st/b")  # a prefix, with or without its slash; names relative to it
    assert a not in (obj, "missing")
    assert stamp("st/f") != stamp("st/g")  # relative names differ in their first character only
    put("st/b/sub/y.bin", b"TWO")
    assert stamp("st/b") != a
    put("st/b/sub/y.bin", b"two")
    assert stamp("st/b") == a  # content back: stamp back
    put("st/b/extra.bin", b"")
    assert stamp("st/b") != a
    st.delete(f"s3://{BUCKET}/st/b/extra.bin")
    assert stamp("st/b") == a
    assert stamp("st/none") == stamp("st/none/") == stamp("st/a/x.bin/") == "missing"
    assert st.stamp(f"s3://{BUCKET}") not in ("missing", a)  # the whole bucket is a prefix too


def test_local_storage_copies_atomically_and_refuses_what_is_not_there(tmp_path, monkeypatch):
    """The local backend behind every non-s3 path: a file appears whole or not at all, parents are
    made, a missing source is an error naming it, and a failed copy leaves no temp file."""
    st = LocalStorage()
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    dst = tmp_path / "deep" / "er" / "dst.bin"
    st.upload_file(src, dst)
    assert dst.read_bytes() == b"payload" and sorted(p.name for p in dst.parent.iterdir()) == ["dst.bin"]

    back = tmp_path / "back" / "b.bin"
    st.download_file(dst, back)
    assert back.read_bytes() == b"payload"
    with pytest.raises(StorageError, match=rf"^cannot download {tmp_path}/nope\.bin: not found$"):
        st.download_file(tmp_path / "nope.bin", tmp_path / "never.bin")
    assert not (tmp_path / "never.bin").exists()

    dst.write_bytes(b"old")
    import shutil

    def broken(a, b):
        Path(b).write_bytes(b"pay")  # half a file, then the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", broken)
    with pytest.raises(OSError, match="disk full"):
        st.upload_file(src, dst)
    monkeypatch.undo()
    assert dst.read_bytes() == b"old" and sorted(p.name for p in dst.parent.iterdir()) == ["dst.bin"]

    st.delete(dst)
    assert not dst.exists()
    st.delete(dst)  # deleting what is not there is not an error
    st.delete(tmp_path / "deep")  # nor is naming a directory: delete removes files only
    assert (tmp_path / "deep" / "er").is_dir()


def test_local_download_prefix_merges_a_tree_into_an_existing_directory(tmp_path):
    st = LocalStorage()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a")
    (tree / "sub" / "b.txt").write_text("b")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("k")
    st.download_prefix(tree, out)
    st.download_prefix(tree, out)  # again: no error, same tree
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "a.txt",
        "keep.txt",
        "sub/b.txt",
    ]
    assert (out / "sub" / "b.txt").read_text() == "b"


def test_is_locked_reports_another_holder_without_waiting(tmp_path):
    import threading

    from tlops.storage import file_lock, is_locked

    p = tmp_path / "locks" / "x.lock"
    assert is_locked(p) is False and not p.exists()  # a missing lock file: not locked, nothing created
    seen: dict[str, bool] = {}
    with file_lock(p, what="test"):
        other = threading.Thread(target=lambda: seen.setdefault("locked", is_locked(p)))
        other.start()
        other.join(5)
    assert seen == {"locked": True}  # another thread sees it held (and did not wait for it)
    assert is_locked(p) is False  # released


def test_local_upload_dir_publishes_a_finished_artifact_once_and_cleans_up_a_failure(tmp_path, monkeypatch):
    st = LocalStorage()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "a.bin").write_bytes(b"1")
    dst = tmp_path / "store" / "deep" / "one"
    with pytest.raises(StorageError) as e:
        st.upload_dir(unfinished, dst)
    assert str(e.value) == f"cannot upload {unfinished} to {dst}: it has no manifest.json (not a finished artifact)"
    assert not (tmp_path / "store").exists()

    src = make_artifact(tmp_path / "a", {"a.bin": b"1"})
    st.upload_dir(src, dst)  # parents made
    assert sorted(p.name for p in dst.iterdir()) == ["a.bin", "manifest.json"]
    other = make_artifact(tmp_path / "b", {"b.bin": b"2"})
    st.upload_dir(other, dst)  # a finished artifact is there: the first one stays
    assert sorted(p.name for p in dst.iterdir()) == ["a.bin", "manifest.json"]

    import tlops.artifacts

    def broken(staging, target):
        raise OSError("publish failed")

    monkeypatch.setattr(tlops.artifacts, "publish_dir", broken)
    with pytest.raises(OSError, match="publish failed"):
        st.upload_dir(src, tmp_path / "store" / "two")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["deep"]  # no staging dir left

    st.delete_prefix(tmp_path / "store" / "deep")
    assert not (tmp_path / "store" / "deep").exists()
    st.delete_prefix(tmp_path / "store" / "deep")  # already gone: not an error


def test_s3_delete_prefix_withdraws_the_manifest_first_in_one_batch_and_only_that_prefix(s3, tmp_path, monkeypatch):
    st = S3Storage()
    for key in ("p/a.bin", "p/manifest.json", "p/z.bin", "pq/keep.bin"):
        st.client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    calls: list[list[str]] = []
    real = st.client.delete_objects

    def spy(**kw):
        calls.append([o["Key"] for o in kw["Delete"]["Objects"]])
        return real(**kw)

    monkeypatch.setattr(st.client, "delete_objects", spy)
    st.delete_prefix(f"s3://{BUCKET}/p/")  # with or without the slash: the prefix p/, not pq/
    assert calls == [["p/manifest.json", "p/a.bin", "p/z.bin"]]
    assert objects() == ["pq/keep.bin"]
    st.delete(f"s3://{BUCKET}/pq/keep.bin")
    st.delete(f"s3://{BUCKET}/pq/keep.bin")  # deleting what is gone is not an error
    st.delete("s3://no-such-bucket/x.bin")  # nor in a bucket that is not there
    assert objects() == []


def test_s3_delete_errors_name_the_operation_and_the_uri(s3, monkeypatch):
    st = S3Storage()
    st.client.put_object(Bucket=BUCKET, Key="d/a.bin", Body=b"x")

    def denied(**kw):
        raise _client_error("AccessDenied", 403)

    monkeypatch.setattr(st.client, "delete_objects", denied)
    monkeypatch.setattr(st.client, "delete_object", denied)
    with pytest.raises(StorageError, match=rf"^cannot delete s3://{BUCKET}/d/: endpoint \S+ refused it \(ClientError"):
        st.delete_prefix(f"s3://{BUCKET}/d")
    with pytest.raises(StorageError, match=rf"^cannot delete s3://{BUCKET}/d/a\.bin: endpoint \S+ refused it"):
        st.delete(f"s3://{BUCKET}/d/a.bin")


def test_s3_upload_dir_replaces_an_artifact_without_leaving_its_old_files(s3, tmp_path):
    st = S3Storage()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(StorageError) as e:
        st.upload_dir(unfinished, f"s3://{BUCKET}/r/one")
    assert str(e.value) == (
        f"cannot upload {unfinished} to s3://{BUCKET}/r/one: it has no manifest.json (not a finished artifact)"
    )
    old = make_artifact(tmp_path / "old", {"stale.bin": b"old", "kept.bin": b"old"})
    new = make_artifact(tmp_path / "new", {"kept.bin": b"new"})
    for uri in (f"s3://{BUCKET}/r/one", f"s3://{BUCKET}/r/two/"):
        st.upload_dir(old, uri)
        st.upload_dir(new, uri)
        base = uri.rstrip("/").split(f"{BUCKET}/", 1)[1]
        assert objects(base + "/") == [f"{base}/kept.bin", f"{base}/manifest.json"]  # stale.bin withdrawn
        body = st.client.get_object(Bucket=BUCKET, Key=f"{base}/kept.bin")["Body"].read()
        assert body == b"new"


def test_s3_error_detail_is_one_line_of_at_most_300_characters():
    short = S3Storage._short
    assert short(None) == "unknown error"
    assert short(ValueError("a\n   b\tc")) == "ValueError: a b c"
    assert short(ValueError("x" * 300)) == "ValueError: " + "x" * 300
    assert short(ValueError("x" * 301)) == "ValueError: " + "x" * 300 + "..."


def test_s3_download_dir_stages_next_to_the_target_and_leaves_nothing_on_failure(s3, tmp_path, monkeypatch):
    st = S3Storage()
    src = make_artifact(tmp_path / "a", {"a.bin": b"1", "b.bin": b"2"})
    st.upload_dir(src, f"s3://{BUCKET}/dl/one")
    dst = tmp_path / "deep" / "er" / "one"
    staged: list[Path] = []
    real = S3Storage.download_prefix

    def spy(self, uri, local_dir):
        staged.append(Path(local_dir))
        return real(self, uri, local_dir)

    monkeypatch.setattr(S3Storage, "download_prefix", spy)
    st.download_dir(f"s3://{BUCKET}/dl/one", dst)  # parents made
    assert sorted(p.name for p in dst.iterdir()) == ["a.bin", "b.bin", "manifest.json"]
    ((stage,),) = [staged]
    assert stage.parent == dst.parent and stage.name.startswith(".one.tmp-")  # renamed into place, same filesystem

    calls = {"n": 0}
    real_file = S3Storage.download_file

    def fail_second(self, uri, local):
        calls["n"] += 1
        if calls["n"] == 2:
            raise StorageError("download failed")
        return real_file(self, uri, local)

    monkeypatch.setattr(S3Storage, "download_file", fail_second)
    with pytest.raises(StorageError, match="download failed"):
        st.download_dir(f"s3://{BUCKET}/dl/one", tmp_path / "deep" / "er" / "two")
    assert sorted(p.name for p in dst.parent.iterdir()) == ["one"]  # no staging dir, no half artifact


def test_s3_download_prefix_refuses_a_key_that_escapes_the_target(s3, tmp_path, monkeypatch):
    st = S3Storage()
    monkeypatch.setattr(st, "list", lambda uri: ["../escape.bin"])  # a key a hostile writer could create
    with pytest.raises(StorageError) as e:
        st.download_prefix(f"s3://{BUCKET}/p", tmp_path / "t")
    assert str(e.value) == f"refusing to download s3://{BUCKET}/p/../escape.bin: the key escapes the target directory"
    assert not (tmp_path / "escape.bin").exists()


def test_s3_errors_are_classified_by_code_then_status_then_message():
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    classify = S3Storage._classify
    cases = [
        (NoCredentialsError(), "credentials"),
        (EndpointConnectionError(endpoint_url="http://x"), "transient"),
        (TimeoutError(), "transient"),
        (_client_error("NoSuchKey", None), "missing"),  # by the code alone
        (_client_error(None, 404), "missing"),  # by the status alone (a HEAD has no body, so no code)
        (_client_error("SlowDown", None), "transient"),
        (_client_error(None, 500), "transient"),
        (_client_error(None, 503), "transient"),
        (_client_error(None, 429), "transient"),
        (_client_error("AccessDenied", 403), "fatal"),
        (_client_error(None, None), "fatal"),  # neither: not retried
        *(
            (S3UploadFailedError(f"Failed to upload x: {text}"), "transient")
            for text in (
                "Could not connect to the endpoint URL",
                "Connection was closed before we received a valid response",
                "Read timeout on endpoint URL",
                "Connect timeout on endpoint URL",
                "An error occurred (500) when calling PutObject",
                "An error occurred (502) when calling PutObject",
                "An error occurred (503) when calling PutObject",
                "An error occurred (504) when calling PutObject",
                "An error occurred (SlowDown) when calling PutObject",
                "An error occurred (Throttling) when calling PutObject",
                "An error occurred (InternalError) when calling PutObject",
            )
        ),
        (S3UploadFailedError("An error occurred (NoSuchBucket) when calling PutObject"), "missing"),
        (S3UploadFailedError("An error occurred (404) when calling HeadObject"), "missing"),
        (S3UploadFailedError("An error occurred (AccessDenied) when calling PutObject"), "fatal"),
        (ValueError("anything else"), "fatal"),
    ]
    assert [(str(e), classify(e)) for e, _ in cases] == [(str(e), want) for e, want in cases]


def test_s3_exists_and_list_of_objects_prefixes_and_missing_buckets(s3):
    st = S3Storage()
    for key in ("e/a.bin", "e/sub/b.bin", "e/dir/", "ef/c.bin"):  # e/dir/: a console's "folder" marker
        st.client.put_object(Bucket=BUCKET, Key=key, Body=b"" if key.endswith("/") else b"x")
    assert st.exists(f"s3://{BUCKET}/e/a.bin") and not st.exists(f"s3://{BUCKET}/e/none.bin")
    assert st.exists(f"s3://{BUCKET}/e/sub/")  # a prefix with objects under it
    assert not st.exists(f"s3://{BUCKET}/e/none/") and st.exists(f"s3://{BUCKET}")
    assert st.list(f"s3://{BUCKET}/e") == st.list(f"s3://{BUCKET}/e/") == ["a.bin", "sub/b.bin"]  # not ef/, no marker
    assert st.list("s3://no-such-bucket/e") == [] and not st.exists("s3://no-such-bucket/e/")


def test_s3_checks_listings_and_stamps_on_a_dead_endpoint_name_what_failed(s3, monkeypatch):
    monkeypatch.setenv("TLOPS_S3_ATTEMPTS", "1")
    monkeypatch.setenv("TLOPS_S3_CLIENT_RETRIES", "0")
    st = S3Storage()
    s3.stop()
    with pytest.raises(StorageError, match=rf"^cannot check s3://{BUCKET}/x\.bin: endpoint \S+ unreachable after 1 "):
        st.exists(f"s3://{BUCKET}/x.bin")
    with pytest.raises(StorageError, match=rf"^cannot list s3://{BUCKET}/p/: endpoint \S+ unreachable after 1 "):
        st.list(f"s3://{BUCKET}/p")
    with pytest.raises(StorageError, match=rf"^cannot check s3://{BUCKET}/st/x\.bin: endpoint .* unreachable after 1 "):
        st.stamp(f"s3://{BUCKET}/st/x.bin")
    with pytest.raises(StorageError, match=rf"^cannot list s3://{BUCKET}/st/: endpoint .* unreachable after 1 "):
        st.stamp(f"s3://{BUCKET}/st/")  # a prefix: listed, not checked as an object first


def test_s3_download_dir_replaces_an_older_copy(s3, tmp_path):
    st = S3Storage()
    st.upload_dir(make_artifact(tmp_path / "a", {"new.bin": b"1"}), f"s3://{BUCKET}/rep/one")
    dst = make_artifact(tmp_path / "local" / "one", {"old.bin": b"0"})
    st.download_dir(f"s3://{BUCKET}/rep/one", dst)
    assert sorted(p.name for p in dst.iterdir()) == ["manifest.json", "new.bin"]


def test_s3_call_retries_with_capped_backoff_then_names_the_failure(s3, monkeypatch):
    """``_call``'s policy without a network in the way: transient errors are retried with doubling
    delays capped at 8 s, never after the last attempt; the errors that retrying cannot fix are one
    line at once."""
    from botocore.exceptions import NoCredentialsError

    import tlops.storage as storage

    slept: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    st = S3Storage(attempts=5, backoff=3.0)
    failures = iter([_client_error("SlowDown", 503)] * 2)

    def flaky():
        err = next(failures, None)
        if err is not None:
            raise err
        return "ok"

    assert st._call("list", "s3://b/p/", flaky) == "ok" and slept == [3.0, 6.0]
    slept.clear()
    with pytest.raises(StorageError) as e:
        st._call("list", "s3://b/p/", lambda: (_ for _ in ()).throw(_client_error("SlowDown", 503)))
    assert slept == [3.0, 6.0, 8.0, 8.0]  # capped; no sleep after the fifth, last attempt
    assert str(e.value) == (
        f"cannot list s3://b/p/: endpoint {st.endpoint} still failing after 5 attempts "
        "(ClientError: An error occurred (SlowDown) when calling the Op operation: m)"
    )

    slept.clear()
    with pytest.raises(StorageError) as e:
        st._call("check", "s3://b/k", lambda: (_ for _ in ()).throw(_client_error("NoSuchKey", 404)))
    assert str(e.value) == (
        "cannot check s3://b/k: not found (ClientError: An error occurred (NoSuchKey) when calling the Op operation: m)"
    )
    with pytest.raises(StorageError) as e:
        st._call("check", "s3://b/k", lambda: (_ for _ in ()).throw(NoCredentialsError()))
    assert str(e.value) == (
        f"cannot check s3://b/k: no S3 credentials found for endpoint {st.endpoint}; set "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
    )
    assert slept == []  # not found and no credentials: not retried


@pytest.mark.parametrize(
    "failure",
    [
        "Could not connect to the endpoint URL",
        "Connect timeout on endpoint URL",
        "Read timeout on endpoint URL",
        ConnectionError("reset by peer"),
    ],
)
def test_s3_call_says_unreachable_when_the_endpoint_did_not_answer(s3, monkeypatch, failure):
    from boto3.exceptions import S3UploadFailedError

    import tlops.storage as storage

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    st = S3Storage(attempts=2, backoff=0.0)
    err = S3UploadFailedError(f"Failed to upload x: {failure}") if isinstance(failure, str) else failure
    with pytest.raises(StorageError) as e:
        st._call("upload x to", "s3://b/x", lambda: (_ for _ in ()).throw(err))
    assert str(e.value).startswith(
        f"cannot upload x to s3://b/x: endpoint {st.endpoint} unreachable after 2 attempts ("
    )


def test_s3_uris_and_client_settings(s3, monkeypatch, tmp_path):
    from tlops.storage import join, split_s3

    assert split_s3("s3://b/p/q") == ("b", "p/q")
    # one slash between parts, whatever slashes they bring; nothing else is trimmed
    assert join("s3://b/", "/p/", "q/") == "s3://b/p/q"
    assert join("s3://b", " Xp ", "qX") == "s3://b/ Xp /qX"
    assert join(tmp_path, "a", "b") == tmp_path / "a" / "b"
    with pytest.raises(StorageError) as e:
        split_s3("/local/path")
    assert str(e.value) == "not an s3:// URI: /local/path"
    with pytest.raises(StorageError) as e:
        split_s3("s3:///p")
    assert str(e.value) == "s3:///p: no bucket name; expected s3://<bucket>/<prefix>"

    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    for uri in (f"s3://{BUCKET}/p/", f"s3://{BUCKET}"):
        with pytest.raises(StorageError) as e:
            S3Storage().upload_file(f, uri)
        assert str(e.value) == f"cannot upload {f} to {uri}: the URI names a prefix, not an object"

    endpoint = S3Storage().endpoint_url
    monkeypatch.delenv("S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the AWS SDKs' own variable is honoured too
    assert S3Storage().endpoint_url == endpoint and S3Storage(endpoint_url="http://other:9000").endpoint_url == (
        "http://other:9000"
    )
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert S3Storage().region == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert S3Storage().region == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    assert S3Storage().region == "eu-north-1" and S3Storage(region="ap-south-1").region == "ap-south-1"


def test_s3_client_settings_are_the_documented_defaults_or_the_environments(s3, monkeypatch):
    """The tuning knobs of the module docstring: defaults, then each TLOPS_S3_* override."""
    MiB = 1024 * 1024
    for var in ("ATTEMPTS", "BACKOFF", "CLIENT_RETRIES", "CONNECT_TIMEOUT", "READ_TIMEOUT"):
        monkeypatch.delenv(f"TLOPS_S3_{var}", raising=False)
    for var in ("MULTIPART_THRESHOLD", "MULTIPART_CHUNKSIZE"):
        monkeypatch.delenv(f"TLOPS_S3_{var}", raising=False)

    def settings(st: S3Storage) -> dict:
        c, t = st.client.meta.config, st.transfer_config
        return {
            "attempts": st.attempts,
            "backoff": st.backoff,
            "retries": c.retries,
            "timeouts": (c.connect_timeout, c.read_timeout),
            "path_style": (c.s3 or {}).get("addressing_style"),
            "multipart": (t.multipart_threshold, t.multipart_chunksize, t.max_request_concurrency),
        }

    assert settings(S3Storage()) == {
        "attempts": 4,
        "backoff": 0.5,
        "retries": {"mode": "standard", "total_max_attempts": 3},  # botocore counts the first try too
        "timeouts": (10.0, 60.0),
        "path_style": "path",  # an explicit endpoint (MinIO, moto): path-style addressing
        "multipart": (64 * MiB, 16 * MiB, 4),
    }
    for var, value in {
        "ATTEMPTS": "7",
        "BACKOFF": "0.25",
        "CLIENT_RETRIES": "0",
        "CONNECT_TIMEOUT": "3",
        "READ_TIMEOUT": "9",
        "MULTIPART_THRESHOLD": str(6 * MiB),
    }.items():
        monkeypatch.setenv(f"TLOPS_S3_{var}", value)
    assert settings(S3Storage()) == {
        "attempts": 7,
        "backoff": 0.25,
        "retries": {"mode": "standard", "total_max_attempts": 1},
        "timeouts": (3.0, 9.0),
        "path_style": "path",
        "multipart": (6 * MiB, 6 * MiB, 4),  # parts follow a small threshold, never under S3's 5 MiB
    }
    monkeypatch.setenv("TLOPS_S3_MULTIPART_THRESHOLD", str(1 * MiB))
    monkeypatch.setenv("TLOPS_S3_ATTEMPTS", "0")
    st = S3Storage()
    assert st.transfer_config.multipart_chunksize == 5 * MiB and st.attempts == 1  # at least one attempt
    monkeypatch.setenv("TLOPS_S3_MULTIPART_CHUNKSIZE", str(8 * MiB))
    assert S3Storage().transfer_config.multipart_chunksize == 8 * MiB
    monkeypatch.setenv("TLOPS_S3_CLIENT_RETRIES", "-3")
    assert S3Storage().client.meta.config.retries["total_max_attempts"] == 1  # clamped at no retries
    monkeypatch.delenv("S3_ENDPOINT_URL")
    assert S3Storage().client.meta.config.s3 in (None, {})  # AWS itself: virtual-hosted style
    monkeypatch.setenv("TLOPS_S3_READ_TIMEOUT", "soon")
    with pytest.raises(StorageError) as e:
        S3Storage()
    assert str(e.value) == "TLOPS_S3_READ_TIMEOUT='soon' is not a number"


def test_s3_prefixes_ending_in_x_and_missing_buckets_in_stamps(s3, tmp_path):
    """Prefix handling strips slashes only (a name ending in 'X' keeps it); a missing bucket is
    'missing' to ``stamp``, as an empty prefix is."""
    st = S3Storage()
    st.client.put_object(Bucket=BUCKET, Key="boX/a.bin", Body=b"x")
    assert st.list(f"s3://{BUCKET}/boX") == ["a.bin"] and st.stamp(f"s3://{BUCKET}/boX/") != "missing"
    st.upload_dir(make_artifact(tmp_path / "n", {"b.bin": b"y"}), f"s3://{BUCKET}/boX")  # replaces a.bin
    assert objects("boX/") == ["boX/b.bin", "boX/manifest.json"]
    st.delete_prefix(f"s3://{BUCKET}/boX")
    assert objects("boX/") == []
    assert st.stamp("s3://no-such-bucket/p/") == "missing"


def test_s3_settings_are_whole_numbers_and_an_empty_variable_means_the_default(s3, monkeypatch):
    monkeypatch.setenv("TLOPS_S3_ATTEMPTS", "")
    monkeypatch.setenv("TLOPS_S3_CLIENT_RETRIES", "1")
    st = S3Storage()
    assert st.attempts == 4 and type(st.attempts) is int
    assert type(st.client.meta.config.retries["total_max_attempts"]) is int
    monkeypatch.setenv("TLOPS_S3_ATTEMPTS", "2")
    st = S3Storage()
    assert st.attempts == 2 and type(st.attempts) is int  # a count: range(attempts) needs an int
    monkeypatch.setenv("TLOPS_S3_MULTIPART_THRESHOLD", str(8 * 2**20))
    monkeypatch.setenv("TLOPS_S3_MULTIPART_CHUNKSIZE", str(6 * 2**20))
    tc = S3Storage().transfer_config  # byte sizes, as boto3's TransferConfig documents them
    assert (tc.multipart_threshold, tc.multipart_chunksize) == (8 * 2**20, 6 * 2**20)
    assert type(tc.multipart_threshold) is int and type(tc.multipart_chunksize) is int


def test_s3_client_region_is_tlops_choice_not_boto_lookup(s3, monkeypatch):
    """AWS_REGION wins over AWS_DEFAULT_REGION (boto's own lookup reads only the latter), an explicit
    region over both, and us-east-1 is the default when neither is set."""
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert S3Storage().client.meta.region_name == "eu-central-1"
    assert S3Storage(region="ap-south-1").client.meta.region_name == "ap-south-1"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # no region from a profile either
    assert S3Storage().client.meta.region_name == "us-east-1"


def _plant(cache, key: str, kind: str, tmp: Path) -> None:
    """An entry under ``key`` written as an artifact of ``kind`` (uploaded for an S3 cache)."""
    from tlops.artifacts import write_artifact

    with write_artifact(tmp / kind, kind) as w:
        np.savez(w.path / "features.npz", x=np.arange(3))
    if cache.remote:
        cache.storage.upload_dir(tmp / kind, str(cache.entry(key)))
    else:
        cache.entry(key).parent.mkdir(parents=True, exist_ok=True)
        (tmp / kind).rename(cache.entry(key))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cache_fetch_refuses_an_entry_of_another_kind_and_leaves_only_the_file(s3, tmp_path, monkeypatch, where):
    """A cache hit places exactly ``features.npz`` at the destination: an entry that is not a
    features artifact is refused (nothing placed), and an S3 download is staged next to the
    destination (so the final rename stays on one filesystem) and removed afterwards."""
    import os

    from tlops.artifacts import ArtifactError
    from tlops.features.cache import FeatureCache, cache_key

    cache = FeatureCache(f"s3://{BUCKET}/features/" if where == "s3" else tmp_path / "cache")
    good, bad = cache_key("m", {}, "good"), cache_key("m", {}, "bad")
    if where == "s3":  # a trailing slash on the root does not double in keys; S3 entries take no file lock
        assert cache.entry(good) == f"s3://{BUCKET}/features/{good[:2]}/{good}" and cache.lock_path(good) is None
        assert FeatureCache(f"s3://{BUCKET}/cacheX/").entry(good).startswith(f"s3://{BUCKET}/cacheX/")
    else:
        assert (
            cache.root == tmp_path / "cache" and cache.lock_path(good) == tmp_path / "cache" / ".locks" / f"{good}.lock"
        )
    cache.put(good, {"x": np.arange(4)}, {"n": 4})
    if where == "s3":
        body = cache.storage.client.get_object(Bucket=BUCKET, Key=f"features/{good[:2]}/{good}/manifest.json")["Body"]
        manifest = json.loads(body.read())
    else:
        manifest = json.loads((cache.entry(good) / "manifest.json").read_text())
    # every writer of a key writes the same manifest: the key is its config, content hash and metadata
    assert manifest["config"] == {"key": good} and manifest["content_hash"] == good
    assert manifest["metadata"] == {"n": 4, "cache_key": good} and manifest["kind"] == "feature-cache-entry"
    _plant(cache, bad, "model", tmp_path / "planted")
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        monkeypatch.setattr("tempfile.tempdir", str(shm))  # the system temp dir on another filesystem
    out = tmp_path / "out"
    out.mkdir()
    cache.fetch(good, out / "f.npz")
    with np.load(out / "f.npz") as z:
        assert z["x"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ArtifactError, match="is a 'model' artifact, expected 'feature-cache-entry'"):
        cache.fetch(bad, out / "g.npz")
    assert sorted(p.name for p in out.iterdir()) == ["f.npz"]  # no staging dir, no half-placed file


def test_local_upload_of_a_missing_file_names_that_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        LocalStorage().upload_file(tmp_path / "nope.bin", tmp_path / "out" / "x.bin")
    assert e.value.filename == str(tmp_path / "nope.bin")
    assert list((tmp_path / "out").iterdir()) == []  # no temp file left
