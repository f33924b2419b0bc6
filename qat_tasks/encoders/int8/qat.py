"""Quantization-aware training for encoders: prepare -> train -> convert.

prepare  wraps every Linear of the encoder and head in FakeQuantLinear: weights fake-quantized to INT8 per
         output channel (symmetric), input activations per tensor (asymmetric UINT8) with an EMA min/max
         observer. torch.fake_quantize_* pass gradients straight through inside the range (STE).
train    one short epoch at a tenth of the fine-tuning learning rate, focal loss with class weights (rare
         intents weigh more), observers frozen for the last part so the ranges settle; optionally
         distillation from the FP32 teacher (soft targets at a temperature) for unlabelled traffic.
convert  unwraps the Linear layers with their QAT-adapted weights; the model is then exported to ONNX and
         quantized for ONNX Runtime (QDQ static or dynamic), the runtime production serves.

Training with fake quantization and serving through ONNX Runtime keeps the serving path the same as for
PTQ candidates; converted torch.ao/torchao models ran slower than FP32 on x86 CPUs.
"""

from __future__ import annotations

import logging
import math
import random
import re

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qat_tasks.core.config_sections import QuantizationConfig, TrainingConfig
from qat_tasks.encoders.modeling import inputs_of, tokenize
from qat_tasks.encoders.training import class_weights, epoch_batches, optimizer_step

log = logging.getLogger(__name__)


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, momentum: float = 0.9):
        super().__init__()
        self.linear = linear
        self.momentum = momentum
        self.register_buffer("act_min", torch.tensor(float("inf")))
        self.register_buffer("act_max", torch.tensor(float("-inf")))
        self.observing = True

    def _act_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.clamp(self.act_min, max=0.0)
        hi = torch.clamp(self.act_max, min=0.0)
        scale = torch.clamp((hi - lo) / 255.0, min=1e-8)
        zero_point = torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.int32)
        return scale.reshape(1), zero_point.reshape(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                lo, hi = x.min(), x.max()
                if torch.isinf(self.act_min):
                    self.act_min.copy_(lo)
                    self.act_max.copy_(hi)
                else:
                    self.act_min.mul_(self.momentum).add_((1 - self.momentum) * lo)
                    self.act_max.mul_(self.momentum).add_((1 - self.momentum) * hi)
        scale, zp = self._act_qparams()
        xq = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
        w = self.linear.weight
        w_scale = torch.clamp(w.detach().abs().amax(dim=1) / 127.0, min=1e-8)
        wq = torch.fake_quantize_per_channel_affine(w, w_scale, torch.zeros_like(w_scale, dtype=torch.int32), 0, -128, 127)
        return F.linear(xq, wq, self.linear.bias)


def prepare(model: nn.Module) -> list[FakeQuantLinear]:
    """Wrap every nn.Linear of `model` in place; returns the wrappers."""
    wrappers = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                fq = FakeQuantLinear(child)
                setattr(parent, name, fq)
                wrappers.append(fq)
    return wrappers


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Activation ranges QAT settled on, keyed by the ONNX MatMul node each Linear exports to
    (module `bert.encoder.layer.0.attention.self.query` -> node `/bert/encoder/layer.0/attention/self/query/MatMul`)."""
    ranges = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear) and torch.isfinite(module.act_min):
            lo = min(float(module.act_min), 0.0)
            hi = max(float(module.act_max), 0.0)
            ranges["/" + re.sub(r"\.(?!\d)", "/", name) + "/MatMul"] = (lo, hi)  # layer.0 keeps its dot
    return ranges


def convert(model: nn.Module) -> nn.Module:
    """Unwrap FakeQuantLinear back to nn.Linear (weights kept) for export."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantLinear):
                setattr(parent, name, child.linear)
    return model


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float, weight: torch.Tensor | None) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=-1)
    logp_t = logp.gather(1, y[:, None]).squeeze(1)
    loss = -((1 - logp_t.exp()) ** gamma) * logp_t
    if weight is not None:
        loss = loss * weight[y]
        return loss.sum() / weight[y].sum()
    return loss.mean()


def train(model: nn.Module, tokenizer, texts: list[str], labels: list[int], n_labels: int, tc: TrainingConfig,
          qc: QuantizationConfig, teacher: nn.Module | None = None, progress: bool = True,
          log_metric=None) -> dict:
    """QAT fine-tuning of a prepared model; with `teacher`, mixes in distillation from its soft targets."""
    wrappers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    y_all = np.array(labels)
    weight = class_weights(y_all, n_labels)
    steps_per_epoch = math.ceil(len(texts) / tc.batch_size)
    total = steps_per_epoch * qc.qat_epochs
    freeze_at = int(total * (1 - qc.freeze_observers_fraction))
    lr = tc.learning_rate * qc.qat_lr_fraction
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, total)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="QAT" + (" + distillation" if teacher is not None else ""), unit="step",
                   mininterval=5)
    # Observers see the data once before any weight moves, so the first steps quantize sensibly.
    model.eval()
    with torch.no_grad():
        for i in range(0, min(len(texts), 8 * tc.batch_size), tc.batch_size):
            model(**tokenize(tokenizer, texts[i:i + tc.batch_size], tc.max_length, "pt"))
    model.train()
    step, losses = 0, []
    for _epoch in range(qc.qat_epochs):
        for idx in epoch_batches(len(texts), tc.batch_size, rng):
            if step == freeze_at:
                for m in wrappers:
                    m.observing = False
                log.info("QAT step %d/%d: activation observers frozen", step, total)
            enc = tokenize(tokenizer, [texts[i] for i in idx], tc.max_length, "pt")
            logits = model(**enc).logits
            y = torch.tensor(y_all[idx])
            loss = focal_loss(logits, y, qc.focal_gamma, weight)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(**enc).logits
                temp = qc.distill_temperature
                kd = F.kl_div(F.log_softmax(logits / temp, -1), F.softmax(t_logits / temp, -1),
                              reduction="batchmean") * temp * temp
                loss = qc.distill_alpha * kd + (1 - qc.distill_alpha) * loss
            optimizer_step(loss, model, opt, sched)
            step += 1
            losses.append(loss.item())
            if log_metric and (step % 10 == 0 or step == total):
                log_metric("qat_loss", loss.item(), step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    return {"steps": step, "learning_rate": lr, "observers_frozen_at": freeze_at, "final_loss": float(np.mean(losses[-10:]))}


def build(name: str, hf_model: nn.Module, tokenizer, labels: list[str], train_rows: list[dict], batches: list[dict],
          max_length: int, tc: TrainingConfig, qc: QuantizationConfig, out_dir, trained: dict, log_metric=None):
    """Candidate `name` (qat_static, qat_dynamic, qat_distill_static, qat_distill_dynamic) as an ONNX path.

    `trained` caches the QAT-trained FP32 export per variant within one task, so the static and dynamic
    exports of the same training share it.
    """
    import copy
    from pathlib import Path

    from qat_tasks.encoders.int8 import ort_quant
    from qat_tasks.encoders.modeling import export_onnx, is_pair

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    distill = name.startswith("qat_distill")
    variant = "distill" if distill else "labels"
    if variant not in trained:
        student = copy.deepcopy(hf_model)
        prepare(student)
        texts = inputs_of(train_rows)
        y = [labels.index(r["label"]) for r in train_rows]
        info = train(student, tokenizer, texts, y, len(labels), tc, qc, teacher=hf_model if distill else None,
                     log_metric=log_metric)
        ranges = activation_ranges(student)
        convert(student)
        fp32 = export_onnx(student, tokenizer, out_dir / f"qat_{variant}_fp32.onnx", max_length, is_pair(texts))
        # (pre-processed FP32 graph, training info, QAT activation ranges, the trained model for parity)
        trained[variant] = (ort_quant.preprocess(fp32, out_dir / f"qat_{variant}_pre.onnx"), info, ranges, student)
    pre, info, ranges, _ = trained[variant]
    dst = out_dir / f"{name}.onnx"
    if name.endswith("dynamic"):
        return ort_quant.quantize_dynamic(pre, dst), info
    # Static: min-max calibration on the QAT weights, or (qat_static_ranges: qat) the Linear inputs keep the
    # ranges QAT trained with and only the rest is calibrated.
    keep = ranges if qc.qat_static_ranges == "qat" else None
    return ort_quant.quantize_static(pre, dst, batches, "minmax", activation_ranges=keep), info
