"""Latency histograms: percentiles, exact merging across processes, the JSON round trip of a process's counts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from benchmarks.loadgen.hdr import LatencyHistogram
from benchmarks.loadgen.stats import ProcessResult, Recorder, merge, summarize


def _hist(values_us: np.ndarray) -> LatencyHistogram:
    h = LatencyHistogram()
    h.record_many(values_us.tolist())
    return h


def test_percentiles_match_the_data_within_hdr_precision() -> None:
    values = np.random.default_rng(0).lognormal(mean=8, sigma=1, size=50_000)  # ~3 ms median, long tail
    summary = _hist(values).summary_ms()
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)):
        assert summary[name] == pytest.approx(np.percentile(values, q) / 1e3, rel=2e-3)
    assert summary["max"] == pytest.approx(values.max() / 1e3, rel=1e-3)


def test_merging_equals_recording_everything_in_one() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.exponential(5000, size=n) for n in (1000, 5000, 20)]
    merged = LatencyHistogram()
    for part in parts:
        merged.merge(LatencyHistogram.decode(_hist(part).encode()))  # through the wire format, as processes do
    whole = _hist(np.concatenate(parts))
    assert merged.count == whole.count == 6020
    assert merged.summary_ms() == whole.summary_ms()


def test_values_past_the_range_are_clamped_and_counted() -> None:
    h = LatencyHistogram()
    h.record_many([500.0, 1e12, 0.2])
    assert h.count == 3 and h.clamped == 1
    assert LatencyHistogram().summary_ms() == {}


def _process(statuses: dict[int, int], errors: dict[str, int], latency_us: float, cpu_s: float) -> ProcessResult:
    rec = Recorder()
    for status, n in statuses.items():
        for _ in range(n):
            rec.answer(status, 10, latency_us / 1e6)
            rec.arrived_in_window(status)
    for kind, n in errors.items():
        rec.errors[kind] += n
    return ProcessResult.from_recorder(rec, cpu_s=cpu_s, window_s=2.0, scheduled=0, body_wraps=1)


def test_process_results_merge_through_json() -> None:
    a = _process({200: 90, 429: 10}, {"ConnectionResetError": 2}, 1000, cpu_s=0.5)
    b = _process({200: 50, 503: 1}, {}, 3000, cpu_s=0.25)
    b.unfinished = 3
    total = merge([ProcessResult.from_dict(a.to_dict()), ProcessResult.from_dict(b.to_dict())])
    assert total.status == Counter({200: 140, 429: 10, 503: 1})
    assert total.errors == Counter({"ConnectionResetError": 2})
    assert total.ok == 140 and total.answered == 151
    assert total.failed == 11 + 2 + 3
    summary = summarize(total, duration_s=2.0)
    assert summary["requests"] == 151 + 2 + 3
    assert summary["ok_rps"] == 70.0 and summary["rps"] == 78.0
    assert summary["status"] == {"200": 140, "429": 10, "503": 1}
    assert summary["client_cpu_cores"] == 0.375
    assert summary["body_wraps"] == 2
    assert summary["ok_in_window"] == 140 and summary["answered_in_window"] == 151
    # 2xx: 90 answers at 1 ms, 50 at 3 ms: the median is 1 ms, p90 3 ms; the 11 others have their own histogram.
    assert summary["latency_ms"]["p50"] == pytest.approx(1.0, rel=1e-3)
    assert summary["latency_ms"]["p90"] == pytest.approx(3.0, rel=1e-3)
    assert summary["failed_latency_ms"]["p50"] == pytest.approx(1.0, rel=1e-3)
    assert total.latency.count == 140 and total.failed_latency.count == 11
