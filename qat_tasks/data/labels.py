"""Reviewed labels, from people back into the data: importing a labelling tool's export as review-label records,
and joining them to the logged turns they label.

A labelling tool exports one row per reviewed turn; `qat-tasks import-labels FILE` validates it and writes the
rows as review-label records (traffic schema v2) into `labels-*` files of the traffic store, partitioned by the
day they were reviewed. Readers join them by request id: the latest review of a turn wins, a turn reviewed with
different labels counts as conflicting, and a label whose turn is not in the window read counts as orphaned.

The export: CSV with a header, or JSONL, with these columns (extra columns are refused, so a renamed column is
an error, not a silent gap):

  request_id      the turn's request id, as the service logged it
  reviewed_label  one of the ten intents (`label` is accepted for it too)
  reviewer        who or what reviewed it (a person's handle or a tool's name; personal data is scrubbed)
  reviewed_at     ISO 8601 with a time zone, e.g. 2026-10-03T14:05:00Z
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from pydantic import ValidationError

from qat_tasks.core import storage
from qat_tasks.core.schema import SCHEMA_VERSION, InferenceRecord, ReviewLabel, summarize_error
from qat_tasks.data.pii import scrub

log = logging.getLogger(__name__)

COLUMNS = ("request_id", "reviewed_label", "reviewer", "reviewed_at")


@dataclass
class LabelIndex:
    """The latest review per request id, with what the join found."""

    latest: dict[str, ReviewLabel] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=dict)  # request id -> every label given to it
    records: int = 0

    def add(self, label: ReviewLabel) -> None:
        self.records += 1
        rid = label.request_id
        self.seen.setdefault(rid, set()).add(label.reviewed_label)
        current = self.latest.get(rid)
        if current is None or label.reviewed_at >= current.reviewed_at:
            self.latest[rid] = label

    def get(self, request_id: str) -> ReviewLabel | None:
        return self.latest.get(request_id)

    @property
    def conflicting(self) -> int:
        """Turns reviewed with more than one label (the latest wins)."""
        return sum(len(v) > 1 for v in self.seen.values())

    def join(self, records: list[InferenceRecord]) -> tuple[list[InferenceRecord], Counter]:
        """`records` with each turn's latest reviewed label set; counts joined and orphaned labels."""
        out, joined = [], set()
        for rec in records:
            label = self.latest.get(rec.request_id)
            if label is not None and rec.event != "shadow_inference":
                joined.add(rec.request_id)
            if label is not None:
                rec = rec.model_copy(update={"reviewed_label": label.reviewed_label})
            out.append(rec)
        return out, Counter(labels=len(self.latest), joined=len(joined), orphaned=len(self.latest) - len(joined),
                            conflicting=self.conflicting)


def index(labels: list[ReviewLabel]) -> LabelIndex:
    idx = LabelIndex()
    for label in labels:
        idx.add(label)
    return idx


# -- import ---------------------------------------------------------------------------------------------------
def _rows(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, row, reason it cannot be read) for each row of a CSV or JSONL export."""
    text = path.read_text(encoding="utf-8-sig")
    out: list[tuple[int, dict | None, str | None]] = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                out.append((n, None, f"malformed JSON: {exc}"))
                continue
            out.append((n, row, None) if isinstance(row, dict) else (n, None, "not a JSON object"))
        return out
    reader = csv.DictReader(io.StringIO(text))
    for n, row in enumerate(reader, 2):  # line 1 is the header
        if None in row:
            out.append((n, None, f"{len(row[None])} value(s) beyond the header's columns"))
            continue
        out.append((n, {k: v for k, v in row.items() if k is not None}, None))
    return out


def _label_of(row: dict) -> ReviewLabel:
    row = dict(row)
    if "label" in row and "reviewed_label" not in row:
        row["reviewed_label"] = row.pop("label")
    reviewed_at = row.get("reviewed_at")
    if isinstance(reviewed_at, str):
        try:
            row["reviewed_at"] = datetime.fromisoformat(reviewed_at.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"reviewed_at: not an ISO 8601 time ({reviewed_at!r})") from None
    if isinstance(row.get("reviewer"), str):
        row["reviewer"] = scrub(row["reviewer"])
    return ReviewLabel.model_validate({"schema_version": SCHEMA_VERSION, "event": "review_label", **row})


def import_labels(path: str | Path, out_root: str, endpoint_url: str | None = None) -> dict:
    """Validate a labelling tool's export and write its rows as review-label records under `out_root`; rows that
    do not validate go, with their reason, to `<out_root>/quarantine/labels-<time>.jsonl`. Returns the counts."""
    from qat_tasks.data.traffic_log import LogWriter

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    stats: Counter = Counter()
    bad: list[dict] = []
    days: Counter = Counter()
    with LogWriter(out_root, endpoint_url, flush_records=10_000, flush_seconds=3600, prefix="labels") as writer:
        for n, row, reason in _rows(path):
            stats["rows"] += 1
            if row is not None:
                try:
                    label = _label_of(row)
                except (ValidationError, ValueError) as exc:
                    reason = summarize_error(exc) if isinstance(exc, ValidationError) else str(exc)
                else:
                    writer.write(label.model_dump())
                    stats["written"] += 1
                    days[label.reviewed_at.astimezone(UTC).date().isoformat()] += 1
                    continue
            stats["invalid"] += 1
            # The quarantine keeps the evidence, minus personal data.
            bad.append({"source": str(path), "line": n, "reason": reason,
                        "raw": scrub(json.dumps(row, ensure_ascii=False, default=str)) if row is not None else None})
    quarantine = None
    if bad:
        quarantine = storage.join(out_root, "quarantine", f"labels-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.jsonl")
        storage.write_bytes(quarantine, "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad).encode(),
                            endpoint_url)
        log.warning("%d of %d label rows refused (%s); quarantined with their reasons: %s", len(bad), stats["rows"],
                    "; ".join(sorted({b["reason"].split(";")[0] for b in bad})[:3]), quarantine)
    log.info("imported %d review labels from %s into %s (%d reviewed days)", stats["written"], path, out_root,
             len(days))
    return {"rows": stats["rows"], "written": stats["written"], "invalid": stats["invalid"], "quarantine": quarantine,
            "days": dict(sorted(days.items()))}


def read_labels(roots: list[str], start: date, end: date, endpoint_url: str | None = None,
                stats: Counter | None = None) -> tuple[LabelIndex, list[tuple[str, int, str, bytes]]]:
    """The review labels in the `labels-*` files of [start, end) under `roots`, and the lines that did not
    validate as (file, line number, reason, raw line)."""
    from qat_tasks.core.schema import parse_line

    idx, invalid = LabelIndex(), []
    stats = stats if stats is not None else Counter()
    for root in roots:
        try:
            files = storage.list_log_files(root, start, end, endpoint_url)
        except FileNotFoundError:
            continue
        for lf in files:
            if not lf.is_labels:
                continue
            stats["label_files"] += 1
            for n, raw in enumerate(storage.open_lines(lf.uri, endpoint_url), 1):
                if not raw.strip():
                    continue
                rec, reason = parse_line(raw)
                if not isinstance(rec, ReviewLabel):
                    invalid.append((lf.uri, n, reason or "a logged turn in a labels file", raw))
                    continue
                idx.add(rec)
    return idx, invalid
