"""The CPU overlay, run as it says: every Deployment of `kubectl kustomize k8s/overlays/cpu` started as its
replicas' local processes (`specdec <args>` with the container's env; tests/manifest_processes.py changes only
what a cluster provides differently: ports, the image's /models/, Service DNS, the OTLP collector). Its probes
pass on every replica; 16 concurrent greedy generations through the orchestrators equal the target's own
`generate`, spread over both replicas of each role, each session on one replica; and losing a verify and a
draft replica mid-run (SIGKILL) leaves every generation exact and complete, the survivors taking the rest."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from local_stack.paths import DEFAULT_TARGET, load_prompts
from specdec_client import Client, GenerationResult
from tests.manifest_processes import (
    DNS_SCHEME, IMAGE_MODELS, PORT_VARIABLES, PROBES, LocalCluster, Pod, memory_limit_bytes, probe, scrape)
from tests.test_k8s_manifests import render

OVERLAY = "overlays/cpu"
MODEL_ROLES = ("verify", "draft")
GENERATIONS = 16
MAX_NEW = 32
# A bound on each startupProbe's own (failureThreshold x periodSeconds: 5 to 10 minutes in the manifests):
# the reference pair loads in seconds, so a pod not up in this time is broken, not slow.
STARTUP_CAP_S = 180.0
CALL_TIMEOUT_S = 120.0
# Each replica of a role starts at least this share of the role's sessions (routing: load-aware, then a
# rendezvous hash among replicas within 25 % of the cheapest; 16 sessions over 2 replicas split ~8/8).
MIN_SHARE = 0.3
CREATED = "specdec_sessions_created_total"
LIVE = "specdec_sessions_live"
PROMPTS = load_prompts()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = LocalCluster(render(OVERLAY), tmp_path_factory.mktemp("pods"))
    try:
        local.start(STARTUP_CAP_S)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def reference():
    """prompt -> (token ids, finish reason) of the target alone: `generate` with greedy decoding, which stops
    after the EOS token and keeps it, as the orchestrator does ("eos"); else max_new_tokens ("length")."""
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_TARGET).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TARGET)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    done: dict[str, tuple[list[int], str]] = {}

    def of(prompt: str) -> tuple[list[int], str]:
        if prompt not in done:
            inputs = tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
            tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
            done[prompt] = tokens, "eos" if tokens and tokens[-1] in eos else "length"
        return done[prompt]

    return of


def orchestrator_clients(cluster: LocalCluster) -> list[Client]:
    """One client per orchestrator pod: the `specdec` Service is a virtual IP that sends each connection to
    one of them; alternating generations over both stands in for many clients' connections."""
    [port] = [p["port"] for p in cluster.service("specdec")["spec"]["ports"]]
    return [Client(address, timeout=CALL_TIMEOUT_S) for address in cluster.virtual_ip_targets("specdec", port)]


def generate_all(cluster: LocalCluster, prompts: list[str]) -> list[GenerationResult]:
    clients = orchestrator_clients(cluster)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(lambda i: clients[i % len(clients)].generate(prompts[i], max_new_tokens=MAX_NEW),
                                 range(len(prompts))))
    finally:
        for client in clients:
            client.close()


def assert_exact(results: list[GenerationResult], prompts: list[str], reference) -> None:
    for prompt, result in zip(prompts, results):
        tokens, finish = reference(prompt)
        assert result.token_ids == tokens, f"prompt {prompt[:50]!r}: not the target's greedy output"
        assert result.finish_reason == finish, f"prompt {prompt[:50]!r}: {result.finish_reason}, not {finish}"


def sessions_created(pods: list[Pod]) -> list[int]:
    return [int(scrape(pod).get(CREATED, 0)) for pod in pods]


def test_the_cpu_overlay_runs_every_replica_with_the_manifests_settings(cluster):
    replicas = {role: len(cluster.of_component(role)) for role in (*MODEL_ROLES, "orchestrator")}
    assert replicas["verify"] >= 2 and replicas["draft"] >= 2, replicas
    assert all(pod.alive() for pod in cluster.all_pods())
    for pod in cluster.all_pods():
        assert pod.argv[1:] == pod.container["args"] and "command" not in pod.container
        manifest = {e["name"]: e["value"] for e in pod.container["env"]}
        # Only what a cluster provides differently differs (tests/manifest_processes.py, Pod.translate).
        for name, value in manifest.items():
            if name in PORT_VARIABLES:
                assert pod.env[name] == str(pod.ports[int(value)])
            elif value.startswith(IMAGE_MODELS):
                assert pod.env[name].endswith("models/" + value[len(IMAGE_MODELS):])
            elif value.startswith(DNS_SCHEME):
                service, _, port = value[len(DNS_SCHEME):].rpartition(":")
                assert pod.env[name] == ",".join(cluster.service_addresses(service.split(".")[0], int(port)))
            elif name.startswith("OTEL_"):
                assert name not in pod.env or pod.env[name] == "none"
            else:
                assert pod.env[name] == value, f"{pod.name}: {name}"
        assert set(pod.env) - set(manifest) <= {"SPECDEC_HOST", "OTEL_TRACES_EXPORTER"}


def test_every_probe_of_every_replica_asks_its_health_port_and_finds_it_serving(cluster):
    for pod in cluster.all_pods():
        health = pod.named_port("health")
        assert pod.env["SPECDEC_HEALTH_PORT"] == str(pod.ports[health])
        for kind in PROBES:
            spec = probe(pod.container, kind)
            assert spec is not None and spec["grpc"]["port"] == health, f"{pod.name} {kind}"
            assert cluster.probe_passes(pod, kind), f"{pod.name} {kind} fails\n{pod.log_tail()}"


def test_sixteen_generations_are_the_targets_own_and_spread_over_both_replicas_of_each_role(cluster, reference):
    prompts = PROMPTS[:GENERATIONS]
    before = {role: sessions_created(cluster.of_component(role)) for role in MODEL_ROLES}
    results = generate_all(cluster, prompts)
    assert_exact(results, prompts, reference)
    assert all(r.stats["reprefills"] == 0 and r.stats["rebinds"] == 0 for r in results)
    for role in MODEL_ROLES:
        after = sessions_created(cluster.of_component(role))
        started = [a - b for a, b in zip(after, before[role])]
        print(f"{role} sessions started per replica: {started}")
        # Each generation started one session per role, on one replica: none started twice (moved).
        assert sum(started) == GENERATIONS, f"{role}: {started}"
        assert min(started) >= MIN_SHARE * GENERATIONS, f"{role}: sessions per replica {started}"
    # Each orchestrator's own metrics: every model replica up (takes new sessions), none left bound.
    replicas = sum(len(cluster.of_component(role)) for role in MODEL_ROLES)
    for pod in cluster.of_component("orchestrator"):
        samples = scrape(pod)
        assert samples.get("specdec_replica_up") == replicas, f"{pod.name}: {samples.get('specdec_replica_up')}"
        assert samples.get("specdec_replica_sessions") == 0, f"{pod.name}: {samples.get('specdec_replica_sessions')}"
    for pod in cluster.all_pods():
        limit, peak = memory_limit_bytes(pod.container), pod.peak_rss_bytes()
        assert limit is None or peak is None or peak < limit, f"{pod.name}: peak RSS {peak >> 20} MiB over its limit {limit >> 20} MiB"


class Streaming:
    """One generation streamed on a thread: its chunks as they come, and how it ended."""

    def __init__(self, client: Client, prompt: str):
        self.result = GenerationResult()
        self.first_chunk = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(client, prompt), daemon=True)
        self.thread.start()

    def _run(self, client: Client, prompt: str) -> None:
        try:
            for chunk in client.stream(prompt, max_new_tokens=MAX_NEW):
                self.result.add(chunk)
                self.first_chunk.set()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error
        finally:
            self.first_chunk.set()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def test_losing_a_verify_and_a_draft_replica_mid_run_leaves_every_generation_exact(cluster, reference):
    """Last: it kills two replicas of the module's cluster."""
    prompts = PROMPTS[GENERATIONS:2 * GENERATIONS]
    for prompt in prompts:
        reference(prompt)  # before the run: the reference's CPU time does not slow the window to kill in
    clients = orchestrator_clients(cluster)
    try:
        streams = [Streaming(clients[i % len(clients)], prompt) for i, prompt in enumerate(prompts)]
        # Mid-run: every generation has streamed its first round, so each session has been served by its
        # draft and verify replicas; kill, in each role, the replica holding the most of them.
        deadline = time.monotonic() + CALL_TIMEOUT_S
        for stream in streams:
            assert stream.first_chunk.wait(max(0.0, deadline - time.monotonic())), "no first chunk"
        live = {pod.name: scrape(pod).get(LIVE, 0) for role in MODEL_ROLES for pod in cluster.of_component(role)}
        victims = [max(cluster.of_component(role), key=lambda pod: live[pod.name]) for role in MODEL_ROLES]
        for victim in victims:
            victim.process.kill()
        unfinished = sum(not stream.done for stream in streams)
        for victim in victims:
            victim.process.wait(timeout=30)
        for stream in streams:
            stream.thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        for client in clients:
            client.close()
    print(f"killed {[v.name for v in victims]} holding {[live[v.name] for v in victims]} live sessions; live {live}; "
          f"{unfinished} of {len(streams)} generations unfinished then")
    assert all(live[v.name] >= 1 for v in victims), f"a victim held no session: {live}"
    assert unfinished > 0, "every generation had ended before the kill: nothing was tested"
    errors = [f"{p[:40]!r}: {s.error!r}" for p, s in zip(prompts, streams) if s.error is not None or not s.done]
    assert not errors, "\n".join(errors) + "\n" + cluster.log_tails()
    assert_exact([s.result for s in streams], prompts, reference)
    rebinds = [s.result.stats["rebinds"] for s in streams]
    print(f"rebinds per generation: {rebinds}")
    assert sum(rebinds) > 0

    # New sessions start on the survivors, each once. (An orchestrator that had no session on a victim learns
    # of its death at its next poll, SPECDEC_RESOLVE_INTERVAL_S, or at its first call there, which then
    # moves: a rebind is allowed here, a second session start is not.)
    survivors = {role: [p for p in cluster.of_component(role) if p.alive()] for role in MODEL_ROLES}
    before = {role: sessions_created(pods) for role, pods in survivors.items()}
    more = PROMPTS[:4]
    assert_exact(generate_all(cluster, more), more, reference)
    for role, pods in survivors.items():
        started = [a - b for a, b in zip(sessions_created(pods), before[role])]
        assert sum(started) == len(more), f"{role} survivors started {started}"
