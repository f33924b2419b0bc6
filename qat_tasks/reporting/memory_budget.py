"""Do all five MangaAssist models fit one GPU? Weights of the three encoders and the LLM at its precision, the
LLM's KV cache for the concurrency we promise, and the runtime's own overhead, against the GPU's memory.

Where numbers come from, row by row ("source"):
  measured  bytes of a real artifact on disk (the caller passes them: the encoders' INT8 ONNX files, the LLM
            checkpoint directory); this module never hard-codes an artifact's size
  computed  arithmetic from parameter counts and storage formats (Llama 3 8B, DistilBERT-base), below
  assumed   runtime overhead: CUDA context, activations, allocator slack (a config value, not a measurement)
Instance prices are data passed in (the config's list): us-east-1 on-demand list prices, to be checked before
quoting, never measured here.

Note for serving: vLLM pre-allocates `gpu_memory_utilization` (default 0.9) of the GPU for weights plus KV
cache, so encoders sharing the GPU need that fraction lowered to leave them room; this table is what the
utilization must cover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qat_tasks.llm.formats import WeightFormat, effective_group_size, weight_format

GIB = 2**30


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts from shapes
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaShape:
    """The shapes that fix a Llama-architecture model's parameter count (names as in a HF config.json)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config) -> LlamaShape:
        """From a HF config (object or dict), e.g. SmolLM2's config.json."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        return cls(hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                   num_hidden_layers=get("num_hidden_layers"), num_attention_heads=heads,
                   num_key_value_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads, vocab_size=get("vocab_size"),
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)))

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of every Linear inside the decoder blocks (q, k, v, o, gate, up, down)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        block = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
        return block * self.num_hidden_layers

    def param_counts(self) -> dict[str, int]:
        """Parameters by kind: linear (decoder blocks), embedding, lm_head (0 when tied), norm."""
        emb = self.vocab_size * self.hidden_size
        return {"linear": sum(o * i for o, i in self.linear_shapes()), "embedding": emb,
                "lm_head": 0 if self.tie_word_embeddings else emb,
                "norm": (2 * self.num_hidden_layers + 1) * self.hidden_size}

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return kv_cache_bytes(self.num_hidden_layers, self.num_key_value_heads, self.head_dim, 1, dtype_bytes)


# Meta-Llama-3-8B(-Instruct) config.json: 8,030,261,248 parameters.
LLAMA3_8B = LlamaShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)
PRODUCTION_LLMS = {"llama-3-8b": LLAMA3_8B}


@dataclass(frozen=True)
class EncoderShape:
    """A BERT-family encoder (DistilBERT has no token types and no pooler) plus its task head."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    max_positions: int = 512
    type_vocab_size: int = 0
    pooler: bool = False
    pre_classifier: bool = False  # DistilBertForSequenceClassification's hidden->hidden layer
    num_labels: int = 0

    def param_count(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        emb = (self.vocab_size + self.max_positions + self.type_vocab_size) * h + 2 * h
        block = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
        head = (h * h + h) * (self.pooler + self.pre_classifier) + (h * self.num_labels + self.num_labels)
        return emb + self.num_layers * block + head


# distilbert-base-uncased: 66,362,880 parameters before the head.
DISTILBERT_BASE = EncoderShape(vocab_size=30522, hidden_size=768, num_layers=6, intermediate_size=3072)
# cross-encoder/ms-marco-MiniLM-L-6-v2 (BERT, 6 layers, 384 wide, pooler, one relevance logit): ~22.7 M.
MINILM_L6_CROSS_ENCODER = EncoderShape(vocab_size=30522, hidden_size=384, num_layers=6, intermediate_size=1536,
                                       type_vocab_size=2, pooler=True, num_labels=1)


def distilbert_classifier(num_labels: int) -> EncoderShape:
    """DistilBertForSequenceClassification: the base encoder, pre_classifier and a num_labels classifier."""
    return EncoderShape(**{**DISTILBERT_BASE.__dict__, "pre_classifier": True, "num_labels": num_labels})


def encoder_int8_bytes(n_params: int, overhead_fraction: float = 0.02) -> int:
    """INT8 ONNX size of an encoder from its parameter count: 1 byte per parameter (MatMul and embedding Gather
    weights quantized) plus a small share for float biases, LayerNorms, scales/zero points and the graph."""
    return int(n_params * (1 + overhead_fraction))


def llm_weight_breakdown(n_params_by_kind: dict[str, int], fmt: str | WeightFormat,
                         keep_16bit: tuple[str, ...] = ("embedding", "lm_head", "norm"),
                         linear_shapes: list[tuple[int, int]] | None = None) -> dict[str, int]:
    """Bytes by kind. Kinds in `keep_16bit` stay at 2 bytes per parameter (embeddings, and lm_head where the
    config keeps it); the others are stored in `fmt`. Groups are counted as params / group_size, which is exact
    when the group size divides every input width (Llama 3 8B at 128); pass `linear_shapes` for models where
    it does not (SmolLM2's 576: 64 per layer, as the quantizer falls back)."""
    f = weight_format(fmt)
    out = {}
    for kind, n in n_params_by_kind.items():
        if f.bits >= 16 or kind in keep_16bit:
            out[kind] = int(n * (f.weight_bytes if f.bits >= 16 else 2))
            continue
        if kind == "linear" and linear_shapes is not None:
            groups = sum(o * math.ceil(i / effective_group_size(i, f.group_size)) for o, i in linear_shapes)
        else:
            groups = math.ceil(n / f.group_size)
        out[kind] = int(math.ceil(n * f.weight_bytes + groups * f.group_overhead_bytes))
    return out


def llm_weight_bytes(n_params_by_kind: dict[str, int], fmt: str | WeightFormat,
                     keep_16bit: tuple[str, ...] = ("embedding", "lm_head", "norm"),
                     linear_shapes: list[tuple[int, int]] | None = None) -> int:
    """Bytes of the LLM's weights in `fmt` (see llm_weight_breakdown). Llama 3 8B: 16.06 GB in fp16;
    w4a16_g128_asym with 16-bit embeddings and lm_head 5.73 GB (5.33 GiB)."""
    return sum(llm_weight_breakdown(n_params_by_kind, fmt, keep_16bit, linear_shapes).values())


def llm_measured_bytes(n_params_by_kind: dict[str, int], average_bits: float) -> int:
    """Bytes of the LLM's weights when its decoder-layer Linear weights take `average_bits` each, as a checkpoint
    stored them (packed values, scales and zero points, mixed precision included: qat_tasks.llm.bit_allocation),
    and the embeddings, LM head and norms 16 bits."""
    rest = sum(n for kind, n in n_params_by_kind.items() if kind != "linear")
    return int(math.ceil(n_params_by_kind["linear"] * average_bits / 8 + 2 * rest))


# ---------------------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------------------
def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, dtype_bytes: int = 2) -> int:
    """Keys and values (2) of every layer and KV head for `tokens` cached tokens. Llama 3 8B in fp16:
    131,072 bytes (128 KiB) per token, so 16 sequences x 4096 tokens = 8 GiB."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes * tokens


def kv_headroom(shape: LlamaShape, sequences: int, context_tokens: int, dtype_bytes: int = 2) -> dict:
    """The KV cache for `sequences` concurrent sequences at full `context_tokens` (the worst case vLLM's
    scheduler admits), as a budget row."""
    tokens = sequences * context_tokens
    b = kv_cache_bytes(shape.num_hidden_layers, shape.num_key_value_heads, shape.head_dim, tokens, dtype_bytes)
    return {"name": "LLM KV cache", "precision": f"{8 * dtype_bytes}-bit, {sequences} x {context_tokens} tokens",
            "bytes": b, "source": "computed", "per_token_bytes": b // tokens, "tokens": tokens}


# ---------------------------------------------------------------------------------------------------------------
# Budget and cost tables
# ---------------------------------------------------------------------------------------------------------------
def budget_table(models: list[dict], gpu_gib: float = 24.0, kv: dict | None = None,
                 runtime_overhead_gib: float = 1.5, gpus: int = 1) -> dict:
    """models: [{"name", "precision", "bytes", "source": "measured"|"computed"}]; kv: a kv_headroom row (or
    None). Adds the KV cache and the runtime overhead (per GPU) and compares the total with `gpus` x
    `gpu_gib`. Returns {"rows", "total_gib", "capacity_gib", "free_gib", "fits"}; each row has "gib" and
    "share" (of capacity)."""
    rows = [dict(m) for m in models]
    for m in rows:
        missing = {"name", "precision", "bytes", "source"} - set(m)
        if missing:
            raise ValueError(f"budget row {m.get('name', m)}: missing {sorted(missing)}")
    if kv is not None:
        rows.append(dict(kv))
    if runtime_overhead_gib:
        rows.append({"name": "runtime overhead", "precision": "CUDA context, activations, allocator",
                     "bytes": int(runtime_overhead_gib * gpus * GIB), "source": "assumed"})
    capacity = gpu_gib * gpus
    for r in rows:
        r["gib"] = r["bytes"] / GIB
        r["share"] = r["gib"] / capacity
    total = sum(r["gib"] for r in rows)
    out = {"rows": rows, "total_gib": total, "capacity_gib": capacity, "gpus": gpus,
           "free_gib": capacity - total, "fits": total <= capacity}
    if kv is not None and kv.get("per_token_bytes"):
        # How many cached tokens the memory left by everything else holds: the concurrency that really fits.
        room = (capacity - (total - kv["bytes"] / GIB)) * GIB
        out["kv_tokens_fit"] = max(0, int(room // kv["per_token_bytes"]))
    return out


def production_models(llm_fmt: str | WeightFormat, llm: LlamaShape = LLAMA3_8B, intent_labels: int = 10,
                      keep_16bit: tuple[str, ...] = ("embedding", "lm_head", "norm")) -> list[dict]:
    """Budget rows for the production stack, all computed from parameter counts: intent classifier and
    escalation detector (DistilBERT-base, INT8 ONNX), reranker (MiniLM-L6 cross-encoder, INT8 ONNX) and the
    LLM in `llm_fmt`."""
    f = weight_format(llm_fmt)
    intent = distilbert_classifier(intent_labels)
    escalation = distilbert_classifier(2)
    return [
        {"name": "intent classifier (DistilBERT-base)", "precision": "INT8 ONNX",
         "bytes": encoder_int8_bytes(intent.param_count()), "source": "computed", "params": intent.param_count()},
        {"name": "escalation detector (DistilBERT-base)", "precision": "INT8 ONNX",
         "bytes": encoder_int8_bytes(escalation.param_count()), "source": "computed",
         "params": escalation.param_count()},
        {"name": "reranker (MiniLM-L6 cross-encoder)", "precision": "INT8 ONNX",
         "bytes": encoder_int8_bytes(MINILM_L6_CROSS_ENCODER.param_count()), "source": "computed",
         "params": MINILM_L6_CROSS_ENCODER.param_count()},
        {"name": "fallback LLM (Llama 3 8B)" if llm == LLAMA3_8B else "fallback LLM", "precision": f.name,
         "bytes": llm_weight_bytes(llm.param_counts(), f, keep_16bit, llm.linear_shapes()), "source": "computed",
         "params": sum(llm.param_counts().values())},
    ]


# The config's defaults carry the same list; these are data, not measurements.
DEFAULT_INSTANCES: tuple[dict, ...] = (
    {"name": "g6.xlarge", "gpu": "L4", "gpus": 1, "gpu_memory_gib": 24, "usd_per_hour": 0.805},
    {"name": "g5.xlarge", "gpu": "A10G", "gpus": 1, "gpu_memory_gib": 24, "usd_per_hour": 1.006},
    {"name": "g6e.xlarge", "gpu": "L40S", "gpus": 1, "gpu_memory_gib": 48, "usd_per_hour": 1.861},
    {"name": "g5.12xlarge", "gpu": "A10G", "gpus": 4, "gpu_memory_gib": 24, "usd_per_hour": 5.672},
)
PRICE_NOTE = "us-east-1 on-demand list prices (USD), to be checked before quoting; never measured here"


def _field(obj, key):
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


def cost_comparison(instances, stacks: dict[str, list[dict]], kv: dict | None = None,
                    runtime_overhead_gib: float = 1.5, hours_per_month: float = 730) -> list[dict]:
    """One row per instance (dicts or config GpuInstance objects: name, gpu, gpus, gpu_memory_gib per GPU,
    usd_per_hour): price per hour and per month, and for each stack (e.g. {"fp16": rows, "w4a16": rows})
    whether it fits and the GiB left. On a multi-GPU instance the runtime overhead is paid per GPU and the
    total is compared with the GPUs together: that assumes the LLM is sharded with tensor parallelism
    (vLLM tensor_parallel_size) and the encoders placed where there is room."""
    out = []
    for inst in instances if instances is not None else DEFAULT_INSTANCES:
        gpus = int(_field(inst, "gpus"))
        per_gpu = float(_field(inst, "gpu_memory_gib"))
        price = float(_field(inst, "usd_per_hour"))
        row = {"instance": _field(inst, "name"), "gpu": f"{gpus}x {_field(inst, 'gpu')}",
               "gpu_memory_gib": gpus * per_gpu, "usd_per_hour": price, "usd_per_month": price * hours_per_month}
        for name, models in stacks.items():
            b = budget_table(models, per_gpu, kv, runtime_overhead_gib, gpus)
            row[f"fits_{name}"] = b["fits"]
            row[f"free_gib_{name}"] = b["free_gib"]
        out.append(row)
    return out


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(table, columns: list[str] | None = None) -> str:
    """Markdown: a budget_table result (its rows, then the total, capacity, free memory and verdict), or any
    list of flat dicts (e.g. cost_comparison rows; `columns` picks and orders the keys)."""
    if isinstance(table, dict) and "rows" in table:
        head = ["model", "precision", "GiB", "share", "source"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in table["rows"]:
            lines.append(f"| {r['name']} | {r['precision']} | {r['gib']:.3f} | {100 * r['share']:.1f} % | "
                         f"{r['source']} |")
        gpus = f"{table['gpus']} x {table['capacity_gib'] / table['gpus']:g}" if table["gpus"] > 1 else \
            f"{table['capacity_gib']:g}"
        lines.append(f"| **total** | | **{table['total_gib']:.3f}** | {100 * table['total_gib'] / table['capacity_gib']:.1f} % | |")
        verdict = "fits" if table["fits"] else "does NOT fit"
        lines.append("")
        lines.append(f"{verdict} on {gpus} GiB: {table['free_gib']:+.2f} GiB free")
        if "kv_tokens_fit" in table:
            lines.append(f"KV cache room for {table['kv_tokens_fit']:,} tokens once the rest is loaded")
        return "\n".join(lines)
    rows = list(table)
    if not rows:
        return ""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The report the pipeline logs
# ---------------------------------------------------------------------------------------------------------------
PRODUCTION_4BIT = "w4a16_g128_asym"  # AWQ with zero points: the larger of the two 4-bit layouts (GPTQ is symmetric)


def stack_report(budget_cfg, models: list[dict], llm_shape: LlamaShape | None = None,
                 llm_bits: tuple[str, float] | None = None) -> dict:
    """The memory report for one pipeline run. budget_cfg: the config's memory_budget section (or a dict with
    gpu_memory_gib, runtime_overhead_gib, kv_concurrent_sequences, kv_context_tokens, production_llm,
    instances); models: this run's artifacts as budget rows (source "measured"). llm_shape: the run's LLM, for
    its KV cache row (left out when None: measured rows carry sizes, not shapes).

    Three tables: this run's stack as measured; the production stack (Llama 3 8B and the encoders) computed
    at fp16 and at 4-bit; and which instances hold each production stack at what price. Returns
    {"markdown", "data" (JSON-able), "metrics" (floats, for MLflow), "summary" (one line)}."""
    gpu = float(_field(budget_cfg, "gpu_memory_gib"))
    overhead = float(_field(budget_cfg, "runtime_overhead_gib"))
    seqs, ctx = int(_field(budget_cfg, "kv_concurrent_sequences")), int(_field(budget_cfg, "kv_context_tokens"))
    prod_llm = PRODUCTION_LLMS[_field(budget_cfg, "production_llm")]
    instances = _field(budget_cfg, "instances")

    rows = [{**m, "bytes": int(m["bytes"])} for m in models]
    measured = budget_table(rows, gpu, kv_headroom(llm_shape, seqs, ctx) if llm_shape else None, overhead)
    kv = kv_headroom(prod_llm, seqs, ctx)
    stacks = {"fp16": production_models("fp16", prod_llm), "w4a16": production_models(PRODUCTION_4BIT, prod_llm)}
    if llm_bits is not None:  # the registered 4-bit candidate's stored bits per decoder weight, read off its checkpoint
        label, bits = llm_bits
        as_measured = production_models(PRODUCTION_4BIT, prod_llm)
        as_measured[-1] = {**as_measured[-1], "precision": f"{label}: {bits:.2f} bits per decoder weight",
                           "bytes": llm_measured_bytes(prod_llm.param_counts(), bits),
                           "source": "computed from the checkpoint's bits"}
        stacks["registered"] = as_measured
    prod = {name: budget_table(s, gpu, kv, overhead) for name, s in stacks.items()}
    costs = cost_comparison(instances, stacks, kv, overhead)
    cheapest = min((c for c in costs if c["fits_w4a16"]), key=lambda c: c["usd_per_hour"], default=None)

    def verdict(b: dict) -> str:
        return f"{b['total_gib']:.2f} GiB {'fits' if b['fits'] else 'does NOT fit'} ({b['free_gib']:+.2f} GiB free)"

    summary = (f"this run's stack {verdict(measured)}; production {_llm_name(budget_cfg)} with "
               f"{seqs} x {ctx}-token KV cache: fp16 {verdict(prod['fp16'])}, 4-bit {verdict(prod['w4a16'])}")
    if cheapest:
        summary += f"; cheapest instance for 4-bit: {cheapest['instance']} (${cheapest['usd_per_month']:,.0f}/month)"
    md = [f"# Memory budget: one {gpu:g} GiB GPU", "",
          "## This run's models (measured artifacts)", "", format_table(measured), "",
          f"## Production stack, computed ({_llm_name(budget_cfg)}, KV cache for {seqs} sequences x {ctx} "
          f"tokens at {kv['per_token_bytes']:,} bytes per token)", "",
          "### LLM in fp16", "", format_table(prod["fp16"]), "",
          f"### LLM in 4-bit ({PRODUCTION_4BIT}, embeddings and lm_head 16-bit)", "", format_table(prod["w4a16"]), "",
          *([f"### LLM as the registered candidate stores it ({llm_bits[0]}, {llm_bits[1]:.2f} bits per decoder-layer "
             f"weight read off its checkpoint; embeddings and lm_head 16-bit)", "", format_table(prod["registered"]),
             ""] if llm_bits is not None else []),
          "## Instances", "", f"Prices: {PRICE_NOTE}.", "",
          format_table(costs, ["instance", "gpu", "gpu_memory_gib", "usd_per_hour", "usd_per_month", "fits_fp16",
                               "free_gib_fp16", "fits_w4a16", "free_gib_w4a16"])]
    metrics = {"measured_total_gib": measured["total_gib"], "measured_free_gib": measured["free_gib"],
               "measured_fits": float(measured["fits"]), "kv_cache_gib": kv["bytes"] / GIB}
    for name, b in prod.items():
        metrics.update({f"production_{name}_total_gib": b["total_gib"], f"production_{name}_free_gib": b["free_gib"],
                        f"production_{name}_fits": float(b["fits"]),
                        f"production_{name}_kv_tokens_fit": float(b["kv_tokens_fit"])})
    data = {"gpu_gib": gpu, "runtime_overhead_gib": overhead, "measured": measured, "production": prod,
            "instances": costs, "price_note": PRICE_NOTE}
    return {"markdown": "\n".join(md), "data": data, "metrics": metrics, "summary": summary}


def _llm_name(budget_cfg) -> str:
    return {"llama-3-8b": "Llama 3 8B"}.get(_field(budget_cfg, "production_llm"), _field(budget_cfg, "production_llm"))
