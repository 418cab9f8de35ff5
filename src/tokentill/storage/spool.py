"""A durable local spool: append-only JSONL files in one folder, one file per process.

Used for work that must not be lost while the database is unreachable (settlements of answers already
delivered). Each record is one JSON object on one line with an `id`; `append(record, durable=True)`
writes and fsyncs it before returning, so it survives a SIGKILL or a power cut. A later
`{"id": …, "done": true}` line marks the work finished (no fsync: redoing finished work must be a no-op
for the consumer anyway, which is what makes replay safe).

    spool/
      <pid>-<random>.jsonl   owned by a live process: it holds an exclusive flock on the file
      <pid>-<random>.jsonl   left by a dead process: nobody holds its lock → `adopt()` takes it over

`open()` creates this process's file and locks it. `adopt()` reads every unlocked file (a process that
died), returns its records that are not done, copies them into this process's file (fsynced) and deletes
the old file; with several processes sharing the folder (`serve --workers`) each file is adopted by exactly
one, because only one can take its lock. A torn last line (a crash mid-write) is skipped: its record was
never acknowledged. The file is emptied whenever nothing in it is pending.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
from pathlib import Path
from typing import IO, Any

__all__ = ["Spool"]

log = logging.getLogger(__name__)


class Spool:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file: IO[str] | None = None
        self._pending: dict[str, dict[str, Any]] = {}

    @property
    def path(self) -> Path | None:
        return Path(self._file.name) if self._file is not None else None

    def open(self) -> None:
        """Create and lock this process's file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        file = path.open("a+", encoding="utf-8")
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file = file

    def append(self, record: dict[str, Any], *, durable: bool = True) -> None:
        """Write `record` (which has an `id`) as one line; `durable`: fsync before returning."""
        file = self._writer()
        file.write(json.dumps(record, separators=(",", ":")) + "\n")
        file.flush()
        if durable:
            os.fsync(file.fileno())
        self._pending[str(record["id"])] = record

    def done(self, record_id: str) -> None:
        """Mark `record_id` finished; the file is emptied once nothing in it is pending."""
        if self._pending.pop(record_id, None) is None:
            return
        file = self._writer()
        if self._pending:
            file.write(json.dumps({"id": record_id, "done": True}) + "\n")
            file.flush()
        else:
            file.truncate(0)  # "a+" appends after the truncation

    def pending(self) -> list[dict[str, Any]]:
        return list(self._pending.values())

    def adopt(self) -> list[dict[str, Any]]:
        """Take over the files of processes that died; their unfinished records, now also in ours."""
        adopted: list[dict[str, Any]] = []
        own = self.path
        for path in sorted(self.folder.glob("*.jsonl")):
            if path == own:
                continue
            try:
                file = path.open("r+", encoding="utf-8")
            except FileNotFoundError:
                continue  # adopted by another process meanwhile
            with file:
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process owns it
                if not path.exists():
                    continue  # adopted and deleted between our open and our lock
                records = _unfinished(file.read(), path)
                for record in records:
                    self.append(record)
                adopted.extend(records)
                path.unlink()
                if records:
                    log.warning("adopted %d unfinished record(s) from %s", len(records), path.name)
        return adopted

    def close(self) -> None:
        """Unlock this process's file; delete it if nothing is pending (else the next start adopts it)."""
        if self._file is None:
            return
        path = Path(self._file.name)
        if not self._pending:
            path.unlink(missing_ok=True)
        self._file.close()  # releases the lock
        self._file = None

    def _writer(self) -> IO[str]:
        if self._file is None:
            raise RuntimeError("Spool.open() was not called")
        return self._file


def _unfinished(text: str, path: Path) -> list[dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is torn (a crash mid-write); skipped", path.name, number)
            continue
        if record.get("done"):
            records.pop(str(record["id"]), None)
        else:
            records[str(record["id"])] = record
    return list(records.values())
