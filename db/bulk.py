"""Many rows, one INSERT: each engine's fast way to run an upsert for a batch.

The caller builds the statement (``INSERT INTO … ON CONFLICT …``: what a duplicate is and
what an update keeps) once for both engines; this module only moves the rows into it:

- **PostgreSQL**: the rows stream with ``COPY … FROM STDIN (FORMAT BINARY)`` into a
  temporary table, then the statement runs once as ``INSERT … SELECT`` from it, in the
  rows' order. The temporary table lives for the statement (and at most until commit).
- **SQLite**, and PostgreSQL for fewer than ``COPY_FROM`` rows (an API call's events): one
  ``executemany`` of the statement (no ``RETURNING``: SQLAlchemy would split it into
  multi-row statements).

Both run in the caller's transaction: a batch is written whole or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    Float,
    Integer,
    String,
    column,
    func,
    literal,
    select,
    table,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import TypeEngine

from db.models import UTCDateTime

# The scratch table's name; one statement uses it at a time on a connection, and drops it.
SCRATCH = "nurture_bulk_rows"
_ORDER = "nurture_row_order"
# Fewer rows go as one executemany on PostgreSQL too: the temporary table costs three more
# round trips, which a webhook's or an API call's few events would pay on every request.
COPY_FROM = 100
# SQLAlchemy keeps the driver's row count only for UPDATE and DELETE unless asked.
_COUNTED = {"preserve_rowcount": True}


def insert_many(*, session: Session, statement: Insert, rows: Sequence[Mapping[str, Any]]) -> int:
    """Run ``statement`` for every row (all rows have the same keys); returns how many rows it wrote.

    "Wrote" is the database's count: rows inserted, plus rows updated by an ``ON CONFLICT DO
    UPDATE``; a row skipped by ``ON CONFLICT DO NOTHING`` is not counted.
    """
    if not rows:
        return 0
    if session.get_bind().dialect.name == "postgresql" and len(rows) >= COPY_FROM:
        return _copy_then_insert(session, statement, rows)
    return int(session.connection().execute(statement, list(rows), execution_options=_COUNTED).rowcount)


def widen_cache(session: Session) -> None:
    """On SQLite, a page cache of up to 128 MB for this connection (the default is 2 MB).

    An import inserts into the event table's indexes at random places (content keys are
    digests): with the default cache, a million-event import rereads index pages at every
    batch. The cache is allocated only as it fills, and stays with the pooled connection.
    """
    if session.get_bind().dialect.name == "sqlite":
        session.connection().exec_driver_sql("PRAGMA cache_size=-131072")


def one_of(session: Session, target: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """``target`` is one of ``values``: ``= ANY(array)`` on PostgreSQL (one parameter, however many
    values: a statement with thousands of parameters costs more to send than to run), ``IN`` on SQLite."""
    condition: ColumnElement[bool]
    if session.get_bind().dialect.name == "postgresql":
        condition = target == func.any(literal(list(values), ARRAY(target.type)))
    else:
        condition = target.in_(values)
    return condition


def _copy_then_insert(session: Session, statement: Insert, rows: Sequence[Mapping[str, Any]]) -> int:
    import psycopg

    names = list(rows[0])
    columns: Any = statement.table.c
    types = [_copy_type(columns[name].type) for name in names]
    raw: Any = session.connection().connection.dbapi_connection
    quoted = [f'"{name}"' for name in names]
    ddl = ", ".join(f"{name} {kind}" for name, kind in zip(quoted, types, strict=True))
    with raw.cursor() as cursor:
        cursor.execute(f"CREATE TEMPORARY TABLE {SCRATCH} ({_ORDER} int8, {ddl}) ON COMMIT DROP")
        copy_sql = f"COPY {SCRATCH} ({_ORDER}, {', '.join(quoted)}) FROM STDIN (FORMAT BINARY)"
        try:
            with cursor.copy(copy_sql) as copy:
                copy.set_types(["int8", *types])
                for number, row in enumerate(rows):
                    copy.write_row([number, *(row[name] for name in names)])
        except psycopg.DataError as exc:  # a value PostgreSQL refuses (a NUL in text...): as SQLAlchemy says it
            raise DataError(copy_sql, None, exc) from exc
    scratch = table(SCRATCH, column(_ORDER), *(column(name) for name in names))
    source = select(*(scratch.c[name] for name in names)).order_by(scratch.c[_ORDER])
    written = int(
        session.connection().execute(statement.from_select(names, source), execution_options=_COUNTED).rowcount
    )
    session.connection().exec_driver_sql(f"DROP TABLE {SCRATCH}")
    return written


def _copy_type(kind: TypeEngine[Any]) -> str:
    """The PostgreSQL type a value of this column travels as in binary COPY.

    Text travels as ``text``: a value longer than its column is refused by the INSERT, as it
    would be row by row.
    """
    if isinstance(kind, UTCDateTime):
        return "timestamptz"
    if isinstance(kind, JSON):
        return "json"
    if isinstance(kind, Boolean):
        return "bool"
    if isinstance(kind, Float):
        return "float8"
    if isinstance(kind, BigInteger):
        return "int8"
    if isinstance(kind, Integer):
        return "int4"
    if isinstance(kind, String):
        return "text"
    raise TypeError(f"no COPY type for {kind!r}")
