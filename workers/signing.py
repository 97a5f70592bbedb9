"""Signed messages (Celery's ``auth`` serializer): only a host holding a trusted key can make the workers act.

A host that can write to Redis but holds no trusted key cannot make a worker run a task or obey a remote-control
command (the job state is another matter: see the README's "Signed messages"). Every message is signed with
this host's key and names its certificate; a receiver accepts it only when that certificate is in its trusted
store and the signature verifies (RSA-PSS, SHA-256). Off unless all three of ``BATCHINFER_SIGNING_KEY`` (this
host's private key, PEM), ``BATCHINFER_SIGNING_CERT`` (its certificate) and ``BATCHINFER_SIGNING_CERTS`` (the
trusted certificates: a folder of them or a glob, Celery's ``security_cert_store``) are set;
``BATCHINFER_SIGNING_KEY_PASSWORD`` decrypts the key (environment only).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Any

from workers.errors import ConfigError
from workers.redis_conn import readable_file

KEY, CERT, CERTS = "BATCHINFER_SIGNING_KEY", "BATCHINFER_SIGNING_CERT", "BATCHINFER_SIGNING_CERTS"
PASSWORD = "BATCHINFER_SIGNING_KEY_PASSWORD"
DIGEST = "sha256"
SIGNED = "auth"  # kombu's name of the serializer, and its content type
SIGNED_TYPE = "application/data"
JSON_TYPE = "application/json"
INSTALL_HINT = "pip install 'keras-batch-inference[signing]' (the cryptography package)"


@dataclass(frozen=True)
class Signing:
    """The signing options (see the module docstring); ``Signing()`` is off::

        signing = Signing.from_env(os.environ)
        if signing.on:
            config.update(signing.celery())
            signing.install()  # before the first message is sent or read
    """

    key: str | None = None
    cert: str | None = None
    certs: str | None = None
    key_password: str | None = field(default=None, repr=False)

    @property
    def on(self) -> bool:
        return self.key is not None

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Signing:
        given = {name: (env.get(name) or "").strip() for name in (KEY, CERT, CERTS)}
        password = env.get(PASSWORD) or None
        if not any(given.values()):
            if password:
                raise ConfigError(f"{PASSWORD} is set but {KEY} is not (signing needs {KEY}, {CERT} and {CERTS})")
            return cls()
        missing = [name for name, value in given.items() if not value]
        if missing:
            raise ConfigError(f"signed messages need {KEY}, {CERT} and {CERTS}: {' and '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not set")
        _store_files(given[CERTS])  # a folder or glob with something in it
        return cls(readable_file(env, KEY), readable_file(env, CERT), given[CERTS], password)

    def celery(self) -> dict[str, object]:
        """The Celery settings of signed messages. Remote control (``celery inspect``/``control``, Flower's
        buttons) follows ``task_serializer`` and ``accept_content``, so it is signed too. Events stay JSON:
        Celery's event receivers accept JSON whatever ``event_serializer`` says, so signing them would keep
        nothing out (they only feed monitors)."""
        return {"task_serializer": SIGNED, "accept_content": [SIGNED], "security_key": self.key,
                "security_certificate": self.cert, "security_cert_store": self.certs, "security_digest": DIGEST}

    def check(self, config: dict[str, object]) -> None:
        """``ConfigError`` when a ``BATCHINFER_CELERY_*`` override undid signing."""
        if config.get("task_serializer") != SIGNED or config.get("accept_content") not in ([SIGNED], (SIGNED,)):
            raise ConfigError("BATCHINFER_CELERY_TASK_SERIALIZER and BATCHINFER_CELERY_ACCEPT_CONTENT cannot be "
                              f"changed while {KEY} is set (messages are signed: {SIGNED} only)")

    def serializer(self) -> JsonOnly:
        """The key, certificate and trusted store loaded and checked, or ``ConfigError`` naming the variable."""
        from celery.exceptions import ImproperlyConfigured, SecurityError

        try:
            from celery.security.certificate import Certificate, CertStore
            from celery.security.key import PrivateKey
            from celery.security.serialization import SecureSerializer
            from celery.security.utils import get_digest_algorithm
        except (ImportError, ImproperlyConfigured):  # what celery.security raises without cryptography
            raise ConfigError(f"signed messages need the cryptography package: {INSTALL_HINT}") from None
        assert self.key and self.cert and self.certs
        key = _load(KEY, self.key, lambda text: PrivateKey(text, password=self.key_password))
        cert = _load(CERT, self.cert, Certificate)
        if cert.has_expired():
            raise ConfigError(f"{CERT}: {self.cert} has expired")
        digest = get_digest_algorithm(DIGEST)
        try:
            cert.verify(b"batchinfer", key.sign(b"batchinfer", digest), digest)
        except (SecurityError, TypeError):  # TypeError: Celery 5.7's report of a bad signature
            raise ConfigError(f"{KEY} ({self.key}) is not the key of {CERT} ({self.cert})") from None
        store = CertStore()
        seen: dict[str, str] = {}  # certificate id (issuer and serial number) -> file
        for path in _store_files(self.certs):
            trusted = _load(CERTS, path, Certificate)
            if trusted.has_expired():  # Celery refuses to start with one; say which file
                raise ConfigError(f"{CERTS}: {path} has expired (remove it from the trusted certificates)")
            if trusted.get_id() in seen:
                raise ConfigError(f"{CERTS}: {path} and {seen[trusted.get_id()]} have the same issuer and serial "
                                  "number (one certificate twice?)")
            seen[trusted.get_id()] = path
            store.add_cert(trusted)
        if cert.get_id() not in seen:  # a worker would refuse the shards it re-publishes, and its own replies
            raise ConfigError(f"{CERTS} ({self.certs}) must hold this host's own certificate ({self.cert})")
        return JsonOnly(SecureSerializer(key, cert, store, DIGEST, serializer="json"))

    def install(self) -> None:
        """Register the ``auth`` serializer in kombu's registry (process-wide, as ``app.setup_security`` does);
        pool processes forked later inherit it."""
        from kombu.serialization import registry

        signer = self.serializer()
        registry.register(SIGNED, signer.serialize, signer.deserialize, content_type=SIGNED_TYPE,
                          content_encoding="utf-8")


class JsonOnly:
    """Celery's ``SecureSerializer``, refusing a signed body that is not JSON, and saying "bad signature" when
    the signature does not verify (Celery 5.7 reports it as a ``TypeError`` about catching classes).

    The envelope names the content type of the body it signs, and Celery decodes that body with
    ``force=True``: whoever holds a trusted key could make every worker unpickle. A key lets a host submit
    jobs, which confinement (``BATCHINFER_ALLOWED_ROOTS``) keeps in bounds; it must not let it run code."""

    def __init__(self, signer: Any) -> None:
        self.signer = signer

    def serialize(self, data: Any) -> Any:
        return self.signer.serialize(data)

    def deserialize(self, data: Any) -> Any:
        from celery.exceptions import SecurityError

        try:
            envelope = self.signer._unpack(data)
        except Exception:  # not an envelope at all: Celery's own error below says so
            envelope = None
        if envelope is not None and envelope["content_type"] != JSON_TYPE:
            raise SecurityError(f"Refusing signed content of type {envelope['content_type']!r}: only JSON")
        try:
            return self.signer.deserialize(data)
        except SecurityError as exc:
            if envelope is None or not _invalid_signature(exc):
                raise
            signer = envelope["signer"].decode("utf-8", "replace")
            raise SecurityError(f"Bad signature: not made with the key of certificate {signer!r}") from None


def _invalid_signature(exc: BaseException | None) -> bool:
    from cryptography.exceptions import InvalidSignature

    while exc is not None:
        if isinstance(exc, InvalidSignature):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _store_files(certs: str) -> list[str]:
    """The files of the trusted store: every file in a folder, or what a glob matches."""
    pattern = os.path.join(certs, "*") if os.path.isdir(certs) else certs
    files = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
    if not files:
        raise ConfigError(f"{CERTS}: no certificates at {certs} (a folder of certificates, or a glob such as "
                          "/etc/batchinfer/trusted/*.crt)")
    for path in files:
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{CERTS}: cannot read {path}")
    return files


def _load(name: str, path: str, parse: Any) -> Any:
    """``parse`` of the file's text; what Celery and cryptography say against it becomes one line."""
    from celery.exceptions import SecurityError

    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read())
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not a PEM file (binary)") from None
    except (SecurityError, ValueError, TypeError) as exc:  # not PEM, not RSA; TypeError: a password missing or extra
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{name}: {path}: {reason}") from None
