"""What one client process counted in the recorded window, and how several processes' counts merge."""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.loadgen.hdr import LatencyHistogram

HTTP_OK_MIN, HTTP_OK_MAX = 200, 299


def is_ok(status: int) -> bool:
    return HTTP_OK_MIN <= status <= HTTP_OK_MAX


@dataclass
class Recorder:
    """Per-request outcomes of the recorded window. Latencies are kept raw in the hot path (an array append) and
    put into HDR histograms once the run is over. 2xx answers and other answers keep separate latencies: a fast
    429 must not pull the percentiles of served requests down."""

    ok_latencies_s: array[float] = field(default_factory=lambda: array("d"))
    failed_latencies_s: array[float] = field(default_factory=lambda: array("d"))
    send_lag_s: array[float] = field(default_factory=lambda: array("d"))
    pool_wait_s: array[float] = field(default_factory=lambda: array("d"))
    status: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bytes_received: int = 0
    # Answers that arrived inside the window, whichever request they belong to: the throughput's numerator.
    ok_in_window: int = 0
    answered_in_window: int = 0

    def answer(self, status: int, nbytes: int, latency_s: float) -> None:
        self.status[status] += 1
        self.bytes_received += nbytes
        (self.ok_latencies_s if is_ok(status) else self.failed_latencies_s).append(latency_s)

    def sent(self, lag_s: float, pool_wait_s: float) -> None:
        """Open loop: how late the generator started the request against its schedule (its own lag; early
        starts count as 0), and how long the request then waited for a free connection."""
        self.send_lag_s.append(lag_s)
        self.pool_wait_s.append(pool_wait_s)

    def arrived_in_window(self, status: int) -> None:
        self.answered_in_window += 1
        self.ok_in_window += is_ok(status)

    def error(self, exc: BaseException) -> None:
        self.errors[type(exc).__name__] += 1


def _histogram(values_s: array[float]) -> LatencyHistogram:
    hist = LatencyHistogram()
    hist.record_many(x * 1e6 for x in values_s)
    return hist


@dataclass
class ProcessResult:
    """One process's counts (JSON-safe through ``to_dict``/``from_dict``), mergeable with :func:`merge`."""

    latency: LatencyHistogram  # 2xx answers only
    send_lag: LatencyHistogram
    status: Counter[int]
    errors: Counter[str]
    bytes_received: int = 0
    scheduled: int = 0  # open loop: arrivals in the recorded window
    unfinished: int = 0  # recorded requests still waiting when the drain timeout ran out
    body_wraps: int = 0  # times the process went past the end of its bodies and started over
    connections_opened: int = 0
    cpu_s: float = 0.0  # the client process's own CPU time over the recorded window
    window_s: float = 0.0  # the recorded window as the process's clock saw it
    late_start_s: float = 0.0  # how late the process started after the common start time
    failed_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # non-2xx answers
    pool_wait: LatencyHistogram = field(default_factory=LatencyHistogram)  # open loop: waits for a connection
    ok_in_window: int = 0  # 2xx answers that arrived inside the window (any request's)
    answered_in_window: int = 0  # answers of any status that arrived inside the window

    @classmethod
    def from_recorder(cls, rec: Recorder, **extra: Any) -> ProcessResult:
        return cls(
            _histogram(rec.ok_latencies_s),
            _histogram(rec.send_lag_s),
            Counter(rec.status),
            Counter(rec.errors),
            rec.bytes_received,
            failed_latency=_histogram(rec.failed_latencies_s),
            pool_wait=_histogram(rec.pool_wait_s),
            ok_in_window=rec.ok_in_window,
            answered_in_window=rec.answered_in_window,
            **extra,
        )

    @property
    def answered(self) -> int:
        return sum(self.status.values())

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.status.items() if is_ok(code))

    @property
    def failed(self) -> int:
        """Non-2xx answers, exceptions and requests left unfinished."""
        return self.answered - self.ok + sum(self.errors.values()) + self.unfinished

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_hdr": self.latency.encode(),
            "latency_clamped": self.latency.clamped,
            "failed_latency_hdr": self.failed_latency.encode(),
            "send_lag_hdr": self.send_lag.encode(),
            "pool_wait_hdr": self.pool_wait.encode(),
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "errors": dict(sorted(self.errors.items())),
            "bytes_received": self.bytes_received,
            "scheduled": self.scheduled,
            "unfinished": self.unfinished,
            "ok_in_window": self.ok_in_window,
            "answered_in_window": self.answered_in_window,
            "body_wraps": self.body_wraps,
            "connections_opened": self.connections_opened,
            "cpu_s": round(self.cpu_s, 4),
            "window_s": round(self.window_s, 4),
            "late_start_s": round(self.late_start_s, 4),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessResult:
        return cls(
            latency=LatencyHistogram.decode(data["latency_hdr"], data.get("latency_clamped", 0)),
            send_lag=LatencyHistogram.decode(data["send_lag_hdr"]),
            status=Counter({int(k): int(v) for k, v in data["status"].items()}),
            errors=Counter({str(k): int(v) for k, v in data["errors"].items()}),
            bytes_received=int(data["bytes_received"]),
            scheduled=int(data["scheduled"]),
            unfinished=int(data["unfinished"]),
            body_wraps=int(data["body_wraps"]),
            connections_opened=int(data["connections_opened"]),
            cpu_s=float(data["cpu_s"]),
            window_s=float(data["window_s"]),
            late_start_s=float(data["late_start_s"]),
            failed_latency=LatencyHistogram.decode(data["failed_latency_hdr"]),
            pool_wait=LatencyHistogram.decode(data["pool_wait_hdr"]),
            ok_in_window=int(data["ok_in_window"]),
            answered_in_window=int(data["answered_in_window"]),
        )


def merge(results: list[ProcessResult]) -> ProcessResult:
    """Counts add up, histograms merge exactly; ``window_s`` and ``late_start_s`` take the longest."""
    total = ProcessResult(LatencyHistogram(), LatencyHistogram(), Counter(), Counter())
    for r in results:
        total.latency.merge(r.latency)
        total.failed_latency.merge(r.failed_latency)
        total.send_lag.merge(r.send_lag)
        total.pool_wait.merge(r.pool_wait)
        total.status.update(r.status)
        total.errors.update(r.errors)
        total.bytes_received += r.bytes_received
        total.scheduled += r.scheduled
        total.unfinished += r.unfinished
        total.ok_in_window += r.ok_in_window
        total.answered_in_window += r.answered_in_window
        total.body_wraps += r.body_wraps
        total.connections_opened += r.connections_opened
        total.cpu_s += r.cpu_s
        total.window_s = max(total.window_s, r.window_s)
        total.late_start_s = max(total.late_start_s, r.late_start_s)
    return total


def summarize(result: ProcessResult, duration_s: float) -> dict[str, Any]:
    """The numbers a report quotes: rates over the nominal recorded duration, percentiles in ms, client CPU.

    ``ok_rps`` counts the 2xx answers that *arrived* inside the window: answers to recorded requests that came in
    during the drain are left out, or an overloaded server would look faster than it is. ``latency_ms`` is of 2xx
    answers only (``failed_latency_ms``: the other answers); ``failed`` says how many requests it does not cover.
    """
    answered, ok = result.answered, result.ok
    requests = answered + sum(result.errors.values()) + result.unfinished
    return {
        "requests": requests,
        "ok": ok,
        "rps": round(requests / duration_s, 2),
        "ok_rps": round(result.ok_in_window / duration_s, 2),
        "ok_in_window": result.ok_in_window,
        "answered_in_window": result.answered_in_window,
        "scheduled": result.scheduled,
        "offered_rps": round(result.scheduled / duration_s, 2) if result.scheduled else None,
        "status": {str(k): v for k, v in sorted(result.status.items())},
        "errors": dict(sorted(result.errors.items())),
        "unfinished": result.unfinished,
        "failed": result.failed,
        "latency_ms": result.latency.summary_ms(),
        "latency_clamped": result.latency.clamped,
        "failed_latency_ms": result.failed_latency.summary_ms(),
        "send_lag_ms": result.send_lag.summary_ms(),
        "pool_wait_ms": result.pool_wait.summary_ms(),
        "bytes_received": result.bytes_received,
        "body_wraps": result.body_wraps,
        "connections_opened": result.connections_opened,
        "client_cpu_cores": round(result.cpu_s / duration_s, 3),
        "client_cpu_us_per_request": round(result.cpu_s / requests * 1e6, 1) if requests else None,
        "late_start_s": round(result.late_start_s, 4),
        "latency_hdr": result.latency.encode(),
    }
