"""drop the observations.sex and observations.age_years indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 15:20:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_observations_sex"))
        batch_op.drop_index(batch_op.f("ix_observations_age_years"))


def downgrade() -> None:
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_observations_age_years"), ["age_years"], unique=False)
        batch_op.create_index(batch_op.f("ix_observations_sex"), ["sex"], unique=False)
