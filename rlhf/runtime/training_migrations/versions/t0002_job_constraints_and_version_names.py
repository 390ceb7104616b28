"""What start-up code added after 378f50b, now a revision: the jobs table's unique indexes (one active job per agent,
unique creation numbers) and the registry's version names ("v3", "v15.2") with their unique index.

Databases that ran that start-up code already have some of it: every step checks first.

Revision ID: t0002
Revises: t0001
Create Date: 2026-11-26
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "t0002"
down_revision = "t0001"
branch_labels = None
depends_on = None

ACTIVE = ("QUEUED", "RUNNING")


def _index_names(table: str) -> set[str]:
    return {index["name"] for index in sa.inspect(op.get_bind()).get_indexes(table)}


def _name_versions(registry: str) -> None:
    if "version_name" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(registry)}:
        op.add_column(registry, sa.Column("version_name", sa.String(32)))
    table = sa.table(registry, sa.column("version_name", sa.String), sa.column("version_number", sa.Integer))
    # Rows from before names existed were called "v<number>".
    op.execute(
        table.update()
        .where(table.c.version_name.is_(None))
        .values(version_name=sa.literal("v") + sa.cast(table.c.version_number, sa.String))
    )
    if f"uq_{registry}_version_name" not in _index_names(registry):
        op.create_index(f"uq_{registry}_version_name", registry, ["agent_id", "version_name"], unique=True)


def _constrain_jobs() -> None:
    bind = op.get_bind()
    jobs = sa.table(
        "jobs",
        sa.column("job_id", sa.String),
        sa.column("agent_id", sa.String),
        sa.column("state", sa.String),
        sa.column("error", sa.Text),
        sa.column("seq", sa.Integer),
        sa.column("created_at", sa.DateTime),
        sa.column("finished_at", sa.DateTime),
    )
    names = _index_names("jobs")
    if "uq_jobs_seq" not in names:
        # An older version handed out duplicate numbers: renumber in creation order.
        if bind.execute(sa.select(sa.func.count() - sa.func.count(sa.distinct(jobs.c.seq)))).scalar():
            order = bind.execute(sa.select(jobs.c.job_id).order_by(jobs.c.seq, jobs.c.created_at)).scalars().all()
            for number, job_id in enumerate(order, start=1):
                bind.execute(jobs.update().where(jobs.c.job_id == job_id).values(seq=number))
        op.create_index("uq_jobs_seq", "jobs", ["seq"], unique=True)
    if "uq_jobs_active_agent" not in names:
        # Jobs still active here were left by a stopped server; an agent with several cannot keep them all.
        crowded = (
            sa.select(jobs.c.agent_id)
            .where(jobs.c.state.in_(ACTIVE))
            .group_by(jobs.c.agent_id)
            .having(sa.func.count() > 1)
        )
        bind.execute(
            jobs.update()
            .where(jobs.c.state.in_(ACTIVE), jobs.c.agent_id.in_(crowded))
            .values(
                state="INTERRUPTED",
                error="the server stopped while this job ran; start a new job",
                finished_at=dt.datetime.now(dt.timezone.utc),
            )
        )
        active = sa.column("state").in_(ACTIVE)
        op.create_index(
            "uq_jobs_active_agent", "jobs", ["agent_id"], unique=True, sqlite_where=active, postgresql_where=active
        )


def upgrade() -> None:
    _name_versions(op.get_context().config.attributes["registry_table"])
    _constrain_jobs()


def downgrade() -> None:
    registry = op.get_context().config.attributes["registry_table"]
    op.drop_index("uq_jobs_active_agent", "jobs")
    op.drop_index("uq_jobs_seq", "jobs")
    op.drop_index(f"uq_{registry}_version_name", registry)
    with op.batch_alter_table(registry) as batch:
        batch.drop_column("version_name")
