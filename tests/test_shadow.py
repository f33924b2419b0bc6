"""Shadow review, promotion and rollback against a real SQLite MLflow registry (fixture intent_registry: v1 FP32
@champion, v2 INT8 @challenger/@shadow). Mirrored traffic is written as the service writes it: traffic-schema
records, a champion record and a shadow record per request."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from qat_tasks.core import registry
from qat_tasks.core.schema import INTENTS, InferenceRecord
from qat_tasks.core.tracking import RunContext
from qat_tasks.promotion import release, shadow
from qat_tasks.serving import replay


def ctx(run_id: str, reason: str = "test") -> RunContext:
    return RunContext(dag_id="test", run_id=run_id, reason=reason, trigger="test")


def mirrored(name: str, n: int, *, disagree: float = 0.0, unanswered: float = 0.0, reviewed: float = 0.5,
             champion_v="1", shadow_v="2", seed: int = 0) -> list[InferenceRecord]:
    """n requests answered by the champion (always right on reviewed rows) and mirrored to the shadow, which
    disagrees on a share of them and leaves a share unanswered."""
    rng = random.Random(seed)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        truth = INTENTS[i % len(INTENTS)]
        base = {"schema_version": 1, "request_id": f"req-{i}", "conversation_id": f"conv-{i}", "turn": 0,
                "timestamp": t0 + timedelta(seconds=i), "runtime": "onnxruntime", "text": f"message {i}",
                "reviewed_label": truth if rng.random() < reviewed else None}
        out.append(InferenceRecord(**base, event="inference", model=f"{name}/v{champion_v}", intent=truth,
                                   confidence=0.9, latency_ms=6.0 + rng.random()))
        if rng.random() < unanswered:
            continue
        answer = rng.choice([x for x in INTENTS if x != truth]) if rng.random() < disagree else truth
        out.append(InferenceRecord(**base, event="shadow_inference", model=f"{name}/v{shadow_v}", intent=answer,
                                   confidence=0.9, latency_ms=3.0 + rng.random()))
    return out


def aliases(reg) -> dict[str, str]:
    return {a: str(v.version) for a in ("champion", "previous", "shadow", "challenger")
            if (v := registry.alias_version(reg["client"], reg["name"], a)) is not None}


def test_passing_review_promotes_and_rollback_restores(intent_registry):
    cfg, name = intent_registry["cfg"], intent_registry["name"]
    verdict = shadow.review(cfg, "intent-classifier", mirrored(name, 400), ctx("r1"), "test traffic")
    assert verdict["verdict"] == "passed", verdict["why"]
    assert verdict["mirrored"] == 400 and verdict["agreement"] == 1.0
    mv = intent_registry["client"].get_model_version(name, "2")
    assert mv.tags["shadow.review"] == "passed" and mv.tags["shadow.review_champion"] == "1"
    # The review is an MLflow run with its evidence.
    import mlflow

    run = mlflow.get_run(verdict["run_id"])
    assert run.data.metrics["shadow.agreement"] == 1.0 and run.data.tags["review.verdict"] == "passed"
    arts = {a.path for a in mlflow.artifacts.list_artifacts(run_id=verdict["run_id"])}
    assert {"gates.json", "plots"} <= arts

    promoted = release.promote(cfg, "intent-classifier", ctx("p1", "shadow review passed"))
    assert aliases(intent_registry) == {"champion": "2", "previous": "1"}
    assert release.promote(cfg, "intent-classifier", ctx("p1")) == promoted  # a retried task does it once

    back = release.rollback(cfg, "intent-classifier", ctx("rb1", "P95 regression on the new hosts"))
    assert back["champion_version"] == "1" and back["demoted_version"] == "2"
    assert aliases(intent_registry) == {"champion": "1"}
    assert intent_registry["client"].get_model_version(name, "2").tags["rolled_back"] == "P95 regression on the new hosts"
    with pytest.raises(release.PromotionError, match="no @previous"):
        release.rollback(cfg, "intent-classifier", ctx("rb2"))
    # Reviewed against v1, and v1 is champion again: the old verdict still holds, so it may be promoted again...
    release.promote(cfg, "intent-classifier", ctx("p2"), version="2")
    assert aliases(intent_registry)["champion"] == "2"


def test_failing_review_refuses_promotion_and_retires_the_shadow(intent_registry):
    cfg, name = intent_registry["cfg"], intent_registry["name"]
    verdict = shadow.review(cfg, "intent-classifier", mirrored(name, 400, disagree=0.2), ctx("r2"), "test traffic")
    assert verdict["verdict"] == "failed"
    assert "agreement" in verdict["failed_gates"] and "accuracy" in verdict["failed_gates"]
    with pytest.raises(release.PromotionError, match="shadow review says 'failed'"):
        release.promote(cfg, "intent-classifier", ctx("p3"))
    acted = shadow.act_on(cfg, "intent-classifier", verdict, ctx("a3"))
    assert "taken out of shadow" in acted["action"]
    assert aliases(intent_registry) == {"champion": "1", "challenger": "2"}


def test_unanswered_mirrors_fail_the_reliability_gate(intent_registry):
    cfg, name = intent_registry["cfg"], intent_registry["name"]
    verdict = shadow.review(cfg, "intent-classifier", mirrored(name, 400, unanswered=0.05), ctx("r3"), "test")
    assert verdict["verdict"] == "failed" and verdict["failed_gates"] == ["shadow_error_rate"]


def test_too_little_evidence_decides_nothing(intent_registry):
    cfg, name = intent_registry["cfg"], intent_registry["name"]
    verdict = shadow.review(cfg, "intent-classifier", mirrored(name, 150, reviewed=0.3), ctx("r4"), "test")
    assert verdict["verdict"] == "insufficient_evidence"
    assert "150 mirrored requests < 200" in verdict["why"] and "reviewed labels" in verdict["why"]
    assert shadow.act_on(cfg, "intent-classifier", verdict, ctx("a4"))["action"] == "still in shadow"
    with pytest.raises(release.PromotionError, match="insufficient_evidence"):
        release.promote(cfg, "intent-classifier", ctx("p4"))
    assert aliases(intent_registry)["champion"] == "1"


def test_only_versions_that_passed_offline_gates_go_anywhere(intent_registry):
    cfg, name, client = intent_registry["cfg"], intent_registry["name"], intent_registry["client"]
    with pytest.raises(release.PromotionError, match="offline gates"):
        shadow.deploy(cfg, "intent-classifier", "1", ctx("d1"))  # the bootstrapped FP32 champion
    assert shadow.review(cfg, "intent-classifier", mirrored(name, 400), ctx("r5"), "test")["verdict"] == "passed"
    client.delete_model_version_tag(name, "2", "gates.offline")  # registered by hand, outside the pipeline
    with pytest.raises(release.PromotionError, match="offline gates"):
        release.promote(cfg, "intent-classifier", ctx("p5"))
    assert aliases(intent_registry)["champion"] == "1"


def test_a_review_against_an_older_champion_does_not_count(intent_registry):
    cfg, name, client = intent_registry["cfg"], intent_registry["name"], intent_registry["client"]
    assert shadow.review(cfg, "intent-classifier", mirrored(name, 400), ctx("r6"), "test")["verdict"] == "passed"
    client.set_model_version_tag(name, "2", "shadow.review_champion", "7")  # reviewed against another champion
    with pytest.raises(release.PromotionError, match="review it again"):
        release.promote(cfg, "intent-classifier", ctx("p6"))


def _with(cfg, shadow_updates: dict, lenient_quality: bool):
    quality = cfg.gates.intent_classifier
    if lenient_quality:
        quality = quality.model_copy(update={"max_accuracy_drop_pts": 100.0, "max_rare_class_accuracy_drop_pts": 100.0,
                                             "max_escalation_recall_drop_pts": 100.0, "max_ece_increase": 1.0})
    return cfg.model_copy(update={"shadow": cfg.shadow.model_copy(update=shadow_updates),
                                  "gates": cfg.gates.model_copy(update={"intent_classifier": quality})})


def test_quarterly_step_replays_logged_traffic_reviews_and_promotes(intent_registry):
    """The DAG's shadow_and_promote step in replay mode: logged traffic of replay conversations goes through
    the real ONNX Runtime champion and shadow, the paired records are reviewed, and a pass promotes."""
    from qat_tasks.data.sampling import split_of
    from qat_tasks.data.traffic_log import read_records

    from .conftest import WINDOW

    cfg = _with(intent_registry["cfg"], {"review": "replay", "replay_max_requests": 300, "min_agreement": 0.5,
                                         "max_p95_ratio": 100.0, "min_reviewed_labels": 30}, lenient_quality=True)
    window = {"start": WINDOW[0].isoformat(), "end": WINDOW[1].isoformat()}
    out = replay.shadow_challenger(cfg, {"model": "intent-classifier", "registered_version": "2"}, window,
                                   ctx("q1", "quarterly"))
    assert out["outcome"] == "passed" and out["mirrored"] == 300 and out["answered"] == 300, out
    assert out["reviewed"] >= 30 and out["action"].startswith("promoted v2")
    assert aliases(intent_registry) == {"champion": "2", "previous": "1"}
    # The replayed records are in the traffic schema, paired by request id, from replay conversations only: none
    # trained, picked or judged the models.
    replayed, stats = read_records(str(cfg.state_path / "shadow-replay" / "q1" / "intent-classifier"),
                                   datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert stats.get("invalid", 0) == 0 and len(replayed) == 600
    assert {split_of(cfg, r.conversation_id) for r in replayed} == {"replay"}
    assert {r.event for r in replayed} == {"inference", "shadow_inference"}
    # A retried task reviews nothing twice and promotes nothing twice.
    again = replay.shadow_challenger(cfg, {"model": "intent-classifier", "registered_version": "2"}, window,
                                     ctx("q1", "quarterly"))
    assert again["run_id"] == out["run_id"] and aliases(intent_registry)["champion"] == "2"


def test_quarterly_step_does_not_promote_a_shadow_that_fails_on_replay(intent_registry):
    from .conftest import WINDOW

    cfg = _with(intent_registry["cfg"], {"review": "replay", "replay_max_requests": 300, "min_agreement": 1.0,
                                         "max_p95_ratio": 0.001, "min_reviewed_labels": 30}, lenient_quality=False)
    out = replay.shadow_challenger(cfg, {"model": "intent-classifier", "registered_version": "2"},
                                   {"start": WINDOW[0].isoformat(), "end": WINDOW[1].isoformat()}, ctx("q2"))
    assert out["outcome"] == "failed" and "p95_ratio" in out["failed_gates"]
    assert aliases(intent_registry) == {"champion": "1", "challenger": "2"}


def test_production_never_promotes_on_replayed_evidence_nor_without_a_person(intent_registry):
    """The production profile's shadow settings on a real registry: the quarterly step only deploys the shadow
    (no replay), a passing live review waits, and only `promote` (a person's command) moves @champion."""
    from pathlib import Path

    from qat_tasks.core.config import load_config

    prod = load_config(Path(__file__).resolve().parent.parent / "configs" / "production.yaml")
    assert (prod.shadow.review, prod.shadow.promotion) == ("live", "manual")
    cfg = _with(intent_registry["cfg"], prod.shadow.model_dump(), lenient_quality=False)
    cfg = cfg.model_copy(update={"shadow": cfg.shadow.model_copy(update={"min_mirrored_requests": 50,
                                                                         "min_reviewed_labels": 20})})
    step = replay.shadow_challenger(cfg, {"model": "intent-classifier", "registered_version": "2"},
                                    {"start": "2026-07-01", "end": "2026-07-04"}, ctx("prod-q1", "quarterly"))
    assert step["outcome"].startswith("v2 in shadow since") and "shadow_review DAG" in step["outcome"]
    assert not (cfg.state_path / "shadow-replay" / "prod-q1").exists()  # nothing replayed
    name = intent_registry["name"]
    verdict = shadow.review(cfg, "intent-classifier", mirrored(name, 400), ctx("prod-r1"), "live test traffic")
    acted = shadow.act_on(cfg, "intent-classifier", verdict, ctx("prod-r1"))
    assert verdict["verdict"] == "passed" and acted["action"].startswith("passed; waiting for: qat-tasks promote")
    assert aliases(intent_registry)["champion"] == "1"  # nobody approved yet
    with pytest.raises(release.PromotionError, match="nobody approved"):
        release.promote(cfg, "intent-classifier", ctx("prod-p0", "no approval given"))
    # A review of replayed logs never promotes under production, approved or not.
    client = intent_registry["client"]
    client.set_model_version_tag(name, "2", "shadow.review_source", "replay")
    with pytest.raises(release.PromotionError, match="promotes on a live shadow review only"):
        release.promote(cfg, "intent-classifier", ctx("prod-p2", "approved on replay"), approved_by="ops")
    client.set_model_version_tag(name, "2", "shadow.review_source", "live")
    release.promote(cfg, "intent-classifier", ctx("prod-p1", "reviewed the live shadow: approved"), approved_by="ops")
    assert aliases(intent_registry)["champion"] == "2"
    assert client.get_model_version(name, "2").tags["approved_by"] == "ops"
