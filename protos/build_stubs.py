"""Generates the Python stubs in client_sdk/specdec_api/ from the .proto files beside this script.

    python protos/build_stubs.py            # write client_sdk/specdec_api/*_pb2*.py
    python protos/build_stubs.py --out DIR  # write DIR/specdec_api/ (the staleness test compares the two)

The stubs of every proto go to the client distribution (client_sdk/), which the servers depend on too:
protoc names modules by proto path, so they are all `specdec_api.*`, one package in one distribution.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
STUBS_ROOT = REPO_ROOT / "client_sdk"  # the distribution whose specdec_api/ package holds the stubs


def build(out: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted((PROTO_ROOT / "specdec_api").glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "specdec_api").glob("*_pb2*.py*"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=STUBS_ROOT)
    written = build(parser.parse_args().out)
    print("\n".join(str(p) for p in written), file=sys.stderr)
