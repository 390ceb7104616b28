"""compose.yaml, Dockerfile, .dockerignore and requirements.lock, checked without a Docker daemon.

Every reference must resolve: depends_on targets (healthy ones), volumes, modules, ports, service addresses,
environment names the code reads, database URLs against the databases the init script creates. The health
check one-liners run for real against gRPC health servers, the feedback service's among them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import importlib
import importlib.util
import json
import pathlib
import re
import shlex
import socket
import subprocess
import sys
from concurrent import futures
from typing import Any

import grpc
import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli, the same parser (the test extra installs it there)
    import tomli as tomllib
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rlhf.runtime.config import DEFAULT_PORTS
from rlhf.sdk.supervisor import MODULES

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK_FILE = ROOT / "requirements.lock"  # `make lock`; for CPython 3.11 (CI, the image)
# check-jsonschema (test extra) ships the compose specification's JSON schema as a builtin schema.
CHECK_JSONSCHEMA = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
# The services that read or write model artifacts, and so must share the artifact volume.
ARTIFACT_USERS = {"reward", "policy", "inference"}
SOURCE_FILES = [p for d in ["rlhf", *MODULES.values()] for p in (ROOT / d).rglob("*.py")]


# ----------------------------------------------------------------------------------------------------
# Reading the files as Docker would


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str], strict: bool = True) -> Any:
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$) on every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, strict) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, strict) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if op in ("-", ":-"):
            return env[name] if present else arg
        if op in ("?", ":?"):
            if not present:
                raise KeyError(f"${{{name}}} is required: {arg}")
            return env[name]
        if op in ("+", ":+"):
            return arg if present else ""
        if name not in env and strict:
            raise KeyError(f"${{{name}}} has no default, so compose would use an empty string")
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def load_compose(env: dict[str, str] | None = None, strict: bool = True) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {}, strict)


COMPOSE = load_compose(strict=False)  # test_every_variable_has_a_default... checks strictly
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short syntax: started, not healthy
        return {name: {"condition": "service_started"} for name in deps}
    return deps


@dataclasses.dataclass
class Mount:
    source: str
    target: str
    kind: str  # "volume" or "bind"


def mounts(service: dict[str, Any]) -> list[Mount]:
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            source, target, kind = entry.get("source", ""), entry["target"], entry.get("type", "volume")
        else:
            parts = entry.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append(Mount(source, target, kind))
    return out


def replicas(service: dict[str, Any]) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def host_ports(service: dict[str, Any], port: int) -> str:
    """What a service publishes `port` on: the same port, or a range starting there, one port per replica (two
    containers cannot publish one host port)."""
    count = replicas(service)
    return str(port) if count == 1 else f"{port}-{port + count - 1}"


def published_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host port, container port) of each `ports` entry, short or long syntax."""
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.append((str(entry.get("published", "")), int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]
        parts = spec.rsplit(":", 2)
        container = int(parts[-1])
        host = parts[-2] if len(parts) >= 2 else ""
        out.append((host, container))
    return out


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{args}: expected one {name}"
    return args[args.index(name) + 1]


def service_port(name: str) -> int:
    return int(flag(command(SERVICES[name]), "--port"))


def healthcheck_code(name: str) -> str:
    test = SERVICES[name]["healthcheck"]["test"]
    assert isinstance(test, list) and len(test) == 4 and test[:3] == ["CMD", "python", "-c"], (
        f"{name}: the health check should be [CMD, python, -c, <one-liner>], got {test}"
    )
    return test[3]


def proto_service_name(name: str) -> str:
    module = importlib.import_module(f"rlhf.{name}.v1.{name}_service_pb2")
    (service,) = module.DESCRIPTOR.services_by_name.values()
    return service.full_name


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule, near enough: last matching pattern wins; a match on a folder covers it."""
    ignored = False
    prefixes = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def known_env_names() -> set[str]:
    """RLHF_* names the code reads: literals, plus those built from templates such as RLHF_{SERVICE}_PORT."""
    names: set[str] = set()
    for path in SOURCE_FILES:
        text = path.read_text()
        names.update(re.findall(r"\bRLHF_[A-Z0-9_]*[A-Z0-9]\b", text))
        for suffix in re.findall(r"RLHF_\{[^}]*\}_([A-Z0-9_]+)", text):
            names.update(f"RLHF_{service.upper()}_{suffix}" for service in DEFAULT_PORTS)
        for prefix in re.findall(r"(RLHF_[A-Z0-9_]+_)\{field\.name\.upper\(\)\}", text):
            names.update(prefix + field.upper() for field in re.findall(r"^    (\w+): ", text, re.M))
    return names


def required_addresses(name: str) -> set[str]:
    """The services whose address service `name` reads (service_address("x") in its package)."""
    text = "".join(p.read_text() for p in (ROOT / MODULES[name]).rglob("*.py"))
    return set(re.findall(r"service_address\(\"(\w+)\"\)", text))


def init_sql_databases() -> set[str]:
    mount = next(m for m in mounts(SERVICES["postgres"]) if m.target.startswith("/docker-entrypoint-initdb.d/"))
    sql = (ROOT / mount.source).read_text()
    sql = re.sub(r"--[^\n]*", "", sql)
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    databases = set()
    for statement in statements:
        match = re.fullmatch(r"CREATE DATABASE\s+(\w+)", statement, re.I)
        assert match, f"unexpected statement in the init script: {statement!r}"
        databases.add(match[1])
    return databases


# ----------------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_has_postgres_and_every_service_and_no_version_key():
    assert "version" not in COMPOSE, "the compose specification dropped `version:`"
    assert {"postgres", *MODULES} <= set(SERVICES)


def test_every_variable_has_its_documented_default_and_overrides_reach_every_use():
    text = COMPOSE_FILE.read_text()
    # The header documents each variable as "#   NAME   meaning (default VALUE...)".
    documented = dict(re.findall(r"^#   ([A-Z][A-Z0-9_]*) +[^\n]*\(default ([^;)\s]+)", text, re.M))
    uses = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}", text)
    assert uses and {name for name, _ in uses} == set(documented), (
        f"used {sorted({n for n, _ in uses})}, documented in the header {sorted(documented)}"
    )
    for name, default in uses:
        assert default == documented[name], f"${{{name}}} defaults to {default!r}, the header says {documented[name]!r}"

    defaults = load_compose()  # strict: raises on a ${VAR} without a default
    assert defaults == COMPOSE
    assert defaults["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == documented["POSTGRES_PASSWORD"]
    for name in MODULES:
        service = defaults["services"][name]
        assert service["image"] == documented["RLHF_IMAGE"]
        port = DEFAULT_PORTS[name]
        expected = f"{documented['RLHF_PUBLISH_HOST']}:{host_ports(service, port)}:{port}"
        assert service["ports"] == [expected], service["ports"]

    # An override must land everywhere the variable is used.
    overridden = load_compose(
        {"POSTGRES_PASSWORD": "s3cret", "RLHF_PUBLISH_HOST": "0.0.0.0", "RLHF_IMAGE": "me/rlhf:1"}
    )
    assert overridden["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    for name in MODULES:
        service = overridden["services"][name]
        url = environment(service)[f"RLHF_{name.upper()}_DATABASE_URL"]
        assert ":s3cret@" in url, url
        assert service["image"] == "me/rlhf:1"
        assert all(str(entry).startswith("0.0.0.0:") for entry in service["ports"]), service["ports"]


def _check_compose_schema(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CHECK_JSONSCHEMA, str(path)], capture_output=True, text=True, timeout=120)


def test_matches_the_compose_specification_schema(tmp_path):
    result = _check_compose_schema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same check rejects a service key that compose doesn't know (so it really validates).
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("\n    command:", "\n    comand:", 1))
    result = _check_compose_schema(broken)
    assert result.returncode == 1 and "'comand' was unexpected" in result.stdout, result.stdout + result.stderr


def test_depends_on_targets_exist_are_healthy_and_acyclic():
    for name, service in SERVICES.items():
        for target, spec in depends_on(service).items():
            assert target in SERVICES, f"{name} depends on unknown service {target}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {target}: wait for service_healthy"
            check = SERVICES[target].get("healthcheck") or {}
            assert check.get("test") and not check.get("disable"), f"{target} has no health check to wait for"
    visiting, done = set(), set()

    def visit(name: str) -> None:
        assert name not in visiting, f"depends_on cycle through {name}"
        if name in done:
            return
        visiting.add(name)
        for target in depends_on(SERVICES[name]):
            visit(target)
        visiting.discard(name)
        done.add(name)

    for name in SERVICES:
        visit(name)


def test_every_named_volume_is_declared_and_used_and_binds_exist():
    declared = set(COMPOSE.get("volumes") or {})
    used = set()
    for name, service in SERVICES.items():
        for mount in mounts(service):
            if mount.kind == "volume":
                assert mount.source in declared, f"{name} mounts undeclared volume {mount.source!r}"
                used.add(mount.source)
            else:
                assert (ROOT / mount.source).exists(), f"{name} binds missing {mount.source}"
    assert used and declared == used, f"declared but unused volumes: {declared - used}"


def test_artifacts_and_model_cache_are_one_shared_volume_each():
    for variable, users in [
        ("RLHF_ARTIFACT_ROOT", ARTIFACT_USERS),
        ("RLHF_MODEL_CACHE", {n for n in MODULES if _loads_models(n)}),
    ]:
        volumes = set()
        for name in users:
            path = environment(SERVICES[name]).get(variable)
            assert path, f"{name} must set {variable}"
            found = [m for m in mounts(SERVICES[name]) if m.target == path and m.kind == "volume"]
            assert found, f"{name}: {variable}={path} is not on a named volume"
            volumes.add(found[0].source)
        assert len(volumes) == 1, f"{variable} should be one volume shared by {sorted(users)}, got {volumes}"


def _loads_models(name: str) -> bool:
    return any("resolve_model" in p.read_text() for p in (ROOT / MODULES[name]).rglob("*.py"))


def test_postgres_keeps_data_on_a_volume_and_reports_ready_only_over_tcp():
    postgres = SERVICES["postgres"]
    assert any(m.kind == "volume" and m.target == "/var/lib/postgresql/data" for m in mounts(postgres))
    test = postgres["healthcheck"]["test"]
    # During first-start initialisation the server listens on its unix socket only: a socket check
    # would pass before the init script has created the databases.
    assert "pg_isready" in test and "-h" in test and test[test.index("-h") + 1] in ("127.0.0.1", "localhost")


def test_each_service_command_runs_its_own_module_with_accepted_flags():
    helps = {}
    for name, module in MODULES.items():
        args = command(SERVICES[name])
        assert args[:3] == ["python", "-m", module], f"{name} should run `python -m {module}`, got {args}"
        assert importlib.util.find_spec(module) and importlib.util.find_spec(f"{module}.__main__"), module
        assert flag(args, "--host") == "0.0.0.0"
        helps[name] = subprocess.Popen(
            [sys.executable, "-m", module, "--help"],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    for name, process in helps.items():
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        for arg in command(SERVICES[name])[3:]:
            if arg.startswith("--"):
                assert arg in output, f"{name}: `python -m {MODULES[name]}` has no {arg} flag"


def test_ports_agree_everywhere():
    for name in MODULES:
        service = SERVICES[name]
        port = service_port(name)
        assert port == DEFAULT_PORTS[name], f"{name}: {port} is not the default port the CLI expects"
        assert environment(service)[f"RLHF_{name.upper()}_PORT"] == str(port)
        assert published_ports(service) == [(host_ports(service, port), port)], (
            f"{name}: publish {port} on the host's same port (from it, with replicas), got {service.get('ports')}"
        )
        assert healthcheck_code(name).count(f"'127.0.0.1:{port}'") == 1, f"{name}: health check on another port"


def test_service_addresses_point_at_compose_services_on_their_ports():
    checked = set()
    for name, service in SERVICES.items():
        env = environment(service)
        for key, value in env.items():
            match = re.fullmatch(r"RLHF_([A-Z]+)_ADDR", key)
            if not match:
                continue
            target = match[1].lower()
            assert target in SERVICES, f"{name}: {key} names no compose service"
            host, _, port = value.rpartition(":")
            assert host == target and int(port) == service_port(target), f"{name}: {key}={value}"
        if name in MODULES:
            for needed in required_addresses(name):
                assert f"RLHF_{needed.upper()}_ADDR" in env, (
                    f"{name} reads the {needed} address; without RLHF_{needed.upper()}_ADDR it dials 127.0.0.1"
                )
                assert needed in depends_on(service), f"{name} calls {needed}, so should depend on it"
                checked.add((name, needed))
    # Not vacuous: the scan of the service packages finds the calls it is meant to find.
    assert {("reward", "feedback"), ("policy", "feedback"), ("policy", "reward"), ("inference", "policy")} <= checked


def test_environment_names_are_ones_the_code_reads():
    known = known_env_names()
    dockerfile_env = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "ENV")
    names = set(re.findall(r"\b(RLHF_[A-Z0-9_]+)=", dockerfile_env))
    for name in MODULES:
        env = environment(SERVICES[name])
        names.update(k for k in env if k.startswith("RLHF_"))
        assert env.get("RLHF_HOST") == "0.0.0.0"
    assert names - known == set(), f"set but never read: {sorted(names - known)}"


def test_database_urls_reach_databases_the_init_script_creates():
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    postgres = environment(SERVICES["postgres"])
    created = init_sql_databases()
    seen = {}
    for name in MODULES:
        url = make_url(environment(SERVICES[name])[f"RLHF_{name.upper()}_DATABASE_URL"])
        assert url.drivername == "postgresql+psycopg", url.drivername
        assert url.host == "postgres" and url.host in SERVICES and (url.port or 5432) == 5432
        assert (url.username, url.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
        assert url.database in created, f"{name}: database {url.database!r} is not created by the init script"
        assert url.database not in seen, f"{name} and {seen[url.database]} share a database"
        seen[url.database] = name
        assert "postgres" in depends_on(SERVICES[name]), f"{name} uses PostgreSQL, so should depend on it"
        engine = create_engine(url)  # the dialect and the driver load (no connection is made)
        try:
            assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
        finally:
            engine.dispose()


# ----------------------------------------------------------------------------------------------------
# The health check one-liners, run for real


def _run_check(code: str, port: int, address: str) -> subprocess.CompletedProcess:
    code = code.replace(f"'127.0.0.1:{port}'", f"'{address}'")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_health_check_passes_on_the_real_feedback_service_and_fails_otherwise(tmp_path):
    from feedback_service.app import start
    from feedback_service.config import FeedbackServiceConfig
    from rlhf.runtime.config import ServerConfig
    from tests.servers import ServerThread

    code, port = healthcheck_code("feedback"), service_port("feedback")
    config = FeedbackServiceConfig.from_env(server=ServerConfig(service="feedback", port=0, data_dir=tmp_path))
    with ServerThread(start, config) as server:
        result = _run_check(code, port, server.address)
        assert result.returncode == 0, result.stderr
        # Shutting down reports NOT_SERVING before the port closes: the check must fail then.
        asyncio.run_coroutine_threadsafe(
            server.running.health.set(proto_service_name("feedback"), health_pb2.HealthCheckResponse.NOT_SERVING),
            server._loop,
        ).result(10)
        assert _run_check(code, port, server.address).returncode != 0
    assert _run_check(code, port, f"127.0.0.1:{_closed_port()}").returncode != 0


@pytest.mark.parametrize("name", list(MODULES))
def test_each_health_check_asks_for_its_service_by_its_proto_name(name):
    """Against a gRPC health server that knows only the service's real name: a typo would get NOT_FOUND."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set(proto_service_name(name), health_pb2.HealthCheckResponse.SERVING)
        result = _run_check(healthcheck_code(name), service_port(name), f"127.0.0.1:{bound}")
        assert result.returncode == 0, result.stderr
        servicer.set(proto_service_name(name), health_pb2.HealthCheckResponse.NOT_SERVING)
        assert _run_check(healthcheck_code(name), service_port(name), f"127.0.0.1:{bound}").returncode != 0
    finally:
        server.stop(None)


# ----------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_builds_one_lean_non_root_image():
    instructions = dockerfile_instructions()
    by_name = lambda key: [args for instruction, args in instructions if instruction == key]  # noqa: E731
    assert by_name("FROM") == ["python:3.11-slim"]
    assert by_name("WORKDIR") == ["/app"]
    users = by_name("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the services must not run as root"
    runs = " && ".join(by_name("RUN"))
    torch_pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["server"] if d.startswith("torch"))
    assert f"pip install {torch_pin} --index-url https://download.pytorch.org/whl/cpu" in runs
    assert "[test]" not in runs and "'test'" not in runs, "no test extras in the image"
    # Every other package at its locked version: the runtime dependencies, the postgres extra (the
    # postgresql+psycopg URLs need the driver) and the build extra (gen_protos.py needs grpcio-tools).
    assert "pip install -c requirements.lock -r /tmp/requirements.txt" in runs
    assert all(f"extras['{extra}']" in runs for extra in ("server", "postgres", "build"))
    assert any(d.startswith("psycopg") for d in PYPROJECT["project"]["optional-dependencies"]["postgres"])
    assert any(d.startswith("grpcio-tools") for d in PYPROJECT["project"]["optional-dependencies"]["build"])
    assert any(instruction == "COPY" and "requirements.lock" in args.split()[:-1] for instruction, args in instructions)
    # Protos are generated before the project is installed, so the installed package contains them.
    assert (ROOT / "scripts" / "gen_protos.py").exists()
    assert runs.index("python scripts/gen_protos.py") < runs.index("pip install --no-deps .")
    for args in by_name("COPY"):
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY of missing {source}"


def test_dockerfile_default_command_is_a_valid_rlhf_command():
    from rlhf.sdk.cli import build_parser

    (cmd,) = [args for instruction, args in dockerfile_instructions() if instruction == "CMD"]
    argv = json.loads(cmd)  # exec form, so signals reach the process
    assert argv[0] in PYPROJECT["project"]["scripts"], f"{argv[0]} is not a console script of the project"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.host == "0.0.0.0"
    exposed = {
        int(port.split("/")[0])
        for instruction, args in dockerfile_instructions()
        if instruction == "EXPOSE"
        for port in args.split()
    }
    assert exposed == set(DEFAULT_PORTS.values())


def test_dockerignore_keeps_the_sources_and_drops_local_state():
    tracked = subprocess.run(
        [
            "git",
            "ls-files",
            "--",
            "pyproject.toml",
            "requirements.lock",
            "scripts",
            "protos",
            *PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    tracked += [str(p.relative_to(ROOT)) for d in ["rlhf", *MODULES.values()] for p in (ROOT / d).glob("*.py")]
    assert {"pyproject.toml", "requirements.lock"} <= set(tracked) and any(p.endswith(".proto") for p in tracked)
    needed = [p for p in tracked if "__pycache__" not in p]
    assert [p for p in needed if dockerignored(p)] == []
    for local in [
        ".venv/bin/python",
        ".git/HEAD",
        ".rlhf/feedback.db",
        "rlhf/feedback/v1/feedback_service_pb2.py",
        "rlhf_platform.egg-info/PKG-INFO",
        "rlhf/__pycache__/config.cpython-311.pyc",
    ]:
        assert dockerignored(local), f"{local} would be sent to the build"


def test_lock_pins_every_declared_dependency_within_its_range_and_no_cuda_packages():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in LOCK_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and ";" not in line, f"requirements.lock: expected NAME==VERSION, got {line!r}"
            pins[canonicalize_name(name)] = version
    project = PYPROJECT["project"]
    declared = [*project["dependencies"], *(d for deps in project["optional-dependencies"].values() for d in deps)]
    lock_python = {"python_version": "3.11", "python_full_version": "3.11.0"}
    checked = 0
    for spec in declared:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        if requirement.marker and not requirement.marker.evaluate(lock_python):
            continue
        if name == "torch":  # pinned exactly in pyproject.toml and installed first, as the CPU build
            assert str(requirement.specifier) == "==2.13.0" and name not in pins
            continue
        assert name in pins, f"{spec} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock has {name}=={pins[name]}, outside {spec}: run `make lock`"
        )
        checked += 1
    assert checked >= 20
    # Locked against the CPU build of torch: a CUDA build's packages would be pulled in by them.
    cuda = [n for n in pins if n.startswith(("nvidia-", "cuda-", "triton"))]
    assert cuda == [], f"requirements.lock has CUDA packages: {cuda}"


# ----------------------------------------------------------------------------------------------------
# The REST gateway (gateway/): a compose service like the four, on HTTP


GATEWAY = SERVICES.get("gateway", {})


def test_gateway_runs_its_module_on_its_port_published_like_the_others():
    args = command(GATEWAY)
    assert args[:3] == ["python", "-m", "gateway"] and flag(args, "--host") == "0.0.0.0"
    port = int(flag(args, "--port"))
    assert port == DEFAULT_PORTS["gateway"] == 8000
    assert environment(GATEWAY)["RLHF_GATEWAY_PORT"] == str(port) and environment(GATEWAY)["RLHF_HOST"] == "0.0.0.0"
    assert published_ports(GATEWAY) == [("8000", 8000)] and GATEWAY["image"] == SERVICES["feedback"]["image"]
    assert GATEWAY["ports"] == ["127.0.0.1:8000:8000"]
    overridden = load_compose({"RLHF_PUBLISH_HOST": "0.0.0.0"})["services"]["gateway"]
    assert overridden["ports"] == ["0.0.0.0:8000:8000"]
    helped = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    assert all(arg in helped.stdout for arg in args[3:] if arg.startswith("--"))


def test_gateway_reaches_the_services_it_calls_and_reads_every_name_it_is_given():
    text = "".join(p.read_text() for p in (ROOT / "gateway").rglob("*.py"))
    needed = set(re.findall(r"service_address\(\"(\w+)\"\)", text))
    assert needed == {"feedback", "policy"}
    env = environment(GATEWAY)
    for service in needed:
        assert f"RLHF_{service.upper()}_ADDR" in env and service in depends_on(GATEWAY)
    known = set(re.findall(r"\bRLHF_[A-Z0-9_]*[A-Z0-9]\b", text)) | known_env_names()
    assert {k for k in env if k.startswith("RLHF_")} - known == set()


def test_gateway_health_check_passes_only_while_the_services_behind_it_serve():
    """The compose one-liner against a real gateway whose feedback and policy services are gRPC health servers."""
    from tests.test_gateway import GatewayProcess

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    gateway = GatewayProcess(address, address)
    try:
        test = GATEWAY["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and len(test) == 4
        code = test[3].replace("127.0.0.1:8000", f"127.0.0.1:{gateway.port}")
        assert code != test[3]

        def check() -> int:
            return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

        assert check() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() != 0
    finally:
        gateway.stop()
        server.stop(None)
    assert check() != 0  # nothing listens


def test_the_build_generates_code_that_the_declared_grpcio_and_protobuf_can_run():
    # A client install generates the gRPC code at build time with [build-system]'s grpcio-tools; that code
    # refuses to import under an older grpcio or protobuf than it was generated for, so the build's pin must
    # be the locked grpcio-tools and the runtime floors must be what it generates for.
    import re

    from packaging.requirements import Requirement

    lock = dict(
        line.split("==", 1) for line in LOCK_FILE.read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    tools = next(r for r in build if r.name == "grpcio-tools")
    assert str(tools.specifier) == f"=={lock['grpcio-tools'].strip()}"
    generated = (ROOT / "rlhf" / "feedback" / "v1" / "feedback_service_pb2.py").read_text()
    major, minor, patch = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)", generated).groups()
    grpc_generated = re.search(
        r"GRPC_GENERATED_VERSION = '([\d.]+)'",
        (ROOT / "rlhf" / "feedback" / "v1" / "feedback_service_pb2_grpc.py").read_text(),
    ).group(1)
    floors = {Requirement(d).name: Requirement(d).specifier for d in PYPROJECT["project"]["dependencies"]}
    assert str(floors["protobuf"]) == f">={major}.{minor}.{patch}"
    assert str(floors["grpcio"]) == f">={grpc_generated}"


def test_a_replicated_service_runs_over_postgresql_and_the_shared_artifacts_with_a_host_port_each():
    """Replicas (issue 10): compose shows a service with several, each over the one database and the shared
    artifact volume; inside compose its name resolves to all of them (clients spread calls, round robin)."""
    replicated = {name: SERVICES[name] for name in MODULES if replicas(SERVICES[name]) > 1}
    assert replicated, "no service in compose.yaml runs with several replicas"
    for name, service in replicated.items():
        assert environment(service)[f"RLHF_{name.upper()}_DATABASE_URL"].startswith("postgresql"), name
        assert "container_name" not in service, f"{name}: replicas cannot share one container name"
        if name in ARTIFACT_USERS:
            assert any(m.source == "artifacts" and m.kind == "volume" for m in mounts(service)), name
        first, last = published_ports(service)[0][0].split("-")
        assert int(last) - int(first) + 1 == replicas(service)
        assert not set(range(int(first) + 1, int(last) + 1)) & set(DEFAULT_PORTS.values()), "taken by another service"
