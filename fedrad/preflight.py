"""Checks ``fedrad client start`` and ``fedrad server start`` make before they hand the process to Flower.

Flower's own messages do not tell a hospital what to do: an unregistered key ends in "Failed to activate
SuperNode" (exit status 1; Flower's log says "Exit Code: 305"), as does a registered node still marked online
after a crash; a plain-text node against a TLS server, or one holding another study's CA, retries saying only
"Connection attempt failed". fedrad cannot change Flower's text, so it checks first, and each failure is one
line naming the cause and its fix (FedradError, exit status 2). Before a SuperNode starts:

1. its own port (``--port``: Flower's Runtime API on 127.0.0.1) is free: hospitals sharing a machine need one
   each;
2. the server answers TCP; while it does not (server down, wrong address or port, a firewall) the node says
   why, once per reason, and tries again, as Flower would, until it connects or is stopped;
3. TLS, as the SuperNode will dial it: the handshake with the study's ca.crt; a server that speaks plain text
   (started with --insecure), a certificate not signed by this CA, not valid for the name dialled, expired;
   with --insecure, a server that speaks TLS;
4. registration: one signed ActivateNode request with a heartbeat interval Flower refuses (0 s). The SuperLink
   looks the key up before it checks the interval: an unregistered key gets FLEET_NODE_ACTIVATION_FAILED, a
   registered one FLEET_INVALID_HEARTBEAT_INTERVAL, and nothing is activated or changed either way
   (flwr/superlink/servicer/fleet/fleet_handlers.py ``activate_node``). A refused signature (HTTP 401) is most
   often this machine's clock (Flower accepts a signature made at most 5 s ahead of its own time, 305 s behind).
What no check can tell apart: a registered node that crashed stays "online" at the SuperLink until its
heartbeats lapse (about a minute), and Flower refuses to activate it until then, though check 4 passed.

Before a SuperLink starts: its server certificate is signed by the study CA and valid. Each side prints one
start-up line (:func:`check_node`, :func:`server_summary`).
"""

from __future__ import annotations

import datetime as dt
import errno
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from client.policy import HospitalPolicy
from common.errors import FedradError

if TYPE_CHECKING:
    from cryptography import x509

CONNECT_TIMEOUT_S = 5.0  # one TCP connect, TLS handshake or registration request
RETRY_S = (2.0, 5.0, 10.0, 30.0)  # the waits between tries while the server cannot be reached, then every 30 s
# OpenSSL's reasons when a TLS client gets an HTTP answer (a plain-text server) instead of a TLS record.
PLAIN_TEXT_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST",
                                "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"})
HOSTNAME_MISMATCH = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
EXPIRED, NOT_YET_VALID = 10, 9  # X509_V_ERR_CERT_HAS_EXPIRED, X509_V_ERR_CERT_NOT_YET_VALID
UNAVAILABLE_STATUS = frozenset({502, 503, 504})  # a front door (proxy) whose SuperLink does not answer


class Unreachable(Exception):
    """The server cannot be reached now (worth trying again); ``reason`` says why, in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def server_address(server: str) -> tuple[str, int]:
    """HOST and PORT of ``--server`` as Flower parses it (IPv6 in brackets)."""
    from flwr.supercore.address import parse_address

    parsed = parse_address(server)
    if not parsed:
        raise FedradError(f"--server {server!r}: expected HOST:PORT, e.g. fl.example-consortium.org:8000")
    return str(parsed[0]), int(parsed[1])


def port_free(port: int, host: str = "127.0.0.1", what: str = "") -> None:
    """FedradError unless ``host:port`` can be listened on now (SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise FedradError(f"port {port} on this machine is already in use{what}") from None
            raise FedradError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def node_port_free(port: int) -> None:
    """The SuperNode's own port (Flower's Runtime API, on 127.0.0.1)."""
    port_free(port, what=f" (another hospital's SuperNode on this machine, or another program): give each "
              f"SuperNode on one machine its own --port, e.g. --port {port + 1}")


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        raise Unreachable(f"the name {host} does not resolve (DNS): check --server") from None
    except ConnectionRefusedError:
        raise Unreachable("connection refused: nothing listens on that port (is the SuperLink started? is the "
                          "port the one the coordinator gave?)") from None
    except TimeoutError:
        raise Unreachable(f"no answer within {timeout:g} s (a firewall, or a wrong address)") from None
    except OSError as exc:
        raise Unreachable(exc.strerror or str(exc)) from None


def _context(ca: Path) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError, ValueError):
        raise FedradError(f"{ca}: not a readable PEM certificate (--ca is the study's ca.crt from the "
                          "coordinator)") from None


def _names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def _peer_certificate(host: str, port: int, timeout: float) -> bytes:
    """The server's certificate, unverified (only to say what it names)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with _connect(host, port, timeout) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
        return tls.getpeercert(binary_form=True) or b""


def _certificate_problem(exc: ssl.SSLCertVerificationError, host: str, port: int, ca: Path, timeout: float) -> str:
    where = f"the server at {host}:{port}"
    if exc.verify_code in HOSTNAME_MISMATCH:
        try:
            from cryptography import x509

            names = ", ".join(_names(x509.load_der_x509_certificate(_peer_certificate(host, port, timeout))))
            names = names or "no names"
        except (OSError, ssl.SSLError, ValueError, Unreachable):
            names = "names that could not be read"
        return (f"{where} has a certificate that is not valid for '{host}' (it names {names}): dial it by one of "
                f"those names in --server, or ask the coordinator to add '{host}' (fedrad certs init --server-name)")
    if exc.verify_code == EXPIRED:
        return f"{where} has an expired certificate: the coordinator must make new ones (fedrad certs init)"
    if exc.verify_code == NOT_YET_VALID:
        return f"{where} has a certificate that is not valid yet: check this machine's clock and time zone"
    return (f"{where} has a certificate that is not signed by this study's CA ({ca}): this may be another study's "
            f"ca.crt, or the server runs with other certificates; get ca.crt again from the coordinator "
            f"({exc.verify_message})")


def check_tls(host: str, port: int, ca: Path, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """A TLS handshake as the SuperNode makes it (the study CA, the name dialled); what it found, in words."""
    from cryptography import x509

    context = _context(ca)
    try:
        with _connect(host, port, timeout) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            der, version = tls.getpeercert(binary_form=True) or b"", tls.version()
    except ssl.SSLCertVerificationError as exc:
        raise FedradError(_certificate_problem(exc, host, port, ca, timeout)) from None
    except ssl.SSLError as exc:
        if exc.reason in PLAIN_TEXT_REASONS:
            raise FedradError(f"the server at {host}:{port} speaks plain text, not TLS (it was started with "
                              "--insecure): ask the coordinator to start it with --certs, or, on a test network "
                              "only, start this node with --insecure") from None
        raise FedradError(f"the TLS handshake with {host}:{port} failed ({exc.reason or exc})") from None
    except (ConnectionError, TimeoutError) as exc:
        raise Unreachable(f"the connection closed during the TLS handshake ({type(exc).__name__})") from None
    until = x509.load_der_x509_certificate(der).not_valid_after_utc.date().isoformat()
    return f"TLS ({version}; the server's certificate is signed by the study CA, valid until {until})"


def check_plain(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """With --insecure: FedradError if the server speaks TLS (a plain-text node could never connect)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with _connect(host, port, timeout) as raw, context.wrap_socket(raw, server_hostname=host):
            pass
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return "plain text (--insecure): no TLS, no hospital authentication"
    raise FedradError(f"the server at {host}:{port} speaks TLS, but this node was started with --insecure: start it "
                      "with --ca ca.crt (from the coordinator) and --key SITE.key (from 'fedrad certs node')")


def _private_key(key: Path):  # noqa: ANN202 (cryptography's key type)
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        private = load_ssh_private_key(key.read_bytes(), None)
    except OSError as exc:
        raise FedradError(f"hospital private key {key}: {exc.strerror or exc}") from None
    except (ValueError, TypeError):
        raise FedradError(f"{key} is not a hospital private key (make one with 'fedrad certs node')") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise FedradError(f"{key} is not a hospital private key (make one with 'fedrad certs node')")
    return private


def check_registration(host: str, port: int, ca: Path, key: Path, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Whether the SuperLink knows this hospital's key (see the module docstring, check 4); what it found."""
    import httpx
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private = _private_key(key)
    public = private.public_key()
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperNode"), NodeAuthHttpInterceptor(private, public)]
    client = FleetHttpClient(f"https://{address}", interceptors=interceptors, verify=_context(ca), timeout=timeout)
    with client as fleet:
        try:
            answer = fleet.ActivateNode(ActivateNodeRequest(public_key=public_key_to_bytes(public),
                                                            heartbeat_interval=0.0))
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            error = FlowerError.from_json(exc.response.text)
            code = error.code if error else None
            if code == ApiErrorCode.FLEET_INVALID_HEARTBEAT_INTERVAL:
                return f"hospital key {key.name} registered at the server"
            if code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED:
                raise FedradError(
                    f"the server does not know this hospital's key ({key.name} is not registered): send the matching "
                    f"{key.with_suffix('.pub').name} to the coordinator, who registers it with 'flwr supernode "
                    "register' (deploy/register.sh); if it was registered, the server now runs with another --state "
                    "(its registrations live in that database)") from None
            if status == 401:
                raise FedradError(
                    "the server refused this hospital's signed request (HTTP 401): most often this machine's clock "
                    "is off (the server accepts signatures made at most 5 s ahead of its own time or 5 minutes "
                    "behind); check it with 'timedatectl'") from None
            if status in UNAVAILABLE_STATUS:
                raise Unreachable(f"HTTP {status}: the server's front door answers, the SuperLink behind it "
                                  "does not") from None
            detail = error.message if error else exc.response.text[:200]
            raise FedradError(f"the server refused this node's registration check: HTTP {status} {detail}") from None
        except httpx.TransportError as exc:
            raise Unreachable(f"the registration check got no answer ({type(exc).__name__})") from None
        # Flower took a 0 s heartbeat interval: undo the activation at once, or the SuperNode could not activate.
        fleet.DeactivateNode(DeactivateNodeRequest(node_id=answer.node_id))
        return f"hospital key {key.name} registered at the server"


def check_server(server: str, ca: Path | None, key: Path | None, say: Callable[[str], None],
                 sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Checks 2-4 for a node dialling ``server`` (TLS with ``ca`` and ``key``, or plain text when ``ca`` is None),
    trying again while the server cannot be reached; what they found, in words, for the start-up line."""
    host, port = server_address(server)
    said, tries = "", 0
    while True:
        try:
            _connect(host, port, CONNECT_TIMEOUT_S).close()
            if ca is None:
                found = [check_plain(host, port)]
            else:
                found = [check_tls(host, port, ca)]
                if key is not None:
                    found.append(check_registration(host, port, ca, key))
            if said:
                say(f"fedrad: the server {host}:{port} answers now")
            return found
        except Unreachable as exc:
            if exc.reason != said:
                say(f"fedrad: cannot reach the server {host}:{port}: {exc.reason}; trying again until it answers "
                    "(Ctrl-C to stop)")
                said = exc.reason
        sleep(RETRY_S[min(tries, len(RETRY_S) - 1)])
        tries += 1


def data_summary(data: Path) -> str:
    """What ``--data`` holds, read without decoding an image: a FedradError (DataError) where nothing could be
    used (no labels.csv and no class subfolders, a .npz without '<split>_labels')."""
    import numpy as np

    from common.data import LabelTable
    from common.errors import DataError

    if data.is_file():
        if data.suffix != ".npz":
            raise DataError(f"{data}: expected a folder or a .npz file")
        try:
            with np.load(data) as npz:
                counts = {k[: -len("_labels")]: len(npz[k]) for k in npz.files if k.endswith("_labels")}
        except (OSError, ValueError) as exc:
            raise DataError(f"{data}: not a readable .npz ({type(exc).__name__})") from None
        if not counts:
            raise DataError(f"{data}: no '<split>_images' with '<split>_labels' arrays")
        return f"data {data} (.npz, {sum(counts.values())} labelled images)"
    table, _ = LabelTable.read(data)
    files = len(table.files(data))
    how = "class subfolders" if table.from_folders else "labels.csv"
    return f"data {data} ({how}, {files} files; 'fedrad data check' says which are usable)"


def _server_cert(certs: Path) -> str:
    """The server certificate, checked against the study CA: what it names and until when."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
        cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    except (OSError, ValueError) as exc:
        raise FedradError(f"{certs}: ca.crt and server.crt must be PEM certificates from 'fedrad certs init' "
                          f"({exc})") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise FedradError(f"{certs / 'server.crt'} is not signed by {certs / 'ca.crt'}: hospitals would refuse "
                          f"it ({type(exc).__name__}); make both with 'fedrad certs init'") from None
    until = cert.not_valid_after_utc
    if until < dt.datetime.now(dt.UTC):
        raise FedradError(f"{certs / 'server.crt'} expired on {until.date().isoformat()}: make new certificates "
                          "with 'fedrad certs init' and give the new ca.crt to every hospital")
    names = ", ".join(_names(cert)) or "no names"
    return f"TLS (server certificate for {names}, signed by the study CA, valid until {until.date().isoformat()})"


def registered_hospitals(database: Path) -> int | None:
    """Hospitals registered in a SuperLink's database (Flower's ``node`` table), read only; None if unreadable."""
    if not database.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM node WHERE status != 'unregistered'").fetchone()[0])
    except sqlite3.Error:
        return None


def server_summary(certs: Path | None, state: Path) -> str:
    """``fedrad server start``'s start-up line, once its server certificate is checked (signed by the study CA,
    not expired): TLS, hospital authentication and how many hospitals are registered, the database."""
    database = state / "superlink.db"
    if certs is None:
        parts = ["plain text (--insecure): no TLS", "no hospital authentication"]
    else:
        registered = registered_hospitals(database)
        parts = [_server_cert(certs), "hospital authentication on: " + (
            "registrations unreadable" if registered is None else f"{registered} hospital(s) registered")]
    return " | ".join(["fedrad: " + parts[0], *parts[1:], f"state {database}"])


def check_node(server: str, ca: Path | None, key: Path | None, site: str, data: Path, state: Path, port: int,
               policy: HospitalPolicy, say: Callable[[str], None]) -> str:
    """Every check of ``fedrad client start``, those of this machine first (nothing is written); its start-up
    line: the hospital, the server, TLS and registration, the data, the budget (client/budget.py)."""
    from client.budget import budget_line

    server_address(server)
    if ca is not None:
        if not ca.is_file():
            raise FedradError(f"study CA certificate not found: {ca}")
        if key is None:
            raise FedradError("--key (the hospital's private key from 'fedrad certs node') is required with TLS")
        _private_key(key)
    if not data.exists():
        raise FedradError(f"data not found: {data}")
    described = data_summary(data)
    node_port_free(port)
    budget = budget_line(policy, state, site)
    found = check_server(server, ca, key, say)
    return " | ".join([f"fedrad: hospital {site} -> {server}", *found, described, f"state {state}", budget])
