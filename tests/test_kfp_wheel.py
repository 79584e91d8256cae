"""``tlops compile`` from an installed wheel, outside the checkout, writes the checkout's pipeline.

The KFP components are generated from the DAG inside the package, so nothing under the checkout's
``components/`` or ``pipelines/`` may be needed to compile. The wheel is installed into a fresh
venv without its dependencies; they come from the project venv's site-packages, added as a plain
path (its ``.pth`` files, among them the editable install of this checkout, are not run).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO
from tlops.config import load_config
from tlops.kfp.pipeline import compile_pipeline


def _run(cmd: list, cwd: Path, env: dict) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_compile_from_an_installed_wheel_matches_the_checkout(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TLOPS_REPO", "TLOPS_IMAGE", "VIRTUAL_ENV")}
    # build the wheel from a copy of the sources: an in-tree build would write build/ into the checkout
    src = tmp_path / "src-copy"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "src", src / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src], tmp_path, env)
    (wheel,) = dist.glob("tlops-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "--no-deps", "-q", wheel], tmp_path, env)
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env))
    deps = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if Path(p).is_dir()]
    (Path(purelib.as_posix().strip()) / "project-deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([python, "-c", "import tlops, tlops.kfp.pipeline; print(tlops.__file__)"], work, env).strip()
    assert Path(where).is_relative_to(venv), f"imported {where}, not the wheel's tlops"
    assert REPO not in Path(where).parents

    out = work / "digits-target.yaml"
    _run(
        [venv / "bin" / "tlops", "compile", "--config", REPO / "configs" / "digits_target.yaml", "--out", out],
        work,
        env,
    )
    monkeypatch.delenv("TLOPS_IMAGE", raising=False)
    checkout = compile_pipeline(load_config(REPO / "configs" / "digits_target.yaml"), tmp_path / "checkout.yaml")
    assert out.read_text() == checkout.read_text()
