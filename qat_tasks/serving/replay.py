"""The offline mode of the serving component: logged records sent through champion and shadow in process, one at a
time, and logged as the live service logs them; and the replay review the quarterly run gives a new challenger
(`shadow.review: replay`): logged traffic of the replay share of conversations only (in no calibration version:
never rows that trained, picked or judged the models) replayed through both, reviewed, and acted on at once.

A challenger is replayed only on logged answers of its own role: the intent classifier's turns at the traffic
store's root, the escalation detector's and the reranker's in their model's folder below it. Where the window's
traffic carries none (the bundled sample logs intents only), the challenger stays @challenger and nothing is read
or run beyond finding that out."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from qat_tasks.core import registry, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.schema import INTENT_ROLE, SERVED_ROLES
from qat_tasks.data.labels import read_labels
from qat_tasks.data.sampling import REPLAY, seed_key, seeded_priority, split_of
from qat_tasks.data.traffic_log import read_records
from qat_tasks.promotion import shadow
from qat_tasks.promotion.traffic import log_root, read_role_records
from qat_tasks.serving.logs import RecordWriter
from qat_tasks.serving.models import ServedModel, ServingError
from qat_tasks.serving.requests import agree, answer_fields, inputs_of, request_of_record

log = logging.getLogger(__name__)


def replay(cfg: PipelineConfig, model_name: str, records, out_root: str, champion: str = registry.CHAMPION,
           shadow: str = registry.SHADOW, progress: bool = True) -> dict:
    """Send logged records through champion and shadow in process, one request at a time, each model timed on its
    own, and log both answers under `out_root` as the live service would, keeping each record's request_id,
    conversation_id, turn, timestamp, locale and (intent records) reviewed_label. A shadow error or an answer past
    serving.shadow_timeout_ms is counted and not logged, as live."""
    workdir = Path(tempfile.mkdtemp(prefix="qat-replay-"))
    models = [ServedModel.load(cfg, model_name, alias, workdir) for alias in (champion, shadow)]
    role = models[0].role
    limit_ms = cfg.serving.shadow_timeout_ms
    counts: Counter = Counter()
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc=f"replaying through v{models[0].version} and v{models[1].version}",
                        unit="request", mininterval=5)
    writer = RecordWriter(out_root, cfg.traffic.s3_endpoint_url, flush_records=5000, flush_seconds=60, prefix="replay")
    try:
        for rec in iterator:
            # As the live service does: the log holds the request scrubbed of personal data (an older writer's logs
            # may still carry some), and here both models answer that.
            fields, found = request_of_record(rec)
            sent = inputs_of(fields)
            base = {**rec.model_dump(), **fields, "runtime": "onnxruntime",
                    "pii_scrubbed": dict(found + Counter(rec.pii_scrubbed or {})) or None}
            answers = []
            for model in models:
                t0 = time.perf_counter()
                try:
                    answer = model.answer(sent)
                except Exception as exc:
                    if model is models[0]:
                        raise ServingError(f"champion {models[0].describe()} failed on request {rec.request_id}: "
                                           f"{type(exc).__name__}: {exc}") from exc
                    counts["errors"] += 1
                    continue
                ms = (time.perf_counter() - t0) * 1000
                if model is models[1] and ms > limit_ms:
                    counts["timeouts"] += 1
                    continue
                answered = answer_fields(role, answer, fields)
                answers.append(answered)
                writer.write({**base, "event": model.event if model is models[0] else "shadow_inference",
                              "model": model.model_field, **answered, "latency_ms": round(ms, 3)})
            counts["requests"] += 1
            if len(answers) == 2:
                counts["answered"] += 1
                counts["agree"] += agree(role, answers[0], answers[1])
    finally:
        writer.close()
        shutil.rmtree(workdir, ignore_errors=True)
    agreement = counts["agree"] / counts["answered"] if counts["answered"] else 0.0
    log.info("replayed %d logged requests through champion %s and shadow %s: %d answered by the shadow, %d errors, "
             "%d timeouts, agreement %.3f; %d records in %s", counts["requests"], models[0].describe(),
             models[1].describe(), counts["answered"], counts["errors"], counts["timeouts"], agreement,
             writer.stats["records"], out_root)
    return {"requests": counts["requests"], "answered": counts["answered"], "errors": counts["errors"],
            "timeouts": counts["timeouts"], "agreement": agreement, "champion_version": models[0].version,
            "shadow_version": models[1].version, "records": writer.stats["records"], "files": writer.stats["files"]}


def replay_records(cfg: PipelineConfig, start: date, end: date, model_name: str | None = None):
    """Logged requests of the window from the replay conversations (calibration.split_fractions.replay: in no
    calibration version, so never rows that trained, picked or judged the models), a seeded sample of at most
    shadow.replay_max_requests: the intent classifier's turns (with their review labels), or another served
    model's own logged answers."""
    first, last = (datetime(d.year, d.month, d.day, tzinfo=UTC) for d in (start, end))
    role = cfg.model(model_name).role if model_name else INTENT_ROLE
    if role == INTENT_ROLE:
        records, stats = read_records(cfg.traffic_source, first, last, cfg.traffic.s3_endpoint_url)
        # The turns' review labels: written beside them, up to calibration.label_lookahead_days after the window.
        labels, _ = read_labels(cfg.traffic_roots, start, end + timedelta(days=cfg.calibration.label_lookahead_days),
                                cfg.traffic.s3_endpoint_url)
        records, joined = labels.join(records)
    else:
        records, stats, joined = [], Counter(), Counter()
        for root in cfg.traffic_roots:
            found, read = read_role_records(log_root(root, model_name, role), first, last, role,
                                            cfg.traffic.s3_endpoint_url)
            records += found
            stats.update(read)
    seen, chosen = set(), []
    for r in records:
        if r.event == "shadow_inference" or r.request_id in seen or split_of(cfg, r.conversation_id) != REPLAY:
            continue
        seen.add(r.request_id)
        chosen.append(r)
    key = seed_key(cfg.calibration.seed)
    chosen.sort(key=lambda r: seeded_priority(key, r.request_id))
    chosen = sorted(chosen[: cfg.shadow.replay_max_requests], key=lambda r: r.timestamp)
    log.info("replaying %d logged requests of replay conversations from [%s, %s) (%d records read, %d invalid "
             "lines quarantined by the refresh, %d review labels joined)", len(chosen), start, end, len(records),
             stats.get("invalid", 0), joined["joined"])
    return chosen


def shadow_challenger(cfg: PipelineConfig, decision: dict, window: dict, ctx: tracking.RunContext,
                      parent_run_id: str | None = None) -> dict:
    """The quarterly run's step after the INT8 decision: shadow the new challenger and, in replay mode, review it
    and act on the verdict at once."""
    model_name = decision["model"]
    version = decision.get("registered_version")
    if not version:
        return {"model": model_name, "outcome": "no challenger to shadow"}
    role = cfg.model(model_name).role
    if role not in SERVED_ROLES:
        return {"model": model_name, "outcome": f"v{version} stays @challenger: the serving component serves the "
                                                f"encoders, so the {role.replace('_', ' ')} is not shadowed"}
    start, end = date.fromisoformat(window["start"]), date.fromisoformat(window["end"])
    records = None
    if cfg.shadow.review == "replay" and role != INTENT_ROLE:
        # Replayed only on its own logged answers: without any in the window there is nothing to review it on.
        records = replay_records(cfg, start, end, model_name)
        if not records:
            return {"model": model_name, "outcome": f"v{version} stays @challenger: the logged traffic of "
                                                    f"{window['start']}..{window['end']} carries no "
                                                    f"{role.replace('_', ' ')} answers to replay, so it is not "
                                                    f"shadowed in this run (with shadow.review: live the service "
                                                    f"mirrors it)"}
    deployed = shadow.deploy(cfg, model_name, version, ctx)
    if cfg.shadow.review == "live":
        return {"model": model_name, "outcome": f"v{version} in shadow since {deployed['deployed_at']}; the "
                                                f"shadow_review DAG reviews it after {cfg.shadow.live_window_hours:g} h"}
    exp_id = tracking.ensure_experiment(cfg, model_name)
    cached = tracking.cached_result(exp_id, f"{ctx.run_id}:{model_name}:shadow-review")
    if cached is None:
        out = cfg.state_path / "shadow-replay" / ctx.run_id.replace(":", "_") / model_name
        shutil.rmtree(out, ignore_errors=True)  # a retried replay starts clean: no request logged twice
        if records is None:
            records = replay_records(cfg, start, end, model_name)
        replay(cfg, model_name, records, str(out))
        since, until = datetime(1970, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=1)
        replayed, _ = (read_records(str(out), since, until) if role == INTENT_ROLE
                       else read_role_records(str(out), since, until, role))
        cached = shadow.review(cfg, model_name, replayed, ctx, f"replay of {window['start']}..{window['end']}", parent_run_id)
    return {**shadow.act_on(cfg, model_name, cached, ctx), "outcome": cached["verdict"]}
