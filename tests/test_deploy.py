"""Real SuperLink and SuperNodes on 127.0.0.1: TLS and hospital authentication (bounded, cleaned up)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _procs import BIN, fedrad, free_port, wait_for

pytestmark = pytest.mark.e2e


def test_tls_and_hospital_authentication(demo_sites, tmp_path, procs):
    """The compose topology as processes: a server, two registered hospitals (a two-round study completes),
    and two that are refused (an unregistered key, plain text)."""
    certs = tmp_path / "certs"
    assert fedrad("certs", "init", "--out", str(certs), "--server-name", "localhost,127.0.0.1").returncode == 0
    assert fedrad("certs", "node", "--out", str(certs), "--site", "st-mary").returncode == 0
    assert fedrad("certs", "node", "--out", str(certs), "--site", "st-luke").returncode == 0
    assert fedrad("certs", "node", "--out", str(certs), "--site", "unknown").returncode == 0
    port = free_port()
    link_log = tmp_path / "superlink.log"
    procs.start([sys.executable, "-m", "fedrad", "server", "start", "--certs", str(certs), "--state",
                 str(tmp_path / "link"), "--no-front-door", "--control-port", str(port)], link_log)
    assert wait_for(link_log, "Application startup complete", 30), link_log.read_text()

    # The coordinator registers st-mary's public key (Flower's CLI, pointed at this SuperLink).
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "study"\n\n[superlink.study]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n')
    env = {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    for site in ("st-mary", "st-luke"):
        registered = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(certs / f"{site}.pub"), "study"],
                                    capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert "registered successfully" in registered.stdout, registered.stdout + registered.stderr

    def node(site: str, *extra: str, data: Path = demo_sites[0]) -> Path:
        log = tmp_path / f"{site}.log"
        procs.start([sys.executable, "-m", "fedrad", "client", "start", "--server", f"127.0.0.1:{port}",
                     "--site", site, "--data", str(data), "--state", str(tmp_path / site),
                     "--port", str(free_port()), *extra], log)
        return log

    good = node("st-mary", "--ca", str(certs / "ca.crt"), "--key", str(certs / "st-mary.key"))
    second = node("st-luke", "--ca", str(certs / "ca.crt"), "--key", str(certs / "st-luke.key"), data=demo_sites[1])
    rogue = node("unknown", "--ca", str(certs / "ca.crt"), "--key", str(certs / "unknown.key"))
    plain = node("plain", "--insecure")
    assert wait_for(good, "SuperNode ID", 40), good.read_text()
    # Refused before Flower starts, each with its cause and fix (fedrad/preflight.py; tests/test_preflight.py).
    assert wait_for(rogue, "unknown.key is not registered", 40), rogue.read_text()
    assert wait_for(plain, "speaks TLS, but this node was started with --insecure", 40), plain.read_text()
    assert "SuperNode ID" not in rogue.read_text() and "SuperNode ID" not in plain.read_text()

    assert wait_for(second, "SuperNode ID", 40), second.read_text()
    out = tmp_path / "run"
    (tmp_path / "study.toml").write_text("num-rounds = 2\nimage-size = 32\nbatch-size = 16\n")
    study = subprocess.run([sys.executable, "-m", "fedrad", "server", "run", "--server", f"127.0.0.1:{port}",
                            "--certs", str(certs), "--config", str(tmp_path / "study.toml"), "--out", str(out)],
                           capture_output=True, text=True, timeout=420)
    assert (out / "model.pt").exists(), study.stdout[-3000:] + study.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert sorted(s["site"] for s in rows[-1]["sites"]) == ["st-luke", "st-mary"]
    assert all(s["trained"] for s in rows[-1]["sites"])
    audit = [json.loads(line) for line in (tmp_path / "st-mary" / "audit.jsonl").read_text().splitlines()]
    assert [a["round"] for a in audit if a["event"] == "sent model update"] == [1, 2]


def test_start_refuses_without_certificates(tmp_path):
    result = fedrad("server", "start", "--state", str(tmp_path))
    assert result.returncode == 2 and "--certs" in result.stderr and "Traceback" not in result.stderr
    result = fedrad("client", "start", "--server", "127.0.0.1:1", "--site", "x", "--data", str(tmp_path),
                    "--state", str(tmp_path))
    assert result.returncode == 2 and "--ca" in result.stderr
    (tmp_path / "study.toml").write_text("num-rounds = 3\nlearning-rate = 0.1\n")
    result = fedrad("server", "run", "--server", "127.0.0.1:1", "--insecure", "--config", str(tmp_path / "study.toml"))
    assert result.returncode == 2 and "unknown study keys learning-rate" in result.stderr
    (tmp_path / "study.toml").write_text("strategy = 'fedsgd'\n")
    result = fedrad("server", "run", "--server", "127.0.0.1:1", "--insecure", "--config", str(tmp_path / "study.toml"))
    assert result.returncode == 2 and "unknown strategy" in result.stderr and "Traceback" not in result.stderr
