"""Mixed precision chosen by measurement: which Linear layers of the LLM keep 8-bit weights and which go to 4-bit,
under an average-bits budget.

Two measurements decide it:
  per block  the perplexity increase when that decoder block alone is 4-bit (qat_tasks.llm.sensitivity);
  per layer  each Linear's share of its block's 4-bit output error on the calibration text, estimated as
             sum_ij dW_ij^2 E[x_j^2] (dW: the weight's rounding error at 4 bits; E[x_j^2]: the mean square of input
             channel j over the calibration tokens, the importance matrix llama.cpp's imatrix collects).
A layer's sensitivity is its block's perplexity increase times its share of the block's error. Layers vLLM fuses into
one kernel (q/k/v, gate/up) must share a scheme, so they move together. Greedy: the group with the most sensitivity
per extra bit goes to 8-bit first, until the next one would break the budget.

Bits are counted as the checkpoint stores them: packed weights, scales and zero points per decoder-layer weight
(`stored_bits`, read from the safetensors headers); the LM head and embeddings stay 16-bit and are counted apart.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qat_tasks.llm.formats import effective_group_size
from qat_tasks.llm.sensitivity import rtn_fake_quant

log = logging.getLogger(__name__)

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Scheme:
    """One weight format: bits, group size (None: one scale per output channel), zero point or not."""

    bits: int
    group_size: int | None
    symmetric: bool
    scale_bits: int = 32  # the scales' dtype as stored (the model's: fp32 for the CPU stand-in, bf16 for Llama 3)

    def bits_per_weight(self, in_features: int) -> float:
        """Stored bits per weight of a layer `in_features` wide: packed value, scale, zero point (packed like values)."""
        group = in_features if self.group_size is None else effective_group_size(in_features, self.group_size)
        zero = 0 if self.symmetric else self.bits
        return self.bits + (self.scale_bits + zero) / group


@dataclass
class Unit:
    """Layers that share one scheme (a fused group, or a lone Linear) and what upgrading them buys."""

    names: tuple[str, ...]
    block: int
    weights: int
    in_features: int
    error_share: float = 0.0  # of its block's 4-bit output error
    sensitivity: float = 0.0  # block perplexity increase (%) x error share


def units_of(model) -> list[Unit]:
    """The model's decoder-layer Linear layers in scheme groups."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _BLOCK.search(n)}
    seen, units = set(), []
    for name, lin in linears.items():
        if name in seen:
            continue
        parent, leaf = name.rsplit(".", 1)
        group = next((g for g in FUSED if leaf in g), (leaf,))
        names = tuple(f"{parent}.{g}" for g in group if f"{parent}.{g}" in linears)
        seen.update(names)
        units.append(Unit(names, int(_BLOCK.search(name)[1]), sum(linears[n].weight.numel() for n in names),
                          lin.in_features))
    return units


@torch.no_grad()
def layer_errors(model, samples: list[dict], low: Scheme) -> dict[str, float]:
    """Each decoder-layer Linear's output error at the `low` scheme on the calibration samples (tokenized, as the
    quantizer takes them): sum_ij dW_ij^2 E[x_j^2]."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and _BLOCK.search(name):
            def hook(_, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + x.square().sum(0, dtype=torch.float64)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    body = model.get_decoder() if hasattr(model, "get_decoder") else model  # no logits: the LM head is not scored
    try:
        with torch.inference_mode():
            for s in samples:
                body(input_ids=s["input_ids"], attention_mask=s.get("attention_mask"), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    errors = {}
    for name, mod in model.named_modules():
        if name in sums:
            w = mod.weight.detach()
            dw = rtn_fake_quant(w, low.bits, low.group_size or w.shape[1], low.symmetric).double() - w.double()
            errors[name] = float(((dw * dw) * (sums[name] / counts[name])[None, :]).sum())
    return errors


def score(units: list[Unit], errors: dict[str, float], block_increase: dict[int, float]) -> list[Unit]:
    """Each unit's sensitivity: its block's perplexity increase (%, at least 0) times its share of the block's error."""
    per_block: dict[int, float] = {}
    for u in units:
        per_block[u.block] = per_block.get(u.block, 0.0) + sum(errors[n] for n in u.names)
    for u in units:
        total = per_block[u.block]
        u.error_share = sum(errors[n] for n in u.names) / total if total > 0 else 0.0
        u.sensitivity = max(0.0, block_increase.get(u.block, 0.0)) * u.error_share
    return units


def allocate(units: list[Unit], low: Scheme, high: Scheme, average_bits: float) -> tuple[dict[str, int], float]:
    """{layer name: bits} and the average stored bits per decoder-layer weight: every unit at `low`, then the most
    sensitive units per extra stored bit at `high` while the average stays within `average_bits`."""
    total = sum(u.weights for u in units)
    bits = {u.names: low for u in units}
    used = sum(u.weights * low.bits_per_weight(u.in_features) for u in units)
    if used / total > average_bits:
        raise ValueError(f"average_bits {average_bits}: {low.bits}-bit weights alone take {used / total:.3f} stored "
                         f"bits per weight (scales and zero points included)")

    def extra(u: Unit) -> float:
        return u.weights * (high.bits_per_weight(u.in_features) - low.bits_per_weight(u.in_features))

    for u in sorted(units, key=lambda u: -u.sensitivity / extra(u)):
        if u.sensitivity <= 0:
            break
        if (used + extra(u)) / total <= average_bits:
            bits[u.names] = high
            used += extra(u)
    return {n: s.bits for names, s in bits.items() for n in names}, used / total


def table(units: list[Unit], chosen: dict[str, int]) -> list[dict]:
    """One row per unit, as the report logs it."""
    return [{"block": u.block, "layers": ", ".join(n.rsplit(".", 1)[-1] for n in u.names), "weights": u.weights,
             "error_share": round(u.error_share, 4), "sensitivity": round(u.sensitivity, 4),
             "bits": chosen[u.names[0]]} for u in units]


def stored_bits(checkpoint: Path) -> dict:
    """What the checkpoint stores per decoder-layer Linear weight, and beside it: the average bits per decoder-layer
    weight (packed values, scales, zero points), the bits of each layer, and the bytes of the embeddings and LM head
    (kept at 16 bits or wider, counted apart). Tensor sizes come from the safetensors headers; only the two-number
    `weight_shape` tensors are read."""
    from safetensors import safe_open

    per_layer: dict[str, dict] = {}
    other = 0
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        with safe_open(str(f), "pt") as st:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                if not _BLOCK.search(name):
                    other += (end - start) if ("embed" in name or "lm_head" in name) else 0
                    continue
                if "norm" in name.rsplit(".", 2)[-2]:
                    continue  # layer norms: not Linear weights
                layer, _, part = name.rpartition(".")
                row = per_layer.setdefault(layer, {"bytes": 0, "weights": 0})
                if part == "weight_shape":  # metadata: the unpacked shape
                    row["weights"] = math.prod(int(v) for v in st.get_tensor(name).tolist())
                    continue
                row["bytes"] += end - start
                if part == "weight":  # kept unquantized
                    row["weights"] = math.prod(info["shape"])
    weights = sum(r["weights"] for r in per_layer.values())
    stored = sum(r["bytes"] for r in per_layer.values())
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return {"average_bits": 8 * stored / weights, "decoder_weights": weights, "decoder_bytes": stored,
            "embeddings_and_head_bytes": other, "tied_embeddings": bool(config.get("tie_word_embeddings")),
            "per_layer": {k: round(8 * v["bytes"] / v["weights"], 4) for k, v in sorted(per_layer.items())}}


def chart(rows: list[dict], title: str):
    """Sensitivity per layer group, block by block, coloured by the bits it got."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 0.09 * len(rows)), 4))
    colours = ["tab:red" if r["bits"] > 4 else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r["sensitivity"] for r in rows], color=colours)
    ticks = [i for i, r in enumerate(rows) if i == 0 or rows[i - 1]["block"] != r["block"]]
    ax.set_xticks(ticks, [str(rows[i]["block"]) for i in ticks], fontsize=7)
    ax.set_xlabel("decoder block (each bar a layer group: q/k/v, o, gate/up, down); red: 8-bit, blue: 4-bit")
    ax.set_ylabel("sensitivity (block ppl increase % x error share)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
