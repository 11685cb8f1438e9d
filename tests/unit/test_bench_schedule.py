"""The open loop's Poisson arrival schedule: rate, exponential gaps, seeding."""

from __future__ import annotations

import numpy as np

from benchmarks.loadgen.schedule import poisson_arrivals


def test_count_and_gaps_match_a_poisson_process() -> None:
    rate, duration = 2000.0, 30.0
    times = poisson_arrivals(rate, duration, seed=1)
    expected = rate * duration
    assert abs(len(times) - expected) < 4 * np.sqrt(expected)  # Poisson count: sd = sqrt(mean)
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < duration
    gaps = np.diff(times)
    assert abs(gaps.mean() * rate - 1) < 0.02
    assert abs(gaps.std() / gaps.mean() - 1) < 0.03  # exponential: coefficient of variation 1
    # Counts per 100 ms window: Poisson, so variance about equal to the mean (index of dispersion 1).
    counts = np.bincount((times / 0.1).astype(int), minlength=int(duration / 0.1))
    assert abs(counts.var() / counts.mean() - 1) < 0.15


def test_seeded_and_independent_of_nothing_else() -> None:
    a, b = poisson_arrivals(100, 5, seed=7), poisson_arrivals(100, 5, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, poisson_arrivals(100, 5, seed=8))


def test_long_run_tops_up_past_the_first_draw() -> None:
    times = poisson_arrivals(1.0, 2000.0, seed=3)
    assert times[-1] > 1900 and times[-1] < 2000


def test_nothing_to_send() -> None:
    assert len(poisson_arrivals(0, 10, seed=0)) == 0
    assert len(poisson_arrivals(10, 0, seed=0)) == 0
