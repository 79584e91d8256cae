"""tracking.registry on a real (sqlite) MLflow registry, one store for the module, one model per test.

What promote / rollback / settle_duplicate leave in the registry is read back from it: aliases,
the who/when/why tags, the history tag and its cap, the exact refusals. The pipeline tests
(test_promotion.py, test_gates.py) cover the same calls end to end but take minutes; these take
seconds, so `make mutation` can run them for every mutant of the module.
"""

from __future__ import annotations

import re

import pytest

from tlops.errors import TlopsError
from tlops.tracking import registry

STAMP = re.compile(r"^(?P<who>\S+) (?P<when>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) (?P<why>.*)$")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture
def model(store, request, monkeypatch):
    """A fresh registered model with three versions (v1, v2 passed; v3 failed) in the module's store."""
    import mlflow
    from mlflow import MlflowClient

    from tlops.tracking.setup import use_store

    use_store(store)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    name = re.sub(r"[^A-Za-z0-9-]", "-", request.node.name)[:60]
    c = MlflowClient()
    c.create_registered_model(name)
    exp = mlflow.set_experiment("registry-ops").experiment_id
    for status in ("passed", "passed", "failed"):
        run = c.create_run(exp)
        mv = c.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        c.set_model_version_tag(name, mv.version, registry.VALIDATION_TAG, status)
    return name


def _aliases(name: str) -> dict[str, str]:
    return {a: str(v) for a, v in registry.client().get_registered_model(name).aliases.items()}


def _tag(name: str, version: str, key: str) -> str | None:
    return registry.client().get_model_version(name, version).tags.get(key)


def _history(name: str) -> list[str]:
    return (registry.client().get_registered_model(name).tags.get(registry.HISTORY_TAG) or "").splitlines()


def test_promote_moves_champion_keeps_the_previous_and_records_who_when_why(model):
    assert registry.promote(model, "1") == {
        "model": model,
        "champion": "1",
        "previous": None,
        "changed": True,
        "forced": False,
    }
    assert _aliases(model) == {"champion": "1"}
    m = STAMP.match(_tag(model, "1", "tlops.promoted"))
    assert m and m["who"] == "alice" and m["why"] == "(no reason given)", _tag(model, "1", "tlops.promoted")

    res = registry.promote(model, "2", reason="better on val")
    assert res == {"model": model, "champion": "2", "previous": "1", "changed": True, "forced": False}
    assert _aliases(model) == {"champion": "2", "previous-champion": "1"}
    assert STAMP.match(_tag(model, "2", "tlops.promoted"))["why"] == "better on val"
    h = _history(model)
    assert len(h) == 2
    assert h[0].startswith("promote v1 (previous champion: none) by alice ")
    assert h[1].startswith("promote v2 (previous champion: v1) by alice ") and h[1].endswith(" better on val")

    # the current champion again: nothing changes, nothing is written
    assert registry.promote(model, "2", reason="again") == {
        "model": model,
        "champion": "2",
        "previous": None,
        "changed": False,
        "forced": False,
    }
    assert _aliases(model) == {"champion": "2", "previous-champion": "1"} and len(_history(model)) == 2


def test_promote_refuses_a_failed_or_unknown_version_unless_forced(model):
    with pytest.raises(TlopsError) as err:
        registry.promote(model, "3")
    assert str(err.value) == (
        f"refusing to promote {model} v3: validation_status is 'failed', not 'passed'; "
        "fix the model or promote anyway with --force"
    )
    registry.client().delete_model_version_tag(model, "3", registry.VALIDATION_TAG)
    with pytest.raises(TlopsError, match=r"validation_status is missing, not 'passed'"):
        registry.promote(model, "3")
    with pytest.raises(TlopsError, match=rf"^cannot promote {model} version 9: "):
        registry.promote(model, "9")
    assert _aliases(model) == {} and _history(model) == []

    res = registry.promote(model, "3", reason="hotfix", force=True)
    assert res["forced"] is True and res["changed"] is True and _aliases(model) == {"champion": "3"}
    assert _tag(model, "3", "tlops.promoted").endswith(" hotfix [forced: validation_status missing]")


def test_rollback_swaps_champion_and_previous_and_refuses_without_one(model):
    with pytest.raises(TlopsError) as err:
        registry.rollback(model)
    assert str(err.value) == (
        f"cannot roll back {model}: it has no 'previous-champion' alias (nothing was promoted over another champion)"
    )
    registry.promote(model, "1")
    registry.promote(model, "2")
    assert registry.rollback(model, reason="regression") == {"model": model, "champion": "1", "previous": "2"}
    assert _aliases(model) == {"champion": "1", "previous-champion": "2"}
    stamp = _tag(model, "1", "tlops.rolled_back")
    assert STAMP.match(stamp)["who"] == "alice" and stamp.endswith(" regression (from v2)")
    assert _history(model)[-1].startswith("rollback to v1 (from v2) by alice ")

    # champion removed by hand: rollback restores the previous one and drops the alias it came from
    registry.client().delete_registered_model_alias(model, "champion")
    assert registry.rollback(model) == {"model": model, "champion": "2", "previous": None}
    assert _aliases(model) == {"champion": "2"}
    assert _tag(model, "2", "tlops.rolled_back").endswith(" (no reason given)")
    assert _history(model)[-1].startswith("rollback to v2 (from no champion) by alice ")


def test_history_keeps_the_newest_lines_under_the_cap(model, monkeypatch):
    monkeypatch.setattr(registry, "HISTORY_MAX_CHARS", 200)
    for i in range(6):
        registry._append_history(model, f"line {i} " + "x" * 40)
    h = _history(model)
    assert h[-1].startswith("line 5 ") and len("\n".join(h)) <= 200
    assert [ln.split()[1] for ln in h] == ["2", "3", "4", "5"]  # oldest dropped first, whole lines
    registry._append_history(model, "y" * 500)  # one line longer than the cap: its tail is kept
    assert _history(model) == ["y" * 200]


def test_settle_duplicate_keeps_the_lowest_version_of_a_digest(model):
    c = registry.client()
    for v, digest in (("1", "aaa"), ("2", "bbb"), ("3", "aaa")):
        c.set_model_version_tag(model, v, registry.DIGEST_TAG, digest)
    assert registry.settle_duplicate(model, "3", "aaa") == ("1", True)
    assert [str(mv.version) for mv in registry.versions(model)] == ["1", "2"]  # v3 deleted
    assert registry.settle_duplicate(model, "2", "bbb") == ("2", False)
    assert registry.settle_duplicate(model, "2", "new") == ("2", False)
    assert str(registry.find_version_by_tag(model, registry.DIGEST_TAG, "bbb").version) == "2"
    assert registry.find_version_by_tag(model, registry.DIGEST_TAG, "zzz") is None


def test_lookups_of_what_is_not_there(model):
    assert registry.versions("no-such-model") == []
    assert [str(mv.version) for mv in registry.versions(model)] == ["1", "2", "3"]
    assert registry.get_alias(model, "champion") is None
    registry.promote(model, "2")
    assert str(registry.get_alias(model, "champion").version) == "2"


def test_who_prefers_the_authenticated_user(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("TLOPS_USER", "ci")
    assert registry.who() == "bob"
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    assert registry.who() == "ci"
    monkeypatch.delenv("TLOPS_USER")
    monkeypatch.setattr("getpass.getuser", lambda: "login")
    assert registry.who() == "login"

    def no_passwd():
        raise KeyError("uid")

    monkeypatch.setattr("getpass.getuser", no_passwd)
    assert registry.who() == f"uid-{__import__('os').getuid()}"


@pytest.mark.parametrize(
    ("code", "status", "want"),
    [
        (
            "PERMISSION_DENIED",
            403,
            "permission denied: user 'carol' may not move 'champion' of registered model 'm': needs MANAGE on it",
        ),
        (
            "UNAUTHENTICATED",
            401,
            "not authenticated to the tracking server (cannot move 'champion' of 'm'): "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
        ),
        ("INTERNAL_ERROR", 500, None),
    ],
)
def test_server_refusals_become_one_line(monkeypatch, code, status, want):
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    err = MlflowException("no", error_code=getattr(databricks_pb2, code))
    assert err.get_http_status_code() == status
    with pytest.raises(TlopsError if want else MlflowException) as got:
        with registry._permission("move 'champion'", "m", "MANAGE on it"):
            raise err
    if want:
        assert str(got.value) == want


@pytest.mark.parametrize(
    ("call", "want"),
    [
        (
            "set_registered_model_alias",
            "may not move 'champion' of registered model '{m}': needs MANAGE on the registered model (the reviewer "
            "role)",
        ),
        (
            "set_model_version_tag",
            "may not tag a version of registered model '{m}': needs EDIT on the registered model",
        ),
    ],
    ids=["alias", "tag"],
)
@pytest.mark.parametrize("action", ["promote", "rollback"])
def test_promote_and_rollback_403(model, monkeypatch, call, want, action):
    """A reviewer moves ``champion`` (MANAGE) and tags the version (EDIT): a 403 on either call is one
    line naming the user, the model and the permission, not MLflow's traceback."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    registry.promote(model, "1")
    registry.promote(model, "2")
    real = getattr(MlflowClient, call)
    tag = {"promote": "tlops.promoted", "rollback": "tlops.rolled_back"}[action]

    def refused(self, *a, **k):
        if call == "set_registered_model_alias" or a[2] == tag:
            raise MlflowException("denied", error_code=databricks_pb2.PERMISSION_DENIED)
        return real(self, *a, **k)

    monkeypatch.setattr(MlflowClient, call, refused)
    with pytest.raises(TlopsError) as e:
        registry.promote(model, "1") if action == "promote" else registry.rollback(model)
    assert str(e.value) == "permission denied: user 'alice' " + want.format(m=model)
    if call == "set_registered_model_alias":
        assert _aliases(model) == {"champion": "2", "previous-champion": "1"}  # nothing moved


def test_who_without_a_login_or_uid_is_unknown(monkeypatch):
    for var in ("MLFLOW_TRACKING_USERNAME", "TLOPS_USER"):
        monkeypatch.delenv(var, raising=False)

    def no_passwd():
        raise KeyError("uid")

    monkeypatch.setattr("getpass.getuser", no_passwd)
    monkeypatch.delattr("os.getuid")  # a platform without uids
    assert registry.who() == "unknown"


def test_stamps_are_utc_whatever_the_local_time_zone(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        before = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        now = registry._now()
        after = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        assert before <= now <= after
    finally:
        monkeypatch.undo()
        time.tzset()


def test_history_keeps_a_line_at_the_cap_and_at_least_the_newest_line(model, monkeypatch):
    monkeypatch.setattr(registry, "HISTORY_MAX_CHARS", 9)
    registry._append_history(model, "aaaa")
    registry._append_history(model, "bbbb")  # "aaaa\\nbbbb" is exactly 9 characters: both kept
    assert _history(model) == ["aaaa", "bbbb"]
    registry._append_history(model, "c" * 7)  # "bbbb\nccccccc" is over the cap: whole old lines go, not half
    assert _history(model) == ["c" * 7]
    registry._append_history(model, "d" * 20)  # longer than the cap on its own: only its last 9 characters
    assert _history(model) == ["d" * 9]
