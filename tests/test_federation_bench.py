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


def test_every_repeat_runs_the_study_with_secure_aggregation_too(monkeypatch):
    """Issue 25: a row for ``fedrad simulate --secure-aggregation`` beside the plain Flower run, in the same
    alternating order (its pairs with the baseline cancel a drift as the plain run's do)."""
    bench = load_benchmark("federation")
    options: list[tuple[str, ...]] = []
    monkeypatch.setattr(bench, "with_flower", lambda args, out, *given: options.append(given) or {})
    assert [side for side, _ in bench.sides(ray_row=False)] == ["flower", "flower_secagg", "in_process"]
    assert [side for side, _ in bench.sides(ray_row=True)] == ["flower", "flower_secagg", "flower_ray", "in_process"]
    dict(bench.sides(ray_row=True))["flower_secagg"](None, None)
    assert options == [("--secure-aggregation",)]
