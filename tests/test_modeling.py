"""Texts and cross-encoder pairs through tokenization, ONNX export and ONNX Runtime, on tiny random models."""

import numpy as np
import pytest

PAIRS = [("do you have Berserk volume 3", "Berserk volume 3, paperback."), ("hi", "hello there, how are you?")]


@pytest.fixture()
def tiny(tiny_config):
    from qat_tasks.encoders.modeling import build_classifier

    def make(seed: int = 0):
        import torch

        torch.manual_seed(seed)
        model, tok = build_classifier(tiny_config, "tiny-random://bert", ["irrelevant", "relevant"])
        return model.eval(), tok

    return make


def test_pairs_carry_segment_ids_and_single_texts_do_not(tiny):
    from qat_tasks.encoders.modeling import inputs_of, tokenize

    _, tok = tiny()
    assert "token_type_ids" in tokenize(tok, PAIRS, 32)
    assert "token_type_ids" not in tokenize(tok, ["where is my order"], 32)
    rows = [{"text": "q", "text_pair": "p"}, {"text": "q2", "text_pair": "p2"}]
    assert inputs_of(rows) == [("q", "p"), ("q2", "p2")] and inputs_of([{"text": "t"}]) == ["t"]


def test_a_pair_graph_takes_its_inputs_by_name_and_matches_pytorch(tiny, tmp_path):
    import onnx

    from qat_tasks.encoders.modeling import OnnxClassifier, check_export, export_onnx

    model, tok = tiny()
    path = export_onnx(model, tok, tmp_path / "pair.onnx", 32, pair=True)
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert check_export(model, tok, path, PAIRS, 32) < 1e-4
    single = export_onnx(model, tok, tmp_path / "single.onnx", 32)
    assert [i.name for i in onnx.load(str(single)).graph.input] == ["input_ids", "attention_mask"]
    logits = OnnxClassifier(single, tok, ["irrelevant", "relevant"], 32).logits(["hi there"])
    assert logits.shape == (1, 2) and np.isfinite(logits).all()


def test_an_export_that_is_not_the_model_is_refused(tiny, tmp_path):
    from qat_tasks.encoders.modeling import ExportMismatchError, check_export, export_onnx

    model, tok = tiny(seed=0)
    other, _ = tiny(seed=1)
    path = export_onnx(other, tok, tmp_path / "other.onnx", 32, pair=True)
    with pytest.raises(ExportMismatchError, match="differ from PyTorch"):
        check_export(model, tok, path, PAIRS, 32)
