"""Personal data never lands in storage: the scrubber's coverage, the slot values it must leave alone, and a
corpus of planted values sent through the serving component and written by an older service (in valid and in
invalid lines), none of which may appear in any file the service or the refresh writes: service logs, splits,
quarantine, manifest, MLflow artifacts and the tracking database."""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat

from qat_tasks.data.pii import REGIONS, scrub


def _phones() -> list[str]:
    """Valid numbers of every market, as libphonenumber formats them (national, international, E.164)."""
    out = []
    for region in REGIONS:
        for kind in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE):
            number = phonenumbers.example_number_for_type(region, kind)
            out += [phonenumbers.format_number(number, f) for f in
                    (PhoneNumberFormat.NATIONAL, PhoneNumberFormat.INTERNATIONAL, PhoneNumberFormat.E164)]
    return out + ["0044 20 7946 0958", "(415) 555-0134", "415.555.0199", "+81 90-1234-5678", "06 12 34 56 78"]


PLANTED: dict[str, list[str]] = {
    "PHONE": _phones(),
    "EMAIL": ["planted.one+manga@gmail.com", "planted.two at yahoo dot co dot jp", "planted3(at)outlook(dot)com",
              "planted_four [at] proton [dot] me", "ｐｌａｎｔｅｄ５＠ｉｃｌｏｕｄ．ｃｏｍ", "planted.six @ gmail . com"],
    "CARD": ["4111 1111 1111 1111", "4012-8888-8888-1881", "4111.1111.1111.1111", "5555555555554444",
             "3782 822463 10005", "371449635398431", "6011 1111 1111 1117", "3530 1113 3330 0000",
             "４２４２　４２４２　４２４２　４２４２"],
    "SSN": ["123-45-6789", "078 05 1120"],
    "IBAN": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "FR14 2004 1010 0505 0001 3M02 606"],
    "IP": ["192.168.1.24", "203.0.113.7", "2001:db8:85a3::8a2e:370:7334", "fe80::1"],
    "ADDRESS": ["12B Baker Street, London", "221b baker st", "1234 Maple Street, Apt 5, Springfield, IL 62704",
                "P.O. Box 4521", "Postfach 12 34 56", "Hauptstraße 5, 10115 Berlin", "Musterstr. 12a",
                "12 rue de la Paix, 75002 Paris", "SW1A 1AA", "〒150-0002 東京都渋谷区", "5-12 Oak Avenue"],
}
VALUES = [(kind, v) for kind, vs in PLANTED.items() for v in vs]
SLOTS = ["order MA-2026-104233 hasn't arrived", "refund for ma-2026-33083728 pls", "where is #48213977", "One Piece vol. 105 and 106",
         "Kaiju No. 8 volume 12 is $10.99", "I need volumes 3 to 8 of Sakamoto Days", "is there free shipping over $50",
         "I get error E404 at checkout", "2 box sets of Berserk at 89.99 each", "Chainsaw Man vol 17 arrives 2026-10-05?",
         "I'm at home, ordered 3 volumes", "deliver before 10/12/2026", "ships in 2-4 days",
         "Frieren volume 11, paperback, ships in 2-4 days", "is the Blue Lock v2 3rd edition out?"]


def test_the_corpus_covers_every_kind_with_at_least_60_values():
    assert len(VALUES) >= 60 and set(PLANTED) == {"PHONE", "EMAIL", "CARD", "SSN", "IBAN", "IP", "ADDRESS"}


@pytest.mark.parametrize("kind,value", VALUES)
def test_every_planted_value_is_scrubbed_by_kind(kind, value):
    counts: Counter = Counter()
    out = scrub(f"hi, {value} thanks", counts)
    assert value not in out and counts[kind] >= 1, out
    # Only the value goes (an address may take the words after its town with it: the safe failure)
    assert out.startswith("hi, ") and (kind == "ADDRESS" or out.endswith(" thanks")), out


@pytest.mark.parametrize("text", SLOTS)
def test_the_slot_values_the_models_need_survive(text):
    assert scrub(text) == text


def test_order_numbers_stay_while_a_card_beside_them_goes():
    assert scrub("order MA-2026-104233 paid with 4111 1111 1111 1111") == "order MA-2026-104233 paid with [CARD]"
    assert scrub("item 41111111111111122") == "item 41111111111111122"  # 17 digits in no card's groups, fails Luhn
    assert scrub("card 4111 1111 1111 1112") == "card [CARD]"  # a mistyped card still carries the card


def _files(root: Path):
    for f in root.rglob("*"):
        if f.is_file():
            raw = f.read_bytes()
            yield f, (gzip.decompress(raw) if f.suffix == ".gz" else raw).decode("utf-8", "replace")


def test_no_planted_value_reaches_any_file_the_service_or_the_refresh_writes(intent_registry, tmp_path):
    from qat_tasks.core.tracking import RunContext
    from qat_tasks.data.refresh_run import refresh_tracked
    from qat_tasks.serving.app import IntentRequest
    from qat_tasks.serving.service import Service

    reg = intent_registry
    old_writer = tmp_path / "older-service"  # logs of a service that did not scrub: the refresh scrubs them
    base = reg["cfg"]
    cfg = base.model_copy(update={
        "traffic": base.traffic.model_copy(update={"source": str(old_writer), "max_invalid_fraction": 1.0}),
        "calibration": base.calibration.model_copy(update={
            "output": str(tmp_path / "calibration"), "on_missing_intent": "warn",
            "on_underrepresented_intent": "warn", "min_per_intent": 1})})
    now = datetime.now(UTC)
    service = Service(cfg, "intent-classifier")
    try:
        for i, (_, value) in enumerate(VALUES):
            service.answer(IntentRequest(text=f"please help, {value} is mine", request_id=f"svc-{i}",
                                         conversation_id=f"conv-svc-{i}"))
        deadline = time.monotonic() + 60
        while service.mirror.counts.snapshot()["answered"] < len(VALUES) and time.monotonic() < deadline:
            time.sleep(0.2)  # the shadow's answers are logged too
    finally:
        service.close()
    day = old_writer / f"dt={now.date()}"
    day.mkdir(parents=True)
    lines = []
    for i, (_, value) in enumerate(VALUES):
        rec = {"schema_version": 1, "event": "inference", "request_id": f"old-{i}", "conversation_id": f"conv-old-{i}",
               "turn": 0, "timestamp": now.isoformat().replace("+00:00", "Z"), "model": "older/v1",
               "runtime": "onnxruntime", "text": f"my details: {value}", "intent": "account_help",
               "confidence": 0.8, "latency_ms": 5.0, "reviewed_label": "account_help" if i % 2 else None}
        lines.append(json.dumps(rec, ensure_ascii=False))
        lines.append(json.dumps({**rec, "request_id": f"bad-{i}", "intent": "not_an_intent"}, ensure_ascii=False))
        lines.append(f'{{"text": "{value}", broken')  # malformed: quarantined with its raw text
    (day / "older-1.jsonl").write_text("\n".join(lines) + "\n")

    ctx = RunContext("quarterly_recalibration", "pii-test", "test: planted personal data", "test")
    out = refresh_tracked(cfg, now.date(), now.date() + timedelta(days=1), ctx, progress=False)
    cal_dir = Path(out["uri"])
    manifest = json.loads((cal_dir / "manifest.json").read_text())
    assert manifest["input"]["invalid"] == 2 * len(VALUES)
    # The older service's values, scrubbed by the refresh (all but those of replay conversations, which it never
    # reads); the service scrubbed its own before logging them
    from qat_tasks.data.sampling import REPLAY, split_of

    held_out = {i for i in range(len(VALUES)) if split_of(cfg, f"conv-old-{i}") == REPLAY}
    assert held_out and manifest["input"]["replay_turns_held_out"] >= len(held_out)  # the service's logs too
    assert manifest["input"]["pii_scrubbed"] == dict(Counter(k for i, (k, _) in enumerate(VALUES) if i not in held_out))
    # The replay review reads those conversations; what it logs is scrubbed as the service's log is.
    from qat_tasks.data.traffic_log import read_records
    from qat_tasks.serving import replay

    older, _ = read_records(str(old_writer), now - timedelta(days=1), now + timedelta(days=1))
    replay.replay(cfg, "intent-classifier", older, str(tmp_path / "replayed"), progress=False)
    logged = [json.loads(line) for f in reg["log_dir"].rglob("*.jsonl") for line in f.read_text().splitlines()]
    served = [r for r in logged if r["event"] != "shadow_inference"]
    assert len(served) == len(VALUES) and all(r["pii_scrubbed"] for r in served)
    assert sum(Counter(r["pii_scrubbed"]).total() for r in served) >= len(VALUES)

    written = [reg["log_dir"], tmp_path / "calibration", tmp_path / "mlflow", tmp_path / "replayed"]
    found: dict[str, list[str]] = {}
    scanned = 0
    for root in written:
        for f, text in _files(root):
            scanned += 1
            for kind, value in VALUES:
                if value in text:
                    found.setdefault(f"{kind} {value!r}", []).append(str(f.relative_to(tmp_path)))
    assert scanned > 10 and any(f.name == "quarantine.jsonl.gz" for f in cal_dir.iterdir())
    assert found == {}, f"personal data written to storage: {found}"
    print(f"\nplanted: {dict(Counter(kind for kind, _ in VALUES))} ({len(VALUES)} values, each in a served request, "
          f"a valid and an invalid line of an older writer and a malformed line); scrubbed by the refresh: "
          f"{manifest['input']['pii_scrubbed']}; {scanned} files scanned, none holds a planted value")
