"""Starting draft, verify and orchestrator as local subprocesses (demo, bench, study)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from local_stack.paths import REPO_ROOT
from transport import free_port


def wait_healthy(address: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"service for {address} exited with code {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(f"{address} not healthy after {timeout_s:.0f}s")


def stop_processes(processes: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGTERM, so each service drains and flushes its exporters; SIGKILL what outlives the timeout."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class LocalStack:
    orchestrator: str
    draft: str
    verify: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    client_tls: dict = field(default_factory=dict)  # with tls_dir: the SDK's arguments (Client(address, **it))


def spawn(args: list[str], cpu: int | None, env_extra: dict | None = None, log_path=None) -> subprocess.Popen:
    command = [sys.executable, "-m", "specdec_cli", *args]
    if cpu is not None and sys.platform.startswith("linux"):
        command = ["taskset", "-c", str(cpu), *command]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **(env_extra or {})}
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


@contextmanager
def local_stack(target: str, draft: str, *, draft_cpu: int | None = None, verify_cpu: int | None = None,
                orchestrator_cpu: int | None = None, threads: int = 1, orchestrator_args: tuple[str, ...] = (),
                env_extra: dict | None = None, log_dir=None, draft_address: str | None = None,
                verify_args: tuple[str, ...] = (), draft_args: tuple[str, ...] = (),
                verify_address: str | None = None, timeout_s: float = 180.0,
                tls_dir: Path | None = None) -> Iterator[LocalStack]:
    """Draft, verify and orchestrator processes on free loopback ports; stopped (SIGTERM) on exit.

    draft_address / verify_address override where the orchestrator reaches them (a delay relay).
    tls_dir: a throwaway CA and one certificate per role there (transport/throwaway_ca.py, needs trustme);
    every role serves mTLS and the orchestrator dials with its own; health is checked on each role's
    plaintext health port, and `client_tls` holds a client certificate for the SDK."""
    ports = {name: free_port() for name in ("draft", "verify", "orchestrator")}
    security = {name: [] for name in ports}
    health = dict(ports)
    client_tls: dict = {}
    if tls_dir is not None:
        from transport.throwaway_ca import ThrowawayCA

        ca = ThrowawayCA()
        for name in ports:
            health[name] = free_port()
            security[name] = [*ca.issue(Path(tls_dir), name).cli_args(), "--tls-require-client-cert",
                              "--health-port", str(health[name])]
        client_tls = ca.issue(Path(tls_dir), "client").client_kwargs()
    processes: list[subprocess.Popen] = []

    def log(name):
        return (log_dir / f"{name}.log") if log_dir else None

    try:
        processes.append(spawn(["serve", "draft", "--model", draft, "--port", str(ports["draft"]),
                                "--threads", str(threads), *security["draft"], *draft_args], draft_cpu, env_extra,
                               log("draft")))
        processes.append(spawn(["serve", "verify", "--model", target, "--port", str(ports["verify"]),
                                "--threads", str(threads), *security["verify"], *verify_args], verify_cpu,
                               env_extra, log("verify")))
        wait_healthy(f"127.0.0.1:{health['draft']}", timeout_s, processes[0])
        wait_healthy(f"127.0.0.1:{health['verify']}", timeout_s, processes[1])
        processes.append(spawn(["serve", "orchestrator", "--port", str(ports["orchestrator"]),
                                "--draft", draft_address or f"127.0.0.1:{ports['draft']}",
                                "--verify", verify_address or f"127.0.0.1:{ports['verify']}",
                                *security["orchestrator"], *orchestrator_args], orchestrator_cpu, env_extra,
                               log("orchestrator")))
        wait_healthy(f"127.0.0.1:{health['orchestrator']}", timeout_s, processes[2])
        yield LocalStack(f"127.0.0.1:{ports['orchestrator']}", f"127.0.0.1:{ports['draft']}",
                         f"127.0.0.1:{ports['verify']}", processes, client_tls)
    finally:
        stop_processes(list(reversed(processes)))
