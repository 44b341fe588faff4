"""``fedrad client start``'s and ``fedrad server start``'s checks before Flower starts (fedrad/preflight.py): each
misconfiguration a hospital meets is one line naming its cause and fix, not Flower's retries.

TLS checks run against small in-process servers on loopback (a thread each, closed at the end); the
registration check against a real SuperLink (tests/_procs.py Federation, killed by PID at the end).
"""

import shutil
import socket
import ssl
import sys
import threading
from pathlib import Path

import pytest
from _procs import Federation, fedrad, free_port, wait_until

from client.budget import budget_line
from client.policy import HospitalPolicy
from client.privacy import PrivacyLedger
from common.errors import FedradError
from fedrad import preflight
from fedrad.certs import init_study


class Listener:
    """A TLS server (``context``) or a plain-text HTTP one that answers every request with 400, as a SuperLink
    started with --insecure answers a TLS greeting; served by a daemon thread until ``close``."""

    def __init__(self, context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.context, self.stopped = context, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    if self.context is None:
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    else:
                        with self.context.wrap_socket(conn, server_side=True) as tls:
                            tls.recv(1)
                except (OSError, ssl.SSLError):
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def study_certs(tmp_path):
    """A study's certificates (the server's names: localhost, 127.0.0.1) and another study's."""
    init_study(tmp_path / "certs", ["localhost"])
    init_study(tmp_path / "other", ["localhost"])
    return tmp_path / "certs", tmp_path / "other"


@pytest.fixture
def listeners():
    started: list[Listener] = []

    def start(context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> Listener:
        started.append(Listener(context, host))
        return started[-1]

    yield start
    for listener in started:
        listener.close()


def tls_server(certs: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    return context


def test_tls_names_each_misconfiguration(study_certs, listeners):
    certs, other = study_certs
    tls = listeners(tls_server(certs))
    assert preflight.check_tls("127.0.0.1", tls.port, certs / "ca.crt").startswith("TLS (TLSv1.")
    assert preflight.check_tls("localhost", tls.port, certs / "ca.crt").startswith("TLS (")
    with pytest.raises(FedradError, match=r"not signed by this study's CA .*get ca.crt again from the coordinator"):
        preflight.check_tls("127.0.0.1", tls.port, other / "ca.crt")
    elsewhere = listeners(tls_server(certs), host="127.0.0.2")  # a name the certificate does not carry
    with pytest.raises(FedradError, match=r"not valid for '127.0.0.2' \(it names localhost, 127.0.0.1\)"):
        preflight.check_tls("127.0.0.2", elsewhere.port, certs / "ca.crt")
    plain = listeners()
    with pytest.raises(FedradError, match="speaks plain text, not TLS .*--insecure"):
        preflight.check_tls("127.0.0.1", plain.port, certs / "ca.crt")
    with pytest.raises(FedradError, match="not a readable PEM certificate"):
        preflight.check_tls("127.0.0.1", tls.port, certs / "server.key")

    # --insecure: a plain-text server is what was asked for; a TLS one could never be reached so.
    assert preflight.check_plain("127.0.0.1", plain.port).startswith("plain text")
    with pytest.raises(FedradError, match="speaks TLS, but this node was started with --insecure: start it with --ca"):
        preflight.check_plain("127.0.0.1", tls.port)


def test_an_unreachable_server_is_said_once_and_tried_until_it_answers(listeners, monkeypatch):
    """Nothing answers for three tries: one line with the reason (not one per try), waits that grow, then the
    checks run once the server answers."""
    port = free_port()
    with pytest.raises(preflight.Unreachable, match="connection refused"):
        preflight._connect("127.0.0.1", port, 1.0)
    server, tries, real = listeners(), [], preflight._connect

    def connect(host: str, _port: int, timeout: float) -> socket.socket:
        tries.append(host)
        if len(tries) <= 3:
            raise preflight.Unreachable("connection refused: nothing listens on that port")
        return real(host, server.port, timeout)  # the server has come up

    monkeypatch.setattr(preflight, "_connect", connect)
    lines, waits = [], []
    found = preflight.check_server(f"127.0.0.1:{port}", None, None, lines.append, sleep=waits.append)
    assert found == ["plain text (--insecure): no TLS, no hospital authentication"]
    assert lines == [f"fedrad: cannot reach the server 127.0.0.1:{port}: connection refused: nothing listens on that "
                     "port; trying again until it answers (Ctrl-C to stop)",
                     f"fedrad: the server 127.0.0.1:{port} answers now"]
    assert waits == [2.0, 5.0, 10.0]


def test_a_busy_node_port_names_the_option_that_frees_it():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(FedradError, match=rf"port {port} on this machine is already in use .*its own --port"):
            preflight.node_port_free(port)
    preflight.node_port_free(port)  # free again


def test_data_is_described_without_decoding(tmp_path, small_npz):
    assert preflight.data_summary(small_npz) == f"data {small_npz} (.npz, 120 labelled images)"
    folder = tmp_path / "site"
    (folder / "normal").mkdir(parents=True)
    (folder / "normal" / "a.dcm").write_bytes(b"x")
    assert "(class subfolders, 1 files;" in preflight.data_summary(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedradError, match="no labels.csv and no class subfolders"):
        preflight.data_summary(tmp_path / "empty")


def test_the_budget_line_says_what_this_sites_data_has_spent(tmp_path):
    """A hospital that finished one study at (nearly) its cap is told at start-up, and how to raise the cap."""
    policy = HospitalPolicy()
    assert budget_line(policy, tmp_path, "st-mary") == "budget: epsilon 8 per dataset over all studies, none spent yet"
    ledger = PrivacyLedger(tmp_path)
    entry = ledger.entry("fp", name="st-mary", keys=["a", "b"])
    history = [(1.0, 0.1, 10)]
    ledger.record("fp", entry, history, "study-1", 1, known=(history, 3.0))
    assert budget_line(policy, tmp_path, "st-mary").endswith("epsilon 3.00 of 8 already spent on this site's data "
                                                             "(all studies), 5.00 left")
    assert budget_line(policy, tmp_path, "st-luke").endswith("none spent yet")  # another site's data
    entry = ledger.entry("fp")
    ledger.record("fp", entry, history * 2, "study-1", 2, known=(history * 2, 7.95))
    line = budget_line(policy, tmp_path, "st-mary")
    assert "7.95 of 8 already spent" in line
    assert "0.05 left: DP rounds that would go over the cap will be declined" in line
    assert f"max-epsilon under [privacy] in {tmp_path / 'policy.toml'}" in line and "fedrad policy show" in line
    ledger.path.write_text("{not json")  # a damaged ledger stops the node at start-up, never a reset budget
    with pytest.raises(FedradError, match="is unreadable .*restore it from backup"):
        budget_line(policy, tmp_path, "st-mary")


def test_server_certificates_are_checked_before_the_superlink_starts(study_certs, tmp_path):
    certs, other = study_certs
    line = preflight.server_summary(certs, tmp_path / "link")
    assert line.startswith("fedrad: TLS (server certificate for localhost, 127.0.0.1, signed by the study CA")
    assert "hospital authentication on: 0 hospital(s) registered" in line
    mixed = tmp_path / "mixed"
    shutil.copytree(certs, mixed)
    shutil.copy(other / "ca.crt", mixed / "ca.crt")
    with pytest.raises(FedradError, match="server.crt is not signed by .*ca.crt: hospitals would refuse it"):
        preflight.server_summary(mixed, tmp_path / "link")
    assert preflight.server_summary(None, tmp_path / "link").startswith("fedrad: plain text (--insecure)")


@pytest.mark.e2e
def test_a_real_superlink_tells_a_registered_key_from_an_unregistered_one(demo_sites, tmp_path, procs):
    """Flower says "Failed to activate SuperNode" for both; the check tells them apart without activating
    anything, and `fedrad client start` stops at once with the fix for each misconfiguration."""
    fed = Federation(procs, tmp_path, ["st-mary", "rogue"])
    started = fed.start_superlink().read_text()
    assert "fedrad: TLS (server certificate for localhost, 127.0.0.1, signed by the study CA" in started
    assert "| hospital authentication on: 0 hospital(s) registered | state " in started
    fed.register("st-mary")
    ca, (host, port) = fed.certs / "ca.crt", preflight.server_address(fed.address)
    assert preflight.check_registration(host, port, ca, fed.certs / "st-mary.key") == \
        "hospital key st-mary.key registered at the server"

    def start(site: str, *extra: str):
        return fedrad("client", "start", "--server", fed.address, "--site", site, "--data", str(demo_sites[0]),
                      "--state", str(tmp_path / site), "--port", str(free_port()), *extra, timeout=60)

    rogue = start("rogue", "--ca", str(ca), "--key", str(fed.certs / "rogue.key"))
    assert rogue.returncode == 2 and rogue.stderr.strip().splitlines()[-1] == (
        "fedrad: error: the server does not know this hospital's key (rogue.key is not registered): send the "
        "matching rogue.pub to the coordinator, who registers it with 'flwr supernode register' "
        "(deploy/register.sh); if it was registered, the server now runs with another --state (its registrations "
        "live in that database)")
    plain = start("plain", "--insecure")
    assert plain.returncode == 2 and "speaks TLS, but this node was started with --insecure" in plain.stderr
    assert not (tmp_path / "rogue").exists() and not (tmp_path / "plain").exists()  # nothing written

    # The registered hospital starts: one line says what was checked, then Flower connects (the same node id
    # as ever: the check activated nothing).
    log = tmp_path / "st-mary.log"
    procs.start([sys.executable, "-m", "fedrad", "client", "start", "--server", fed.address, "--ca", str(ca),
                 "--key", str(fed.certs / "st-mary.key"), "--site", "st-mary", "--data", str(demo_sites[0]),
                 "--state", str(tmp_path / "st-mary"), "--port", str(free_port())], log)
    assert wait_until(lambda: "SuperNode ID" in log.read_text(errors="replace"), 60), log.read_text()
    first = next(line for line in log.read_text().splitlines() if line.startswith("fedrad: hospital"))
    assert first.startswith(f"fedrad: hospital st-mary -> {fed.address} | TLS (TLSv1.")
    assert "| hospital key st-mary.key registered at the server | data " in first
    assert first.endswith("| budget: epsilon 8 per dataset over all studies, none spent yet")
