"""How a quantized LLM's weights are stored, and the group-size rule vLLM's kernels impose: the quantizer, the
sensitivity probe and the memory budget share these, so the three agree on what a checkpoint holds."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFormat:
    """How the decoder blocks' Linear weights are stored.

    bits=16: fp16/bf16, 2 bytes per weight. bits<16: compressed-tensors `pack_quantized` (what llm-compressor
    writes and vLLM serves): weights packed into int32 (bits/8 bytes each), one 16-bit scale per group of
    `group_size` input weights, and for asymmetric schemes one zero point per group, packed at `bits` bits
    (compressed-tensors packs group zero points into int32 along the output dimension); symmetric schemes
    store none."""

    name: str
    bits: int = 16
    group_size: int | None = None
    symmetric: bool = True
    scale_bytes: int = 2  # scales are stored in the model's dtype (bf16/fp16)

    @property
    def weight_bytes(self) -> float:
        return self.bits / 8

    @property
    def group_overhead_bytes(self) -> float:
        """Bytes stored per group besides the weights: scale, plus a packed zero point when asymmetric."""
        if self.bits >= 16:
            return 0.0
        return self.scale_bytes + (0 if self.symmetric else self.bits / 8)


_FORMAT = re.compile(r"^w(?P<bits>[248])a16(?:_g(?P<group>\d+))?(?P<asym>_asym)?$")


def weight_format(fmt: str | WeightFormat) -> WeightFormat:
    """fp16, bf16, fp32 or w{bits}a16[_g{group}][_asym], e.g. w4a16_g128 (symmetric), w4a16_g128_asym."""
    if isinstance(fmt, WeightFormat):
        return fmt
    if fmt in ("fp16", "bf16", "float16", "bfloat16"):
        return WeightFormat(fmt, 16)
    if fmt in ("fp32", "float32"):
        return WeightFormat(fmt, 32)
    m = _FORMAT.match(fmt)
    if not m:
        raise ValueError(f"weight format {fmt!r}: expected fp16, bf16, fp32 or w<bits>a16[_g<group>][_asym]")
    if not m["group"]:
        raise ValueError(f"weight format {fmt!r}: give a group size (w4a16_g128); per-channel needs row counts")
    return WeightFormat(fmt, int(m["bits"]), int(m["group"]), symmetric=not m["asym"])


VLLM_GROUP_SIZES = (128, 64, 32)  # what vLLM's int4 kernels (Marlin/Machete) take


def effective_group_size(in_features: int, group_size: int) -> int:
    """The group size where it divides the input width, else the largest smaller one vLLM's kernels take
    (SmolLM2's 576-wide projections: 64). The quantizer, the sensitivity probe and this budget share it."""
    for g in (group_size, *[g for g in VLLM_GROUP_SIZES if g < group_size]):
        if in_features % g == 0:
            return g
    raise ValueError(f"no supported group size divides in_features={in_features}")
