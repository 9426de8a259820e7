"""`flowertune-llm certs`: the server certificate verifies for every name, keys are private, nothing is overwritten."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from flowertune_llm.cli import main


def _verifier(store: Store, host: str):  # noqa: ANN202
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    return PolicyBuilder().store(store).build_server_verifier(subject)


def test_certs_verify_for_each_host_keys_are_private_and_nothing_is_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    hosts = ["superlink.example.org", "127.0.0.1", "::1"]
    args = ["certs", "--out", str(out), "--supernodes", "2"] + [a for h in hosts for a in ("--host", h)]
    assert main(args) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    store = Store([ca])
    for host in hosts:
        _verifier(store, host).verify(server, [])  # raises if the chain or the name does not match
    with pytest.raises(VerificationError):
        _verifier(store, "other.example.org").verify(server, [])
    other_ca = tmp_path / "other"
    assert main(["certs", "--out", str(other_ca), "--host", "superlink.example.org"]) == 0
    with pytest.raises(VerificationError):  # a server certificate from another CA is not trusted
        _verifier(Store([ca]), "superlink.example.org").verify(
            x509.load_pem_x509_certificate((other_ca / "server.pem").read_bytes()), []
        )

    for key in ("ca.key", "server.key", "supernode_0", "supernode_1"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600, key
    private = load_ssh_private_key((out / "supernode_0").read_bytes(), None)  # what flower-supernode reads
    public = load_ssh_public_key((out / "supernode_0.pub").read_bytes())  # what `flwr supernode register` reads
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.public_key() == public

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(args) == 2  # a second call into the same folder refuses
    assert "not overwriting" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
