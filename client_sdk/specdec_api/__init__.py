"""Generated gRPC stubs for the specdec.v1 API (`python protos/build_stubs.py` rewrites them)."""
