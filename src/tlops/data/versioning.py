"""Version a dataset with DVC + git in one call (``tlops data version PATH``).

It runs the documented DVC workflow, ``dvc add PATH`` -> ``git add PATH.dvc .gitignore`` ->
``git commit`` -> ``dvc push``, and returns the exact reference (repo, commit, path, md5) to
put under ``data.dvc`` in a pipeline config. Unchanged data makes no new commit.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from tlops.config import DvcRef
from tlops.data.dvc_source import DvcVersion, resolve
from tlops.errors import DataError
from tlops.redact import redact

log = logging.getLogger(__name__)


def _run(args: list[str], cwd: Path, what: str) -> str:
    try:
        p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=3600)
    except FileNotFoundError:
        raise DataError(f"{what}: {args[0]} is not installed") from None
    if p.returncode != 0:
        detail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-6:])
        raise DataError(f"{what} failed (exit {p.returncode}):\n{redact(detail)}")
    return p.stdout


def _dvc(args: list[str], cwd: Path, what: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, what)


def repo_root(path: Path) -> Path:
    """The git work tree holding ``path``; it must also be a DVC repo."""
    start = path if path.is_dir() else path.parent
    top = Path(_run(["git", "rev-parse", "--show-toplevel"], start, f"finding the git repo of {path}").strip())
    if not (top / ".dvc").is_dir():
        raise DataError(f"{top} is a git repo but not a DVC repo: run `dvc init` there first")
    return top


def version_data(path: Path, message: str | None = None, *, push: bool = True, remote: str | None = None) -> DvcVersion:
    path = path.resolve()
    if not path.exists():
        raise DataError(f"cannot version {path}: it does not exist")
    repo = repo_root(path)
    rel = path.relative_to(repo).as_posix()
    log.info("data: dvc add %s", rel)
    _dvc(["add", rel], repo, f"dvc add {rel}")
    meta = [f"{rel}.dvc"] + [p for p in (str(Path(rel).parent / ".gitignore"),) if (repo / p).exists()]
    _run(["git", "add", "--", *meta], repo, "git add")
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *meta], cwd=repo).returncode != 0
    if staged:
        _run(["git", "commit", "-q", "-m", message or f"data: version {rel}", "--", *meta], repo, "git commit")
    else:
        log.info("data: %s unchanged since the last commit: no new commit", rel)
    if push:
        log.info("data: dvc push %s", rel)
        _dvc(["push", *(["-r", remote] if remote else []), f"{rel}.dvc"], repo, f"dvc push {rel}")
    rev = _run(["git", "rev-parse", "HEAD"], repo, "git rev-parse").strip()
    return resolve(DvcRef(repo=str(repo), rev=rev, path=rel, remote=remote))
