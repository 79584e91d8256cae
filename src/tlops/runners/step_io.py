"""Run one step with inputs and output on local paths or ``s3://`` prefixes (``tlops step``).

S3 inputs are downloaded to a temp dir first (only finished artifacts: a prefix without a
manifest is refused). An S3 output is written locally, then published with the manifest
uploaded last, so a reader never sees a half-written artifact, even if the upload dies.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from tlops import dag
from tlops.artifacts import read_artifact
from tlops.config import PipelineConfig
from tlops.dag import StepSpec
from tlops.runners.local import StepResult, execute_step
from tlops.storage import S3Storage, is_s3

log = logging.getLogger(__name__)


def run_step(
    spec: StepSpec, cfg: PipelineConfig, inputs: dict[str, str], out: str, *, reuse: bool = True
) -> StepResult:
    """``inputs``: input name -> artifact location; ``out``: where the artifact goes."""
    with tempfile.TemporaryDirectory(prefix=f"tlops-{spec.name}-") as tmp:
        arts = {}
        for name, where in inputs.items():
            local = where
            if is_s3(where):
                local = Path(tmp) / "in" / name
                log.info("%s: downloading input %s from %s", spec.name, name, where)
                S3Storage().download_dir(where, local)
            arts[name] = read_artifact(local, dag.get(spec.inputs[name]).output)
        if not is_s3(out):
            return execute_step(spec, cfg, arts, Path(out), reuse=reuse)
        local_out = Path(tmp) / "out"
        res = execute_step(spec, cfg, arts, local_out, reuse=False, record=False)
        log.info("%s: publishing %s (manifest last)", spec.name, out)
        S3Storage().upload_dir(local_out, out)
        return res
