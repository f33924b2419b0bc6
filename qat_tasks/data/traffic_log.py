"""Writing and reading logs in the traffic schema (qat_tasks.core.schema), on a local folder or an s3:// prefix.

The writer validates each record before buffering it, so a service never writes a line the refresh would have
to quarantine. Each flush becomes new files, one per day it holds (`dt=YYYY-MM-DD/<prefix>-<host>-<pid>-<utc
time>-<seq>.jsonl`), written under a temporary name and renamed: a reader never sees half a file, and no file is
appended to once it exists, so a reader that listed it earlier reads the same bytes later. Flushes happen on a
background thread (every `flush_seconds`, or as soon as `flush_records` are buffered): a request that logs a
record never waits for storage.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from qat_tasks.core import storage
from qat_tasks.core.config import PROJECT_ROOT
from qat_tasks.core.schema import (
    InferenceRecord,
    ReviewLabel,
    dump_record,
    parse_line,
    reason_category,
    summarize_error,
)

log = logging.getLogger(__name__)


def refuse_bundled_sample(log_dir: str) -> None:
    """The project's bundled traffic sample is read-only input: a service logging into it would leave the checkout
    dirty and change what the next refresh over that day reads."""
    bundled = (PROJECT_ROOT / "data").resolve()
    if "://" not in log_dir and Path(log_dir).resolve().is_relative_to(bundled):
        raise ValueError(f"serving.log_dir resolves to {log_dir}, inside the bundled sample folder {bundled}, which "
                           f"is read-only input; log under the state folder (serving.log_dir: state://traffic) or to "
                           f"the traffic store (an s3:// prefix)")


class LogWriter:
    """Thread-safe buffered writer of traffic records; `stats` counts records and files written."""

    def __init__(self, root: str, endpoint_url: str | None = None, flush_records: int = 500,
                 flush_seconds: float = 10.0, prefix: str = "serving", max_buffered: int | None = None):
        refuse_bundled_sample(root)
        self.root, self.endpoint_url, self.flush_records = root, endpoint_url, flush_records
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "host"
        self.name = f"{prefix}-{host}-{os.getpid()}"
        # While storage is down, records wait in memory up to this many; beyond it the oldest are dropped
        # (counted and logged) rather than letting the service run out of memory.
        self.max_buffered = max_buffered or max(20 * flush_records, 10_000)
        self._buffer: list[tuple[str, str]] = []  # (partition day, JSON line)
        self._lock = threading.Lock()  # guards the buffer, the sequence number and stats
        self._flush_lock = threading.Lock()  # one flush at a time
        self._seq = 0
        self._closed = False
        self.stats: Counter = Counter()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._flusher = threading.Thread(target=self._run, args=(flush_seconds,), daemon=True, name="log-flusher")
        self._flusher.start()

    def record_class(self, record: dict):
        """The schema class a record is validated against: a review label or an intent classifier's turn."""
        return ReviewLabel if record.get("event") == "review_label" else InferenceRecord

    def write(self, record: dict) -> None:
        """Buffer one record (a logged turn, or a review label); ValueError (naming the field) for a record the
        traffic schema refuses."""
        model = self.record_class(record)
        try:
            rec = model.model_validate(record)
        except ValidationError as exc:
            raise ValueError(f"not a valid traffic record, not logged: {summarize_error(exc)}") from None
        line = dump_record(rec.model_dump(mode="json"))
        at = rec.reviewed_at if isinstance(rec, ReviewLabel) else rec.timestamp
        day = at.astimezone(UTC).date().isoformat()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"log writer for {self.root} is closed")
            self._buffer.append((day, line))
            if len(self._buffer) > self.max_buffered:
                over = len(self._buffer) - self.max_buffered
                del self._buffer[:over]
                self.stats["dropped"] += over
            if len(self._buffer) >= self.flush_records:
                self._wake.set()

    def flush(self) -> int:
        """Write what is buffered now; returns the number of records written. On a storage error the records go
        back into the buffer (the next flush retries them) and the error is raised."""
        with self._flush_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            if not batch:
                return 0
            by_day: dict[str, list[str]] = defaultdict(list)
            for day, line in batch:
                by_day[day].append(line)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            written = 0
            try:
                for day in sorted(by_day):
                    lines = by_day[day]
                    with self._lock:
                        self._seq += 1
                        seq = self._seq
                    self._put(f"dt={day}/{self.name}-{stamp}-{seq:06d}.jsonl", ("\n".join(lines) + "\n").encode())
                    written += len(lines)
                    with self._lock:
                        self.stats["files"] += 1
                        self.stats["records"] += len(lines)
                    del by_day[day]
            except Exception:
                with self._lock:  # unwritten days go back in front of what arrived meanwhile
                    self._buffer[:0] = [(d, line) for d in sorted(by_day) for line in by_day[d]]
                    self.stats["flush_errors"] += 1
                raise
            return written

    def _put(self, name: str, body: bytes) -> None:
        if storage.is_s3(self.root):
            storage.write_bytes(storage.join(self.root, name), body, self.endpoint_url)  # a PUT is atomic
            return
        path = Path(self.root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # not a log file name (storage._PARTITION) until renamed
        tmp.write_bytes(body)
        os.replace(tmp, path)

    def _run(self, seconds: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # storage down: keep the records, try again on the next tick
                log.warning("could not write %d buffered log records to %s (retrying in %.0f s): %s: %s",
                            self.pending, self.root, seconds, type(exc).__name__, exc)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def close(self) -> None:
        """Stop the flusher and write what is left (raises if that last write fails)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._flusher.join(timeout=30)
        self.flush()
        if self.stats["dropped"]:
            log.error("%d log records were dropped while %s could not be written", self.stats["dropped"], self.root)

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_records(root: str, first_day: date, end_day: date, stats: Counter, endpoint_url: str | None = None,
                 labels: list[ReviewLabel] | None = None) -> Iterator[InferenceRecord]:
    """Valid logged turns of the dt= partitions in [first_day, end_day), streamed. `stats` counts files and invalid
    lines, with `invalid:<reason>` per reason: the refresh quarantines those lines, readers never drop them
    silently. Review labels are collected into `labels` when given (else counted as `labels`)."""
    for lf in storage.list_log_files(root, first_day, end_day, endpoint_url):
        stats["files"] += 1
        for raw in storage.open_lines(lf.uri, endpoint_url):
            if not raw.strip():
                continue
            rec, reason = parse_line(raw)
            if rec is None:
                stats["invalid"] += 1
                stats[f"invalid:{reason_category(reason)}"] += 1
                continue
            if isinstance(rec, ReviewLabel):
                stats["labels"] += 1
                if labels is not None:
                    labels.append(rec)
                continue
            yield rec


def read_records(root: str, start: datetime, end: datetime, endpoint_url: str | None = None,
                 events: set[str] | None = None, labels: list[ReviewLabel] | None = None
                 ) -> tuple[list[InferenceRecord], Counter]:
    """Valid records with timestamp in [start, end) (and, given `events`, one of those events), in file order;
    the review labels of those days go into `labels` when given.

    Stats: files, valid, invalid (and `invalid:<reason>`), outside_window, other_event, labels.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError(f"read_records needs timezone-aware start and end (got {start!r}, {end!r}): "
                         f"log timestamps are UTC")
    stats: Counter = Counter()
    out = []
    # Partition days are UTC days; the last day the window touches is end's (minus a hair when end is midnight).
    last_day = (end.astimezone(UTC) - timedelta(microseconds=1)).date()
    for rec in iter_records(root, start.astimezone(UTC).date(), last_day + timedelta(days=1), stats, endpoint_url,
                            labels):
        if not (start <= rec.timestamp < end):
            stats["outside_window"] += 1
        elif events is not None and rec.event not in events:
            stats["other_event"] += 1
        else:
            stats["valid"] += 1
            out.append(rec)
    return out, stats
