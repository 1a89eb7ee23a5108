"""The wheel holds the product and nothing else: no benchmarking, reference_pair, netlab, tests or protos. The
development commands (`specdec bench`, `pair-report`, `train-pair`, `study`) still run through the console
script of an editable install, from the checkout, and without a checkout they say how to get one; the
product commands run from the wheel alone (with the client SDK's wheel, its one in-repo dependency).

The client SDK is its own distribution (client_sdk/, specdec-client): its wheel holds specdec_client and
specdec_api and requires grpcio and protobuf only; the main wheel leaves both packages to it."""

from __future__ import annotations

import ast
import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.wheels import REPO, build_client_wheel, build_wheel, clean_env

PRODUCT = {"speculation", "serving", "draft_service", "verify_service", "orchestrator", "specdec_cli", "telemetry",
           "transport", "service_common", "local_stack", "trace_analysis", "openai_api"}
CLIENT = {"specdec_client", "specdec_api"}
DEVELOPMENT = {"benchmarking", "reference_pair", "netlab"}
# Where the wheel's code may name a development package: the commands that need one (deferred imports),
# and the study module, which only `specdec study` imports.
MAY_IMPORT_DEVELOPMENT = {"specdec_cli/main.py", "specdec_cli/study.py"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel from a copy of its sources. A copy, because a build in place writes
    build/ and *.egg-info into the checkout, and a stale build/lib would put old packages in the wheel."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in REPO.iterdir():  # every top-level package, the ones to leave out too, and protos/
        if (folder / "__init__.py").is_file() or folder.name == "protos":
            shutil.copytree(folder, source / folder.name, ignore=ignore)
    return build_wheel(source, work / "dist")


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    return build_client_wheel(tmp_path_factory.mktemp("client_wheel"))


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        [name] = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def _top_level(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}


@pytest.fixture(scope="module")
def unpacked(wheel, client_wheel, tmp_path_factory) -> Path:
    """The wheels' files as pip would install them (a pure-Python wheel is a zip of site-packages' layout):
    the main one and the client SDK's, which it depends on."""
    site = tmp_path_factory.mktemp("site")
    for built in (wheel, client_wheel):
        with zipfile.ZipFile(built) as archive:
            archive.extractall(site)
    return site


def _from_wheel(site: Path, *args: str) -> subprocess.CompletedProcess:
    """`specdec ARGS` with the wheel's code and no checkout: isolated mode (no current directory or
    PYTHONPATH on sys.path), the wheel's folder first."""
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); sys.argv[0] = 'specdec'; "
            "from specdec_cli.main import app; app()")
    return subprocess.run([sys.executable, "-I", "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=site, env=clean_env())


def test_the_wheel_holds_the_product_packages_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [entry_points] = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    top_level = _top_level(wheel)
    assert top_level == PRODUCT, (f"left out: {sorted(PRODUCT - top_level)}; "
                                  f"should not be there: {sorted(top_level - PRODUCT)}")
    assert "specdec = specdec_cli.main:app" in scripts
    assert "specdec-client==0.1.0" in _metadata(wheel).get_all("Requires-Dist")


def test_the_client_wheel_holds_the_sdk_and_the_stubs_and_requires_only_grpcio_and_protobuf(client_wheel):
    assert _top_level(client_wheel) == CLIENT
    metadata = _metadata(client_wheel)
    assert (metadata["Name"], metadata["Version"]) == ("specdec-client", "0.1.0")
    requirements = metadata.get_all("Requires-Dist")
    assert sorted(requirements) == ["grpcio>=1.85.1", "protobuf>=6.31"], requirements
    with zipfile.ZipFile(client_wheel) as archive:
        names = set(archive.namelist())
    # Every proto's modules (the servers import the draft and verify ones from here), their type stubs, and the
    # hand-written method paths.
    for proto in ("common", "draft", "verify", "orchestrator"):
        assert {f"specdec_api/{proto}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")} <= names
    assert {"specdec_api/method_paths.py", "specdec_client/client.py"} <= names


def test_the_wheel_names_development_packages_only_where_the_development_commands_need_them(unpacked):
    found = {}
    for path in unpacked.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] in DEVELOPMENT | {"tests"}:
                    found.setdefault(path.relative_to(unpacked).as_posix(), set()).add(name)
    assert set(found) <= MAY_IMPORT_DEVELOPMENT, found


def test_the_product_modules_import_from_the_wheel_alone(unpacked):
    """What serve, generate, demo and trace-report load, loaded from the wheels with no checkout to fall back on."""
    modules = ["specdec_cli.main", "specdec_cli.demo", "specdec_cli.trace_report", "specdec_client",
               "specdec_api.method_paths", "orchestrator.server", "draft_service.server", "verify_service.server",
               "telemetry.tracing", "telemetry.metrics"]
    code = (f"import sys; sys.path.insert(0, {str(unpacked)!r}); import importlib\n"
            f"for name in {modules!r}:\n"
            f"    module = importlib.import_module(name)\n"
            f"    assert module.__file__.startswith({str(unpacked)!r}), (name, module.__file__)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(DEVELOPMENT)!r})))")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=unpacked, env=clean_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"development packages imported: {done.stdout}"


def test_a_product_command_runs_from_the_wheel(unpacked, tmp_path):
    done = _from_wheel(unpacked, "trace-report", str(tmp_path / "no-such-spans.jsonl"))
    assert done.returncode == 1 and "no-such-spans.jsonl" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["bench"], ["pair-report"], ["train-pair"], ["study", "--delay-ms", "0"]])
def test_a_development_command_without_a_checkout_says_how_to_get_one(unpacked, command):
    done = _from_wheel(unpacked, *command)
    assert done.returncode == 2, done.stderr
    assert f"`specdec {command[0]}` runs from a source checkout" in done.stderr
    assert "git clone" in done.stderr and "./setup.sh" in done.stderr
    assert "Traceback" not in done.stderr


def _console_script() -> Path:
    script = Path(sys.executable).parent / "specdec"
    assert script.is_file(), f"no console script at {script}: run ./setup.sh (it installs the project editable)"
    return script


def test_development_commands_run_from_the_checkout_through_the_console_script(tmp_path):
    """The console script's sys.path is the venv's, not the checkout (whose packages the editable install
    maps only as far as the wheel goes): `specdec` puts the checkout on the path for these commands."""
    bench = subprocess.run([str(_console_script()), "bench", "--help"], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, env=clean_env())
    assert bench.returncode == 0 and "--concurrency" in bench.stdout, bench.stderr
    # --help reaches reference_pair.cli's own parser: the package was imported from the checkout.
    train = subprocess.run([str(_console_script()), "train-pair", "--help"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path, env=clean_env())
    assert train.returncode == 0, train.stderr
    assert "usage: specdec train-pair" in train.stdout and "--target-steps" in train.stdout
