"""Reading and writing the lab's data files: JSONL, atomic JSON, resumable JSONL results, configs.

Every error is a `DataError` whose message starts with the file (and the 1-based line when
there is one), so a bad line in a 10k-line file can be found at once. Nothing is skipped
silently: blank lines are the only lines a reader ignores.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import tempfile
from datetime import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from lightning_lab.errors import DataError, check_input_file

log = logging.getLogger(__name__)


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield `(line_number, line)` of a UTF-8 text file, without the line ending; line numbers are 1-based.

    Each line is decoded on its own, so a byte that is not UTF-8 is reported at its own line
    (`DataError("path:line: not UTF-8 ...")`), not wherever the decoder's buffer happened to end.
    """
    path = check_input_file(path)
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                yield line_number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_number}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") \
                    from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, record)` for each non-blank line; line numbers are 1-based.

    A line that is not valid JSON, or is valid JSON but not an object, raises
    `DataError("path:line: reason")`.
    """
    for line_number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_number}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        yield line_number, record


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON so that readers see either the old file or the new one, never half of it."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` so that readers see either the old file or the new one, never half of it.

    The text goes to a temporary file in the same directory (so `os.replace` is a rename on one
    file system), is flushed and fsynced, then replaces `path` in one step; a failure removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, 0o644)  # mkstemp makes the file private (0600); the result should read like any file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def hold_write_lock(path: str | os.PathLike):
    """An exclusive `flock` on ``.<name>.lock`` beside `path`, held until the returned file is closed.

    The lock file also says who holds it (pid, host, since when), so a refused writer can name
    the holder. JsonlWriter never deletes it: deleting a lock file lets two processes lock two
    different files of the same name. The lock ends with the holder's process, however it ends.
    """
    path = Path(path)
    lock = open(lock_path(path), "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise DataError(f"{path}: being written by {holder}; two writers would interleave their lines, "
                        f"so wait for it to finish or stop it") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now().isoformat(timespec='seconds')}\n")
    lock.flush()
    return lock


class JsonlWriter:
    """Append-only JSONL results file that survives being killed and supports `--resume`.

    Each `write` appends one line, then flushes and fsyncs, so a finished record is on disk.
    A process killed mid-write can leave a torn last line (no trailing newline, not valid
    JSON): it is truncated away when the file is next opened, with a warning naming the file
    and line. A last line that is complete JSON but lacks only its newline is kept.
    `done_ids()` gives the ids already in the file, so a rerun can skip them.

    ``exclusive=True`` holds an exclusive lock (`hold_write_lock`) from before the file is read
    until `close`: a second writer, in this process or another, is refused with a `DataError`
    naming the holder, instead of interleaving its lines (or repairing a line still being written).

        with JsonlWriter("runs/bon/x/samples.jsonl") as out:
            for sample in samples:
                if sample.id in out.done_ids():
                    continue
                out.write({"id": sample.id, "completion": ...})
    """

    def __init__(self, path: str | os.PathLike, id_key: str = "id", exclusive: bool = False):
        self.path = Path(path)
        self.id_key = id_key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock_path = lock_path(self.path)
        self._lock = hold_write_lock(self.path) if exclusive else None
        self._done_ids: set[str] = set()
        if self.path.exists():
            self._repair_last_line()
            # read_jsonl rejects a malformed line in the middle too: results are never used half-read
            self._done_ids = {str(record[id_key]) for _, record in read_jsonl(self.path) if id_key in record}
        self._file = self.path.open("a", encoding="utf-8")

    def _repair_last_line(self) -> None:
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1  # 0 when the whole file is one unterminated line
        tail = data[start:]
        try:
            complete = isinstance(json.loads(tail), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            complete = False
        with self.path.open("r+b") as f:
            if complete:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                line_number = data.count(b"\n", 0, start) + 1
                log.warning(
                    "%s:%d: dropping a torn last line (%d bytes) left by an interrupted write",
                    self.path, line_number, len(tail),
                )
                f.truncate(start)
            f.flush()
            os.fsync(f.fileno())

    def write(self, record: dict) -> None:
        """Append `record` as one line; it is on disk when this returns."""
        try:
            line = json.dumps(record, ensure_ascii=False)
        except TypeError as e:
            raise DataError(f"{self.path}: record is not JSON-serialisable: {e}") from None
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.id_key in record:
            self._done_ids.add(str(record[self.id_key]))

    def done_ids(self) -> set[str]:
        """Ids (as strings) of the records in the file, including those written by this writer."""
        return set(self._done_ids)

    def close(self) -> None:
        self._file.close()
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_yaml_or_json(path: str | os.PathLike) -> dict:
    """Read a config file (.yaml / .yml / .json) whose top level is a mapping; an empty file is {}."""
    path = check_input_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line_number = path.read_bytes().count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line_number}: not UTF-8 (byte {e.object[e.start]:#04x})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            config = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    elif suffix in (".yaml", ".yml"):
        try:
            config = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise DataError(f"{where}: malformed YAML ({getattr(e, 'problem', None) or e})") from None
    else:
        raise DataError(f"{path}: unsupported config type {path.suffix!r}; use .yaml, .yml or .json")
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    return config
