"""TLS settings of one process, and gRPC credentials built from PEM files that are re-read when they change.

The same settings serve both directions: as a server, `cert`/`key` are the identity shown to callers and
`ca` verifies their client certificates (required with `require_client_cert`); as a client (the
orchestrator dialling draft and verify), `cert`/`key` are the client identity and `ca` verifies the
services. Certificates rotate without a restart: the server side hands gRPC a fetcher it calls before
every new handshake (`grpc.dynamic_ssl_server_credentials`), the client side rebuilds its channel
(transport/channel.py). A half-written rotation (a key that does not match its certificate) is not
taken: the previous files stay in use and a warning says why.

Knows files and credentials, not which service runs behind them.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TLSSettings:
    cert: str | None = None  # PEM certificate chain: this process's identity (listening and dialling)
    key: str | None = None  # PEM private key of `cert`
    ca: str | None = None  # PEM CA bundle: peers are verified against it
    require_client_cert: bool = False  # listening: refuse callers without a certificate signed by `ca`
    server_name: str | None = None  # dialling: the name checked on the services' certificates
    reload_interval_s: float = 5.0  # dialling: how often the files are checked for a rotation

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert and self.key)

    @property
    def dials_tls(self) -> bool:
        return bool(self.ca or self.cert)

    def problems(self) -> list[str]:
        """What is wrong with these flags, for a person to fix; empty when they are usable."""
        problems = []
        if bool(self.cert) != bool(self.key):
            problems.append("--tls-cert and --tls-key go together (the certificate and its private key)")
        if self.require_client_cert and not self.ca:
            problems.append("--tls-require-client-cert needs --tls-ca (the CA that signs client certificates)")
        if self.require_client_cert and not self.serves_tls:
            problems.append("--tls-require-client-cert needs --tls-cert and --tls-key (a server certificate)")
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path and not os.path.isfile(path):
                problems.append(f"{flag}: no file at {path}")
        return problems

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))


class WatchedFiles:
    """PEM files read together, and read again once any of them changed on disk (mtime, size or inode:
    a Kubernetes secret volume swaps a symlink, which changes the inode). `poll` returns the new contents
    only when they differ from the contents in use and pass `validate`."""

    def __init__(self, paths: dict[str, str | None], validate=lambda contents: None):
        self.paths = {name: path for name, path in paths.items() if path}
        self._validate = validate
        self._signature = self._stat()
        self.contents = self._read()
        validate(self.contents)
        self._rejected_signature = None

    def _stat(self) -> tuple:
        signature = []
        for path in self.paths.values():
            try:
                st = os.stat(path)
                signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                signature.append(None)
        return tuple(signature)

    def _read(self) -> dict[str, bytes]:
        contents = {}
        for name, path in self.paths.items():
            with open(path, "rb") as f:
                contents[name] = f.read()
        return contents

    def poll(self) -> dict[str, bytes] | None:
        signature = self._stat()
        if signature == self._signature or signature == self._rejected_signature:
            return None
        try:
            contents = self._read()
            if contents == self.contents:
                self._signature = signature
                return None
            self._validate(contents)
        except (OSError, ValueError, ssl.SSLError) as error:
            # Mid-rotation (one file replaced, not yet the other) or a bad file: keep what works.
            self._rejected_signature = signature
            log.warning("TLS files %s changed but cannot be used (%s); keeping the previous ones",
                        ", ".join(self.paths.values()), error)
            return None
        self._signature, self.contents = signature, contents
        log.info("TLS files reloaded: %s", ", ".join(self.paths.values()))
        return contents


def validate_pem(contents: dict[str, bytes]) -> None:
    """The key matches the certificate and the CA bundle parses (stdlib ssl, so a half-rotated pair is
    caught before gRPC would fail every handshake with it)."""
    if "cert" in contents and "key" in contents:
        with tempfile.TemporaryDirectory() as directory:
            cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
            for path, data in ((cert, contents["cert"]), (key, contents["key"])):
                with open(path, "wb") as f:
                    f.write(data)
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
            except ssl.SSLError as error:
                raise ValueError(f"the private key does not match the certificate, or one is not PEM ({error})") from error
    if contents.get("ca"):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=contents["ca"].decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as error:
            raise ValueError(f"the CA bundle is not PEM certificates ({error})") from error


def watch(tls: TLSSettings) -> WatchedFiles:
    return WatchedFiles({"cert": tls.cert, "key": tls.key, "ca": tls.ca}, validate_pem)


def _server_configuration(contents: dict[str, bytes]) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(contents["key"], contents["cert"])], contents.get("ca"))


def server_credentials(tls: TLSSettings) -> grpc.ServerCredentials:
    """TLS server credentials whose certificate, key and CA follow the files: gRPC calls the fetcher before
    each new connection's handshake (a few stat calls), so connections opened after a rotation use the new
    files and established ones keep theirs."""
    tls.check()
    files = watch(tls)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            contents = files.poll()
        except Exception:  # noqa: BLE001 - an exception here would fail the handshake of a good client
            log.exception("reading the TLS files")
            return None
        return None if contents is None else _server_configuration(contents)

    return grpc.dynamic_ssl_server_credentials(_server_configuration(files.contents), fetch,
                                               require_client_authentication=tls.require_client_cert)


def channel_credentials(contents: dict[str, bytes]) -> grpc.ChannelCredentials:
    """Client credentials from loaded PEM contents: `ca` (None: the system's roots), `cert`/`key` (a client
    identity, for servers that require one)."""
    return grpc.ssl_channel_credentials(root_certificates=contents.get("ca"), private_key=contents.get("key"),
                                        certificate_chain=contents.get("cert"))


def channel_options(tls: TLSSettings) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
