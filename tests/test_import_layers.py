"""Arrows point one way: every import in the project's packages goes to its own package or to a layer
below, and no set of modules imports itself round a circle (deferred imports inside functions count:
they are how circles hide). The layers are the map docs/design.md draws."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Where top-level packages live: the main distribution's at the repository root, the client SDK's in its own
# distribution's directory (client_sdk/pyproject.toml).
CLIENT_ROOT = REPO / "client_sdk"
ROOTS = [REPO, CLIENT_ROOT]
# What the client distribution may import besides the standard library and its own packages: it declares
# grpcio and protobuf and nothing else, and must not reach into the main distribution.
CLIENT_MAY_IMPORT = {"grpc", "google"}

# Lowest first. A package may import packages of lower layers, never one of its own layer or above.
LAYERS: list[set[str]] = [
    {"specdec_api", "speculation"},  # generated messages and method paths; the pure algorithm
    {"transport", "telemetry", "trace_analysis", "specdec_client"},  # how processes talk, observe; the SDK
    {"service_common"},  # what the orchestrator and the model services share
    {"serving", "orchestrator"},  # the model services' machinery; the round loop
    {"draft_service", "verify_service", "openai_api"},  # the two model services; the OpenAI HTTP front
    {"local_stack", "reference_pair", "netlab"},  # local processes and the shipped pair; training it; delays
    {"benchmarking"},  # measurements
    {"specdec_cli"},  # the console script
]
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def package_dirs() -> dict[str, Path]:
    """Every top-level package (a folder with __init__.py) of either distribution, by name."""
    found: dict[str, Path] = {}
    for root in ROOTS:
        for init in sorted(root.glob("*/__init__.py")):
            assert init.parent.name not in found, f"{init.parent.name} is in two places: {found.get(init.parent.name)}"
            found[init.parent.name] = init.parent
    return found


def project_modules() -> dict[str, Path]:
    modules = {}
    folders = package_dirs()
    for package in LAYER_OF:
        folder = folders[package]
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder.parent).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def absolute_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules a file imports, anywhere in it, relative imports aside: `from a.b import c` names a.b.c
    when that is one of `modules`, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                         for alias in node.names)
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports."""
    return {name for name in absolute_imports(path, modules) if name.split(".")[0] in LAYER_OF}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in graph), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_package_is_on_the_map():
    packages = set(package_dirs()) - {"tests", "protos"}
    assert packages == set(LAYER_OF), "a new top-level package needs a layer here and in docs/design.md"
    assert {name for name, folder in package_dirs().items() if folder.parent == CLIENT_ROOT} == {
        "specdec_client", "specdec_api"}


def test_the_client_distribution_imports_only_itself_grpcio_and_protobuf():
    """Anywhere in its files, deferred imports too: the SDK installed alone has nothing else to import."""
    may_import = {"specdec_client", "specdec_api"} | CLIENT_MAY_IMPORT | set(sys.stdlib_module_names)
    outside = sorted(f"{path.relative_to(REPO)}: {name}" for path in CLIENT_ROOT.rglob("*.py")
                     for name in absolute_imports(path, {}) if name.split(".")[0] not in may_import)
    assert not outside, "the client distribution imports what it does not declare:\n" + "\n".join(outside)


def test_no_module_imports_a_package_of_its_own_layer_or_above():
    upward = []
    for module, targets in import_graph().items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and LAYER_OF[other] >= LAYER_OF[package]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_check_sees_a_circle_and_an_upward_arrow():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "speculation.rejection" in graph["orchestrator.acceptance"]
    assert any(target.startswith("orchestrator") for target in graph["specdec_cli.main"])
    # The client distribution's modules are walked too, under their import names.
    assert "specdec_api.orchestrator_pb2" in graph["specdec_client.client"]
    assert "specdec_api.draft_pb2" in graph["specdec_api.method_paths"]
