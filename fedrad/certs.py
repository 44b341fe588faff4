"""``fedrad certs``: the study's TLS certificates and the hospitals' authentication keys.

- ``init``: a study CA (P-384) and the SuperLink's server certificate, signed by the CA, with every
  name and address hospitals will dial as subject alternative names (TLS checks them), and always
  ``localhost`` and ``127.0.0.1``: the SuperLink listens on 127.0.0.1 behind the hospitals' front door,
  and its own ServerApp, the door (fedrad/front_door.py) and ``fedrad server run`` dial it there.
- ``node``: a hospital's authentication key pair (P-384, OpenSSH format, as Flower's SuperNode
  reads it). The private key never leaves the hospital; the coordinator registers the public key
  (``flwr supernode register SITE.pub ...``) and the SuperLink then refuses unregistered nodes.
Existing files are never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import FedradError

LOOPBACK_NAMES = ("localhost", "127.0.0.1")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    if path.exists():
        raise FedradError(f"{path} exists; refusing to overwrite it (move it away to make new keys)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def init_study(out: Path, server_names: list[str], days: int = 825) -> list[Path]:
    """ca.crt, ca.key, server.crt, server.key in ``out``; returns the files written."""
    names = [n.strip() for n in server_names if n.strip()]
    if not names:
        raise FedradError("--server-name needs at least one host name or IP address")
    names += [name for name in LOOPBACK_NAMES if name not in names]
    for target in ("ca.crt", "ca.key", "server.crt", "server.key"):
        if (out / target).exists():
            raise FedradError(f"{out / target} exists; refusing to overwrite it")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrad study CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=days))
              .add_extension(_san(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    files = [(out / "ca.key", _pem_key(ca_key), True),
             (out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), False),
             (out / "server.key", _pem_key(server_key), True),
             (out / "server.crt", server.public_bytes(serialization.Encoding.PEM), False)]
    for path, data, private in files:
        _write(path, data, private)
    return [f[0] for f in files]


def node_keys(out: Path, site: str) -> tuple[Path, Path]:
    """SITE.key (OpenSSH private key, mode 0600) and SITE.pub for a hospital's SuperNode."""
    if not site or "/" in site or site.startswith("."):
        raise FedradError(f"site name '{site}' cannot be a file name")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    key_path, pub_path = out / f"{site}.key", out / f"{site}.pub"
    _write(key_path, private, private=True)
    _write(pub_path, public + f" fedrad-{site}\n".encode())
    return key_path, pub_path
