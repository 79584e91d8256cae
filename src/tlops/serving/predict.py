"""Batch prediction: ``tlops predict NAME@ALIAS --data PATH --out FILE``.

Reads any source ingest reads (same loaders: image folders, npz, csv/tsv, archives, s3://,
sklearn:), scores it in shards through the model's contract (text length-sorted inside each
batch by the model's own batching), and writes parquet or jsonl with every probability, the
model name/version/alias and the input's row number (and its label, when the source has one).

Resumable: each shard is written atomically to ``FILE.parts/`` and a rerun after a kill skips
finished shards; the parts are tied to the model version, the source and the shard size, so a
rerun against another version starts over instead of mixing answers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from tlops.errors import ConfigError

log = logging.getLogger(__name__)


def predict(
    model: str,
    data: str,
    out: Path,
    *,
    shard_size: int = 1024,
    data_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    import pandas as pd

    from tlops.config import DataConfig
    from tlops.data.loaders import load as load_data
    from tlops.serving.registry import load, resolve

    out = Path(out)
    fmt = "parquet" if out.suffix == ".parquet" else "jsonl" if out.suffix in (".jsonl", ".json") else None
    if fmt is None:
        raise ConfigError(f"--out {out}: write .parquet or .jsonl")
    ref = resolve(model)
    raw = load_data(DataConfig(source=data, **(data_options or {})))
    n = len(raw.x)
    shards = max(1, -(-n // shard_size))
    parts = out.with_name(out.name + ".parts")
    key = {"model": ref.name, "version": ref.version, "source": data, "rows": n, "shard_size": shard_size}
    meta = parts / "run.json"
    if parts.is_dir() and (not meta.is_file() or json.loads(meta.read_text()) != key):
        log.info("predict: %s holds parts of another run; starting over", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(key))
    impl = load(ref)  # verified against the registration's manifest; runs no code from the store
    done = 0
    for k in range(shards):
        part = parts / f"shard-{k:05d}.parquet"
        if part.is_file():
            done += 1
            if progress:
                progress(k + 1, shards)
            continue
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        items = impl.contract.parse(raw.x[lo:hi] if raw.kind == "image" else list(raw.x[lo:hi]))
        df = impl.contract.frame(impl.contract.predict_proba(impl.clf, items), ref.identity)
        df.insert(0, "row", range(lo, hi))
        if raw.y:
            df.insert(1, "input_label", raw.y[lo:hi])
        tmp = part.with_suffix(f".tmp{os.getpid()}")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, part)
        if progress:
            progress(k + 1, shards)
    frames = [pd.read_parquet(parts / f"shard-{k:05d}.parquet") for k in range(shards)]
    result = pd.concat(frames, ignore_index=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if fmt == "parquet":
        result.to_parquet(tmp, index=False)
    else:
        result.to_json(tmp, orient="records", lines=True)
    os.replace(tmp, out)
    shutil.rmtree(parts)
    return {**ref.identity, "rows": n, "shards": shards, "reused_shards": done, "out": str(out)}
