"""Alembic environment for tokentill: runs on the connection that `storage.db` hands over.

Only online mode on a caller-provided connection is supported: `open_database()` opens the transaction
(and on PostgreSQL takes the advisory lock) before calling `alembic.command.upgrade`, and passes the
synchronous connection in `config.attributes["connection"]`. There is no alembic.ini and no logging setup.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from tokentill.storage.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_connection = context.config.attributes.get("connection")
if not isinstance(_connection, Connection):
    raise RuntimeError("tokentill migrations run through tokentill.storage.db.open_database()")
_run(_connection)
