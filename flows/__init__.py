"""Prefect flows and tasks: thin orchestration over db/ and the nurture core."""

from __future__ import annotations

import logging

# Prefect attaches its run-log handler to the loggers in PREFECT_LOGGING_EXTRA_LOGGERS but
# leaves their level at the root's WARNING; nurture's INFO lines (a chunk advanced, a batch
# dispatched) belong in the run logs too.
for _name in ("nurture", "db", "flows"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)
