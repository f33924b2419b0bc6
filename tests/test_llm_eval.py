"""LLM evaluation: identical windows for every candidate, exact perplexity, label-scoring routing whose cached
fast path equals scoring each full sequence, and generic calibration text that never overlaps held-out text.
A tiny random-initialised Llama and a byte-level BPE tokenizer trained here stand in for the real model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qat_tasks.core import plots, resources
from qat_tasks.core.schema import INTENTS
from qat_tasks.llm import corpora, perplexity, routing

SENTENCES = [
    "do you have one piece volume 3 in stock",
    "where is my order MA-2026-1234, it has not arrived",
    "I want to return the damaged box set",
    "my card was charged twice, please help",
    "recommend something like Frieren for a beginner",
    "the checkout button does not work on my phone",
    "let me talk to a human right now",
    "The national executive appointed an interim leader last night.",
] + [f"Customer: hello\nIntent: {i}\n" for i in INTENTS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model is all per-op overhead: one thread is fastest, and does not fight other jobs for cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return fast


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_windows_are_identical_across_calls_and_digest_is_stable(tokenizer):
    texts = SENTENCES * 4
    a = perplexity.TokenWindows(tokenizer, texts, window=16, max_tokens=100)
    b = perplexity.TokenWindows(tokenizer, list(texts), window=16, max_tokens=100)
    assert torch.equal(a.ids, b.ids) and a.digest == b.digest
    assert a.ids.shape == (100 // 16, 16)  # capped, whole windows only
    # Documents are joined by EOS: the stream is the tokenized texts with one separator between them.
    stream = []
    for t in texts:
        stream += ([tokenizer.eos_token_id] if stream else []) + tokenizer(t, add_special_tokens=False)["input_ids"]
    assert a.ids.flatten().tolist() == stream[:a.tokens]
    other = perplexity.TokenWindows(tokenizer, texts[1:], window=16, max_tokens=100)
    assert other.digest != a.digest


def test_perplexity_is_exp_of_mean_nll_over_every_predicted_token(model, tokenizer):
    windows = perplexity.TokenWindows(tokenizer, SENTENCES * 3, window=12, max_tokens=120)
    result = perplexity.perplexity(model, windows, batch_size=3, progress=False)
    nlls = []
    with torch.no_grad():
        for w in windows.ids:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nlls += [-float(logp[t, w[t + 1]]) for t in range(len(w) - 1)]
    assert result["tokens"] == len(nlls) == len(windows) * 11
    assert result["windows"] == len(windows) and result["digest"] == windows.digest
    assert result["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_routing_fast_path_equals_full_sequence_scoring(model, tokenizer):
    rows = [{"text": "where is my order MA-2026-77", "label": "order_status"},
            {"text": "I want a manager, this is the third time", "label": "escalation"},
            {"text": "hi 😅", "label": "chitchat"}]
    report = routing.routing_accuracy(model, tokenizer, rows, INTENTS, routing.DEFAULT_SHOTS, progress=False)
    prompt = routing.routing_prompt(tokenizer, INTENTS, routing.DEFAULT_SHOTS)
    assert len({p for p in prompt.label_ids}) == len(INTENTS)
    with torch.no_grad():
        for r, row in enumerate(rows):
            context = list(prompt.prefix_ids) + prompt.message_ids(row["text"])
            for k, label in enumerate(prompt.label_ids):
                seq = torch.tensor([context + list(label)])
                logp = torch.log_softmax(model(seq).logits[0].double(), -1)
                naive = sum(float(logp[len(context) - 1 + j, tok]) for j, tok in enumerate(label))
                assert report["scores"][r, k] == pytest.approx(naive, abs=1e-4)
    texts = [r["text"] for r in rows]
    for batch_size in (1, 2):  # batch edges and padding do not change a score
        again = routing.routing_scores(model, prompt, texts, progress=False, batch_size=batch_size)
        assert np.allclose(again, report["scores"][:3], atol=1e-5)
    best = [INTENTS[i] for i in report["scores"].argmax(1)]
    assert report["predictions"] == best
    assert report["n"] == 3 and report["confusion"].sum() == 3
    assert report["accuracy"] == pytest.approx(sum(p == r["label"] for p, r in zip(best, rows, strict=True)) / 3)
    # Contextual calibration: the same scores minus those of the content-free message.
    y = [INTENTS.index(r["label"]) for r in rows]
    calibrated = (report["scores"] - report["prior_scores"]).argmax(1)
    assert report["calibrated_accuracy"] == pytest.approx(sum(int(c == t) for c, t in zip(calibrated, y, strict=True)) / 3)


def test_routing_rejects_labels_outside_the_intents(model, tokenizer):
    with pytest.raises(ValueError, match="outside"):
        routing.routing_accuracy(model, tokenizer, [{"text": "x", "label": "weather"}], progress=False)


def test_generic_texts_split_is_disjoint_deterministic_and_real_prose():
    full = corpora.generic_texts()
    cal, held = full["calibration"], full["heldout"]
    assert len(cal) > 100 and len(held) > 100
    assert not set(cal) & set(held)
    # Split by article: no article contributes passages to both sides.
    docs = corpora.generic_documents()
    assert {d.source for d in docs} == {"news", "wikipedia"}
    for d in docs[:: max(1, len(docs) // 40)]:
        first = d.text.split("\n")[0][:200]
        assert any(first in t for t in cal) != any(first in t for t in held)
    assert corpora.generic_texts() == full
    capped = corpora.generic_texts(max_chars=20000)
    assert all(sum(map(len, v)) == 20000 for v in capped.values())
    words = " ".join(held[:50]).split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.7  # English words, not markup or stems


def test_conversation_transcripts_have_a_fixed_format(tokenizer):
    conv = [{"conversation_id": "c1", "turns": [{"turn": 1, "text": "thanks!", "label": "chitchat"},
                                                 {"turn": 0, "text": "where is\nmy order", "label": "order_status"}]}]
    (text,) = corpora.conversation_texts(conv)
    assert text == ("Customer: where is my order\nAssistant: [routes to order_status]\n"
                    "Customer: thanks!\nAssistant: [routes to chitchat]")
    (chat,) = corpora.conversation_texts(conv, tokenizer, style="chat")
    assert "MangaAssist" in chat and "where is\nmy order" in chat


def test_greedy_generations_are_deterministic(model, tokenizer):
    a = routing.greedy_generations(model, tokenizer, ["where is my order"], max_new_tokens=5)
    b = routing.greedy_generations(model, tokenizer, ["where is my order"], max_new_tokens=5)
    assert a == b and len(a) == 1 and isinstance(a[0], str)


def test_size_memory_and_chart(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 24)
    assert resources.dir_size_bytes(tmp_path) == 1024
    with resources.RssSampler(interval_s=0.01) as mem:
        block = bytearray(64 * 2**20)  # touched: 64 MB resident
        block[:: 4096] = b"z" * len(block[:: 4096])
        import time

        time.sleep(0.05)
    del block
    assert mem.delta_mb > 40 and mem.peak_mb >= mem.start_mb and mem.samples >= 2
    assert resources.peak_rss_mb() >= mem.peak_mb * 0.9
    png = tmp_path / "ppl.png"
    fig = plots.perplexity_vs_size_chart(
        [{"name": "fp32", "size_bytes": 540e6, "generic_ppl": 20.1, "domain_ppl": 9.3},
         {"name": "awq-domain", "size_mb": 110, "generic_ppl": 23.0, "domain_ppl": None}], png)
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert fig.axes[0].get_xlabel() == "size on disk (MB)"
