"""Ctrl-C and SIGTERM: one signal ends a ``fedrad`` command within seconds, its run directory consistent.

The first SIGINT or SIGTERM raises :class:`Interrupted` (a KeyboardInterrupt) in the main thread. A
simulation then asks its study to stop between steps and waits for the server thread that writes the run
directory (fedrad/simulation.py, server/app.py StudyStop); the command prints one line,
``fedrad: interrupted ...``, and exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).
Threads still busy then are given LINGER_S seconds: Flower's engine thread may be training a hospital
whose update no round will aggregate, and Python would wait for it before exiting. After that the
process ends without waiting (os._exit): every file fedrad writes is written whole or not at all
(common/atomic.py). A second signal ends the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
LINGER_S = 3.0
_seen: list[int] = []


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM; ``detail`` says where the work stopped and how to continue it."""

    def __init__(self, signum: int = signal.SIGINT, detail: str = "") -> None:
        super().__init__(detail)
        self.signum, self.detail = signum, detail


def _on_signal(signum: int, frame: object) -> None:
    if _seen:  # the second: out now
        print("fedrad: interrupted again: exiting now", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    _seen.append(signum)
    raise Interrupted(signum)


def catch_signals() -> None:
    """From now on SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (only there can
    Python handle signals; elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _on_signal)


def interrupted(exc: KeyboardInterrupt) -> int:
    """Say on one line that the command was interrupted (and where, from ``exc.detail``); return the exit
    status, 128 + the signal's number, once the other threads have ended: at most LINGER_S seconds later,
    when the process exits at once if some have not."""
    signum = getattr(exc, "signum", signal.SIGINT)
    detail = getattr(exc, "detail", "")
    print(f"fedrad: interrupted{' ' + detail if detail else ''}", file=sys.stderr, flush=True)
    status = 128 + signum
    deadline = time.monotonic() + LINGER_S
    while _running() and time.monotonic() < deadline:
        time.sleep(0.05)
    if _running():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _running() -> list[threading.Thread]:
    """The other non-daemon threads that still run, by ``threading.enumerate()``, not ``is_alive()``: a join
    that the signal interrupted (the engine's, waiting for its workers) marks the joined thread as stopped
    while it runs on (CPython 3.11, the fix of bpo-45274), so Python would not wait for it but finalize
    under it, and a thread training in torch then aborts the process ("terminate called without an active
    exception")."""
    me = threading.current_thread()
    return [t for t in threading.enumerate() if t is not me and not t.daemon]
