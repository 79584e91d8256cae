"""The reproducibility record and ``tlops run --reproduce``: every manifest and the MLflow run say
what the model was computed with (CPU, ISA, threads, determinism flags, seed, GPU), and a past run
can be rerun from its record to check that its weights come out bit-identical."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tlops import cli
from tlops.reproduce import EXIT_MISMATCH


def _main(monkeypatch, capsys, *argv) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tlops", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    return exc.value.code or 0, out.out + out.err


@pytest.mark.slow
def test_record_and_reproduce(digits_cfg, monkeypatch, capsys):
    import mlflow
    import torch

    from tlops.runners.local import run_pipeline

    cfg = digits_cfg(train={"strategies": ["linear-probe", "fine-tune"], "epochs": 1, "batch_size": 16, "threads": 1})
    res = run_pipeline(cfg)
    ft = res.artifact("fine-tune")
    env = ft.manifest["environment"]
    assert env["seed"] == 0 and env["cpu"]
    assert env["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch"]["intra_op_threads"] == 1  # train.threads, set by the runner at the step's entry
    assert env["torch"]["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    assert set(env["torch"]["cudnn"]) == {"enabled", "deterministic", "benchmark"}
    assert "OMP_NUM_THREADS" in env["env"]
    assert all("environment" in res.artifact(s).manifest for s in res.steps)
    run = mlflow.MlflowClient().get_run(res.mlflow_run_id)
    assert run.data.tags["tlops.env.isa"] == env["torch"]["cpu_capability"]
    assert run.data.tags["tlops.env.torch_threads"] == "1" and run.data.tags["tlops.seed"] == "0"
    assert run.data.tags["tlops.env.gpu"] == "none"

    wd = str(cfg.workdir_path)
    code, out = _main(monkeypatch, capsys, "run", "--reproduce", res.run_id, "--workdir", wd)
    assert code == 0, out
    assert "model digest matches: bit-identical weights" in out
    assert f"fine-tune: recorded {ft.meta['models']['fine-tune']['digest'][:12]}" in out

    # a run recorded on another ISA: a different digest is explained, not a failure
    mf = ft.path / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["environment"]["torch"]["cpu_capability"] = "AVX2"
    manifest["metadata"]["models"]["fine-tune"]["digest"] = "0" * 64
    mf.write_text(json.dumps(manifest))
    code, out = _main(monkeypatch, capsys, "run", "--reproduce", res.run_id, "--workdir", wd)
    assert code == 0, out
    assert "model digest differs, as expected: the run was recorded on AVX2" in out

    # the recorded config edited after the fact: a mismatch, exit 4
    cfg_file = res.run_dir / "config.yaml"
    raw = yaml.safe_load(cfg_file.read_text())
    raw["train"]["lr"] = raw["train"]["lr"] * 3
    cfg_file.write_text(yaml.safe_dump(raw))
    code, out = _main(monkeypatch, capsys, "run", "--reproduce", res.run_id, "--workdir", wd)
    assert code == EXIT_MISMATCH == 4, out
    assert "model digest MISMATCH: the config or inputs differ from the recorded run" in out


def test_reproduce_unknown_run_is_a_usage_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "config.yaml").write_text("name: x\n")
    code, out = _main(monkeypatch, capsys, "run", "--reproduce", "nope", "--workdir", str(tmp_path))
    assert code == 2 and "no run 'nope'" in out and "newest runs there: r1" in out
    code, out = _main(monkeypatch, capsys, "run", "--reproduce", "r1", "--config", "x.yaml")
    assert code == 2 and "Usage: tlops run" in out
    code, out = _main(monkeypatch, capsys, "run")
    assert code == 2 and "--config" in out
