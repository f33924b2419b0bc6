"""The rows each encoder learns from and is judged on, per split, built the same way every time from one
calibration version and the public data, so every stage of a DAG run (and every rerun) sees the same rows.

  intent_classifier    the calibration version's splits as they are (selection, evaluation: human-reviewed rows only)
  escalation_detector  calm / frustrated: VADER's human-rated Amazon-review and tweet sentences (mean rating
                       at or below `frustrated_max_rating`: frustrated; at or above `calm_min_rating`: calm)
                       plus the version's MangaAssist traffic (escalation intent: frustrated; the rest: calm)
  reranker             groups of `candidates_per_query` (query, passage) pairs with one relevant passage:
                       chitchat-dataset turns (the true next message among messages of other conversations)
                       and MangaAssist product searches (the product asked for among others of the catalog,
                       the same title's other volumes and formats first)

Public rows are split by a seeded hash of their id (data.sampling.public_split_of) with the calibration split
fractions; traffic rows stay in the split the refresh put them in. `data.max_rows` caps each split (rows, or
query groups).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from qat_tasks.core.config import PipelineConfig
from qat_tasks.data.calibration_set import load_manifest, load_split
from qat_tasks.data.catalogue import FORMATS, TITLES, describe_product, product_asked
from qat_tasks.data.public_data import (
    CHITCHAT_SOURCE,
    VADER_SOURCE,
    chitchat_dialogues,
    hutto_sentences,
    read_source,
)
from qat_tasks.data.sampling import JUDGED_SPLITS, SPLITS, public_split_of, public_unit

log = logging.getLogger(__name__)

ESCALATION_LABELS = ("calm", "frustrated")
RERANK_LABELS = ("irrelevant", "relevant")


@dataclass
class RoleSplits:
    rows: dict[str, list[dict]]
    summary: dict = field(default_factory=dict)  # counts per split and source, the sources and a digest

    def __getitem__(self, split: str) -> list[dict]:
        return self.rows[split]


_CACHE: dict[tuple, RoleSplits] = {}


def load(cfg: PipelineConfig, model_name: str, calibration_uri: str) -> RoleSplits:
    mcfg = cfg.model(model_name)
    key = (model_name, calibration_uri, mcfg.role, mcfg.data.model_dump_json(), cfg.calibration.seed)
    if key not in _CACHE:
        endpoint = cfg.traffic.s3_endpoint_url
        traffic = {s: load_split(calibration_uri, s, endpoint) for s in SPLITS}
        version = load_manifest(calibration_uri, endpoint)["version"]
        if mcfg.role == "escalation_detector":
            splits = escalation_splits(cfg, model_name, traffic)
        elif mcfg.role == "reranker":
            splits = rerank_splits(cfg, model_name, traffic)
        elif mcfg.role == "intent_classifier":
            splits = RoleSplits(traffic, {"sources": {"mangaassist": calibration_uri}})
        else:
            raise ValueError(f"model {model_name}: role {mcfg.role} has no encoder rows")
        blob = json.dumps(splits.rows, sort_keys=True, ensure_ascii=False).encode()
        splits.summary.update({"calibration_version": version, "digest": hashlib.sha256(blob).hexdigest()[:16],
                               "rows": {s: len(splits.rows[s]) for s in SPLITS}})
        log.info("%s rows from calibration %s: %s (digest %s)", model_name, version, splits.summary["rows"],
                 splits.summary["digest"])
        _CACHE[key] = splits
    return _CACHE[key]


def _cap(items: list, n: int | None, seed: int, key=lambda x: x["id"]) -> list:
    """At most `n` items, chosen by a seeded hash (stable when more data arrives), in a stable order."""
    ranked = sorted(items, key=lambda x: public_unit(seed, key(x)))
    return ranked[:n] if n is not None else ranked


# -- escalation detector -------------------------------------------------------------------------------

def escalation_splits(cfg: PipelineConfig, model_name: str, traffic: dict[str, list[dict]]) -> RoleSplits:
    dc = cfg.model(model_name).data
    source = dc.public_source or VADER_SOURCE
    sentences = hutto_sentences(read_source(cfg, source))
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    ambiguous = 0
    for s in sentences:
        if s["rating"] <= dc.frustrated_max_rating:
            label = "frustrated"
        elif s["rating"] >= dc.calm_min_rating:
            label = "calm"
        else:
            ambiguous += 1
            continue
        rows[public_split_of(cfg, s["id"])].append({"id": s["id"], "text": s["text"], "label": label,
                                              "label_source": "human_rated", "source": s["corpus"],
                                              "language": "en"})
    for split, trows in traffic.items():
        rows[split].extend({"id": r["request_id"], "text": r["text"],
                            "label": "frustrated" if r["label"] == "escalation" else "calm",
                            "label_source": r["label_source"], "source": "mangaassist",
                            "language": r.get("language", "en")} for r in trows)
    seed = cfg.calibration.seed
    rows = {s: _cap(rows[s], getattr(dc.max_rows, s), seed) for s in SPLITS}
    for split in SPLITS:
        missing = {lbl for lbl in ESCALATION_LABELS} - {r["label"] for r in rows[split]}
        if missing:
            raise ValueError(f"{model_name}: the {split} split has no {sorted(missing)} rows; check data.max_rows "
                             f"and the rating bands")
    counts = {s: dict(Counter(f"{r['source']}/{r['label']}" for r in rows[s])) for s in SPLITS}
    log.info("%s: %d human-rated sentences from %s (%d in the ambiguous band left out)", model_name,
             len(sentences) - ambiguous, source, ambiguous)
    return RoleSplits(rows, {"sources": {"public": source, "mangaassist": "calibration splits"},
                             "ambiguous_left_out": ambiguous, "counts": counts})


# -- reranker ------------------------------------------------------------------------------------------

def _product_candidates(asked: tuple[str, int, str], n: int, rng: random.Random) -> list[str]:
    title, vol, fmt = asked
    hard = [(title, v, fmt) for v in (vol + 1, vol + 2, max(1, vol - 1)) if v != vol]
    hard += [(title, vol, f) for f in rng.sample([f for f in FORMATS if f != fmt], 3)]
    others = [(t, rng.randint(1, 60), rng.choice(FORMATS)) for t in rng.sample([t for t in TITLES if t != title], n)]
    return [describe_product(*p) for p in dict.fromkeys(hard + others)][:n]


def _group_rows(group: str, query: str, positive: str, negatives: list[str], source: str, split: str,
                train_negatives: int) -> list[dict]:
    keep = negatives if split in JUDGED_SPLITS else negatives[:train_negatives]
    return [{"id": f"{group}#{i}", "group": group, "text": query, "text_pair": passage,
             "label": "relevant" if i == 0 else "irrelevant", "label_source": "observed", "source": source}
            for i, passage in enumerate([positive, *keep])]


def rerank_splits(cfg: PipelineConfig, model_name: str, traffic: dict[str, list[dict]]) -> RoleSplits:
    """Selection and evaluation groups keep all candidates (NDCG@10 and MRR@10 rank them); training and calibration groups
    keep the relevant pair and `train_negatives` irrelevant ones."""
    dc = cfg.model(model_name).data
    source = dc.public_source or CHITCHAT_SOURCE
    dialogues = chitchat_dialogues(read_source(cfg, source))
    seed, n_neg = cfg.calibration.seed, dc.candidates_per_query - 1
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for cid in dialogues:
        if sum(1 for m in dialogues[cid] if m) >= 2:
            by_split[public_split_of(cfg, f"chitchat:{cid}")].append(cid)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    counts: dict[str, dict] = {}
    for split in SPLITS:
        cap = getattr(dc.max_rows, split)
        n_products = None if cap is None else round(cap * dc.product_query_share)
        # MangaAssist product searches: the refresh's labelled traffic of this split.
        searches = [r for r in traffic[split] if r["label"] == "product_search" and product_asked(r["text"])]
        searches = _cap(searches, n_products, seed, key=lambda r: r["request_id"])
        for r in searches:
            rng = random.Random(f"{seed}:{r['request_id']}")
            asked = product_asked(r["text"])
            rows[split] += _group_rows(f"product:{r['request_id']}", r["text"], describe_product(*asked),
                                       _product_candidates(asked, n_neg, rng), "mangaassist", split, dc.train_negatives)
        # chitchat: one turn per conversation, the true reply among replies from other conversations.
        cids = _cap(by_split[split], None if cap is None else max(0, cap - len(searches)), seed, key=lambda c: c)
        pool = [(c, m) for c in by_split[split] for m in dialogues[c] if m]
        for cid in cids:
            rng = random.Random(f"{seed}:{cid}")
            msgs = [m for m in dialogues[cid] if m]
            t = rng.randrange(1, len(msgs))
            negatives: list[str] = []
            for _ in range(50 * n_neg):
                if len(negatives) == n_neg:
                    break
                other, msg = pool[rng.randrange(len(pool))]
                if other != cid and msg not in negatives and msg != msgs[t]:
                    negatives.append(msg)
            if len(negatives) < n_neg:
                raise ValueError(f"{model_name}: the {split} split has too few chitchat messages for "
                                 f"{dc.candidates_per_query} candidates per query")
            rows[split] += _group_rows(f"chitchat:{cid}:{t}", msgs[t - 1], msgs[t], negatives, "chitchat", split,
                                       dc.train_negatives)
        counts[split] = {"product_queries": len(searches), "chitchat_turns": len(cids)}
        if not rows[split]:
            raise ValueError(f"{model_name}: no reranking groups in the {split} split")
    log.info("%s: reranking groups per split %s (%d candidates each in evaluation)", model_name, counts,
             dc.candidates_per_query)
    return RoleSplits(rows, {"sources": {"public": source, "mangaassist": "product searches of the calibration splits"},
                             "groups": counts, "candidates_per_query": dc.candidates_per_query})
