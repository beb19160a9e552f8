"""The ``nurture`` command line.

Every command reports bad input as a message (what, where, what was kept) and
exits non-zero; a traceback is a bug. Prefect and the database are imported
only by the commands that need them, so ``nurture validate`` stays quick.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from nurture.errors import ConfigurationError, NurtureError, PlaybookError

if TYPE_CHECKING:
    from nurture.playbook import Playbook
    from nurture.settings import Settings

app = typer.Typer(
    name="nurture",
    help="Score leads, move them through cold → warm → hot → customer, and send nurture sequences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(wanted: bool) -> None:
    if wanted:
        from nurture import __version__

        print(f"nurture {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Score leads, move them through cold → warm → hot → customer, and send nurture sequences."""


import_app = typer.Typer(help="Load leads or events from CSV or JSON Lines files.", no_args_is_help=True)
run_app = typer.Typer(help="Run a flow once, now.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
messages_app = typer.Typer(help="The outbox: list messages; send failed or in-doubt ones again.", no_args_is_help=True)
enrollments_app = typer.Typer(
    help="Who walks which sequence: list enrollments, end some by hand.", no_args_is_help=True
)
sequences_app = typer.Typer(
    help="The playbook's sequences and their enrollments: pause one, resume it.", no_args_is_help=True
)
lead_app = typer.Typer(help="One lead by hand: set its stage, recorded as a manual transition.", no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(messages_app, name="messages")
app.add_typer(enrollments_app, name="enrollments")
app.add_typer(sequences_app, name="sequences")
app.add_typer(lead_app, name="lead")
app.add_typer(run_app, name="run")
app.add_typer(db_app, name="db")

console = Console()
errors = Console(stderr=True)

# Rows shown per bad-input report before "... and N more".
MAX_PROBLEMS_SHOWN = 20


def _settings() -> Settings:
    from nurture.settings import get_settings

    return get_settings()


def _prefect_defaults() -> None:
    """Defaults for running flows from the CLI; an explicit environment variable wins."""
    # The first flow run in a process starts a temporary Prefect server; on a cold
    # machine that takes longer than Prefect's default 20 s patience.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "nurture,db,flows")


def _quiet_prefect_console() -> None:
    """Keep per-task INFO lines off the terminal (they still reach the Prefect UI)."""
    _prefect_defaults()
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def _parse_now(value: str | None, *, allow_future: bool = True) -> datetime:
    """``--now``; a run that writes refuses a future one unless told, as it would send early what is due by then."""
    if value is None:
        return datetime.now(UTC)
    from nurture.importing import parse_timestamp

    try:
        at = parse_timestamp(value)
    except (ValueError, OverflowError) as exc:
        raise typer.BadParameter(str(exc).replace("occurred_at", "--now")) from exc
    if not allow_future and at > datetime.now(UTC) + FUTURE_SLACK:
        raise typer.BadParameter(
            f"{value} is in the future: the run would send today every email due by then. "
            "Add --allow-future to do that on purpose (a test database, a simulation).",
            param_hint="--now",
        )
    return at


FUTURE_SLACK = timedelta(minutes=5)  # clocks of machines that share a database differ a little
ALLOW_FUTURE_HELP = "Accept a --now in the future (sends early what is due by then)"


def _engine(*, check_schema: bool = True) -> Any:
    from db.engine import ensure_current_schema, get_engine

    engine = get_engine(_settings().database_url)
    if check_schema:
        ensure_current_schema(engine)
    return engine


def _checked_playbook() -> Playbook:
    """The playbook, after checking it and every template it uses (PlaybookError if not)."""
    from nurture.errors import PlaybookError
    from nurture.playbook import load_playbook
    from nurture.rendering import EmailRenderer

    settings = _settings()
    playbook = load_playbook(settings.nurture_playbook, templates_dir=settings.nurture_templates)
    problems = EmailRenderer(settings.nurture_templates).check(playbook)
    if problems:
        raise PlaybookError(problems)
    if playbook.webhooks:
        from flows.webhooks import webhook_secrets

        webhook_secrets(playbook, settings.webhook_environment())  # ConfigurationError: never sent unsigned
    return playbook


@app.command()
def validate(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    database: Annotated[
        bool,
        typer.Option(
            "--database",
            help="Check against where it runs: accept the event kinds stored in the database, and require "
            "each webhook's signing secret to be set",
        ),
    ] = False,
) -> None:
    """Check the playbook and every template together, like a compiler: every problem, with file and line.

    Without --database it needs no database and no secrets, so it runs as a pre-commit hook on a laptop."""
    from nurture.validation import validate_files

    settings = _settings()
    stored: set[str] = set()
    if database:
        from db.engine import session_scope
        from db.reports import stored_event_kinds

        with session_scope(_engine()) as session:
            stored = stored_event_kinds(session=session)
    report = validate_files(
        settings.nurture_playbook,
        settings.nurture_templates,
        stored_event_kinds=stored,
        environment=settings.webhook_environment() if database else None,
    )
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    elif report.ok:
        summary = report.summary
        console.print(
            f"[green]ok[/] {settings.nurture_playbook} (version {summary['version']}): "
            f"{summary['event_kinds']} event kinds, {summary['fit_rules']} fit rules, "
            f"{summary['sequences']} sequences with {summary['emails']} emails, "
            f"{summary['template_files']} templates in {settings.nurture_templates}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        # One problem a line, never wrapped: editors and CI jump to `file:line`.
        for problem in report.problems:
            print(problem, file=sys.stderr)
        count = len(report.problems)
        print(
            f"{count} problem{'s' if count != 1 else ''} in {settings.nurture_playbook} and "
            f"{settings.nurture_templates}/",
            file=sys.stderr,
        )
    if not report.ok:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the tables, or bring them up to this version of nurture."""
    from db.engine import upgrade_schema

    before, after = upgrade_schema(_engine(check_schema=False))
    if before == after:
        console.print(f"[green]ok[/] the database is up to date (schema {after})")
    else:
        console.print(f"[green]ok[/] schema {before or '(empty)'} → {after}")


def _print_problems(path: Path, problems: list[Any]) -> None:
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        errors.print(f"[yellow]skipped[/] {path}:{problem.line}: {problem.reason}", highlight=False)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        errors.print(f"[yellow]... and {len(problems) - MAX_PROBLEMS_SHOWN} more bad rows[/]")


def _import(path: Path, kind: str) -> None:
    from db.imports import import_file

    engine = _engine()
    size = max(path.stat().st_size, 1) if path.is_file() else 1
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=errors,
        transient=True,
        disable=size < 1_000_000,
    ) as progress:
        bar = progress.add_task(f"importing {path.name}", total=None)
        result = import_file(
            engine=engine,
            path=path,
            kind=kind,  # type: ignore[arg-type]
            now=datetime.now(UTC),
            on_progress=lambda n: progress.update(bar, completed=n),
        )
    _print_problems(path, result.problems)
    for notice in result.notices():
        errors.print(f"[yellow]note[/] {path}: {notice}", highlight=False)
    if kind == "leads":
        summary = f"{result.created} leads created, {result.updated} updated"
    else:
        summary = f"{result.rows_kept} events stored, {result.duplicates} already stored or repeated"
        if result.leads_created:
            summary += f", {result.leads_created} new leads created from event emails"
    bad = len(result.problems)
    colour = "yellow" if bad else "green"
    console.print(
        f"[{colour}]{path}[/]: {result.rows_read} rows read, {summary}, {bad} bad rows skipped", highlight=False
    )
    if bad and not result.rows_kept:
        raise typer.Exit(1)


@import_app.command("leads")
def import_leads(file: Annotated[Path, typer.Argument(help="CSV or .jsonl file with an email column")]) -> None:
    """Create or update leads by email. Unknown columns go into the lead's attributes."""
    _import(file, "leads")


@import_app.command("events")
def import_events(file: Annotated[Path, typer.Argument(help="CSV or .jsonl file: email, kind, occurred_at")]) -> None:
    """Add behavioural events (page_view, demo_request, purchase, ...) by lead email."""
    _import(file, "events")


@run_app.command("cycle")
def run_cycle(
    now: Annotated[str | None, typer.Option(help="Run as if it were this ISO 8601 time (default: now)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Leads per chunk and messages per dispatch batch")] = 2000,
    allow_future: Annotated[bool, typer.Option("--allow-future", help=ALLOW_FUTURE_HELP)] = False,
) -> None:
    """Score changed leads, apply transitions, enroll, and send due messages: once."""
    at = _parse_now(now, allow_future=allow_future)
    _checked_playbook()
    _engine()
    _quiet_prefect_console()
    from flows.cycle import nurture_cycle, run_and_report
    from flows.prefect_server import temporary_prefect_api

    with temporary_prefect_api():
        summary, ok = run_and_report(nurture_cycle, now=at, batch_size=batch_size)
    console.print_json(json.dumps(summary, default=str))
    _exit_on_problems(summary, ok)


@run_app.command("dispatch")
def run_dispatch(
    now: Annotated[str | None, typer.Option(help="Send what is due by this ISO 8601 time (default: now)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Messages claimed at a time")] = 500,
    allow_future: Annotated[bool, typer.Option("--allow-future", help=ALLOW_FUTURE_HELP)] = False,
) -> None:
    """Send the messages that are due: once."""
    at = _parse_now(now, allow_future=allow_future)
    _checked_playbook()
    _engine()
    _quiet_prefect_console()
    from flows.cycle import dispatch_messages, run_and_report
    from flows.prefect_server import temporary_prefect_api

    with temporary_prefect_api():
        summary, ok = run_and_report(dispatch_messages, now=at, batch_size=batch_size)
    console.print_json(json.dumps(summary, default=str))
    _exit_on_problems(summary, ok)


@run_app.command("rescore-all")
def run_rescore_all(
    now: Annotated[str | None, typer.Option(help="Score as if it were this ISO 8601 time (default: now)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Leads per chunk")] = 2000,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say how many scores and stages would change; write nothing")
    ] = False,
    allow_future: Annotated[bool, typer.Option("--allow-future", help=ALLOW_FUTURE_HELP)] = False,
) -> None:
    """Recompute every lead's score from all its events under the playbook as it is now: once.

    Run it after changing scoring rules or stage thresholds (`nurture status` says when). Stage
    changes it causes start their sequences; the next cycle or dispatch sends their emails.
    """
    at = _parse_now(now, allow_future=allow_future)
    _checked_playbook()
    _engine()
    _quiet_prefect_console()
    from flows.cycle import run_and_report
    from flows.maintenance import rescore_all
    from flows.prefect_server import temporary_prefect_api

    with temporary_prefect_api():
        summary, ok = run_and_report(rescore_all, now=at, batch_size=batch_size, dry_run=dry_run)
    console.print_json(json.dumps(summary, default=str))
    _exit_on_problems(summary, ok)


def _exit_on_problems(summary: dict[str, Any], ok: bool) -> None:
    """A run with a failed chunk of leads, or that failed messages or left some in doubt, exits 2, so cron and
    supervisors notice."""
    if ok:
        return
    failed_chunks = summary.get("chunks_failed") or []
    if failed_chunks:
        errors.print(
            f"[red]chunks failed:[/] {', '.join(failed_chunks)} rolled back, the others are kept; "
            "the next run takes their leads up"
        )
    messages = summary.get("messages", summary)  # a cycle's summary nests them, dispatch's is them
    hooks = summary.get("webhooks") or {}
    hook_problems = any(hooks.get(k) for k in ("dead", "in_doubt", "in_doubt_from_stopped_dispatchers"))
    if hook_problems:
        errors.print(
            "[red]webhook problems:[/] some deliveries are dead or in doubt; "
            "see `nurture messages list --webhooks`, then `nurture messages retry --webhooks`"
        )
    if messages.get("failed") or messages.get("in_doubt") or not (failed_chunks or hook_problems):
        errors.print(
            "[red]delivery problems:[/] some messages failed or are in doubt; "
            "see `nurture messages list --status failed` and `--status in_doubt`, then `nurture messages retry`"
        )
    raise typer.Exit(2)


def _count_table(title: str, label: str, unit: str, counts: dict[str, int]) -> Table:
    table = Table(title=title, show_edge=False)
    table.add_column(label)
    table.add_column(unit, justify="right")
    for key, n in counts.items():
        table.add_row(key, str(n))
    return table


def _print_funnel(totals: dict[str, Any]) -> None:
    from rich.columns import Columns

    console.print(
        Columns(
            [
                _count_table("Funnel", "stage", "leads", totals["leads_by_stage"]),
                _count_table(
                    f"Transitions ({totals['transitions']})", "from → to", "leads", totals["transitions_by_path"]
                ),
                _count_table("Messages", "status", "messages", totals["messages_by_status"]),
                *(
                    [_count_table("Webhooks", "status", "deliveries", totals["webhooks_by_status"])]
                    if totals.get("webhooks_by_status")
                    else []
                ),
            ],
            padding=4,
        )
    )
    stuck = sum(totals.get("webhooks_by_status", {}).get(s, 0) for s in ("dead", "in_doubt"))
    if stuck:
        console.print(
            f"[yellow]{stuck} webhook deliveries are dead or in doubt:[/] see `nurture messages list --webhooks`, "
            "then `nurture messages retry --webhooks` once the receiver is fixed (docs/webhooks.md).",
            highlight=False,
        )


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """Leads per stage, messages per status, transitions so far, webhook deliveries per status."""
    from db.cycle import scoring_version_in_use
    from db.engine import session_scope
    from db.reports import funnel
    from nurture.playbook import load_playbook

    with session_scope(_engine()) as session:
        totals = funnel(session=session)
        in_use = scoring_version_in_use(session=session)
    try:
        version: str | None = load_playbook(_settings().nurture_playbook).scoring_version
    except PlaybookError:
        version = None  # the counts are still worth showing; `nurture validate` says what is wrong
    # None: unknown, the playbook cannot be read.
    totals["rescore_needed"] = None if version is None else in_use is not None and in_use != version
    if as_json:
        console.print_json(json.dumps(totals))
        return
    _print_funnel(totals)
    if version is None:
        console.print(
            "[yellow]The playbook cannot be read[/] (run `nurture validate`): "
            "whether scores need a rescore is unknown.",
            highlight=False,
        )
    elif totals["rescore_needed"]:
        console.print(
            "[yellow]The playbook's scoring rules or stage thresholds changed since scores were last computed:[/] "
            "stored scores and stages follow the old rules. Run `nurture run rescore-all --dry-run` to see what "
            "would change, then `nurture run rescore-all`.",
            highlight=False,
        )


@app.command()
def explain(
    email: Annotated[str, typer.Argument(help="The lead's email address")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    now: Annotated[str | None, typer.Option(help="Explain the score as of this ISO 8601 time")] = None,
) -> None:
    """Why a lead has its score and stage, and why it got each email."""
    from db.engine import session_scope
    from db.reports import explain_lead
    from nurture.playbook import load_playbook

    settings = _settings()
    playbook = load_playbook(settings.nurture_playbook)
    try:
        from nurture.importing import normalise_email

        normalise_email(email)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    at = _parse_now(now)
    with session_scope(_engine()) as session:
        report = explain_lead(session=session, email=email, playbook=playbook, now=at)
    if report is None:
        errors.print(f"no lead with the email {email.strip().lower()}")
        raise typer.Exit(1)
    if as_json:
        console.print_json(json.dumps(report, default=str))
        return
    _print_explanation(report, playbook, at)


def _print_explanation(report: dict[str, Any], playbook: Playbook, now: datetime) -> None:
    from nurture.timeline import WIDTH, render

    width = max(60, min(console.width, WIDTH))
    for line in render(report, playbook, now, width=width):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


STATUS_HELP = "queued, claimed, sending, sent, failed, in_doubt, suppressed, cancelled or skipped (repeatable)"


def _parse_statuses(values: list[str] | None, default: tuple[Any, ...], kind: Any, what: str) -> tuple[Any, ...]:
    """``--status`` values as members of the ``kind`` enum (``default`` when none), or a usage error naming them."""
    if not values:
        return default
    try:
        return tuple(kind(v.strip().lower()) for v in values)
    except ValueError as exc:
        known = ", ".join(s.value for s in kind)
        raise typer.BadParameter(f"{exc}; {what} is one of: {known}") from exc


def _statuses(values: list[str] | None, default: tuple[Any, ...]) -> tuple[Any, ...]:
    from nurture.delivery import MessageStatus

    return _parse_statuses(values, default, MessageStatus, "a status")


WEBHOOK_STATUS_HELP = (
    "with --webhooks: queued, claimed, sending, delivered, failed, in_doubt or dead (repeatable; default: dead and "
    "in_doubt)"
)
WEBHOOKS_HELP = "Outbound webhook deliveries instead of emails (docs/webhooks.md)"


def _delivery_statuses(values: list[str] | None, default: tuple[Any, ...]) -> tuple[Any, ...]:
    from nurture.webhooks import DeliveryStatus

    return _parse_statuses(values, default, DeliveryStatus, "a webhook delivery's status")


def _list_webhook_deliveries(status: list[str] | None, limit: int, as_json: bool) -> None:
    from db.engine import session_scope
    from db.webhooks import list_deliveries
    from nurture.webhooks import OPERATOR_RETRYABLE

    statuses = _delivery_statuses(status, OPERATOR_RETRYABLE)
    with session_scope(_engine()) as session:
        rows = list_deliveries(session=session, statuses=statuses, limit=limit)
    if as_json:
        console.print_json(json.dumps([_delivery_row(row) for row in rows]))
        return
    if not rows:
        console.print("no webhook deliveries match", highlight=False)
        return
    table = Table(show_edge=False)
    for column in ("id", "lead", "webhook", "event", "status", "due", "tries", "http", "why"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            str(row.id),
            escape(row.email),
            row.webhook,
            row.event,
            row.status,
            row.due_at.isoformat()[:16],
            str(row.attempts),
            str(row.response_status or ""),
            escape((row.last_error or "")[:200]),
        )
    console.print(table)


def _delivery_row(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "delivery_id": row.delivery_id,
        "email": row.email,
        "webhook": row.webhook,
        "event": row.event,
        "status": row.status,
        "due_at": row.due_at.isoformat(),
        "attempts": row.attempts,
        "response_status": row.response_status,
        "last_error": row.last_error,
    }


def _webhook_footnote() -> None:
    """Under the emails: how many webhook deliveries need an operator too (they are listed apart)."""
    from db.engine import session_scope
    from db.webhooks import count_by_status
    from nurture.webhooks import OPERATOR_RETRYABLE

    with session_scope(_engine()) as session:
        counts = count_by_status(session=session, statuses=OPERATOR_RETRYABLE)
    if counts:
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        console.print(f"webhook deliveries: {detail}; see `nurture messages list --webhooks`", highlight=False)


@messages_app.command("list")
def messages_list(
    status: Annotated[list[str] | None, typer.Option(help=f"{STATUS_HELP}; {WEBHOOK_STATUS_HELP}")] = None,
    template: Annotated[str | None, typer.Option(help="Only this template")] = None,
    sequence: Annotated[str | None, typer.Option(help="Only this sequence")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    webhooks: Annotated[bool, typer.Option("--webhooks", help=WEBHOOKS_HELP)] = False,
) -> None:
    """Messages by status (default: failed and in doubt), most recently due first, with why.

    With --webhooks, outbound webhook deliveries instead (default: dead and in doubt).
    """
    from db.engine import session_scope
    from db.messages import MessageSelection, list_messages
    from nurture.delivery import RETRYABLE

    if webhooks:
        if template or sequence:
            raise typer.BadParameter("--template and --sequence select emails, not webhook deliveries")
        _list_webhook_deliveries(status, limit, as_json)
        return
    selection = MessageSelection(statuses=_statuses(status, RETRYABLE), template=template, sequence=sequence)
    with session_scope(_engine()) as session:
        rows = list_messages(session=session, selection=selection, limit=limit)
    if as_json:
        console.print_json(json.dumps([_row(row) for row in rows]))
        return
    if not rows:
        console.print("no messages match", highlight=False)
        _webhook_footnote()
        return
    table = Table(show_edge=False)
    for column in ("id", "lead", "sequence", "step", "template", "status", "due", "tries", "why"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            str(row.id),
            escape(row.email),
            row.sequence,
            row.step_id,
            row.template,
            row.status,
            row.due_at.isoformat()[:16],
            str(row.attempts),
            escape((row.last_error or "")[:200]),
        )
    console.print(table)
    _webhook_footnote()


def _row(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "email": row.email,
        "sequence": row.sequence,
        "step": row.step,
        "step_id": row.step_id,
        "template": row.template,
        "status": row.status,
        "due_at": row.due_at.isoformat(),
        "attempts": row.attempts,
        "last_error": row.last_error,
    }


@messages_app.command("retry")
def messages_retry(
    message_id: Annotated[list[int] | None, typer.Option("--id", help="This message (repeatable)")] = None,
    template: Annotated[str | None, typer.Option(help="Every selected message of this template")] = None,
    sequence: Annotated[str | None, typer.Option(help="Every selected message of this sequence")] = None,
    status: Annotated[
        list[str] | None, typer.Option(help="failed (the default) or in_doubt; in doubt may send a second copy")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
    webhooks: Annotated[bool, typer.Option("--webhooks", help=WEBHOOKS_HELP + ": dead (default) or in_doubt")] = False,
) -> None:
    """Queue failed (or in-doubt) messages again, due now: after fixing a template or an outage.

    Messages of exited enrollments (the lead left the stage, an operator ended it, the address was
    suppressed) are left alone. With --webhooks, dead (or in-doubt) webhook deliveries instead.
    """
    from db.engine import session_scope
    from db.messages import MessageSelection, plan_retry, retry_messages
    from nurture.delivery import RETRYABLE, MessageStatus

    if webhooks:
        if template or sequence:
            raise typer.BadParameter("--template and --sequence select emails, not webhook deliveries")
        _retry_webhook_deliveries(message_id or [], status, yes)
        return

    chosen = _statuses(status, RETRYABLE if message_id else (MessageStatus.failed,))
    if not set(chosen) <= set(RETRYABLE):
        raise typer.BadParameter("only failed and in_doubt messages can be retried", param_hint="--status")
    selection = MessageSelection(statuses=chosen, ids=tuple(message_id or ()), template=template, sequence=sequence)
    engine = _engine()
    with session_scope(engine) as session:
        plan = plan_retry(session=session, selection=selection)
    if plan.skipped_exited:
        console.print(
            f"{plan.skipped_exited} selected messages are left alone: their enrollment was exited (the lead left "
            "its stage, an operator ended it, or the address was suppressed)",
            highlight=False,
        )
    if not plan.total:
        console.print("no failed or in-doubt messages match", highlight=False)
        return
    detail = ", ".join(f"{n} {s}" for s, n in sorted(plan.by_status.items()))
    templates = ", ".join(f"{t} {n}" for t, n in plan.by_template.most_common(5))
    console.print(f"{plan.total} messages to queue again ({detail}); templates: {templates}", highlight=False)
    if plan.by_status.get(MessageStatus.in_doubt):
        console.print(
            f"[yellow]warning:[/] {plan.by_status[MessageStatus.in_doubt]} are in doubt: SendGrid may already have "
            "delivered them, and retrying sends a second copy. Check SendGrid's activity feed for their "
            "message ids first."
        )
    if not yes and not typer.confirm(f"Queue {plan.total} messages again, due now?"):
        raise typer.Exit(1)
    with session_scope(engine) as session:
        queued = retry_messages(session=session, selection=selection, now=datetime.now(UTC))
    console.print(f"[green]ok[/] {queued} messages queued again; the next cycle or dispatch sends them")


def _retry_webhook_deliveries(ids: list[int], status: list[str] | None, yes: bool) -> None:
    from db.engine import session_scope
    from db.webhooks import count_by_status, retry_deliveries
    from nurture.webhooks import OPERATOR_RETRYABLE, DeliveryStatus

    chosen = _delivery_statuses(status, OPERATOR_RETRYABLE if ids else (DeliveryStatus.dead,))
    if not set(chosen) <= set(OPERATOR_RETRYABLE):
        raise typer.BadParameter("only dead and in_doubt webhook deliveries can be retried", param_hint="--status")
    engine = _engine()
    with session_scope(engine) as session:
        if ids:
            from db.webhooks import list_deliveries

            rows = list_deliveries(session=session, statuses=chosen, ids=ids, limit=len(ids))
            counts: dict[str, int] = {}
            for row in rows:
                counts[row.status] = counts.get(row.status, 0) + 1
        else:
            counts = count_by_status(session=session, statuses=chosen)
    total = sum(counts.values())
    if not total:
        console.print("no dead or in-doubt webhook deliveries match", highlight=False)
        return
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    console.print(f"{total} webhook deliveries to queue again ({detail})", highlight=False)
    if counts.get(DeliveryStatus.in_doubt):
        console.print(
            f"[yellow]warning:[/] {counts[DeliveryStatus.in_doubt]} are in doubt: the receiver may already have them; "
            "a retry sends them again with the same Nurture-Delivery-Id, which a receiver that deduplicates drops."
        )
    if not yes and not typer.confirm(f"Queue {total} webhook deliveries again, due now?"):
        raise typer.Exit(1)
    with session_scope(engine) as session:
        queued = retry_deliveries(session=session, statuses=chosen, ids=ids, now=datetime.now(UTC))
    console.print(f"[green]ok[/] {queued} webhook deliveries queued again; the next cycle or dispatch delivers them")


# Reasons are stored with the enrollment, pause or transition (columns of 300 characters and more).
MAX_REASON = 200
ENROLLMENT_STATES_HELP = "active (the default), completed, converted, exited or skipped (repeatable)"


def _address(value: str, option: str) -> str:
    from nurture.importing import normalise_email

    try:
        return normalise_email(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from exc


def _reason(value: str | None, *, required: bool) -> str | None:
    """An operator's reason, kept with what they did; one line, short enough to store."""
    text = " ".join((value or "").split())
    if not text:
        if required:
            raise typer.BadParameter("say why: it is recorded with what you do", param_hint="--reason")
        return None
    if len(text) > MAX_REASON:
        raise typer.BadParameter(f"{len(text)} characters; at most {MAX_REASON}", param_hint="--reason")
    return text


def _enrollment_states(values: list[str] | None) -> tuple[Any, ...]:
    from nurture.sequences import EnrollmentState

    if not values:
        return (EnrollmentState.active,)
    try:
        return tuple(EnrollmentState(v.strip().lower()) for v in values)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc}; a state is one of: active, completed, converted, exited, skipped") from exc


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _steps_taken(row: Any) -> str:
    return f"{len(row.steps_done)}: {', '.join(row.steps_done)}" if row.steps_done else "0"


def _next_step(row: Any, paused: set[str]) -> str:
    """When the enrollment moves next, in words: a due time, a step in flight, or ended."""
    if row.state != "active":
        return f"ended {_when(row.ended_at)}".strip()
    if row.next_due_at is None:
        shown = "step in flight" + (f" ({row.in_flight.status})" if row.in_flight else "")
    elif row.waiting_until is not None:
        shown = f"waiting for the lead until {_when(row.waiting_until)}"
    else:
        shown = _when(row.next_due_at)
    return f"{shown} (paused)" if row.sequence in paused else shown


def _enrollment_json(row: Any, paused: set[str]) -> dict[str, Any]:
    return {
        "id": row.id,
        "email": row.email,
        "sequence": row.sequence,
        "stage": row.stage,
        "state": row.state,
        "started_at": row.started_at.isoformat(),
        "steps_done": list(row.steps_done),
        "next_due_at": row.next_due_at.isoformat() if row.next_due_at else None,
        "waiting_until": row.waiting_until.isoformat() if row.waiting_until else None,
        "step_in_flight": (
            {"step_id": row.in_flight.step_id, "message_id": row.in_flight.message_id, "status": row.in_flight.status}
            if row.in_flight
            else None
        ),
        "exit_reason": row.exit_reason,
        "ended_at": row.ended_at.isoformat() if row.ended_at else None,
        "paused": row.sequence in paused,
    }


def _enrollment_table(rows: list[Any], paused: set[str]) -> Table:
    table = Table(show_edge=False)
    for column in ("id", "lead", "sequence", "state", "started", "steps taken", "next", "why"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            str(row.id),
            escape(row.email),
            row.sequence,
            row.state,
            _when(row.started_at),
            _steps_taken(row),
            _next_step(row, paused),
            escape(row.exit_reason or ""),
        )
    return table


@enrollments_app.command("list")
def enrollments_list(
    lead: Annotated[str | None, typer.Option(metavar="EMAIL", help="Only this lead's enrollments")] = None,
    sequence: Annotated[str | None, typer.Option(help="Only this sequence")] = None,
    state: Annotated[list[str] | None, typer.Option(help=ENROLLMENT_STATES_HELP)] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Enrollments (default: active), most recently started first: steps taken, next step, why ended."""
    from db.cycle import paused_sequences
    from db.engine import session_scope
    from db.enrollments import EnrollmentSelection, lead_exists, list_enrollments

    email = _address(lead, "--lead") if lead is not None else None
    selection = EnrollmentSelection(states=_enrollment_states(state), email=email, sequence=sequence)
    with session_scope(_engine()) as session:
        if email is not None and not lead_exists(session=session, email=email):
            raise NurtureError(f"no lead with the address {email}")
        rows = list_enrollments(session=session, selection=selection, limit=limit)
        paused = paused_sequences(session=session)
    if as_json:
        console.print_json(json.dumps([_enrollment_json(row, paused) for row in rows]))
    elif not rows:
        console.print("no enrollments match", highlight=False)
    else:
        console.print(_enrollment_table(rows, paused))


@enrollments_app.command("exit")
def enrollments_exit(
    reason: Annotated[str, typer.Option(help="Why: recorded as the exit reason, `operator: REASON`")],
    enrollment_id: Annotated[list[int] | None, typer.Option("--id", help="This enrollment (repeatable)")] = None,
    lead: Annotated[str | None, typer.Option(metavar="EMAIL", help="Every active enrollment of this lead")] = None,
    sequence: Annotated[str | None, typer.Option(help="With --lead: only this sequence")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
) -> None:
    """End active enrollments by hand: their queued messages are cancelled and nothing more is sent for them."""
    from db.engine import session_scope
    from db.enrollments import (
        EnrollmentSelection,
        existing_enrollment_ids,
        exit_enrollments,
        lead_exists,
        list_enrollments,
        queued_messages,
    )
    from nurture.sequences import EnrollmentState

    why = _reason(reason, required=True)
    assert why is not None
    if sequence is not None and lead is None:
        raise typer.BadParameter("--sequence narrows --lead; give --lead EMAIL too", param_hint="--sequence")
    if bool(enrollment_id) == (lead is not None):
        raise typer.BadParameter("say which enrollments: --id N (repeatable), or --lead EMAIL [--sequence S]")
    ids = tuple(sorted(set(enrollment_id or ())))
    email = _address(lead, "--lead") if lead is not None else None
    engine = _engine()
    with session_scope(engine) as session:
        if ids:
            unknown = sorted(set(ids) - existing_enrollment_ids(session=session, ids=ids))
            if unknown:
                raise NurtureError(f"no enrollment with the id {', '.join(map(str, unknown))}; nothing was changed")
            selection = EnrollmentSelection(states=(), ids=ids)
        else:
            assert email is not None
            if not lead_exists(session=session, email=email):
                raise NurtureError(f"no lead with the address {email}")
            selection = EnrollmentSelection(email=email, sequence=sequence)
        rows = list_enrollments(session=session, selection=selection)
        active = [row for row in rows if row.state == EnrollmentState.active]
        queued = queued_messages(session=session, enrollment_ids=[row.id for row in active])
    for row in rows:
        if row.state != EnrollmentState.active:
            console.print(f"enrollment {row.id} is {row.state} already: left alone", highlight=False)
    if not active:
        console.print("no active enrollment matches: nothing to exit", highlight=False)
        return
    console.print(
        f"{_plural(len(active), 'active enrollment')} to exit as `operator: {escape(why)}`; "
        f"{_plural(queued, 'queued message')} of theirs will be cancelled:",
        highlight=False,
    )
    shown = active[:MAX_PROBLEMS_SHOWN]
    console.print(_enrollment_table(shown, set()))
    if len(active) > len(shown):
        console.print(f"... and {len(active) - len(shown)} more", highlight=False)
    if not yes and not typer.confirm(f"Exit {_plural(len(active), 'enrollment')}?"):
        raise typer.Exit(1)
    with session_scope(engine) as session:
        result = exit_enrollments(session=session, ids=[row.id for row in active], reason=why, now=datetime.now(UTC))
    console.print(
        f"[green]ok[/] {_plural(len(result.exited), 'enrollment')} exited (operator: {escape(why)}); "
        f"{_plural(result.messages_cancelled, 'queued message')} cancelled",
        highlight=False,
    )
    if len(result.exited) < len(active):
        console.print(f"{len(active) - len(result.exited)} had ended meanwhile: left as they were", highlight=False)
    if result.with_dispatcher:
        console.print(
            f"[yellow]note:[/] {result.with_dispatcher} messages were already with a dispatcher (claimed or sending) "
            "and may still go out; nothing follows them"
        )


def _triggers(sequence: Any) -> str:
    return ", ".join(
        f"{'/'.join(s.value for s in t.from_) if t.from_ else 'any'} → {t.to.value}" for t in sequence.triggers
    )


def _unknown_sequence(name: str, known: list[str]) -> NurtureError:
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return NurtureError(
        f"no sequence {name!r} in {_settings().nurture_playbook}: {hint}the sequences are {', '.join(known)}"
    )


def _sequences_playbook() -> Playbook:
    """The playbook as sequences commands need it: read and valid, templates unchecked, so an operator can
    pause a sequence whose template broke."""
    from nurture.playbook import load_playbook

    return load_playbook(_settings().nurture_playbook)


@sequences_app.command("list")
def sequences_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """Each sequence: its trigger, steps, reentry rule, active enrollments, and whether it is paused."""
    from db.engine import session_scope
    from db.enrollments import SequenceLoad, list_pauses, sequence_loads

    playbook = _sequences_playbook()
    now = datetime.now(UTC)
    with session_scope(_engine()) as session:
        pauses = {p.sequence: p for p in list_pauses(session=session)}
        loads = sequence_loads(session=session, now=now)
    names = [*playbook.sequences, *sorted((set(pauses) | set(loads)) - set(playbook.sequences))]
    rows: list[dict[str, Any]] = []
    for name in names:
        sequence = playbook.sequences.get(name)
        load, pause = loads.get(name, SequenceLoad()), pauses.get(name)
        rows.append(
            {
                "name": name,
                "in_playbook": sequence is not None,
                "triggers": _triggers(sequence) if sequence else None,
                "steps": len(sequence.steps) if sequence else None,
                "reentry": sequence.reentry.describe() if sequence else None,
                "active_enrollments": load.active,
                "due_now": load.due,
                "queued_messages": load.queued_messages,
                "paused": pause is not None,
                "paused_at": pause.paused_at.isoformat() if pause else None,
                "pause_reason": pause.reason if pause else None,
            }
        )
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(show_edge=False)
    for column in ("sequence", "trigger", "steps", "reentry", "active", "paused"):
        table.add_column(column, overflow="fold")
    for row in rows:
        paused = ""
        if row["paused"]:
            pause = pauses[row["name"]]
            paused = f"since {_when(pause.paused_at)}" + (f": {pause.reason}" if pause.reason else "")
        table.add_row(
            row["name"],
            row["triggers"] or "(not in the playbook)",
            "" if row["steps"] is None else str(row["steps"]),
            row["reentry"] or "",
            str(row["active_enrollments"]),
            escape(paused),
        )
    console.print(table)


@sequences_app.command("pause")
def sequences_pause(
    name: Annotated[str, typer.Argument(help="The sequence, as named in the playbook")],
    reason: Annotated[str | None, typer.Option(help="Why, kept with the pause")] = None,
) -> None:
    """Stop a sequence: nothing new is decided or sent for it (queued messages wait) until resumed."""
    from db.engine import session_scope
    from db.enrollments import SequenceLoad, pause_sequence, sequence_loads

    why = _reason(reason, required=False)
    playbook = _sequences_playbook()
    if name not in playbook.sequences:
        raise _unknown_sequence(name, list(playbook.sequences))
    now = datetime.now(UTC)
    with session_scope(_engine()) as session:
        result = pause_sequence(session=session, name=name, reason=why, now=now)
        load = sequence_loads(session=session, now=now, names=[name]).get(name, SequenceLoad())
    pause = result.pause
    if not result.created:
        because = f" ({escape(pause.reason)})" if pause.reason else ""
        console.print(
            f"{name} was already paused, since {_when(pause.paused_at)} UTC{because}: nothing changed", highlight=False
        )
        return
    console.print(
        f"[green]ok[/] {name} paused: nothing new is decided or sent for it until `nurture sequences resume {name}`; "
        f"its {_plural(load.active, 'active enrollment')} and {_plural(load.queued_messages, 'queued message')} wait",
        highlight=False,
    )


@sequences_app.command("resume")
def sequences_resume(name: Annotated[str, typer.Argument(help="The paused sequence")]) -> None:
    """Let a paused sequence go on: each enrollment that came due meanwhile takes one step at the next cycle."""
    from db.engine import session_scope
    from db.enrollments import SequenceLoad, resume_sequence, sequence_loads

    playbook = _sequences_playbook()
    now = datetime.now(UTC)
    with session_scope(_engine()) as session:
        pause = resume_sequence(session=session, name=name)
        load = sequence_loads(session=session, now=now, names=[name]).get(name, SequenceLoad())
    if pause is None:
        if name not in playbook.sequences:
            raise _unknown_sequence(name, list(playbook.sequences))
        console.print(f"{name} is not paused: nothing changed", highlight=False)
        return
    console.print(
        f"[green]ok[/] {name} resumed (paused since {_when(pause.paused_at)} UTC). Enrollments due now: {load.due}; "
        "each takes one step at the next cycle, then the rest of its steps are spaced by their `after` again "
        f"(the catch-up rule). Queued messages: {load.queued_messages}, sent by the next dispatch",
        highlight=False,
    )
    if name not in playbook.sequences:
        console.print(
            f"[yellow]note:[/] {name} is not in the playbook: its {load.active} active enrollments end "
            "as their next step comes due",
            highlight=False,
        )


STAGES = ("cold", "warm", "hot", "customer")


def _first_step(row: Any, now: datetime, paused: set[str]) -> str:
    if row.sequence in paused:
        return f"paused: its first step waits for `nurture sequences resume {row.sequence}`"
    if row.next_due_at is None or row.next_due_at <= now:
        return "the next cycle sends its first step"
    return f"its first step is due {_when(row.next_due_at)} UTC"


@lead_app.command("set-stage")
def lead_set_stage(
    email: Annotated[str, typer.Argument(metavar="EMAIL", help="The lead's email address")],
    stage: Annotated[str, typer.Argument(metavar="STAGE", help="cold, warm, hot or customer")],
    reason: Annotated[str, typer.Option(help="Why: recorded with the transition as `manual: REASON`")],
) -> None:
    """Move a lead to a stage by hand: a manual transition that ends and starts sequences like any other.

    The stage holds until the lead's next event or profile change; then the thresholds apply again.
    """
    from db.cycle import lock_lead, paused_sequences
    from db.engine import session_scope
    from db.enrollments import EnrollmentSelection, list_enrollments
    from flows.advancing import set_stage
    from nurture.importing import canonical_address
    from nurture.playbook import Stage
    from nurture.sequences import EnrollmentState

    if stage.strip().lower() not in STAGES:
        raise typer.BadParameter(f"{stage!r} is not a stage; one of {', '.join(STAGES)}", param_hint="STAGE")
    target = Stage(stage.strip().lower())
    why = _reason(reason, required=False) or ""
    playbook = _checked_playbook()
    address = canonical_address(email)
    now = datetime.now(UTC)
    with session_scope(_engine()) as session:
        before = list_enrollments(session=session, selection=EnrollmentSelection(email=address))
        try:
            transition = set_stage(session=session, email=address, stage=target, reason=why, playbook=playbook, now=now)
        except NurtureError as exc:
            standing = lock_lead(session=session, email=address)
            if why and target != Stage.customer and standing is not None and standing.stage == Stage.customer:
                raise NurtureError(f"{address} is a customer, and customer is final: no move leaves it") from exc
            raise
        started = list_enrollments(
            session=session, selection=EnrollmentSelection(states=(), transition_id=transition.transition_id)
        )
        exited = (
            list_enrollments(
                session=session,
                selection=EnrollmentSelection(states=(EnrollmentState.exited,), ids=tuple(r.id for r in before)),
            )
            if before
            else []
        )
        paused = paused_sequences(session=session)
    parts = [f"{escape(address)}: {transition.from_stage.value} → {transition.to_stage.value} (manual: {escape(why)})"]
    if exited:
        parts.append(f"exited {', '.join(row.sequence for row in exited)}")
    for row in reversed(started):
        if row.state == EnrollmentState.active:
            parts.append(f"enrolled in {row.sequence}; {_first_step(row, now, paused)}")
        else:
            parts.append(f"not enrolled in {row.sequence}: {escape(row.exit_reason or row.state)}")
    if not started:
        parts.append(f"no sequence starts on {transition.from_stage.value} → {transition.to_stage.value}")
    console.print("; ".join(parts), highlight=False)


def _serve_duration(value: str, option: str) -> timedelta:
    from nurture.playbook import parse_duration

    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from exc
    if duration <= timedelta(0):
        raise typer.BadParameter(f"{value!r} is not longer than 0s", param_hint=option)
    return duration


@app.command()
def serve(
    timezone: Annotated[str, typer.Option(help="Time zone of the nightly rescore-all (03:00)")] = "UTC",
    cycle_every: Annotated[
        str, typer.Option(metavar="DURATION", help="How often nurture-cycle runs (e.g. 10m, 1h)")
    ] = "10m",
    dispatch_every: Annotated[
        str, typer.Option(metavar="DURATION", help="How often dispatch sends what became due (e.g. 1m, 30s)")
    ] = "1m",
    prefect_port: Annotated[
        int,
        typer.Option(min=0, max=65535, help="Port of the Prefect server started when PREFECT_API_URL is not set"),
    ] = 4200,
    schedule_grace: Annotated[
        str,
        typer.Option(metavar="DURATION", help="Stop with an error if Prefect has scheduled no run by then"),
    ] = "3m",
) -> None:
    """Run every flow on its schedule from this process: no work pool or worker to set up.

    Without PREFECT_API_URL it starts a Prefect server of its own on loopback (its UI
    shows the runs). It stops with an error if Prefect does not schedule the runs.
    """
    cycle = _serve_duration(cycle_every, "--cycle-every")
    dispatch = _serve_duration(dispatch_every, "--dispatch-every")
    grace = _serve_duration(schedule_grace, "--schedule-grace")
    _checked_playbook()
    _engine()
    _prefect_defaults()
    from flows.serving import check_stack

    check_stack()
    # serve's own loggers run outside flow runs: their lines belong on the terminal only.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    import asyncio
    from contextlib import ExitStack

    from prefect.exceptions import TerminationSignal
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.deployments import served_deployments
    from flows.prefect_server import own_prefect_server
    from flows.serving import serve_watched

    with ExitStack() as stack:
        api_url = get_current_settings().api.url
        if not api_url:
            log_path = Path(get_current_settings().home) / "nurture-serve-server.log"
            console.print(f"Starting a Prefect server on 127.0.0.1 (log {log_path}) …", highlight=False)
            api_url = stack.enter_context(own_prefect_server(port=prefect_port, log_path=log_path))
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        deployments = served_deployments(timezone=timezone, cycle_every=cycle, dispatch_every=dispatch)
        ui = api_url.removesuffix("/api")
        console.print(
            f"Serving {', '.join(d.name for d in deployments)}: nurture-cycle every {cycle_every}, "
            f"dispatch every {dispatch_every}, rescore-all at 03:00 {timezone}.\n"
            f"Runs: {ui}/runs   Stop with Ctrl+C.",
            highlight=False,
        )
        try:
            asyncio.run(serve_watched(deployments, grace=grace))
        except (KeyboardInterrupt, TerminationSignal):
            console.print("Stopped: the deployments are paused until the next `nurture serve`.")


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _check_secret_key(settings: Settings, host: str) -> None:
    """The public development key signs forgeable unsubscribe links: never on a reachable address."""
    from nurture.settings import DEFAULT_SECRET_KEY

    if settings.nurture_secret_key.get_secret_value() != DEFAULT_SECRET_KEY:
        return
    advice = (
        "NURTURE_SECRET_KEY is the public development key, so anyone can forge the unsubscribe links it signs. "
        "Set it to a long random value, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
    )
    if host not in LOOPBACK:
        raise ConfigurationError(f"{advice}, before serving on {host}.")
    errors.print(f"[yellow]warning:[/] {advice}. Fine for trying nurture on this machine only.", highlight=False)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on")] = 8000,
) -> None:
    """Serve the events API, SendGrid's Event Webhook and the unsubscribe pages."""
    import uvicorn

    from nurture.api import KEEP_ALIVE_SECONDS, create_app

    _engine()  # refuse an out-of-date schema before listening
    _check_secret_key(_settings(), host)
    uvicorn.run(
        create_app(_settings()),
        host=host,
        port=port,
        proxy_headers=True,
        log_level="info",
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


@app.command()
def forget(
    email: Annotated[str, typer.Argument(help="The address to erase")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
) -> None:
    """Erase a person (right to erasure): their lead, events, messages and history go; a hashed
    suppression stays so the address is never mailed again, even if it comes back in an import."""
    from db.engine import flush_erased_pages, session_scope
    from db.inbound import forget_lead
    from nurture.importing import normalise_email

    try:
        address = normalise_email(email)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not yes and not typer.confirm(f"Erase everything nurture holds about {address}?"):
        raise typer.Exit(1)
    engine = _engine()
    with session_scope(engine) as session:
        result = forget_lead(
            session=session, email=address, now=datetime.now(UTC), outbox=_settings().nurture_outbox_dir
        )
    flushed = flush_erased_pages(engine)
    what = "the lead and its history were erased" if result.lead_found else "no lead had this address"
    console.print(
        f"{address}: {what}; {result.emails_removed_from_outbox} emails removed from the outbox; "
        "a hashed suppression keeps it from being mailed again.",
        highlight=False,
    )
    if not flushed:
        errors.print(
            "[yellow]warning:[/] another process was reading the database, so SQLite's write-ahead log still "
            "holds erased pages; they go at its next checkpoint (run `nurture forget` again to force one)."
        )


@app.command()
def demo(
    leads: Annotated[int, typer.Option(min=1, max=100_000, help="How many leads to generate")] = 500,
    weeks: Annotated[int, typer.Option(min=1, max=26, help="Simulated weeks of behaviour")] = 6,
    tick_hours: Annotated[int, typer.Option(min=1, max=168, help="Simulated hours between cycles")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same demo")] = 7,
    reset: Annotated[bool, typer.Option(help="Delete what a previous run left in the database and outbox")] = True,
) -> None:
    """Generate a realistic population and run the nurture cycle through simulated weeks."""
    _checked_playbook()
    _quiet_prefect_console()
    from flows.demo import run_demo
    from flows.prefect_server import temporary_prefect_api

    settings = _settings()
    with temporary_prefect_api():
        result = run_demo(
            settings=settings,
            leads=leads,
            weeks=weeks,
            tick=timedelta(hours=tick_hours),
            seed=seed,
            reset=reset,
            console=console,
        )
    _print_funnel(result.totals)
    if result.sent_twice:
        console.print(
            "Leads sent the same email twice (their sequence lets them back in): "
            + ", ".join(f"{sequence} {n}" for sequence, n in sorted(result.sent_twice.items())),
            highlight=False,
        )
    else:
        console.print("No lead was sent the same email twice.", highlight=False)
    _print_reactions(result.reactions)
    reacting = (
        f"  • a sequence that reacted: nurture explain {result.reacting_email}\n" if result.reacting_email else ""
    )
    console.print(
        f"\nDone in {result.seconds:.0f} s. Where to look next:\n"
        f"  • the emails:       {settings.nurture_outbox_dir.resolve()}/  (open any .eml in a mail client)\n"
        f"  • the numbers:      nurture status\n"
        f"  • what worked:      nurture report --since {weeks}w\n"
        f"  • one lead's story: nurture explain {result.example_email or 'EMAIL'}\n" + reacting,
        highlight=False,
    )


def _print_reactions(reactions: dict[str, Any]) -> None:
    """How the sequences reacted to what the demo's leads did with their emails."""
    branches = reactions["branches"]
    variants = ", ".join(f"{arm} {n}" for arm, n in sorted(reactions["variants"].items())) or "none"
    console.print(
        f"The leads opened {reactions['opens']} emails and clicked {reactions['clicks']} "
        f"({reactions['machine_opens']} more opens were Apple Mail's machine opens, not counted as opens).\n"
        f"Sequences reacted: {reactions['converted']} enrollments converted (goal reached), "
        f"{reactions['steps_skipped']} steps skipped by their conditions, "
        f"wait-for branches {branches.get('then', 0)} then / {branches.get('else', 0)} else; "
        f"split-test emails by variant: {variants}.",
        highlight=False,
    )


@app.command()
def preview(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", help="A template (welcome) or a step: SEQUENCE/STEP or SEQUENCE/STEP/VARIANT"),
    ],
    lead: Annotated[
        str | None, typer.Option("--lead", metavar="EMAIL", help="Render for this lead of the database (read only)")
    ] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Render for the sample lead (the default)")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the files (default: ./preview/NAME/)")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the HTML in a web browser")] = False,
    send_test: Annotated[
        str | None,
        typer.Option("--send-test", metavar="ADDRESS", help="Also send it to ADDRESS, marked [TEST]; no lead's email"),
    ] = None,
) -> None:
    """Render an email for a real or the sample lead as files (subject, HTML, text, .eml); send a test."""
    import webbrowser

    from flows.previewing import run_preview
    from nurture.importing import normalise_email

    if lead is not None and sample:
        raise typer.BadParameter("give --lead EMAIL or --sample, not both", param_hint="--lead")
    addresses: dict[str, str | None] = {"--lead": lead, "--send-test": send_test}
    for option, given in list(addresses.items()):
        try:
            addresses[option] = normalise_email(given) if given is not None else None
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=option) from exc
    settings = _settings()
    test_to = addresses["--send-test"]
    results = run_preview(
        settings, name, lead_email=addresses["--lead"], out=out, test_to=test_to, now=datetime.now(UTC)
    )
    for result in results:
        shown, files = result.preview, result.files
        console.print(f"[bold]{escape(shown.target.name)}[/] for {escape(shown.rendered_for)}", highlight=False)
        if shown.suppressed:
            why = escape(shown.suppressed)
            console.print(f"  [yellow]note:[/] this address is suppressed ({why}): nurture sends it nothing")
        source = f"  (the subject of {shown.target.subject_from})" if shown.target.subject_from else ""
        console.print(f"  subject: {escape(shown.email.subject)}{escape(source)}", highlight=False)
        if shown.email.preheader:
            console.print(f"  preheader: {escape(shown.email.preheader)}", highlight=False)
        console.print(f"  folder:  {escape(str(files.directory))}/", highlight=False)
        console.print(f"  files:   {files.html.name}  {files.text.name}  {files.eml.name}  {files.subject.name}")
        if open_browser and not webbrowser.open(files.html.resolve().as_uri()):
            console.print(f"  no web browser found: open {files.html} yourself")
        if result.test_sent is not None:
            sent = f"{test_to}: {result.test_sent}"
            console.print(f"  [green]test sent[/] to {escape(sent)}", highlight=False)


@app.command()
def diagram(
    out: Annotated[Path, typer.Option("--out", help="Folder for playbook.svg, playbook.png and playbook.dot")] = Path(),
    formats: Annotated[
        str | None, typer.Option("--format", metavar="LIST", help="Comma-separated: svg, png, dot (default: all)")
    ] = None,
) -> None:
    """Draw the lifecycle and the sequences each stage change starts, from the playbook (Graphviz)."""
    from nurture.diagram import FORMATS, write_diagram
    from nurture.playbook import load_playbook

    wanted = [f.strip().lower() for f in (formats or ",".join(FORMATS)).split(",") if f.strip()]
    if not wanted or any(f not in FORMATS for f in wanted):
        raise typer.BadParameter(f"{formats!r}: a list of {', '.join(FORMATS)}", param_hint="--format")
    result = write_diagram(load_playbook(_settings().nurture_playbook), out, wanted, required=formats is not None)
    if result.missing_graphviz:
        errors.print(f"[yellow]warning:[/] {escape(result.missing_graphviz)}", highlight=False)
    for path in result.written:
        console.print(f"[green]wrote[/] {escape(str(path))}", highlight=False)


@app.command()
def simulate(
    playbook: Annotated[
        Path | None, typer.Option(metavar="NEW.yaml", help="The changed playbook (default: the current one)")
    ] = None,
    templates: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Its templates (default: NURTURE_TEMPLATES)")
    ] = None,
    against: Annotated[
        Path | None,
        typer.Option(
            "--current", metavar="LIVE.yaml", help="The playbook live now, to compare with (default: NURTURE_PLAYBOOK)"
        ),
    ] = None,
    since: Annotated[
        str, typer.Option(metavar="DURATION", help="Count emails and stage changes this far back")
    ] = "30d",
    top: Annotated[int, typer.Option(min=0, help="Show this many of the leads most affected")] = 10,
    now: Annotated[str | None, typer.Option(help="Simulate up to this ISO 8601 time (default: now)")] = None,
    whole_history: Annotated[
        bool, typer.Option("--whole-history", help="The new playbook from each lead's first event, not from --since")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Replay the stored events under a changed playbook next to the current one; writes nothing."""
    from flows.simulation import simulate as run_simulation
    from nurture.impact_text import report
    from nurture.playbook import load_playbook, parse_duration
    from nurture.rendering import EmailRenderer

    settings = _settings()
    try:
        window = parse_duration(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from exc
    current_path = against or settings.nurture_playbook
    current = load_playbook(current_path, templates_dir=settings.nurture_templates)
    new_path, new_templates = playbook or settings.nurture_playbook, templates or settings.nurture_templates
    new = load_playbook(new_path, templates_dir=new_templates)
    problems = EmailRenderer(new_templates).check(new)
    if problems:
        raise PlaybookError(problems)
    at = _parse_now(now)
    from db.engine import ensure_current_schema
    from db.simulation import read_only_engine

    engine = read_only_engine(settings.database_url)
    ensure_current_schema(engine)
    shown = Progress(
        TextColumn("simulating: {task.completed} leads"), console=errors, transient=True, disable=not errors.is_terminal
    )
    with shown as progress:
        bar = progress.add_task("simulating", total=None)
        impact = run_simulation(
            engine=engine,
            current=current,
            new=new,
            since=at - window,
            now=at,
            top=top,
            whole_history=whole_history,
            progress=lambda leads: progress.advance(bar, leads),
        )
    if as_json:
        print(json.dumps(impact.to_json(), indent=2))
        return
    for part in report(impact, current_path=str(current_path), new_path=str(new_path)):
        console.print(part, highlight=False)


@app.command()
def report(
    since: Annotated[str, typer.Option(metavar="DURATION", help="Emails sent this far back")] = "30d",
    sequence: Annotated[str | None, typer.Option(metavar="NAME", help="Only this sequence")] = None,
    conversion_window: Annotated[
        str, typer.Option(metavar="DURATION", help="A conversion counts for an email sent this long before it")
    ] = "14d",
    metric: Annotated[
        str | None,
        typer.Option(
            metavar="METRIC",
            help="Judge every split test on opened, clicked or converted (default: each step's judged_on)",
        ),
    ] = None,
    now: Annotated[str | None, typer.Option(help="Report up to this ISO 8601 time (default: now)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="One row per step and variant, for a spreadsheet")] = False,
    chart: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Also draw the funnel over time and conversion per sequence (SVG and PNG)"),
    ] = None,
) -> None:
    """What each sequence's emails achieved, per step and variant, and the verdict of each split test."""
    from db.analytics import Period, chart_data, sequence_report
    from db.engine import session_scope
    from nurture.diagnostics import closest, did_you_mean
    from nurture.playbook import load_playbook, parse_duration
    from nurture.report_text import render, report_csv
    from nurture.reporting import METRICS, report_json

    windows = {}
    for name, value in (("--since", since), ("--conversion-window", conversion_window)):
        try:
            windows[name] = parse_duration(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=name) from exc
    if metric is not None and metric not in METRICS:
        suggestion = did_you_mean(closest(metric, METRICS))
        raise typer.BadParameter(f"one of {', '.join(METRICS)}{suggestion}", param_hint="--metric")
    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv")
    settings = _settings()
    try:
        playbook: Playbook | None = load_playbook(settings.nurture_playbook, templates_dir=settings.nurture_templates)
    except PlaybookError:
        playbook = None
        errors.print(
            f"[yellow]warning:[/] {escape(str(settings.nurture_playbook))} has problems (see `nurture validate`): "
            "goals are not known, so every sequence converts on a move up to hot or customer",
            highlight=False,
        )
    if sequence is not None and playbook is not None and sequence not in playbook.sequences:
        errors.print(
            f"[yellow]warning:[/] the playbook has no sequence {escape(sequence)!r}"
            f"{escape(did_you_mean(closest(sequence, playbook.sequences)))}; showing what was sent under that name",
            highlight=False,
        )
    until = _parse_now(now)
    period = Period(until - windows["--since"], until)
    with session_scope(_engine(), commit=False) as session:
        result = sequence_report(
            session=session,
            playbook=playbook,
            period=period,
            conversion_window=windows["--conversion-window"],
            sequence=sequence,
            metric=metric,
        )
        drawn = chart_data(session=session, playbook=playbook, period=period, window=windows["--conversion-window"])
    if chart is not None:
        _write_charts(
            chart, drawn, period=windows["--since"], window=windows["--conversion-window"], quiet=as_json or as_csv
        )
    if as_json:
        print(json.dumps(report_json(result), indent=2))
    elif as_csv:
        sys.stdout.write(report_csv(result))
    else:
        for part in render(result):
            console.print(part, highlight=False)


def _write_charts(directory: Path, drawn: Any, *, period: timedelta, window: timedelta, quiet: bool) -> None:
    """funnel.svg/.png and conversion.svg/.png in ``directory`` (created if need be)."""
    from nurture.charts import ConversionBar, report_charts
    from nurture.reporting import describe_duration

    days, stages, conversions = drawn
    bars = [ConversionBar(c.sequence, c.enrolled, c.converted) for c in conversions]
    funnel, conversion = report_charts(
        days, stages, bars, period=f"the last {describe_duration(period)}", window=describe_duration(window)
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, picture in (("funnel", funnel), ("conversion", conversion)):
            (directory / f"{name}.svg").write_text(picture.svg(), encoding="utf-8")
            (directory / f"{name}.png").write_bytes(picture.png())
            written += [directory / f"{name}.svg", directory / f"{name}.png"]
    except OSError as exc:
        raise ConfigurationError(f"cannot write the charts to {directory}: {exc.strerror or exc}") from exc
    for path in written:
        (errors if quiet else console).print(f"[green]wrote[/] {escape(str(path))}", highlight=False)


def main() -> None:
    """Entry point: runs the app and turns nurture's errors into messages."""
    try:
        app()
    except NurtureError as exc:
        errors.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
