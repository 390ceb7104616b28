"""Each service's schema migrations (rlhf.runtime.migrations) on real SQLite and PostgreSQL databases.

A database as the code of commit 378f50b made it (its DDL, captured in tests/fixtures/migrations/), with rows in
it, upgrades to head and keeps every row; the migrations build exactly the models (what `alembic check` checks);
a service refuses an older or a newer schema when it may not upgrade it, saying what to do.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pathlib
import uuid

import pytest
from alembic import command
from sqlalchemy import Engine, MetaData, inspect, select, text

from feedback_service.migrations import schema as feedback_schema
from inference_service.migrations import schema as inference_schema
from rlhf.runtime import migrations
from rlhf.runtime.config import ServerConfig
from rlhf.runtime.db import make_engine
from rlhf.runtime.errors import FailedPrecondition
from rlhf.runtime.migrations import AUTO, CHECK, Schema, SchemaError, differences, prepare_database
from rlhf.runtime.registry import FEEDBACK_COUNT
from rlhf.runtime.training_migrations import policy_schema, reward_schema
from rlhf.runtime.training_store import TrainingStore

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "migrations"
SCHEMAS = {"feedback": feedback_schema, "inference": inference_schema, "reward": reward_schema, "policy": policy_schema}
WHEN = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request, tmp_path):
    """A URL of a fresh, empty database: a SQLite file, or a schema of its own on PostgreSQL (search_path)."""
    engines: list[Engine] = []
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
    else:
        url = os.environ.get("RLHF_TEST_POSTGRES_URL")
        if not url:
            pytest.skip("RLHF_TEST_POSTGRES_URL is not set")
        name = f"migrations_{uuid.uuid4().hex[:12]}"
        admin = make_engine(url)
        engines.append(admin)
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {name}"))
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{name}"
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {name} CASCADE"))
    for engine in engines:
        engine.dispose()


@pytest.fixture
def engine(database):
    made = make_engine(database)
    yield made
    made.dispose()


def make_378f50b_database(engine: Engine, service: str) -> None:
    """The tables the code of 378f50b created, from the DDL it ran (reward and policy: the training tables)."""
    registry = {"reward": "reward_models", "policy": "policies"}.get(service)
    ddl = (FIXTURES / f"{'training' if registry else service}_378f50b.{engine.dialect.name}.sql").read_text()
    ddl = ddl.replace("{registry}", registry or "")
    ddl = "\n".join(line for line in ddl.splitlines() if not line.startswith("--"))
    with engine.begin() as conn:
        for statement in filter(None, (part.strip() for part in ddl.split(";"))):
            conn.exec_driver_sql(statement)


def rows_378f50b(service: str) -> dict[str, list[dict]]:
    """Rows as that code wrote them, by table."""
    if service == "feedback":
        common = dict(run_id="", notes="", generation_id="", policy_version="", metadata="{}")
        return {
            "feedback": [
                dict(common, sequence=1, agent_id="a", kind="rating", prompt="p1", response="r1", score=0.9,
                     chosen="", rejected="", margin=None, request_id="q1", created_at=1_700_000_000_000_000),
                dict(common, sequence=2, agent_id="a", kind="comparison", prompt="p2", response="", score=None,
                     chosen="good", rejected="bad", margin=0.5, request_id="q2", created_at=1_700_000_000_000_001),
                dict(common, sequence=5, agent_id="b", kind="rating", prompt="p3", response="r3", score=0.1,
                     chosen="", rejected="", margin=None, request_id="q3", created_at=1_700_000_000_000_002),
            ]
        }  # fmt: skip
    if service == "inference":
        return {
            "deployments": [
                dict(agent_id="a", targets=[{"version": "v1", "weight": 1.0}], revision=3, updated_at=WHEN)
            ],
            "generations": [
                dict(generation_id=f"g{i}", agent_id="a", policy_version="v1", prompt="p", text="t", routing_key="",
                     prompt_tokens=3, completion_tokens=4, finish_reason=1, created_at=WHEN)
                for i in range(3)
            ],
        }  # fmt: skip
    registry = "policies" if service == "policy" else "reward_models"
    job = dict(spec="{}", progress="{}", result="{}", error="", version="", created_at=WHEN)
    return {
        "jobs": [
            dict(job, job_id="j1", agent_id="a", state="SUCCEEDED", seq=1, version="v1"),
            dict(job, job_id="j2", agent_id="a", state="SUCCEEDED", seq=2, version="v2"),
            dict(job, job_id="j3", agent_id="b", state="RUNNING", seq=3),
        ],
        registry: [
            dict(id=f"id{n}", agent_id="a", version_number=n, path=f"/artifacts/a/v{n}", job_id=f"j{n}",
                 info=json.dumps({"feedback_count": 10 * n}), created_at=WHEN)
            for n in (1, 2)
        ],
    }  # fmt: skip


def insert(engine: Engine, rows: dict[str, list[dict]]) -> None:
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.begin() as conn:
        for table, values in rows.items():
            conn.execute(metadata.tables[table].insert(), values)


def read(engine: Engine, table: str, columns: list[str]) -> list[dict]:
    metadata = MetaData()
    metadata.reflect(engine, only=[table])
    t = metadata.tables[table]
    with engine.connect() as conn:
        result = conn.execute(select(*(t.c[c] for c in columns)).order_by(*t.primary_key.columns))
        return [dict(row._mapping) for row in result]


def comparable(value):
    # SQLite hands back naive datetimes (UTC) and JSON as it was stored.
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


@pytest.mark.parametrize("service", sorted(SCHEMAS))
def test_a_database_made_by_378f50b_upgrades_to_head_with_every_row(engine, service):
    schema = SCHEMAS[service]()
    make_378f50b_database(engine, service)
    rows = rows_378f50b(service)
    insert(engine, rows)
    outcome = prepare_database(engine, schema, AUTO)
    assert outcome == ("current" if service in ("feedback", "inference") else "upgraded")
    with engine.connect() as conn:
        assert migrations.current_revisions(conn) == schema.heads()
        assert differences(conn, schema) == []
    for table, values in rows.items():
        columns = list(values[0])
        found = [{k: comparable(v) for k, v in row.items()} for row in read(engine, table, columns)]
        assert found == sorted(values, key=lambda row: row[columns[0]])
    assert prepare_database(engine, schema, CHECK) == "current"  # a second start finds it in place


@pytest.mark.parametrize("service", ["policy", "reward"])
def test_an_upgraded_training_database_names_old_versions_and_keeps_one_active_job_per_agent(engine, service):
    make_378f50b_database(engine, service)
    insert(engine, rows_378f50b(service))
    registry = "policies" if service == "policy" else "reward_models"
    store = TrainingStore(engine, registry, service, migrate=AUTO)  # on PostgreSQL as RLHF_DB_MIGRATE=auto
    assert [v.version for v in store.registry.list("a")] == ["v2", "v1"]
    assert store.registry.get("a", "v1").id == "id1"
    assert [job.seq for job in store.jobs.list(limit=10)] == [3, 2, 1]
    counted = TrainingStore(engine, registry, service, FEEDBACK_COUNT, CHECK)  # named by feedback count, as in the seed
    placed = counted.registry.register_named("a", lambda _n, name: name, "j9", {"feedback_count": 2})
    assert (placed.version, placed.version_number) == ("v2.2", 3)  # "v2" is the old second version's name
    with pytest.raises(FailedPrecondition):  # agent b's job is still active (the service interrupts it on start)
        store.jobs.create("b", {})
    assert store.jobs.create("a", {}).seq == 4


def test_duplicate_job_numbers_and_crowded_active_jobs_of_an_older_version_are_settled(engine):
    """Code before the jobs' unique indexes could hand out one number twice and run two jobs of one agent."""
    make_378f50b_database(engine, "policy")
    job = dict(spec="{}", progress="{}", result="{}", error="", version="")
    insert(
        engine,
        {
            "jobs": [
                dict(
                    job, job_id=job_id, agent_id=agent, state=state, seq=seq, created_at=WHEN + dt.timedelta(seconds=i)
                )
                for i, (job_id, agent, state, seq) in enumerate(
                    [
                        ("a", "x", "FAILED", 1),
                        ("b", "x", "RUNNING", 2),
                        ("c", "x", "QUEUED", 2),
                        ("d", "y", "RUNNING", 3),
                    ]
                )
            ]
        },
    )
    store = TrainingStore(engine, "policies", "policy", migrate=AUTO)
    jobs = {job.job_id: job for job in store.jobs.list(limit=10)}
    assert {job_id: job.seq for job_id, job in jobs.items()} == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert (jobs["b"].state, jobs["c"].state, jobs["d"].state) == ("INTERRUPTED", "INTERRUPTED", "RUNNING")
    assert "server stopped" in jobs["b"].error and jobs["b"].finished_at is not None
    store.jobs.create("x", {})
    with pytest.raises(FailedPrecondition):
        store.jobs.create("x", {})


@pytest.mark.parametrize("service", sorted(SCHEMAS))
def test_the_migrations_build_exactly_the_models(engine, service):
    """`alembic check`: a database built by the migrations alone has no difference to the models; a new one
    made from the models is stamped at head."""
    schema = SCHEMAS[service]()
    with engine.begin() as conn:
        command.upgrade(schema.config(conn), "head")
        assert differences(conn, schema) == []
        tables = set(inspect(conn).get_table_names())
        for table in schema.metadata.sorted_tables[::-1]:
            conn.execute(text(f"DROP TABLE {table.name}"))
        conn.execute(text("DROP TABLE alembic_version"))
    assert tables == set(schema.metadata.tables) | {"alembic_version"}
    assert prepare_database(engine, schema, CHECK) == "created"
    with engine.connect() as conn:
        assert migrations.current_revisions(conn) == schema.heads()
        assert differences(conn, schema) == []


def test_check_mode_refuses_an_older_schema_saying_how_to_upgrade_and_changes_nothing(engine):
    make_378f50b_database(engine, "reward")
    with pytest.raises(SchemaError) as refused:
        prepare_database(engine, reward_schema(), CHECK)
    message = str(refused.value)
    assert "t0001" in message and reward_schema().heads()[0] in message  # where it is, and the head it needs
    assert "python -m rlhf.runtime.migrations upgrade reward" in message and "RLHF_DB_MIGRATE=auto" in message
    assert "alembic_version" not in inspect(engine).get_table_names()
    assert prepare_database(engine, reward_schema(), AUTO) == "upgraded"


def test_a_schema_newer_than_the_code_is_refused_in_either_mode(engine):
    schema = inference_schema()
    prepare_database(engine, schema)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'i9999'"))
    for mode in (AUTO, CHECK):
        with pytest.raises(SchemaError, match="i9999, which this version of the platform does not know"):
            prepare_database(engine, schema, mode)


def test_the_mode_comes_from_rlhf_db_migrate_and_defaults_by_database(monkeypatch):
    monkeypatch.delenv("RLHF_DB_MIGRATE", raising=False)
    assert ServerConfig.from_env("policy").database_migrate == ""
    assert migrations.default_mode("sqlite:///x.db") == AUTO
    assert migrations.default_mode("postgresql+psycopg://db/rlhf") == CHECK
    monkeypatch.setenv("RLHF_DB_MIGRATE", "check")
    assert ServerConfig.from_env("feedback").database_migrate == "check"
    with pytest.raises(SchemaError, match="RLHF_DB_MIGRATE must be one of auto, check"):
        prepare_database(make_engine("sqlite://"), feedback_schema(), "sometimes")


def test_the_command_line_upgrades_and_checks_a_services_database(tmp_path, capsys):
    engine = make_engine(f"sqlite:///{tmp_path / 'policy.db'}")
    make_378f50b_database(engine, "policy")
    engine.dispose()
    flags = ["policy", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="database at none, head t0003"):
        migrations.main(["check", *flags])
    migrations.main(["upgrade", *flags])
    migrations.main(["current", *flags])
    migrations.main(["check", *flags])
    assert capsys.readouterr().out.splitlines() == [
        "policy: upgraded at t0003",
        "policy: t0003 (head t0003)",
        "policy: at head, no differences to the models",
    ]


def test_every_schema_is_installed_with_its_migrations():
    """The package data (pyproject.toml) ships env.py, the template and versions/ with each service."""
    import tomllib

    data = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    shipped = data["tool"]["setuptools"]["package-data"]
    root = pathlib.Path(__file__).parents[1]
    for factory in SCHEMAS.values():
        schema: Schema = factory()
        package = schema.location.parent.relative_to(root).as_posix().replace("/", ".")
        folder = schema.location.name
        assert {f"{folder}/*.mako", f"{folder}/versions/*.py"} <= set(shipped[package]), package
        assert (schema.location / "env.py").exists() and (schema.location / "script.py.mako").exists()
        assert list((schema.location / "versions").glob("*.py")), schema.location


@pytest.mark.parametrize("service", ["reward", "policy"])
def test_a_service_refuses_an_older_schema_in_check_mode_and_upgrades_it_in_auto_mode(tmp_path, monkeypatch, service):
    """Through the service's own start (config from the environment, a real gRPC server)."""
    import importlib

    import grpc

    from rlhf.runtime.server import RunningServer

    app = importlib.import_module(f"{service}_service.app")
    config_module = importlib.import_module(f"{service}_service.config")
    config_class = getattr(config_module, f"{service.capitalize()}ServiceConfig")
    engine = make_engine(f"sqlite:///{tmp_path / service}.db")
    make_378f50b_database(engine, service)
    insert(engine, rows_378f50b(service))
    engine.dispose()

    async def start() -> RunningServer:
        return await app.start(config_class.from_env(data_dir=tmp_path, port=0))

    monkeypatch.setenv("RLHF_DB_MIGRATE", "check")
    with pytest.raises(SchemaError, match=f"upgrade {service} --database-url"):
        asyncio.run(start())
    monkeypatch.setenv("RLHF_DB_MIGRATE", "auto")

    async def serve() -> None:
        running = await start()
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 10)
        finally:
            await running.stop(0)

    asyncio.run(serve())
    with make_engine(f"sqlite:///{tmp_path / service}.db").connect() as conn:
        assert migrations.current_revisions(conn) == ("t0003",)
