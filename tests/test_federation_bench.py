"""benchmarks/federation.py: the overhead of alternating runs is not moved by a steady drift of the machine."""

import pytest
from _benchmarks import load_benchmark


def test_a_steady_drift_cancels_in_the_overhead_but_not_in_the_fastest_runs():
    # Runs in the order Flower, baseline | baseline, Flower, on a machine 5% slower at each step; Flower costs 10%.
    speed = [1.0, 1.05, 1.05**2, 1.05**3]
    flower = [110 * speed[0], 110 * speed[3]]
    alone = [100 * speed[1], 100 * speed[2]]
    ratio, pairs = load_benchmark("federation").overhead(flower, alone)
    assert ratio == pytest.approx(1.10)
    assert pairs == pytest.approx([1.10 / 1.05, 1.10 * 1.05])
    assert min(flower) / min(alone) == pytest.approx(1.10 / 1.05)  # what the fastest runs would have said
