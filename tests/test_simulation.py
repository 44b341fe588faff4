"""How a simulation spreads virtual hospitals over the machine's cores, and starts Ray."""

import os
import threading
import time

import pytest
from flwr.app import Context, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException

from common.config import ConfigError, StudyConfig
from common.errors import DataError
from fedrad.backend import InlineBackend
from fedrad.simulation import choose_backend, plan_actors, start_ray


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


@pytest.mark.parametrize(("requested", "sites", "cpus", "backend"), [
    ("auto", 4, 2, "inline"),  # one actor would serve every site in turn: no Ray
    ("auto", 3, 2, "inline"),
    ("auto", 2, 2, "ray"),     # a core per site: Ray's actors train them at once
    ("auto", 4, 16, "ray"),
    ("ray", 4, 2, "ray"),
    ("inline", 4, 16, "inline"),
])
def test_auto_runs_ray_only_where_its_actors_train_sites_in_parallel(requested, sites, cpus, backend):
    assert choose_backend(requested, sites, cpus) == backend


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="backend 'dask'"):
        choose_backend("dask", 4, 2)


def _message(node_id: int) -> tuple[Message, Context]:
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=0, dst_node_id=node_id,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=60, message_type="train")
    msg = Message(RecordDict(), metadata=metadata)  # as the engine hands it over (its ids set by the SuperLink)
    return msg, Context(run_id=1, node_id=node_id, node_config={"partition-id": 0}, state=RecordDict(),
                        run_config={})


def test_inline_backend_runs_the_clientapp_and_turns_its_failure_into_a_clientapp_exception():
    """As a Ray actor does: the reply comes back with the node's context; an exception in the hospital's
    code becomes ClientAppException, which Flower's engine answers with an error reply (the round goes on)."""
    app = ClientApp()
    seen: list[int] = []

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen.append(context.node_id)
        if context.node_id == 2:
            raise ValueError("site-2: disk full")
        return Message(RecordDict({"m": MetricRecord({"n": 1})}), reply_to=msg)

    backend = InlineBackend({})
    backend.build(lambda: app)
    assert backend.num_workers == 1 and backend.is_worker_idle()
    reply, context = backend.process_message(*_message(1))
    assert reply.content["m"]["n"] == 1 and context.node_id == 1
    with pytest.raises(ClientAppException, match="disk full"):
        backend.process_message(*_message(2))
    assert seen == [1, 2]


def test_a_study_on_the_inline_backend_never_starts_ray(demo_sites, tmp_path):
    """The whole study through Flower's engine with the hospitals in this process; Flower's own Ray
    backend is back in place afterwards."""
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedrad import simulation

    study = StudyConfig(num_rounds=2, image_size=32, batch_size=16, epsilon=8.0, seed=3, num_sites=2,
                        out=str(tmp_path / "run"), data=str(demo_sites[0].parent))
    saved = dict(os.environ)  # run() sets what the hospitals read from the environment
    try:
        run_dir = simulation.run(study, 2, backend="inline")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert not ray.is_initialized()
    assert raybackend.RayBackend is not InlineBackend
    rows = run_dir.rounds()
    assert [r["round"] for r in rows] == [1, 2]
    assert sorted(s["site"] for s in rows[-1]["sites"]) == ["hospital-1", "hospital-2"]
    assert run_dir.model_path.exists()
