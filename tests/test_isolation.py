"""common/isolation.py: a file whose reader hangs or crashes its process costs that file only."""

import os
import signal
import time

from common.isolation import Failure, isolated_map


def read(name: str) -> str:
    """Stands in for a decoder: hangs on 'hang', dies of a segmentation fault on 'crash', raises on 'raise'."""
    if name == "hang":
        time.sleep(3600)
    if name == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if name == "raise":
        raise RuntimeError("a decoder's own error")
    return name.upper()


def test_a_hang_and_a_crash_cost_only_their_own_item():
    names = ["a", "hang", "b", "crash", "c", "raise", "d"]
    start = time.monotonic()
    results = dict(isolated_map(read, [(n,) for n in names], workers=2, seconds=2.0))
    assert time.monotonic() - start < 30
    assert {names[i]: r for i, r in results.items() if not isinstance(r, Failure)} == {
        "a": "A", "b": "B", "c": "C", "d": "D"}
    assert results[1] == Failure("took longer than 2 s: stopped")
    assert results[3] == Failure("the decoder crashed on this file")
    assert results[5] == Failure("failed (RuntimeError)")


def test_every_worker_is_gone_when_the_caller_stops_early():
    import multiprocessing

    before = set(multiprocessing.active_children())
    results = isolated_map(read, [("hang",), ("hang",)], workers=2, seconds=60)
    results.close()  # the caller stops before any result (as an interrupted scan does)
    running = isolated_map(read, [("a",), ("b",)] * 3, workers=2, seconds=60)
    assert next(running)[1] in ("A", "B")
    running.close()
    assert set(multiprocessing.active_children()) - before == set()
