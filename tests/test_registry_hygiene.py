"""Registry hygiene through ``tlops run`` (the CLI a scheduler runs): a version that fails its gates
is registered for the record with ``validation_status: failed``, ``challenger`` stays on the last
version that passed, and the output says so in one line. Read from the registry itself (aliases,
version tags), not from the step's ``registration.json``. The in-process gate checks are in
``test_gates.py``."""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.conftest import digits_config
from tlops import cli

NAME = "t-digits"


def _tlops(monkeypatch, capsys, *argv) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tlops", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    return exc.value.code or 0, out.out + out.err


@pytest.mark.slow
def test_a_failing_version_is_on_record_but_never_challenger(tmp_path, monkeypatch, capsys):
    import mlflow

    from tlops.tracking.setup import use_store

    def config(name: str, **sections) -> str:
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump(digits_config(tmp_path / "work", **sections)))
        return str(f)

    good = config("good")
    # another model (other weight decay) under unreachable gates
    bad = config("bad", train={"weight_decay": 1.0}, evaluate={"gates": {"min_accuracy": 0.9999}})
    code, _ = _tlops(monkeypatch, capsys, "run", "--config", good, "--offline")
    assert code == 0
    code, out = _tlops(monkeypatch, capsys, "run", "--config", bad, "--offline")
    assert code == 3, out
    line = (
        f"register: {NAME} v2 registered for the record with validation_status: failed; "
        "challenger not moved (stays at v1)"
    )
    assert sum(line in ln for ln in out.splitlines()) == 1, out

    use_store(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    c = mlflow.MlflowClient()
    status = {str(v.version): v.tags["validation_status"] for v in c.search_model_versions(f"name = '{NAME}'")}
    assert status["1"] == "passed" and status["2"].startswith("failed: accuracy ")
    assert {a: str(v) for a, v in c.get_registered_model(NAME).aliases.items()} == {"challenger": "1"}

    # a first version that fails: registered, and no challenger at all
    code, out = _tlops(monkeypatch, capsys, "run", "--config", bad, "--offline", "--set", "register.model_name=other")
    assert code == 3 and "challenger not moved (no version has passed yet)" in out
    assert dict(c.get_registered_model("other").aliases) == {}
    (mv,) = c.search_model_versions("name = 'other'")
    assert mv.tags["validation_status"].startswith("failed: ")
