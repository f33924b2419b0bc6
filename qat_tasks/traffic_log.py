"""Writing and reading logs in the traffic schema (qat_tasks.schema), local folder or s3:// prefix.

The writer validates each record before buffering it, so a service never writes a line the refresh would have
to quarantine, and writes each flush as one new file (`dt=YYYY-MM-DD/<prefix>-<host>-<pid>-<time>-<seq>.jsonl`)
through a temporary name: a reader never sees half a file, and no file is appended to after it exists.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from qat_tasks import storage
from qat_tasks.schema import InferenceRecord, dump_record, parse_line


class LogWriter:
    def __init__(self, root: str, endpoint_url: str | None = None, flush_records: int = 500,
                 flush_seconds: float = 10.0, prefix: str = "serving"):
        self.root, self.endpoint_url, self.flush_records = root, endpoint_url, flush_records
        self.name = f"{prefix}-{socket.gethostname()}-{os.getpid()}"
        self._buffer: list[tuple[str, str]] = []  # (day, line)
        self._lock = threading.Lock()
        self._seq = 0
        self.stats: Counter = Counter()
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._every, args=(flush_seconds,), daemon=True, name="log-flusher")
        self._flusher.start()

    def write(self, record: dict) -> None:
        rec = InferenceRecord.model_validate(record)  # raises on a record the pipeline would quarantine
        line = dump_record(rec.model_dump(mode="json"))
        with self._lock:
            self._buffer.append((rec.timestamp.astimezone(UTC).date().isoformat(), line))
            full = len(self._buffer) >= self.flush_records
        if full:
            self.flush()

    def flush(self) -> int:
        with self._lock:
            batch, self._buffer = self._buffer, []
            self._seq += 1
            seq = self._seq
        by_day: dict[str, list[str]] = defaultdict(list)
        for day, line in batch:
            by_day[day].append(line)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        for day, lines in by_day.items():
            name = f"dt={day}/{self.name}-{stamp}-{seq:06d}.jsonl"
            body = ("\n".join(lines) + "\n").encode("utf-8")
            if storage.is_s3(self.root):
                storage.write_bytes(storage.join(self.root, name), body, self.endpoint_url)
            else:
                path = Path(self.root) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name("." + path.name + ".tmp")  # not a log file name until renamed
                tmp.write_bytes(body)
                os.replace(tmp, path)
            self.stats["files"] += 1
            self.stats["records"] += len(lines)
        return len(batch)

    def _every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            if self._buffer:
                self.flush()

    def close(self) -> None:
        self._stop.set()
        self._flusher.join(timeout=5)
        self.flush()


def iter_records(root: str, first_day: date, end_day: date, stats: Counter, endpoint_url: str | None = None
                 ) -> Iterator[InferenceRecord]:
    """Valid records of the dt= partitions in [first_day, end_day), streamed; files and invalid lines counted."""
    for lf in storage.list_log_files(root, first_day, end_day, endpoint_url):
        stats["files"] += 1
        for raw in storage.open_lines(lf.uri, endpoint_url):
            if not raw.strip():
                continue
            rec, _ = parse_line(raw)
            if rec is None:
                stats["invalid"] += 1
                continue
            yield rec


def read_records(root: str, start: datetime, end: datetime, endpoint_url: str | None = None,
                 events: set[str] | None = None) -> tuple[list[InferenceRecord], Counter]:
    """Valid records with timestamp in [start, end) (and event in `events`); invalid lines are counted."""
    stats: Counter = Counter()
    out = []
    for rec in iter_records(root, start.date(), (end + timedelta(days=1)).date(), stats, endpoint_url):
        if not (start <= rec.timestamp < end) or (events is not None and rec.event not in events):
            stats["outside"] += 1
            continue
        stats["valid"] += 1
        out.append(rec)
    return out, stats
