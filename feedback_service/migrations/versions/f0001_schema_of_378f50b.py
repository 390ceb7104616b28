"""The feedback table as the code of commit 378f50b made it (the schema before migrations).

Revision ID: f0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "f0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column(
            "sequence", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("score", sa.Double, nullable=True),
        sa.Column("chosen", sa.Text, nullable=False),
        sa.Column("rejected", sa.Text, nullable=False),
        sa.Column("margin", sa.Double, nullable=True),
        sa.Column("run_id", sa.String, nullable=False),
        sa.Column("notes", sa.Text, nullable=False),
        sa.Column("generation_id", sa.String, nullable=False),
        sa.Column("policy_version", sa.String, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("request_id", sa.String, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("agent_id", "request_id", name="uq_feedback_agent_request"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_feedback_agent_sequence", "feedback", ["agent_id", "sequence"])
    op.create_index("ix_feedback_agent_created", "feedback", ["agent_id", "created_at"])
    op.create_index("ix_feedback_agent_version", "feedback", ["agent_id", "policy_version"])


def downgrade() -> None:
    op.drop_table("feedback")
