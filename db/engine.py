"""Engines and sessions, and the guard that refuses an out-of-date schema.

SQLite gets WAL mode and a busy timeout so the API and the flows can write at
the same time without "database is locked"; foreign keys are switched on so a
cascade behaves as on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import Engine, bindparam, create_engine, event, inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session

from nurture.errors import ConfigurationError, SchemaOutOfDateError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Deleted rows are overwritten with zeros: an erased person leaves no trace in free pages.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # Take the write lock when a transaction starts: two writers then queue on
    # busy_timeout instead of one failing on lock upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per database URL per process."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError(f"NURTURE_DATABASE_URL is not a database URL: {url!r}") from exc
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        # Let SQLAlchemy stop emitting BEGIN so ours (IMMEDIATE) is the one used.
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "connect", lambda c, r: setattr(c, "isolation_level", None))
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


@contextmanager
def session_scope(engine: Engine, *, commit: bool = True) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error.

    With ``commit=False`` it always rolls back: a dry run sees its own writes, then drops them.
    """
    with Session(engine, expire_on_commit=False) as session:
        transaction = session.begin()
        try:
            yield session
        except BaseException:
            transaction.rollback()
            raise
        if commit:
            transaction.commit()
        else:
            transaction.rollback()


def dialect_insert(session: Session, table: Any) -> Any:
    """INSERT with ON CONFLICT support, for the session's database."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def array_param(values: Iterable[Any], item: Any) -> Any:
    """A list bound as ONE PostgreSQL array value (``= ANY(…)``, ``unnest(…)``): thousands of ids cost one
    parameter, not thousands of placeholders or an executemany."""
    return bindparam(None, list(values), type_=ARRAY(item))


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
    except OperationalError as exc:
        raise ConfigurationError(f"cannot open the database {engine.url.render_as_string()}: {exc.orig}") from exc
    return str(row[0]) if row else None


def sqlite_file(engine: Engine) -> Path | None:
    """The file of a SQLite database (None for PostgreSQL or an in-memory one)."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    database = engine.url.database
    if database.startswith("file:") and engine.url.query.get("uri") == "true":
        # A URI filename (the read-only engine of `nurture simulate`: file:/path?mode=ro).
        return Path(unquote(database.removeprefix("file:")))
    return Path(database)


def ensure_current_schema(engine: Engine) -> None:
    """Refuse to run on a database whose schema is not this version's.

    A SQLite file that does not exist is refused before connecting: connecting would create an
    empty database at a mistyped path and every later command would read it as "no leads"."""
    path = sqlite_file(engine)
    if path is not None and not path.exists():
        raise SchemaOutOfDateError(f"there is no database at {path}: run `nurture db upgrade` to create it")
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    where = engine.url.render_as_string(hide_password=True)
    if current is None:
        raise SchemaOutOfDateError(f"the database {where} has no nurture tables yet: run `nurture db upgrade`")
    raise SchemaOutOfDateError(
        f"the database {where} is at schema {current}, this nurture needs {head}: run `nurture db upgrade`"
    )


def flush_erased_pages(engine: Engine) -> bool:
    """After an erasure, move SQLite's write-ahead log (which still holds the old pages) into the zeroed
    database file and empty it. False if another connection's reads kept part of it for now."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as connection:
        busy, _, _ = connection.connection.dbapi_connection.execute(  # type: ignore[union-attr]
            "PRAGMA wal_checkpoint(TRUNCATE)"
        ).fetchone()
    return not busy


def upgrade_schema(engine: Engine) -> tuple[str | None, str]:
    """Apply every pending migration; returns (before, after) revisions."""
    from alembic import command
    from alembic.config import Config

    path = sqlite_file(engine)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    before = current_revision(engine)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.connect() as connection:
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            # A rebuilt SQLite table must not cascade into its children (foreign keys can
            # only be switched outside a transaction; this connection is in autocommit).
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise SchemaOutOfDateError("the upgrade would break foreign keys; nothing was changed")
        finally:
            if sqlite:
                connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]
    return before, head_revision()
