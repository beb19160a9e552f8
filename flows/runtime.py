"""What every flow and task needs, built once per process from the settings.

Tasks take ids and times, never sessions or clients: each builds what it needs
from here, so a task can run in any worker process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy import Engine

from db.dispatch import Sender
from db.engine import ensure_current_schema, get_engine
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


def build_runtime(settings: Settings) -> Runtime:
    """Check the schema and the playbook before any work starts."""
    engine = get_engine(settings.database_url)
    ensure_current_schema(engine)
    playbook = load_playbook(settings.nurture_playbook, templates_dir=settings.nurture_templates)
    return Runtime(
        settings=settings,
        engine=engine,
        playbook=playbook,
        renderer=EmailRenderer(settings.nurture_templates),
        transport=transport_from_settings(settings),
        sender=Sender(
            from_email=settings.nurture_from_email,
            postal_address=settings.nurture_postal_address,
            public_url=settings.nurture_public_url,
            secret_key=settings.nurture_secret_key.get_secret_value(),
            unsubscribe_mailto=settings.nurture_unsubscribe_mailto,
            asm_group_id=settings.sendgrid_asm_group_id,
        ),
    )


@lru_cache(maxsize=1)
def current_runtime() -> Runtime:
    return build_runtime(get_settings())


def reset_runtime() -> None:
    """Forget the cached runtime (after settings or the playbook changed)."""
    current_runtime.cache_clear()
    get_settings.cache_clear()
