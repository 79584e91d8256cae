"""``tlops run --reproduce RUN_ID``: rerun a past run's model-making steps and compare the weights.

A run records its resolved config (``runs/<id>/config.yaml``) and, in every step's manifest, the
environment it ran in (``tlops.runtime_env.record``: seed, threads, thread env, ISA, GPU). To
reproduce, the recorded config is loaded, the recorded thread settings are restored, and ingest →
pull-model → extract-features → fine-tune run again into ``runs/<id>-reproduce-<hex>`` with no
reuse at all (no finished artifact, no feature-cache entry; the reuse index is left as it was).
Evaluate and register are not rerun: the registry is not touched.

The verdict compares the digest of every trained model with the recorded one:

- ``match``: bit-identical weights (exit 0);
- ``other-isa``: different weights, but the recorded run used another CPU ISA (or GPU) than this
  machine: torch picks different kernels per ISA, so this is expected, explained, and exit 0;
- ``mismatch``: different weights on the same ISA (or a changed config: the fine-tune step key
  differs from the recorded one, e.g. an edited ``config.yaml``): exit 4 (docs/exit-codes.md).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlops.errors import ConfigError
from tlops.runtime_env import THREAD_ENV
from tlops.workdir import Workdir

log = logging.getLogger(__name__)

EXIT_MISMATCH = 4
MODEL_STEPS = ("ingest", "pull-model", "extract-features", "fine-tune")


@dataclass
class Reproduction:
    run_id: str
    run_dir: Path  # the recorded run
    out_dir: Path  # where the reproduction's artifacts are
    verdict: str  # "match", "other-isa" or "mismatch"
    digests: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # model -> (recorded, now)
    isa: tuple[str | None, str | None] = (None, None)  # (recorded, now)
    gpu: tuple[str | None, str | None] = (None, None)
    threads: tuple[int | None, int | None] = (None, None)
    key_changed: bool = False
    selected: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_MISMATCH if self.verdict == "mismatch" else 0

    def lines(self) -> list[str]:
        """What ``tlops run --reproduce`` prints."""
        rec_isa, now_isa = self.isa
        out = [
            f"reproduce {self.run_id}: config {self.run_dir / 'config.yaml'}, threads {self.threads[1]} "
            f"(recorded {self.threads[0]}), ISA {now_isa} (recorded {rec_isa}); artifacts in {self.out_dir}"
        ]
        for name, (was, now) in self.digests.items():
            mark = "same" if was == now else "DIFFERENT"
            sel = " (selected)" if name == self.selected else ""
            out.append(f"  {name}{sel}: recorded {_short(was)}, reproduced {_short(now)}: {mark}")
        if self.verdict == "match":
            out.append("model digest matches: bit-identical weights")
        elif self.verdict == "other-isa":
            out.append(
                f"model digest differs, as expected: the run was recorded on {_where(rec_isa, self.gpu[0])} and this "
                f"machine runs {_where(now_isa, self.gpu[1])}; torch picks different kernels there, so seeded runs "
                "are bit-identical only on the same ISA/GPU. Not a failure: reproduce on a matching machine to check"
            )
        else:
            why = (
                "the config or inputs differ from the recorded run (the fine-tune step key changed: was "
                f"{self.run_dir / 'config.yaml'} or the data edited?)"
                if self.key_changed
                else "same config, inputs and ISA, yet different weights: the run is not deterministic here"
            )
            out.append(f"model digest MISMATCH: {why}; exit code {EXIT_MISMATCH}")
        return out


def _short(d: str | None) -> str:
    return d[:12] if d else "none"


def _where(isa: str | None, gpu: str | None) -> str:
    return f"{isa or 'an unrecorded ISA'}" + (f" with GPU {gpu}" if gpu else "")


def find_run(run_ref: str, workdir: Path) -> Path:
    """The run dir of ``run_ref``: a run id under ``<workdir>/runs`` or a run dir path."""
    as_path = Path(run_ref)
    if (as_path / "config.yaml").is_file():
        return as_path.resolve()
    runs = Workdir.at(workdir).runs
    d = runs / run_ref
    if (d / "config.yaml").is_file():
        return d
    known = sorted((p.name for p in runs.glob("*") if (p / "config.yaml").is_file()), reverse=True)[:5]
    raise ConfigError(
        f"--reproduce: no run {run_ref!r} in {runs}"
        + (f"; newest runs there: {', '.join(known)}" if known else " (no runs there: pass --workdir?)")
    )


def _digests(meta: dict[str, Any]) -> dict[str, str | None]:
    return {name: m.get("digest") for name, m in meta.get("models", {}).items()}


def restore_thread_env(env: dict[str, Any] | None) -> None:
    """Set the thread variables (``OMP_NUM_THREADS`` ...) as the recorded run had them, and torch's
    intra-op thread count to the recorded one (the config's ``train.threads``, when set, is applied
    again at each step's entry and is the same number)."""
    if not env:
        return
    for k in THREAD_ENV:
        v = (env.get("env") or {}).get(k)
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    threads = (env.get("torch") or {}).get("intra_op_threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def reproduce(run_ref: str, workdir: Path) -> Reproduction:
    from tlops.artifacts import read_artifact
    from tlops.config import load_config
    from tlops.dag import get
    from tlops.runners.local import execute_step
    from tlops.runtime_env import record

    run_dir = find_run(run_ref, workdir)
    recorded_dir = run_dir / "fine-tune"
    try:
        recorded = read_artifact(recorded_dir, "trained-models")
    except Exception as e:  # noqa: BLE001 - any unreadable artifact means the same to the user
        raise ConfigError(f"--reproduce: run {run_dir.name} has no finished fine-tune step ({e})") from None
    wd = Workdir.at(workdir) if not (Path(run_ref) / "config.yaml").is_file() else Workdir.at(run_dir.parents[1])
    cfg = load_config(run_dir / "config.yaml", [f"workdir={json.dumps(str(wd.root))}"])
    # no feature-cache entry either: the features are recomputed with this machine's kernels
    cfg = cfg.model_copy(update={"features": cfg.features.model_copy(update={"cache": False})})
    rec_env = recorded.manifest.get("environment")
    restore_thread_env(rec_env)
    out_dir = wd.runs / f"{run_dir.name}-reproduce-{uuid.uuid4().hex[:6]}"
    out_dir.mkdir(parents=True)
    log.info("reproduce %s: rerunning %s into %s (no reuse)", run_dir.name, " → ".join(MODEL_STEPS), out_dir)
    arts: dict[str, Any] = {}
    for name in MODEL_STEPS:
        spec = get(name)
        inputs = {i: arts[p] for i, p in spec.inputs.items()}
        arts[name] = execute_step(spec, cfg, inputs, out_dir / name, reuse=False, record=False).artifact
    now = arts["fine-tune"]
    now_env = now.manifest.get("environment") or record(cfg.seed)
    was_d, now_d = _digests(recorded.meta), _digests(now.meta)
    digests = {n: (was_d.get(n), now_d.get(n)) for n in dict.fromkeys([*was_d, *now_d])}
    rec_t, now_t = (rec_env or {}).get("torch") or {}, now_env.get("torch") or {}
    isa = (rec_t.get("cpu_capability"), now_t.get("cpu_capability"))
    gpu = ((rec_t.get("cuda") or {}).get("device"), (now_t.get("cuda") or {}).get("device"))
    key_changed = recorded.manifest.get("step_key") != now.manifest.get("step_key")
    if all(a == b and a for a, b in digests.values()):
        verdict = "match"
    elif not key_changed and (isa[0] != isa[1] or gpu[0] != gpu[1]):
        verdict = "other-isa"
    else:
        verdict = "mismatch"
    return Reproduction(
        run_id=run_dir.name,
        run_dir=run_dir,
        out_dir=out_dir,
        verdict=verdict,
        digests=digests,
        isa=isa,
        gpu=gpu,
        threads=(rec_t.get("intra_op_threads"), now_t.get("intra_op_threads")),
        key_changed=key_changed,
        selected=recorded.meta.get("selected"),
    )
