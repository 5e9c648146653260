"""The fabric's own certificate authority, for ``fabric up --tls``.

``<state>/pki`` (mode 0700) holds the CA (``ca.pem``, public; ``ca-key.pem``, 0600) and
this node's certificate (``node.pem``; ``node-key.pem``, 0600), signed by the CA for the
names the node is reached at: ``localhost``, the host name, 127.0.0.1, ::1, its outward
address and the address it listens on.  nats-server presents the node certificate; every
client, service and the CLI trust only the CA (credentials files carry it), so a
connection is encrypted and the server verified.  Keys are EC P-256, made with the
``cryptography`` package; nothing here talks to a network.

The CA is made once and kept: credentials handed out carry it.  The node certificate is
issued again whenever the names it must cover change (another ``--host``, a new outward
address) or it nears its end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from .state import write_private

__all__ = ["Pki", "ca_fingerprint"]

_CA_DAYS = 3650
_NODE_DAYS = 825
_RENEW_BEFORE = dt.timedelta(days=30)


def ca_fingerprint(ca_pem: str) -> str:
    """The SHA-256 of the CA certificate (DER), hex: what a join token pins."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(ca_pem.encode())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


class Pki:
    """The CA and node certificate of one state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca.pem"
        self.ca_key = root / "ca-key.pem"
        self.cert = root / "node.pem"
        self.key = root / "node-key.pem"

    def ca_pem(self) -> str:
        return self.ca.read_text()

    def ensure(self, node: str, hosts: list[str]) -> None:
        """The CA (made once), and a node certificate valid for *hosts* and the usual local names."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not (self.ca.is_file() and self.ca_key.is_file()):
            self._make_ca(node)
        names = _names(hosts)
        if not self._covers(names):
            self._issue(node, names)

    # -- a node that joins: its key stays with it, the CA signs its request -----------------------

    def request(self, node: str, hosts: list[str]) -> str:
        """Make this node's key (kept) and a certificate signing request for *hosts* (PEM) to send."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        dns, ips = _names(hosts)
        san = [x509.DNSName(n) for n in sorted(dns)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in sorted(ips)]
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fabric node {node}")]))
               .add_extension(x509.SubjectAlternativeName(san), critical=False)
               .sign(key, hashes.SHA256()))
        write_private(self.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    def install(self, cert_pem: str, ca_pem: str) -> None:
        """Keep the certificate the fabric's CA signed for this node, and the CA."""
        write_private(self.cert, cert_pem, 0o644)
        write_private(self.ca, ca_pem, 0o644)

    def sign_csr(self, node: str, csr_pem: str) -> str:
        """A node certificate (PEM) for a joining node's request: its key and its names, this CA's signature."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise ValueError(f"not a certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise ValueError("the certificate signing request's signature does not verify")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise ValueError("the certificate signing request names no host") from None
        names = (set(san.get_values_for_type(x509.DNSName)),
                 {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})
        cert = self._build(node, names, csr.public_key())
        return str(cert.public_bytes(serialization.Encoding.PEM).decode())

    # -- internals ---------------------------------------------------------------------------

    def _make_ca(self, node: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fabric"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"fabric CA ({node})")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        write_private(self.ca_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), 0o600)
        write_private(self.ca, cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def _covers(self, names: tuple[set[str], set[str]]) -> bool:
        """Whether the node certificate exists, is the CA's, covers *names* and is not near its end."""
        if not (self.cert.is_file() and self.key.is_file()):
            return False
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
            ca = x509.load_pem_x509_certificate(self.ca.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return False
        dns = set(san.get_values_for_type(x509.DNSName))
        ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        fresh = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > _RENEW_BEFORE
        return cert.issuer == ca.subject and names[0] <= dns and names[1] <= ips and fresh

    def _issue(self, node: str, names: tuple[set[str], set[str]]) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._build(node, names, key.public_key())
        write_private(self.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
        write_private(self.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def _build(self, node: str, names: tuple[set[str], set[str]], public_key: Any) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(self.ca.read_bytes())
        now = dt.datetime.now(dt.timezone.utc)
        san = [x509.DNSName(n) for n in sorted(names[0])] + [x509.IPAddress(ipaddress.ip_address(i))
                                                             for i in sorted(names[1])]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fabric"),
                                         x509.NameAttribute(NameOID.COMMON_NAME, f"fabric node {node}")]))
                .issuer_name(ca.subject).public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=_NODE_DAYS))
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                # server for the client port, client too: the same certificate serves both ends of a route
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
        return cert


def _names(hosts: list[str]) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses) a node certificate covers: the local ones and *hosts* (wildcards skipped)."""
    dns = {"localhost", socket.gethostname()}
    ips = {"127.0.0.1", "::1"}
    for h in hosts:
        if not h or h in ("0.0.0.0", "::"):
            continue
        try:
            ips.add(str(ipaddress.ip_address(h.strip("[]"))))
        except ValueError:
            dns.add(h)
    return dns, ips
