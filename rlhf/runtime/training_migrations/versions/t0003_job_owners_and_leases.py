"""Jobs get an owner (the replica running them), a lease its heartbeat renews, and a cancel request another replica
can record (rlhf.runtime.jobs: several replicas over one database). Rows from before have no owner and no lease:
a starting replica takes their owner for dead and marks those still active INTERRUPTED.

Revision ID: t0003
Revises: t0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "t0003"
down_revision = "t0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", sa.String(128)))
    op.add_column("jobs", sa.Column("lease_expires_at", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("cancel_requested_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_requested_at")
        batch.drop_column("lease_expires_at")
        batch.drop_column("owner")
