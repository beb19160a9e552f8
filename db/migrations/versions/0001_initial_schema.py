"""Initial schema: leads, events, the score ledger, transitions, enrollments, messages, suppressions.

Revision ID: 0001
Revises: 
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('lead',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('first_name', sa.String(length=200), nullable=True),
    sa.Column('last_name', sa.String(length=200), nullable=True),
    sa.Column('company', sa.String(length=300), nullable=True),
    sa.Column('job_title', sa.String(length=300), nullable=True),
    sa.Column('company_size', sa.Integer(), nullable=True),
    sa.Column('country', sa.String(length=100), nullable=True),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('fit_score', sa.Float(), nullable=False),
    sa.Column('engagement', sa.Float(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('scored_at', db.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('next_review_at', db.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('needs_rescore', sa.Boolean(), nullable=False),
    sa.Column('suppressed', sa.String(length=32), nullable=True),
    sa.Column('created_at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('lead', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lead_email'), ['email'], unique=True)
        batch_op.create_index('ix_lead_needs_rescore', ['needs_rescore'], unique=False, postgresql_where=sa.text('needs_rescore'), sqlite_where=sa.text('needs_rescore'))
        batch_op.create_index(batch_op.f('ix_lead_next_review_at'), ['next_review_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_lead_stage'), ['stage'], unique=False)

    op.create_table('suppression',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('suppression', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_suppression_email'), ['email'], unique=True)

    op.create_table('event',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('lead_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('occurred_at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('properties', sa.JSON(), nullable=False),
    sa.Column('applied', sa.Boolean(), nullable=False),
    sa.Column('received_at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('source', 'external_id', name='uq_event_source_external_id')
    )
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.create_index('ix_event_lead_kind_time', ['lead_id', 'kind', 'occurred_at'], unique=False)
        batch_op.create_index('ix_event_pending', ['occurred_at'], unique=False, postgresql_where=sa.text('NOT applied'), sqlite_where=sa.text('NOT applied'))

    op.create_table('score_change',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('lead_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('old_score', sa.Float(), nullable=False),
    sa.Column('new_score', sa.Float(), nullable=False),
    sa.Column('contributions', sa.JSON(), nullable=False),
    sa.Column('playbook_version', sa.String(length=32), nullable=False),
    sa.Column('flow_run_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('score_change', schema=None) as batch_op:
        batch_op.create_index('ix_score_change_lead_at', ['lead_id', 'at'], unique=False)

    op.create_table('stage_transition',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('lead_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('from_stage', sa.String(length=16), nullable=False),
    sa.Column('to_stage', sa.String(length=16), nullable=False),
    sa.Column('at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('reason', sa.String(length=500), nullable=False),
    sa.Column('playbook_version', sa.String(length=32), nullable=False),
    sa.Column('flow_run_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('stage_transition', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_stage_transition_flow_run_id'), ['flow_run_id'], unique=False)
        batch_op.create_index('ix_stage_transition_lead_at', ['lead_id', 'at'], unique=False)

    op.create_table('enrollment',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('lead_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sequence', sa.String(length=100), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('transition_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('started_at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('exit_reason', sa.String(length=300), nullable=True),
    sa.Column('ended_at', db.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['transition_id'], ['stage_transition.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    with op.batch_alter_table('enrollment', schema=None) as batch_op:
        batch_op.create_index('ix_enrollment_lead_state', ['lead_id', 'state'], unique=False)
        batch_op.create_index(batch_op.f('ix_enrollment_transition_id'), ['transition_id'], unique=False)

    op.create_table('message',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('lead_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('enrollment_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sequence', sa.String(length=100), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('template', sa.String(length=200), nullable=False),
    sa.Column('subject_template', sa.String(length=500), nullable=False),
    sa.Column('idempotency_key', sa.String(length=320), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('due_at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('lease_until', db.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=2000), nullable=True),
    sa.Column('provider_message_id', sa.String(length=200), nullable=True),
    sa.Column('subject', sa.String(length=500), nullable=True),
    sa.Column('created_at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('sent_at', db.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('updated_at', db.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['enrollment_id'], ['enrollment.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key')
    )
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_message_enrollment_id'), ['enrollment_id'], unique=False)
        batch_op.create_index('ix_message_lead', ['lead_id'], unique=False)
        batch_op.create_index('ix_message_status_due', ['status', 'due_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index('ix_message_status_due')
        batch_op.drop_index('ix_message_lead')
        batch_op.drop_index(batch_op.f('ix_message_enrollment_id'))

    op.drop_table('message')
    with op.batch_alter_table('enrollment', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_enrollment_transition_id'))
        batch_op.drop_index('ix_enrollment_lead_state')

    op.drop_table('enrollment')
    with op.batch_alter_table('stage_transition', schema=None) as batch_op:
        batch_op.drop_index('ix_stage_transition_lead_at')
        batch_op.drop_index(batch_op.f('ix_stage_transition_flow_run_id'))

    op.drop_table('stage_transition')
    with op.batch_alter_table('score_change', schema=None) as batch_op:
        batch_op.drop_index('ix_score_change_lead_at')

    op.drop_table('score_change')
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.drop_index('ix_event_pending', postgresql_where=sa.text('NOT applied'), sqlite_where=sa.text('NOT applied'))
        batch_op.drop_index('ix_event_lead_kind_time')

    op.drop_table('event')
    with op.batch_alter_table('suppression', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_suppression_email'))

    op.drop_table('suppression')
    with op.batch_alter_table('lead', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lead_stage'))
        batch_op.drop_index(batch_op.f('ix_lead_next_review_at'))
        batch_op.drop_index('ix_lead_needs_rescore', postgresql_where=sa.text('needs_rescore'), sqlite_where=sa.text('needs_rescore'))
        batch_op.drop_index(batch_op.f('ix_lead_email'))

    op.drop_table('lead')
