"""The hospitals' front door (fedrad/front_door.py) as real processes on 127.0.0.1: `fedrad server start` runs
the SuperLink on 127.0.0.1 and nginx in front of it; through the door a hospital (its ca.crt and key) can
connect its SuperNode and nothing else, while the coordinator's own commands on the SuperLink's address work.
"""

import datetime as dt
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _procs import BIN, QUIET, Federation, fedrad, free_port, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrad import front_door
from fedrad.cli import main

pytestmark = pytest.mark.e2e

NGINX = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), *front_door.SBIN_DIRS]))
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx not installed (make install and .ci/run install it)")


def flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    """Flower's CLI with the connection written in ``home``/config.toml."""
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **QUIET, "FLWR_HOME": str(home)})


def connection(home: Path, address: str, ca: Path) -> Path:
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "study"\n\n[superlink.study]\naddress = "{address}"\n'
                                      f'root-certificates = "{ca}"\n')
    return home


def status(url: str, ca: Path, method: str = "POST") -> int:
    """The HTTP status the door answers ``url`` with (the path is sent exactly as written)."""
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


@needs_nginx
def test_hospitals_reach_only_the_fleet_api_through_the_door(demo_sites, tmp_path, procs):
    fed = Federation(procs, tmp_path, ["st-mary", "st-luke", "rogue"], door=True)
    log = fed.start_superlink()
    text = log.read_text()
    assert f"hospitals' door: https://127.0.0.1:{fed.door_port}" in text
    assert f"SuperLink: https://127.0.0.1:{fed.port} (this machine only" in text
    ca = fed.certs / "ca.crt"
    door = f"https://localhost:{fed.door_port}"

    # A hospital's machine holds ca.crt and its own key: through the door it registers no node, lists no run
    # and submits no study (Control answers 403 there; so does the Runtime API, the API docs, and a path that
    # only nginx's normalisation would turn into a Fleet one).
    hospital = connection(tmp_path / "hospital-flwr", fed.address, ca)
    rogue = flwr(hospital, "supernode", "register", str(fed.certs / "rogue.pub"), "study")
    assert rogue.returncode != 0 and "registered successfully" not in rogue.stdout
    assert "403" in rogue.stdout + rogue.stderr
    listing = flwr(hospital, "ls", "study")
    assert listing.returncode != 0 and "403" in listing.stdout + listing.stderr
    study = tmp_path / "study.toml"
    study.write_text("num-rounds = 1\nimage-size = 32\nbatch-size = 16\nsecure-aggregation = false\n"
                     "round-timeout = 150\n")
    submitted = subprocess.run([sys.executable, "-m", "fedrad", "server", "run", "--server", fed.address, "--certs",
                                str(fed.certs), "--config", str(study), "--out", str(tmp_path / "smuggled")],
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode != 0 and "403" in submitted.stdout + submitted.stderr
    assert not (tmp_path / "smuggled").exists()
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/pull-app-inputs", "/docs",
                 "/openapi.json", "/v1/fleet/../control/list-runs", "/v1/control/../fleet/get-run"):
        assert status(door + path, ca) == 403, path
    assert status(door + "/health", ca, "GET") == 200
    assert status(door + "/v1/fleet/get-run", ca) not in (403, 404)  # reaches the SuperLink (which wants protobuf)
    assert status(f"https://localhost:{fed.port}/v1/control/list-runs", ca) not in (403, 404)  # served locally

    # The coordinator, on the server machine, registers the hospitals on the SuperLink's own address; they
    # connect through the door; a one-round study submitted with `fedrad server run` completes.
    for site in ("st-mary", "st-luke"):
        fed.register(site)
    for site, data in zip(("st-mary", "st-luke"), demo_sites):
        fed.start_node(site, data)
    out = tmp_path / "run"
    run = fed.run_study("--config", str(study), "--out", str(out))
    run.wait(timeout=300)
    run_log = (tmp_path / "server-run-1.log").read_text()
    assert run.returncode == 0 and (out / "model.pt").exists(), run_log[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert sorted(s["site"] for s in rows[0]["sites"] if s["trained"]) == ["st-luke", "st-mary"]
    listed = flwr(fed.home, "ls", "study")
    assert listed.returncode == 0 and "finished" in listed.stdout.lower(), listed.stdout + listed.stderr
    rogue_node = tmp_path / "rogue-node.log"
    node = procs.start([sys.executable, "-m", "fedrad", "client", "start", "--server", fed.address, "--ca", str(ca),
                        "--key", str(fed.certs / "rogue.key"), "--site", "rogue", "--data", str(demo_sites[0]),
                        "--state", str(tmp_path / "rogue"), "--port", str(free_port())], rogue_node)
    # Refused at the SuperLink (behind the door): fedrad's start-up check says so and exits, or Flower retries.
    assert wait_until(lambda: node.poll() is not None or "Connection attempt failed" in rogue_node.read_text(), 60)
    assert "SuperNode ID" not in rogue_node.read_text()

    # The hospitals' requests went through the door; its log and the database are private.
    access = tmp_path / "link" / "front-door" / "access.log"
    assert "POST /v1/fleet/pull-messages" in access.read_text()
    for private in (access, tmp_path / "link" / "superlink.db", tmp_path / "link" / "front-door" / "nginx.conf"):
        assert private.stat().st_mode & 0o077 == 0, private
    assert (tmp_path / "link").stat().st_mode & 0o077 == 0


def test_start_without_nginx_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    assert fedrad("certs", "init", "--out", str(tmp_path / "certs"), "--server-name", "fl.example.org").returncode == 0
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(front_door, "SBIN_DIRS", ())
    assert main(["server", "start", "--certs", str(tmp_path / "certs"), "--state", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get install nginx-light" in err and "--no-front-door" in err


def test_start_refuses_a_certificate_without_the_loopback_names(tmp_path):
    """A server certificate from before `fedrad certs init` added localhost and 127.0.0.1 is refused up front."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "fl.example.org")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("fl.example.org")]), critical=False)
            .sign(key, hashes.SHA384()))
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    result = fedrad("server", "start", "--certs", str(certs), "--state", str(tmp_path / "state"), "--no-front-door")
    assert result.returncode == 2 and "does not name localhost and 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_door_config_forwards_fleet_and_health_only(tmp_path):
    """The generated nginx.conf, as `nginx -t` reads it where nginx exists."""
    assert fedrad("certs", "init", "--out", str(tmp_path / "certs"), "--server-name", "fl.example.org").returncode == 0
    text = front_door.nginx_config(tmp_path / "door", tmp_path / "certs", "0.0.0.0", 8000, 9093)
    assert "listen 0.0.0.0:8000 ssl;" in text and "server 127.0.0.1:9093;" in text
    assert "proxy_ssl_verify on;" in text and "proxy_ssl_name localhost;" in text
    assert text.count("proxy_pass https://superlink;") == 2  # the Fleet routes and /health, nothing else
    if NGINX is not None:
        (tmp_path / "state").mkdir()
        cmd = front_door.door_command(tmp_path / "state", tmp_path / "certs", "127.0.0.1", free_port(), 9093)
        checked = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
