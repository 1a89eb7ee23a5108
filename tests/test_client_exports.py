"""What the SDK gives its users: every error it can raise is importable from `specdec_client` (so callers can
catch it without reaching into submodules), and importing it loads grpcio and protobuf and nothing else."""

from __future__ import annotations

import inspect
import subprocess
import sys

import specdec_client
from specdec_client import errors


def test_every_error_the_sdk_raises_is_exported():
    raised = {cls.__name__ for cls in vars(errors).values()
              if inspect.isclass(cls) and issubclass(cls, errors.SpecDecError)}
    assert {cls.__name__ for cls in errors._BY_CODE.values()} <= raised
    assert {"SpecDecError", "Cancelled", "Unauthenticated", "PermissionDenied"} <= raised
    missing = raised - set(specdec_client.__all__)
    assert not missing, f"add to specdec_client.__all__: {sorted(missing)}"
    assert all(getattr(specdec_client, name, None) is not None for name in specdec_client.__all__)


def test_importing_the_sdk_loads_only_grpcio_and_protobuf():
    """Measured after importing grpc and protobuf themselves, so their own optional imports (grpc tries
    grpc_tools, grpc_health, grpc_reflection) do not count."""
    code = ("import sys, grpc, google.protobuf.message\n"
            "before = set(sys.modules)\n"
            "import specdec_client\n"
            "added = {name.split('.')[0] for name in set(sys.modules) - before}\n"
            "print(sorted(added - set(sys.stdlib_module_names) - {'specdec_client', 'specdec_api', 'grpc', 'google'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the SDK imported more than grpcio and protobuf: {done.stdout}"
