"""Webhooks from the command line: `nurture validate` reports a bad section at its lines, and no run starts
while a webhook has no signing secret."""

from __future__ import annotations

from pathlib import Path

from tests.cli.runner import line_of
from tests.cli.runner import run_in_checkout as nurture
from tests.conftest import PLAYBOOK_PATH

SHIPPED = PLAYBOOK_PATH.read_text()
GOOD = """
webhooks:
  - name: sales
    url: https://crm.example.com/hooks/nurture
    events: [lead.transitioned, lead.converted]
    to: hot
"""


def test_validate_reports_each_mistake_of_a_webhook_at_its_file_and_line(project: Path) -> None:
    text = SHIPPED + (
        "\nwebhooks:\n"
        "  - url: htps://crm.example.com/hooks\n"
        "    events: [lead.transitioned, lead.convrted]\n"
        "    to: [hot, custmer]\n"
    )
    (project / "nurture.yaml").write_text(text)
    result = nurture("validate", cwd=project, expect=1, env={"NURTURE_WEBHOOK_SECRET": "s"})
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"nurture.yaml:{line_of(text, 'url: htps')}: webhooks.0.url: 'htps://crm.example.com/hooks' is not a "
        "webhook URL: it must start with https:// (or http://)",
        f"nurture.yaml:{line_of(text, 'events: [lead.transitioned, lead.convrted]')}: webhooks.0.events.1: "
        "'lead.convrted' is not a webhook event (did you mean 'lead.converted'?); one of: lead.transitioned, "
        "lead.converted, message.failed",
        f"nurture.yaml:{line_of(text, 'to: [hot, custmer]')}: webhooks.0.to.1: 'custmer' is not a stage (did you "
        "mean 'customer'?); one of: cold, warm, hot, customer",
        "3 problems in nurture.yaml and templates/",
    ]


def test_validate_and_a_run_refuse_webhooks_without_a_signing_secret(project: Path, tmp_path: Path) -> None:
    text = SHIPPED + GOOD
    (project / "nurture.yaml").write_text(text)
    # A pre-commit hook on a marketer's laptop has no secrets: only a check where it runs needs them.
    assert nurture("validate", cwd=project, expect=0).stdout.startswith("ok nurture.yaml")
    nurture("db", "upgrade", cwd=project, expect=0)
    missing = nurture("validate", "--database", cwd=project, expect=1)
    assert missing.stderr.splitlines()[0] == (
        f"nurture.yaml:{line_of(text, 'url: https://crm.example.com')}: webhooks.0.url: NURTURE_WEBHOOK_SECRET "
        "is not set: this webhook would never be sent (nurture sends none unsigned); set NURTURE_WEBHOOK_SECRET "
        "to the secret its receiver verifies with (docs/webhooks.md)"
    )
    refused = nurture("run", "cycle", cwd=project, expect=1)
    assert " ".join(refused.stderr.split()) == (
        "error: NURTURE_WEBHOOK_SECRET is not set, and the playbook's webhooks are signed with it: nurture never "
        "sends a webhook unsigned; set NURTURE_WEBHOOK_SECRET to the secret the receiver verifies with "
        "(docs/webhooks.md)"
    )
    ok = nurture("validate", "--database", cwd=project, expect=0, env={"NURTURE_WEBHOOK_SECRET": "whsec-1"})
    assert ok.stdout.startswith("ok nurture.yaml")
    assert "whsec-1" not in ok.stdout + ok.stderr
