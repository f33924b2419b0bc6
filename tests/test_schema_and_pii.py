import json
from collections import Counter

import pytest

from qat_tasks.core.schema import parse_line, reason_category
from qat_tasks.data.pii import scrub

GOOD = {"schema_version": 1, "event": "quantized_inference", "request_id": "r-1", "conversation_id": "c-1", "turn": 0,
        "timestamp": "2026-07-01T10:00:00.000Z", "model": "intent-distilbert-int8-v02", "runtime": "onnxruntime",
        "text": "where is my order MA-2026-104233", "intent": "order_status", "confidence": 0.91, "latency_ms": 6.7,
        "reviewed_label": None, "locale": "en-US"}


def test_valid_record_parses():
    rec, reason = parse_line(json.dumps(GOOD))
    assert reason is None and rec.intent == "order_status" and rec.timestamp.tzinfo is not None


@pytest.mark.parametrize("mutate,category", [
    (lambda d: d.update(confidence="0.91"), "wrong_type:confidence"),
    (lambda d: d.update(turn="1"), "wrong_type:turn"),
    (lambda d: d.update(timestamp=20260701), "wrong_type:timestamp"),
    (lambda d: d.pop("text"), "missing:text"),
    (lambda d: d.update(text="   "), "invalid:text"),
    (lambda d: d.update(intent="weather"), "unknown_intent:intent"),
    (lambda d: d.update(reviewed_label="refund"), "unknown_intent:reviewed_label"),
    (lambda d: d.update(timestamp="2026-07-01T10:00:00"), "invalid:timestamp"),
    (lambda d: d.update(confidence=1.7), "invalid:confidence"),
    (lambda d: d.update(schema_version=4), "invalid:schema_version"),
    (lambda d: d.update(user_email="a@b.co"), "unexpected_field"),
])
def test_invalid_records_get_a_reason(mutate, category):
    d = dict(GOOD)
    mutate(d)
    rec, reason = parse_line(json.dumps(d))
    assert rec is None
    assert reason_category(reason) == category, reason


@pytest.mark.parametrize("line", ['{"schema_version": 1, "event": ', "not json at all", "[1, 2, 3]", ""])
def test_malformed_lines(line):
    rec, reason = parse_line(line)
    assert rec is None and reason


@pytest.mark.parametrize("text,kind", [
    ("my email is jane.doe+manga@gmail.com pls", "EMAIL"),
    ("call me at (415) 555-0134", "PHONE"),
    ("or +81 90-1234-5678 after 6", "PHONE"),
    ("my number is 415.555.0199", "PHONE"),
    ("ship to 1234 Maple Street, Apt 5, Springfield, IL 62704 thanks", "ADDRESS"),
    ("ship to 7181 pine road, sprinfield, il 62704 instead", "ADDRESS"),
    ("card 4111 1111 1111 1111 declined", "CARD"),
])
def test_personal_data_is_scrubbed(text, kind):
    counts = Counter()
    out = scrub(text, counts)
    assert f"[{kind}]" in out and counts[kind] >= 1
    assert not any(ch.isdigit() for ch in out.split(f"[{kind}]")[0][-3:])


@pytest.mark.parametrize("text", ["order MA-2026-104233 hasn't arrived", "where is #48213977", "One Piece vol. 105 and 106",
                                  "I need volumes 3 to 8 of Sakamoto Days", "is there free shipping over $50",
                                  "I get error E404 at checkout"])
def test_slot_values_survive(text):
    assert scrub(text) == text
