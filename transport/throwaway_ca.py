"""A throwaway certificate authority and leaf certificates in a directory, for tests and `specdec bench
--tls`. Needs `trustme` (in the `test` extra); never for production certificates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transport.tls import TLSSettings

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class Identity:
    cert: Path
    key: Path
    ca: Path

    def tls(self, require_client_cert: bool = True, **overrides) -> TLSSettings:
        return TLSSettings(cert=str(self.cert), key=str(self.key), ca=str(self.ca),
                           require_client_cert=require_client_cert, **overrides)

    def client_kwargs(self) -> dict:
        """The SDK's keyword arguments for this identity (Client(address, **identity.client_kwargs()))."""
        return {"root_certificates": self.ca.read_bytes(), "private_key": self.key.read_bytes(),
                "certificate_chain": self.cert.read_bytes()}

    def cli_args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


class ThrowawayCA:
    def __init__(self, organization: str = "specdec throwaway CA"):
        try:
            import trustme
        except ImportError as error:  # pragma: no cover - the message is the point
            raise RuntimeError("making throwaway certificates needs trustme: pip install trustme "
                               "(or pip install -e '.[test]')") from error
        self._ca = trustme.CA(organization_name=organization)

    def write_ca(self, path: Path) -> Path:
        self._ca.cert_pem.write_to_path(str(path))
        return path

    def issue(self, directory: Path, name: str, hosts=LOCAL_NAMES) -> Identity:
        """A leaf for `hosts` (usable as server and client certificate) as NAME.crt / NAME.key, and the CA
        beside them as NAME-ca.crt."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        leaf = self._ca.issue_cert(*hosts)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        key.chmod(0o600)
        return Identity(cert, key, self.write_ca(directory / f"{name}-ca.crt"))
