"""The service's log writer: `traffic_log.LogWriter` (buffered, immutable flushes, a request never waits for
storage) for the records of every served role, each validated against its role's record class before buffering,
so the service never writes a line a reader would have to quarantine."""

from __future__ import annotations

from qat_tasks.core.schema import INTENT_ROLE, ROLE_RECORDS
from qat_tasks.data.traffic_log import LogWriter


class RecordWriter(LogWriter):
    """A LogWriter for intent, escalation and rerank records (told apart by `role`; none: an intent record)."""

    def record_class(self, record: dict):
        """The record class of the record's role; ValueError for a role the traffic schema does not know."""
        role = record.get("role", INTENT_ROLE)
        if role not in ROLE_RECORDS:
            raise ValueError(f"not a valid traffic record, not logged: role: unknown role {role!r}")
        return ROLE_RECORDS[role]

    def health(self) -> dict:
        """Cumulative figures for the service's metrics: records and files written, records refused or dropped,
        failed flushes, records waiting."""
        with self._lock:
            return {"records": self.stats["records"], "dropped": self.stats["dropped"],
                    "flush_errors": self.stats["flush_errors"], "pending": len(self._buffer)}
