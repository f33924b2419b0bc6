"""SmoothQuant-style smoothing for BERT-family encoders (Xiao et al., 2023).

Activation outliers sit in a few channels after LayerNorm (Bondarenko et al., 2021); per-tensor INT8
activations then waste their range on them. Smoothing divides those channels by s_j and multiplies the
matching input columns of the next Linear layers by s_j: the FP32 function is unchanged, the activation
range shrinks and the weights, quantized per channel of output anyway, absorb the difference.
    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)
"""

from __future__ import annotations

import torch


def _pairs(model) -> list[tuple[torch.nn.LayerNorm, list[torch.nn.Linear]]]:
    """(LayerNorm, Linear layers reading its output) for each encoder layer."""
    base = getattr(model, model.base_model_prefix)
    pairs = []
    prev_ln = base.embeddings.LayerNorm
    for layer in base.encoder.layer:
        att = layer.attention.self
        pairs.append((prev_ln, [att.query, att.key, att.value]))
        pairs.append((layer.attention.output.LayerNorm, [layer.intermediate.dense]))
        prev_ln = layer.output.LayerNorm
    return pairs


@torch.no_grad()
def smooth(model, batches: list[dict], alpha: float = 0.5) -> int:
    """Smooth `model` in place using activation maxima over `batches` (tokenized, numpy or torch); returns the
    number of LayerNorm/Linear groups smoothed."""
    model.eval()
    pairs = _pairs(model)
    act_max: dict[int, torch.Tensor] = {}
    hooks = []
    for i, (_, linears) in enumerate(pairs):
        def hook(_mod, inputs, _out, i=i):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0)
            act_max[i] = torch.maximum(act_max[i], x) if i in act_max else x
        hooks.append(linears[0].register_forward_hook(hook))
    try:
        for b in batches:
            model(**{k: torch.as_tensor(v) for k, v in b.items()})
    finally:
        for h in hooks:
            h.remove()
    for i, (ln, linears) in enumerate(pairs):
        w_max = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0)
        s = (act_max[i].clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        ln.weight.div_(s)
        ln.bias.div_(s)
        for lin in linears:
            lin.weight.mul_(s)
    return len(pairs)
