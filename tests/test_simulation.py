"""How a simulation spreads virtual hospitals over the machine's cores, and starts Ray."""

import os
import threading

import pytest

from common.errors import DataError
from fedrad.simulation import plan_actors, start_ray


@pytest.mark.parametrize(("sites", "cpus", "plan"), [
    (4, 2, (1, 2)),    # fewer cores than sites: one actor on all cores, sites in turn
    (4, 3, (1, 3)),
    (2, 2, (2, 1)),    # a core per site, all at once
    (4, 16, (4, 4)),   # spare cores become threads
    (3, 8, (4, 2)),    # ... never more threads than the cores allow (3 x 2 <= 8; the 4th actor idles)
    (1, 1, (1, 1)),
])
def test_every_core_used_and_none_oversubscribed(sites, cpus, plan):
    parallel, threads = plan_actors(sites, cpus)
    assert (parallel, threads) == plan
    assert parallel * threads <= cpus and threads >= 1


def test_ray_starts_beside_the_data_check_and_stops_when_the_check_fails():
    """The data check runs in another thread while Ray starts; bad data still ends with its own error, and
    the Ray started for it is shut down (the next study in this process starts a fresh one)."""
    import ray

    seen: list[str] = []

    def bad_data() -> None:
        seen.append(threading.current_thread().name)
        raise DataError("site-2: no readable images")

    saved = dict(os.environ)  # start_ray sets what Ray's processes inherit
    try:
        with pytest.raises(DataError, match="no readable images"):
            start_ray(2, False, bad_data)
        assert seen and seen[0] != threading.main_thread().name
        assert not ray.is_initialized()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_the_apps_import_without_opacus():
    """The driver imports both apps while Ray starts (both compete for the cores); Opacus (~3 s) waits
    until a hospital first accounts or samples."""
    import subprocess
    import sys

    code = "import sys, client.app, server.app; print(sorted(m for m in sys.modules if m.startswith('opacus')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_flower_warnings_follow_flwr_log_level_after_opacus_is_imported():
    """Opacus' import installs a root log handler (logging.basicConfig); Flower's warnings must still obey
    FLWR_LOG_LEVEL (each simulated actor's "Manually terminating" at exit came through it)."""
    import os
    import subprocess
    import sys

    code = ("import logging, client.app, opacus; from flwr.supercore.logger import log; "
            "log(logging.WARNING, 'Manually terminating ClientAppActor')")
    env = {**os.environ, "FLWR_LOG_LEVEL": "ERROR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                          env=env)
    assert "Manually terminating" not in done.stdout + done.stderr
