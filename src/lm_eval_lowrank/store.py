"""The results store of sweeps and searches: one JSON object per line (JSON Lines).

Why JSON Lines rather than SQLite: a row is appended with a single ``write`` of one line
followed by ``fsync``, so a kill can at worst leave one torn last line, which
:meth:`Store.open` cuts off (the row is then simply run again). The file diffs and commits
well, and ``jq``/pandas read it directly.

Every row carries ``key`` = hash of (model, spec, tasks, limit): the identity of one
evaluation. A resumed sweep skips keys with a finished row (``status == "ok"``; the latest
such row counts); a key with only error rows is run again. An error row never hides an
earlier finished row of its key: it stays in the file and in ``rows(ok_only=False)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

STORE_VERSION = 1


def row_key(model: str, spec: Mapping[str, Any], tasks: Iterable[str], limit: int | float | None, extra: Mapping[str, Any] | None = None) -> str:
    """A stable 16-hex-digit identity of one evaluation.

    ``spec`` is normalised (keys sorted, values stringified) so ``layers=18`` and
    ``layers="18"`` are the same evaluation; task order does not matter.
    """
    norm_spec = {str(k): str(v) for k, v in sorted(spec.items()) if v is not None}
    payload = {
        "model": str(model),
        "spec": norm_spec,
        "tasks": sorted(str(t) for t in tasks),
        "limit": limit,
        **({"extra": {str(k): extra[k] for k in sorted(extra)}} if extra else {}),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class StoreError(ValueError):
    """A store file that cannot be read as JSON Lines (one line, names the file and line)."""


class Store:
    """An append-only JSON Lines file of evaluation rows, keyed by :func:`row_key`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._rows: list[dict[str, Any]] = []
        self._latest: dict[str, dict[str, Any]] = {}
        self._latest_ok: dict[str, dict[str, Any]] = {}  # a failed re-run must not hide a finished row
        self.repaired_bytes = 0  # size of a torn tail cut off on open
        self._offset = 0  # bytes of the file read into the rows (whole lines): another writer's rows come after
        self._lines = 0  # lines read, for the line numbers of errors

    @classmethod
    def open(cls, path: str | os.PathLike[str], create: bool = True, read_only: bool = False) -> Store:
        """``read_only``: change nothing on disk (no file created, no torn tail cut): a missing store reads empty."""
        store = cls(path)
        if read_only:
            if store.path.exists():
                store._load(repair=False)
            return store
        if not store.path.exists():
            if not create:
                raise StoreError(f"store {str(store.path)!r} does not exist")
            store.path.parent.mkdir(parents=True, exist_ok=True)
            store.path.touch()
        store._load(repair=create)
        return store

    # -- reading ----------------------------------------------------------------------
    def _load(self, repair: bool) -> None:
        # Under append's lock: a row another sweep is writing is waited for, not cut as a torn tail.
        with open(self.path, "r+b" if repair else "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX if repair else fcntl.LOCK_SH)
            try:
                data = fh.read()
                end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
                tail = data[end:]
                if tail:
                    try:  # a complete row whose newline never landed is still a row
                        json.loads(tail)
                        if repair:
                            fh.seek(0, os.SEEK_END)
                            fh.write(b"\n")
                        end = len(data)
                        data = data + b"\n"
                    except ValueError:
                        if repair:
                            fh.truncate(end)
                        self.repaired_bytes = len(tail)
                    if repair:
                        fh.flush()
                        os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        self._take(data[:end], first_line=1)
        self._offset = end

    def _take(self, data: bytes, first_line: int) -> None:
        lines = data.splitlines()
        self._lines += len(lines)
        for lineno, line in enumerate(lines, first_line):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise StoreError(f"store {str(self.path)!r} line {lineno} is not JSON; fix or remove that line") from None
            if isinstance(row, dict) and "key" in row:
                self._remember(row)

    def _read_new(self, fh: Any) -> None:
        """Take the whole lines other writers appended since this store last read (under a lock held on ``fh``)."""
        fh.seek(self._offset)
        data = fh.read()
        end = data.rfind(b"\n") + 1
        self._take(data[:end], first_line=self._lines + 1)
        self._offset += end

    def refresh(self) -> None:
        """Read the rows another sweep or search appended to the file since this store was opened."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            try:
                self._read_new(fh)
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def held_elsewhere(self, key: str) -> bool:
        """True while another process holds ``key`` (see :meth:`claim`)."""
        with self.claim(key, wait=False) as free:
            return not free

    @contextlib.contextmanager
    def claim(self, key: str, wait: bool = True) -> Iterator[bool]:
        """Hold ``key`` while this process evaluates it, so that another sweep or search on this store does not
        evaluate it too (it waits, then finds the row). Yields False when ``wait`` is False and another process
        holds it. A claim is a lock on a small file beside the store, released when its process ends, however."""
        folder = self.path.parent / f".{self.path.name}.claims"
        folder.mkdir(exist_ok=True)
        with open(folder / key, "a") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _remember(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self._latest[row["key"]] = row
        if row.get("status") == "ok":
            self._latest_ok[row["key"]] = row

    def __len__(self) -> int:
        return len(self._latest)

    def __contains__(self, key: object) -> bool:
        return key in self._latest

    def get(self, key: str) -> dict[str, Any] | None:
        """The latest finished row of ``key``, else its latest row (an error), else None."""
        return self._latest_ok.get(key) or self._latest.get(key)

    def done(self, key: str) -> bool:
        return key in self._latest_ok

    def rows(self, ok_only: bool = True) -> list[dict[str, Any]]:
        """Per key, in first-written order: the latest finished row (``ok_only``), or the latest row of any status,
        errors included."""
        seen: dict[str, None] = {}
        for r in self._rows:
            seen.setdefault(r["key"], None)
        if ok_only:
            return [self._latest_ok[k] for k in seen if k in self._latest_ok]
        return [self._latest[k] for k in seen]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows())

    # -- writing ----------------------------------------------------------------------
    def append(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Append one row durably: one write of one line, flush, fsync, under an exclusive lock."""
        if "key" not in row:
            raise StoreError("a store row needs a 'key'")
        row = {"store_version": STORE_VERSION, **row}
        line = (json.dumps(row, sort_keys=True, default=_json_default, allow_nan=True) + "\n").encode("utf-8")
        with open(self.path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # two sweeps on one store never interleave bytes
            try:
                self._read_new(fh)  # rows another writer appended meanwhile
                fh.seek(self._offset)
                tail = fh.read()  # after the last newline: this row would be glued onto it
                if tail:
                    try:  # a whole row whose newline never landed
                        json.loads(tail)
                        fh.write(b"\n")
                        self._take(tail, first_line=self._lines + 1)
                        self._offset += len(tail) + 1
                    except ValueError:  # a torn line of a writer killed mid-write
                        fh.truncate(self._offset)
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
                self._offset += len(line)
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        self._remember(row)
        return row


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)
