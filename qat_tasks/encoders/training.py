"""Fine-tuning an encoder: class-weighted cross-entropy (rare intents and frustrated customers are not drowned by
the common case), gradient clipping, a linear warm-up schedule. The FP32 champion is trained here, and QAT reuses
the class weights and the optimizer step."""

from __future__ import annotations

import logging
import math
import random

import numpy as np

from qat_tasks.core.config_sections import TrainingConfig

log = logging.getLogger(__name__)


def class_weights(y: np.ndarray, n_labels: int):
    """Inverse-frequency weights, square-rooted so rare classes matter without dominating; absent classes get 0."""
    import torch

    counts = np.bincount(y, minlength=n_labels).astype(float)
    w = np.where(counts > 0, np.sqrt(counts.sum() / np.maximum(counts, 1) / n_labels), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def epoch_batches(n_rows: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch's batches of row indices, in a seeded random order."""
    order = list(range(n_rows))
    rng.shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]


def length_slices(idx: list[int], texts: list, slices: int) -> list[list[int]]:
    """A batch's rows sorted by length and cut into `slices` runs of similar length: each slice pads only to its own
    longest row. The batch (what one update averages over) stays as drawn."""
    size = lambda i: len(texts[i]) if isinstance(texts[i], str) else sum(map(len, texts[i]))  # noqa: E731
    ordered = sorted(idx, key=size)
    step = -(-len(ordered) // max(1, slices))
    return [ordered[i:i + step] for i in range(0, len(ordered), step)]


def optimizer_step(loss, model, opt, sched, backward: bool = True) -> None:
    import torch

    if backward:  # else the gradients were accumulated already
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()


def train_classifier(model, tokenizer, texts: list[str], labels: list[int], n_labels: int, tc: TrainingConfig,
                     progress: bool = True, log_metric=None) -> dict:
    """Fine-tune `model` in place; returns a short history."""
    import torch
    from torch.nn import functional as F

    from qat_tasks.encoders.modeling import tokenize

    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    y = np.array(labels)
    weights = class_weights(y, n_labels) if tc.class_weighted_loss else None
    steps_per_epoch = math.ceil(len(texts) / tc.batch_size)
    total = steps_per_epoch * tc.epochs
    warmup = max(1, int(tc.warmup_fraction * total))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": tc.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=tc.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="fine-tuning FP32 champion", unit="step", mininterval=5)
    model.train()
    step, history = 0, []
    for epoch in range(tc.epochs):
        running = 0.0
        for idx in epoch_batches(len(texts), tc.batch_size, rng):
            # The batch's weighted mean loss, accumulated slice by slice: the gradient of the whole batch at once.
            batch_weight = float(weights[y[idx]].sum()) if weights is not None else float(len(idx))
            loss = 0.0
            for part in length_slices(idx, texts, tc.micro_batches):
                enc = tokenize(tokenizer, [texts[i] for i in part], tc.max_length, "pt")
                logits = model(**enc).logits
                piece = F.cross_entropy(logits, torch.tensor(y[part]), weight=weights, reduction="sum") / batch_weight
                piece.backward()
                loss += piece.detach()
            optimizer_step(loss, model, opt, sched, backward=False)
            step += 1
            running += loss.item()
            if log_metric and (step % 10 == 0 or step == total):
                log_metric("train_loss", loss.item(), step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        history.append({"epoch": epoch + 1, "mean_loss": running / steps_per_epoch})
        log.info("epoch %d/%d: mean training loss %.4f", epoch + 1, tc.epochs, running / steps_per_epoch)
    if bar is not None:
        bar.close()
    model.eval()
    return {"epochs": history, "steps": step}
