"""Diagnostic: how long one prompt alone takes to embed, by length, on one core and on all cores (best of N), and
how many of the ``mixed`` scenario's prompts reach the 256-token cut. Together they bound the mixed scenario's
p99: no queueing policy can answer a prompt faster than its own forward pass on an idle server.

    python benchmarks/diagnostics/lone_prompt_latency.py
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the service package, from a plain checkout

from benchmarks.harness import prompts
from service.router.embedder import MiniLMEmbedder

LENGTHS = (24, 50, 128, 256)
REPEATS = 11
MIXED_SAMPLE = 4000
SEED = 1


def best_ms(embedder: MiniLMEmbedder, ids: list[list[int]], threads: int) -> float:
    embedder.embed_ids(ids[:1], cpu_threads=threads)  # warm this shape
    best = float("inf")
    for seq in ids[1:]:
        started = time.perf_counter()
        embedder.embed_ids([seq], cpu_threads=threads)
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    embedder = MiniLMEmbedder(device="cpu")  # the server's default dtype: bf16 where the CPU has bf16 dot products
    print(f"encoder: {embedder.runtime_info()}")
    cores = os.cpu_count() or 1
    rng = random.Random(SEED)
    for target in LENGTHS:
        texts = [prompts.exact_length_prompt(target, 10_000 + i, rng) for i in range(REPEATS + 1)]
        ids = embedder.tokenize(texts)
        one, every = best_ms(embedder, ids, 1), best_ms(embedder, ids, cores)
        print(f"{len(ids[0]):4d} tokens: {one:6.1f} ms on 1 core, {every:6.1f} ms on {cores} cores (best of {REPEATS})")
    lengths = np.array([prompts.token_count(p) for p in prompts.mixed_length_prompts(MIXED_SAMPLE, 0)])
    cut = embedder.max_seq_length
    print(f"mixed scenario: {np.mean(lengths >= cut):.1%} of {MIXED_SAMPLE} prompts reach the {cut}-token cut")


if __name__ == "__main__":
    main()
