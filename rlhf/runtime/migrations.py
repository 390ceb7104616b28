"""Each service's database schema through Alembic: create, check and upgrade it; a command line for operators.

A service's migrations live beside it (`<service>/migrations/`: env.py, versions/); the reward and policy
services share the training tables' migrations (rlhf/runtime/training_migrations/, the registry table's name
passed in). At start a service calls `prepare_database`:

- a database without the service's tables is created from the models and stamped at head;
- a database made before migrations existed (the tables, no alembic_version) is taken to be at the schema's
  first revision (the code of commit 378f50b), then treated as any older database;
- an older database is upgraded (mode "auto") or refused with what to run (mode "check");
- a database newer than this code is always refused.

Command line (`python -m rlhf.runtime.migrations --help`): current, upgrade, check, and revision (autogenerate a
new revision from the models' difference to a database at head), for one service's database.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, inspect, text

log = logging.getLogger(__name__)
# Alembic announces its context on every start; the lines below say what was done to the database.
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

# What a service does on meeting an older schema (ServerConfig.database_migrate, RLHF_DB_MIGRATE).
AUTO, CHECK = "auto", "check"
MODES = (AUTO, CHECK)

# Where each service's Schema is defined: "module:attribute" (a callable taking no arguments), so that this
# module, below the services, imports none of them.
SCHEMAS = {
    "feedback": "feedback_service.migrations:schema",
    "inference": "inference_service.migrations:schema",
    "reward": "rlhf.runtime.training_migrations:reward_schema",
    "policy": "rlhf.runtime.training_migrations:policy_schema",
}


class SchemaError(RuntimeError):
    """The database's schema is not the one this code runs on; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Schema:
    """One service's database schema: its models and the migrations that build them."""

    # The service it belongs to ("feedback"): named in messages and on the command line.
    service: str
    # The folder holding env.py and versions/.
    location: pathlib.Path
    # The models' tables, as the code at head uses them.
    metadata: MetaData
    # The revision of a database made before migrations existed (it has the tables, no alembic_version).
    legacy_revision: str
    # Values the revisions read through `op.get_context().config.attributes` (the registry table's name).
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def config(self, connection: Connection | None = None) -> Config:
        """An Alembic configuration without alembic.ini: this schema's folder, run on `connection`."""
        config = Config()
        config.set_main_option("script_location", str(self.location))
        config.attributes.update(self.attributes, schema=self, connection=connection)
        return config

    def heads(self) -> tuple[str, ...]:
        return tuple(ScriptDirectory.from_config(self.config()).get_heads())


def default_mode(url: str) -> str:
    """Auto for the embedded SQLite; check for a shared database (PostgreSQL), which an operator upgrades once
    (`python -m rlhf.runtime.migrations upgrade <service>`) before its replicas start."""
    return AUTO if url.startswith("sqlite") else CHECK


def run_env(context: Any) -> None:
    """The body of every env.py: run the migrations on the connection the caller handed over."""
    config = context.config
    schema: Schema = config.attributes["schema"]
    connection = config.attributes.get("connection")
    if connection is None:
        raise SchemaError("migrations run through rlhf.runtime.migrations (python -m rlhf.runtime.migrations)")
    context.configure(
        connection=connection,
        target_metadata=schema.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _lock(connection: Connection, schema: Schema) -> None:
    """Replicas starting together over one PostgreSQL take turns (the lock ends with the transaction)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"rlhf-{schema.service}"})


def current_revisions(connection: Connection) -> tuple[str, ...]:
    return tuple(MigrationContext.configure(connection).get_current_heads())


def _describe(revisions: Sequence[str]) -> str:
    return ", ".join(revisions) or "none"


def _how_to_upgrade(schema: Schema, url: str) -> str:
    return (
        f"back it up, then upgrade it with `python -m rlhf.runtime.migrations upgrade {schema.service} "
        f"--database-url '{url}'`, or start the service with RLHF_DB_MIGRATE=auto to upgrade it on start"
    )


def prepare_database(engine: Engine, schema: Schema, mode: str = "") -> str:
    """Bring `engine`'s database to `schema`'s head as `mode` allows (ServerConfig.database_migrate: auto
    upgrades an older schema, check refuses it; empty: `default_mode`); returns what was done: "created",
    "upgraded" or "current". Raises SchemaError when it may not or cannot."""
    url = engine.url.render_as_string(hide_password=True)
    mode = mode.strip().lower() or default_mode(url)
    if mode not in MODES:
        raise SchemaError(f"RLHF_DB_MIGRATE must be one of {', '.join(MODES)}, not {mode!r}")
    heads = schema.heads()
    with engine.begin() as connection:
        _lock(connection, schema)
        current = current_revisions(connection)
        versioned = bool(current)
        if not versioned:
            if not set(inspect(connection).get_table_names()) & set(schema.metadata.tables):
                schema.metadata.create_all(connection)
                command.stamp(schema.config(connection), "head")
                log.info("%s database created at schema revision %s", schema.service, _describe(heads))
                return "created"
            current = (schema.legacy_revision,)  # made before migrations existed
        if set(current) == set(heads):
            if not versioned:
                command.stamp(schema.config(connection), "head")  # changes no table
            return "current"
        script = ScriptDirectory.from_config(schema.config())
        unknown = [revision for revision in current if revision not in {s.revision for s in script.walk_revisions()}]
        if unknown:
            raise SchemaError(
                f"the {schema.service} database ({url}) is at schema revision {_describe(unknown)}, which this "
                f"version of the platform does not know (a newer version wrote it): run that version, or restore "
                f"a backup made for this one"
            )
        if mode == CHECK:
            raise SchemaError(
                f"the {schema.service} database ({url}) is at schema revision {_describe(current)} and this version "
                f"needs {_describe(heads)}: {_how_to_upgrade(schema, url)}"
            )
        # SQLite commits DDL as it goes, so a failed upgrade is not rolled back there: t0002 checks before each
        # step, and running the upgrade again finishes it (PostgreSQL rolls the whole upgrade back).
        if not versioned:
            command.stamp(schema.config(connection), schema.legacy_revision)
        command.upgrade(schema.config(connection), "head")
        log.warning(
            "%s database upgraded from schema revision %s to %s", schema.service, _describe(current), _describe(heads)
        )
        return "upgraded"


def differences(connection: Connection, schema: Schema) -> list[Any]:
    """What `alembic check` reports: the models' difference to the database (empty when they agree)."""
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return compare_metadata(context, schema.metadata)


# -- command line -----------------------------------------------------------------------------------------


def load_schema(service: str) -> Schema:
    module, _, attribute = SCHEMAS[service].partition(":")
    factory: Callable[[], Schema] = getattr(importlib.import_module(module), attribute)
    return factory()


def main(argv: Sequence[str] | None = None) -> None:
    from rlhf.runtime.config import ServerConfig
    from rlhf.runtime.db import make_engine

    parser = argparse.ArgumentParser(
        prog="python -m rlhf.runtime.migrations", description="Show, check or upgrade a service's database schema."
    )
    parser.add_argument("action", choices=("current", "upgrade", "check", "revision"))
    parser.add_argument("service", choices=sorted(SCHEMAS))
    parser.add_argument("--data-dir", type=pathlib.Path, help="data dir of the SQLite default (RLHF_DATA_DIR)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (default RLHF_<SERVICE>_DATABASE_URL, else SQLite)")
    parser.add_argument("-m", "--message", default="", help="revision: what the new revision changes")
    args = parser.parse_args(argv)
    server = ServerConfig.from_env(args.service, data_dir=args.data_dir, database_url=args.database_url)
    url = server.resolved_database_url()
    schema = load_schema(args.service)
    engine = make_engine(url)
    try:
        if args.action == "upgrade":
            print(f"{args.service}: {prepare_database(engine, schema, AUTO)} at {_describe(schema.heads())}")
            return
        with engine.begin() as connection:
            current = current_revisions(connection)
            if args.action == "current":
                print(f"{args.service}: {_describe(current)} (head {_describe(schema.heads())})")
            elif args.action == "check":
                found = differences(connection, schema)
                if set(current) != set(schema.heads()) or found:
                    raise SystemExit(
                        f"{args.service}: database at {_describe(current)}, head {_describe(schema.heads())}; "
                        f"differences to the models: {found or 'none'}"
                    )
                print(f"{args.service}: at head, no differences to the models")
            else:
                command.revision(schema.config(connection), message=args.message, autogenerate=True)
    except SchemaError as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
