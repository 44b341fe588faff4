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
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    parsed: dict = {"COPY": []}
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction == "COPY":
            parsed["COPY"].append(rest.split()[:-1])
        elif instruction in ("ENTRYPOINT", "CMD", "FROM", "EXPOSE"):
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


def test_compose_topology_is_one_server_and_two_tls_hospitals():
    services = COMPOSE["services"]
    assert {"server", "hospital-a", "hospital-b"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.startswith("./data/"):  # data is each hospital's own
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
    image_entry = {n: dockerfile(DEPLOY / s["build"]["dockerfile"].split("/")[-1])["ENTRYPOINT"][1:]
                   for n, s in services.items()}
    fedrad_args_ok(image_entry["server"] + services["server"]["command"])
    assert services["server"]["ports"] == ["8000:8000"]
    for hospital in ("hospital-a", "hospital-b"):
        args = services[hospital]["command"]
        fedrad_args_ok(image_entry[hospital] + args)
        assert "--insecure" not in args and "--ca" in args and "--key" in args
        assert args[args.index("--server") + 1] == "server:8000"
    for step in services["certs"]["command"][0].split("&&"):
        words = shlex.split(step)
        assert words[0] == "fedrad"
        fedrad_args_ok(words[1:])
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
