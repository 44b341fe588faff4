"""One log format for fedrad's own lines, on hospitals and on the server."""

from __future__ import annotations

import logging
import os


def get_logger(name: str) -> logging.Logger:
    """A ``fedrad.*`` logger writing to stderr at ``FEDRAD_LOG_LEVEL`` (default INFO).

    Flower's and Ray's levels are left alone; ``fedrad simulate`` quietens its
    virtual hospitals to WARNING so that a researcher sees declines, not every round.
    """
    root = logging.getLogger("fedrad")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fedrad %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("FEDRAD_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        # Flower prints through its own handler, at FLWR_LOG_LEVEL. Opacus' import calls
        # logging.basicConfig, and through that root handler Flower's warnings came out a second time,
        # in another format and whatever FLWR_LOG_LEVEL says (each simulated actor's "Manually
        # terminating" at exit, in some studies: the line raced the shutdown).
        logging.getLogger("flwr").propagate = False
    return logging.getLogger(name)
