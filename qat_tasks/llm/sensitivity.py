"""Per-block sensitivity of the LLM to 4-bit weights: which blocks to keep at 16-bit rests on measurement.

Each unit (one decoder block, or lm_head) is quantized ALONE with round-to-nearest at the track's bits and
group size, the rest of the model left as it is, and perplexity is measured on the same held-out windows as
every candidate. The units whose quantization costs the most perplexity are the ones mixed precision keeps.
RTN is the probe because it is the same for every method and needs no calibration; AWQ and GPTQ reduce the
error of every unit, but the ranking of units is what the report is for.
"""

from __future__ import annotations

import logging
import math

import torch

from qat_tasks.llm.formats import effective_group_size

log = logging.getLogger(__name__)


@torch.no_grad()
def rtn_fake_quant(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize a [out, in] weight per output row and group of `group_size` input columns."""
    out_f, in_f = weight.shape
    g = effective_group_size(in_f, group_size)
    w = weight.float().reshape(out_f, in_f // g, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (w.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-8)
        q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
        deq = q * scale
    else:
        qmax = 2**bits - 1
        lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zp = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale) + zp, 0, qmax)
        deq = (q - zp) * scale
    return deq.reshape(out_f, in_f).to(weight.dtype)


def units(model) -> list[tuple[str, list[torch.nn.Linear]]]:
    """(name, Linear layers) per decoder block, and lm_head."""
    out = [(f"block {i}", [m for m in layer.modules() if isinstance(m, torch.nn.Linear)])
           for i, layer in enumerate(model.model.layers)]
    return [*out, ("lm_head", [model.lm_head])]


@torch.no_grad()
def block_sensitivity(model, windows, perplexity, bits: int, group_size: int, symmetric: bool,
                      batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity with each unit alone at `bits`; returns the unquantized perplexity and one row per unit,
    sorted as the model is laid out (block 0 first).

    Blocks before the quantized one compute what they compute unquantized, so their outputs are taken once per
    batch from the unquantized pass and only the blocks from the quantized one on are run again: the same numbers
    as running the whole model each time (checked by the tests), for about half the compute."""
    from tqdm.auto import tqdm

    base = perplexity(model, windows, batch_size=batch_size)["perplexity"]
    layers = list(getattr(getattr(model, "model", None), "layers", None) or [])
    named = units(model)
    nll = [0.0] * len(named)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="per-block sensitivity", unit="batch",
                          disable=not progress):
            x = windows.ids[start:start + batch_size].to(next(model.parameters()).device)
            inputs = _block_inputs(model, layers, x)
            for u, (_name, linears) in enumerate(named):
                saved = [lin.weight for lin in linears]
                try:
                    for lin in linears:
                        # A new Parameter, so a weight tied to the embeddings (lm_head) is not quantized in both places.
                        lin.weight = torch.nn.Parameter(rtn_fake_quant(lin.weight, bits, group_size, symmetric),
                                                        requires_grad=False)
                    first = u if u < len(layers) else len(layers)  # lm_head: from the last block's output
                    nll[u] += _nll_from(model, layers, inputs, first, x)
                finally:
                    for lin, w in zip(linears, saved, strict=True):
                        lin.weight = w
            count += x.shape[0] * (x.shape[1] - 1)
    finally:
        model.train(was_training)
    rows = []
    for (name, _), total in zip(named, nll, strict=True):
        ppl = math.exp(total / count)
        rows.append({"unit": name, "perplexity": ppl, "increase_pct": 100 * (ppl / base - 1)})
        log.info("sensitivity %s: perplexity %.3f (%+.2f %%)", name, ppl, rows[-1]["increase_pct"])
    return {"base_perplexity": base, "rows": rows,
            "most_sensitive": [r["unit"] for r in sorted(rows, key=lambda r: -r["increase_pct"])]}


def _block_inputs(model, layers, x) -> list[tuple[tuple, dict]]:
    """What each decoder block receives (positional and keyword arguments) in the unquantized forward pass of
    `x`, the last entry being the final hidden states the norm reads."""
    captured: list[tuple[tuple, dict]] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kwargs: captured.append((args, dict(kwargs))),
                                             with_kwargs=True) for layer in layers]
    hooks.append(model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append((args, {}))))
    try:
        model(input_ids=x, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _nll_from(model, layers, inputs, first: int, x) -> float:
    """Summed next-token NLL of `x` (float64), running blocks `first`.. on their captured inputs."""
    import torch.nn.functional as F

    hidden = inputs[first][0][0]
    for i in range(first, len(layers)):
        args, kwargs = inputs[i]
        out = layers[i](hidden, *args[1:], **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(model.model.norm(hidden))
    total = 0.0
    for row in range(x.shape[0]):  # as qat_tasks.llm.perplexity: one row at a time, summed in float64
        total += float(F.cross_entropy(logits[row, :-1].float(), x[row, 1:], reduction="none").double().sum())
    return total


def chart(report: dict, title: str, kept: list[str] | None = None):
    """Perplexity increase (%) when only this unit is 4-bit; kept units in a different colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    kept = set(kept or [])
    fig, ax = plt.subplots(figsize=(max(7.5, 0.28 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["increase_pct"] for r in rows],
           color=["tab:orange" if r["unit"] in kept else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)), [r["unit"].replace("block ", "") for r in rows], rotation=90, fontsize=7)
    ax.set_xlabel("decoder block (orange: kept at 16-bit by the config)")
    ax.set_ylabel("perplexity increase (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
