# syntax=docker/dockerfile:1
# One image for every role: `specdec serve draft|verify|orchestrator|openai` (the k8s/ manifests pass
# `serve ROLE` as arguments to this ENTRYPOINT).
#
#   GPU pools (CUDA torch, the default):
#     docker build --target runtime -t specdec:0.1.0-cuda .
#   CPU, with the shipped reference pair at /models (k8s/overlays/cpu: no volume needed):
#     docker build --build-arg TORCH_VARIANT=cpu --target shipped-pair -t specdec:0.1.0-cpu .
#
# Stages: builder (the wheels of both distributions: specdec-client from client_sdk/, then specdec, which
# depends on it by exact version), runtime (torch, then the wheels at the versions in constraints.txt, the
# set the test suite passed with; a non-root user), shipped-pair (runtime + models/target and models/draft).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY client_sdk/pyproject.toml client_sdk/README.md client_sdk/
COPY client_sdk/specdec_client client_sdk/specdec_client
COPY client_sdk/specdec_api client_sdk/specdec_api
COPY pyproject.toml README.md ./
# The packages of pyproject.toml's [tool.setuptools.packages.find] include list, one line each
# (tests/test_k8s_manifests.py checks that none is missing).
COPY speculation speculation
COPY serving serving
COPY draft_service draft_service
COPY verify_service verify_service
COPY orchestrator orchestrator
COPY specdec_cli specdec_cli
COPY telemetry telemetry
COPY transport transport
COPY service_common service_common
COPY local_stack local_stack
COPY trace_analysis trace_analysis
COPY openai_api openai_api
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./client_sdk .

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
# cu128: a CUDA 12.8 build of torch (the nodes need an NVIDIA driver of the CUDA 12 line); cpu: the CPU-only build, ~10x
# smaller. Any variant the PyTorch index carries for TORCH_VERSION works (cu126, cu128, cu130, ...).
ARG TORCH_VARIANT=cu128
# The version setup.sh installs (TORCH_VERSION there too): the one the test suite passed with.
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# torch alone first, from the PyTorch index of the chosen variant: the largest layer (GBs with CUDA) stays
# cached while the code and the other pins change.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"
COPY constraints.txt /tmp/constraints.txt
COPY --from=builder /wheels /tmp/wheels
# Both wheels at once: pip finds specdec-client among them for specdec's exact-version requirement. The
# constraints also bring torch's own dependencies to the pinned versions; pip check fails the build on any
# conflict, and `specdec --help` on an entry point that does not start.
RUN pip install --no-cache-dir -c /tmp/constraints.txt /tmp/wheels/*.whl \
    && pip check \
    && rm -rf /tmp/wheels /tmp/constraints.txt \
    && specdec --help > /dev/null
RUN groupadd --gid 10001 specdec \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin specdec
USER 10001:10001
WORKDIR /home/specdec
# orchestrator 50051, verify 50052, draft 50053 (gRPC), plaintext health 8081, Prometheus metrics 9464:
# the ports k8s/ configures.
EXPOSE 50051 50052 50053 8081 9464
ENTRYPOINT ["specdec"]
CMD ["--help"]

FROM runtime AS shipped-pair
# Owned by root and read-only to the service's user; /models/target and /models/draft are the paths
# k8s/base gives SPECDEC_MODEL and SPECDEC_TOKENIZER.
COPY models/target /models/target
COPY models/draft /models/draft
