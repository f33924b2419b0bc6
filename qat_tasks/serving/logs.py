"""The service's log writer: `traffic_log.LogWriter` (buffered, immutable flushes, a request never waits for
storage) for the records of every served role, each validated against its role's record class before buffering,
so the service never writes a line a reader would have to quarantine."""

from __future__ import annotations

from datetime import UTC

from pydantic import ValidationError

from qat_tasks.core.schema import INTENT_ROLE, ROLE_RECORDS, dump_record, summarize_error
from qat_tasks.data.traffic_log import LogWriter


class RecordWriter(LogWriter):
    """A LogWriter for intent, escalation and rerank records (told apart by `role`; none: an intent record)."""

    def write(self, record: dict) -> None:
        """Buffer one record; ValueError (naming the field) for a record the traffic schema refuses."""
        role = record.get("role", INTENT_ROLE)
        if role not in ROLE_RECORDS:
            raise ValueError(f"not a valid traffic record, not logged: role: unknown role {role!r}")
        try:
            rec = ROLE_RECORDS[role].model_validate(record)
        except ValidationError as exc:
            raise ValueError(f"not a valid traffic record, not logged: {summarize_error(exc)}") from None
        line = dump_record(rec.model_dump(mode="json"))
        day = rec.timestamp.astimezone(UTC).date().isoformat()
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

    def health(self) -> dict:
        """Cumulative figures for the service's metrics: records and files written, records refused or dropped,
        failed flushes, records waiting."""
        with self._lock:
            return {"records": self.stats["records"], "dropped": self.stats["dropped"],
                    "flush_errors": self.stats["flush_errors"], "pending": len(self._buffer)}
