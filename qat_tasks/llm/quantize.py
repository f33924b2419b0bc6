"""4-bit weight-only quantization of Llama-style checkpoints with llm-compressor (RTN, AWQ, GPTQ), written
as a compressed-tensors checkpoint that vLLM serves and `load_quantized` runs on CPU.

Why an adapter instead of a single `oneshot(...)` call:

* Resumable. GPTQ/AWQ on an 8B model take hours and a single `oneshot` that dies keeps nothing. Here the
  decoder layers are processed in chunks of `QuantSpec.chunk_layers`: chunk k loads the unquantized model
  truncated after chunk k, overwrites earlier layers with the finished chunks' weights, and runs `oneshot`
  with the recipe restricted to chunk k's Linear modules, so calibration activations flow through the
  earlier layers as llm-compressor's sequential pipeline leaves them (GPTQ: quantized; AWQ: smoothed) and
  the result equals an unchunked run. Each finished chunk lands in `work_dir/chunk-NNN.safetensors`
  (atomic rename, tagged with a digest of spec + data + source + library versions); a rerun reuses every
  chunk with a matching tag and recomputes nothing else.
* Group sizes vLLM can serve. compressed-tensors refuses a group that does not divide `in_features`
  (SmolLM2's 576 is not a multiple of 128), so each Linear gets the requested size if it divides, else the
  largest of 64/32 that does; the map is returned and the config gets one group per size.
* CPU. AWQ pins its activation cache (`Tensor.pin_memory`), which raises on a machine without an
  accelerator; pinning is made a no-op for the duration of the call on CPU-only hosts.

The final checkpoint is assembled from the chunks: unquantized model + chunk tensors, the quantization
scheme attached with compressed-tensors, the saved scales/zero points put back so packing rounds the weights
exactly as calibration did, then `save_pretrained(save_compressed=True)`. It is written to a temporary folder,
reloaded and compared with the in-memory model, and renamed into place; an `output_dir` that already holds
a checkpoint with the same digest is returned as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qat_tasks.core import resources
from qat_tasks.llm.checkpoint import (
    MANIFEST,
    QPARAMS,
    QuantResult,
    chunk_digest,
    fingerprint,
    finished,
    load_model,
    load_weights,
    read_chunk,
    save_atomic,
    source_dtype,
    stage_source,
    write_checkpoint,
    write_manifest,
)
from qat_tasks.llm.formats import VLLM_GROUP_SIZES, effective_group_size
from qat_tasks.llm.methods import _METHODS, DATA_OBSERVERS, METHODS, OBSERVERS

log = logging.getLogger(__name__)

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM fuses these: one scheme for all




# ---------------------------------------------------------------- spec and result

@dataclass(frozen=True)
class QuantSpec:
    method: str  # a registered method: rtn | awq | gptq
    bits: int = 4
    group_size: int = 128  # requested; layers it does not divide fall back to 64, then 32
    symmetric: bool | None = None  # None: the method's default (AWQ asymmetric, GPTQ/RTN symmetric)
    actorder: str | None = "static"  # GPTQ only ("static" needs no g_idx); forced to None for the others
    keep: tuple[str, ...] = ("lm_head",)  # Linear names or "re:" regexes (re.match) left unquantized
    dampening_frac: float = 0.01  # GPTQ
    awq_n_grid: int = 10  # AWQ grid points per mapping; 20 takes hours on a 2-core CPU
    awq_duo_scaling: bool | str = "both"
    max_seq_len: int = 256  # calibration texts are truncated to this many tokens
    chunk_layers: int = 8  # decoder layers per resumable chunk
    # What happens to the weights before quantization: "spinquant" folds R1/R2 rotations in (qat_tasks.llm.rotation).
    rotation: str | None = None
    # Weight ranges: "minmax", "mse" (each group's clipping chosen by its rounding error), or "imatrix" (that error
    # weighted by each input channel's mean square on the calibration text, which then becomes necessary).
    observer: str = "minmax"
    autoround_iters: int = 50
    autoround_batch_size: int = 8
    # Mixed precision: with `average_bits`, the bit allocator (qat_tasks.llm.bit_allocation) gives `high_bits` to the
    # most sensitive layers (per-block perplexity increases in `block_sensitivity`, per-layer output error on the
    # calibration text) while the stored bits per decoder-layer weight stay within the budget.
    average_bits: float | None = None
    high_bits: int = 8
    high_group_size: int = 128
    block_sensitivity: tuple[tuple[int, float], ...] = ()
    # The dtype the checkpoint stores its scales and unquantized tensors in: None keeps the source's.
    save_dtype: str | None = None

    def __post_init__(self):
        def bad(name: str, why: str):
            raise ValueError(f"QuantSpec.{name}={getattr(self, name)!r}: {why}")

        if self.method not in _METHODS:
            bad("method", f"unknown method, expected one of {METHODS}")
        method = _METHODS[self.method]
        if self.bits not in (4, 8):
            bad("bits", "vLLM's weight-only kernels take 4 or 8 bits")
        if self.group_size not in VLLM_GROUP_SIZES:
            bad("group_size", f"expected one of {VLLM_GROUP_SIZES}")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", method.symmetric)
        elif not isinstance(self.symmetric, bool):
            bad("symmetric", "expected a bool or None")
        if not method.uses_actorder:
            object.__setattr__(self, "actorder", None)
        elif self.actorder not in (None, "static", "weight"):
            bad("actorder", "expected 'static' (alias 'weight') or None; 'group' activation ordering was "
                            "removed from compressed-tensors")
        if isinstance(self.keep, str):
            bad("keep", "expected a tuple of names/regexes, not a single string")
        object.__setattr__(self, "keep", tuple(self.keep))
        for pattern in self.keep:
            try:
                re.compile(pattern.removeprefix("re:"))
            except re.error as e:
                bad("keep", f"bad regex {pattern!r}: {e}")
        if not 0 < self.dampening_frac < 1:
            bad("dampening_frac", "expected 0 < dampening_frac < 1")
        if not (isinstance(self.awq_n_grid, int) and self.awq_n_grid >= 1):
            bad("awq_n_grid", "expected an int >= 1")
        if self.awq_duo_scaling not in (True, False, "both"):
            bad("awq_duo_scaling", "expected True, False or 'both'")
        if not (isinstance(self.max_seq_len, int) and self.max_seq_len >= 1):
            bad("max_seq_len", "expected an int >= 1")
        if not (isinstance(self.chunk_layers, int) and self.chunk_layers >= 1):
            bad("chunk_layers", "expected an int >= 1")
        from qat_tasks.llm.rotation import ROTATIONS

        if self.rotation is not None and self.rotation not in ROTATIONS:
            bad("rotation", f"expected None or one of {ROTATIONS}")
        if self.observer not in OBSERVERS:
            bad("observer", f"expected one of {tuple(OBSERVERS)}")
        if self.average_bits is not None:
            if self.high_bits not in (4, 8) or self.high_bits <= self.bits:
                bad("high_bits", f"expected 8 above {self.bits}-bit weights")
            if self.high_group_size not in VLLM_GROUP_SIZES:
                bad("high_group_size", f"expected one of {VLLM_GROUP_SIZES}")
            if not self.block_sensitivity:
                bad("block_sensitivity", "mixed precision needs the per-block sensitivity of the unquantized model")
        if self.save_dtype not in (None, "float16", "bfloat16", "float32"):
            bad("save_dtype", "expected None, float16, bfloat16 or float32")
        object.__setattr__(self, "block_sensitivity", tuple(sorted((int(b), float(v))
                                                                   for b, v in self.block_sensitivity)))

    @property
    def calibrated(self) -> bool:
        """Needs calibration text: the method's own need, or the importance-weighted observer's, or the allocator's."""
        return _METHODS[self.method].calibrated or self.observer in DATA_OBSERVERS or self.average_bits is not None

    def weight_args(self, group_size: int, bits: int | None = None):
        """The weight format of a layer. 8-bit weights are always symmetric: vLLM's Marlin kernels take zero points
        for 4-bit weights only, and an asymmetric 8-bit checkpoint loads and then fails in its first forward pass."""
        from compressed_tensors.quantization import QuantizationArgs

        bits = bits or self.bits
        return QuantizationArgs(num_bits=bits, type="int", symmetric=self.symmetric or bits == 8, strategy="group",
                                group_size=group_size, actorder=self.actorder, observer=OBSERVERS[self.observer])


# ---------------------------------------------------------------- public entry points

def quantize(model_dir, spec: QuantSpec, calibration_texts: list[str], output_dir, *, work_dir,
             tokenizer_dir=None, progress: bool = True,
             on_chunk_done: Callable[[int, int], None] | None = None, verify: bool = True) -> QuantResult:
    """Quantize the unquantized checkpoint in `model_dir` into `output_dir` (see the module docstring).

    `work_dir` keeps the per-chunk results between attempts; reuse it to resume. `on_chunk_done(k, total)`
    is called once chunk k is durable on disk (computed or resumed): progress reporting, and how tests
    inject a crash. `verify` reloads the written checkpoint and checks its logits before publishing it."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model_dir, output_dir, work_dir = Path(model_dir), Path(output_dir), Path(work_dir)
    method = _METHODS[spec.method]
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / MANIFEST).exists():
        raise ValueError(f"output_dir {output_dir} is not empty and holds no checkpoint written by this module")
    work_dir.mkdir(parents=True, exist_ok=True)
    source = stage_source(model_dir, work_dir / "source")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    samples = _tokenize(tokenizer, calibration_texts, spec.max_seq_len) if spec.calibrated else []
    if spec.calibrated and not samples:
        raise ValueError(f"calibration_texts: {spec.method!r} with observer {spec.observer!r} and average_bits "
                         f"{spec.average_bits} needs at least one non-empty text")
    digest = _digest(spec, source, tokenizer, samples)

    if (done := finished(output_dir, digest)) is not None:
        log.info("%s already holds this checkpoint (%s); nothing to do", output_dir, digest[:12])
        return dataclasses.replace(done, wall_s=time.perf_counter() - t0, chunks_resumed=done.chunks_total,
                                   reused=True)

    if spec.rotation is not None:  # every later step (allocation, chunks, the checkpoint) reads the rotated weights
        from qat_tasks.llm.rotation import rotate

        source = rotate(source, work_dir / f"rotated-{spec.rotation}", spec.rotation,
                        _digest(dataclasses.replace(spec, average_bits=None, block_sensitivity=()), source,
                                tokenizer, []))
        resources.release_memory()
    plan = _plan(source, spec)
    if spec.average_bits is not None:
        plan.bits, plan.allocation = _allocate(source, spec, samples, plan)
        resources.release_memory()
    (work_dir / "manifest.json").write_text(json.dumps(
        {"spec_hash": digest, "spec": asdict(spec), "model_dir": str(model_dir), "chunks_total": plan.n_chunks,
         "group_sizes": plan.group_sizes, "bits": plan.bits, "kept": plan.kept}, indent=1))
    resumed = 0
    with _quiet(not progress), _pin_memory_noop_on_cpu():
        for k in range(plan.n_chunks):
            path = work_dir / f"chunk-{k:03d}.safetensors"
            if chunk_digest(path) == digest:
                resumed += 1
                log.info("chunk %d/%d: resumed from %s", k + 1, plan.n_chunks, path)
            else:
                t = time.perf_counter()
                save_atomic(_calibrate_chunk(k, source, spec, plan, samples, tokenizer, work_dir), path, digest)
                resources.release_memory()  # each chunk's model copy and activations, before the next chunk's
                log.info("chunk %d/%d: quantized in %.1fs", k + 1, plan.n_chunks, time.perf_counter() - t)
            if on_chunk_done is not None:
                on_chunk_done(k, plan.n_chunks)
        result = QuantResult(str(output_dir), spec.method, 0.0, 0.0, plan.group_sizes, plan.kept, plan.n_chunks,
                             resumed, 0, digest, bits=plan.bits, allocation=plan.allocation)
        groups = _config_groups(spec, plan.group_sizes, compact=True, bits=plan.bits)
        write_checkpoint(source, plan.n_chunks, plan.group_sizes, plan.kept, groups,
                         method.recipe(spec, groups, plan.kept), work_dir, tokenizer, output_dir, result, verify,
                         getattr(torch, spec.save_dtype) if spec.save_dtype else None)
    resources.release_memory()  # the caller loads the checkpoint next: not on top of the writer's freed pages
    result.wall_s = time.perf_counter() - t0
    result.peak_rss_mb = resources.peak_rss_mb()
    write_manifest(output_dir, result)  # final timings; the checkpoint was already complete
    return result


# ---------------------------------------------------------------- planning

@dataclass
class _Plan:
    group_sizes: dict[str, int]
    kept: list[str]
    chunk_of: dict[str, int]  # quantized module -> chunk index
    n_layers: int
    n_chunks: int
    chunk_layers: int
    bits: dict[str, int] = dataclasses.field(default_factory=dict)  # quantized module -> bits (mixed precision)
    allocation: list[dict] = dataclasses.field(default_factory=list)  # the allocator's table

    def layers_needed(self, k: int) -> int:
        """Chunk k is calibrated on the model truncated after its last layer: later layers cannot
        influence it, and skipping them saves their load and forward time."""
        return self.n_layers if k == self.n_chunks - 1 else (k + 1) * self.chunk_layers


def _plan(source: Path, spec: QuantSpec) -> _Plan:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_layers = config.get_text_config().num_hidden_layers
    prefix = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def kept_by(pattern: str, name: str) -> bool:
        return bool(re.match(pattern[3:], name)) if pattern.startswith("re:") else name == pattern

    for pattern in spec.keep:
        if not any(kept_by(pattern, n) for n in linears):
            raise ValueError(f"QuantSpec.keep: {pattern!r} matches no Linear module of {source}")
    kept = [n for n in linears if any(kept_by(p, n) for p in spec.keep)]
    for parent in {n.rpartition(".")[0] for n in linears}:
        for fused in FUSED:
            names = [f"{parent}.{leaf}" for leaf in fused if f"{parent}.{leaf}" in linears]
            if len({n in kept for n in names}) > 1:
                raise ValueError(f"QuantSpec.keep: keeps only part of {names}; vLLM serves them as one fused "
                                 "layer with one scheme, keep all or none")
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if getattr(config.get_text_config(), "tie_word_embeddings", False) and head in linears and head not in kept:
        raise ValueError(f"QuantSpec.keep: {head!r} shares its weight with the input embeddings; keep it")

    group_sizes = {n: _group_size(n, m.in_features, spec.group_size) for n, m in linears.items() if n not in kept}
    n_chunks = math.ceil(n_layers / spec.chunk_layers)
    layer_of = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    chunk_of = {n: int(m[1]) // spec.chunk_layers if (m := layer_of.match(n)) else n_chunks - 1 for n in group_sizes}
    return _Plan(group_sizes, kept, chunk_of, n_layers, n_chunks, spec.chunk_layers, {n: spec.bits for n in group_sizes})


def _allocate(source: Path, spec: QuantSpec, samples: list[dict], plan: _Plan) -> tuple[dict[str, int], list[dict]]:
    """Bits per quantized layer from the bit allocator, measured on the (rotated) source and the calibration text;
    the high-bit layers get `high_group_size` where it divides their width."""
    from qat_tasks.llm import bit_allocation as ba

    model = load_model(source, torch.float32)
    # Scales are stored in the checkpoint's dtype: what a scale costs per group.
    scale_bits = torch.finfo(getattr(torch, spec.save_dtype) if spec.save_dtype else source_dtype(model.config)).bits
    low = ba.Scheme(spec.bits, spec.group_size, spec.symmetric, scale_bits)
    high = ba.Scheme(spec.high_bits, spec.high_group_size, True, scale_bits)  # symmetric: see QuantSpec.weight_args
    units = [u for u in ba.units_of(model) if all(n in plan.group_sizes for n in u.names)]
    errors = ba.layer_errors(model, samples, low)
    del model
    gc.collect()
    ba.score(units, errors, dict(spec.block_sensitivity))
    bits, average = ba.allocate(units, low, high, spec.average_bits)
    for name, b in bits.items():
        if b == spec.high_bits:
            plan.group_sizes[name] = effective_group_size(int(_in_features(source, name)), spec.high_group_size)
    chosen = sum(b == spec.high_bits for b in bits.values())
    log.info("bit allocation: %d of %d layers at %d-bit, %.3f stored bits per decoder weight (budget %.2f)", chosen,
             len(bits), spec.high_bits, average, spec.average_bits)
    return {**plan.bits, **bits}, ba.table(units, bits)


def _in_features(source: Path, name: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    return model.get_submodule(name).in_features


def _group_size(name: str, in_features: int, requested: int) -> int:
    try:
        return effective_group_size(in_features, requested)
    except ValueError:
        raise ValueError(f"QuantSpec.group_size={requested}: {name} has in_features={in_features}, which no group "
                         f"size vLLM supports divides; add it to QuantSpec.keep") from None


def _config_groups(spec: QuantSpec, group_sizes: dict[str, int], compact: bool,
                   bits: dict[str, int] | None = None) -> dict:
    """One compressed-tensors scheme per (bits, group size). Chunks target exact module names; the final config
    targets leaf names (`re:(^|.*\\.)q_proj$`) where every module with that leaf shares a format, so config.json
    stays short. Kept modules are excluded through the config's ignore list."""
    from compressed_tensors.quantization import QuantizationScheme

    fmt = {n: ((bits or {}).get(n, spec.bits), g) for n, g in group_sizes.items()}
    by_leaf: dict[str, set[tuple[int, int]]] = {}
    for name, f in fmt.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(f)
    targets: dict[tuple[int, int], list[str]] = {}
    for name, f in fmt.items():
        leaf = name.rsplit(".", 1)[-1]
        if compact and len(by_leaf[leaf]) == 1:
            target = rf"re:(^|.*\.){re.escape(leaf)}$"
        else:
            target = rf"re:^{re.escape(name)}$"
        if target not in targets.setdefault(f, []):
            targets[f].append(target)
    return {(f"group_g{g}" if b == spec.bits else f"group_w{b}_g{g}"): QuantizationScheme(
                targets=t, weights=spec.weight_args(g, b)) for (b, g), t in sorted(targets.items(), reverse=True)}


# ---------------------------------------------------------------- per-chunk calibration

def _calibrate_chunk(k: int, source: Path, spec: QuantSpec, plan: _Plan, samples: list[dict], tokenizer,
                     work_dir: Path) -> dict[str, torch.Tensor]:
    """Quantize chunk k and return every tensor it changed: its Linear modules' weights and qparams, plus
    whatever else the method rewrote (AWQ's smoothed norms).

    Weights are kept as llm-compressor leaves them in memory: GPTQ writes on-grid (quantize-dequantized)
    weights, AWQ/RTN leave the (smoothed) float weights that packing later rounds with the qparams. Later
    chunks calibrate on exactly these, which is what one uninterrupted `oneshot` does, so chunking does not
    change the result: a chunked run equals a single-chunk run tensor for tensor (tested)."""
    targets = {n: g for n, g in plan.group_sizes.items() if plan.chunk_of[n] == k}
    if not targets:
        return {}
    model = load_model(source, torch.float32, plan.layers_needed(k))
    for j in range(k):
        load_weights(model, read_chunk(work_dir / f"chunk-{j:03d}.safetensors"))
    owned = tuple(f"{n}." for n in targets)
    before = {n: fingerprint(p) for n, p in model.named_parameters() if not n.startswith(owned)}

    method = _METHODS[spec.method]
    recipe = method.recipe(spec, _config_groups(spec, targets, compact=False, bits=plan.bits), [])
    # The allocator alone may have asked for calibration text: round-to-nearest with min/max ranges does not read it.
    needs_data = method.calibrated or spec.observer in DATA_OBSERVERS
    if method.prepare_samples is not None:
        samples = method.prepare_samples(samples)
    _oneshot(model, tokenizer, samples if needs_data else [], recipe)
    if method.finish is not None:
        method.finish(model, list(targets))

    out = {}
    for name in targets:
        module = model.get_submodule(name)
        out[f"{name}.weight"] = module.weight
        out |= {f"{name}.{q}": t for q in QPARAMS if (t := getattr(module, q, None)) is not None}
    out |= {n: p for n, p in model.named_parameters() if n in before and fingerprint(p) != before[n]}
    out = {n: t.detach().to("cpu").contiguous().clone() for n, t in out.items()}
    del model
    gc.collect()
    return out


def _oneshot(model, tokenizer, samples: list[dict], recipe: list) -> None:
    """One llm-compressor run. A DataLoader (batch_size=None: one unpadded text per batch, fixed order) is
    passed instead of a `datasets.Dataset` so calibration is deterministic: oneshot would shuffle a Dataset,
    and a resumed run must reproduce the chunks an uninterrupted run computes."""
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    from qat_tasks.llm.compressor_session import compressor_session

    loader = DataLoader(samples, batch_size=None) if samples else None
    # A session of its own: llm-compressor's global session would keep this chunk's model alive afterwards.
    with compressor_session():
        oneshot(model=model, processor=tokenizer, dataset=loader, recipe=recipe)


# ---------------------------------------------------------------- helpers

def _tokenize(tokenizer, texts: list[str], max_len: int) -> list[dict]:
    samples = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_len, return_tensors="pt")
        if enc["input_ids"].shape[1] > 0:
            samples.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return samples


def _digest(spec: QuantSpec, source: Path, tokenizer, samples: list[dict]) -> str:
    """What a chunk or checkpoint depends on: the spec, the source weights (config + file sizes; hashing
    16 GB of weights per call is not worth it), the tokenizer, the calibration tokens and library versions."""
    import compressed_tensors
    import llmcompressor

    files = sorted((f.name, f.stat().st_size) for f in source.iterdir() if f.suffix == ".safetensors")
    h = hashlib.sha256(json.dumps({
        "spec": asdict(spec), "config": (source / "config.json").read_text(), "files": files,
        "vocab": hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest(),
        "versions": [llmcompressor.__version__, compressed_tensors.__version__, torch.__version__],
        "calibration_dtype": "float32"}, sort_keys=True).encode())
    for s in samples:
        h.update(s["input_ids"].numpy().astype("int64").tobytes() + b"|")
    return h.hexdigest()


@contextlib.contextmanager
def _pin_memory_noop_on_cpu() -> Iterator[None]:
    """AWQ pins its cached activations for faster host-to-device copies; without an accelerator
    `Tensor.pin_memory` raises, and there is nothing to copy to, so it returns the tensor itself."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.__dict__.get("pin_memory")
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        if saved is None:
            del torch.Tensor.pin_memory
        else:
            torch.Tensor.pin_memory = saved


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence llm-compressor's and compressed-tensors' loguru output (per-module GPTQ metrics etc.)."""
    if not enabled:
        yield
        return
    from loguru import logger

    for name in ("llmcompressor", "compressed_tensors"):
        logger.disable(name)
    try:
        yield
    finally:
        for name in ("llmcompressor", "compressed_tensors"):
            logger.enable(name)
