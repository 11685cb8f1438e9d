"""Test doubles: a deterministic embedder, toy weights built in code, dispatcher worker records."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from service.dispatch.records import WorkerRecord, WorkerState
from service.router.weights import RouterWeights

FAKE_SHA = "f" * 64
DIM = 8


def unit(vector: Sequence[float]) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32)
    return v / np.linalg.norm(v)


class FakeEmbedder:
    """Maps a text to a fixed unit vector: texts starting with "c<k>" land on axis k (cluster k).

    Counts calls and can be slowed down so tests can pile up a queue.
    """

    model_id = "fake/embedder"
    model_sha256 = FAKE_SHA
    dim = DIM
    device = "cpu"
    kernels = None

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.texts_embedded = 0
        self._lock = threading.Lock()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[*text.encode()[:32]] or [0] for text in texts]

    def runtime_info(self) -> dict[str, object]:
        return {"dtype": "float32", "fake": True}

    def embed_ids(self, sequences: Sequence[Sequence[int]], *, cpu_threads: int | None = None) -> np.ndarray:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.batches.append(len(sequences))
            self.texts_embedded += len(sequences)
        return np.stack([self.vector_for(bytes(seq).decode(errors="replace")) for seq in sequences])

    @staticmethod
    def vector_for(text: str) -> np.ndarray:
        if text.startswith("c") and text[1:2].isdigit():
            axis = int(text[1]) % DIM
        else:
            axis = int(hashlib.sha256(text.encode()).hexdigest(), 16) % DIM
        v = np.full(DIM, 0.01, dtype=np.float32)
        v[axis] = 1.0
        return unit(v)


def toy_weights(*, default_lambda: float = 0.1, sha: str = FAKE_SHA, bump: float = 0.0) -> RouterWeights:
    """Three models over DIM clusters (cluster k = axis k).

    cheap: cost 0.01, error 0.6 everywhere; mid: cost 0.1, error 0.3; big: cost 1.0, error 0.1 —
    except cluster 0, where every model has error 0.2 (a tie that the cheaper model must win).
    """
    models = ("big", "cheap", "mid")
    error = np.array([[0.1] * DIM, [0.6] * DIM, [0.3] * DIM], dtype=np.float32) + bump
    error[:, 0] = 0.2
    return RouterWeights(
        models=models,
        centroids=np.eye(DIM, dtype=np.float32),
        expected_error=np.clip(error, 0, 1),
        cost_per_1k=np.array([1.0, 0.01, 0.1], dtype=np.float32),
        default_lambda=default_lambda,
        embedder_id="fake/embedder",
        embedder_sha256=sha,
        metadata={"note": "toy weights for tests"},
    )


def worker_record(
    worker_id: str,
    *,
    now: float,
    load: float = 0.0,
    perf: float = 10.0,
    state: WorkerState = WorkerState.READY,
    seen_s_ago: float = 0.0,
    open_requests: int = 0,
) -> WorkerRecord:
    """A dispatcher worker record as a store would hold it, last seen ``seen_s_ago`` before ``now``."""
    return WorkerRecord(
        worker_id=worker_id,
        url=f"http://{worker_id}:8000",
        state=state,
        max_perf=perf,
        cur_load=0.0,
        in_flight=0,
        last_seen=now - seen_s_ago,
        load=load,
        reqnum=0,
        open_requests=open_requests,
    )


@contextlib.contextmanager
def stub_http_server(status_for_path: Callable[[str], int] = lambda path: 200) -> Iterator[tuple[str, list[bytes]]]:
    """A keep-alive HTTP/1.1 server on a free port that answers every POST ``{}`` with ``status_for_path(path)``;
    yields its base URL and the bodies it was sent, in order."""
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(status_for_path(self.path))
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()
