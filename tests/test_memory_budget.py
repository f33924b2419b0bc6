"""Memory budget arithmetic: Llama 3 8B's parameter count and sizes, KV cache per token, and the fit verdict."""

from __future__ import annotations

import pytest

from qat_tasks.reporting import memory_budget as mb

GIB = 2**30


def test_llama3_8b_parameter_count():
    counts = mb.LLAMA3_8B.param_counts()
    assert sum(counts.values()) == pytest.approx(8.03e9, rel=0.01)
    assert counts["embedding"] == counts["lm_head"] == 128256 * 4096  # untied


def test_llama3_8b_weight_sizes():
    counts, shapes = mb.LLAMA3_8B.param_counts(), mb.LLAMA3_8B.linear_shapes()
    fp16 = mb.llm_weight_bytes(counts, "fp16")
    assert fp16 == pytest.approx(2 * sum(counts.values()))
    w4 = mb.llm_weight_bytes(counts, "w4a16_g128_asym", linear_shapes=shapes)
    assert 5.3e9 <= w4 <= 5.8e9  # 16-bit embeddings and lm_head: about 2.1 GB of it
    sym = mb.llm_weight_bytes(counts, "w4a16_g128")
    # Asymmetric adds one 4-bit zero point per group of 128 weights: linear params / 128 / 2 bytes.
    assert w4 - sym == pytest.approx(counts["linear"] / 128 / 2, rel=1e-6)
    # Group count from parameters equals the per-matrix count when 128 divides every input width.
    assert mb.llm_weight_bytes(counts, "w4a16_g128_asym") == w4
    all_4bit = mb.llm_weight_bytes(counts, "w4a16_g128_asym", keep_16bit=("norm",))
    assert all_4bit < w4 - 1.4e9


def test_group_size_falls_back_where_it_does_not_divide():
    shape = mb.LlamaShape(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, vocab_size=100, tie_word_embeddings=True)
    counts = shape.param_counts()
    assert counts["lm_head"] == 0
    exact = mb.llm_weight_bytes(counts, "w4a16_g128", linear_shapes=shape.linear_shapes())
    approx = mb.llm_weight_bytes(counts, "w4a16_g128")
    assert exact > approx  # 576-wide inputs use groups of 64: more scales


def test_kv_cache_bytes():
    assert mb.LLAMA3_8B.kv_bytes_per_token(2) == 131072
    assert mb.kv_cache_bytes(32, 8, 128, 16 * 4096, 2) == 8 * GIB
    kv = mb.kv_headroom(mb.LLAMA3_8B, sequences=16, context_tokens=4096)
    assert kv["bytes"] == 8 * GIB and kv["per_token_bytes"] == 131072


def test_encoder_sizes_from_parameter_counts():
    assert mb.DISTILBERT_BASE.param_count() == 66_362_880
    assert 66e6 <= mb.encoder_int8_bytes(mb.DISTILBERT_BASE.param_count()) <= 70e6
    assert mb.MINILM_L6_CROSS_ENCODER.param_count() == pytest.approx(22.7e6, rel=0.01)


def _stack(llm_gib: float) -> list[dict]:
    return [{"name": "intent", "precision": "INT8", "bytes": 70 * 2**20, "source": "measured"},
            {"name": "llm", "precision": "x", "bytes": int(llm_gib * GIB), "source": "computed"}]


def test_fits_and_does_not_fit():
    kv = {"name": "kv", "precision": "fp16", "bytes": 8 * GIB, "source": "computed", "per_token_bytes": 131072}
    ok = mb.budget_table(_stack(5.33), gpu_gib=24, kv=kv, runtime_overhead_gib=1.5)
    assert ok["fits"] and ok["free_gib"] == pytest.approx(24 - 5.33 - 8 - 1.5 - 70 / 1024, abs=1e-6)
    assert [r["source"] for r in ok["rows"]] == ["measured", "computed", "computed", "assumed"]
    over = mb.budget_table(_stack(15.0), gpu_gib=24, kv=kv, runtime_overhead_gib=1.5)
    assert not over["fits"] and over["free_gib"] < 0
    assert over["kv_tokens_fit"] * 131072 < 8 * GIB  # fewer cached tokens than promised fit
    exact = mb.budget_table([{"name": "m", "precision": "x", "bytes": 24 * GIB, "source": "computed"}], 24, None, 0)
    assert exact["fits"] and exact["free_gib"] == 0
    md = mb.format_table(over)
    assert "does NOT fit" in md and md.startswith("| model |")


def test_production_stack_and_cost_comparison():
    kv = mb.kv_headroom(mb.LLAMA3_8B, 16, 4096)
    stacks = {"fp16": mb.production_models("fp16"), "w4a16": mb.production_models("w4a16_g128_asym")}
    assert all(r["source"] == "computed" for rows in stacks.values() for r in rows)
    assert mb.budget_table(stacks["w4a16"], 24, kv, 1.5)["fits"]
    assert not mb.budget_table(stacks["fp16"], 24, kv, 1.5)["fits"]
    rows = mb.cost_comparison(mb.DEFAULT_INSTANCES, stacks, kv, 1.5)
    by = {r["instance"]: r for r in rows}
    assert by["g5.xlarge"]["usd_per_month"] == pytest.approx(1.006 * 730)
    assert by["g5.xlarge"]["fits_w4a16"] and not by["g5.xlarge"]["fits_fp16"]
    assert by["g6e.xlarge"]["fits_fp16"] and by["g5.12xlarge"]["gpu_memory_gib"] == 96
    md = mb.format_table(rows, ["instance", "gpu", "usd_per_hour", "fits_fp16", "fits_w4a16"])
    assert "| g6.xlarge | 1x L4 | 0.81 | no | yes |" in md


def test_instances_are_data_from_the_config():
    from qat_tasks.core.config_operations import MemoryBudgetConfig

    instances = MemoryBudgetConfig().instances
    rows = mb.cost_comparison(instances, {"w4a16": mb.production_models("w4a16_g128_asym")})
    assert [r["instance"] for r in rows] == [i.name for i in instances]


def test_format_names():
    assert mb.weight_format("w4a16_g128_asym").symmetric is False
    assert mb.weight_format("w4a16_g64").group_size == 64
    with pytest.raises(ValueError):
        mb.weight_format("int3")


def test_stack_report_for_the_pipeline():
    from qat_tasks.core.config_operations import MemoryBudgetConfig

    measured = [{"name": "intent-classifier", "precision": "int8", "bytes": 23.1e6, "source": "measured"},
                {"name": "fallback-llm", "precision": "w4a16", "bytes": 113e6, "source": "measured"}]
    smollm2 = mb.LlamaShape(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                            num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
    report = mb.stack_report(MemoryBudgetConfig(), measured, llm_shape=smollm2)
    assert report["metrics"]["production_w4a16_fits"] == 1.0 and report["metrics"]["production_fp16_fits"] == 0.0
    assert report["metrics"]["kv_cache_gib"] == 8.0
    assert [r["source"] for r in report["data"]["measured"]["rows"]] == ["measured", "measured", "computed", "assumed"]
    assert "does NOT fit" in report["markdown"] and "g6.xlarge" in report["markdown"]
    assert "4-bit 14.98 GiB fits" in report["summary"]
    import json

    json.dumps(report["data"])
