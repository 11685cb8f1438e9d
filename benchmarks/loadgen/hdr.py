"""Latency histograms (HDR, microsecond resolution) that merge exactly across client processes."""

from __future__ import annotations

from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 120_000_000  # two minutes: anything slower is clamped and counted as such
SIGNIFICANT_DIGITS = 3
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


class LatencyHistogram:
    """An HDR histogram of latencies in microseconds; ``encode``/``decode`` carry it through JSON."""

    def __init__(self) -> None:
        self._hist = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        self.clamped = 0

    def record_many(self, values_us: Iterable[float]) -> None:
        record = self._hist.record_value
        for value in values_us:
            v = int(value)
            if v > HIGHEST_US:
                self.clamped += 1
                v = HIGHEST_US
            record(max(v, LOWEST_US))

    def merge(self, other: LatencyHistogram) -> None:
        self._hist.add(other._hist)
        self.clamped += other.clamped

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def summary_ms(self) -> dict[str, float]:
        """p50/p90/p99/p99.9, mean and max in milliseconds (empty when nothing was recorded)."""
        if self.count == 0:
            return {}
        out = {name: self._hist.get_value_at_percentile(q) / 1e3 for name, q in PERCENTILES}
        out["mean"] = self._hist.get_mean_value() / 1e3
        out["max"] = self._hist.get_max_value() / 1e3
        return {k: round(v, 3) for k, v in out.items()}

    def encode(self) -> str:
        """HdrHistogram's compressed wire format, base64 (the same text any HdrHistogram library can decode)."""
        raw = self._hist.encode()
        return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)

    @classmethod
    def decode(cls, text: str, clamped: int = 0) -> LatencyHistogram:
        hist = cls()
        if text:
            hist._hist = HdrHistogram.decode(text.encode("ascii"))
        hist.clamped = clamped
        return hist
