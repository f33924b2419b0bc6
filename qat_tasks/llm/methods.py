"""The quantization methods behind the adapter: each one's llm-compressor recipe, and what a method leaves that
the checkpoint needs carried over (AutoRound's zero points)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qat_tasks.llm.quantize import QuantSpec


@dataclass(frozen=True)
class Method:
    recipe: Callable[[QuantSpec, dict, list[str]], list]  # (spec, config_groups, ignore) -> modifiers
    calibrated: bool  # needs calibration data
    symmetric: bool  # default when QuantSpec.symmetric is None
    uses_actorder: bool = False


_METHODS: dict[str, Method] = {}


def register(name: str, *, calibrated: bool, symmetric: bool, uses_actorder: bool = False):
    """Register `fn(spec, config_groups, ignore) -> [Modifier, ...]` as quantization method `name`."""
    def deco(fn):
        _METHODS[name] = Method(fn, calibrated, symmetric, uses_actorder)
        return fn
    return deco


@register("rtn", calibrated=False, symmetric=True)
def _rtn(spec: QuantSpec, groups: dict, ignore: list[str]) -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(config_groups=groups, ignore=ignore)]


@register("awq", calibrated=True, symmetric=False)
def _awq(spec: QuantSpec, groups: dict, ignore: list[str]) -> list:
    """AWQ only smooths (norm and previous-projection weights absorb per-channel scales); the
    QuantizationModifier after it computes the min-max qparams of the smoothed weights."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(duo_scaling=spec.awq_duo_scaling, n_grid=spec.awq_n_grid),
            QuantizationModifier(config_groups=groups, ignore=ignore)]


@register("gptq", calibrated=True, symmetric=True, uses_actorder=True)
def _gptq(spec: QuantSpec, groups: dict, ignore: list[str]) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier

    return [GPTQModifier(config_groups=groups, ignore=ignore, actorder=spec.actorder,
                         dampening_frac=spec.dampening_frac)]


@register("autoround", calibrated=True, symmetric=False)
def _autoround(spec: QuantSpec, groups: dict, ignore: list[str]) -> list:
    """AutoRound: rounding offsets and clipping learned per block by signed gradient descent on the block's output
    error (Cheng et al., 2024); torch.compile off, which costs more than it saves on a CPU."""
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    return [AutoRoundModifier(config_groups=groups, ignore=ignore, iters=spec.autoround_iters,
                              enable_torch_compile=False, batch_size=spec.autoround_batch_size)]


METHODS = tuple(_METHODS)
# Weight ranges: min/max (the default); "mse": each group's range shrunk to the grid point that minimises its rounding
# error (no data); "imatrix": the same search weighted by each input channel's mean square on the calibration text.
OBSERVERS = {"minmax": None, "mse": "memoryless_mse", "imatrix": "imatrix_mse"}
DATA_OBSERVERS = frozenset({"imatrix"})  # observers that read the calibration text


def autoround_zero_points(model, targets) -> None:
    """AutoRound leaves each asymmetric layer's weights on its own grid with an unsigned zero point (`zp`, 0..15 at
    4 bits) that llm-compressor 0.14 does not map back: `weight_zero_point` stays all zeros, and packing would round
    the weights onto another grid (measured: 7.4 % of the weight norm on a SmolLM2 layer, perplexity in the
    thousands). The signed zero point compressed-tensors stores is AutoRound's minus 2^(bits-1); with it, the
    stored scale and zero point reproduce AutoRound's weights exactly, which is checked."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    for name in targets:
        module = model.get_submodule(name)
        zp, stored = getattr(module, "zp", None), getattr(module, "weight_zero_point", None)
        if not isinstance(zp, torch.Tensor) or stored is None:
            continue  # symmetric: no zero point to carry
        args = module.quantization_scheme.weights
        signed = (zp.detach().float().reshape(stored.shape) - 2 ** (args.num_bits - 1)).round()
        stored.data.copy_(signed.to(stored.dtype))
        w = module.weight.detach()
        err = float((fake_quantize(w, module.weight_scale, stored, args) - w).norm() / w.norm())
        if err > 1e-3:
            raise RuntimeError(f"{name}: AutoRound's scale and zero point do not reproduce its weights "
                               f"(relative error {err:.2e})")
