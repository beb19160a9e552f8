"""Settings from the environment, in one pydantic-settings class.

Built lazily by :func:`get_settings`: importing nurture opens no database and
reads no secret. Secrets are ``SecretStr`` so they never print in logs.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nurture.errors import ConfigurationError

# Good enough for the outbox on a laptop; refused when real email goes out.
DEFAULT_SECRET_KEY = "change-me-nurture-development-key"  # noqa: S105
# Links must work at least 30 days after sending (CAN-SPAM); twice that leaves room for late readers.
MIN_UNSUBSCRIBE_LINK_DAYS = 60
# Chunks scored at once on PostgreSQL unless NURTURE_CHUNK_CONCURRENCY says otherwise.
DEFAULT_CHUNK_CONCURRENCY = 2


class Settings(BaseSettings):
    """Every knob of nurture; the environment variable is the field name upper-cased."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    nurture_database_url: str = Field(
        default="sqlite:///./nurture.db",
        description="SQLAlchemy URL of the app database (SQLite file or postgresql+psycopg://...).",
    )
    nurture_playbook: Path = Path("./nurture.yaml")
    nurture_templates: Path = Path("./templates")
    nurture_transport: Literal["outbox", "sendgrid", "memory"] = "outbox"
    nurture_outbox_dir: Path = Path("./outbox")
    sendgrid_api_key: SecretStr | None = None
    sendgrid_api_host: str = "https://api.sendgrid.com"
    nurture_from_email: str = "Acme Analytics <hello@acme-analytics.example>"
    nurture_postal_address: str = "Acme Analytics Inc., 100 Market Street, San Francisco, CA 94105"
    nurture_public_url: str = "http://localhost:8000"
    nurture_secret_key: SecretStr = SecretStr(DEFAULT_SECRET_KEY)
    nurture_secret_key_previous: SecretStr | None = Field(
        default=None,
        description="Earlier NURTURE_SECRET_KEY values, comma-separated: the unsubscribe links they signed keep "
        "working; never used to sign",
    )
    nurture_unsubscribe_link_days: int = Field(
        default=400,
        description="Days an unsubscribe link is guaranteed to work (at least 60); an older authentic link is "
        "still honoured while its key is accepted",
    )
    nurture_unsubscribe_mailto: str | None = Field(
        default=None, description="Address for mailto: unsubscribe requests, added to List-Unsubscribe"
    )
    sendgrid_asm_group_id: int | None = Field(default=None, description="SendGrid unsubscribe group for every email")
    nurture_rescore_on_scoring_change: bool = Field(
        default=False,
        description="When the playbook's scoring rules or stage thresholds changed since scores were last "
        "computed, the next cycle rescores every lead first (off: it says a rescore-all is needed)",
    )
    nurture_send_rate: float = Field(
        default=0.0, ge=0, description="Messages per second across all dispatchers; 0 = no limit"
    )
    sendgrid_webhook_public_key: str | None = Field(
        default=None, description="The Event Webhook's verification key (base64), from SendGrid's mail settings"
    )
    nurture_api_token: SecretStr | None = Field(default=None, description="Bearer token for POST /v1/events")
    nurture_webhook_secret: SecretStr | None = Field(
        default=None,
        description="Signs outbound webhooks (HMAC-SHA256); needed as soon as the playbook has webhooks, unless each "
        "names its own secret_env",
    )
    nurture_prefect_events_personal_data: bool = Field(
        default=False,
        description="Put who the lead is (email, name, company, profile, attributes) in nurture's Prefect events; "
        "off: ids, stages, scores and the score breakdown only",
    )
    nurture_api_lock_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="PostgreSQL: how long one API transaction waits for a row lock before it is tried again",
    )
    nurture_webhook_tolerance_seconds: int = Field(default=600, ge=1, description="Oldest accepted signature")
    nurture_max_body_bytes: int = Field(default=5_000_000, ge=1024, description="Largest accepted request body")
    nurture_send_concurrency: int = Field(
        default=128,
        ge=1,
        le=512,
        description="Requests in flight per dispatcher, each on a kept-alive connection of its own; also the most "
        "messages a killed dispatcher can leave in doubt",
    )
    nurture_chunk_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="Chunks of leads a cycle or rescore-all scores at once (threads, one transaction each): "
        "2 by default on PostgreSQL; always 1 on SQLite, whose writers take turns",
    )
    nurture_send_lease_seconds: int = Field(
        default=600,
        ge=1,
        le=86_400,
        description="How long a dispatcher holds its claimed messages; a stopped dispatcher's claims return "
        "to the queue after it, and its sends in flight are marked in doubt",
    )

    @model_validator(mode="after")
    def _sendgrid_needs_a_key(self) -> Settings:
        if self.nurture_transport == "sendgrid" and not self.sendgrid_api_key:
            raise ValueError("NURTURE_TRANSPORT=sendgrid needs SENDGRID_API_KEY to be set")
        if self.nurture_transport == "sendgrid" and self.nurture_secret_key.get_secret_value() == DEFAULT_SECRET_KEY:
            raise ValueError(
                "NURTURE_TRANSPORT=sendgrid needs NURTURE_SECRET_KEY (it signs unsubscribe links in real email)"
            )
        if not self.nurture_postal_address.strip():
            raise ValueError("NURTURE_POSTAL_ADDRESS must not be empty: every email carries it")
        if self.nurture_unsubscribe_link_days < MIN_UNSUBSCRIBE_LINK_DAYS:
            raise ValueError(
                f"NURTURE_UNSUBSCRIBE_LINK_DAYS must be at least {MIN_UNSUBSCRIBE_LINK_DAYS}, not "
                f"{self.nurture_unsubscribe_link_days}: an unsubscribe link must keep working at least 30 days "
                "after its email is sent"
            )
        if DEFAULT_SECRET_KEY in self.unsubscribe_keys[1:]:
            raise ValueError(
                "NURTURE_SECRET_KEY_PREVIOUS must not hold the development key: anyone can sign links with it"
            )
        return self

    @property
    def unsubscribe_keys(self) -> tuple[str, ...]:
        """The keys an unsubscribe link may be signed with: the current one first, then the previous ones."""
        current = self.nurture_secret_key.get_secret_value()
        given = self.nurture_secret_key_previous.get_secret_value() if self.nurture_secret_key_previous else ""
        previous = (key.strip() for key in given.split(","))
        return (current, *dict.fromkeys(key for key in previous if key and key != current))

    @property
    def chunk_concurrency(self) -> int:
        """How many chunks of leads to score at once: NURTURE_CHUNK_CONCURRENCY (2 by default) on PostgreSQL,
        1 on SQLite (one writer at a time: more threads would only wait for each other's lock)."""
        if self.nurture_database_url.startswith("sqlite"):
            return 1
        return self.nurture_chunk_concurrency or DEFAULT_CHUNK_CONCURRENCY

    def webhook_environment(self) -> dict[str, str]:
        """Where webhook signing secrets are read: the environment (a webhook's own ``secret_env``), with
        NURTURE_WEBHOOK_SECRET as these settings have it."""
        given = self.nurture_webhook_secret
        return {**os.environ, "NURTURE_WEBHOOK_SECRET": given.get_secret_value() if given else ""}

    @property
    def database_url(self) -> str:
        return self.nurture_database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            variable = ".".join(str(part) for part in error["loc"]).upper()
            where = f"{variable}: " if variable else ""
            problems.append(f"{where}{error['msg'].removeprefix('Value error, ')}")
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from exc
