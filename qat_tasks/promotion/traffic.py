"""Where each served model's answers are logged, and reading them back for its shadow review.

The intent classifier logs in the traffic store's own partitions (`<root>/dt=YYYY-MM-DD/`): its turns are the
calibration source that the refresh, the drift monitor and the label join read. The escalation detector and the
reranker log in a folder of their own below it (`<root>/<model name>/dt=YYYY-MM-DD/`), which those readers never
list, so their records can never be taken for intent turns.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from qat_tasks.core import storage
from qat_tasks.core.schema import INTENT_ROLE, ReviewLabel, parse_line, reason_category


def log_root(base: str, model_name: str, role: str) -> str:
    """The folder (or s3 prefix) a model's answers are logged under, given the service's log root."""
    return base if role == INTENT_ROLE else storage.join(base, model_name)


def read_role_records(root: str, start: datetime, end: datetime, role: str, endpoint_url: str | None = None
                      ) -> tuple[list, Counter]:
    """Valid records of `role` with timestamp in [start, end) under `root`, in file order; a missing folder (no
    service has logged that model yet) reads as empty. Stats as traffic_log.read_records counts them."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("read_role_records needs timezone-aware start and end: log timestamps are UTC")
    stats: Counter = Counter()
    last_day = (end.astimezone(UTC) - timedelta(microseconds=1)).date()
    try:
        files = storage.list_log_files(root, start.astimezone(UTC).date(), last_day + timedelta(days=1), endpoint_url)
    except FileNotFoundError:
        return [], stats
    out = []
    for lf in files:
        if lf.is_labels:
            continue
        stats["files"] += 1
        for raw in storage.open_lines(lf.uri, endpoint_url):
            if not raw.strip():
                continue
            rec, reason = parse_line(raw, roles=(role,))
            if rec is None:
                stats["invalid"] += 1
                stats[f"invalid:{reason_category(reason)}"] += 1
            elif isinstance(rec, ReviewLabel):
                stats["labels"] += 1
            elif not (start <= rec.timestamp < end):
                stats["outside_window"] += 1
            else:
                stats["valid"] += 1
                out.append(rec)
    return out, stats
