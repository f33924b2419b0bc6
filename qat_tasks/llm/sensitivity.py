"""Per-block sensitivity of the LLM to 4-bit weights: which blocks to keep at 16-bit rests on measurement.

Each unit (one decoder block, or lm_head) is quantized ALONE with round-to-nearest at the track's bits and
group size, the rest of the model left as it is, and perplexity is measured on the same held-out windows as
every candidate. The units whose quantization costs the most perplexity are the ones mixed precision keeps.
RTN is the probe because it is the same for every method and needs no calibration; AWQ and GPTQ reduce the
error of every unit, but the ranking of units is what the report is for.
"""

from __future__ import annotations

import logging

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
    sorted as the model is laid out (block 0 first)."""
    from tqdm.auto import tqdm

    base = perplexity(model, windows, batch_size=batch_size)["perplexity"]
    rows = []
    for name, linears in tqdm(units(model), desc="per-block sensitivity", disable=not progress):
        saved = [lin.weight for lin in linears]
        try:
            for lin in linears:
                # A new Parameter, so a weight tied to the embeddings (lm_head) is not quantized in both places.
                lin.weight = torch.nn.Parameter(rtn_fake_quant(lin.weight, bits, group_size, symmetric),
                                                requires_grad=False)
            ppl = perplexity(model, windows, batch_size=batch_size)["perplexity"]
        finally:
            for lin, w in zip(linears, saved, strict=True):
                lin.weight = w
        rows.append({"unit": name, "perplexity": ppl, "increase_pct": 100 * (ppl / base - 1)})
        log.info("sensitivity %s: perplexity %.3f (%+.2f %%)", name, ppl, rows[-1]["increase_pct"])
    return {"base_perplexity": base, "rows": rows,
            "most_sensitive": [r["unit"] for r in sorted(rows, key=lambda r: -r["increase_pct"])]}


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
