"""Calibration-data refresh: a window of logged traffic -> versioned calibration, QAT-training, selection and
evaluation sets.

One streaming pass; memory holds per split and intent at most one split's worth of rows (the calibration split's
candidates whole, until the LLM's conversations are chosen from them):

  read (folder or s3://, gzip or plain) -> validate (invalid lines counted and quarantined with the reason)
  -> keep the window -> scrub personal data -> drop repeated requests and repeated texts
  -> assign each conversation to one split by a seeded hash (no conversation, and no text, in two splits; the
     `replay` share of conversations goes into none: the replay review's traffic)
  -> per split and intent keep the lowest-priority rows (seeded hash: independent of file order); the
     calibration split's conversations are held whole until the LLM's conversations are chosen from them
  -> allocate per-intent quotas (traffic share with a floor for rare intents), reserving room for edge cases
  -> write the splits with a content hash; the version is the window plus that hash.

The selection and evaluation splits hold only human-reviewed turns: metrics are measured against people, not
against the model that served the traffic. Candidates are ranked and searched on the selection split; the
evaluation split judges the one picked, so no decision is tuned on the rows that judge it. Training rows use the reviewed label where there is one, else the served one.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import logging
import math
import os
import tempfile
from collections import Counter, defaultdict
from datetime import UTC, date, timedelta
from pathlib import Path

from qat_tasks.core import storage
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.schema import INTENTS, ReviewLabel, parse_line, reason_category
from qat_tasks.data.calibration_set import (
    MANIFEST_SCHEMA,
    EmptyWindowError,
    IntentCoverageError,
    InvalidTrafficError,
    RefreshResult,
)
from qat_tasks.data.labels import read_labels
from qat_tasks.data.pii import scrub
from qat_tasks.data.sampling import (
    JUDGED_SPLITS,
    REPLAY,
    SPLITS,
    is_non_english,
    normalize,
    seed_key,
    seeded_priority,
    splitter,
)

log = logging.getLogger(__name__)

_QUARANTINE_RAW_CHARS = 8000


def allocate(n: int, available: dict[str, int], floor: int) -> dict[str, int]:
    """Per-intent quotas summing to at most n: traffic share, but every intent gets `floor` if it has it."""
    if sum(available.values()) <= n:
        return dict(available)
    quota = {k: min(a, floor) for k, a in available.items()}
    if sum(quota.values()) > n:  # floors alone exceed the split: share n evenly
        quota = dict.fromkeys(available, 0)
        for k in sorted(available, key=lambda k: available[k]):
            quota[k] = min(available[k], (n - sum(quota.values())) // max(1, sum(1 for v in quota.values() if v == 0)))
        return quota
    while (remaining := n - sum(quota.values())) > 0:
        open_ = {k: available[k] for k in available if available[k] > quota[k]}
        if not open_:
            break
        total = sum(open_.values())
        shares = {k: remaining * a / total for k, a in open_.items()}
        adds = {k: min(available[k] - quota[k], math.floor(s)) for k, s in shares.items()}
        if not any(adds.values()):  # hand out the last few by largest share
            k = max(open_, key=lambda k: (shares[k], k))
            adds = {k: 1}
        for k, a in adds.items():
            quota[k] += a
    return quota


class _Reservoir:
    """Bottom-k by priority: keeps the k rows with the lowest seeded hash."""

    __slots__ = ("k", "heap", "seen")

    def __init__(self, k: int):
        self.k, self.heap, self.seen = k, [], 0

    def offer(self, prio: int, rid: str, row: dict) -> None:
        self.seen += 1
        item = (-prio, rid, row)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif item > self.heap[0]:
            heapq.heapreplace(self.heap, item)

    def lowest(self, n: int) -> list[dict]:
        return [row for _, _, row in sorted(self.heap, reverse=True)[:n]]


def _listing(root: str, start: date, end: date, endpoint: str | None, required: bool) -> list:
    """The log files of a root; a root other than traffic.source may not exist yet (no service has logged)."""
    try:
        return storage.list_log_files(root, start, end, endpoint)
    except FileNotFoundError:
        if required:
            raise
        return []


def refresh(cfg: PipelineConfig, start: date, end: date, *, progress: bool = True) -> RefreshResult:
    cal = cfg.calibration
    source = cfg.traffic_source
    endpoint = cfg.traffic.s3_endpoint_url
    key = seed_key(cal.seed)
    edge_cfg = cal.edge_cases
    sizes = {s: getattr(cal.sizes, s) for s in SPLITS}
    split_of = splitter(cfg)

    roots = cfg.traffic_roots
    files = [lf for root in roots for lf in _listing(root, start, end, endpoint, root == source) if not lf.is_labels]
    if not files:
        raise EmptyWindowError(f"no traffic logs under {' or '.join(roots)} for the window [{start}, {end}): expected "
                               f"dt=YYYY-MM-DD/*.jsonl[.gz] partitions. Check traffic.source and the window.")
    log.info("refreshing calibration data from %d log file(s) under %s, window [%s, %s)", len(files), " and ".join(roots),
             start, end)
    lookahead = end + timedelta(days=cal.label_lookahead_days)
    label_stats: Counter = Counter()
    labels, bad_labels = read_labels(roots, start, lookahead, endpoint, label_stats)
    joined: set[str] = set()
    late = 0

    stats: Counter = Counter()
    reasons: Counter = Counter()
    pii: Counter = Counter()
    traffic_intents: Counter = Counter()
    eligible: dict[str, Counter] = {s: Counter() for s in SPLITS}
    reservoirs: dict[tuple[str, str, bool], _Reservoir] = {}
    conversations: dict[str, list[tuple[int, str, str, int]]] = defaultdict(list)
    calibration_rows: list[tuple[int, str, dict, int]] = []  # the encoders' candidates, after the LLM's pick
    seen_requests: set[int] = set()
    seen_texts: set[int] = set()  # normalised texts as logged, before scrubbing: a repeat is not scrubbed again
    pii_of_text: dict[int, Counter] = {}  # what scrubbing found in a text, counted again for each repeat
    text_owner: dict[int, str] = {}  # normalised text -> the split that holds it: no text in two sets

    qfile = tempfile.NamedTemporaryFile(prefix="quarantine-", suffix=".jsonl.gz", delete=False)  # noqa: SIM115
    quarantine = gzip.GzipFile(fileobj=qfile, mode="wb", mtime=0)

    def quarantine_line(uri: str, lineno: int, reason: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\n")[:_QUARANTINE_RAW_CHARS]
        # The quarantine keeps the evidence, minus personal data.
        quarantine.write((json.dumps({"source": uri, "line": lineno, "reason": reason, "raw": scrub(text)},
                                     ensure_ascii=False) + "\n").encode())

    for uri, lineno, reason, raw in bad_labels:  # counted in the manifest's labels block, kept as evidence
        quarantine_line(uri, lineno, f"review label: {reason}", raw)

    iterator = files
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(files, desc="refresh", unit="file", mininterval=5)
        iterator = bar
    try:
        for lf in iterator:
            for lineno, raw in enumerate(storage.open_lines(lf.uri, endpoint), 1):
                stats["lines"] += 1
                if not raw.strip():
                    stats["blank_lines"] += 1
                    continue
                rec, reason = parse_line(raw)
                if rec is None or isinstance(rec, ReviewLabel):
                    if rec is not None:  # labels are read from labels-* files only, before the turns
                        reason = "event: a review label outside a labels-* file (write labels with import-labels)"
                    stats["invalid"] += 1
                    reasons[reason_category(reason)] += 1
                    quarantine_line(lf.uri, lineno, reason, raw)
                    continue
                stats["valid"] += 1
                day = rec.timestamp.date()
                if not (start <= day < end):
                    stats["out_of_window"] += 1
                    continue
                if rec.event == "shadow_inference":  # the same turn, answered by a shadow model: not traffic
                    stats["shadow_records"] += 1
                    continue
                rid = hash(rec.request_id)
                if rid in seen_requests:
                    stats["duplicate_requests"] += 1
                    continue
                seen_requests.add(rid)
                review = labels.get(rec.request_id)
                if review is not None:
                    joined.add(rec.request_id)
                    late += review.reviewed_at.astimezone(UTC).date() >= end
                reviewed = review.reviewed_label if review is not None else rec.reviewed_label
                stats["reviewed_inline"] += review is None and rec.reviewed_label is not None
                label = reviewed or rec.intent
                traffic_intents[label] += 1
                split = split_of(rec.conversation_id)
                if split == REPLAY:  # the replay review's conversations: in no calibration version
                    stats["replay_turns_held_out"] += 1
                    continue
                raw_norm = hash(normalize(rec.text))
                repeated = raw_norm in seen_texts  # as typed before: scrubbed, the same text again
                if repeated:
                    pii.update(pii_of_text.get(raw_norm, ()))
                    if split != "calibration":
                        stats["duplicate_texts"] += 1
                        continue
                seen_texts.add(raw_norm)
                # A repeated text is scrubbed again only for the LLM's whole conversations (counted above).
                found: Counter = Counter()
                text = scrub(rec.text, None if repeated else found)
                if found:
                    pii.update(found)
                    pii_of_text[raw_norm] = found
                norm = raw_norm if text == rec.text else hash(normalize(text))
                first = not repeated and norm not in text_owner
                owner = text_owner.setdefault(norm, split)
                if split == "calibration":
                    if owner == "calibration":  # whole conversations for the LLM, minus texts another set holds
                        conversations[rec.conversation_id].append((rec.turn, text, label, norm))
                    else:
                        stats["llm_turns_held_elsewhere"] += 1
                if not first:
                    stats["duplicate_texts"] += 1
                    continue
                if split in JUDGED_SPLITS and reviewed is None:
                    stats[f"{split}_unreviewed_skipped"] += 1
                    continue
                edge = []
                if rec.confidence < edge_cfg.low_confidence_below:
                    edge.append("low_confidence")
                if len(text) > edge_cfg.long_text_chars:
                    edge.append("long")
                non_en = is_non_english(text, rec.locale)
                if non_en and edge_cfg.non_english:
                    edge.append("non_english")
                row = {
                    "request_id": rec.request_id, "conversation_id": rec.conversation_id, "turn": rec.turn,
                    "timestamp": rec.timestamp.isoformat(), "text": text, "label": label,
                    "label_source": "reviewed" if reviewed else "served_model",
                    "served_intent": rec.intent, "confidence": rec.confidence,
                    "language": "other" if non_en else "en", "edge": edge,
                }
                prio = seeded_priority(key, rec.request_id)
                if split == "calibration":
                    calibration_rows.append((prio, rec.request_id, row, norm))
                    continue
                eligible[split][label] += 1
                _offer(reservoirs, (split, label, bool(edge)), sizes[split], prio, rec.request_id, row)
            if bar is not None:
                bar.set_postfix(lines=stats["lines"], invalid=stats["invalid"], refresh=False)
    finally:
        quarantine.close()
        qfile.close()
        if bar is not None:
            bar.close()

    label_report = {"records": labels.records, "joined": len(joined), "late": late,
                    "conflicting": sum(len(labels.seen[r]) > 1 for r in joined),
                    "orphaned": len(labels.latest) - len(joined), "lookahead_days": cal.label_lookahead_days,
                    "files": label_stats["label_files"], "invalid": len(bad_labels)}
    try:
        warnings: list[str] = []
        # Both calibration sets come from the calibration split: a small one is shared half and half at most.
        n_llm = min(cal.llm_conversations, len(conversations) // 2)
        if n_llm < cal.llm_conversations:
            warnings.append(f"llm_conversations: {n_llm} of the calibration split's {len(conversations)} "
                            f"conversations go to the LLM (fewer than the {cal.llm_conversations} asked for), so "
                            f"that the encoders' calibration rows keep the other half")
        llm_rows = _select_conversations(conversations, n_llm, cal.seed, warnings)
        _calibration_after_llm(calibration_rows, llm_rows, conversations, eligible, reservoirs, sizes, stats)
        return _finish(cfg, start, end, source, stats, reasons, pii, traffic_intents, eligible, reservoirs,
                       llm_rows, warnings, Path(qfile.name), {**label_report, "sources": roots})
    finally:
        os.unlink(qfile.name)


def _offer(reservoirs: dict, res_key: tuple[str, str, bool], k: int, prio: int, rid: str, row: dict) -> None:
    if res_key not in reservoirs:
        reservoirs[res_key] = _Reservoir(k)
    reservoirs[res_key].offer(prio, rid, row)


def _calibration_after_llm(calibration_rows, llm_rows, conversations, eligible, reservoirs, sizes, stats) -> None:
    """The encoders' calibration candidates, minus the LLM's conversations and every text they hold: the two
    calibration sets share no conversation and no text. The LLM set is chosen first, since it needs whole
    conversations covering every intent; the encoders need rows, and the calibration split has many more."""
    llm_ids = {c["conversation_id"] for c in llm_rows}
    llm_texts = {norm for cid in llm_ids for *_, norm in conversations[cid]}
    for prio, rid, row, norm in calibration_rows:
        if row["conversation_id"] in llm_ids or norm in llm_texts:
            stats["calibration_rows_left_to_llm"] += 1
            continue
        eligible["calibration"][row["label"]] += 1
        _offer(reservoirs, ("calibration", row["label"], bool(row["edge"])), sizes["calibration"], prio, rid, row)


def _finish(cfg, start, end, source, stats, reasons, pii, traffic_intents, eligible, reservoirs, llm_rows,
            warnings: list[str], quarantine_path: Path, label_report: dict) -> RefreshResult:
    cal = cfg.calibration
    store = cfg.calibration_store
    endpoint = cfg.traffic.s3_endpoint_url
    window = f"{start:%Y%m%d}-{end:%Y%m%d}"

    # The quarantine is written before any check can fail, so a failed run still leaves its evidence.
    quarantine_uri = storage.join(store, "quarantine", f"{window}.jsonl.gz")
    storage.write_bytes(quarantine_uri, quarantine_path.read_bytes(), endpoint)

    considered = stats["valid"] + stats["invalid"]
    if stats["valid"] == 0 or stats["valid"] == stats["out_of_window"]:
        raise EmptyWindowError(
            f"the window [{start}, {end}) under {source} holds no valid record in the window "
            f"({stats['lines']} line(s) read, {stats['invalid']} invalid, {stats['out_of_window']} out of window). "
            f"Quarantined lines: {quarantine_uri}")
    invalid_fraction = stats["invalid"] / considered
    if invalid_fraction > cfg.traffic.max_invalid_fraction:
        top = ", ".join(f"{k} {v}" for k, v in reasons.most_common(5))
        raise InvalidTrafficError(
            f"{stats['invalid']:,} of {considered:,} log lines ({invalid_fraction:.1%}) in [{start}, {end}) are invalid, "
            f"above the limit of {cfg.traffic.max_invalid_fraction:.1%} (traffic.max_invalid_fraction). "
            f"Top reasons: {top}. Quarantined lines with reasons: {quarantine_uri}")
    if stats["invalid"]:
        log.warning("quarantined %d invalid line(s) (%.2f%%): %s -> %s", stats["invalid"], 100 * invalid_fraction,
                    dict(reasons.most_common()), quarantine_uri)

    missing = [i for i in INTENTS if traffic_intents[i] == 0]
    if missing:
        _coverage(f"intent(s) {missing} have no traffic in [{start}, {end}): the quantized models would be "
                  f"calibrated and judged without them", "on_missing_intent", cal.on_missing_intent, warnings)

    labelled = (f"{label_report['joined']} review label(s) joined, {stats['reviewed_inline']} reviewed in the logs; "
                f"import labels with qat-tasks import-labels")
    notes = {"judged": f" (selection and evaluation take reviewed turns only: {labelled})",
             "other": f" (turns without a review carry the served model's label: {labelled})"}
    splits: dict[str, list[dict]] = {}
    split_meta: dict[str, dict] = {}
    for split in SPLITS:
        n = getattr(cal.sizes, split)
        quota = allocate(n, dict(eligible[split]), cal.min_per_intent)
        rows: list[dict] = []
        for intent, q in quota.items():
            edge_r = reservoirs.get((split, intent, True))
            plain_r = reservoirs.get((split, intent, False))
            edge_rows = edge_r.lowest(q) if edge_r else []
            plain_rows = plain_r.lowest(q) if plain_r else []
            n_edge = min(len(edge_rows), math.ceil(cal.edge_cases.reserve_fraction * q))
            take_plain = min(len(plain_rows), q - n_edge)
            n_edge = min(len(edge_rows), q - take_plain)  # fill from edge cases when plain rows run short
            rows.extend(edge_rows[:n_edge] + plain_rows[:take_plain])
        short = {i: eligible[split][i] for i in INTENTS if eligible[split][i] < cal.min_per_intent}
        if short:
            _coverage(f"{split}: intent(s) under-represented (fewer than calibration.min_per_intent="
                      f"{cal.min_per_intent} rows available): {short}"
                      + notes["judged" if split in JUDGED_SPLITS else "other"], "on_underrepresented_intent",
                      cal.on_underrepresented_intent, warnings)
        if len(rows) < n:
            warnings.append(f"{split}: {len(rows)} rows available, fewer than the {n} asked for")
        rows.sort(key=lambda r: r["request_id"])
        splits[split] = rows
        split_meta[split] = {
            "rows": len(rows), "requested": n, "per_intent": dict(Counter(r["label"] for r in rows)),
            "eligible_per_intent": dict(eligible[split]),
            "edge_cases": dict(Counter(e for r in rows for e in r["edge"])),
            "label_sources": dict(Counter(r["label_source"] for r in rows)),
            "languages": dict(Counter(r["language"] for r in rows)),
        }

    payloads = {s: "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
                for s, rows in splits.items()}
    payloads["llm_conversations"] = "".join(json.dumps(c, ensure_ascii=False, sort_keys=True) + "\n" for c in llm_rows)
    digests = {name: hashlib.sha256(body.encode()).hexdigest() for name, body in payloads.items()}
    content = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    version = f"{window}-{content[:12]}"
    uri = storage.join(store, version)

    manifest = {
        "schema": MANIFEST_SCHEMA, "version": version, "content_sha256": content,
        "window": {"start": start.isoformat(), "end": end.isoformat()}, "source": source, "seed": cal.seed,
        "settings": cal.model_dump(mode="json"),
        "input": {**{k: stats[k] for k in ("lines", "valid", "invalid", "blank_lines", "out_of_window",
                                             "duplicate_requests", "duplicate_texts", "selection_unreviewed_skipped",
                                             "evaluation_unreviewed_skipped", "replay_turns_held_out",
                                             "shadow_records")},
                  "invalid_fraction": round(invalid_fraction, 6), "invalid_reasons": dict(reasons),
                  "pii_scrubbed": dict(pii), "quarantine": quarantine_uri,
                  "reviewed_inline": stats["reviewed_inline"], "llm_turns_held_elsewhere": stats["llm_turns_held_elsewhere"],
                  "calibration_rows_left_to_llm": stats["calibration_rows_left_to_llm"]},
        "sources": label_report.pop("sources"), "labels": label_report,
        "traffic_intents": {i: traffic_intents[i] for i in INTENTS},
        "splits": {s: {**split_meta[s], "file": f"{s}.jsonl.gz", "sha256": digests[s]} for s in SPLITS},
        "llm_conversations": {"conversations": len(llm_rows), "turns": sum(len(c["turns"]) for c in llm_rows),
                              "intents_covered": sorted({t["label"] for c in llm_rows for t in c["turns"]}),
                              "file": "llm_conversations.jsonl.gz", "sha256": digests["llm_conversations"]},
        "warnings": warnings,
    }
    manifest_uri = storage.join(uri, "manifest.json")
    if storage.exists(manifest_uri, endpoint):
        log.info("calibration version %s already written at %s: reusing it", version, uri)
    else:
        for name, body in payloads.items():
            storage.write_bytes(storage.join(uri, f"{name}.jsonl.gz"), storage.gzip_bytes(body), endpoint)
        storage.write_bytes(storage.join(uri, "quarantine.jsonl.gz"), quarantine_path.read_bytes(), endpoint)
        # The manifest goes last: its presence means the version is complete.
        storage.write_bytes(manifest_uri, json.dumps(manifest, indent=2, sort_keys=True).encode(), endpoint)
    log.info("calibration version %s: %s rows (calibration / qat_train / selection / evaluation), %d LLM conversations -> %s",
             version, " / ".join(str(len(splits[s])) for s in SPLITS), len(llm_rows), uri)
    return RefreshResult(version=version, uri=uri, manifest=manifest)


def _coverage(msg: str, key: str, policy: str, warnings: list[str]) -> None:
    """Fail or warn, as `calibration.<key>` says, about an intent the window does not cover well enough."""
    if policy == "fail":
        raise IntentCoverageError(f"{msg} (calibration.{key}: fail)")
    warnings.append(msg)
    log.warning(msg)


def _select_conversations(conversations: dict, n: int, seed: int, warnings: list[str]) -> list[dict]:
    """n whole conversations from the calibration split, covering every intent, for LLM calibration."""
    key = seed_key(seed)
    by_intent: dict[str, list[str]] = defaultdict(list)
    for cid, turns in conversations.items():
        for intent in {lbl for _, _, lbl, _ in turns}:
            by_intent[intent].append(cid)
    for cids in by_intent.values():
        cids.sort(key=lambda c: seeded_priority(key, c))
    chosen: list[str] = []
    taken: set[str] = set()
    # Round-robin over intents, rarest first, so every intent is represented before common ones fill up.
    order = sorted(by_intent, key=lambda i: (len(by_intent[i]), i))
    pos = dict.fromkeys(order, 0)
    while len(chosen) < n and any(pos[i] < len(by_intent[i]) for i in order):
        for intent in order:
            while pos[intent] < len(by_intent[intent]) and by_intent[intent][pos[intent]] in taken:
                pos[intent] += 1
            if pos[intent] < len(by_intent[intent]) and len(chosen) < n:
                cid = by_intent[intent][pos[intent]]
                chosen.append(cid)
                taken.add(cid)
    if len(chosen) < n:
        warnings.append(f"llm_conversations: only {len(chosen)} conversations available, fewer than {n}")
    missing = [i for i in INTENTS if i not in by_intent]
    if missing:
        warnings.append(f"llm_conversations: no conversation covers {missing}")
    return [{"conversation_id": cid,
             "turns": [{"turn": t, "text": x, "label": lbl} for t, x, lbl, _ in sorted(conversations[cid])]}
            for cid in sorted(chosen)]


