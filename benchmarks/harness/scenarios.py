"""Scenarios (what the requests carry), workloads (a scenario on a system) and the named scenario sets."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.harness import prompts
from benchmarks.harness.systems import BARE, DISPATCH_MEMORY, DISPATCH_REDIS, INFINITY, NAIVE, ROUTER, Running

UNIQUE, REPEATED, EMBEDDING, MIXED, ROUTE = "unique", "repeated", "embedding", "mixed", "route"
DESCRIPTIONS = {
    UNIQUE: "a new ~24-token prompt every request (the embedder's speed; the cache never hits)",
    REPEATED: f"{256} prompts sent in turn, each sent once before the first point (cache hits)",
    EMBEDDING: "a precomputed 384-d unit vector instead of a prompt (skips the embedder)",
    MIXED: "new prompts of 8-300 tokens by the MiniLM tokenizer, log-uniform (median ~50)",
    ROUTE: "the dispatcher's POST /route/, the same body every time, 4 fake ready workers",
}
REPEATED_PROMPTS = 256
# Scenarios whose bodies repeat to hit a cache: each body is sent once before the first point (harness/priming.py).
PRIMED = {REPEATED}
EMBEDDING_VECTORS = 1024
# Disjoint prompt-number ranges: no prompt repeats across points, scenarios or the offline encode.
POINT_STRIDE = 10_000_000
START_IDS = {UNIQUE: 100_000_000, MIXED: 200_000_000, REPEATED: 300_000_000}
OFFLINE_START_ID = 400_000_000
# How many requests per second a closed-loop point might reach before anything was measured (bodies to build).
FIRST_RATE_GUESS = {UNIQUE: 3000.0, MIXED: 1000.0}


@dataclass(frozen=True)
class Workload:
    system: str
    scenario: str

    @property
    def key(self) -> str:
        return f"{self.system}/{self.scenario}"


def _set(*pairs: tuple[str, str]) -> tuple[Workload, ...]:
    return tuple(Workload(system, scenario) for system, scenario in pairs)


# Each set lists its workloads grouped by system (a system starts once and serves its scenarios in turn).
SCENARIO_SETS: dict[str, tuple[Workload, ...]] = {
    "cpu-default": _set(
        (BARE, REPEATED),
        (BARE, EMBEDDING),
        (ROUTER, UNIQUE),
        (ROUTER, REPEATED),
        (ROUTER, EMBEDDING),
        (ROUTER, MIXED),
        (NAIVE, UNIQUE),
        (INFINITY, UNIQUE),
        (DISPATCH_MEMORY, ROUTE),
        (DISPATCH_REDIS, ROUTE),
    ),
    "router": _set((BARE, REPEATED), (BARE, EMBEDDING), (ROUTER, UNIQUE), (ROUTER, REPEATED), (ROUTER, EMBEDDING)),
    "embedders": _set((ROUTER, UNIQUE), (NAIVE, UNIQUE), (INFINITY, UNIQUE)),
    "dispatcher": _set((BARE, REPEATED), (DISPATCH_MEMORY, ROUTE), (DISPATCH_REDIS, ROUTE)),
}
# Sets that include router/unique also time sentence-transformers' offline encode (the 1.65x target's baseline).
OFFLINE_SETS = {"cpu-default", "router", "embedders"}


def bodies(workload: Workload, running: Running, count: int, seed: int, point: int) -> list[bytes]:
    """The request bodies of one load point; ``count`` matters only for scenarios whose bodies never repeat."""
    scenario = workload.scenario
    if scenario == ROUTE:
        assert running.fixed_body is not None
        return [running.fixed_body]
    if scenario == EMBEDDING:
        return prompts.embedding_bodies(EMBEDDING_VECTORS, seed)
    encode = running.encode_prompt
    assert encode is not None, f"{running.name} takes no prompts"
    if scenario == REPEATED:
        texts = prompts.unique_prompts(REPEATED_PROMPTS, seed, START_IDS[REPEATED])
    elif scenario == UNIQUE:
        texts = prompts.unique_prompts(count, seed, START_IDS[UNIQUE] + point * POINT_STRIDE)
    elif scenario == MIXED:
        texts = prompts.mixed_length_prompts(count, seed, START_IDS[MIXED] + point * POINT_STRIDE)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return [encode(t) for t in texts]


def bodies_needed(scenario: str, rate_hint: float, seconds: float) -> int:
    """Bodies for a point expected to run at ``rate_hint`` req/s for ``seconds``, with a margin."""
    if scenario not in FIRST_RATE_GUESS:
        return 0
    return int(rate_hint * seconds * 1.25) + 1000
