"""The calibration-time reference the drift monitor compares live traffic with.

It is computed when the quarterly run evaluates a champion (`store_at_calibration`) or, for a champion registered
before the monitor existed, by the monitor itself: a seeded sample of the traffic of the calibration version's
window, read and cleaned exactly like the live window (valid records, one per request id, no shadow mirrors,
personal data scrubbed). It is stored as JSON under
<calibration store>/drift-reference/<model>/<calibration version>.json with the per-request values (4
significant digits) and the PSI bin edges. The calibration split itself is not the reference: it is stratified
(rare intents floored) and deduplicated by text, so on the demo data it reads as drifted against the very
quarter it was drawn from (characters PSI 0.27, intent PSI 0.24). When that window's logs are gone, the splits
are used, and the reference says so.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import tempfile
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path

from qat_tasks.core import registry, storage, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.data.calibration_set import load_manifest, load_split
from qat_tasks.data.labels import LabelIndex
from qat_tasks.data.pii import scrub
from qat_tasks.data.sampling import is_non_english, seed_key, seeded_priority
from qat_tasks.data.traffic_log import iter_records
from qat_tasks.monitoring import statistics
from qat_tasks.monitoring.distances import quantile_edges
from qat_tasks.monitoring.statistics import DriftError, four_digits

log = logging.getLogger(__name__)



REFERENCE_SCHEMA = "mangaassist.drift-reference/1"


# -- traffic -----------------------------------------------------------------------------------------------
def sample_traffic(root: str, start: date, end: date, n: int, seed: int, endpoint_url: str | None = None,
                   labels: LabelIndex | None = None, reviewed: list | None = None) -> tuple[list[dict], Counter]:
    """A seeded sample of at most `n` requests logged in [start, end): valid records, one per request id (client
    retries log twice), shadow mirrors left out (the same request, answered by the shadow), personal data
    scrubbed as calibration scrubs it. The sample depends on the request ids, not on file order.

    With `reviewed`, every request of the window (sampled or not) with a reviewed intent (its review label in
    `labels`, else one logged inline) is added to it as (the model that answered, its intent, the reviewed one)."""
    key = seed_key(seed)
    stats: Counter = Counter()
    heap: list[tuple[int, str, dict]] = []
    members: set[str] = set()
    counted: set[str] = set()  # reviewed requests already counted (a retry is the same request)
    for rec in iter_records(root, start, end, stats, endpoint_url):
        if rec.event == "shadow_inference":
            stats["shadow_skipped"] += 1
            continue
        stats["valid"] += 1
        rid = rec.request_id
        if reviewed is not None and rid not in counted:  # a review label, else one the writer logged inline
            review = labels.get(rid) if labels is not None else None
            truth = review.reviewed_label if review is not None else rec.reviewed_label
            if truth is not None:
                counted.add(rid)
                reviewed.append((rec.model, rec.intent, truth))
        # A retry has the same id, hence the same priority: it is in the heap exactly when its twin is.
        if rid in members:
            stats["duplicate_requests"] += 1
            continue
        item = (-seeded_priority(key, rid), rid, {"text": scrub(rec.text),
                                                  "non_english": is_non_english(rec.text, rec.locale)})
        if len(heap) < n:
            heapq.heappush(heap, item)
            members.add(rid)
        elif item > heap[0]:
            members.discard(heapq.heapreplace(heap, item)[1])
            members.add(rid)
    return [row for _, _, row in sorted(heap, reverse=True)], stats


# -- reference ---------------------------------------------------------------------------------------------
def reference_uri(cfg: PipelineConfig, model_name: str, calibration_version: str, weights: str | None = None) -> str:
    name = f"{calibration_version}.{weights[:12]}.json" if weights else f"{calibration_version}.json"
    return storage.join(cfg.calibration_store, "drift-reference", model_name, name)


def _read(cfg: PipelineConfig, uri: str) -> dict | None:
    endpoint = cfg.traffic.s3_endpoint_url
    if not storage.exists(uri, endpoint):
        return None
    return {**json.loads(storage.read_bytes(uri, endpoint)), "uri": uri}


def load_reference(cfg: PipelineConfig, model_name: str, calibration_version: str) -> dict | None:
    """The stored reference statistics of a model for a calibration version, or None."""
    return _read(cfg, reference_uri(cfg, model_name, calibration_version))


def weights_digest(hf_dir: Path) -> str:
    """sha256 of the weight files: two versions with the same digest give the same activations."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(hf_dir).iterdir() if p.suffix in (".safetensors", ".bin")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _download(cfg: PipelineConfig, model_name: str, version: str, dest: Path) -> dict:
    paths = registry.download(tracking.registered_name(cfg, model_name), str(version), dest)
    return {"version": str(version), "hf": paths["hf"], "meta": json.loads(paths["meta"].read_text()),
            "digest": weights_digest(paths["hf"])}


def _reference_records(cfg: PipelineConfig, manifest: dict, calibration_uri: str) -> tuple[list[dict], dict]:
    """The calibration window's traffic, sampled like the live window; its splits when the logs are gone."""
    window = manifest["window"]
    start, end = date.fromisoformat(window["start"]), date.fromisoformat(window["end"])
    seed, n = cfg.calibration.seed, cfg.drift.reference_rows
    try:
        rows, stats = sample_traffic(manifest["source"], start, end, n, seed, cfg.traffic.s3_endpoint_url)
    except FileNotFoundError:
        rows, stats = [], Counter()
    if rows:
        return rows, {"kind": "traffic", "uri": manifest["source"], "window": window, "read": dict(stats)}
    log.warning("the traffic of calibration %s ([%s, %s) under %s) is no longer readable: the drift reference comes "
                "from its calibration and evaluation splits, which over-represent rare intents and unique texts; "
                "expect input and prediction features to read as shifted until the next calibration",
                manifest["version"], start, end, manifest["source"])
    endpoint = cfg.traffic.s3_endpoint_url
    split_rows = load_split(calibration_uri, "calibration", endpoint) + load_split(calibration_uri, "evaluation", endpoint)
    key = seed_key(seed)
    split_rows.sort(key=lambda r: seeded_priority(key, r["request_id"]))
    rows = [{"text": r["text"], "non_english": r["language"] != "en"} for r in split_rows[:n]]
    return rows, {"kind": "calibration splits", "uri": calibration_uri,
                  "warning": "stratified and deduplicated: input and prediction features are biased"}


def _build_reference(cfg: PipelineConfig, model_name: str, model: dict, manifest: dict, calibration_uri: str,
                     uri: str) -> dict:
    records, source = _reference_records(cfg, manifest, calibration_uri)
    stats = statistics.text_statistics(model["hf"], model["meta"], records, seed=cfg.calibration.seed)
    for feat in stats["features"].values():
        if feat["kind"] == "continuous":
            feat["edges"] = [four_digits(e) for e in quantile_edges(feat["values"], cfg.drift.bins)]
    ref = {"schema": REFERENCE_SCHEMA, "model": model_name, "model_version": model["version"],
           "weights_sha256": model["digest"], "calibration_version": manifest["version"],
           "created": datetime.now(UTC).isoformat(timespec="seconds"), "source": source, **stats}
    storage.write_bytes(uri, json.dumps(ref, ensure_ascii=False).encode(), cfg.traffic.s3_endpoint_url)
    log.info("%s: drift reference for calibration %s stored (%d requests of %s, weights of v%s) -> %s", model_name,
             manifest["version"], ref["rows"], source["kind"], model["version"], uri)
    return {**ref, "uri": uri}


def store_reference(cfg: PipelineConfig, model_name: str, version: str, calibration_uri: str) -> dict:
    """Compute and store the reference statistics of `model_name` for the calibration version at
    `calibration_uri`, with the FP32 weights of registered `version`. An existing reference is returned as is."""
    manifest = load_manifest(calibration_uri, cfg.traffic.s3_endpoint_url)
    existing = load_reference(cfg, model_name, manifest["version"])
    if existing is not None:
        log.info("%s: drift reference for calibration %s already stored at %s", model_name, manifest["version"],
                 existing["uri"])
        return existing
    with tempfile.TemporaryDirectory(prefix="drift-ref-") as tmp:
        model = _download(cfg, model_name, version, Path(tmp))
        return _build_reference(cfg, model_name, model, manifest, calibration_uri,
                                reference_uri(cfg, model_name, manifest["version"]))


def _reference_for(cfg: PipelineConfig, model_name: str, model: dict, calibration_version: str) -> dict:
    """The reference for the champion's calibration version, measured with the champion's weights; built now
    when missing (a champion registered before the monitor existed)."""
    ref = load_reference(cfg, model_name, calibration_version)
    if ref is not None and ref["weights_sha256"] == model["digest"]:
        return ref
    uri = reference_uri(cfg, model_name, calibration_version)
    if ref is not None:  # activations of other weights are not comparable: one reference per weights
        uri = reference_uri(cfg, model_name, calibration_version, model["digest"])
        found = _read(cfg, uri)
        if found is not None:
            return found
    calibration_uri = storage.join(cfg.calibration_store, calibration_version)
    if not storage.exists(storage.join(calibration_uri, "manifest.json"), cfg.traffic.s3_endpoint_url):
        raise DriftError(f"{model_name} v{model['version']}: its calibration version {calibration_version} is not "
                         f"under {cfg.calibration_store}, so there is no reference to compare traffic with. "
                         f"Recalibrate (quarterly_recalibration) to register a champion with a known calibration.")
    log.info("%s: no drift reference for calibration %s with the weights of v%s (registered before the drift "
             "monitor, or other weights): computing it now from that calibration's traffic", model_name,
             calibration_version, model["version"])
    return _build_reference(cfg, model_name, model, load_manifest(calibration_uri, cfg.traffic.s3_endpoint_url),
                            calibration_uri, uri)


def store_at_calibration(cfg: PipelineConfig, model_name: str, version: str, calibration_uri: str,
                         evaluation_run_id: str) -> str | None:
    """Store the reference of a champion just evaluated on a new calibration version, and name it on that
    evaluation's MLflow run. A failure here must not stop the recalibration: it is reported on the run, and the
    monitor builds a missing reference itself."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        uri = store_reference(cfg, model_name, version, calibration_uri)["uri"]
    except Exception as exc:  # any failure: reported on the run, and the monitor retries on its own
        log.warning("%s: drift reference not stored (%s: %s); the drift monitor will compute it", model_name,
                    type(exc).__name__, exc)
        client.set_tag(evaluation_run_id, "drift.reference_error", f"{type(exc).__name__}: {exc}"[:5000])
        return None
    client.set_tag(evaluation_run_id, "drift.reference", uri)
    return uri
