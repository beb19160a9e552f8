"""One webhook dispatcher run against a database, as a child process the crash test SIGKILLs.

python -m tests.db.run_webhook_dispatcher DATABASE_URL SECRET LEASE_SECONDS
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta

from db.engine import get_engine
from flows.webhooks import HttpPoster, deliver_webhooks


def main(database_url: str, secret: str, lease_seconds: float) -> None:
    poster = HttpPoster(timeout=10)
    result = deliver_webhooks(
        engine=get_engine(database_url),
        secrets={"sales": secret},
        now=datetime.now(UTC),
        clock=lambda: datetime.now(UTC),
        poster=poster,
        batch_size=10,
        concurrency=4,
        lease=timedelta(seconds=lease_seconds),
    )
    poster.close()
    print(json.dumps(result.as_json()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
