"""Can the routing gate resolve on this model? Routing accuracy of the unquantized LLM and a 4-bit checkpoint under
several prompts, the share of answers the checkpoint changes, and the messages a paired routing gate needs.

    .venv/bin/python bench/llm_4bit_benchmark.py --state /tmp/llmbench --variants mixed-5.5   # makes the checkpoint
    .venv/bin/python bench/llm_routing_power.py --state /tmp/llmbench --variant mixed-5.5 --rows 150

Reads the state folder the 4-bit benchmark leaves (its calibration version, the dequantised stand-in and
`variants/<variant>/checkpoint`) and scores a seeded, intent-stratified sample of selection messages with
`qat_tasks.llm.routing` (sampled as `qat_tasks.llm.measurement` samples the track's), both models on bitwise the same prompts:

  one example per intent      the track's prompt (one calibration message per intent, as the DAG builds it)
  three examples per intent   the same with three calibration messages per intent
  chat, described             the chat template: a system turn naming and describing each intent, no examples
  chat, one example           the same with one example per intent as user/assistant turns

Printed per prompt: raw and content-free calibrated routing accuracy of each model, the share of answers the
checkpoint changes (f), and the messages n the paired gate needs to resolve a candidate with no true loss:
its interval's half-width is about z * sqrt(f / n), so n = z^2 f / tolerance^2 (z from gates.confidence, the
tolerance gates.llm.max_routing_accuracy_drop_pts of the config).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DESCRIPTIONS = {"product_search": "looking for a title, volume or edition",
                "recommendation": "asks what to read next",
                "order_status": "where an order is",
                "shipping_info": "delivery costs, times and countries",
                "return_request": "wants to return or exchange an item",
                "payment_issue": "charges, refunds, cards",
                "account_help": "login, password, profile",
                "chitchat": "greetings, thanks, small talk",
                "checkout_help": "cannot finish a purchase",
                "escalation": "angry, asks for a person or a manager"}


def chat_prompt(tokenizer, intents, shots):
    """A RoutingPrompt in the tokenizer's chat format: the message is the user turn, the label the reply."""
    from qat_tasks.llm.routing import RoutingPrompt

    def turn(role: str, text: str) -> str:  # one turn alone (templates add a default system turn before a first user)
        if role == "system":
            return tokenizer.apply_chat_template([{"role": role, "content": text}], tokenize=False)
        head = [{"role": "system", "content": "-"}]
        both = tokenizer.apply_chat_template(head + [{"role": role, "content": text}], tokenize=False)
        return both[len(tokenizer.apply_chat_template(head, tokenize=False)):]

    class ChatPrompt(RoutingPrompt):
        def message_ids(self, text: str, max_tokens: int = 256) -> list[int]:
            user = turn("user", " ".join(text.split()))
            ids = self.tokenizer(user, add_special_tokens=False)["input_ids"][:max_tokens]
            return ids + self.tokenizer(reply_head, add_special_tokens=False)["input_ids"]

    system = ("You route customer messages of MangaAssist, an online manga shop, to exactly one intent. Reply with "
              "the intent name only. Intents:\n" + "\n".join(f"- {i}: {DESCRIPTIONS.get(i, i)}" for i in intents))
    # The assistant turn's opening and closing around an empty reply, read off the template itself.
    empty = turn("assistant", "\x00")
    reply_head, reply_tail = empty.split("\x00")
    prefix = turn("system", system) + "".join(turn("user", " ".join(t.split())) + turn("assistant", lbl)
                                              for t, lbl in shots)
    labels = tuple(tuple(tokenizer(f"{i}{reply_tail}", add_special_tokens=False)["input_ids"]) for i in intents)
    return ChatPrompt(tuple(intents), tuple(tokenizer(prefix, add_special_tokens=False)["input_ids"]), labels,
                      tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state", required=True, help="the 4-bit benchmark's state folder")
    ap.add_argument("--variant", default="mixed-5.5", help="the benchmark variant whose checkpoint to score")
    ap.add_argument("--rows", type=int, default=150, help="selection messages, stratified by intent")
    ap.add_argument("--config", default=None, help="profile (default: the embedded demo)")
    args = ap.parse_args()
    os.environ["QAT_STATE_DIR"] = str(Path(args.state).resolve())

    import glob
    from statistics import NormalDist

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat_tasks.core.config import load_config
    from qat_tasks.core.schema import INTENTS
    from qat_tasks.data.calibration_set import load_split
    from qat_tasks.llm import checkpoint, routing
    from qat_tasks.llm import model as llm_model
    from qat_tasks.llm.measurement import routing_sample

    cfg = load_config(args.config)
    mcfg = next(m for m in cfg.models if m.role == "llm")
    base_dir = llm_model.resolve_llm(cfg, mcfg.source)
    versions = sorted(glob.glob(str(Path(args.state) / "calibration" / "2*")))
    if not versions:
        sys.exit(f"{args.state} holds no calibration version: run bench/llm_4bit_benchmark.py --state {args.state}")
    ckpt = Path(args.state) / "variants" / args.variant / "checkpoint"
    if not (ckpt / "config.json").is_file():
        sys.exit(f"{ckpt} is missing: run bench/llm_4bit_benchmark.py --state {args.state} --variants {args.variant}")
    version = versions[-1]

    tc = mcfg.llm_track.model_copy(update={"routing_rows": args.rows})
    rows = routing_sample(cfg, tc, load_split(version, "selection", None))  # as the track samples its rows
    examples: dict[str, list[str]] = defaultdict(list)
    for r in load_split(version, "calibration", None):  # as the track picks its shots: short calibration messages
        if r["label"] in INTENTS and len(r["text"]) < 120:
            examples[r["label"]].append(r["text"])

    def shots(k: int) -> list[tuple[str, str]]:
        return [(examples[i][j], i) for j in range(k) for i in INTENTS if len(examples[i]) > j]

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = {"one example per intent (the track's)": routing.routing_prompt(tokenizer, INTENTS, shots(1)),
               "three examples per intent": routing.routing_prompt(tokenizer, INTENTS, shots(3))}
    if getattr(tokenizer, "chat_template", None):
        prompts |= {"chat, described": chat_prompt(tokenizer, INTENTS, []),
                    "chat, one example": chat_prompt(tokenizer, INTENTS, shots(1))}
    models = {"unquantized": AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval(),
              args.variant: checkpoint.load_quantized(ckpt)[0]}
    y = np.array([INTENTS.index(r["label"]) for r in rows])
    texts = [r["text"] for r in rows] + ["N/A"]  # the content-free message last
    z = NormalDist().inv_cdf(0.5 + cfg.gates.confidence / 2)
    tolerance = cfg.gates.llm.max_routing_accuracy_drop_pts / 100
    print(f"{len(rows)} selection messages of {version}; {args.variant} from {ckpt}; gate: {100 * tolerance:.0f} "
          f"points at {cfg.gates.confidence:.0%}\n")
    header = ["prompt", "unquantized % (calibrated)", f"{args.variant} % (calibrated)", "changed % (calibrated)",
              "messages needed"]
    table = []
    for name, prompt in prompts.items():
        answers = {}
        for label, model in models.items():
            scores = routing.routing_scores(model, prompt, texts, progress=False)
            raw, calibrated = scores[:-1].argmax(1), (scores[:-1] - scores[-1]).argmax(1)
            answers[label] = (raw, calibrated)
        (br, bc), (cr, cc) = answers.values()
        changed = float(np.mean(br != cr))
        table.append([name, f"{100 * np.mean(br == y):.1f} ({100 * np.mean(bc == y):.1f})",
                      f"{100 * np.mean(cr == y):.1f} ({100 * np.mean(cc == y):.1f})",
                      f"{100 * changed:.1f} ({100 * np.mean(bc != cc):.1f})",
                      f"{math.ceil(z * z * changed / tolerance ** 2):,}"])
        print(" | ".join(table[-1]), flush=True)
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print("\n" + "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
                           for r in [header, ["-" * w for w in widths], *table]))


if __name__ == "__main__":
    main()
