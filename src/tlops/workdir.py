"""The layout of a tlops workdir, in one place (the runner, ``tlops gc`` and the steps use it).

::

    <workdir>/
      runs/<run-id>/<step>/          one dir per pipeline run; ``runs/<run-id>/.lock`` while it runs
      index/<step>/<step-key>        reuse pointer: the path of the newest finished artifact
      locks/<step>/<step-key>.lock   held while a run computes that step
      checkpoints/<step-key>/        resumable training checkpoints of an unfinished step
      cache/features/                the content-addressed feature cache (unless features.cache_dir)
      cache/backends/                exported / quantised backbones (tlops.features.backend_store)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RUN_LOCK = ".lock"  # inside a run dir: held while the run is in progress (gc never prunes it)


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> "Workdir":
        return cls(Path(path).expanduser().resolve())

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def feature_cache(self) -> Path:
        return self.root / "cache" / "features"

    @property
    def backend_models(self) -> Path:
        return self.root / "cache" / "backends"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def index_entry(self, step: str, key: str) -> Path:
        return self.index / step / key

    def step_lock(self, step: str, key: str) -> Path:
        return self.locks / step / f"{key}.lock"

    def step_locks(self, key: str) -> list[Path]:
        """The lock files of every step computed under ``key`` (for gc: is it in progress?)."""
        return list(self.locks.glob(f"*/{key}.lock"))

    def checkpoint(self, key: str) -> Path:
        return self.checkpoints / key

    def in_runs(self, path: Path) -> bool:
        """Whether ``path`` lies inside a run dir (a kept artifact, not a temp dir)."""
        return self.runs.resolve() in Path(path).resolve().parents
