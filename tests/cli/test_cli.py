"""The `nurture` command as a user runs it: real processes, real files, no tracebacks."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from email import policy
from email.parser import BytesParser
from importlib import metadata
from pathlib import Path

import pytest

from tests.cli.runner import run_nurture
from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR

pytestmark = pytest.mark.usefixtures("nurture_env")


def nurture(*args: str, env: dict[str, str] | None = None, expect: int = 0) -> subprocess.CompletedProcess[str]:
    return run_nurture(*args, env=env, expect=expect)


def test_version_is_the_installed_package_s() -> None:
    assert nurture("--version").stdout.strip() == f"nurture {metadata.version('nurture')}"


def test_validate_accepts_the_shipped_playbook() -> None:
    assert "ok" in nurture("validate").stdout


def test_a_broken_playbook_is_reported_with_file_line_and_key(tmp_path: Path) -> None:
    broken = tmp_path / "nurture.yaml"
    text = PLAYBOOK_PATH.read_text().replace("half_life: 14d", "half_life: fortnight")
    broken.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "fortnight" in row)
    for command in (["validate"], ["run", "cycle"], ["demo"]):
        result = nurture(*command, env={"NURTURE_PLAYBOOK": str(broken)}, expect=1)
        assert f"{broken}:{line}: scoring.half_life: 'fortnight' is not a duration" in result.stderr


def test_commands_refuse_a_database_without_tables() -> None:
    result = nurture("status", expect=1)
    assert "run `nurture db upgrade`" in result.stderr


def test_malformed_csv_rows_are_reported_and_good_rows_kept(tmp_path: Path) -> None:
    nurture("db", "upgrade")
    leads = tmp_path / "leads.csv"
    leads.write_text(
        "email,first_name,company_size,timezone\n"
        "ann@northwind.example,Ann,200,Europe/Berlin\n"
        "bob@,Bob,10,UTC\n"
        "cara@delta.example,Cara,10,Mars/Base\n"
        "dan@echo.example,Dan,10\n"
        "eve@fox.example,Eve,,\n"
    )
    result = nurture("import", "leads", str(leads))
    assert f"{leads}:3: 'bob@' is not an email address" in result.stderr
    assert f"{leads}:4: timezone 'Mars/Base' is not an IANA time zone" in result.stderr
    assert f"{leads}:5: has 3 fields, the header has 4" in result.stderr
    assert "5 rows read, 2 leads created, 0 updated, 3 bad rows skipped" in result.stdout
    status = json.loads(nurture("status", "--json").stdout)
    assert status["leads_by_stage"]["cold"] == 2
    missing = nurture("import", "leads", str(tmp_path / "nope.csv"), expect=1)
    assert "cannot open" in missing.stderr


def test_escaped_name_in_the_onboarding_email_and_json_reports(
    prefect_api: str, tmp_path: Path, nurture_env: dict[str, str]
) -> None:
    env = {"PREFECT_API_URL": prefect_api}
    nurture("db", "upgrade")
    leads = tmp_path / "leads.csv"
    leads.write_text("email,first_name,company\nxss@evil.example,<script>alert(1)</script>,Evil Corp\n")
    nurture("import", "leads", str(leads))
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"email": "xss@evil.example", "kind": "pricing_view", "occurred_at": "2026-03-02T09:00:00Z"}\n'
        '{"email": "xss@evil.example", "kind": "purchase", "occurred_at": "2026-03-02T10:00:00Z", '
        '"properties": {"plan": "team"}, "external_id": "order-1"}\n'
    )
    assert "2 events stored" in nurture("import", "events", str(events)).stdout
    nurture("run", "cycle", "--now", "2026-03-02T10:30:00Z", env=env)

    outbox = Path(nurture_env["NURTURE_OUTBOX_DIR"])
    (eml,) = [p for p in outbox.glob("*.eml") if "onboarding" in p.name]
    message = BytesParser(policy=policy.default).parse(eml.open("rb"))
    html = message.get_body(("html",)).get_content()
    text = message.get_body(("plain",)).get_content()
    assert "Welcome, &lt;script&gt;alert(1)&lt;/script&gt;!" in html
    assert "<script>" not in html
    assert "Welcome, <script>alert(1)</script>!" in text
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    status = json.loads(nurture("status", "--json").stdout)
    assert status["leads_by_stage"] == {"cold": 0, "warm": 0, "hot": 0, "customer": 1}
    assert (status["messages_by_status"]["sent"], status["messages_by_status"]["queued"]) == (1, 0)
    assert status["transitions"] == 1
    report = json.loads(nurture("explain", "XSS@evil.example", "--json").stdout)
    assert report["lead"]["stage"] == "customer"
    assert report["lead"]["score"] > 50
    assert set(report["score_breakdown"]) >= {"fit", "engagement_by_kind"}
    assert [e["kind"] for e in report["events"]] == ["pricing_view", "purchase"]
    assert [(t["from"], t["to"], t["reason"]) for t in report["transitions"]] == [
        ("cold", "customer", "purchase event")
    ]
    assert [e["sequence"] for e in report["enrollments"]] == ["onboarding"]
    assert [(m["step_id"], m["status"]) for m in report["messages"]] == [("onboarding_welcome", "sent")]
    # The next step is not queued ahead: the enrollment knows it and when it is due (3 days after the send).
    [onboarding] = report["enrollments"]
    assert (onboarding["next_step"], onboarding["next_due_at"][:16]) == ("onboarding_tips", "2026-03-05T10:30")
    human = nurture("explain", "xss@evil.example").stdout
    assert "<script>alert(1)</script>" in human
    assert "purchase event" in human
    assert "no lead" in nurture("explain", "nobody@evil.example", expect=1).stderr


def test_demo_reaches_every_stage_and_sends_multi_step_sequences(prefect_api: str, nurture_env: dict[str, str]) -> None:
    env = {"PREFECT_API_URL": prefect_api}
    result = nurture("demo", "--leads", "150", "--weeks", "4", "--tick-hours", "24", env=env)
    assert "Funnel" in result.stdout
    # Every shipped sequence has a reentry rule that keeps a returning lead from the same email.
    assert "No lead was sent the same email twice." in result.stdout
    status = json.loads(nurture("status", "--json").stdout)
    assert all(n > 0 for n in status["leads_by_stage"].values()), status
    assert status["messages_by_status"]["sent"] > 0
    outbox = Path(nurture_env["NURTURE_OUTBOX_DIR"])
    files = sorted(outbox.glob("*.eml"))
    assert len(files) == status["messages_by_status"]["sent"]
    steps_by_enrollment: dict[str, set[str]] = {}
    for path in files:
        enrollment, _, step = path.stem.split("_", 1)[1].rpartition("_step_")
        steps_by_enrollment.setdefault(enrollment, set()).add(step)
    assert max(len(steps) for steps in steps_by_enrollment.values()) >= 2
    message = BytesParser(policy=policy.default).parse(files[0].open("rb"))
    assert message.get_body(("html",)) is not None
    assert message.get_body(("plain",)) is not None
    assert message["List-Unsubscribe"]
    # The leads opened and clicked their emails through the webhook's path, and the sequences reacted.
    reacted = re.search(
        r"opened (\d+) emails and clicked (\d+) \((\d+) more opens were Apple.*?"
        r"(\d+) enrollments converted.*?(\d+) steps skipped.*?branches (\d+) then / (\d+) else.*?"
        r"welcome/welcome/a (\d+), welcome/welcome/b (\d+)",
        " ".join(result.stdout.split()),
    )
    assert reacted, result.stdout
    opens, clicks, machine, converted, _skipped, then, else_, a, b = map(int, reacted.groups())
    assert min(opens, clicks, machine, converted, then, else_, a, b) > 0, reacted.groups()
    example = re.search(r"a sequence that reacted: nurture explain\s+(\S+)", result.stdout)
    assert example, result.stdout
    story = json.loads(nurture("explain", example.group(1), "--json").stdout)
    assert any(e["branches"] or e["state"] == "converted" for e in story["enrollments"]), story["enrollments"]
    assert any(m["opened_at"] or m["clicked_at"] for m in story["messages"]), story["messages"]
    database = nurture_env["NURTURE_DATABASE_URL"].removeprefix("sqlite:///")
    with closing(sqlite3.connect(database)) as db:
        kinds = dict(db.execute("SELECT kind, count(*) FROM event WHERE source = 'sendgrid' GROUP BY kind").fetchall())
        arms = dict(db.execute("SELECT variant, count(*) FROM message WHERE step_id = 'welcome' GROUP BY variant"))
    # Stored as SendGrid reported them: a person's opens and clicks, and Apple's machine opens apart.
    assert (kinds["email_open"], kinds["email_click"], kinds["email_machine_open"]) == (opens, clicks, machine)
    assert set(arms) == {"a", "b"}
    # The report the demo points to: per-step opens, clicks, conversions and the split test's verdict.
    hint = re.search(r"what worked:\s+nurture (report --since \S+)", result.stdout)
    assert hint, result.stdout
    report = json.loads(nurture(*hint.group(1).split(), "--json").stdout)
    welcome = next(s for s in report["sequences"] if s["sequence"] == "welcome")
    split = welcome["steps"][0]
    assert [v["variant"] for v in split["variants"]] == ["a", "b"]
    assert split["verdict"]["metric"] == "opened"
    assert split["verdict"]["call"] in {"winner", "no clear difference", "too small to call"}
    steps = [step for sequence in report["sequences"] for step in sequence["steps"]]
    assert sum(step["sent"] for step in steps) == status["messages_by_status"]["sent"]
    assert sum(step["opened"] for step in steps) == opens_of_distinct_emails(database)
    assert min(sum(step[k] for step in steps) for k in ("opened", "clicked", "converted", "machine_opened")) > 0
    charts = outbox.parent / "charts"
    table = nurture(*hint.group(1).split(), "--chart", str(charts)).stdout
    assert "Split tests" in table
    assert "welcome/welcome:" in table
    # The pictures for a deck, as files.
    assert sorted(p.name for p in charts.iterdir()) == ["conversion.png", "conversion.svg", "funnel.png", "funnel.svg"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in charts.glob("*.png"))
    assert "welcome" in (charts / "conversion.svg").read_text()
    rerun = nurture("demo", "--leads", "20", "--weeks", "1", "--tick-hours", "48", env=env)
    assert "Starting clean: removed 150 leads" in rerun.stdout


def test_failed_messages_are_listed_and_sent_again_after_the_template_is_fixed(
    tmp_path: Path, prefect_api: str
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    good = (templates / "welcome.html").read_text()
    (templates / "welcome.html").write_text('{% extends "_layout.html" %}{% block body %}{{ lead.nick }}{% endblock %}')
    env = {"NURTURE_TEMPLATES": str(templates), "PREFECT_API_URL": prefect_api}
    nurture("db", "upgrade")
    leads, events = tmp_path / "leads.csv", tmp_path / "events.csv"
    leads.write_text("email,job_title,company_size\nann@northwind.example,Head of Data,200\n")
    events.write_text(
        "email,kind,occurred_at\nann@northwind.example,form_submit,2026-03-02T09:00:00Z\n"
        "ann@northwind.example,pricing_view,2026-03-02T09:05:00Z\n"
    )
    nurture("import", "leads", str(leads))
    nurture("import", "events", str(events))
    # `validate` would refuse this template: the cycle is run as a scheduler would, unchecked.
    env["NURTURE_PLAYBOOK"] = os.environ["NURTURE_PLAYBOOK"]
    cycle = nurture("run", "cycle", "--now", "2026-03-02T10:00:00Z", env=env, expect=1)
    assert "welcome.html" in cycle.stderr  # the check before a run names the broken template
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from flows.cycle import nurture_cycle, run_and_report; from datetime import datetime, UTC;"
            "s, ok = run_and_report(nurture_cycle, now=datetime(2026, 3, 2, 10, tzinfo=UTC)); print(ok)",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.stdout.strip().endswith("False"), run.stdout + run.stderr

    listed = nurture("messages", "list", "--json", env=env)
    (failed,) = json.loads(listed.stdout)
    assert failed["status"] == "failed"
    assert failed["template"] == "welcome"
    assert "nick" in failed["last_error"]

    declined = subprocess.run(
        [sys.executable, "-m", "nurture.cli", "messages", "retry", "--template", "welcome"],
        input="n\n",
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
        check=False,
    )
    assert declined.returncode == 1
    assert "1 messages to queue again (1 failed); templates: welcome 1" in declined.stdout
    (templates / "welcome.html").write_text(good)
    assert "1 messages queued again" in nurture("messages", "retry", "--template", "welcome", "--yes", env=env).stdout
    nurture("run", "dispatch", "--now", "2026-03-02T10:05:00Z", env=env)
    status = json.loads(nurture("status", "--json", env=env).stdout)
    assert status["messages_by_status"]["sent"] == 1
    assert status["messages_by_status"]["failed"] == 0
    assert json.loads(nurture("messages", "list", "--json", env=env).stdout) == []


def test_a_run_as_of_a_future_time_is_refused_unless_asked_for() -> None:
    nurture("db", "upgrade")
    for command in ("cycle", "dispatch"):
        refused = nurture("run", command, "--now", "2099-01-01T00:00:00Z", expect=2)
        assert "is in the future: the run would send today every email due by then" in refused.stderr
        assert "--allow-future" in refused.stderr
    far = nurture("run", "cycle", "--now", "9999-12-31T23:00:00-05:00", expect=2)
    assert "out of range" in far.stderr


def test_the_api_refuses_the_development_secret_key_on_a_reachable_address() -> None:
    nurture("db", "upgrade")
    result = nurture("api", "--host", "0.0.0.0", "--port", "8999", expect=1)
    assert "NURTURE_SECRET_KEY is the public development key" in result.stderr
    assert "before serving on 0.0.0.0" in result.stderr


def _child_with(parent: int, marker: str) -> int | None:
    """The pid of a child process of ``parent`` whose command line contains ``marker``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and marker in cmdline:
            return int(stat.parent.name)
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_run_takes_its_temporary_prefect_server_with_it(tmp_path: Path) -> None:
    nurture("db", "upgrade")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen(
        [sys.executable, "-m", "nurture.cli", "run", "cycle"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        server = None
        deadline = time.monotonic() + 180
        while server is None and run.poll() is None and time.monotonic() < deadline:
            server = _child_with(run.pid, "prefect.server.api.server:create_app")
            time.sleep(0.1)
        assert server is not None, "the run started no temporary Prefect server"
    finally:
        run.kill()
        run.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(server), "the temporary Prefect server outlived the killed run"


def test_forget_leaves_no_trace_of_the_person_in_the_database_files(tmp_path: Path) -> None:
    nurture("db", "upgrade")
    leads = tmp_path / "leads.csv"
    leads.write_text(
        "email,first_name,company\nzebulon.quux@erase.example,Zebulon,Quuxworth Ltd\nkeep@other.example,Kim,Other\n"
    )
    events = tmp_path / "events.csv"
    events.write_text(
        "email,kind,occurred_at,properties\n"
        'zebulon.quux@erase.example,page_view,2026-01-05T10:00:00Z,"{""ip"": ""203.0.113.77""}"\n'
    )
    database = Path(os.environ["NURTURE_DATABASE_URL"].removeprefix("sqlite:///"))
    # Another process has the database open, as `nurture api` or `serve` would: the log is not removed at exit.
    with closing(sqlite3.connect(database)) as other:
        other.execute("PRAGMA journal_mode").fetchone()
        nurture("import", "leads", str(leads))
        nurture("import", "events", str(events))
        nurture("forget", "Zebulon.Quux@erase.example", "--yes")
        files = [f for f in database.parent.glob(f"{database.name}*") if f.is_file()]
        assert {f.name for f in files} >= {database.name, f"{database.name}-wal"}
        for trace in (b"zebulon.quux@erase.example", b"Zebulon", b"Quuxworth", b"203.0.113.77"):
            assert [f.name for f in files if trace in f.read_bytes()] == [], trace
        assert any(b"keep@other.example" in f.read_bytes() for f in files)  # the search would have found it


def test_a_scoring_change_is_noticed_and_rescore_all_applies_it(tmp_path: Path, prefect_api: str) -> None:
    """Lowering the warm threshold changes nothing by itself: `status` and the cycle say a rescore is
    needed, `rescore-all --dry-run` shows what would move and writes nothing, `rescore-all` moves it; with
    NURTURE_RESCORE_ON_SCORING_CHANGE the cycle rescores first."""
    env = {"PREFECT_API_URL": prefect_api}
    nurture("db", "upgrade")
    leads, events = tmp_path / "leads.csv", tmp_path / "events.csv"
    leads.write_text("email,job_title,company_size,country\nann@northwind.example,Analyst,200,US\n")
    events.write_text("email,kind,occurred_at\nann@northwind.example,form_submit,2026-03-02T09:00:00Z\n")
    nurture("import", "leads", str(leads))
    nurture("import", "events", str(events))
    first = json.loads(nurture("run", "cycle", "--now", "2026-03-02T10:00:00Z", env=env).stdout)
    assert first["rescore_needed"] is False
    assert json.loads(nurture("status", "--json").stdout)["rescore_needed"] is False

    lower = tmp_path / "nurture.yaml"
    lower.write_text(
        PLAYBOOK_PATH.read_text().replace(
            "warm: {enter_at: 40, leave_below: 30}", "warm: {enter_at: 20, leave_below: 15}"
        )
    )
    env["NURTURE_PLAYBOOK"] = str(lower)
    status = nurture("status", env=env).stdout
    assert "scoring rules or stage thresholds changed" in " ".join(status.split())
    cycle = json.loads(nurture("run", "cycle", "--now", "2026-03-02T11:00:00Z", env=env).stdout)
    assert (cycle["rescore_needed"], cycle["transitions"]) == (True, {})
    dry = json.loads(nurture("run", "rescore-all", "--dry-run", "--now", "2026-03-02T12:00:00Z", env=env).stdout)
    assert (dry["dry_run"], dry["transitions"]) == (True, {"cold→warm": 1})
    assert json.loads(nurture("status", "--json", env=env).stdout)["leads_by_stage"]["warm"] == 0
    done = json.loads(nurture("run", "rescore-all", "--now", "2026-03-02T12:00:00Z", env=env).stdout)
    assert done["transitions"] == {"cold→warm": 1}
    after = json.loads(nurture("status", "--json", env=env).stdout)
    assert (after["rescore_needed"], after["leads_by_stage"]["warm"]) == (False, 1)

    # A playbook broken mid-edit: status still counts, and says it cannot tell whether a rescore is needed.
    broken = tmp_path / "broken.yaml"
    broken.write_text("scoring: [")
    unreadable = nurture("status", env={**env, "NURTURE_PLAYBOOK": str(broken)}).stdout
    assert "The playbook cannot be read" in " ".join(unreadable.split())
    counted = json.loads(nurture("status", "--json", env={**env, "NURTURE_PLAYBOOK": str(broken)}).stdout)
    assert (counted["rescore_needed"], counted["leads_by_stage"]["warm"]) == (None, 1)

    # Configured to apply it: the next change is rescored by the cycle itself (back up: Ann leaves warm).
    env["NURTURE_PLAYBOOK"] = str(PLAYBOOK_PATH)
    env["NURTURE_RESCORE_ON_SCORING_CHANGE"] = "true"
    cycle = json.loads(nurture("run", "cycle", "--now", "2026-03-02T13:00:00Z", env=env).stdout)
    assert (cycle["rescore_needed"], cycle["rescored_all_leads"]) == (False, True)
    assert cycle["transitions"] == {"warm→cold": 1}
    assert json.loads(nurture("status", "--json", env=env).stdout)["rescore_needed"] is False


def opens_of_distinct_emails(database: str) -> int:
    """Emails a person opened, straight from the stored events (machine opens are another kind)."""
    with closing(sqlite3.connect(database)) as db:
        return int(db.execute("SELECT count(DISTINCT message_id) FROM event WHERE kind = 'email_open'").fetchone()[0])
