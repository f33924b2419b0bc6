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


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_static_calibration_takes_batches_of_their_own_length(tiny, tmp_path, method):
    """Calibration batches are padded to their longest row only, so shapes differ between batches; the calibrator
    folds them in one at a time (a histogram method once had to stack every batch's tensors at once)."""
    import onnx

    from qat_tasks.encoders.int8 import ort_quant
    from qat_tasks.encoders.modeling import OnnxClassifier, export_onnx

    model, tok = tiny()
    texts = ["hi", "where is my order", "do you ship volume 3 of Berserk to Canada and how long does it take"] * 6
    batches = ort_quant.calibration_batches(tok, texts, 32, batch_size=4)
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # no padding to max_length
    assert sum(b["input_ids"].shape[0] for b in batches) == len(texts)  # every row calibrates
    fp32 = export_onnx(model, tok, tmp_path / "fp32.onnx", 32)
    pre = ort_quant.preprocess(fp32, tmp_path / "pre.onnx")
    q = ort_quant.quantize_static(pre, tmp_path / "q.onnx", batches, method)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(q)).graph.node)
    logits = OnnxClassifier(q, tok, ["irrelevant", "relevant"], 32).logits(texts[:3])
    assert logits.shape == (3, 2) and np.isfinite(logits).all()


def test_a_batch_run_in_length_sorted_slices_makes_the_same_update(tiny):
    """Slicing a batch by length (less padding) accumulates the gradient of the whole batch: after training, the
    weights are those of one pass per batch (dropout off, so both runs compute the same thing)."""
    import random

    import torch

    from qat_tasks.core.config_sections import TrainingConfig
    from qat_tasks.encoders.training import length_slices, train_classifier

    rng = random.Random(0)
    texts = [" ".join(rng.choice(["order", "volume", "manga", "refund", "hi"]) for _ in range(rng.randint(1, 20)))
             for _ in range(48)]
    labels = [rng.randint(0, 1) for _ in texts]
    idx = list(range(10))
    parts = length_slices(idx, texts, 3)
    assert sorted(i for p in parts for i in p) == idx and len(parts) == 3
    assert max(len(texts[i]) for i in parts[0]) <= min(len(texts[i]) for i in parts[-1])
    trained = []
    for slices in (1, 3):
        model, tok = tiny(seed=0)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        tc = TrainingConfig(epochs=2, learning_rate=1e-3, batch_size=16, max_length=32, micro_batches=slices)
        train_classifier(model, tok, texts, labels, 2, tc, progress=False)
        trained.append(model.state_dict())
    for name, weight in trained[0].items():
        assert torch.allclose(weight, trained[1][name], atol=1e-5), name
