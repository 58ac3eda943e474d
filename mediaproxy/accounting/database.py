"""The database backend: one row per session in any database SQLAlchemy
reaches by URL, unique on (call_id, from_tag, to_tag); `info` is the
statistics JSON. The table is created when missing. Blocking: it runs in the
backend's own thread."""

import json
import logging

import sqlalchemy
from sqlalchemy import Column, MetaData, String, Table, Text, UniqueConstraint
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError

CONNECT_TIMEOUT = 10        # seconds: a server that does not answer is an error, not a hang

log = logging.getLogger("mediaproxy.accounting")


def _have_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


class DatabaseBackend:
    name = "database"
    # errors that the same record will always meet: it is set aside, the others go on
    permanent_errors = (DataError, ProgrammingError, ValueError, TypeError)

    def __init__(self, config):
        if not config.dburi:
            raise ValueError("accounting = database needs [Database] dburi")
        self.config = config
        try:
            # Checks the URL and that its driver is installed; connects only when used.
            url = sqlalchemy.engine.make_url(config.dburi)
            if url.drivername in ("mysql", "mariadb") and not _have_module("MySQLdb"):
                url = url.set(drivername=url.drivername + "+pymysql")     # the driver we install
            connect_args = {"connect_timeout": CONNECT_TIMEOUT} if url.get_backend_name() in (
                "postgresql", "mysql", "mariadb") else {}
            self.engine = sqlalchemy.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except Exception as e:
            raise ValueError("[Database] dburi %r cannot be used: %s" % (config.dburi, e)) from None
        metadata = MetaData()
        self.table = Table(config.sessions_table, metadata,
                           Column(config.callid_column, String(255), nullable=False),
                           Column(config.fromtag_column, String(255), nullable=False),
                           Column(config.totag_column, String(255), nullable=False),
                           # MySQL's TEXT stops at 64 KB: a call with many streams goes over
                           Column(config.info_column, Text().with_variant(mysql.MEDIUMTEXT(), "mysql")
                                  .with_variant(mysql.MEDIUMTEXT(), "mariadb")),
                           UniqueConstraint(config.callid_column, config.fromtag_column, config.totag_column,
                                            name="%s_session" % config.sessions_table))
        self.metadata = metadata

    def open(self) -> None:
        self.metadata.create_all(self.engine, checkfirst=True)
        self.opened = True

    opened = False

    def write(self, statistics: dict) -> None:
        if not self.opened:
            self.open()
        config = self.config
        row = {config.callid_column: statistics["call_id"],
               config.fromtag_column: statistics.get("from_tag") or "",
               config.totag_column: statistics.get("to_tag") or "",
               config.info_column: json.dumps(statistics)}
        try:
            with self.engine.begin() as connection:
                connection.execute(self.table.insert().values(**row))
        except IntegrityError:
            # Written before (a retry after a lost acknowledgement): once is enough.
            log.info("session %s was already in the database", statistics["call_id"])

    def close(self) -> None:
        self.engine.dispose()
        self.opened = False
