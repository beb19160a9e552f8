"""The request bodies of the API, as JSON Schema for its OpenAPI document (``/docs``).

Documentation only: the endpoints read their raw bodies (a size limit before
parsing, the webhook's signature over the exact bytes) and parse them with
``nurture.inbound``, which keeps a batch's good items and reports the others by
index. These models describe what that parsing accepts; they validate nothing.

Pure: no HTTP, no database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

REF_TEMPLATE = "#/components/schemas/{model}"


class ApiEvent(BaseModel):
    """One thing a person did on the website or in the product."""

    model_config = ConfigDict(title="Event")

    email: str = Field(description="The person's address; a lead is created when none has it", max_length=320)
    kind: str = Field(
        description="What happened, as the playbook's scoring names it (page_view, pricing_view, demo_request…)",
        pattern=r"^[a-z0-9_]+$",
        examples=["pricing_view"],
    )
    occurred_at: datetime | None = Field(
        default=None, description="When it happened (ISO 8601 with a time zone); default: when it is received"
    )
    id: str | int | None = Field(
        default=None, description="Your id for the event: the same id sent twice is stored once (retries are safe)"
    )
    properties: dict[str, Any] | None = Field(default=None, description="Anything else worth keeping, as JSON")


class ApiEventBatch(BaseModel):
    """Up to the body size limit of events in one request; each is accepted or reported on its own."""

    model_config = ConfigDict(title="EventBatch")

    events: list[ApiEvent]


class EventsRequest(RootModel[ApiEvent | ApiEventBatch]):
    """One event, or ``{"events": [...]}``."""


class SendGridEvent(BaseModel):
    """One event of SendGrid's Event Webhook; fields nurture does not read are allowed and ignored."""

    model_config = ConfigDict(extra="allow", title="SendGridEvent")

    event: str = Field(
        description="processed, delivered, deferred, dropped, bounce, open, click, spamreport, unsubscribe, "
        "group_unsubscribe, group_resubscribe; other types are counted and ignored"
    )
    email: str | None = None
    timestamp: int = Field(description="Unix time of the event")
    sg_event_id: str | None = Field(default=None, description="SendGrid's id: a replayed event is stored once")
    sg_message_id: str | None = None
    nurture_message_id: str | int | None = Field(
        default=None, description="The custom argument nurture sends with each email: which message this is about"
    )
    reason: str | None = None
    response: str | None = None
    url: str | None = None
    useragent: str | None = None
    ip: str | None = None
    category: str | list[str] | None = None
    sg_machine_open: bool | None = Field(default=None, description="An open by Apple Mail Privacy Protection")


class SendGridEventBatch(RootModel[list[SendGridEvent]]):
    """A JSON list of events, as SendGrid posts them."""


BODIES: tuple[type[BaseModel], ...] = (EventsRequest, SendGridEventBatch)


def component_schemas() -> dict[str, Any]:
    """Every schema the request bodies use, for the OpenAPI document's ``components.schemas``."""
    schemas: dict[str, Any] = {}
    for model in BODIES:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def request_body(model: type[BaseModel], description: str) -> dict[str, Any]:
    """An ``openapi_extra`` that documents ``model`` as the JSON body of an endpoint that reads it raw."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model=model.__name__)}}},
        }
    }
