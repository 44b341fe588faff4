"""Real Flower processes on 127.0.0.1 for the deployment tests: start, watch, kill (descendants too).

Every wait is bounded; everything a test starts is killed at its end (the ``procs`` fixture in
conftest.py), whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedrad(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad", *args], capture_output=True, text=True, timeout=timeout)


def descendants(root: int) -> set[int]:
    """All processes below ``root`` (from /proc), so none outlives the test."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {root}
    while frontier:
        children = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= children
        frontier = children
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Processes:
    """Started in their own process groups; all killed at the end, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> set[int]:
        """SIGKILL ``proc``, its group and every descendant (a crash: nothing gets to sign off);
        return the pids killed, all gone when this returns."""
        return self._kill([proc])

    def stop(self) -> None:
        self._kill(self.procs)

    @staticmethod
    def _kill(procs: list[subprocess.Popen]) -> set[int]:
        # Flower's helpers (flower-superexec) start their own process groups: find every descendant first,
        # then kill everything at once (no pid is signalled after it could have been reused).
        doomed = {pid for proc in procs for pid in descendants(proc.pid)}
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + 10
        while any(alive(pid) for pid in doomed) and time.time() < deadline:
            time.sleep(0.1)
        return doomed | {proc.pid for proc in procs}


def wait_for(log: Path, text: str, seconds: float, count: int = 1, interval: float = 0.5) -> bool:
    """Wait until ``text`` occurs ``count`` times in ``log`` (at most ``seconds``)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if log.exists() and log.read_text(errors="replace").count(text) >= count:
            return True
        time.sleep(interval)
    return False


def wait_until(check, seconds: float, interval: float = 0.2):
    """Poll ``check()`` until it returns something truthy (returned), at most ``seconds`` (then None)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    return None


def jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file that may be being written."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class Federation:
    """A study CA, a TLS SuperLink with hospital authentication and registered hospitals, as processes.

    The SuperLink listens on 127.0.0.1:``port``, where the coordinator registers hospitals and submits
    studies. With ``door`` the hospitals connect through the front door (nginx) on ``door_port``;
    without it (``--no-front-door``) straight to the SuperLink."""

    def __init__(self, procs: Processes, root: Path, sites: list[str], door: bool = False) -> None:
        self.procs, self.root = procs, root
        self.certs = root / "certs"
        self.port = free_port()
        self.door_port = free_port() if door else None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.restarts: dict[str, int] = {}
        assert fedrad("certs", "init", "--out", str(self.certs), "--server-name", "localhost,127.0.0.1").returncode == 0
        for site in sites:
            assert fedrad("certs", "node", "--out", str(self.certs), "--site", site).returncode == 0
        self.link_starts = 0
        self.home = root / "flwr"
        self.home.mkdir()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "study"\n\n[superlink.study]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')

    @property
    def control(self) -> str:
        """The SuperLink's own address (Control: registration, study submission)."""
        return f"127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """Where hospitals connect: the door, or the SuperLink itself without one."""
        return f"127.0.0.1:{self.door_port or self.port}"

    def start_superlink(self) -> Path:
        """Start (or restart, with the same --state database) the SuperLink; wait until it serves."""
        self.link_starts += 1
        log = self.root / f"superlink-{self.link_starts}.log"
        door = (["--host", "127.0.0.1", "--port", str(self.door_port)] if self.door_port
                else ["--no-front-door"])
        self.link = self.procs.start([sys.executable, "-m", "fedrad", "server", "start", "--certs", str(self.certs),
                                      "--state", str(self.root / "link"), "--control-port", str(self.port),
                                      *door], log)
        assert wait_for(log, "Application startup complete", 60), log.read_text()
        return log

    def register(self, site: str) -> None:
        """The coordinator registers a hospital's public key (Flower's CLI, pointed at this SuperLink)."""
        registered = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(self.certs / f"{site}.pub"),
                                     "study"], capture_output=True, text=True, timeout=60,
                                    env={**os.environ, **QUIET, "FLWR_HOME": str(self.home)})
        assert "registered successfully" in registered.stdout, registered.stdout + registered.stderr

    def start_node(self, site: str, data: Path, seconds: float = 120) -> Path:
        """Start a hospital's SuperNode (same key, same state dir on every restart) and wait until it is
        connected. A node that crashed stays 'online' at the SuperLink until its heartbeat lapses, and
        Flower refuses to activate it again until then: retry, as systemd's Restart=on-failure would."""
        deadline = time.time() + seconds
        while True:
            self.restarts[site] = self.restarts.get(site, -1) + 1
            log = self.root / f"{site}-{self.restarts[site]}.log"
            proc = self.procs.start([sys.executable, "-m", "fedrad", "client", "start", "--server", self.address,
                                     "--ca", str(self.certs / "ca.crt"), "--key", str(self.certs / f"{site}.key"),
                                     "--site", site, "--data", str(data), "--state", str(self.state(site)),
                                     "--port", str(free_port())], log)
            self.nodes[site], self.logs[site] = proc, log
            def connected(log: Path = log) -> str | None:
                text = log.read_text(errors="replace")
                return next((word for word in ("SuperNode ID", "Failed to activate") if word in text), None)

            outcome = wait_until(connected, max(1.0, deadline - time.time()))
            if outcome == "SuperNode ID":
                return log
            assert outcome and time.time() < deadline - 5, f"{site} did not connect:\n{log.read_text()}"
            self.procs.kill(proc)
            time.sleep(2)

    def node_id(self, site: str, restart: int | None = None) -> str:
        log = self.root / f"{site}-{self.restarts[site] if restart is None else restart}.log"
        return log.read_text().split("SuperNode ID: ", 1)[1].split()[0]

    def state(self, site: str) -> Path:
        return self.root / site

    def run_study(self, *args: str) -> subprocess.Popen:
        """``fedrad server run`` in the background (its output in ``server-run-N.log``)."""
        n = len(list(self.root.glob("server-run-*.log"))) + 1
        return self.procs.start([sys.executable, "-m", "fedrad", "server", "run", "--server", self.control,
                                 "--certs", str(self.certs), *args], self.root / f"server-run-{n}.log")
