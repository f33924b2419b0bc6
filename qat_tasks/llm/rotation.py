"""Rotations folded into the weights before 4-bit quantization: SpinQuant's R1 and R2 with random Hadamard matrices.

R1 rotates the residual stream (the embeddings' and every block's output projections by R, every input projection
and the LM head by R transposed; the RMSNorm scales are folded into the layers after them first), R2 the value and
output projections of each attention head. Both are orthogonal and cancel in the forward pass, so the rotated model
computes what the original does (checked on its logits here), while outlier channels are spread over many, which a
4-bit grid fits better. Nothing is computed online: the rotated checkpoint is a plain one, and the quantized
checkpoint made from it is a plain compressed-tensors checkpoint vLLM serves as it serves any other. What it changes:
the LM head is untied from the embeddings (each carries its own rotation), so a tied model stores both.

The rotated copy is written once next to the quantizer's chunks (atomic rename) and reused while its source and
the rotation are the same; every chunk of a resumed run reads the same rotated weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ROTATIONS = ("spinquant",)
MARKER = "rotated-from.json"


def rotate(source: Path, out: Path, kind: str, digest: str, atol: float = 1e-4) -> Path:
    """The checkpoint at `source` with rotation `kind` folded in, at `out` (reused when its marker names `digest`)."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation {kind!r}: expected one of {ROTATIONS}")
    out = Path(out)
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("digest") == digest:
        return out
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform import SpinQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat_tasks.llm.compressor_session import compressor_session

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    probe = tokenizer("Is volume 3 of Chainsaw Man back in stock? My order MA-1234 has not arrived.",
                      return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=probe).logits
    norms = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Norm")}
    if not norms or not all("RMSNorm" in n for n in norms):
        raise ValueError(f"rotation {kind}: folded rotations need RMSNorm throughout; this model has {sorted(norms)}")

    class FoldedRotations(SpinQuantModifier):
        def _center_embeddings(self, model):
            # Centring the embeddings is an identity only before LayerNorm; before RMSNorm it moves the logits (up
            # to 5 % on SmolLM2, measured). Without it the rotated model matches the original to float precision.
            return None

    with compressor_session():
        oneshot(model=model, recipe=[FoldedRotations(rotations=["R1", "R2"], transform_type="random-hadamard")])
    model.config.tie_word_embeddings = False  # R1 gives the LM head and the embeddings different weights
    with torch.no_grad():
        after = model(input_ids=probe).logits
    err = float((after - before).abs().max() / before.abs().max())
    if err > atol:
        raise RuntimeError(f"rotation {kind} changed the model's logits by {err:.2e} (relative): not an equivalent model")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # llm-compressor's save describes the (already folded) transforms as a compressed-tensors config, which would
    # make transformers look for quantized weights on load: the rotated checkpoint is a plain one.
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "recipe.yaml").unlink(missing_ok=True)
    (tmp / MARKER).write_text(json.dumps({"source": str(source), "rotation": kind, "digest": digest,
                                          "max_rel_logit_change": err}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("rotated %s with %s (R1, R2; random Hadamard) into %s: logits within %.1e of the original", source.name,
             kind, out, err)
    return out
