"""What the 4-bit track keeps on disk: the per-chunk tensor files a resumed run reuses (atomic, tagged with the
digest of what they depend on), the final compressed-tensors checkpoint (assembled from the chunks, reloaded and
checked before it is renamed into place) with its manifest, and loading that checkpoint on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qat_tasks.core import resources

QPARAMS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")


MANIFEST = "quantize_manifest.json"


@dataclass
class QuantResult:
    output_dir: str
    method: str
    wall_s: float
    peak_rss_mb: float  # peak resident memory of this process so far (ru_maxrss)
    group_sizes: dict[str, int]  # quantized Linear -> group size used
    kept: list[str]  # Linear modules left unquantized
    chunks_total: int
    chunks_resumed: int  # chunks loaded from a previous attempt instead of recomputed
    size_bytes: int  # the checkpoint folder, without this module's manifest
    spec_hash: str = ""
    reused: bool = False  # output_dir already held this exact checkpoint: nothing was done
    verify_rel_err: float | None = None  # |reloaded - in-memory logits| / |in-memory logits|
    bits: dict[str, int] | None = None  # quantized Linear -> bits, when they differ (mixed precision)
    allocation: list[dict] | None = None  # the bit allocator's table (sensitivity and bits per layer group)


def load_quantized(path):
    """(model, tokenizer) for CPU evaluation: packed int4 weights dequantized at load time to float32, so
    the forward pass computes with exactly the weights vLLM dequantizes (fake-quant semantics)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():  # "you passed quantization_config ...": only `dequantize` is taken, as meant
        warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    return model.eval(), AutoTokenizer.from_pretrained(path)


def write_checkpoint(source: Path, n_chunks: int, group_sizes: dict[str, int], kept: list[str], groups: dict,
                     recipe: list, work_dir: Path, tokenizer, output_dir: Path, result: QuantResult, verify: bool,
                     save_dtype: torch.dtype | None = None) -> None:
    """Assemble the checkpoint from the chunk files: the unquantized model with the chunks' tensors, the
    quantization scheme `groups` attached, the saved scales and zero points put back (so packing rounds the
    weights exactly as calibration did), saved compressed with `recipe`, verified, then renamed into place."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )
    from llmcompressor.recipe import Recipe
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    model = load_model(source, torch.float32)
    save_dtype = save_dtype or source_dtype(model.config)  # what the unquantized tensors and the scales are stored in
    qparams: dict[str, torch.Tensor] = {}
    for k in range(n_chunks):  # one chunk in memory at a time
        tensors = read_chunk(work_dir / f"chunk-{k:03d}.safetensors")
        load_weights(model, tensors)
        qparams |= {n: t for n, t in tensors.items() if n.rsplit(".", 1)[-1] in QPARAMS}
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=kept,
                                                        quantization_status=QuantizationStatus.FROZEN))
    for name in group_sizes:  # the chunks' qparams, so packing reproduces their on-grid weights exactly
        module = model.get_submodule(name)
        if not hasattr(module, "quantization_scheme"):
            raise RuntimeError(f"{name} did not receive a quantization scheme")
        for q in QPARAMS:
            if hasattr(module, q):
                if f"{name}.{q}" not in qparams:
                    raise RuntimeError(f"chunk files in {work_dir} lack {name}.{q}")
                getattr(module, q).data.copy_(qparams[f"{name}.{q}"])
    probe = torch.randint(0, model.config.get_text_config().vocab_size, (1, 32),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(probe).logits.float()

    tmp = output_dir.parent / f".{output_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(save_dtype)  # scales follow; the int zero points are untouched
    modify_save_pretrained(model)
    model.save_pretrained(str(tmp), save_compressed=True)
    tokenizer.save_pretrained(str(tmp))
    # llm-compressor saved the last chunk's restricted recipe; record the whole-model one instead
    Recipe.from_modifiers(recipe).yaml(file_path=str(tmp / "recipe.yaml"))
    del model
    resources.release_memory()
    if verify:
        reloaded, _ = load_quantized(tmp)
        with torch.no_grad():
            got = reloaded(probe).logits.float()
        result.verify_rel_err = float((got - reference).norm() / reference.norm())
        tolerance = 1e-4 if save_dtype == torch.float32 else 3e-2  # 16-bit scales are rounded on save
        if not result.verify_rel_err <= tolerance:
            raise RuntimeError(f"reloaded checkpoint in {tmp} deviates from the quantized model: relative "
                               f"logit error {result.verify_rel_err:.2e} > {tolerance:.0e}")
        del reloaded
    result.size_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    write_manifest(tmp, result)
    if output_dir.exists():  # a checkpoint of another spec (checked at the start): replace it
        old = output_dir.parent / f".{output_dir.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        shutil.rmtree(old)
    else:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, output_dir)


def write_manifest(directory: Path, result: QuantResult) -> None:
    data = asdict(result) | {"output_dir": None}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, directory / MANIFEST)


def finished(output_dir: Path, digest: str) -> QuantResult | None:
    try:
        data = json.loads((output_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if data.get("spec_hash") != digest or not any(output_dir.glob("*.safetensors")):
        return None
    return QuantResult(**(data | {"output_dir": str(output_dir)}))


def stage_source(model_dir: Path, staged: Path) -> Path:
    """A view of `model_dir` (symlinks) whose config.json has no stale quantization_config.

    Checkpoints converted from GGUF (e.g. the SmolLM2 one this was built on) hold plain float tensors but keep
    `quantization_config: {quant_method: gguf}`, which makes transformers attach a GGUF quantizer and
    llm-compressor's `oneshot` refuse the model. Any other quantization method means the weights really are
    quantized, which this module does not handle."""
    config = json.loads((model_dir / "config.json").read_text())
    quant = config.pop("quantization_config", None)
    if quant is not None and quant.get("quant_method") != "gguf":
        raise ValueError(f"model_dir {model_dir} is already quantized (quant_method="
                         f"{quant.get('quant_method')!r}); pass an unquantized checkpoint")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (staged / f.name).symlink_to(f.resolve())
    (staged / "config.json").write_text(json.dumps(config, indent=2))
    return staged


def load_model(source: Path, dtype: torch.dtype, n_layers: int | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(source)
    text = config.get_text_config()
    if n_layers is not None and n_layers < text.num_hidden_layers:
        text.num_hidden_layers = n_layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:n_layers]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a truncated model reports the later layers' tensors as unused
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def source_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy chunk tensors (not qparams) into a plain model; tied parameters stay tied."""
    weights = {n: t for n, t in tensors.items() if n.rsplit(".", 1)[-1] not in QPARAMS}
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"chunk tensors do not fit the model: {unexpected[:5]}")


def fingerprint(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(), digest_size=16
                           ).hexdigest()


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, digest: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"spec_hash": digest})
    os.replace(tmp, path)


def chunk_digest(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("spec_hash")
    except Exception:  # missing or torn file: recompute the chunk
        return None


def read_chunk(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
