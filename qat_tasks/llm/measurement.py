"""The texts the 4-bit track calibrates on and measures with, and the measurement itself.

Calibration: the calibration version's LLM conversations, packed into samples, and generic Wikipedia/news text.
Selection (what candidates are screened and chosen on): the selection split's whole conversations, every other
held-out generic article, a stratified sample of routing messages, and the per-block sensitivity probe's windows
taken from those same articles. Judging (what decides the finalist): the evaluation split's conversations and
the other held-out articles. `evaluate` measures any model, unquantized or a candidate, the same way on either.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.config_sections import LlmTrackConfig
from qat_tasks.core.schema import INTENTS
from qat_tasks.data.calibration_set import load_split
from qat_tasks.llm import corpora, perplexity, routing

log = logging.getLogger(__name__)


@dataclass
class LlmData:
    """Everything every candidate is judged on, tokenized once: bitwise the same inputs for all."""

    domain_calibration: list[str]
    generic_calibration: list[str]
    generic_windows: object  # perplexity.TokenWindows
    domain_windows: object
    sensitivity_windows: object
    routing_rows: list[dict]
    shots: list[tuple[str, str]]
    judge: LlmData | None = None  # the same measurements on the judging texts (evaluation split): the finalist's

    def judging(self) -> LlmData:
        """The data that judges the finalist: the evaluation split's windows and routing rows."""
        if self.judge is None:
            raise ValueError("no judging texts were loaded")
        return self.judge

    def calibration_texts(self, which: str) -> list[str]:
        """The calibration texts a candidate names: domain, generic, both (domain first), or none."""
        return {"domain": self.domain_calibration, "generic": self.generic_calibration,
                "both": self.domain_calibration + self.generic_calibration, "none": []}[which]

    def describe(self) -> dict:
        return {"calibration.domain_texts": len(self.domain_calibration),
                "calibration.generic_texts": len(self.generic_calibration),
                "eval.generic_tokens": self.generic_windows.tokens, "eval.generic_digest": self.generic_windows.digest,
                "eval.domain_tokens": self.domain_windows.tokens, "eval.domain_digest": self.domain_windows.digest,
                "eval.routing_rows": len(self.routing_rows), "eval.routing_shots": len(self.shots)}


def load_data(cfg: PipelineConfig, tc: LlmTrackConfig, calibration_uri: str, tokenizer) -> LlmData:
    """Calibration text (the version's LLM conversations; gensim's text for the generic comparison), held-out
    selection text (the selection split's whole conversations; every other held-out gensim article) and, in
    `judge`, held-out judging text (the evaluation split's conversations; the other held-out articles)."""
    ep = cfg.traffic.s3_endpoint_url
    conversations = load_split(calibration_uri, "llm_conversations", ep)
    generic = corpora.generic_texts()
    # Conversations are short (a few customer turns): pack whole ones into samples of up to max_seq_len tokens,
    # so calibration sees as many of them as the sample budget holds.
    domain_cal = pack_texts(tokenizer, corpora.conversation_texts(conversations, tokenizer), tc.max_seq_len,
                            tc.calibration_samples)
    generic_cal = generic["calibration"][: tc.calibration_samples]
    shots: dict[str, str] = {}
    for r in load_split(calibration_uri, "calibration", ep):
        if r["label"] in INTENTS and r["label"] not in shots and len(r["text"]) < 120:
            shots[r["label"]] = r["text"]
    shot_list = [(shots[i], i) for i in INTENTS if i in shots]
    heldout = generic["heldout"]
    # The probe that allocates bits reads selection articles only: the judging articles decide, they do not choose.
    sensitivity_windows = perplexity.TokenWindows(tokenizer, heldout[0::2], tc.eval_window, tc.sensitivity_tokens)

    def held_out(split: str, articles: list[str]) -> LlmData:
        rows = load_split(calibration_uri, split, ep)
        by_conv: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_conv[r["conversation_id"]].append({"turn": r["turn"], "text": r["text"], "label": r["label"]})
        convs = [{"conversation_id": c, "turns": sorted(t, key=lambda x: x["turn"])} for c, t in sorted(by_conv.items())]
        domain_windows = perplexity.TokenWindows(tokenizer, corpora.conversation_texts(convs, tokenizer),
                                                 tc.eval_window, tc.eval_domain_tokens)
        generic_windows = perplexity.TokenWindows(tokenizer, articles, tc.eval_window, tc.eval_generic_tokens)
        return LlmData(domain_cal, generic_cal, generic_windows, domain_windows, sensitivity_windows,
                       routing_sample(cfg, tc, rows), shot_list)

    data = held_out("selection", heldout[0::2])
    data.judge = held_out("evaluation", heldout[1::2])
    return data


def routing_sample(cfg: PipelineConfig, tc: LlmTrackConfig, rows: list[dict]) -> list[dict]:
    """A seeded, intent-stratified sample of held-out messages for intent routing; the prompt's shots come from
    the calibration split, never from the rows judged."""
    rng = random.Random(cfg.calibration.seed)
    pool = [r for r in rows if r["label"] in INTENTS]
    rng.shuffle(pool)
    per_intent: dict[str, list[dict]] = defaultdict(list)
    for r in pool:
        per_intent[r["label"]].append(r)
    routing_rows: list[dict] = []
    while len(routing_rows) < min(tc.routing_rows, len(pool)):
        for intent in INTENTS:
            if per_intent[intent] and len(routing_rows) < tc.routing_rows:
                routing_rows.append(per_intent[intent].pop())
    return [{"text": r["text"], "label": r["label"]} for r in routing_rows]


def pack_texts(tokenizer, texts: list[str], max_tokens: int, max_samples: int) -> list[str]:
    """Whole texts joined (blank line between) into samples of at most `max_tokens` tokens, in order; a text
    longer than that is a sample of its own (the quantizer truncates it)."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    samples, current, used = [], [], 0
    for text, n in zip(texts, lengths, strict=True):
        if current and used + n + 2 > max_tokens:
            samples.append("\n\n".join(current))
            current, used = [], 0
            if len(samples) == max_samples:
                return samples
        current.append(text)
        used += n + 2
    if current and len(samples) < max_samples:
        samples.append("\n\n".join(current))
    return samples


def evaluate(model, tokenizer, data: LlmData, tc: LlmTrackConfig, batch_size: int = 4,
             generations: bool = True) -> dict:
    """The same measurements for the unquantized model and every candidate. `generations=False` skips the greedy
    replies, which only reviewers read (the judging texts' decision reads the gated metrics)."""
    t0 = time.perf_counter()
    generic = perplexity.perplexity(model, data.generic_windows, batch_size=batch_size)
    domain = perplexity.perplexity(model, data.domain_windows, batch_size=batch_size)
    route = routing.routing_accuracy(model, tokenizer, data.routing_rows, list(INTENTS), data.shots)
    replies = (routing.greedy_generations(model, tokenizer, list(tc.generation_prompts), tc.max_new_tokens)
               if generations else [])
    for name, w, r in (("generic", data.generic_windows, generic), ("domain", data.domain_windows, domain)):
        if r.get("digest", w.digest) != w.digest:  # never compare numbers measured on different inputs
            raise RuntimeError(f"{name} perplexity was measured on windows {r['digest'][:12]}, not {w.digest[:12]}")
    outcomes = {"perplexity_generic": (np.array(generic["window_nll"]), np.array(generic["window_tokens"], float)),
                "perplexity_domain": (np.array(domain["window_nll"]), np.array(domain["window_tokens"], float)),
                "routing_accuracy": {"y": np.array([r["label"] for r in data.routing_rows]),
                                     "pred": np.array(route["predictions"])}}
    return {"outcomes": outcomes,
            "metrics": {"perplexity_generic": generic["perplexity"], "perplexity_domain": domain["perplexity"],
                        "routing_accuracy": route["accuracy"], "routing_macro_f1": route["macro_f1"],
                        **({"routing_accuracy_calibrated": route["calibrated_accuracy"]}
                           if "calibrated_accuracy" in route else {}),
                        "eval_s": time.perf_counter() - t0},
            "routing": _jsonable({k: v for k, v in route.items() if k not in ("predictions", "scores")}),
            "generations": replies}


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
