"""How `nurture serve` runs the schedules, and how it notices when Prefect does not.

Prefect creates scheduled runs in its server's scheduler service, not in the
process that serves the flows. Two ways that has failed silently:

- Prefect's temporary server (the one a process starts when `PREFECT_API_URL` is
  not set) runs without the scheduler: the deployments register, and no
  scheduled run is ever created. So without `PREFECT_API_URL`, `nurture serve`
  starts a real `prefect server start` of its own, on loopback, and uses it
  (flows/prefect_server.py).
- A broken stack (SQLAlchemy 2.1 with Prefect 3.8) makes the scheduler fail on
  every loop, in the server's log only. So `nurture serve` refuses that stack,
  and a watch polls the API: a scheduled deployment with no upcoming scheduled
  run after a grace period stops `nurture serve` with an error that says why.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from uuid import UUID

import httpx

from nurture.errors import ConfigurationError, NurtureError

log = logging.getLogger(__name__)


class SchedulingError(NurtureError):
    """Prefect is not creating the scheduled runs of the served deployments."""


def _release(package: str) -> tuple[int, ...]:
    try:
        text = version(package)
    except PackageNotFoundError:
        return ()
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def stack_problem(prefect: tuple[int, ...], sqlalchemy: tuple[int, ...]) -> str | None:
    """Why these versions cannot schedule runs, or None (Prefect 3.8's scheduler fails under SQLAlchemy 2.1)."""
    if prefect[:2] == (3, 8) and sqlalchemy[:2] >= (2, 1):
        found = ".".join(map(str, sqlalchemy))
        return (
            f"SQLAlchemy {found} is installed, and Prefect 3.8's scheduler fails under SQLAlchemy 2.1 or newer: "
            "no scheduled run would ever start. Install the locked versions (`make setup`, or `uv sync --locked`)."
        )
    return None


def check_stack() -> None:
    """Refuse an installation whose Prefect scheduler is known not to work."""
    problem = stack_problem(_release("prefect"), _release("sqlalchemy"))
    if problem:
        raise ConfigurationError(problem)


# --- The watch ---------------------------------------------------------------


@dataclass(frozen=True)
class WatchedDeployment:
    name: str
    id: UUID


def unscheduled(
    deployments: list[WatchedDeployment],
    upcoming: Mapping[UUID, int],
    *,
    served_at: datetime,
    now: datetime,
    grace: timedelta,
) -> list[str]:
    """The scheduled deployments with no upcoming scheduled run, once the grace period after serving is over."""
    if now - served_at < grace:
        return []
    return [d.name for d in deployments if upcoming.get(d.id, 0) == 0]


def scheduling_error(names: list[str], *, grace: timedelta, api_url: str) -> SchedulingError:
    minutes = grace.total_seconds() / 60
    return SchedulingError(
        f"Prefect has not scheduled any run of {', '.join(names)} within {minutes:g} min of serving "
        f"(API {api_url}). Its scheduler service is not running or is failing: look for errors in the "
        "Prefect server's log, check that the server was not started with "
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED=false, and that its versions are the locked ones."
    )


async def _upcoming_runs(client: Any, deployments: list[WatchedDeployment], now: datetime) -> dict[UUID, int]:
    """How many scheduled, not yet due runs Prefect holds for each deployment."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    counts: dict[UUID, int] = {}
    for deployment in deployments:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                expected_start_time=FlowRunFilterExpectedStartTime(after_=now),
            ),
            limit=1,
        )
        counts[deployment.id] = len(runs)
    return counts


async def watch_schedules(
    deployments: list[WatchedDeployment], *, grace: timedelta, poll_seconds: float
) -> SchedulingError:
    """Poll the Prefect API until a scheduled deployment has had no upcoming run for `grace`; return that error."""
    from prefect.client.orchestration import get_client

    served_at = datetime.now(UTC)
    unreachable_since: datetime | None = None
    async with get_client() as client:
        api_url = str(client.api_url)
        while True:
            await asyncio.sleep(poll_seconds)
            now = datetime.now(UTC)
            try:
                upcoming = await _upcoming_runs(client, deployments, now)
            except (httpx.HTTPError, OSError) as exc:
                unreachable_since = unreachable_since or now
                log.warning("Cannot read the scheduled runs from the Prefect API at %s: %s", api_url, exc)
                if now - unreachable_since >= grace:
                    return SchedulingError(
                        f"The Prefect API at {api_url} has not answered for {grace.total_seconds() / 60:g} min: "
                        "no scheduled run can start."
                    )
                continue
            unreachable_since = None
            missing = unscheduled(deployments, upcoming, served_at=served_at, now=now, grace=grace)
            if missing:
                return scheduling_error(missing, grace=grace, api_url=api_url)


def _runner(on_sigterm: Callable[[], None]) -> Any:
    """Prefect's Runner, with SIGTERM handled by `on_sigterm` (its own handler leaves a coroutine un-awaited)."""
    from prefect.runner import Runner

    class ServeRunner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            on_sigterm()

    return ServeRunner(pause_on_shutdown=True)


async def serve_watched(deployments: list[Any], *, grace: timedelta, poll_seconds: float = 10.0) -> None:
    """Serve the deployments like `prefect.serve`, and stop with a SchedulingError if Prefect schedules nothing.

    SIGTERM (systemd, docker stop) stops it cleanly at any moment, even while the
    deployments are still being registered.
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_sigterm() -> None:
        log.warning("SIGTERM received: stopping; runs in progress are cancelled, the deployments paused")
        loop.call_soon_threadsafe(stop_requested.set)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: on_sigterm())
    runner = _runner(on_sigterm)
    watched = []
    for deployment in deployments:
        deployment_id = await runner.aadd_deployment(deployment)
        if deployment.schedules:
            watched.append(WatchedDeployment(name=deployment.name, id=deployment_id))
        if stop_requested.is_set():
            return
    failure: SchedulingError | None = None

    async def stop_when_asked() -> None:
        await stop_requested.wait()
        while not runner.started:  # astop refuses a runner that has not started yet
            await asyncio.sleep(0.1)
        await runner.astop()

    async def watch() -> None:
        nonlocal failure
        failure = await watch_schedules(watched, grace=grace, poll_seconds=poll_seconds)
        stop_requested.set()

    helpers = [asyncio.create_task(stop_when_asked()), asyncio.create_task(watch())]
    try:
        await runner.start()
    finally:
        for task in helpers:
            task.cancel()
    if failure is not None:
        raise failure
