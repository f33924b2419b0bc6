"""Perplexity on fixed token windows: every candidate sees the SAME windows.

`TokenWindows` tokenizes once and fingerprints the token ids (sha256); a candidate whose digest differs was judged
on different inputs, and its numbers do not compare. Perplexity is exact: the mean negative log-likelihood over
every predicted token, exponentiated.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Token windows and perplexity
# ---------------------------------------------------------------------------------------------------------------
class TokenWindows:
    """Texts tokenized ONCE into fixed, non-overlapping windows of `window` tokens.

    Documents are joined with the tokenizer's EOS token between them (no BOS is added: the standard
    GPTQ/AWQ-paper protocol of cutting one token stream), the ragged tail is dropped and at most `max_tokens`
    tokens are kept (rounded down to whole windows). `digest` is the sha256 of the window shape and the token
    ids: equal digests mean bitwise-identical inputs."""

    def __init__(self, tokenizer, texts: list[str], window: int, max_tokens: int | None = None, name: str = ""):
        import torch

        if window < 2:
            raise ValueError("window must hold at least 2 tokens (one predicted)")
        sep = tokenizer.eos_token_id
        if sep is None:
            raise ValueError("the tokenizer has no EOS token to separate documents")
        budget = None if max_tokens is None else (max_tokens // window) * window
        stream: list[int] = []
        used = 0
        for start in range(0, len(texts), 64):  # in chunks, so a small budget does not tokenize the whole corpus
            for ids in tokenizer(texts[start:start + 64], add_special_tokens=False)["input_ids"]:
                if stream:
                    stream.append(sep)
                stream.extend(ids)
                used += 1
            if budget is not None and len(stream) >= budget:
                break
        n = len(stream) // window
        if budget is not None:
            n = min(n, budget // window)
        if budget is not None and n * window < budget:
            log.warning("%s: only %d tokens of text, fewer than the %d asked for", name or "texts", n * window,
                        budget)
        if n == 0:
            raise ValueError(f"{name or 'texts'}: {len(stream)} tokens do not fill one window of {window}")
        self.name = name
        self.window = window
        self.documents = used
        self.ids = torch.tensor(stream[:n * window], dtype=torch.long).reshape(n, window)
        self.digest = hashlib.sha256(f"{n}x{window}:".encode() + self.ids.numpy().astype("<i8").tobytes()).hexdigest()
        log.info("%s: %d windows of %d tokens (%d tokens from %d documents), digest %s", name or "token windows",
                 n, window, n * window, used, self.digest[:12])

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    def describe(self) -> dict:
        return {"name": self.name, "windows": len(self), "window": self.window, "tokens": self.tokens,
                "documents": self.documents, "digest": self.digest}


def device_of(model):
    return next(model.parameters()).device


def perplexity(model, windows: TokenWindows, batch_size: int = 4, progress: bool = True) -> dict:
    """Exact perplexity over all windows: exp(total NLL / predicted tokens). Each window predicts its tokens
    2..window from the ones before (no context crosses a window boundary); NLL is summed in float64."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = device_of(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    per_window: list[tuple[float, int]] = []  # (NLL sum, tokens) per window: the units paired gates resample
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(windows), batch_size), desc=f"perplexity {windows.name}".strip(),
                              unit="batch", disable=not progress, mininterval=5):
                x = windows.ids[start:start + batch_size].to(device)
                logits = model(input_ids=x, use_cache=False).logits
                for row in range(x.shape[0]):  # one row at a time: float32 logits of a big vocabulary are large
                    nll = F.cross_entropy(logits[row, :-1].float(), x[row, 1:], reduction="none")
                    total += float(nll.double().sum())
                    count += nll.numel()
                    per_window.append((float(nll.double().sum()), nll.numel()))
    finally:
        model.train(was_training)
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": len(windows),
            "digest": windows.digest, "seconds": time.perf_counter() - t0,
            "window_nll": [w[0] for w in per_window], "window_tokens": [w[1] for w in per_window]}
