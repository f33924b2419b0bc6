"""Intent routing and generations: can the quantized LLM still route a customer message to the right intent?

The LLM picks one of the ten intents by the log-probability of each label as the continuation of a fixed few-shot
prompt; the shared prompt is encoded once and its KV cache reused for every message. Greedy generations, for
reviewers to read side by side, use the chat template with the assistant's system prompt.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from qat_tasks.core.schema import INTENTS
from qat_tasks.llm.corpora import SYSTEM_PROMPT
from qat_tasks.llm.perplexity import device_of

# ---------------------------------------------------------------------------------------------------------------
# Intent routing by label scoring
# ---------------------------------------------------------------------------------------------------------------
# One example per intent, written for this prompt (not drawn from the traffic templates).
DEFAULT_SHOTS: tuple[tuple[str, str], ...] = (
    ("is the Frieren box set available?", "product_search"),
    ("I loved Vinland Saga, anything similar?", "recommendation"),
    ("my package MA-55120 still hasn't moved", "order_status"),
    ("how much does delivery to Canada cost", "shipping_info"),
    ("volume 4 came with a torn cover, I'd like to send it back", "return_request"),
    ("I got billed twice for the same order", "payment_issue"),
    ("I forgot my password and can't sign in", "account_help"),
    ("hey, thanks a lot!", "chitchat"),
    ("the pay button does nothing when I try to finish my order", "checkout_help"),
    ("this is the third time I'm asking, let me speak to a manager", "escalation"),
)


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class RoutingPrompt:
    """The token ids of the routing prompt. A row's full sequence is prefix_ids + message_ids(text) +
    label_ids[k]; the score of intent k is the log-probability of label_ids[k] given the rest."""

    intents: tuple[str, ...]
    prefix_ids: tuple[int, ...]
    label_ids: tuple[tuple[int, ...], ...]
    tokenizer: object

    def message_ids(self, text: str, max_tokens: int = 256) -> list[int]:
        ids = self.tokenizer(f"Customer: {_one_line(text)}", add_special_tokens=False)["input_ids"][:max_tokens]
        return ids + list(self.tokenizer("\nIntent:", add_special_tokens=False)["input_ids"])


def routing_prompt(tokenizer, intents=INTENTS, shots=DEFAULT_SHOTS) -> RoutingPrompt:
    """Instructions, the intent list and the few-shot examples, then per row "Customer: {text}\\nIntent:";
    each label is scored as " {intent}\\n" (the newline closes the label, so "order" cannot win for
    order_status). A plain completion prompt, no chat template: the same text for base and instruct models."""
    intents = tuple(intents)
    unknown = {lbl for _, lbl in shots} - set(intents)
    if unknown:
        raise ValueError(f"shots use labels that are not intents: {sorted(unknown)}")
    head = ("MangaAssist routes each customer message of an online manga shop to exactly one intent: "
            f"{', '.join(intents)}.\n")
    body = "".join(f"Customer: {_one_line(text)}\nIntent: {label}\n" for text, label in shots)
    prefix = tokenizer(head + body)["input_ids"]  # with BOS where the tokenizer adds one (Llama 3 does)
    if tokenizer.eos_token_id is not None and len(prefix) > 1 and prefix[-1] == tokenizer.eos_token_id:
        prefix = prefix[:-1]
    labels = tuple(tuple(tokenizer(f" {i}\n", add_special_tokens=False)["input_ids"]) for i in intents)
    return RoutingPrompt(intents, tuple(prefix), labels, tokenizer)


def routing_scores(model, prompt: RoutingPrompt, texts: list[str], progress: bool = True,
                   batch_size: int = 8) -> np.ndarray:
    """[rows, intents] total log-probability of each label.

    The shared prefix runs once. Each forward pass then takes `batch_size` messages on copies of its KV cache, one
    row per message: the message (right-padded), then every label's tokens side by side. A tree-shaped attention
    mask lets each label see the prefix, its own message and its own earlier tokens only, and each label's positions
    continue from its message's end, so every label scores as if it alone followed the message, while the cache is
    copied once per message rather than once per message and label."""
    import torch
    from tqdm.auto import tqdm

    device, dtype = device_of(model), next(model.parameters()).dtype
    k, n_prefix = len(prompt.intents), len(prompt.prefix_ids)
    span = max(len(ids) for ids in prompt.label_ids) - 1  # label tokens fed as input: all but each label's last
    # Right-padded label inputs: a pad sits after a label's inputs, so it never affects that label's score.
    label_in = [list(ids[:-1]) + [ids[-1]] * (span - len(ids) + 1) for ids in prompt.label_ids]
    first = torch.tensor([ids[0] for ids in prompt.label_ids], device=device)
    rest = [torch.tensor(ids[1:], device=device) for ids in prompt.label_ids]
    out = np.zeros((len(texts), k))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            prefix = model(input_ids=torch.tensor([prompt.prefix_ids], device=device), use_cache=True,
                           logits_to_keep=1).past_key_values
            bar = tqdm(total=len(texts), desc="intent routing", unit="msg", disable=not progress, mininterval=5)
            encoded = [prompt.message_ids(t) for t in texts]
            order = sorted(range(len(texts)), key=lambda r: len(encoded[r]))  # batches of like lengths pad little
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                messages = [encoded[r] for r in rows]
                n, width = len(messages), max(len(m) for m in messages)
                length = width + k * span
                ids = torch.zeros((n, length), dtype=torch.long, device=device)
                pos = torch.zeros((n, length), dtype=torch.long, device=device)
                seen = torch.zeros((n, length, n_prefix + length), dtype=torch.bool, device=device)
                seen[:, :, :n_prefix] = True
                causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
                own = torch.ones((span, span), dtype=torch.bool, device=device).tril()
                for b, m in enumerate(messages):
                    used = len(m)
                    ids[b, :width] = torch.tensor(m + [m[-1]] * (width - used), device=device)
                    pos[b, :width] = n_prefix + torch.arange(width, device=device)
                    seen[b, :width, n_prefix:n_prefix + width] = causal
                    for j in range(k):
                        s = width + j * span
                        ids[b, s:s + span] = torch.tensor(label_in[j], device=device)
                        pos[b, s:s + span] = n_prefix + used + torch.arange(span, device=device)
                        seen[b, s:s + span, n_prefix:n_prefix + used] = True
                        seen[b, s:s + span, n_prefix + s:n_prefix + s + span] = own
                mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(n)
                ends = torch.tensor([len(m) - 1 for m in messages], device=device)
                keep = torch.cat([ends.unique(), torch.arange(width, length, device=device)])  # logits read below
                logits = model(input_ids=ids, attention_mask=mask[:, None], position_ids=pos, past_key_values=cache,
                               use_cache=True, logits_to_keep=keep).logits.float()
                logp = torch.log_softmax(logits, -1)
                at = {int(t): i for i, t in enumerate(keep)}
                for b in range(n):
                    score = logp[b, at[int(ends[b])]][first].double()
                    for j in range(k):
                        s = width + j * span
                        steps = logp[b, [at[s + t] for t in range(len(rest[j]))]]
                        score[j] += steps.gather(-1, rest[j][:, None])[:, 0].double().sum()
                    out[rows[b]] = score.cpu().numpy()
                bar.update(n)
            bar.close()
    finally:
        model.train(was_training)
    return out


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def routing_accuracy(model, tokenizer, rows: list[dict], intents=INTENTS, shots=DEFAULT_SHOTS,
                     rare: tuple[str, ...] = ("escalation", "checkout_help"), content_free: str | None = "N/A",
                     progress: bool = True) -> dict:
    """The LLM as an intent router on labelled rows ({"text", "label"}): predicts the intent whose label
    continuation is most likely. Returns accuracy, per-intent accuracy (recall), macro-F1, rare-intent and
    escalation figures, the confusion matrix (counts, rows true, columns predicted, in `intents` order), n,
    predictions and the per-intent scores.

    Small models lean towards some labels whatever the message (the last few-shot example, short labels), so
    with `content_free` set the report adds calibrated_accuracy / calibrated_macro_f1: scores minus those of a
    content-free message (contextual calibration, Zhao et al. 2021), one extra row. The headline accuracy is
    the raw one."""
    from qat_tasks.core.metrics import classification_report

    intents = list(intents)
    bad = sorted({r["label"] for r in rows} - set(intents))
    if bad:
        raise ValueError(f"rows labelled with intents outside the list: {bad}")
    t0 = time.perf_counter()
    prompt = routing_prompt(tokenizer, intents, shots)
    texts = [r["text"] for r in rows] + ([content_free] if content_free is not None else [])
    scores = routing_scores(model, prompt, texts, progress=progress)
    prior = scores[-1] if content_free is not None else None
    scores = scores[:len(rows)]
    y = np.array([intents.index(r["label"]) for r in rows])
    report = classification_report(y, _softmax(scores), intents, list(rare))  # softmax: confidence for ECE
    report.update({
        "per_intent_accuracy": {i: m["recall"] for i, m in report["per_class"].items() if m["support"]},
        "predictions": [intents[j] for j in scores.argmax(1)],
        "scores": scores,
        "labels": intents,
        "prompt_tokens": len(prompt.prefix_ids),
        "prior_scores": prior,
        "seconds": time.perf_counter() - t0,
    })
    if prior is not None:
        calibrated = classification_report(y, _softmax(scores - prior), intents, list(rare))
        report.update({"calibrated_accuracy": calibrated["accuracy"], "calibrated_macro_f1": calibrated["macro_f1"]})
    return report


# ---------------------------------------------------------------------------------------------------------------
# Generations, size, memory, chart
# ---------------------------------------------------------------------------------------------------------------
def greedy_generations(model, tokenizer, prompts: list[str], max_new_tokens: int = 48,
                       system_prompt: str = SYSTEM_PROMPT) -> list[str]:
    """Greedy (do_sample=False) replies, one prompt at a time (no padding effects), with the chat template and
    the MangaAssist system prompt where the tokenizer has a template, else a "Customer:/Assistant:" prompt.
    Read side by side, they show what perplexity does not: a candidate that lost its manners or its language."""
    import torch

    device = device_of(model)
    out = []
    with torch.inference_mode():
        for p in prompts:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "system", "content": system_prompt},
                                                      {"role": "user", "content": p}],
                                                     tokenize=False, add_generation_prompt=True)
                enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            else:
                enc = tokenizer(f"{system_prompt}\nCustomer: {p}\nAssistant:", return_tensors="pt")
            # Causal LMs take ids and mask only (a BERT-style tokenizer adds token_type_ids).
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad)
            out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out
