"""The offline mode of the serving component: logged records sent through champion and shadow in process, one at a
time, and logged as the live service logs them; and the replay review the quarterly run gives a new challenger
(`shadow.review: replay`): logged traffic of the replay share of conversations only (in no calibration version:
never rows that trained, picked or judged the models) replayed through both, reviewed, and acted on at once."""

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
from qat_tasks.core.schema import SERVED_ROLES
from qat_tasks.data.labels import read_labels
from qat_tasks.data.pii import scrub
from qat_tasks.data.sampling import REPLAY, seed_key, seeded_priority, split_of
from qat_tasks.data.traffic_log import LogWriter, read_records
from qat_tasks.promotion import shadow
from qat_tasks.serving.models import ServedModel, ServingError

log = logging.getLogger(__name__)


def replay(cfg: PipelineConfig, model_name: str, records, out_root: str, champion: str = registry.CHAMPION,
           shadow: str = registry.SHADOW, progress: bool = True) -> dict:
    """Send logged records through champion and shadow in process, one request at a time, each model timed on its
    own, and log both answers under `out_root` as the live service would, keeping each record's request_id,
    conversation_id, turn, timestamp, locale and reviewed_label. A shadow error or an answer past
    serving.shadow_timeout_ms is counted and not logged, as live."""
    workdir = Path(tempfile.mkdtemp(prefix="qat-replay-"))
    models = [ServedModel(cfg, model_name, alias, workdir) for alias in (champion, shadow)]
    limit_ms = cfg.serving.shadow_timeout_ms
    counts: Counter = Counter()
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc=f"replaying through v{models[0].version} and v{models[1].version}",
                        unit="request", mininterval=5)
    writer = LogWriter(out_root, cfg.traffic.s3_endpoint_url, flush_records=5000, flush_seconds=60, prefix="replay")
    try:
        for rec in iterator:
            # As the live service does: both models answer, and the log holds, the text scrubbed of personal
            # data (an older writer's logs may still carry some).
            found: Counter = Counter()
            text = scrub(rec.text, found)
            base = {**rec.model_dump(), "text": text, "runtime": "onnxruntime",
                    "pii_scrubbed": dict(found + Counter(rec.pii_scrubbed or {})) or None}
            answers = []
            for model in models:
                t0 = time.perf_counter()
                try:
                    ((intent, conf),) = model.predict([text])
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
                answers.append(intent)
                writer.write({**base, "event": model.event if model is models[0] else "shadow_inference",
                              "model": model.model_field, "intent": intent, "confidence": round(conf, 6),
                              "latency_ms": round(ms, 3)})
            counts["requests"] += 1
            if len(answers) == 2:
                counts["answered"] += 1
                counts["agree"] += answers[0] == answers[1]
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


def replay_records(cfg: PipelineConfig, start: date, end: date):
    """Logged requests of the window from the replay conversations (calibration.split_fractions.replay: in no
    calibration version, so never rows that trained, picked or judged the models), a seeded sample of at most
    shadow.replay_max_requests."""
    records, stats = read_records(cfg.traffic_source, datetime(start.year, start.month, start.day, tzinfo=UTC),
                                  datetime(end.year, end.month, end.day, tzinfo=UTC), cfg.traffic.s3_endpoint_url)
    # The turns' review labels: written beside them, up to calibration.label_lookahead_days after the window.
    labels, _ = read_labels(cfg.traffic_roots, start, end + timedelta(days=cfg.calibration.label_lookahead_days),
                            cfg.traffic.s3_endpoint_url)
    records, joined = labels.join(records)
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
        return {"model": model_name, "outcome": f"v{version} stays @challenger: the serving component logs intents "
                                                f"(the traffic schema records intents), so the {role.replace('_', ' ')} is not shadowed on live traffic"}
    deployed = shadow.deploy(cfg, model_name, version, ctx)
    if cfg.shadow.review == "live":
        return {"model": model_name, "outcome": f"v{version} in shadow since {deployed['deployed_at']}; the "
                                                f"shadow_review DAG reviews it after {cfg.shadow.live_window_hours:g} h"}
    exp_id = tracking.ensure_experiment(cfg, model_name)
    cached = tracking.cached_result(exp_id, f"{ctx.run_id}:{model_name}:shadow-review")
    if cached is None:
        out = cfg.state_path / "shadow-replay" / ctx.run_id.replace(":", "_") / model_name
        shutil.rmtree(out, ignore_errors=True)  # a retried replay starts clean: no request logged twice
        records = replay_records(cfg, date.fromisoformat(window["start"]), date.fromisoformat(window["end"]))
        replay(cfg, model_name, records, str(out))
        replayed, _ = read_records(str(out), datetime(1970, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=1))
        cached = shadow.review(cfg, model_name, replayed, ctx, f"replay of {window['start']}..{window['end']}", parent_run_id)
    return {**shadow.act_on(cfg, model_name, cached, ctx), "outcome": cached["verdict"]}
