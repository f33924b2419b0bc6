"""The 4-bit methods beyond RTN/AWQ/GPTQ on tiny random Llamas: folded rotations, AutoRound, the importance-weighted
observer, and mixed precision chosen by the bit allocator, with the bits read back off the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("llmcompressor")

from qat_tasks.llm import bit_allocation as ba  # noqa: E402
from qat_tasks.llm.checkpoint import load_quantized  # noqa: E402
from qat_tasks.llm.quantize import QuantSpec, quantize  # noqa: E402

from .test_llm_quantize import TEXTS, _tiny_llama  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """hidden 128, intermediate 256: groups of 64 and 128 divide every width. Norm scales drawn at random, as a
    trained model has them (at 1, the rotated LM head would equal the rotated embeddings again)."""
    from transformers import AutoModelForCausalLM

    path = _tiny_llama(tmp_path_factory.mktemp("m") / "llama", hidden=128, intermediate=256, layers=4)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def _logits(model, ids):
    """Logits of a model, or of the unquantized checkpoint at a path."""
    from transformers import AutoModelForCausalLM

    if isinstance(model, str | Path):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def probe(llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama)(TEXTS[1], return_tensors="pt").input_ids


def test_folded_rotations_keep_the_model_s_function_and_untie_the_head(llama, probe, tmp_path):
    from qat_tasks.llm.checkpoint import stage_source
    from qat_tasks.llm.rotation import MARKER, rotate

    source = stage_source(llama, tmp_path / "staged")
    out = rotate(source, tmp_path / "rotated", "spinquant", "d1")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization_config" not in config
    before, after = _logits(llama, probe), _logits(out, probe)
    assert torch.allclose(before, after, atol=1e-4 * before.abs().max())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(load_file(out / "model.safetensors")[q], load_file(llama / "model.safetensors")[q])
    stamp = (out / MARKER).stat().st_mtime_ns
    assert rotate(source, tmp_path / "rotated", "spinquant", "d1") == out and (out / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="rotation 'quarot'"):
        rotate(source, tmp_path / "other", "quarot", "d1")


def test_rotation_then_gptq_writes_a_plain_checkpoint_close_to_the_model(llama, probe, tmp_path):
    spec = QuantSpec("gptq", group_size=64, symmetric=False, rotation="spinquant", chunk_layers=2, max_seq_len=32)
    result = quantize(llama, spec, TEXTS, tmp_path / "out", work_dir=tmp_path / "work", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not config["quantization_config"].get("transform_config")  # nothing runs online: vLLM serves it as is
    model, _ = load_quantized(tmp_path / "out")
    ref, got = _logits(llama, probe), _logits(model, probe)
    assert float((got - ref).norm() / ref.norm()) < 0.1
    assert (tmp_path / "work" / "rotated-spinquant").is_dir() and result.chunks_total == 2


def test_autoround_and_the_importance_weighted_observer_quantize(llama, probe, tmp_path):
    ref = _logits(llama, probe)
    for name, spec in {"autoround": QuantSpec("autoround", group_size=64, autoround_iters=4, autoround_batch_size=4,
                                              chunk_layers=4, max_seq_len=32),
                       "rtn-imatrix": QuantSpec("rtn", group_size=64, symmetric=False, observer="imatrix",
                                                chunk_layers=4, max_seq_len=32)}.items():
        out = tmp_path / name
        quantize(llama, spec, TEXTS, out, work_dir=tmp_path / f"{name}-work", progress=False)
        model, _ = load_quantized(out)
        assert float((_logits(model, probe) - ref).norm() / ref.norm()) < 0.5, name  # random weights: 4 bits is coarse
    with pytest.raises(ValueError, match="needs at least one non-empty text"):
        quantize(llama, QuantSpec("rtn", observer="imatrix"), [], tmp_path / "x", work_dir=tmp_path / "xw",
                 progress=False)


def test_rotated_autoround_in_chunks_leaves_finished_chunks_alone_and_its_checkpoint_reproduces_it(llama, probe,
                                                                                                   tmp_path):
    """A later chunk loads the earlier chunks' finished layers; AutoRound must tune only its own blocks. The
    checkpoint's reload check (fp32 scales here: 1e-4 relative logit error) fails if a finished layer is re-rounded
    off the grid its stored scales describe."""
    from safetensors import safe_open

    spec = QuantSpec("autoround", group_size=64, rotation="spinquant", autoround_iters=4, autoround_batch_size=4,
                     chunk_layers=2, max_seq_len=32)
    result = quantize(llama, spec, TEXTS, tmp_path / "out", work_dir=tmp_path / "work", progress=False)
    assert result.chunks_total == 2 and result.verify_rel_err <= 1e-4
    with safe_open(str(tmp_path / "work" / "chunk-001.safetensors"), framework="pt") as f:
        touched = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}
    assert touched == {"2", "3"}  # the second chunk wrote its own blocks only
    model, _ = load_quantized(tmp_path / "out")
    ref = _logits(llama, probe)
    assert float((_logits(model, probe) - ref).norm() / ref.norm()) < 0.5


def test_autoround_calibrates_on_samples_of_one_length_cut_from_the_texts_in_order():
    from qat_tasks.llm.methods import equal_length_samples

    samples = [{"input_ids": torch.arange(a, b)[None], "attention_mask": torch.ones(1, b - a, dtype=torch.long)}
               for a, b in ((0, 5), (5, 7), (7, 16), (16, 19))]  # lengths 5, 2, 9, 3: 19 tokens
    out = equal_length_samples(samples)
    assert [s["input_ids"].shape for s in out] == [torch.Size([1, 9])] * 2  # the longest sample's length
    assert torch.equal(torch.cat([s["input_ids"][0] for s in out]), torch.arange(18))  # in order, 1 token dropped
    assert all(bool(s["attention_mask"].all()) for s in out)


def test_the_mse_observer_clips_each_group_to_less_weight_error_without_data(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(llama).named_parameters()
           if ".layers." in n and n.endswith("proj.weight")}
    errors = {}
    for observer in ("minmax", "mse"):
        spec = QuantSpec("rtn", group_size=64, symmetric=False, observer=observer, chunk_layers=4)
        assert spec.calibrated is False  # mse reads the weights only
        quantize(llama, spec, [], tmp_path / observer, work_dir=tmp_path / f"{observer}-w", progress=False)
        model, _ = load_quantized(tmp_path / observer)
        got = dict(model.named_parameters())
        errors[observer] = sum(float((got[n].detach().float() - w).pow(2).sum()) for n, w in ref.items())
    assert errors["mse"] < errors["minmax"]


def test_mixed_precision_gives_the_most_sensitive_layers_8_bits_within_the_budget(llama, probe, tmp_path):
    sensitivity = ((0, 0.5), (1, 0.1), (2, 0.2), (3, 4.0))  # block 3 hurts most alone at 4 bits
    quantize(llama, QuantSpec("rtn", group_size=64, symmetric=False, chunk_layers=4), [], tmp_path / "u",
             work_dir=tmp_path / "uw", progress=False)
    spec = QuantSpec("rtn", group_size=64, symmetric=False, chunk_layers=4, max_seq_len=32, average_bits=5.0,
                     block_sensitivity=sensitivity)
    mixed = quantize(llama, spec, TEXTS, tmp_path / "m", work_dir=tmp_path / "mw", progress=False)
    eight = sorted(n for n, b in mixed.bits.items() if b == 8)
    assert eight and all(".layers.3." in n for n in eight[:1])  # the most sensitive block is served first
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):  # fused layers share their bits
        for block in range(4):
            assert len({mixed.bits[f"model.layers.{block}.{'self_attn' if 'q_proj' in group else 'mlp'}.{g}"]
                        for g in group}) == 1
    u, m = ba.stored_bits(tmp_path / "u"), ba.stored_bits(tmp_path / "m")
    # fp32 scales per 64 weights and a 4-bit zero point: 4 + (32 + 4) / 64
    assert u["average_bits"] == pytest.approx(4 + 36 / 64)
    assert u["average_bits"] < m["average_bits"] <= 5.0
    assert all(m["per_layer"][n] == pytest.approx(8 + 32 / 128) for n in eight)  # symmetric 8-bit, groups of 128
    config = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["num_bits"] for g in config.values()} == {4, 8}
    assert all(g["weights"]["symmetric"] for g in config.values() if g["weights"]["num_bits"] == 8)
    model, _ = load_quantized(tmp_path / "m")
    ref = _logits(llama, probe)
    err = float((_logits(model, probe) - ref).norm() / ref.norm())
    model_u, _ = load_quantized(tmp_path / "u")
    assert err < float((_logits(model_u, probe) - ref).norm() / ref.norm())  # more bits, less error
    assert mixed.allocation and {r["bits"] for r in mixed.allocation} == {4, 8}


def test_the_allocator_spends_the_budget_on_sensitivity_per_bit():
    low, high = ba.Scheme(4, 64, False, 16), ba.Scheme(8, 128, True, 16)
    units = [ba.Unit((f"model.layers.{b}.mlp.down_proj",), b, 1000 * (b + 1), 256, sensitivity=s)
             for b, s in enumerate([1.0, 8.0, 0.0, 3.0])]
    bits, avg = ba.allocate(units, low, high, 5.5)
    assert bits["model.layers.1.mlp.down_proj"] == 8 and bits["model.layers.2.mlp.down_proj"] == 4  # no gain: none
    assert avg <= 5.5
    total = sum(u.weights for u in units)
    assert avg == pytest.approx(sum(u.weights * (high if bits[u.names[0]] == 8 else low).bits_per_weight(256)
                                    for u in units) / total)
    with pytest.raises(ValueError, match="4-bit weights alone take"):
        ba.allocate(units, low, high, 4.1)


def test_candidates_name_their_method_and_refuse_what_cannot_run():
    from pydantic import ValidationError

    from qat_tasks.core.config_sections import LlmCandidate

    c = LlmCandidate(method="gptq", calibration="both", rotation="spinquant", symmetric=False, group_size=64,
                     average_bits=5.5)
    assert c.key == "gptq-both-spinquant-asym-g64-mixed5.5"
    assert LlmCandidate(method="rtn", calibration="none").key == "rtn"
    assert LlmCandidate(method="rtn", calibration="domain", observer="imatrix").key == "rtn-domain-imatrix"
    assert LlmCandidate(method="rtn", calibration="none", observer="mse").key == "rtn-mse"  # searches ranges, no data
    with pytest.raises(ValidationError, match="the bit allocator"):
        LlmCandidate(method="rtn", calibration="none", average_bits=5.5)
    with pytest.raises(ValidationError, match="rtn .round-to-nearest. without the imatrix observer takes no"):
        LlmCandidate(method="rtn", calibration="generic")
    with pytest.raises(ValidationError, match="rotation"):
        LlmCandidate(method="gptq", rotation="quarot")


def test_the_block_probe_measures_what_quantizing_each_unit_alone_measures(llama):
    """Blocks before the probed one are taken from the unquantized pass; the perplexity must equal quantizing the
    unit in the whole model and measuring it from scratch (odd window count: a short last batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat_tasks.llm import perplexity
    from qat_tasks.llm.sensitivity import block_sensitivity, rtn_fake_quant, units

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    windows = perplexity.TokenWindows(AutoTokenizer.from_pretrained(llama), TEXTS * 4, window=16, max_tokens=16 * 5)
    report = block_sensitivity(model, windows, perplexity.perplexity, 4, 64, False, batch_size=2, progress=False)
    assert [r["unit"] for r in report["rows"]] == [name for name, _ in units(model)]
    for row, (name, _) in zip(report["rows"], units(model), strict=True):
        reference = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
        for lin in dict(units(reference))[name]:
            lin.weight = torch.nn.Parameter(rtn_fake_quant(lin.weight, 4, 64, False), requires_grad=False)
        expected = perplexity.perplexity(reference, windows, batch_size=2, progress=False)["perplexity"]
        assert row["perplexity"] == pytest.approx(expected, rel=1e-5), name
    assert report["base_perplexity"] == pytest.approx(
        perplexity.perplexity(model, windows, batch_size=2, progress=False)["perplexity"], rel=1e-9)
