"""``fedrad server start`` and ``fedrad client start``: Flower's SuperLink and SuperNode, set up for a study.

Thin wrappers: TLS from ``fedrad certs``, hospital (SuperNode) authentication on, state in a database
file, runtime dependency installation, telemetry and update checks off. Plain text only with
``--insecure``, which warns. The client runs the SuperNode with fedrad's ClientApp runtime beside it,
which runs a study's app only if it is code the hospital approved (client/runtime.py); the server runs the
SuperLink on 127.0.0.1 with the hospitals' front door (nginx) beside it, fedrad/front_door.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from common.config import StudyConfig
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
    """Flower's SuperLink on ``host:port`` (``fedrad server start`` gives 127.0.0.1: the hospitals' door,
    fedrad/front_door.py, is in front of it), its database in ``state``; paths absolute, as the SuperLink
    hands them on to the processes it starts."""
    state = state.resolve()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    cmd = [_flower("flower-superlink"), "--host", host, "--port", str(port), "--database",
           str(state / "superlink.db"), "--disable-runtime-dependency-installation"]
    if certs is None:
        return cmd + ["--insecure"]
    certs = certs.resolve()
    return cmd + ["--ssl-ca-certfile", _need(certs / "ca.crt", "study CA certificate"),
                  "--ssl-certfile", _need(certs / "server.crt", "server certificate"),
                  "--ssl-keyfile", _need(certs / "server.key", "server key"), "--enable-supernode-auth"]


def supernode_command(server: str, ca: Path | None, key: Path | None, site: str, data: Path, state: Path,
                      max_epsilon: float, port: int, policy: Path | None = None) -> list[str]:
    if not data.exists():
        raise FedradError(f"data not found: {data}")
    state.mkdir(parents=True, exist_ok=True)
    config = f"data='{data.resolve()}' site='{site}' state-dir='{state.resolve()}'"
    if max_epsilon > 0:
        config += f" max-epsilon={max_epsilon}"
    if policy is not None:
        config += f" policy='{policy.resolve()}'"
    # --isolation process: the SuperNode starts no ClientApp itself; client/runtime.py serves its tasks
    # (on its runtime API, this machine only) and runs only approved code.
    cmd = [_flower("flower-supernode"), "--superlink", server, "--node-config", config, "--isolation", "process",
           "--host", "127.0.0.1", "--port", str(port)]
    if ca is None:
        return cmd + ["--insecure"]
    if key is None:
        raise FedradError("--key (the hospital's private key from 'fedrad certs node') is required with TLS")
    return cmd + ["--root-certificates", _need(ca, "study CA certificate"),
                  "--auth-supernode-private-key", _need(key, "hospital private key")]


def start(cmd: list[str], insecure: bool) -> subprocess.Popen:
    """Start Flower's process as a child (its output is this process's), for a caller that serves beside it
    (``fedrad client start``: client/runtime.py)."""
    if insecure:
        print("fedrad: WARNING: --insecure: plain text, no TLS and no hospital authentication; "
              "use only on a private test network", file=sys.stderr, flush=True)
    os.environ.update(QUIET)  # for the SuperNode and the runtimes client/runtime.py starts (with this interpreter)
    return subprocess.Popen(cmd)


def app_dir() -> Path:
    """The fedrad checkout whose pyproject.toml is the Flower app that ``flwr run`` packages."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FedradError("submitting a study needs a fedrad source checkout (pyproject.toml is the Flower app)")
    return root


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def read_study(config: Path, out: str) -> dict[str, object]:
    """A new study from its TOML, checked (every key known, every value valid), with ``out`` filled in."""
    try:
        flat = tomllib.loads(Path(_need(config, "study config")).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FedradError(f"{config}: not valid TOML ({exc})") from None
    known = set(StudyConfig().to_flat())
    unknown = sorted(set(flat) - known)
    if unknown:
        raise FedradError(f"{config}: unknown study keys {', '.join(unknown)} (see [tool.flwr.app.config])")
    if out:
        flat["out"] = out
    study = StudyConfig.from_flat(flat)  # every value checked here, before anything is submitted
    if study.out and not study.resume and (Path(study.out) / "config.json").exists():
        # Its checkpoints and metrics belong to that study: never start another one over them.
        raise FedradError(f"{study.out} already holds a study; continue it with --resume {study.out}, "
                          "or choose another --out")
    return flat


def resume_study(run_dir: Path) -> dict[str, object]:
    """The study saved in a run directory (by its first submission), marked to resume from its last checkpoint,
    once the run directory passes the checks the server will make (RunDirectory.resume_point: not finished,
    no checkpoint or metrics of another study), so a refusal comes here, before anything is submitted."""
    from server.rundir import RunDirectory

    folder = RunDirectory(run_dir)
    if not folder.config_path.is_file():
        raise FedradError(f"cannot resume: {folder.config_path} not found (give the run directory of a submitted "
                          "study, on the machine where the server writes it)")
    study = folder.saved_study()
    if not study.study_id:
        raise FedradError(f"cannot resume: {folder.config_path} has no study id")
    study = study.replace(resume=True, out=str(folder.path))
    folder.resume_point(study)
    return {**study.to_flat()}


def study_command(server: str, certs: Path | None, flat: dict[str, object], flwr_home: Path) -> list[str]:
    """Write the connection and the (checked) study into a private FLWR_HOME; return the
    ``flwr run`` command that submits it."""
    connection = f'address = "{server}"\n'
    if certs is None:
        connection += "insecure = true\n"
    else:
        connection += f'root-certificates = "{_need(certs.resolve() / "ca.crt", "study CA certificate")}"\n'
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "study"\n\n[superlink.study]\n{connection}')
    study_file = flwr_home / "study.toml"
    study_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in flat.items()))
    return [_flower("flwr"), "run", str(app_dir()), "study", "--stream", "--run-config", str(study_file)]
