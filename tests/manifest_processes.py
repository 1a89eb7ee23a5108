"""What a rendered kustomization says to run, run as local processes: each Deployment's `replicas` pods become
that many processes of the container's command and args, with its env, on loopback.

Only what a cluster provides differently is changed, in one place (`Pod.translate`), each change with its
reason: container ports become free loopback ports, the image's /models/ paths the checkout's models/,
headless Services' DNS names the addresses of the pods they select, and an OTLP collector that does not exist
here is not dialled. Everything else (threads, drain timeouts, gamma policy, session memory, resolve interval,
probes, replica counts) is the manifest's own.

Knows nothing of what the services do: it starts them in the order DNS would make them reachable, asks
their probes as the kubelet would, scrapes the port their Prometheus annotation names, and stops them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.test_k8s_manifests import objects, pod_spec, selects
from transport import free_port

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
HOST = "127.0.0.1"
DNS_SCHEME = "dns:///"
# Where the CPU image carries the shipped pair (Dockerfile, shipped-pair stage), and where the checkout has it.
IMAGE_MODELS = "/models/"
LOCAL_MODELS = REPO / "models"
# The variables that tell a service which port to bind: each must be one of its container's ports.
PORT_VARIABLES = ("SPECDEC_PORT", "SPECDEC_HEALTH_PORT", "SPECDEC_METRICS_PORT")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# What the API server fills in for a probe field the manifest leaves out.
PROBE_DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3,
                  "successThreshold": 1}
HEALTH_STATUS = health_pb2.HealthCheckResponse.ServingStatus


def image_entrypoint() -> list[str]:
    """The ENTRYPOINT the image runs a container's args with (the last one the Dockerfile sets)."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT ")]
    assert lines, "the Dockerfile sets no ENTRYPOINT"
    return json.loads(lines[-1][len("ENTRYPOINT "):])


def local_executable(name: str) -> str:
    """The image's console script is the venv's (installed from the same pyproject.toml)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed in {Path(sys.executable).parent}: run ./setup.sh"
    return found


def probe(container: dict, kind: str) -> dict | None:
    """The container's probe of that kind with Kubernetes' defaults filled in; None if it has none."""
    defined = container.get(kind)
    return None if defined is None else {**PROBE_DEFAULTS, **defined}


def memory_limit_bytes(container: dict) -> int | None:
    quantity = (container.get("resources", {}).get("limits") or {}).get("memory")
    if quantity is None:
        return None
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if str(quantity).endswith(suffix):
            return int(float(str(quantity)[: -len(suffix)]) * factor)
    return int(quantity)


def health_status(address: str, service: str = "", timeout_s: float = 1.0) -> int | None:
    """One gRPC health Check on a fresh connection, as the kubelet's grpc probe makes it; None: no answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout_s).status
        except grpc.RpcError:
            return None


@dataclass
class Pod:
    """One replica of a Deployment, run as a local process."""
    deployment: dict
    index: int
    ports: dict[int, int]  # containerPort -> the loopback port standing in for it
    log_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # the container's env as run here
    process: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"{self.deployment['metadata']['name']}-{self.index}"

    @property
    def container(self) -> dict:
        [container] = pod_spec(self.deployment)["containers"]
        return container

    @property
    def labels(self) -> dict[str, str]:
        return self.deployment["spec"]["template"]["metadata"]["labels"]

    @property
    def component(self) -> str:
        return self.labels["app.kubernetes.io/component"]

    def address(self, container_port: int) -> str:
        """Where this pod's containerPort is reached here (a pod IP and that port, in a cluster)."""
        assert container_port in self.ports, f"{self.name} has no containerPort {container_port}"
        return f"{HOST}:{self.ports[container_port]}"

    def named_port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.container["ports"] if p["name"] == name)

    def metrics_url(self) -> str:
        """The scrape target Prometheus finds from the pod's annotations (prometheus.io/port, path /metrics)."""
        annotations = self.deployment["spec"]["template"]["metadata"].get("annotations") or {}
        assert annotations.get("prometheus.io/scrape") == "true", f"{self.name} is not scraped"
        path = annotations.get("prometheus.io/path", "/metrics")
        return f"http://{self.address(int(annotations['prometheus.io/port']))}{path}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def peak_rss_bytes(self) -> int | None:
        """The process's peak resident memory (VmHWM), what a memory limit would have had to hold."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
        return None if kib is None else int(kib) * 1024


class LocalCluster:
    """The Deployments of one rendered kustomization as local processes (see the module docstring)."""

    def __init__(self, docs: tuple[dict, ...], log_dir: Path, entrypoint: list[str] | None = None):
        self.docs = docs
        self.log_dir = log_dir
        self.entrypoint = entrypoint or image_entrypoint()
        self.deployments = objects(docs, "Deployment")
        self.services = objects(docs, "Service")
        self.pods: dict[str, list[Pod]] = {}
        taken: set[int] = set()
        for name, deployment in self.deployments.items():
            [container] = pod_spec(deployment)["containers"]
            self.pods[name] = [
                Pod(deployment, i, {p["containerPort"]: self._free_port(taken) for p in container.get("ports", [])},
                    log_dir / f"{name}-{i}.log")
                for i in range(deployment["spec"].get("replicas", 1))]
        for pods in self.pods.values():
            for pod in pods:
                pod.argv, pod.env = self.translate(pod)

    @staticmethod
    def _free_port(taken: set[int]) -> int:
        """A free loopback port none of this cluster's pods was given yet (the OS may hand one out twice)."""
        while (port := free_port(HOST)) in taken:
            pass
        taken.add(port)
        return port

    # -- what a cluster provides differently ------------------------------------------------------------------
    def translate(self, pod: Pod) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of `pod` as run here: the manifest's, changed only where noted."""
        container = pod.container
        # No `command`: the image's ENTRYPOINT runs the args. Its `specdec` is the venv's console script.
        command = container.get("command") or self.entrypoint
        argv = [local_executable(command[0]), *(self._value(pod, a) for a in [*command[1:], *container.get("args", [])])]
        env = {}
        for variable in container.get("env", []):
            assert "value" in variable, f"{pod.name}: {variable['name']} has no literal value (valueFrom is not run here)"
            env[variable["name"]] = variable["value"]
        for name in PORT_VARIABLES:
            if name in env:
                # Every pod has its own network namespace, so all replicas bind the same ports there; here they
                # share one, so each replica's port is a free loopback port standing in for its containerPort
                # (which the variable must be: nothing in the cluster could reach any other port).
                assert int(env[name]) in pod.ports, f"{pod.name}: {name}={env[name]} is not one of its containerPorts"
                env[name] = str(pod.ports[int(env[name])])
        # A pod binds every interface of its own network namespace; processes sharing this host's bind loopback.
        env["SPECDEC_HOST"] = HOST
        if env.get("OTEL_TRACES_EXPORTER", "none") != "none" or "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
            # The collector the manifests name (otel-collector.observability) does not exist here: dialling it
            # would only retry and log (an otlp exporter with no endpoint dials localhost:4317, absent too). So
            # no endpoint and no trace exporter: nothing is pushed, and the Prometheus endpoint
            # (SPECDEC_METRICS_PORT) is served as in the cluster.
            for name in [n for n in env if n.startswith("OTEL_EXPORTER_OTLP_")]:
                del env[name]
            env["OTEL_TRACES_EXPORTER"] = "none"
        return argv, {name: self._value(pod, value) for name, value in env.items()}

    def _value(self, pod: Pod, value: str) -> str:
        if value.startswith(IMAGE_MODELS):
            # The CPU image carries the shipped pair at /models/target and /models/draft; the checkout has the
            # same files under models/.
            local = LOCAL_MODELS / value[len(IMAGE_MODELS):]
            assert local.is_dir(), f"{pod.name}: {value} has no counterpart {local}"
            return str(local)
        if value.startswith(DNS_SCHEME):
            # A headless Service's name resolves to the IPs of the ready pods it selects; here, each selected
            # replica's loopback address for the port named. The services are started in dependency order, so
            # every replica is ready when its dialler starts, as DNS would list it.
            host, _, port = value[len(DNS_SCHEME):].rpartition(":")
            return ",".join(self.service_addresses(host.split(".")[0], int(port)))
        return value

    def service(self, name: str) -> dict:
        assert name in self.services, f"no Service {name} in the rendered manifests"
        return self.services[name]

    def selected_pods(self, service_name: str) -> list[Pod]:
        selector = {"matchLabels": self.service(service_name)["spec"].get("selector") or {}}
        return [pod for pods in self.pods.values() for pod in pods if selects(selector, pod.labels)]

    def service_addresses(self, service_name: str, port: int) -> list[str]:
        """What dialling NAME:PORT reaches: for a headless Service, every selected pod at PORT itself."""
        service = self.service(service_name)
        assert service["spec"].get("clusterIP") == "None", (
            f"Service {service_name} is not headless: its name would resolve to one virtual IP, not to each pod")
        pods = self.selected_pods(service_name)
        assert pods, f"Service {service_name} selects no pod"
        return [pod.address(port) for pod in pods]

    def virtual_ip_targets(self, service_name: str, port: int) -> list[str]:
        """What a connection to a ClusterIP Service's NAME:PORT may reach: kube-proxy sends each connection to
        one selected pod's targetPort (a name or a number). Each address is one such pod."""
        service = self.service(service_name)
        assert service["spec"].get("clusterIP") != "None", f"Service {service_name} is headless"
        [service_port] = [p for p in service["spec"]["ports"] if p["port"] == port]
        target = service_port.get("targetPort", port)
        pods = self.selected_pods(service_name)
        assert pods, f"Service {service_name} selects no pod"
        return [pod.address(pod.named_port(target) if isinstance(target, str) else target) for pod in pods]

    def dependencies(self, deployment_name: str) -> set[str]:
        """The Deployments whose pods this one's dns:/// names select (they must be ready before it starts)."""
        [container] = pod_spec(self.deployments[deployment_name])["containers"]
        values = [e.get("value", "") for e in container.get("env", [])] + list(container.get("args", []))
        needed = set()
        for value in values:
            if value.startswith(DNS_SCHEME):
                service = value[len(DNS_SCHEME):].rpartition(":")[0].split(".")[0]
                needed |= {pod.deployment["metadata"]["name"] for pod in self.selected_pods(service)}
        return needed

    def start_order(self) -> list[list[str]]:
        """Waves of Deployments: each wave needs only the ones before it."""
        waves, started = [], set()
        remaining = set(self.deployments)
        while remaining:
            wave = sorted(name for name in remaining if self.dependencies(name) <= started)
            assert wave, f"the dns:/// names of {sorted(remaining)} form a cycle"
            waves.append(wave)
            started |= set(wave)
            remaining -= set(wave)
        return waves

    # -- running ----------------------------------------------------------------------------------------------
    def all_pods(self) -> list[Pod]:
        return [pod for pods in self.pods.values() for pod in pods]

    def of_component(self, component: str) -> list[Pod]:
        return [pod for pod in self.all_pods() if pod.component == component]

    def spawn(self, pod: Pod) -> None:
        # The test's own environment (PATH, HOME, ...) minus anything that would configure the service besides
        # the manifest: no SPECDEC_* or OTEL_* variable leaks in from the shell that runs the tests.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SPECDEC_", "OTEL_"))}
        with open(pod.log_path, "w") as log:
            # The working directory is not the checkout (a container's is /home/specdec): nothing may rely on it.
            pod.process = subprocess.Popen(pod.argv, env={**base, **pod.env}, cwd=self.log_dir, stdout=log,
                                           stderr=subprocess.STDOUT)

    def start(self, startup_cap_s: float) -> dict[str, float]:
        """Start every Deployment's replicas, wave by wave, each wave once the one before passed its
        startupProbes. The seconds each pod took to start."""
        took = {}
        for wave in self.start_order():
            pods = [pod for name in wave for pod in self.pods[name]]
            began = time.monotonic()
            for pod in pods:
                self.spawn(pod)
            for pod in pods:
                self.wait_started(pod, startup_cap_s, began)
                took[pod.name] = time.monotonic() - began
        return took

    def wait_started(self, pod: Pod, cap_s: float, began: float) -> None:
        """Poll the startupProbe until it passes, within the bound the probe gives (initialDelaySeconds +
        failureThreshold x periodSeconds), capped at cap_s. The kubelet asks once a period; this asks more
        often, so a pod that starts is seen to start sooner, but one that does not still fails at the bound."""
        spec = probe(pod.container, "startupProbe") or probe(pod.container, "readinessProbe")
        assert spec is not None and "grpc" in spec, f"{pod.name} has no grpc startup or readiness probe"
        bound = min(cap_s, spec["initialDelaySeconds"] + spec["failureThreshold"] * spec["periodSeconds"])
        address = pod.address(spec["grpc"]["port"])
        while True:
            if not pod.alive():
                raise RuntimeError(f"{pod.name} exited with code {pod.process.returncode} before its startupProbe "
                                   f"passed\n{self.log_tails()}")
            if health_status(address, spec["grpc"].get("service", ""), spec["timeoutSeconds"]) == HEALTH_STATUS.SERVING:
                return
            if time.monotonic() - began > bound:
                raise TimeoutError(f"{pod.name}: startupProbe on {address} not SERVING after {bound:.0f} s\n"
                                   f"{self.log_tails()}")
            time.sleep(0.25)

    def probe_passes(self, pod: Pod, kind: str) -> bool:
        """The probe as the kubelet counts it: it fails only after failureThreshold failed attempts in a row,
        each a Check with timeoutSeconds. (The kubelet waits periodSeconds between them; this does not.)"""
        spec = probe(pod.container, kind)
        address = pod.address(spec["grpc"]["port"])
        for _ in range(spec["failureThreshold"]):
            if health_status(address, spec["grpc"].get("service", ""), spec["timeoutSeconds"]) == HEALTH_STATUS.SERVING:
                return True
        return False

    def log_tails(self) -> str:
        return "\n".join(pod.log_tail() for pod in self.all_pods() if pod.process is not None)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every process (the diallers first: they release their sessions), SIGKILL what outlives the
        timeout. Only the processes this cluster started are signalled."""
        waves = [[pod for name in wave for pod in self.pods[name] if pod.process is not None]
                 for wave in reversed(self.start_order())]
        for pods in waves:
            for pod in pods:
                if pod.alive():
                    pod.process.terminate()
            deadline = time.monotonic() + timeout_s
            for pod in pods:
                try:
                    pod.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pod.process.kill()
                    pod.process.wait()


def scrape(pod: Pod, timeout_s: float = 10.0) -> dict[str, float]:
    """The pod's Prometheus samples, summed by sample name over their labels."""
    with urllib.request.urlopen(pod.metrics_url(), timeout=timeout_s) as reply:
        text = reply.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals
