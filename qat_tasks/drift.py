"""The drift monitor: is recent traffic still the traffic the quantized models were calibrated on?

Statistics, computed per request with the FP32 weights every registered version carries (an INT8 version
keeps the FP32 folder it came from), so FP32 and INT8 champions are measured alike:
  activations  per key layer (each LayerNorm output: embeddings, attention output, FFN output; and each FFN
               activation output, after GELU, where outliers live), over the request's non-padding tokens:
               max |a| (what sets an INT8 range) and the 99th percentile of |a|. Per layer, for the report:
               min and max, and the 0.1, 1, 50, 99 and 99.9th percentiles of a seeded sample of 64 values
               per request.
  inputs       characters, tokens, share of [UNK] tokens, non-English (calibration.is_non_english)
  predictions  the model's predicted label and its top-1 confidence

The reference, computed "at calibration time" (evaluate_champion) or, for a champion registered before this
monitor existed, by the monitor itself, is a seeded sample of the traffic of the calibration version's window,
read and cleaned exactly like the live window (valid records, one per request id, no shadow mirrors, personal
data scrubbed). It is stored as JSON under <calibration store>/drift-reference/<model>/<calibration version>.json
with the per-request values (4 significant digits) and the PSI bin edges. The calibration split itself is not
the reference: it is stratified (rare intents floored) and deduplicated by text, so on the demo data it reads
as drifted against the very quarter it was drawn from (characters PSI 0.27, intent PSI 0.24). When that
window's logs are gone, the splits are used, and the reference says so.

Distance per feature: PSI over `drift.bins` quantile bins of the reference (right-closed, ties merged; shares
smoothed by half a count per bin, so an empty bin is finite) and the two-sample Kolmogorov-Smirnov statistic;
categorical features (predicted label, non-English) take PSI over their categories (non-English, being binary,
also KS: the share difference). A model has drifted when any selected feature reaches `drift.psi_threshold`
(PSI) or `drift.ks_threshold` (KS). With the demo's MiniLM champions, five undrifted generated days (300
requests each) peaked at PSI 0.15 and KS 0.11 over all ~45 features, a catalogue-launch day at PSI 0.58 and
KS 0.32 (activations alone: 0.55): the defaults 0.25 and 0.2 sit between. Reported beside it, per layer:
range overflow, the share of live requests whose max |a| passes the largest of the reference, i.e. what a
min-max calibrated INT8 model would clip.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import tempfile
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np

from qat_tasks import storage, tracking
from qat_tasks.calibration import is_non_english, load_manifest, load_split, seeded_priority
from qat_tasks.config import DriftConfig, PipelineConfig
from qat_tasks.pii import scrub
from qat_tasks.traffic_log import iter_records

log = logging.getLogger(__name__)

REFERENCE_SCHEMA = "mangaassist.drift-reference/1"
SMOOTHING = 0.5  # pseudo-count per bin (Jeffreys): an empty bin of a 300-request day is not a zero share
PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
SAMPLE_PER_REQUEST = 64
MAX_REASON_CHARS = 500  # the recalibration DAG's `reason` Param takes at most 500 characters
GROUP_WORD = {"activations": "activation", "inputs": "input", "predictions": "prediction"}


class DriftError(RuntimeError):
    """The monitor cannot compare: the message says what is missing and where it looked."""


# -- distances ---------------------------------------------------------------------------------------------
def quantile_edges(reference, bins: int) -> np.ndarray:
    """Interior edges of `bins` equal-mass bins of the reference; tied quantiles (a mass point) merge."""
    return np.unique(np.quantile(np.asarray(reference, dtype=float), np.arange(1, bins) / bins))


def _counts(values, edges: np.ndarray) -> np.ndarray:
    # side="left": bin i holds (edge[i-1], edge[i]], so a mass point sits wholly in the bin its edge closes.
    return np.bincount(np.searchsorted(edges, np.asarray(values, dtype=float), side="left"), minlength=len(edges) + 1)


def _psi_of(ref_counts: np.ndarray, live_counts: np.ndarray) -> float:
    # Smoothed shares: with a fixed epsilon (1e-4) one rare intent absent from a 300-request day alone scored
    # 0.17 on undrifted demo traffic; half a count scales with the sample and keeps the sum finite.
    p = (ref_counts + SMOOTHING) / (ref_counts.sum() + SMOOTHING * len(ref_counts))
    q = (live_counts + SMOOTHING) / (live_counts.sum() + SMOOTHING * len(live_counts))
    return float(np.sum((q - p) * np.log(q / p)))


def psi(reference, live, bins: int = 10) -> float:
    """Population stability index of `live` against `reference` over the reference's quantile bins."""
    edges = quantile_edges(reference, bins)
    return _psi_of(_counts(reference, edges), _counts(live, edges))


def psi_categorical(reference, live) -> float:
    """PSI over the categories seen on either side (each smoothed by half a count)."""
    ref, cur = Counter(reference), Counter(live)
    cats = sorted(set(ref) | set(cur))
    return _psi_of(np.array([ref[c] for c in cats]), np.array([cur[c] for c in cats]))


def ks(reference, live) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(reference, dtype=float), np.asarray(live, dtype=float)).statistic)


# -- statistics --------------------------------------------------------------------------------------------
def _q(x: float) -> float:
    return float(f"{x:.4g}")  # 4 significant digits: a reference of 1000 rows stays a few hundred KB


def key_layers(model) -> dict[str, object]:
    """The modules whose outputs set INT8 activation ranges, by short name (layer.3.output.LayerNorm):
    every LayerNorm and every feed-forward activation (BERT family: intermediate.act; DistilBERT: ffn.activation)."""
    import torch

    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) or name.endswith((".intermediate_act_fn", ".ffn.activation")):
            short = name.removeprefix(prefix).removeprefix("encoder.").removeprefix("transformer.")
            found[short.replace("intermediate.intermediate_act_fn", "intermediate.act")] = module
    if not found:
        raise DriftError(f"{type(model).__name__}: no LayerNorm or feed-forward activation found; the drift monitor "
                         f"reads BERT-like encoders")
    return found


def text_statistics(hf_dir: Path, meta: dict, records: list[dict], seed: int = 0, batch_size: int = 32) -> dict:
    """Per-request statistics of `records` ({"text", "non_english"}) through the FP32 model in `hf_dir`
    (`meta`: labels, max_length). Returns {"features": {name: {group, kind, values}}, "layers": {...}, "rows"}."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qat_tasks.modeling import tokenize

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    layers = key_layers(model)
    texts = [r["text"] for r in records]
    values: dict[str, list] = defaultdict(list)
    sample: dict[str, list] = defaultdict(list)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    captured: dict[str, object] = {}
    gen = torch.Generator().manual_seed(seed)

    def hook(name):
        return lambda _module, _inputs, output: captured.__setitem__(name, output.detach())

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenize(tokenizer, texts[i:i + batch_size], meta["max_length"], "pt")
                conf, idx = model(**enc).logits.softmax(-1).max(-1)
                values["predicted_label"] += [meta["labels"][j] for j in idx.tolist()]
                values["confidence"] += [_q(c) for c in conf.tolist()]
                mask = enc["attention_mask"].bool()
                for name, out in captured.items():
                    for row, keep in zip(out, mask, strict=True):
                        act = row[keep].reshape(-1)  # this request's non-padding tokens, all channels
                        mag = act.abs()
                        values[f"{name}.absmax"].append(_q(mag.max().item()))
                        k = max(1, int(np.ceil(0.99 * mag.numel())))
                        values[f"{name}.p99"].append(_q(mag.kthvalue(k).values.item()))
                        pick = torch.randint(0, act.numel(), (SAMPLE_PER_REQUEST,), generator=gen)
                        sample[name].append(act[pick].numpy())
                        lo[name] = min(lo.get(name, np.inf), act.min().item())
                        hi[name] = max(hi.get(name, -np.inf), act.max().item())
                captured.clear()
    finally:
        for h in handles:
            h.remove()

    unk = tokenizer.unk_token_id
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"], strict=True):
        values["chars"].append(len(text))
        values["tokens"].append(len(ids))
        values["unk_share"].append(_q(sum(t == unk for t in ids) / max(1, len(ids))))
    values["non_english"] = ["yes" if r["non_english"] else "no" for r in records]

    features = {}
    for name, vals in values.items():
        if name in ("chars", "tokens", "unk_share", "non_english"):
            group = "inputs"
        elif name in ("predicted_label", "confidence"):
            group = "predictions"
        else:
            group = "activations"
        kind = "categorical" if name in ("predicted_label", "non_english") else "continuous"
        features[name] = {"group": group, "kind": kind, "values": vals}
    layer_stats = {}
    for name in layers:
        if name in sample:
            pct = np.percentile(np.concatenate(sample[name]), PERCENTILES)
            layer_stats[name] = {"min": _q(lo[name]), "max": _q(hi[name]),
                                 **{f"p{p:g}": _q(v) for p, v in zip(PERCENTILES, pct, strict=True)}}
    return {"features": features, "layers": layer_stats, "rows": len(records)}


# -- traffic -----------------------------------------------------------------------------------------------
def sample_traffic(root: str, start: date, end: date, n: int, seed: int,
                   endpoint_url: str | None = None) -> tuple[list[dict], Counter]:
    """A seeded sample of at most `n` requests logged in [start, end): valid records, one per request id (client
    retries log twice), shadow mirrors left out (the same request, answered by the shadow), personal data
    scrubbed as calibration scrubs it. The sample depends on the request ids, not on file order."""
    key = seed.to_bytes(8, "big", signed=True)
    stats: Counter = Counter()
    heap: list[tuple[int, str, dict]] = []
    members: set[str] = set()
    for rec in iter_records(root, start, end, stats, endpoint_url):
        if rec.event == "shadow_inference":
            stats["shadow_skipped"] += 1
            continue
        stats["valid"] += 1
        rid = rec.request_id
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
    from qat_tasks import registry

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
    key = seed.to_bytes(8, "big", signed=True)
    split_rows.sort(key=lambda r: seeded_priority(key, r["request_id"]))
    rows = [{"text": r["text"], "non_english": r["language"] != "en"} for r in split_rows[:n]]
    return rows, {"kind": "calibration splits", "uri": calibration_uri,
                  "warning": "stratified and deduplicated: input and prediction features are biased"}


def _build_reference(cfg: PipelineConfig, model_name: str, model: dict, manifest: dict, calibration_uri: str,
                     uri: str) -> dict:
    records, source = _reference_records(cfg, manifest, calibration_uri)
    stats = text_statistics(model["hf"], model["meta"], records, seed=cfg.calibration.seed)
    for feat in stats["features"].values():
        if feat["kind"] == "continuous":
            feat["edges"] = [_q(e) for e in quantile_edges(feat["values"], cfg.drift.bins)]
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


# -- comparison --------------------------------------------------------------------------------------------
def compare(reference: dict, live: dict, dcfg: DriftConfig) -> dict:
    """Distances of each selected feature, range overflow per layer, and the verdict."""
    rows, overflow, hits = [], {}, []
    for name, ref in reference["features"].items():
        if ref["group"] not in dcfg.features or name not in live["features"]:
            continue
        r, v = ref["values"], live["features"][name]["values"]
        row = {"feature": name, "group": ref["group"], "kind": ref["kind"]}
        if ref["kind"] == "continuous":
            row.update(psi=psi(r, v, dcfg.bins), ks=ks(r, v), reference=float(np.median(r)), live=float(np.median(v)))
        else:
            row.update(psi=psi_categorical(r, v), ks=None, **_top_shift(r, v))
            if set(r) | set(v) <= {"yes", "no"}:  # binary: KS is the difference of the shares
                row["ks"] = abs(row["live_share"] - row["reference_share"])
        rows.append(row)
        for metric, threshold in (("psi", dcfg.psi_threshold), ("ks", dcfg.ks_threshold)):
            if row[metric] is not None and row[metric] >= threshold:
                hits.append({"feature": name, "group": ref["group"], "metric": metric, "value": row[metric],
                             "threshold": threshold})
        if name.endswith(".absmax"):
            overflow[name.removesuffix(".absmax")] = float(np.mean(np.asarray(v) > max(r)))
    hits.sort(key=lambda h: h["value"] / h["threshold"], reverse=True)
    rows.sort(key=lambda r: r["psi"], reverse=True)
    return {"features": rows, "overflow": overflow, "hits": hits, "drifted": bool(hits),
            "drift_score": max((r["psi"] for r in rows), default=0.0)}


def _top_shift(ref: list[str], cur: list[str]) -> dict:
    """The category whose share moved most (for the report: 'checkout_help 0.03 -> 0.12')."""
    a, b = Counter(ref), Counter(cur)
    cat = "yes" if set(a) | set(b) <= {"yes", "no"} else max(
        set(a) | set(b), key=lambda c: abs(b[c] / max(1, len(cur)) - a[c] / max(1, len(ref))))
    return {"category": cat, "reference_share": a[cat] / max(1, len(ref)), "live_share": b[cat] / max(1, len(cur))}


def _explain(hits: list[dict], n: int = 2) -> str:
    groups = list(dict.fromkeys(GROUP_WORD[h["group"]] for h in hits))
    words = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    detail = ", ".join(f"{h['metric']}.{h['feature']} {h['value']:.2f} >= {h['threshold']:g}" for h in hits[:n])
    return f"{words} drift ({detail})"


def _window_label(start: date, end: date) -> str:
    last = end - timedelta(days=1)
    return start.isoformat() if last == start else f"{start.isoformat()}..{last.isoformat()}"


# -- the daily run ---------------------------------------------------------------------------------------
MAX_WINDOW_DAYS = 92


def plan_check(cfg: PipelineConfig, params: dict, *, dag_id: str, run_id: str, run_type: str,
               reference: datetime | date | None, interval: tuple[datetime | None, datetime | None] = (None, None)
               ) -> dict:
    """Validate a drift run's parameters and fix its window: explicit params, else the data interval of a
    scheduled run (the day before 02:00 UTC), else the last drift.window_days days before the logical date."""
    from qat_tasks.pipeline import ParamError

    reason = str(params.get("reason") or "").strip()
    if len(reason) < 3:
        raise ParamError("params.reason: say why this run happens (at least 3 characters)")
    models = list(params.get("models") or cfg.drift_models)
    unknown = [m for m in models if m not in cfg.drift_models]
    if unknown:
        raise ParamError(f"params.models: {unknown} are not monitored; drift models: {cfg.drift_models}")
    scheduled = "scheduled" in run_type.lower()
    start_s, end_s = params.get("window_start"), params.get("window_end")
    if bool(start_s) != bool(end_s):
        raise ParamError("params.window_start and params.window_end go together: give both or neither")
    if start_s:
        try:
            start, end = date.fromisoformat(start_s), date.fromisoformat(end_s)
        except ValueError as exc:
            raise ParamError(f"params.window_start/window_end: not an ISO date ({exc})") from None
    elif scheduled and interval[0] is not None and interval[1] is not None:
        start, end = interval[0].date(), interval[1].date()
    else:
        ref = reference.date() if isinstance(reference, datetime) else (reference or datetime.now(UTC).date())
        start, end = ref - timedelta(days=cfg.drift.window_days), ref
    if end <= start:
        raise ParamError(f"drift window: end {end} must be after start {start}")
    if (end - start).days > MAX_WINDOW_DAYS:
        raise ParamError(f"drift window: {(end - start).days} days is longer than {MAX_WINDOW_DAYS}")
    if start > datetime.now(UTC).date():
        raise ParamError(f"drift window: starts in the future ({start})")
    days = int(params.get("recalibration_days") or 30)
    ctx = tracking.RunContext(dag_id=dag_id, run_id=run_id, reason=reason, trigger="scheduled" if scheduled else "manual")
    log.info("drift check %s (%s): %s | traffic [%s, %s) | models %s", run_id, ctx.trigger, reason, start, end, models)
    return {"ctx": ctx.to_dict(), "window": {"start": start.isoformat(), "end": end.isoformat()}, "models": models,
            "recalibration_days": days}


def recalibration_request(cfg: PipelineConfig, plan: dict, check: dict) -> dict | None:
    """The conf of the recalibration run to trigger, or None (nothing drifted, or drift.trigger is off). Its window
    ends with the checked traffic, so the drifted days are part of the new calibration data."""
    if not check["drifted"]:
        log.info("no drift in %s..%s: no recalibration", check["window"]["start"], check["window"]["end"])
        return None
    if not cfg.drift.trigger:
        log.warning("%s; drift.trigger is off: reported only, no recalibration triggered", check["reason"])
        return None
    end = date.fromisoformat(check["window"]["end"])
    conf = {"reason": check["reason"], "models": check["drifted"], "triggered_by": "drift",
            "window_start": (end - timedelta(days=plan["recalibration_days"])).isoformat(), "window_end": end.isoformat()}
    log.info("triggering quarterly_recalibration for %s on traffic [%s, %s): %s", conf["models"], conf["window_start"],
             conf["window_end"], conf["reason"])
    return conf


# -- the monitor -------------------------------------------------------------------------------------------
def monitor(cfg: PipelineConfig, window_start: date, window_end: date, ctx: tracking.RunContext,
            models: list[str] | None = None) -> dict:
    """Compare the traffic logged in [window_start, window_end) with each champion's calibration-time reference,
    log one MLflow run per model, and say which models drifted and why (XCom-sized)."""
    from qat_tasks import registry

    dcfg = cfg.drift
    names = list(models or cfg.drift_models)
    unknown = [m for m in names if m not in cfg.drift_models]
    if unknown:
        raise DriftError(f"models {unknown} are not monitored; drift models of profile {cfg.profile}: {cfg.drift_models}")
    client = tracking.configure(cfg)
    label = _window_label(window_start, window_end)
    try:
        records, read = sample_traffic(cfg.serving_log_dir, window_start, window_end, dcfg.max_rows,
                                       cfg.calibration.seed, cfg.traffic.s3_endpoint_url)
    except FileNotFoundError:  # no service has logged there yet: every model gets "insufficient data"
        log.warning("no traffic log folder at %s (serving.log_dir, else traffic.source)", cfg.serving_log_dir)
        records, read = [], Counter()
    log.info("traffic %s under %s: %d valid request(s) in %d file(s), %d invalid line(s), %d shadow mirror(s) "
             "left out; %d sampled", label, cfg.serving_log_dir, read["valid"], read["files"], read["invalid"],
             read["shadow_skipped"], len(records))
    out: dict[str, dict] = {}
    drifted: list[str] = []
    parts: list[str] = []
    keys: list[str] = []
    for name in names:
        champion = registry.alias_version(client, tracking.registered_name(cfg, name), registry.CHAMPION)
        if champion is None:
            log.info("%s: no @champion registered yet: nothing to monitor", name)
            out[name] = {"verdict": "skipped", "why": "no @champion registered", "drift_score": None,
                         "top_features": [], "run_id": None}
            continue
        result = _check_model(cfg, name, champion, records, read, window_start, window_end, ctx)
        out[name] = result
        if result["verdict"] == "drifted":
            drifted.append(name)
            parts.append(f"{name} {result['explanation']}")
            keys.append(f"{name}.v{result['champion_version']}.{result['calibration_version']}")
    drift_key = "__".join(keys) or None
    if drift_key and len(drift_key) > 200:  # it names the triggered DAG run: keep it a readable, valid run id
        drift_key = f"{len(keys)}-models-{hashlib.sha256(drift_key.encode()).hexdigest()[:16]}"
    reason = None
    if drifted:
        reason = f"drift monitor: {'; '.join(parts)} on {label}"
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS - 1] + "…"
    return {"window": {"start": window_start.isoformat(), "end": window_end.isoformat()}, "rows": len(records),
            "invalid_lines": read["invalid"], "models": out, "drifted": drifted, "reason": reason,
            # Names the drift state: one recalibration per (model, champion, calibration) until that changes.
            "drift_key": drift_key}


def _check_model(cfg: PipelineConfig, name: str, champion, records: list[dict], read: Counter, start: date,
                 end: date, ctx: tracking.RunContext) -> dict:
    import mlflow

    dcfg = cfg.drift
    exp_id = tracking.ensure_experiment(cfg, name)
    key = f"{ctx.run_id}:{name}:drift"
    cached = tracking.cached_result(exp_id, key)
    if cached is not None:
        log.info("%s: drift check of this DAG run already logged in run %s", name, cached["run_id"])
        return cached
    version = str(champion.version)
    calibration_version = champion.tags.get("calibration_version")
    if not calibration_version:
        raise DriftError(f"{name} v{version} (@champion) has no calibration_version tag: its calibration-time "
                         f"statistics cannot be found. Recalibrate to register a champion with its lineage.")
    label = _window_label(start, end)
    with tempfile.TemporaryDirectory(prefix="drift-") as tmp:
        model = _download(cfg, name, version, Path(tmp))
        reference = _reference_for(cfg, name, model, calibration_version)
        enough = len(records) >= dcfg.min_rows
        live = text_statistics(model["hf"], model["meta"], records, seed=cfg.calibration.seed) if enough else None
    tags = {**ctx.tags(), "stage": "drift-check", "model.version": version, "calibration.version": calibration_version,
            "drift.reference": reference["uri"], "window.start": start.isoformat(), "window.end": end.isoformat()}
    with tracking.stage_run(exp_id, key, f"drift check {label}", tags) as run:
        mlflow.log_params({"window_start": start.isoformat(), "window_end": end.isoformat(),
                           "psi_threshold": dcfg.psi_threshold, "ks_threshold": dcfg.ks_threshold, "bins": dcfg.bins,
                           "min_rows": dcfg.min_rows, "max_rows": dcfg.max_rows, "features": ",".join(dcfg.features),
                           "rows.live": len(records), "rows.reference": reference["rows"],
                           "reference.source": reference["source"]["kind"], "traffic": cfg.serving_log_dir})
        mlflow.log_metrics({"rows.live": len(records), "lines.invalid": read["invalid"]})
        if not enough:
            why = (f"{len(records)} request(s) logged in {label}, fewer than drift.min_rows={dcfg.min_rows}: "
                   f"no verdict")
            log.warning("%s v%s: %s", name, version, why)
            result = {"verdict": "insufficient data", "why": why, "drift_score": None, "top_features": []}
        else:
            result = _log_comparison(name, version, reference, live, dcfg, label)
        mlflow.set_tags({"drift.verdict": result["verdict"], "mlflow.note.content": f"drift check {label}: "
                         f"{result.get('explanation') or result.get('why') or result['verdict']}"})
        result.update(run_id=run.info.run_id, champion_version=version, calibration_version=calibration_version)
        tracking.set_result(result)
    return result


def _log_comparison(name: str, version: str, reference: dict, live: dict, dcfg: DriftConfig, label: str) -> dict:
    import mlflow

    from qat_tasks import plots

    cmp = compare(reference, live, dcfg)
    metrics = {"drift_score": cmp["drift_score"]}
    for row in cmp["features"]:
        metrics[f"psi.{row['feature']}"] = row["psi"]
        if row["ks"] is not None:
            metrics[f"ks.{row['feature']}"] = row["ks"]
    metrics.update({f"overflow.{layer}": share for layer, share in cmp["overflow"].items()})
    mlflow.log_metrics(metrics)
    mlflow.log_table({k: [r.get(k) for r in cmp["features"]] for k in
                      ("feature", "group", "kind", "psi", "ks", "reference", "live", "category", "reference_share",
                       "live_share")}, "drift_features.json")
    layers = sorted(set(reference["layers"]) & set(live["layers"]))
    mlflow.log_dict({"reference": {k: reference["layers"][k] for k in layers},
                     "live": {k: live["layers"][k] for k in layers},
                     "overflow": cmp["overflow"]}, "activation_ranges.json")
    psi_by_feature = {r["feature"]: r["psi"] for r in cmp["features"]}
    shown = [r["feature"] for r in cmp["features"][:6]]
    figures = {"psi_by_feature.png": plots.drift_psi(psi_by_feature, dcfg.psi_threshold,
                                                     f"{name} v{version}: PSI per feature, {label}"),
               "most_shifted_features.png": plots.drift_histograms(
                   {f: (reference["features"][f]["values"], live["features"][f]["values"]) for f in shown},
                   f"{name} v{version}: reference (calibration traffic) vs {label}")}
    for fname, fig in figures.items():
        mlflow.log_figure(fig, f"plots/{fname}")
        plots.close(fig)
    top = [{"feature": r["feature"], "psi": round(r["psi"], 3), "ks": None if r["ks"] is None else round(r["ks"], 3)}
           for r in cmp["features"][:5]]
    worst = max(cmp["overflow"].items(), key=lambda kv: kv[1], default=(None, 0.0))
    if cmp["drifted"]:
        explanation = _explain(cmp["hits"])
        log.warning("%s v%s: traffic %s has drifted from its calibration: %s; %d feature(s) past a threshold",
                    name, version, label, explanation, len({h["feature"] for h in cmp["hits"]}))
    else:
        explanation = (f"no drift (largest PSI {cmp['drift_score']:.3f} < {dcfg.psi_threshold:g}, "
                       f"largest KS {max((r['ks'] or 0.0 for r in cmp['features']), default=0.0):.3f} "
                       f"< {dcfg.ks_threshold:g})")
        log.info("%s v%s: traffic %s matches its calibration: %s", name, version, label, explanation)
    if worst[0] is not None and worst[1] > 0:
        log.info("%s v%s: %.1f%% of requests exceed the calibration-time range of %s (what INT8 would clip)",
                 name, version, 100 * worst[1], worst[0])
    return {"verdict": "drifted" if cmp["drifted"] else "stable", "drift_score": round(cmp["drift_score"], 4),
            "top_features": top, "explanation": explanation,
            "max_overflow": {"layer": worst[0], "share": round(worst[1], 4)} if worst[0] else None}
