"""One log format for fedrad's own lines, on hospitals and on the server."""

from __future__ import annotations

import logging
import os


def get_logger(name: str) -> logging.Logger:
    """A ``fedrad.*`` logger writing to stderr at ``FEDRAD_LOG_LEVEL`` (default INFO).

    Flower's and Ray's loggers are left alone; ``fedrad simulate`` quietens its
    virtual hospitals to WARNING so that a researcher sees declines, not every round.
    """
    root = logging.getLogger("fedrad")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fedrad %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("FEDRAD_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
