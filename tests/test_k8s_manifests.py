"""The Kubernetes manifests configure only flags `specdec serve` really has, with gRPC probes on the health port."""

from pathlib import Path

import yaml
from typer.main import get_command

from specdec_cli.main import app

K8S = Path(__file__).resolve().parent.parent / "k8s"


def serve_envvars() -> set[str]:
    serve = get_command(app).commands["serve"]
    return {p.envvar for p in serve.params if getattr(p, "envvar", None)}


def containers():
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                yield from doc["spec"]["template"]["spec"]["containers"]


def test_every_specdec_variable_is_a_serve_flag_and_every_container_has_grpc_probes():
    known = serve_envvars()
    seen = 0
    for container in containers():
        assert container["args"][0] == "serve"
        for env in container["env"]:
            if env["name"].startswith("SPECDEC_"):
                assert env["name"] in known, f"{env['name']} is not a `specdec serve` flag"
                seen += 1
        # The probes ask the plaintext health port (--health-port), which stays reachable with TLS on.
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
        assert {"name": "SPECDEC_HEALTH_PORT", "value": str(port)} in container["env"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["grpc"]["port"] == port
    assert seen >= 10
