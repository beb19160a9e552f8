"""What every flow and task needs, built once per process from the settings.

Tasks take ids and times, never sessions or clients: each builds what it needs
from here, so a task can run in any worker process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import cast

from sqlalchemy import Engine

from db.engine import ensure_current_schema, get_engine
from flows.sending import Sender
from flows.webhooks import webhook_secrets
from nurture.playbook import Playbook, load_playbook
from nurture.rendering import EmailRenderer
from nurture.settings import Settings, get_settings
from nurture.transports import EmailTransport, transport_from_settings


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    playbook: Playbook
    renderer: EmailRenderer
    transport: EmailTransport
    sender: Sender
    # Each webhook's signing secret, by webhook name (never printed).
    webhook_secrets: dict[str, str] = field(default_factory=dict, repr=False)


def build_runtime(settings: Settings) -> Runtime:
    """Check the schema and the playbook before any work starts."""
    engine = get_engine(settings.database_url)
    ensure_current_schema(engine)
    playbook = load_playbook(settings.nurture_playbook, templates_dir=settings.nurture_templates)
    # Webhooks are never sent unsigned: a missing secret stops the run here, before any work.
    secrets = webhook_secrets(playbook, settings.webhook_environment())
    return Runtime(
        settings=settings,
        engine=engine,
        playbook=playbook,
        renderer=EmailRenderer(settings.nurture_templates),
        transport=transport_from_settings(settings),
        sender=Sender.from_settings(settings),
        webhook_secrets=secrets,
    )


# Secrets may live in Prefect Secret blocks instead of the workers' environment.
SECRET_BLOCKS = {
    "SENDGRID_API_KEY": "nurture-sendgrid-api-key",
    "SENDGRID_WEBHOOK_PUBLIC_KEY": "nurture-sendgrid-webhook-public-key",
    "NURTURE_SECRET_KEY": "nurture-secret-key",
    "NURTURE_API_TOKEN": "nurture-api-token",
    "NURTURE_WEBHOOK_SECRET": "nurture-webhook-secret",
}


def load_secret_blocks() -> list[str]:
    """Fill secrets missing from the environment from Prefect Secret blocks; returns the variables filled.

    The environment wins. Values are never logged: only the variable names are returned.
    """
    from prefect.blocks.system import Secret

    filled = []
    for variable, block in SECRET_BLOCKS.items():
        if os.environ.get(variable):
            continue
        try:
            secret = cast("Secret[str]", Secret.load(block))  # called from sync code: a Secret, not a coroutine
            value = secret.get()
        except (ValueError, LookupError):  # no such block
            continue
        os.environ[variable] = str(value)
        filled.append(variable)
    return filled


@lru_cache(maxsize=1)
def current_runtime() -> Runtime:
    load_secret_blocks()
    get_settings.cache_clear()
    return build_runtime(get_settings())


def reset_runtime() -> None:
    """Forget the cached runtime (after settings or the playbook changed)."""
    current_runtime.cache_clear()
    get_settings.cache_clear()


def run_name(prefix: str) -> str:
    """``cycle-2026-11-22T10:00Z``: the run's ``now`` parameter, or the wall clock."""
    from prefect.runtime import flow_run

    now = flow_run.parameters.get("now")
    when = now if isinstance(now, datetime) else datetime.now(UTC)
    return f"{prefix}-{when.astimezone(UTC):%Y-%m-%dT%H:%MZ}"


def as_utc(value: datetime | None) -> datetime:
    """A flow's ``now`` parameter: the wall clock when not given, UTC when given naive."""
    if value is None:
        return datetime.now(UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
