"""A whole federation on one machine through Flower's simulation engine.

The same ServerApp and ClientApp as a real deployment run here, and each
virtual hospital reads only its own share of the data. Where the hospitals'
messages run (``choose_backend``): in Ray actors, one per site when the machine
has a core per site (``plan_actors``), or, with fewer cores than sites, in this
process, one site after another (``fedrad/backend.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import ConfigError, StudyConfig
from common.data import load_images, site_folders, source_channels, source_classes
from common.errors import DataError
from fedrad.interrupt import Interrupted

if TYPE_CHECKING:  # torch: imported in the data-check thread, while Ray starts
    from server.rundir import RunDirectory


def site_count(study: StudyConfig, requested: int) -> int:
    """How many sites the data gives: one per site folder, else ``requested`` shares of one source."""
    folders = site_folders(study.data)
    if folders:
        return len(folders)
    if not Path(study.data).exists():
        raise DataError(f"data path not found: {study.data}")
    return requested


def task_of(study: StudyConfig, classes_given: bool, channels_given: bool) -> StudyConfig:
    """The study with the classes and channels its data holds, where the researcher did not name them.

    Classes: common/data.py ``source_classes`` (an .npz's class indices, named by its ``label_names``;
    labels.csv's labels, named by its ``label_name`` column; class subfolders), over every site folder of a
    natural partition together (common/labels.py ``classes_from_labels``). Channels: 3 where any site's images
    hold colour (``source_channels``), else 1. Prints what it took from the data."""
    folders = site_folders(study.data) or [Path(study.data)]
    changes: dict[str, object] = {}
    if not classes_given:
        changes["class_names"] = ",".join(source_classes(*folders))
    if not channels_given:
        changes["channels"] = max(source_channels(folder, os.cpu_count() or 1) for folder in folders)
    if not changes:
        return study
    study = study.replace(**changes)
    taken = ([f"classes {', '.join(study.classes)}"] if "class_names" in changes else []) + (
        [f"{study.channels} channel{'s' if study.channels > 1 else ''} ({'colour' if study.channels == 3 else 'grey'})"]
        if "channels" in changes else [])
    print(f"from the data: {'; '.join(taken)}", flush=True)
    return study


def check_sites(study: StudyConfig, num_sites: int) -> None:
    """Read every site's data once (into the decode cache), so bad data fails here and not in every actor,
    and make sure each site validates on enough images (common/partition.py MIN_VAL_IMAGES) to measure it."""
    from common.partition import check_site_split, parse_partition, partition_sites

    parse_partition(study.partition)  # a bad spec fails before any decoding
    folders = site_folders(study.data)
    for folder in folders:
        data = load_images(folder, study.image_size, study.channels, study.classes, study.multiframe)
        check_site_split(folder.name, data.labels, data.groups, study.val_fraction, study.seed)
    if not folders:
        data = load_images(study.data, study.image_size, study.channels, study.classes, study.multiframe)
        parts = partition_sites(data.labels, num_sites, study.partition, study.seed)  # a ConfigError if impossible
        try:
            for i, part in enumerate(parts):
                check_site_split(f"site-{i + 1}", data.labels[part], data.groups[part], study.val_fraction,
                                 study.seed)
        except ConfigError as exc:
            raise ConfigError(f"num-sites {num_sites}: {exc} (use fewer sites or more data)", "num-sites") from None


def plan_actors(num_sites: int, cpus: int) -> tuple[int, int]:
    """How many virtual hospitals train at once, and with how many torch threads each.

    With at least as many cores as sites, every site gets an actor of its own with ``cpus // sites``
    threads, all training at once. With fewer cores than sites, one actor takes all the cores and
    serves the sites one after another, as a single process would. Measured on 2 cores with 4 unequal
    sites (README "Federation overhead"): four one-thread actors sharing the cores lost a core whenever
    the largest site trained alone at the end of a round, and, as Flower hands a node's message to
    whichever actor is free, every actor imported the client and loaded every site (rounds 1-3 took
    36, 17 and 16 s instead of 22, 12 and 11 s); two actors trained two large sites back to back while
    the other sat idle.
    """
    threads = cpus if cpus < num_sites else cpus // num_sites
    return cpus // threads, threads


BACKENDS = ("auto", "ray", "inline")


def choose_backend(requested: str, num_sites: int, cpus: int) -> str:
    """``ray`` or ``inline``; ``auto`` is Ray only where its actors train sites in parallel.

    With fewer cores than sites one actor would serve all the sites in turn (``plan_actors``), which
    the inline backend does in this process without Ray's processes beside the training (README
    "Federation overhead" measures both backends against the one-process time on the default study).
    """
    if requested not in BACKENDS:
        raise ConfigError(f"backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    return "ray" if plan_actors(num_sites, cpus)[0] > 1 else "inline"


def _init_args() -> dict:
    """Ray's start: all cores, no dashboard (needs no torch, so Ray can start before torch is imported)."""
    return {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "logging_level": "ERROR"}


def _backend_config(num_sites: int) -> dict:
    """Ray resources for :func:`plan_actors`' plan on this machine."""
    import torch

    parallel, threads = plan_actors(num_sites, os.cpu_count() or 1)
    gpus = (torch.cuda.device_count() / parallel) if torch.cuda.is_available() else 0.0
    return {"client_resources": {"num_cpus": threads, "num_gpus": gpus}, "init_args": _init_args()}


def _environment(num_sites: int, verbose: bool, backend: str) -> None:
    """What the virtual hospitals read from the environment (Ray's processes copy it when Ray starts:
    set before it starts)."""
    # Virtual hospitals use exactly their CPU share; inline, one at a time, all of the cores.
    cpus = os.cpu_count() or 1
    os.environ["FEDRAD_THREADS"] = str(cpus if backend == "inline" else plan_actors(num_sites, cpus)[1])
    # Flower's own INFO lines (and its run_simulation deprecation notice) only with --verbose:
    # the progress lines and the hospitals' warnings are what a researcher reads.
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FEDRAD_LOG_LEVEL", "INFO" if verbose else "WARNING")
    # ... and this process's, should the inline backend run them here after a logger was made.
    logging.getLogger("fedrad").setLevel(os.environ["FEDRAD_LOG_LEVEL"].upper())
    # Without it each actor says "Manually terminating" at the end.
    os.environ.setdefault("FLWR_LOG_LEVEL", "INFO" if verbose else "ERROR")


def start_ray(num_sites: int, verbose: bool, meanwhile: Callable[[], None]) -> None:
    """Start Ray (Flower's simulation backend) here while a thread runs ``meanwhile`` (the data check)
    and imports the server and client apps.

    Ray's start (its GCS, raylet and agents: ~4 s on 2 cores) and the apps' imports (torch, Flower,
    Opacus: ~7 s) would otherwise follow one another, so nothing heavy is imported before Ray starts
    (``_init_args`` needs no torch). Flower's backend finds Ray running and skips its own
    ``ray.init``; this one passes what that one would (``_init_args``, the driver's ``sys.path`` as
    the workers' PYTHONPATH), but in the environment Ray's processes inherit (``_environment``), not
    in a runtime env as Flower does: the workers Ray starts beside the driver have no runtime env, so
    an actor with one needs a fresh worker process, and without one it takes a waiting worker (round 1
    ~1 s shorter, measured). Ray starts in the calling (main) thread because it ties its processes'
    lives to the thread that started them (prctl PDEATHSIG). If ``meanwhile`` fails, Ray is shut
    down and the error raised.
    """
    failed: list[BaseException] = []

    def check() -> None:
        try:
            meanwhile()
            import client.app  # noqa: F401  (what run() needs next)
            import server.app  # noqa: F401
        except BaseException as exc:  # raised again in the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=check, name="data-check")
    worker.start()
    import ray

    _environment(num_sites, verbose, "ray")
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    try:
        if not ray.is_initialized():  # as Flower's backend: an earlier study in this process may have left it
            ray.init(**_init_args())
    except Exception:  # not on Ctrl-C (a KeyboardInterrupt): fedrad/interrupt.py waits for it, for a while
        worker.join()
        raise
    worker.join()
    if failed:
        ray.shutdown()
        raise failed[0]


def run(study: StudyConfig, num_sites: int, verbose: bool = False, backend: str = "ray") -> RunDirectory:
    """Run the study with ``num_sites`` virtual hospitals on ``backend`` (``ray`` or ``inline``, as
    :func:`choose_backend` gives); return its run directory. Ray: started by :func:`start_ray`, else
    by Flower.

    Flower runs the ServerApp in a thread of its own and the engine in this one, where a signal lands
    (fedrad/interrupt.py): the engine stops, but the ServerApp would wait out its round timeout for replies
    that no longer come, and Python for it before exiting. So an interrupt here asks the study to stop
    (server/app.py StudyStop) and waits, at most STOP_WAIT_S seconds, until it has; the Interrupted raised
    then says after which round it stopped and how to resume it.
    """
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from client.memory import keep_freed_memory
    from fedrad.backend import inline_backend
    from server.app import StudyStop, make_server_app
    from server.rundir import RunDirectory

    if num_sites < study.min_nodes:
        raise ConfigError(f"{num_sites} sites are fewer than min-nodes {study.min_nodes}")
    _environment(num_sites, verbose, backend)
    keep_freed_memory()  # before Flower's engine thread, where the inline backend trains, starts
    stop = StudyStop()
    try:
        with inline_backend() if backend == "inline" else nullcontext():
            run_simulation(
                server_app=make_server_app(study.to_flat(), stop),
                client_app=client_app,
                num_supernodes=num_sites,
                backend_config=_backend_config(num_sites) if backend == "ray" else {},
                verbose_logging=verbose,
            )
    except KeyboardInterrupt as exc:
        stop.asked.set()
        if stop.running.is_set():  # else the ServerApp, if it starts, stops before it writes anything
            stop.ended.wait(STOP_WAIT_S)
        raise Interrupted(getattr(exc, "signum", signal.SIGINT), stopped_at(RunDirectory(study.out))) from None
    return RunDirectory(study.out)


# How long an interrupted simulation waits for its ServerApp to stop: it notices within a poll of the grid
# (server/app.py IN_MEMORY_POLL_S) unless it is writing a round's metrics and checkpoint.
STOP_WAIT_S = 10.0


def stopped_at(run_dir: RunDirectory) -> str:
    """Where an interrupted study stopped, and how to continue it."""
    if not run_dir.config_path.exists():
        return "before the study started (nothing to resume)"
    found = run_dir.checkpoints()
    where = f"after round {found[-1][0]}" if found else "before round 1 finished"
    return f"{where}; resume with: fedrad simulate --resume {run_dir.path}"
