"""query indexes: patients.patient_id; findings (path, record_id) replaces findings.path

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 02:45:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_patients_patient_id"), ["patient_id"], unique=False)
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_findings_path"))
        batch_op.create_index("ix_findings_path_record", ["path", "record_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_index("ix_findings_path_record")
        batch_op.create_index(batch_op.f("ix_findings_path"), ["path"], unique=False)
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patients_patient_id"))
