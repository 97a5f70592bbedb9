"""Throwaway X.509 material for the tests: a CA made on the spot and certificates it signs (TLS to Redis, signed
task messages)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any


def certificates(folder: Path, leaves: dict[str, list[Any]], rsa: bool = False, days: float = 1,
                 ca_name: str = "batchinfer test CA") -> dict[str, Path]:
    """A CA (``ca.crt``, ``ca.key``) and one certificate per leaf (``NAME.crt``, ``NAME.key``, with those subject
    alternative names) signed by it, in ``folder``; returns ``{"ca": ..., NAME: crt, "NAME_key": key}``.

    Keys are P-256, or RSA 2048 with ``rsa`` (Celery's ``auth`` serializer takes only RSA); the leaves expire in
    ``days`` (negative: already expired)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def new_key() -> Any:
        return rsa_keys.generate_private_key(65537, 2048) if rsa else ec.generate_private_key(ec.SECP256R1())

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(stem: str, key: Any, cert: x509.Certificate) -> None:
        (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    folder.mkdir(parents=True, exist_ok=True)
    ca_key = new_key()
    ca = (x509.CertificateBuilder().subject_name(name(ca_name)).issuer_name(name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)
    out = {"ca": folder / "ca.crt"}
    for stem, san in leaves.items():
        key = new_key()
        builder = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=2))
                   .not_valid_after(now + datetime.timedelta(days=days)))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        write(stem, key, builder.sign(ca_key, hashes.SHA256()))
        out[stem], out[f"{stem}_key"] = folder / f"{stem}.crt", folder / f"{stem}.key"
    return out
