"""One file at a time in worker processes, each bounded in time: no file can stop a scan.

A reader can fail on one file in ways no ``except`` catches: a decoder that loops forever, a C decoder
that crashes the process (a segmentation fault), a Rust decoder that prints its panic. ``isolated_map``
runs ``fn(*args)`` for each item in worker processes and yields ``(index, result)`` as results come;
an item whose worker dies, or that takes longer than ``seconds``, yields ``(index, Failure(reason))``:
that worker is killed and replaced and the other items go on. Workers are forked from a forkserver that
has already imported ``fn``'s module, so a replacement starts in milliseconds, and none inherits the
caller's threads (Ray's, torch's, the simulation's).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass(frozen=True)
class Failure:
    """Why an item gave no result: its worker crashed or ran out of time."""

    reason: str


def _serve(conn: Connection, fn: Callable[..., Any]) -> None:
    """A worker: call ``fn`` for each (index, args) received until None; a decoder's own stderr (a Rust panic's
    backtrace) is dropped, the item's outcome is what it returns."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    while True:
        try:
            job = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if job is None:
            return
        index, args = job
        try:
            result: Any = fn(*args)
        except (KeyboardInterrupt, SystemExit):
            return
        except BaseException as exc:  # fn's own contract is to return; report, don't die
            result = Failure(f"failed ({type(exc).__name__})")
        conn.send((index, result))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    index: int = -1  # the item it works on, -1 when idle
    started: float = 0.0

    def stop(self, kill: bool) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                self.process.kill()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _context(fn: Callable[..., Any]) -> Any:
    ctx = multiprocessing.get_context("forkserver")
    module = getattr(fn, "__module__", "")
    if module and module != "__main__":
        ctx.set_forkserver_preload([module])
    return ctx


def isolated_map(fn: Callable[..., Any], items: Sequence[tuple], workers: int, seconds: float
                 ) -> Iterator[tuple[int, Any]]:
    """``(index, fn(*items[index]))`` for every item, in the order they finish, on ``workers`` processes.

    ``fn`` must be a module-level function (it is sent to the workers by name). An item that outlives
    ``seconds`` or kills its worker gives ``Failure``; the generator always ends with every worker gone.
    """
    ctx = _context(fn)
    pending = deque(enumerate(items))
    pool: list[_Worker] = []

    def spawn() -> _Worker:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child, fn), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    try:
        pool = [spawn() for _ in range(max(1, min(workers, len(items))))]
        while pending or any(w.index >= 0 for w in pool):
            for worker in pool:
                if worker.index < 0 and pending:
                    worker.index, args = pending.popleft()
                    worker.started = time.monotonic()
                    worker.conn.send((worker.index, args))
            busy = [w for w in pool if w.index >= 0]
            deadline = min(w.started for w in busy) + seconds
            ready = wait([w.conn for w in busy], timeout=max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            for worker in busy:
                failure = None
                if worker.conn in ready:
                    try:
                        index, result = worker.conn.recv()
                    except (EOFError, OSError):
                        failure = Failure("the decoder crashed on this file")
                    else:
                        worker.index = -1
                        yield index, result
                        continue
                elif now - worker.started >= seconds:
                    failure = Failure(f"took longer than {seconds:g} s: stopped")
                if failure is not None:
                    index, worker.index = worker.index, -1
                    worker.stop(kill=True)
                    pool[pool.index(worker)] = spawn()
                    yield index, failure
    finally:
        for worker in pool:
            worker.stop(kill=worker.index >= 0)
