"""The hospitals' front door: nginx in front of the SuperLink, and ``fedrad server start`` running both.

Flower's SuperLink serves its Fleet API (what SuperNodes call), its Control API (register nodes, submit
and list runs) and its Runtime API (what the ServerApp calls) on one HTTP port, and open-source Flower
has no account authentication on Control: anyone who can reach that port and holds the study's
``ca.crt`` (every hospital does) could register a node, submit a run or list every run. So the
SuperLink listens on 127.0.0.1 only, and hospitals reach it through nginx, which terminates TLS with
the study's server certificate and forwards the Fleet routes (``/v1/fleet/NAME``) and ``/health``
alone; every other path is refused with 403 at the door. The coordinator administers the SuperLink
from the server machine (or through an SSH tunnel to its 127.0.0.1 port).

The SuperLink behind the door keeps TLS (Flower refuses hospital authentication without it); the door
verifies it against the study CA as ``localhost``, a name ``fedrad certs init`` always puts in the
server certificate. Behind the door every request arrives from 127.0.0.1; hospitals still authenticate
by signing each Fleet request with their registered key, which nginx forwards untouched.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.errors import FedradError

INSTALL_HINT = "apt-get install nginx-light"
# Debian puts nginx in /usr/sbin, which is not on a non-root user's PATH.
SBIN_DIRS: tuple[str, ...] = ("/usr/sbin", "/sbin")
LOOPBACK = "127.0.0.1"
LOOPBACK_NAME = "localhost"  # the name the door checks the SuperLink's certificate for
FLEET_PATH = r"^/v1/fleet/[a-z-]+$"  # every Fleet route of Flower's SuperLink: /v1/fleet/register-node, ...
MAX_BODY = "1g"  # a model update travels in one request; far above fedrad's largest model
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # nginx's temporary folders, all in the state dir


def nginx_binary() -> str:
    """The nginx executable, or a one-line error saying how to install it."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    found = shutil.which("nginx", path=search)
    if found is None:
        raise FedradError(f"nginx not found: the hospitals' front door needs it ({INSTALL_HINT}), or give "
                          "--no-front-door to serve this machine only")
    return found


def check_loopback_names(server_crt: Path) -> None:
    """The server certificate must name 127.0.0.1 (the SuperLink's own ServerApp and ``fedrad server run``
    dial it there) and localhost (the door checks it by that name)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(server_crt.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise FedradError(f"{server_crt}: not a server certificate from 'fedrad certs init' ({exc})") from None
    if (ipaddress.ip_address(LOOPBACK) not in san.get_values_for_type(x509.IPAddress)
            or LOOPBACK_NAME not in san.get_values_for_type(x509.DNSName)):
        raise FedradError(f"{server_crt} does not name {LOOPBACK_NAME} and {LOOPBACK}, where the SuperLink listens "
                          "behind the door: make the study's certificates again with 'fedrad certs init' "
                          "(it adds both)")


def nginx_config(door_dir: Path, certs: Path | None, host: str, port: int, link_port: int) -> str:
    """nginx.conf for the door: ``host:port`` for hospitals, forwarding Fleet and /health to the
    SuperLink on 127.0.0.1:``link_port``. ``certs`` None: plain text on both sides (test networks)."""
    door = door_dir.resolve()
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    scheme = "http" if certs is None else "https"
    if certs is None:
        tls = ""
    else:
        certs = certs.resolve()
        tls = f"""
        ssl_certificate {certs / "server.crt"};
        ssl_certificate_key {certs / "server.key"};
        ssl_protocols TLSv1.2 TLSv1.3;"""
    upstream_tls = "" if certs is None else f"""
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {certs / "ca.crt"};
    proxy_ssl_name {LOOPBACK_NAME};
    proxy_ssl_server_name on;"""
    temp = "\n".join(f"    {kind}_temp_path {door / 'tmp' / kind};"
                     for kind in TEMP_KINDS)
    return f"""# Written by `fedrad server start` (fedrad/front_door.py) on every start: edits here are overwritten.
# The hospitals' door to the SuperLink: Fleet routes and /health only; Control and Runtime stay on
# {LOOPBACK}:{link_port}, for the coordinator on this machine.
daemon off;
worker_processes 1;
pid {door / "nginx.pid"};
error_log stderr warn;
events {{
    worker_connections 1024;
}}
http {{
    server_tokens off;
    access_log {door / "access.log"};
{temp}
    client_max_body_size {MAX_BODY};
    # Requests and replies stream through (no temporary files).
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";  # keep connections to the SuperLink open (one TLS handshake, not one a request)
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;{upstream_tls}
    upstream superlink {{
        server {LOOPBACK}:{link_port};
        keepalive 8;
    }}
    server {{
        listen {listen}{"" if certs is None else " ssl"};{tls}
        default_type text/plain;
        location / {{
            return 403 "fedrad: only the Fleet API is served here\\n";
        }}
        location ~ {FLEET_PATH} {{
            # The path as sent (not nginx's normalised one) is what the SuperLink routes on.
            if ($request_uri !~ "{FLEET_PATH}") {{
                return 403 "fedrad: only the Fleet API is served here\\n";
            }}
            proxy_pass {scheme}://superlink;
        }}
        location = /health {{
            if ($request_uri != "/health") {{
                return 403 "fedrad: only the Fleet API is served here\\n";
            }}
            proxy_pass {scheme}://superlink;
        }}
    }}
}}
"""


def door_command(state: Path, certs: Path | None, host: str, port: int, link_port: int) -> list[str]:
    """Write the door's config into ``STATE/front-door/`` (mode 0600) and return the nginx command."""
    nginx = nginx_binary()
    door_dir = state / "front-door"
    for folder in (door_dir, door_dir / "tmp", *(door_dir / "tmp" / kind for kind in TEMP_KINDS)):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = door_dir / "nginx.conf"
    config.write_text(nginx_config(door_dir, certs, host, port, link_port))
    config.chmod(0o600)
    return [nginx, "-c", str(config.resolve()), "-p", str(door_dir.resolve()), "-e", "stderr"]


def private_files(state: Path) -> None:
    """The state dir 0700 and the SuperLink's database and the door's logs in it 0600, also ones an
    earlier start left more open; new ones are created private by the umask ``serve`` sets."""
    state.chmod(0o700)
    for pattern in ("superlink.db*", "front-door/*.log", "front-door/nginx.conf"):
        for path in state.glob(pattern):
            path.chmod(0o600)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: if fedrad is killed, its children go too


def serve(processes: dict[str, list[str]], env: dict[str, str]) -> int:
    """Run ``processes`` (name -> command: the SuperLink, and the door) as children until one exits or
    fedrad is told to stop (SIGTERM, SIGINT, SIGHUP); then stop the others. Returns the exit code: 0 after
    a stop signal, else the code of the process that ended first (1 if it ended with 0)."""
    os.umask(0o077)
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    running: dict[str, subprocess.Popen] = {}
    ended, code = "", 0
    try:
        for name, cmd in processes.items():
            running[name] = subprocess.Popen(cmd, env=env, preexec_fn=preexec)  # preexec: prctl only
        while not stop:
            ended = next((name for name, proc in running.items() if proc.poll() is not None), "")
            if ended:
                code = running[ended].returncode or 1
                print(f"fedrad: {ended} exited with code {running[ended].returncode}; stopping the rest",
                      file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.time() + 15
        for proc in running.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return code
