"""`flowertune-llm certs`: a CA, a SuperLink TLS certificate and SuperNode key pairs, without openssl scripts."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_new(path: Path, data: bytes, private: bool) -> None:
    """Create `path` (never overwrite); private keys are readable by their owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def certificate_files(out: Path, supernodes: int) -> list[Path]:
    """The files `make_certificates` writes into `out`."""
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    for i in range(supernodes):
        names += [f"supernode_{i}", f"supernode_{i}.pub"]
    return [out / name for name in names]


def make_certificates(out: Path, hosts: list[str], supernodes: int = 0, days: int = 365) -> list[Path]:
    """A CA, a SuperLink server certificate for `hosts` (DNS names or IPs) and SuperNode key pairs.

    SuperNode keys are ECDSA P-384 in OpenSSH format, as `flower-supernode
    --auth-supernode-private-key` and `flwr supernode register` read them. Refuses, before
    writing anything, if any of the files already exists.
    """
    if not hosts:
        raise ValueError("certs: give at least one --host (the SuperLink's DNS name or IP address)")
    if supernodes < 0:
        raise ValueError(f"certs: --supernodes {supernodes}: must be >= 0")
    out = Path(out)
    files = certificate_files(out, supernodes)
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise FileExistsError(f"certs: not overwriting {', '.join(existing)}; choose another --out or remove them")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid = {"not_valid_before": now - dt.timedelta(minutes=5), "not_valid_after": now + dt.timedelta(days=days)}

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowertune-llm federation CA")])
    ca_cert = (
        x509.CertificateBuilder(**valid)
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder(**valid)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    _write_new(out / "ca.crt", ca_cert.public_bytes(pem), private=False)
    _write_new(out / "ca.key", _pem_key(ca_key), private=True)
    _write_new(out / "server.pem", server_cert.public_bytes(pem), private=False)
    _write_new(out / "server.key", _pem_key(server_key), private=True)
    for i in range(supernodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write_new(out / f"supernode_{i}", private, private=True)
        _write_new(out / f"supernode_{i}.pub", public + b"\n", private=False)
    return files
