"""``fedrad server start`` and ``fedrad client start``: Flower's SuperLink and SuperNode, set up for a study.

Thin wrappers (the process is replaced by Flower's own): TLS from ``fedrad certs``, hospital
(SuperNode) authentication on, state in a database file, runtime dependency installation,
telemetry and update checks off. Plain text only with ``--insecure``, which warns.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from common.errors import FedradError

QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
         "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def _need(path: Path, what: str) -> str:
    if not path.is_file():
        raise FedradError(f"{what} not found: {path}")
    return str(path)


def _flower(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(found).exists():
        raise FedradError(f"{name} not found (is fedrad installed in this environment?)")
    return found


def superlink_command(certs: Path | None, state: Path, host: str, port: int) -> list[str]:
    state.mkdir(parents=True, exist_ok=True)
    cmd = [_flower("flower-superlink"), "--host", host, "--port", str(port), "--database",
           str(state / "superlink.db"), "--disable-runtime-dependency-installation"]
    if certs is None:
        return cmd + ["--insecure"]
    return cmd + ["--ssl-ca-certfile", _need(certs / "ca.crt", "study CA certificate"),
                  "--ssl-certfile", _need(certs / "server.crt", "server certificate"),
                  "--ssl-keyfile", _need(certs / "server.key", "server key"), "--enable-supernode-auth"]


def supernode_command(server: str, ca: Path | None, key: Path | None, site: str, data: Path, state: Path,
                      max_epsilon: float, port: int) -> list[str]:
    if not data.exists():
        raise FedradError(f"data not found: {data}")
    state.mkdir(parents=True, exist_ok=True)
    config = f"data='{data.resolve()}' site='{site}' state-dir='{state.resolve()}'"
    if max_epsilon > 0:
        config += f" max-epsilon={max_epsilon}"
    cmd = [_flower("flower-supernode"), "--superlink", server, "--node-config", config, "--port", str(port)]
    if ca is None:
        return cmd + ["--insecure"]
    if key is None:
        raise FedradError("--key (the hospital's private key from 'fedrad certs node') is required with TLS")
    return cmd + ["--root-certificates", _need(ca, "study CA certificate"),
                  "--auth-supernode-private-key", _need(key, "hospital private key")]


def run(cmd: list[str], insecure: bool) -> int:
    """Replace this process with Flower's (signals and exit codes pass straight through)."""
    if insecure:
        print("fedrad: WARNING: --insecure: plain text, no TLS and no hospital authentication; "
              "use only on a private test network", file=sys.stderr, flush=True)
    os.environ.update(QUIET)
    # Flower starts helpers (flower-superexec, flwr-clientapp) by name: make this environment's own win,
    # also when fedrad is run as .venv/bin/fedrad without activating the venv.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.execv(cmd[0], cmd)
    return 1  # not reached
