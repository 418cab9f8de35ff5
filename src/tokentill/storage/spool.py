"""A durable local spool: append-only JSONL files in one folder, one file per process.

Used for work that must not be lost while the database is unreachable or the process dies (settlements of
answers already delivered). Each record is one JSON object on one line with an `id`, written before the
work is tried: `append(record)` is a plain write, which the kernel keeps through a SIGKILL of the process;
`sync()` (fsync) makes what was written survive a power cut too, and is called once the work is known to
wait (the database refused it). A later `{"id": …, "done": true}` line marks the work finished; redoing
finished work must be a no-op for the consumer, which is what makes replay safe.

    spool/
      <pid>-<random>.jsonl   owned by a live process: it holds an exclusive flock on the file
      <pid>-<random>.jsonl   left by a dead process: nobody holds its lock → `adopt()` takes it over

`open()` creates this process's file and locks it. `adopt()` reads every unlocked file (a process that
died), returns its records that are not done, copies them into this process's file (fsynced) and deletes
the old file; with several processes sharing the folder (`serve --workers`) each file is adopted by exactly
one, because only one can take its lock (and the adopter checks that the path still names the file it
locked). A torn last line (a crash mid-write) is skipped: its work was never begun. The file is emptied
whenever nothing in it is pending, and rewritten with only the pending records when it passes
`COMPACT_BYTES` (a locked new file renamed over the old one).

The methods do blocking file I/O: `append`/`done` are single small writes, fine on the event loop;
run `sync`, `adopt` and `open` in a thread (or at start-up).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
from pathlib import Path
from typing import IO, Any

from tokentill.jsonbytes import dumps

__all__ = ["COMPACT_BYTES", "Spool"]

log = logging.getLogger(__name__)

COMPACT_BYTES = 1 << 20


class Spool:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file: IO[str] | None = None
        self._path: Path | None = None
        self._pending: dict[str, dict[str, Any]] = {}

    @property
    def path(self) -> Path | None:
        return self._path

    def open(self) -> None:
        """Create and lock this process's file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self._file, self._path = _locked(path), path

    def append(self, record: dict[str, Any], *, durable: bool = False) -> None:
        """Write `record` (which has an `id`) as one line; `durable`: fsync before returning."""
        file = self._writer()
        file.write(dumps(record).decode() + "\n")
        file.flush()
        if durable:
            os.fsync(file.fileno())
        self._pending[str(record["id"])] = record

    def sync(self) -> None:
        """fsync this process's file: every record appended so far survives a power cut."""
        file = self._writer()
        try:
            os.fsync(file.fileno())
        except (OSError, ValueError):
            if file is self._file:
                raise
            # Compacted meanwhile (from another thread): the new file was fsynced with every pending record.

    def done(self, record_id: str) -> None:
        """Mark `record_id` finished; the file is emptied once nothing in it is pending."""
        if self._pending.pop(record_id, None) is None:
            return
        file = self._writer()
        if not self._pending:
            file.truncate(0)  # "a+" appends after the truncation
            return
        file.write(dumps({"id": record_id, "done": True}).decode() + "\n")
        file.flush()
        if file.tell() > COMPACT_BYTES:
            self._compact()

    def pending(self) -> list[dict[str, Any]]:
        return list(self._pending.values())

    def adopt(self) -> list[dict[str, Any]]:
        """Take over the files of processes that died; their unfinished records, now also in ours."""
        adopted: list[dict[str, Any]] = []
        for path in sorted(self.folder.glob("*.jsonl")):
            if path == self._path:
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
                if not _still_named(path, file):
                    continue  # adopted and deleted, or compacted by its owner, since we opened it
                records = _unfinished(file.read(), path)
                for record in records:
                    self.append(record)
                if records:
                    self.sync()
                adopted.extend(records)
                path.unlink()
                if records:
                    log.warning("adopted %d unfinished record(s) from %s", len(records), path.name)
        return adopted

    def close(self) -> None:
        """Unlock this process's file; delete it if nothing is pending (else the next start adopts it)."""
        if self._file is None or self._path is None:
            return
        if not self._pending:
            self._path.unlink(missing_ok=True)
        else:
            self.sync()
        self._file.close()  # releases the lock
        self._file = self._path = None

    def _compact(self) -> None:
        """Rewrite the file with only the pending records: a locked new file renamed over the old one."""
        assert self._file is not None and self._path is not None
        fresh = _locked(self._path.with_suffix(".compact"))
        for record in self._pending.values():
            fresh.write(json.dumps(record, separators=(",", ":")) + "\n")
        fresh.flush()
        os.fsync(fresh.fileno())
        os.replace(self._path.with_suffix(".compact"), self._path)
        old, self._file = self._file, fresh
        old.close()

    def _writer(self) -> IO[str]:
        if self._file is None:
            raise RuntimeError("Spool.open() was not called")
        return self._file


def _locked(path: Path) -> IO[str]:
    file = path.open("a+", encoding="utf-8")
    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return file


def _still_named(path: Path, file: IO[str]) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


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
