"""The HTTP edge: SendGrid's Event Webhook, the website's events API, one-click unsubscribe.

It only appends events and suppressions (and stops mail at once on an
unsubscribe); scoring stays in the cycle. Input never gets a 500:

- a bad request gets a 4xx whose JSON ``detail`` says what is wrong (401/403 for
  credentials and signatures, 413 for size, 415 for a content type that is not
  JSON, 400 for a body that is not UTF-8 JSON or nests deeper than 32 levels,
  422 when no item of a batch is usable); a batch keeps its good items and lists
  the bad ones by index;
- a database that keeps refusing (deadlocks, lock waits: retried first, see
  ``db/transactions.py``) or cannot be reached gets 503 with ``Retry-After``;
  nothing is acknowledged that was not committed;
- anything else is a bug: it is logged with the request id (no request data),
  and the client gets a JSON 500 carrying the same id.

People get pages, machines get JSON: the unsubscribe links answer with branded HTML
(``nurture.pages``), errors included, and so does an unknown path asked for by a
browser; the JSON endpoints keep JSON errors. ``/docs`` shows the OpenAPI document,
with the request bodies the endpoints read raw described by ``nurture.api_schemas``.

Every answer carries ``X-Request-ID``. Run with ``nurture api``.
"""

from __future__ import annotations

import binascii
import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sendgrid.helpers.eventwebhook import EventWebhook
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.engine import ensure_current_schema, get_engine
from db.imports import add_events
from db.inbound import ingest_provider_events, unsubscribe_lead
from db.suppressions import LINK_SOURCE, has_active_enrollments, lead_address, resubscribe, stop_mailing
from db.transactions import TransactionRetries, retrying_transaction, unavailable_cause
from nurture import pages
from nurture.api_schemas import EventsRequest, SendGridEventBatch, component_schemas, request_body
from nurture.errors import (
    ConfigurationError,
    DatabaseBusyError,
    NurtureError,
    PayloadError,
    SchemaOutOfDateError,
)
from nurture.inbound import parse_api_events, parse_sendgrid_batch
from nurture.pages import PageBrand
from nurture.payloads import parse_json
from nurture.playbook import load_playbook
from nurture.preview import INERT_LINK_PATHS
from nurture.settings import Settings, get_settings
from nurture.unsubscribe import UnsubscribeLink, claimed_lead_id, read_unsubscribe_token

logger = logging.getLogger(__name__)

SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
REQUEST_ID = "X-Request-ID"
# Seconds a client is asked to wait when the database is unreachable.
UNAVAILABLE_RETRY_AFTER = 5
# How long the server keeps an idle connection open: longer than clients and reverse proxies keep
# one to reuse it (httpx 5 s, nginx's upstream keepalive and AWS's load balancers 60 s). The side
# that closes an idle connection must be the client: a request sent just as the server closes
# it is reset (uvicorn's default, 5 s, reset 2 of 4,400 requests under load).
KEEP_ALIVE_SECONDS = 75

# Paths machines call: their errors stay JSON whoever asks.
MACHINE_PATHS = ("/v1/", "/webhooks/", "/healthz", "/openapi.json", "/docs")
INVALID_LINK = "this unsubscribe link is not valid"
# The exit reason of the sequences a person stopped from the unsubscribe page.
SERIES_STOPPED = "stopped by the person (unsubscribe page)"

# The OpenAPI document's introduction (the full guide is docs/api.md).
API_DESCRIPTION = (
    "What the website and SendGrid push into nurture: the events API (bearer token), SendGrid's signed "
    "Event Webhook, and the unsubscribe links of every email (pages for people). A bad request gets a 4xx "
    "whose JSON `detail` says what is wrong; a batch keeps its good items and lists the bad ones by index; "
    "a busy or unreachable database gets 503 with `Retry-After`. Every answer carries `X-Request-ID`."
)

T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error that quotes odd input still encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _request_id(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", "-"))


def _described(exc: BaseException) -> str:
    """An exception for the server log without data from the request: types, SQLSTATE, SQL, frames.

    A database error's message can quote row values (``Key (email)=(...)``), so only its
    class, SQLSTATE and statement are kept; other exceptions keep their message.
    """
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        head = f"{type(exc).__name__} ({type(exc.orig).__name__}, SQLSTATE {sqlstate}) in: {exc.statement}"
    else:
        head = f"{type(exc).__name__}: {exc}"
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"{head}\n{frames}"


class RequestGuard:
    """Gives every request an id (``X-Request-ID``) and answers an unexpected exception with a JSON 500.

    The exception is logged with the id, the method and the route, never the body or
    the query; the client gets the id to quote, not a traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append(REQUEST_ID, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            route = scope.get("route")
            where = getattr(route, "path", None) or "(no route)"
            logger.error("request %s: %s %s failed: %s", request_id, scope.get("method"), where, _described(exc))
            if started:
                raise
            response = AsciiJSONResponse(
                {"detail": "internal error: nothing was stored; quote the request id", "request_id": request_id},
                status_code=500,
            )
            await response(scope, receive, send_with_id)


async def _body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 past ``limit`` bytes (before reading it, when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _require_json(request: Request) -> None:
    """415 unless the body is declared as JSON in UTF-8 (or not declared at all)."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media_type, *parameters = (part.strip().lower() for part in declared.split(";"))
    charset = next((p.partition("=")[2].strip('"') for p in parameters if p.startswith("charset=")), "utf-8")
    if (media_type == "application/json" or media_type.endswith("+json")) and charset in {"utf-8", "utf8"}:
        return
    raise HTTPException(415, f"the body must be JSON in UTF-8 (Content-Type: application/json), not {declared[:100]!r}")


def _for_a_person(request: Request) -> bool:
    """Whether an error is shown to a person (a branded page) rather than a program (JSON).

    The unsubscribe links are followed by people, so they always get pages; other paths
    get one only when a browser asks for HTML and the path is not one machines call.
    """
    path = request.url.path
    if path.startswith("/unsubscribe/") or path == "/unsubscribe":
        return True
    return not path.startswith(MACHINE_PATHS) and "text/html" in request.headers.get("accept", "")


def page_brand(config: Settings) -> PageBrand:
    """The brand the pages show, from the playbook; a plain one (and a warning) when it cannot be read.

    The API keeps taking events and unsubscribes with a broken playbook: only the pages lose the name.
    """
    try:
        brand = load_playbook(config.nurture_playbook).brand
    except (NurtureError, OSError) as exc:
        logger.warning("the pages show no brand: the playbook %s cannot be read: %s", config.nurture_playbook, exc)
        return PageBrand()
    return PageBrand(name=brand.name, website=brand.website)


async def _parsed(raw: bytes) -> Any:
    """The body as JSON, parsed off the event loop (a 5 MB body takes a while); 400 when it is not."""
    try:
        return await run_in_threadpool(parse_json, raw)
    except PayloadError as exc:
        raise HTTPException(400, str(exc)) from exc


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app, bound to ``settings`` (from the environment by default)."""
    config = settings or get_settings()
    engine = get_engine(config.database_url)
    brand = page_brand(config)
    retries = TransactionRetries(lock_timeout_seconds=config.nurture_api_lock_timeout_seconds)
    verifier = EventWebhook()
    public_key = (
        verifier.convert_public_key_to_ecdsa(config.sendgrid_webhook_public_key)
        if config.sendgrid_webhook_public_key
        else None
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ensure_current_schema(engine)
        yield

    app = FastAPI(
        title="nurture",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        default_response_class=AsciiJSONResponse,
    )
    app.add_middleware(RequestGuard)

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the schemas the raw-body endpoints' ``openapi_extra`` refer to."""
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=API_DESCRIPTION, routes=app.routes)
            document.setdefault("components", {}).setdefault("schemas", {}).update(component_schemas())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    def _unavailable(request: Request, detail: str, retry_after: int) -> Response:
        headers = {"Retry-After": str(retry_after)}
        if _for_a_person(request):
            return HTMLResponse(pages.error_page(brand, status=503, detail=detail), status_code=503, headers=headers)
        return AsciiJSONResponse(
            {"detail": detail, "request_id": _request_id(request.scope)}, status_code=503, headers=headers
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _for_a_person(request):
            if exc.detail == INVALID_LINK:
                html = pages.invalid_link_page(brand)
            elif exc.status_code == 404:
                html = pages.not_found_page(brand)
            else:
                html = pages.error_page(brand, status=exc.status_code, detail=str(exc.detail))
            return HTMLResponse(html, status_code=exc.status_code, headers=exc.headers)
        return AsciiJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(DatabaseBusyError)
    async def database_busy(request: Request, exc: DatabaseBusyError) -> Response:
        return _unavailable(request, f"{exc}; send it again", exc.retry_after_seconds)

    @app.exception_handler(PoolTimeoutError)
    async def pool_exhausted(request: Request, exc: PoolTimeoutError) -> Response:
        logger.warning("request %s: no database connection free in time", _request_id(request.scope))
        return _unavailable(request, "the database is busy; nothing was stored; send it again", 2)

    @app.exception_handler(DBAPIError)
    async def database_unreachable(request: Request, exc: DBAPIError) -> Response:
        if not unavailable_cause(exc):
            raise exc  # a bug (bad SQL, a missing table): RequestGuard logs it and answers 500
        logger.error("request %s: database unavailable: %s", _request_id(request.scope), _described(exc))
        return _unavailable(request, "the database is unavailable; send it again later", UNAVAILABLE_RETRY_AFTER)

    @app.exception_handler(ConfigurationError)
    @app.exception_handler(SchemaOutOfDateError)
    async def not_ready(request: Request, exc: Exception) -> Response:
        logger.error("request %s: %s", _request_id(request.scope), exc)
        return _unavailable(request, "the service is not ready: see its log", UNAVAILABLE_RETRY_AFTER)

    def _in_transaction(work: Callable[[Session], T]) -> T:
        return retrying_transaction(engine, work, retries=retries)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Up, and the database answers at this version's schema (503 otherwise)."""
        ensure_current_schema(engine)
        return {"status": "ok"}

    @app.post(
        "/webhooks/sendgrid",
        openapi_extra={
            **request_body(SendGridEventBatch, "The events, signed by SendGrid over the exact bytes of the body"),
            "parameters": [
                {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
                for name in (SIGNATURE, TIMESTAMP)
            ],
        },
    )
    async def sendgrid_webhook(request: Request) -> AsciiJSONResponse:
        """SendGrid's signed Event Webhook: verified over the raw body, then applied once."""
        if public_key is None:
            raise HTTPException(503, "the webhook is off: set SENDGRID_WEBHOOK_PUBLIC_KEY")
        signature, timestamp = request.headers.get(SIGNATURE), request.headers.get(TIMESTAMP)
        if not signature or not timestamp:
            raise HTTPException(401, f"missing {SIGNATURE} or {TIMESTAMP}")
        # Integers only, and short: a 400-digit timestamp must not reach float arithmetic.
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise HTTPException(403, "stale or invalid signature timestamp")
        if abs(int(time.time()) - int(timestamp)) > config.nurture_webhook_tolerance_seconds:
            raise HTTPException(403, "stale or invalid signature timestamp")
        _require_json(request)
        raw = await _body(request, config.nurture_max_body_bytes)
        try:
            valid = verifier.verify_signature(raw.decode("utf-8"), signature, timestamp, public_key)
        except (ValueError, UnicodeDecodeError, binascii.Error):
            valid = False
        if not valid:
            raise HTTPException(403, "signature does not match the body")
        batch = parse_sendgrid_batch(await _parsed(raw))
        if batch.problems and not batch.events and not batch.ignored:
            raise HTTPException(400, "; ".join(batch.problems[:5]))
        now = _now()

        def apply(session: Session) -> dict[str, Any]:
            result = ingest_provider_events(session=session, events=batch.events, now=now)
            return {
                "received": result.received,
                "events_stored": result.events_stored,
                "duplicates": result.duplicates,
                "suppressions_added": result.suppressions_added,
                "messages_updated": result.messages_updated,
                "ignored": batch.ignored,
                "problems": batch.problems[:20],
            }

        return AsciiJSONResponse(await run_in_threadpool(_in_transaction, apply))

    @app.post(
        "/v1/events",
        openapi_extra={
            **request_body(EventsRequest, "One event, or a batch; with `Authorization: Bearer NURTURE_API_TOKEN`"),
            "parameters": [{"name": "Authorization", "in": "header", "required": True, "schema": {"type": "string"}}],
        },
    )
    async def events_api(request: Request) -> AsciiJSONResponse:
        """The website's events: one event or {"events": [...]}, bearer-token auth."""
        if config.nurture_api_token is None:
            raise HTTPException(503, "the events API is off: set NURTURE_API_TOKEN")
        expected = f"Bearer {config.nurture_api_token.get_secret_value()}"
        if request.headers.get("authorization") != expected:
            raise HTTPException(401, "missing or wrong bearer token")
        _require_json(request)
        now = _now()
        payload = await _parsed(await _body(request, config.nurture_max_body_bytes))
        records, errors = parse_api_events(payload, now=now)

        def apply(session: Session) -> dict[str, Any]:
            added = add_events(session=session, records=records, now=now, source="api")
            return {
                "accepted": added.stored,
                "duplicates": added.duplicates,
                "leads_created": added.leads_created,
                "suppressions_added": added.suppressions_added,
                "errors": errors,
            }

        if not records:
            body = {"accepted": 0, "duplicates": 0, "leads_created": 0, "suppressions_added": 0, "errors": errors}
            return AsciiJSONResponse(body, status_code=422 if errors else 200)
        return AsciiJSONResponse(await run_in_threadpool(_in_transaction, apply))

    def _lead_for(token: str, now: datetime, *, then: Callable[[Session, UnsubscribeLink], T]) -> T:
        """``then`` done with the link a token is, checked against the address of the lead it names, in one
        transaction; 404 (a page saying the link is not valid) when it is not valid."""
        lead_id = claimed_lead_id(token)
        if lead_id is None:  # not shaped like a token: no database work
            raise HTTPException(404, INVALID_LINK)
        keys, days = config.unsubscribe_keys, config.nurture_unsubscribe_link_days

        def check(session: Session) -> tuple[T] | None:
            email = lead_address(session=session, lead_id=lead_id)
            if email is None:  # erased, or never was
                return None
            link = read_unsubscribe_token(token, email=email, keys=keys, now=now, link_days=days)
            return None if link is None else (then(session, link),)

        done = _in_transaction(check)
        if done is None:
            raise HTTPException(404, INVALID_LINK)
        return done[0]

    def _html(content: str, status: int = 200) -> HTMLResponse:
        # Pages about one person's address: never kept by a shared cache.
        return HTMLResponse(content, status_code=status, headers={"Cache-Control": "no-store"})

    @app.get("/unsubscribe/{token}", response_class=HTMLResponse)
    def unsubscribe_page(token: str) -> HTMLResponse:
        """A confirmation page; mail scanners open links, so a GET alone changes nothing."""
        if token in INERT_LINK_PATHS:
            return _html(pages.preview_link_page(brand))

        def look(session: Session, link: UnsubscribeLink) -> tuple[UnsubscribeLink, bool]:
            return link, has_active_enrollments(session=session, lead_id=link.lead_id)

        link, in_a_series = _lead_for(token, _now(), then=look)
        expired = config.nurture_unsubscribe_link_days if link.expired else None
        series = f"/unsubscribe/{token}/series" if in_a_series else None
        return _html(
            pages.confirm_page(brand, action=f"/unsubscribe/{token}", expired_after_days=expired, series=series)
        )

    @app.post("/unsubscribe/{token}", response_class=HTMLResponse)
    def unsubscribe(token: str) -> HTMLResponse:
        """RFC 8058 one-click unsubscribe (and the page's button): takes effect at once.

        An authentic link older than NURTURE_UNSUBSCRIBE_LINK_DAYS still unsubscribes:
        stopping mail never harms the person, refusing might break the law. Only a link
        still in its time offers the undo.
        """
        if token in INERT_LINK_PATHS:
            return _html(pages.preview_link_page(brand))
        now = _now()

        def apply(session: Session, link: UnsubscribeLink) -> UnsubscribeLink:
            source = "expired link" if link.expired else LINK_SOURCE
            unsubscribe_lead(session=session, lead_id=link.lead_id, now=now, source=source)
            return link

        link = _lead_for(token, now, then=apply)
        undo = None if link.expired else f"/unsubscribe/{token}/undo"
        return _html(pages.unsubscribed_page(brand, undo=undo))

    @app.post("/unsubscribe/{token}/series", response_class=HTMLResponse)
    def stop_series(token: str) -> HTMLResponse:
        """Fewer emails, not none: the lead's active sequences end and their queued emails are cancelled;
        the address stays subscribed, so a later stage change may start another sequence."""
        now = _now()

        def apply(session: Session, link: UnsubscribeLink) -> None:
            stop_mailing(session=session, lead_ids=[link.lead_id], reason=SERIES_STOPPED, now=now)

        _lead_for(token, now, then=apply)
        return _html(pages.series_stopped_page(brand, unsubscribe=f"/unsubscribe/{token}"))

    @app.post("/unsubscribe/{token}/undo", response_class=HTMLResponse)
    def undo_unsubscribe(token: str) -> HTMLResponse:
        """Subscribe again, for whoever unsubscribed by mistake: lifts an unsubscribe made with a link in
        its time within the last hour (never a bounce, a spam report or SendGrid's own)."""
        now = _now()

        def apply(session: Session, link: UnsubscribeLink) -> bool:
            return not link.expired and resubscribe(session=session, lead_id=link.lead_id, now=now)

        if not _lead_for(token, now, then=apply):
            return _html(pages.cannot_undo_page(brand), status=409)
        return _html(pages.resubscribed_page(brand))

    return app
