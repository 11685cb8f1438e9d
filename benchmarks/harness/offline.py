"""sentence-transformers' own offline ``encode(batch_size=256)`` on unique prompts, in its own process (started by
the harness with every server stopped). bench_router's timing function does the work.

    python -m benchmarks.harness.offline --prompts 5000 --batch-size 256 --seed 0
"""

from __future__ import annotations

import argparse
import json

from benchmarks.bench_router import ST_WARMUP_PROMPTS, ST_WARMUP_START_ID, time_st_encode
from benchmarks.common import generate_prompts
from benchmarks.harness.scenarios import OFFLINE_START_ID


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    texts = generate_prompts(args.prompts, args.seed, start_id=OFFLINE_START_ID)
    warmup = generate_prompts(ST_WARMUP_PROMPTS, args.seed, start_id=ST_WARMUP_START_ID)
    print(json.dumps(time_st_encode(texts, warmup, args.batch_size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
