"""The quantization methods behind the adapter: each one's llm-compressor recipe, the calibration samples it needs,
and what a method leaves that the checkpoint needs carried over (AutoRound's zero points)."""

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
    # The calibration samples as the method needs them (default: as tokenized), and what it leaves in a chunk's
    # model that the checkpoint needs carried over, called with (model, target module names) after calibration.
    prepare_samples: Callable[[list[dict]], list[dict]] | None = None
    finish: Callable[[object, list[str]], None] | None = None


_METHODS: dict[str, Method] = {}


def register(name: str, *, calibrated: bool, symmetric: bool, uses_actorder: bool = False,
             prepare_samples=None, finish=None):
    """Register `fn(spec, config_groups, ignore) -> [Modifier, ...]` as quantization method `name`."""
    def deco(fn):
        _METHODS[name] = Method(fn, calibrated, symmetric, uses_actorder, prepare_samples, finish)
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


@register("autoround", calibrated=True, symmetric=False,
          prepare_samples=lambda samples: equal_length_samples(samples),
          # done block by block during calibration; checked again on the chunk's finished model
          finish=lambda model, targets: carry_autoround_grid((n, model.get_submodule(n)) for n in targets))
def _autoround(spec: QuantSpec, groups: dict, ignore: list[str]) -> list:
    """AutoRound: rounding offsets and clipping learned per block by signed gradient descent on the block's output
    error (Cheng et al., 2024); torch.compile off, which costs more than it saves on a CPU."""
    return [_scoped_autoround()(config_groups=groups, ignore=ignore, iters=spec.autoround_iters,
                                enable_torch_compile=False, batch_size=spec.autoround_batch_size)]


_SCOPED_AUTOROUND = None


def _scoped_autoround():
    """llm-compressor 0.14's AutoRoundModifier limited to the Linear modules the recipe gave a scheme.

    The stock modifier tunes every decoder block, and in each block every Linear it cannot match to its targets
    by the block-relative name (`mlp.down_proj`). This adapter targets exact module names (`re:^model\\.layers\\.
    0\\.mlp\\.down_proj$`: per chunk, per bit width), which never match that way, so the stock modifier would
    re-round blocks a recipe leaves alone onto its default grid: an earlier chunk's finished layers (measured:
    1 % weight error against their stored scales, 0.11 relative logit error in the written checkpoint, 2.5 times
    the tuning time with four chunks) or layers kept at 16 bits. Here a block with no scheme is passed through
    untouched (its captured inputs freed), inside a tuned block every Linear without a scheme is left out, and a
    tuned block goes back to the model's dtype, so the blocks after it take inputs of the dtype they run in, with
    its zero points carried over (`carry_autoround_grid`) before the pipeline propagates through it."""
    global _SCOPED_AUTOROUND
    if _SCOPED_AUTOROUND is None:
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        class ScopedAutoRoundModifier(AutoRoundModifier):
            def apply_autoround(self, state, modules):
                blocks = [m for m in modules or [] if self._is_decoding_layer(m)]
                if blocks and not any(getattr(m, "quantization_scheme", None) is not None
                                      for m in blocks[0].modules()):
                    name = blocks[0]._tmp_name
                    if name in self._capture_hooks:
                        self.remove_hooks({self._capture_hooks.pop(name)})
                    self._all_module_input.pop(name, None)
                    self._q_input = None  # the next tuned block reads the inputs the pipeline propagated
                    return
                dtype = next(blocks[0].parameters()).dtype if blocks else None
                super().apply_autoround(state, modules)
                if blocks:
                    blocks[0].to(dtype)  # AutoRound leaves a tuned block in bfloat16; its values are exact in float32
                    # At once, not after calibration: the pipeline next runs this block with quantization on to
                    # feed the next one, and with the zero points still zero it would feed it garbage.
                    carry_autoround_grid((n, m) for n, m in blocks[0].named_modules()
                                         if getattr(m, "quantization_scheme", None) is not None)

            def get_unquantized_layer_names(self, block) -> list[str]:
                return [n for n, m in block.named_modules()
                        if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is None]

        _SCOPED_AUTOROUND = ScopedAutoRoundModifier
    return _SCOPED_AUTOROUND


METHODS = tuple(_METHODS)
# Weight ranges: min/max (the default); "mse": each group's range shrunk to the grid point that minimises its rounding
# error (no data); "imatrix": the same search weighted by each input channel's mean square on the calibration text.
OBSERVERS = {"minmax": None, "mse": "memoryless_mse", "imatrix": "imatrix_mse"}
DATA_OBSERVERS = frozenset({"imatrix"})  # observers that read the calibration text


def equal_length_samples(samples: list[dict]) -> list[dict]:
    """AutoRound's calibration samples, all of one length: the samples' tokens in order, cut into pieces as long
    as the longest sample, the shorter remainder dropped.

    AutoRound tunes on batches of samples. llm-compressor 0.14 right-pads samples of unequal length for it, and on
    that path every tuning step made the stand-in worse although each block's own loss fell (first four blocks,
    relative logit error against the unquantized model: 0.054 after rounding, 0.20 after 2 steps, 0.68 after 20).
    On the same texts cut to equal lengths, 20 steps give 0.045, better than rounding, as `auto-round` alone does
    (0.048): the padded path is where it goes wrong."""
    width = max(s["input_ids"].shape[1] for s in samples)
    ids = torch.cat([s["input_ids"][0] for s in samples])
    pieces = ids[: len(ids) // width * width].view(-1, width)
    return [{"input_ids": p[None].clone(), "attention_mask": torch.ones_like(p[None])} for p in pieces]


def carry_autoround_grid(modules) -> None:
    """Carry AutoRound's result into what compressed-tensors stores, and put the weights exactly on their grid;
    `modules` are (name, module) pairs.

    AutoRound leaves each asymmetric layer's weights on its own grid with an unsigned zero point (`zp`, 0..15 at
    4 bits) that llm-compressor 0.14 does not map back: `weight_zero_point` stays all zeros, so the calibration
    pipeline's own forward passes, and packing, would round the weights onto another grid (perplexity in the
    hundreds to thousands). The signed zero point compressed-tensors stores is AutoRound's minus 2^(bits-1).

    AutoRound tunes in bfloat16, so its weights are its grid points rounded to bfloat16 (about 0.2 % of the weight
    norm). Each layer's weights must be within bfloat16 rounding of the stored scale and zero point's grid (1 %,
    against 7 % for a wrong zero point), and are then replaced by the exact grid values, which is what the packed
    checkpoint computes. Running it again on the same modules changes nothing."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    for name, module in modules:
        args = module.quantization_scheme.weights
        zp, stored = getattr(module, "zp", None), getattr(module, "weight_zero_point", None)
        if isinstance(zp, torch.Tensor) and stored is not None:
            signed = (zp.detach().float().reshape(stored.shape) - 2 ** (args.num_bits - 1)).round()
            stored.data.copy_(signed.to(stored.dtype))
            delattr(module, "zp")
        w = module.weight.detach()
        on_grid = fake_quantize(w.float(), module.weight_scale, stored, args)
        err = float((on_grid - w.float()).norm() / w.float().norm())
        if err > 1e-2:
            raise RuntimeError(f"{name}: AutoRound's scale and zero point do not reproduce its weights "
                               f"(relative error {err:.2e})")
        module.weight.data.copy_(on_grid.to(module.weight.dtype))
