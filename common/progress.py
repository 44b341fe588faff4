"""Progress of long work (decoding a folder): counts and rate on stderr, so stdout stays parseable.

Library code reports through :class:`Progress` and says nothing unless the process asked for it
(:func:`report_progress`: the ``fedrad`` command does), so tests and Flower's apps stay quiet. Even then
work shorter than ``after`` seconds prints nothing; work that runs longer says what it is doing, gives
a count at most every ``every`` seconds and ends with a final line.
"""

from __future__ import annotations

import sys
import time

_settings = {"on": False, "after": 1.0, "every": 1.0}


def report_progress(on: bool = True, after: float = 1.0, every: float = 1.0) -> None:
    """Turn progress lines on (or off) for this process: for work running past ``after`` seconds
    (0: all work), a count at most every ``every`` seconds."""
    _settings.update(on=on, after=after, every=every)


class Progress:
    """Counts of one piece of work, e.g. ``decoded 1200/5216 files (310/s)``.

    ``title`` says what is being done ("decoding 5216 files of site-1 into the cache"); it opens the
    report, printed once the work has run ``after`` seconds. ``past`` is the verb of the count lines.
    Use as a context manager and call :meth:`advance` per item; the final line
    (``decoded 5216/5216 files in 16.8 s (310/s)``) follows only where the title was printed and the
    work did not fail.
    """

    def __init__(self, total: int, title: str, past: str = "decoded", unit: str = "files") -> None:
        self.total, self.title, self.past, self.unit = total, title, past, unit
        self.done = 0
        self.start = self.last = time.monotonic()
        self.shown = False
        self._tick(self.start)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.shown and exc_type is None:
            seconds = time.monotonic() - self.start
            self._say(f"{self._count()} in {seconds:.1f} s ({self._rate(seconds)})")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= _settings["every"] or not self.shown:
            self._tick(now)

    def _tick(self, now: float) -> None:
        if not _settings["on"] or now - self.start < _settings["after"]:
            return
        if not self.shown:
            self.shown = True
            self._say(f"{self.title} ...")
        if self.done:
            self._say(f"{self._count()} ({self._rate(now - self.start)})")
        self.last = now

    def _count(self) -> str:
        return f"{self.past} {self.done}/{self.total} {self.unit}"

    def _rate(self, seconds: float) -> str:
        return f"{self.done / max(seconds, 1e-9):.0f}/s"

    @staticmethod
    def _say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
