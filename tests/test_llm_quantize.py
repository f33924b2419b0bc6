"""qat_tasks.llm.quantize on tiny random-init Llamas: real llm-compressor runs, real checkpoints on disk.

Torch runs single-threaded here: the models are tiny, and on a shared 2-core box two OpenMP threads fighting
another process for a core make each small matmul ~100x slower."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("llmcompressor")

from qat_tasks.llm import quantize as lq  # noqa: E402
from qat_tasks.llm.checkpoint import load_quantized
from qat_tasks.llm.quantize import QuantSpec, quantize  # noqa: E402

TEXTS = [
    "the cat sat on the mat while the dog ran around the park with a red ball",
    "a quick brown fox jumps over the lazy dog near the old river bank",
    "small models quantize fast so the tests finish in a few seconds",
    "weights are rounded to four bits and scales are stored per group",
    "the dog and the cat sleep near the warm fire after a long day",
    "calibration text flows through the layers that were already quantized",
] * 2
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def _tiny_llama(path, hidden=96, intermediate=256, layers=4, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=64, tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """hidden 96: not divisible by 128 or 64, so every projection but down_proj (in 256) falls back to 32."""
    return _tiny_llama(tmp_path_factory.mktemp("fp") / "tiny-llama")


@pytest.fixture(scope="module")
def fp_model(fp_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def probe(fp_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fp_dir)(TEXTS[0] + " " + TEXTS[3], return_tensors="pt").input_ids


_RUNS: dict = {}


@pytest.fixture(scope="module")
def quantized(fp_dir, tmp_path_factory):
    """One run per method, shared by the tests that only inspect its output."""
    def run(method: str):
        if method not in _RUNS:
            root = tmp_path_factory.mktemp(method)
            spec = QuantSpec(method, chunk_layers=2, max_seq_len=32)
            result = quantize(fp_dir, spec, TEXTS, root / "out", work_dir=root / "work", progress=False)
            _RUNS[method] = (spec, result, root)
        return _RUNS[method]
    yield run
    _RUNS.clear()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(f)
    return out


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
def test_method_writes_a_checkpoint_close_to_fp(method, quantized, fp_model, probe):
    spec, result, root = quantized(method)
    out = root / "out"
    assert result.chunks_total == 2 and result.chunks_resumed == 0 and not result.reused
    assert result.verify_rel_err is not None and result.verify_rel_err <= 1e-4  # reload == in-memory model
    assert result.size_bytes == sum(f.stat().st_size for f in out.iterdir() if f.name != lq.MANIFEST)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    targets = {t: g["weights"]["group_size"] for g in qc["config_groups"].values() for t in g["targets"]}
    assert qc["ignore"] == ["lm_head"] and targets["re:(^|.*\\.)down_proj$"] == 128
    assert {targets[rf"re:(^|.*\.){p}$"] for p in PROJ} == {32}
    assert {g["weights"]["symmetric"] for g in qc["config_groups"].values()} == {method != "awq"}

    tensors = _tensors(out)
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.weight_packed" in tensors and f"{q}.weight" not in tensors
    assert tensors[f"{q}.weight_packed"].dtype == torch.int32  # 8 int4 values per int32
    assert (f"{q}.weight_zero_point" in tensors) == (method == "awq")

    model, tokenizer = load_quantized(out)
    assert not model.training and model.dtype == torch.float32
    fp, got = _logits(fp_model, probe), _logits(model, probe)
    rel = float((got - fp).norm() / fp.norm())
    assert 1e-4 < rel < 0.5, rel  # quantized (not identical) yet close
    # every quantized weight sits on a 4-bit grid: w / scale is an integer (q - zero point), 16 levels per group
    layer = model.model.layers[1].mlp.up_proj
    levels = (layer.weight / tensors["model.layers.1.mlp.up_proj.weight_scale"].repeat_interleave(32, dim=1))
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    by_group = levels.round().view(layer.out_features, -1, 32)
    assert (by_group.amax(-1) - by_group.amin(-1)).max() <= 15
    # the tied head stays tied to the (unquantized) embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, fp_model.lm_head.weight)
    assert tokenizer.get_vocab() == _tokenizer().get_vocab()
    assert (out / "recipe.yaml").exists() and (out / lq.MANIFEST).exists()


@pytest.mark.parametrize(("hidden", "intermediate", "proj_g", "down_g"), [(96, 256, 32, 128), (128, 192, 128, 64)])
def test_group_size_falls_back_per_layer(hidden, intermediate, proj_g, down_g, tmp_path):
    src = _tiny_llama(tmp_path / "fp", hidden=hidden, intermediate=intermediate, layers=2)
    result = quantize(src, QuantSpec("rtn"), [], tmp_path / "out", work_dir=tmp_path / "work", progress=False)
    assert result.chunks_total == 1
    assert set(result.group_sizes) == {f"model.layers.{i}.{m}.{p}" for i in range(2)
                                       for m, ps in (("self_attn", PROJ[:4]), ("mlp", PROJ[4:] + ("down_proj",)))
                                       for p in ps}
    for name, g in result.group_sizes.items():
        assert g == (down_g if name.endswith("down_proj") else proj_g)
    tensors = _tensors(tmp_path / "out")
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (hidden, intermediate // down_g)
    assert tensors["model.layers.0.self_attn.o_proj.weight_scale"].shape == (hidden, hidden // proj_g)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert sorted(g["weights"]["group_size"] for g in qc["config_groups"].values()) == sorted({proj_g, down_g})


def test_group_size_without_a_vllm_divisor_is_refused(tmp_path):
    src = _tiny_llama(tmp_path / "fp", hidden=80, intermediate=128, layers=1)  # 80 = 16 * 5
    with pytest.raises(ValueError, match=r"QuantSpec\.group_size.*in_features=80"):
        quantize(src, QuantSpec("rtn"), [], tmp_path / "out", work_dir=tmp_path / "work", progress=False)


def test_keep_leaves_lm_head_and_a_block_unquantized(fp_dir, fp_model, tmp_path):
    spec = QuantSpec("gptq", keep=("lm_head", r"re:model\.layers\.1\."), chunk_layers=2, max_seq_len=32)
    result = quantize(fp_dir, spec, TEXTS, tmp_path / "out", work_dir=tmp_path / "work", progress=False)
    block = {f"model.layers.1.{m}.{p}" for m, ps in (("self_attn", PROJ[:4]), ("mlp", PROJ[4:] + ("down_proj",)))
             for p in ps}
    assert set(result.kept) == block | {"lm_head"}
    assert not block & set(result.group_sizes) and len(result.group_sizes) == 21
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert set(qc["ignore"]) == block | {"lm_head"}

    model, _ = load_quantized(tmp_path / "out")
    fp_params, params = dict(fp_model.named_parameters()), dict(model.named_parameters())
    for name in block:
        assert torch.equal(params[f"{name}.weight"], fp_params[f"{name}.weight"]), name
    assert torch.equal(model.lm_head.weight, fp_model.lm_head.weight)
    assert not torch.equal(params["model.layers.0.mlp.down_proj.weight"],
                           fp_params["model.layers.0.mlp.down_proj.weight"])


def test_untied_lm_head_may_be_quantized(tmp_path):
    """Without "lm_head" in keep an untied head is quantized too, in the last chunk (it sits after the layers)."""
    src = _tiny_llama(tmp_path / "fp", layers=2, tie=False)
    result = quantize(src, QuantSpec("rtn", keep=(), chunk_layers=1), [], tmp_path / "out", work_dir=tmp_path / "w",
                      progress=False)
    assert result.kept == [] and result.group_sizes["lm_head"] == 32 and result.chunks_total == 2
    assert "lm_head.weight" in load_file(tmp_path / "w" / "chunk-001.safetensors")
    tensors = _tensors(tmp_path / "out")
    assert "lm_head.weight_packed" in tensors and "model.embed_tokens.weight" in tensors
    model, _ = load_quantized(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_resume_after_a_crash_recomputes_only_unfinished_chunks(fp_dir, tmp_path, monkeypatch, quantized):
    """AWQ rewrites the RMSNorm weights in front of each block too: a resumed run that lost them would
    differ from the uninterrupted one."""
    spec = QuantSpec("awq", chunk_layers=1, max_seq_len=32)
    calls = []
    real_oneshot = lq._oneshot
    monkeypatch.setattr(lq, "_oneshot", lambda *a, **k: (calls.append(1), real_oneshot(*a, **k)))

    def crash_after_second_chunk(k, total):
        assert total == 4
        if k == 1:
            raise RuntimeError("injected crash")

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected crash"):
        quantize(fp_dir, spec, TEXTS, crashed / "out", work_dir=crashed / "work", progress=False,
                 on_chunk_done=crash_after_second_chunk)
    assert len(calls) == 2 and not (crashed / "out").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (crashed / "work").glob("chunk-*.safetensors")}
    assert sorted(finished) == ["chunk-000.safetensors", "chunk-001.safetensors"]
    norm = "model.layers.1.post_attention_layernorm.weight"
    assert norm in load_file(crashed / "work" / "chunk-001.safetensors")  # AWQ-smoothed norm saved with its chunk

    calls.clear()
    resumed = quantize(fp_dir, spec, TEXTS, crashed / "out", work_dir=crashed / "work", progress=False)
    assert (resumed.chunks_total, resumed.chunks_resumed, len(calls)) == (4, 2, 2)
    for name, mtime in finished.items():  # the finished chunks were read, not rewritten
        assert (crashed / "work" / name).stat().st_mtime_ns == mtime

    clean = tmp_path / "clean"
    calls.clear()
    straight = quantize(fp_dir, spec, TEXTS, clean / "out", work_dir=clean / "work", progress=False)
    assert (straight.chunks_resumed, len(calls)) == (0, 4)
    a, b = _tensors(crashed / "out"), _tensors(clean / "out")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # and chunking itself changes nothing: later chunks calibrate on what one oneshot run would have left
    c = _tensors(quantized("awq")[2] / "out")  # chunk_layers=2
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_second_call_is_idempotent_and_a_new_spec_is_not(fp_dir, tmp_path, monkeypatch):
    first = quantize(fp_dir, QuantSpec("rtn", chunk_layers=2), [], tmp_path / "out", work_dir=tmp_path / "work",
                     progress=False)
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(lq, "_oneshot", lambda *a, **k: pytest.fail("recomputed"))
    t = time.perf_counter()
    again = quantize(fp_dir, QuantSpec("rtn", chunk_layers=2), [], tmp_path / "out", work_dir=tmp_path / "work",
                     progress=False)
    assert time.perf_counter() - t < 5
    assert again.reused and again.chunks_resumed == again.chunks_total == 2
    assert (again.spec_hash, again.group_sizes, again.size_bytes) == (first.spec_hash, first.group_sizes,
                                                                      first.size_bytes)
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "out").iterdir()} == before

    monkeypatch.undo()  # another spec: its chunks and checkpoint are recomputed, the output replaced
    other = quantize(fp_dir, QuantSpec("rtn", symmetric=False, chunk_layers=2), [], tmp_path / "out",
                     work_dir=tmp_path / "work", progress=False)
    assert not other.reused and other.chunks_resumed == 0 and other.spec_hash != first.spec_hash
    assert "model.layers.0.self_attn.q_proj.weight_zero_point" in _tensors(tmp_path / "out")


@pytest.mark.parametrize(("field", "kwargs"), [
    ("method", {"method": "fp8"}),
    ("bits", {"bits": 3}),
    ("group_size", {"group_size": 100}),
    ("actorder", {"actorder": "group"}),
    ("keep", {"keep": "lm_head"}),
    ("keep", {"keep": ("re:model.layers.(",)}),
    ("dampening_frac", {"dampening_frac": 0.0}),
    ("awq_n_grid", {"awq_n_grid": 0}),
    ("awq_duo_scaling", {"awq_duo_scaling": "sometimes"}),
    ("max_seq_len", {"max_seq_len": 0}),
    ("chunk_layers", {"chunk_layers": 0}),
])
def test_bad_spec_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}\b"):
        QuantSpec(**({"method": "gptq"} | kwargs))


def test_spec_defaults_follow_the_method():
    assert QuantSpec("awq").symmetric is False and QuantSpec("awq").actorder is None
    assert QuantSpec("gptq").symmetric is True and QuantSpec("gptq").actorder == "static"
    assert QuantSpec("rtn", symmetric=False).symmetric is False
    assert lq.METHODS == ("rtn", "awq", "gptq", "autoround")
    assert QuantSpec("rtn").calibrated is False and QuantSpec("rtn", observer="imatrix").calibrated is True


@pytest.mark.parametrize(("keep", "message"), [
    (("lm_head", r"re:model\.layers\.9\."), r"QuantSpec\.keep: .* matches no Linear"),
    ((), r"QuantSpec\.keep: 'lm_head' shares its weight"),
    (("lm_head", r"re:model\.layers\.0\.self_attn\.v_proj"), r"QuantSpec\.keep: keeps only part of"),
])
def test_keep_is_checked_against_the_model(fp_dir, tmp_path, keep, message):
    with pytest.raises(ValueError, match=message):
        quantize(fp_dir, QuantSpec("rtn", keep=keep), [], tmp_path / "out", work_dir=tmp_path / "work",
                 progress=False)


def test_calibrated_methods_need_text_and_quantized_sources_are_refused(fp_dir, tmp_path, quantized):
    with pytest.raises(ValueError, match="calibration_texts"):
        quantize(fp_dir, QuantSpec("gptq"), ["", ""], tmp_path / "out", work_dir=tmp_path / "work")
    _, _, root = quantized("rtn")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(root / "out", QuantSpec("rtn"), [], tmp_path / "out2", work_dir=tmp_path / "work2")
