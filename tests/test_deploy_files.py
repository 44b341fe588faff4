"""deploy/ checked statically (no Docker engine here): files parse, referenced files exist, commands are valid."""

import shlex
from pathlib import Path

import pytest
import yaml

from fedrad.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def fedrad_args_ok(args: list[str]) -> None:
    """The arguments parse with the real `fedrad` parser (argparse exits on any error)."""
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"fedrad {' '.join(args)}: invalid ({exc})")


def dockerfile(path: Path) -> dict:
    lines = [line.strip() for line in path.read_text().replace("\\\n", " ").splitlines()
             if line.strip() and not line.startswith("#")]
    parsed: dict = {"COPY": [], "RUN": []}
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction in ("COPY", "RUN"):
            parsed[instruction].append(rest.split()[:-1] if instruction == "COPY" else rest)
        elif instruction in ("ENTRYPOINT", "CMD", "FROM", "EXPOSE", "USER"):
            parsed[instruction] = yaml.safe_load(rest) if rest.startswith("[") else rest
    return parsed


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.client", "Dockerfile.client-cuda"])
def test_dockerfiles_copy_what_exists_and_run_fedrad(name):
    parsed = dockerfile(DEPLOY / name)
    assert parsed["FROM"].startswith("python:3.11")
    for sources in parsed["COPY"]:
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
    assert parsed["ENTRYPOINT"][0] == "fedrad"
    if "CMD" in parsed:
        fedrad_args_ok(parsed["ENTRYPOINT"][1:] + parsed["CMD"])
    assert parsed.get("USER") not in (None, "root", "0"), f"{name} runs as root"


def test_every_image_holds_the_same_fedrad_installed_the_same_way():
    """The study's app is built from the server image's checkout; a hospital image runs it only if its own
    checkout has the same code digest (client/approval.py): same files, same editable install."""
    images = [dockerfile(DEPLOY / name) for name in ("Dockerfile.server", "Dockerfile.client",
                                                    "Dockerfile.client-cuda")]
    checkout = [[c for c in image["COPY"] if c[0] != "deploy/register.sh"] for image in images]
    assert checkout[0] == checkout[1] == checkout[2] and [".gitignore"] in [c[-1:] for c in checkout[0]]
    for image in images:
        assert "pip install --no-cache-dir -e ." in image["RUN"]


def test_compose_topology_is_one_server_behind_its_door_and_two_tls_hospitals():
    services = COMPOSE["services"]
    assert {"server", "hospital-a", "hospital-b"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            # data/ is each hospital's own and studies/ the coordinator's: not part of the repository
            if source.startswith("./") and not source.startswith(("./data/", "./studies")):
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
    image_entry = {n: dockerfile(DEPLOY / s["build"]["dockerfile"].split("/")[-1])["ENTRYPOINT"][1:]
                   for n, s in services.items()}
    server = image_entry["server"] + services["server"]["command"]
    fedrad_args_ok(server)
    assert "--no-front-door" not in server and "--insecure" not in server
    assert services["server"]["ports"] == ["8000:8000"]  # the door; the SuperLink stays inside
    for hospital in ("hospital-a", "hospital-b"):
        args = services[hospital]["command"]
        fedrad_args_ok(image_entry[hospital] + args)
        assert "--insecure" not in args and "--ca" in args and "--key" in args
        assert args[args.index("--server") + 1] == "server:8000"
        # a hospital gets the handed-out ca.crt and its own key, never the CA's or the server's keys
        mounted = {v.split(":")[0] for v in services[hospital]["volumes"]}
        assert "certs" not in mounted and f"{hospital}-keys" in mounted and "handout" in mounted
    setup = [s for s in services.values() if "setup" in s.get("profiles", [])]
    assert len(setup) == 3
    for service in setup:
        for step in service["command"][0].split("&&"):
            words = shlex.split(step)
            if words[0] == "fedrad":
                fedrad_args_ok(words[1:])
            else:
                assert words[0] == "cp" and words[-1].startswith(("/handout/", "/outbox/")), step
    assert (DEPLOY / "register.sh").stat().st_mode & 0o111


@pytest.mark.parametrize("unit", ["fedrad-server.service", "fedrad-client.service"])
def test_systemd_units(unit):
    text = (DEPLOY / "systemd" / unit).read_text()
    for section in ("[Unit]", "[Service]", "[Install]"):
        assert section in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    words = shlex.split(exec_start.removeprefix("ExecStart="))
    assert words[0].endswith("/fedrad")
    fedrad_args_ok(words[1:])
    assert "--insecure" not in words and "FLWR_TELEMETRY_ENABLED=0" in text
    # a user of its own, and every folder it writes made by systemd for that user
    assert "User=fedrad" in text and "UMask=0077" in text
    made = next(line for line in text.splitlines() if line.startswith("StateDirectory=")).split("=", 1)[1].split()
    assert words[words.index("--state") + 1].removeprefix("/var/lib/") in made
    assert "FLWR_HOME=/var/lib/fedrad/flwr" in text and "fedrad/flwr" in made
