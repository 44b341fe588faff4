"""The hospital's ClientApp runtime: a study's app runs here only if it is code this hospital approved.

The code a SuperNode runs arrives from the coordinator, in the study's app bundle (FAB). A check inside
the ClientApp would arrive in the same bundle (a hostile coordinator simply leaves it out), and Flower's
own check (``flower-supernode --trusted-entities``) needs signatures that only Flower Hub supplies
(docs/deploy.md). So the check runs here, in code the hospital installed, before any file of the bundle
is installed or imported:

- ``fedrad client start`` runs the SuperNode with ``--isolation process`` (it then starts no ClientApp
  itself) and :func:`serve` next to it, in place of Flower's ``flower-superexec``: it takes each ClientApp
  task from the SuperNode's local runtime API and starts this module for it (``python -P -m client.runtime``,
  this environment's interpreter, so nothing on PATH or in the working directory stands in for it).
- That process (:func:`main`) runs Flower's own ClientApp runtime (``run_clientapp``), with one step
  added where the task's input arrives: the bundle's code digest (client/approval.py) must be one of
  the approved. Approved: the app runs as Flower would run it, from its bundle. Not approved: the refusal,
  with both digests, goes to the audit log (client/audit.py) and the server gets an error reply instead;
  nothing of the bundle was written or imported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from client.approval import fab_digest
from common.errors import FedradError

RUNTIME_MODULE = "client.runtime"


class UnapprovedApp(Exception):
    """The study's app is not code this hospital approved (its task is answered with an error)."""


def serve(node: subprocess.Popen, runtime_address: str, approved: dict[str, str], state_dir: Path,
          poll: float = 0.5) -> int:
    """Start a checked runtime (:func:`main`) for each ClientApp task of the SuperNode ``node`` (its runtime
    API at ``runtime_address``) until ``node`` exits; return its exit code. SIGTERM and SIGINT go on to
    the SuperNode; the runtimes stop with this process (Flower's parent-process monitor)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    def forward(signum: int, _frame: object) -> None:
        if node.poll() is None:
            node.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    command = [sys.executable, "-P", "-m", RUNTIME_MODULE, "--runtime-api-address", runtime_address,
               "--state", str(state_dir.resolve())]
    for digest in approved:
        command += ["--approved", digest]
    runtimes: list[subprocess.Popen] = []
    try:
        while node.poll() is None:
            runtimes = [proc for proc in runtimes if proc.poll() is None]  # reap the finished
            try:
                task = client.AcquireTask(request)
            except httpx.HTTPError:  # the SuperNode's API is not up yet, or it is stopping
                time.sleep(poll)
                continue
            if task.HasField("task") and task.token:
                runtimes.append(subprocess.Popen([*command, "--token", task.token, "--parent-pid",
                                                  str(os.getpid())]))
                continue
            time.sleep(poll)
    finally:
        client.close()
        if node.poll() is None:  # only where this loop itself failed: the SuperNode does not outlive it
            node.terminate()
        for proc in runtimes:
            if proc.poll() is None:
                proc.terminate()
        for proc in runtimes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
    return node.wait()


def verdict(fab: bytes, approved: set[str]) -> tuple[str, str]:
    """(the bundle's code digest, '' if it is approved, else why not: both digests)."""
    try:
        digest = fab_digest(fab)
    except FedradError as exc:
        return "", f"this hospital runs only approved code, and the study's app is {exc}"
    if digest in approved:
        return digest, ""
    return digest, (f"this hospital runs only approved code: the study's app has code digest {digest}, "
                    f"approved here: {', '.join(sorted(approved))}")


def _misnamed(run, fab) -> str:
    """Why the run's names for its app (hash, id, version: where Flower loads it from after installing it)
    are not this bundle's own; '' when they are. Else an approved bundle could be installed and another
    app, installed here earlier, loaded in its place."""
    from flwr.common.config import get_fab_config, get_metadata_from_config

    actual = hashlib.sha256(fab.content).hexdigest()
    try:
        own = get_metadata_from_config(get_fab_config(fab.content))
    except Exception as exc:  # whatever Flower's reader raises
        return f"this hospital runs only approved code, and the app's pyproject.toml is unreadable ({exc})"
    if actual != fab.hash_str or actual != run.fab_hash or own != (run.fab_id, run.fab_version):
        return (f"this hospital runs only approved code, and the run names its app {run.fab_id} {run.fab_version} "
                f"{run.fab_hash[:16]}, but the bundle is {own[0]} {own[1]} {actual[:16]}")
    return ""


def _forget_installed(fab: bytes) -> None:
    """Drop this process's own imports of the packages the bundle holds (client, common, ...), so the
    approved app is imported from its bundle, as Flower's runtime does, not from the installed copy
    (which differs from it where the policy approved another release)."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        tops = {name.split("/", 1)[0].removesuffix(".py") for name in bundle.namelist() if name.endswith(".py")}
    for name in [name for name in sys.modules if name.split(".", 1)[0] in tops]:
        del sys.modules[name]


def main(argv: list[str] | None = None) -> None:
    """One ClientApp task: Flower's runtime, run only for an approved app (module docstring)."""
    parser = argparse.ArgumentParser(description="fedrad's ClientApp runtime: runs approved code only")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--state", required=True, help="the node's state dir (its audit log)")
    parser.add_argument("--approved", action="append", default=[], help="an approved code digest")
    args = parser.parse_args(argv)

    from logging import ERROR, INFO

    from flwr.supercore import log
    from flwr.supernode.runtime import run_clientapp as flower

    from client.audit import AuditLog

    approved = set(args.approved)
    audit = AuditLog(args.state)
    pull, install = getattr(flower, "pull_task_input", None), getattr(flower, "install_from_fab", None)
    steps = flower.run_clientapp.__code__.co_names
    if pull is None or install is None or "pull_task_input" not in steps or "install_from_fab" not in steps:
        # Fail closed: a Flower whose runtime no longer takes these two steps is not checked here.
        raise SystemExit("fedrad: this Flower's ClientApp runtime has no pull_task_input and install_from_fab "
                         "steps to check at")
    checked: dict[str, object] = {}

    def pull_and_check(client):  # Flower's pull_task_input, then the check (nothing written or imported yet)
        message, context, run, fab = pull(client)
        digest, refusal = verdict(fab.content, approved)
        refusal = refusal or _misnamed(run, fab)
        checked.update(fab=fab.content, refusal=refusal)
        if refusal:
            audit.append("refused app", site=str(context.node_config.get("site", "")), reason=refusal,
                         run_id=run.run_id, study=str(context.run_config.get("study-id", "")),
                         digest=digest, approved=sorted(approved), fab_hash=fab.hash_str)
            log(ERROR, "fedrad: refused run %s: %s", run.run_id, refusal)
        else:
            log(INFO, "fedrad: run %s: approved code %s", run.run_id, digest)
        return message, context, run, fab

    def install_if_approved(fab: bytes, *rest, **options):  # Flower's install_from_fab, for approved code only
        # Raised here, not in pull_and_check: run_clientapp then holds the message to answer with this error.
        if checked.get("fab") != fab:
            raise UnapprovedApp("this hospital runs only approved code, and this is not the app it checked")
        if checked["refusal"]:
            raise UnapprovedApp(str(checked["refusal"]))
        _forget_installed(fab)
        return install(fab, *rest, **options)

    # run_clientapp looks both up in its module when the task starts.
    flower.pull_task_input, flower.install_from_fab = pull_and_check, install_if_approved
    log(INFO, "Start `flwr-clientapp` process (fedrad: approved code only)")
    flower.run_clientapp(runtime_api_address=args.runtime_api_address, token=args.token, insecure=True,
                         certificates=None, parent_pid=args.parent_pid, runtime_dependency_install=False)


if __name__ == "__main__":
    main()
