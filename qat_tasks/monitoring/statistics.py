"""Per-request statistics of traffic, computed with the FP32 weights every registered version carries (an INT8
version keeps the FP32 folder it came from), so FP32 and INT8 champions are measured alike:

  activations  per key layer (each LayerNorm output: embeddings, attention output, FFN output; and each FFN
               activation output, after GELU, where outliers live), over the request's non-padding tokens:
               max |a| (what sets an INT8 range) and the 99th percentile of |a|. Per layer, for the report:
               min and max, and the 0.1, 1, 50, 99 and 99.9th percentiles of a seeded sample of 64 values
               per request.
  inputs       characters, tokens, share of [UNK] tokens, non-English (data.sampling.is_non_english)
  predictions  the model's predicted label and its top-1 confidence
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)


SAMPLE_PER_REQUEST = 64


class DriftError(RuntimeError):
    """The monitor cannot compare: the message says what is missing and where it looked."""


# -- statistics --------------------------------------------------------------------------------------------
def four_digits(x: float) -> float:
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

    from qat_tasks.encoders.modeling import tokenize

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
                values["confidence"] += [four_digits(c) for c in conf.tolist()]
                mask = enc["attention_mask"].bool()
                for name, out in captured.items():
                    for row, keep in zip(out, mask, strict=True):
                        act = row[keep].reshape(-1)  # this request's non-padding tokens, all channels
                        mag = act.abs()
                        values[f"{name}.absmax"].append(four_digits(mag.max().item()))
                        k = max(1, int(np.ceil(0.99 * mag.numel())))
                        values[f"{name}.p99"].append(four_digits(mag.kthvalue(k).values.item()))
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
        values["unk_share"].append(four_digits(sum(t == unk for t in ids) / max(1, len(ids))))
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
            layer_stats[name] = {"min": four_digits(lo[name]), "max": four_digits(hi[name]),
                                 **{f"p{p:g}": four_digits(v) for p, v in zip(PERCENTILES, pct, strict=True)}}
    return {"features": features, "layers": layer_stats, "rows": len(records)}
