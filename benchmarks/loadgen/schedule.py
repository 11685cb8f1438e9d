"""Open-loop arrival times: a seeded Poisson process (exponential gaps), fixed before the run starts."""

from __future__ import annotations

import numpy as np


def poisson_arrivals(rate_per_s: float, duration_s: float, seed: int) -> np.ndarray:
    """Arrival offsets in seconds, sorted, in ``[0, duration_s)``, of a Poisson process at ``rate_per_s``.

    Precomputed so that the send times do not depend on how fast the server answers (no coordinated omission).
    """
    if rate_per_s <= 0 or duration_s <= 0:
        return np.empty(0)
    rng = np.random.default_rng(seed)
    expected = rate_per_s * duration_s
    # Draw a few standard deviations more gaps than expected, then top up in the rare case that was short.
    chunk = int(expected + 6 * np.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, size=chunk))
    while times[-1] < duration_s:
        more = np.cumsum(rng.exponential(1.0 / rate_per_s, size=chunk)) + times[-1]
        times = np.concatenate([times, more])
    return times[times < duration_s]
