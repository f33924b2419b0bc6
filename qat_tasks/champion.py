"""The FP32 champion: found by the registry alias @champion, or bootstrapped when a model has none yet.

Bootstrapping fine-tunes the configured backbone on the model's training rows of the current calibration
version (qat_tasks.role_data; class-weighted cross-entropy, so rare intents and frustrated customers are not
drowned by the common case), exports it to ONNX, registers it with its lineage and points @champion at it.
The escalation detector's package also carries its decision threshold, tuned for recall in ONNX Runtime.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
from pathlib import Path

import numpy as np

from qat_tasks import registry, role_data, tracking
from qat_tasks.calibration import load_manifest
from qat_tasks.config import PipelineConfig, TrainingConfig

log = logging.getLogger(__name__)

STAGE = "bootstrap-champion"


def class_weights(y: np.ndarray, n_labels: int):
    """Inverse-frequency weights, square-rooted so rare classes matter without dominating; absent classes get 0."""
    import torch

    counts = np.bincount(y, minlength=n_labels).astype(float)
    w = np.where(counts > 0, np.sqrt(counts.sum() / np.maximum(counts, 1) / n_labels), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def optimizer_step(loss, model, opt, sched) -> None:
    import torch

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

    from qat_tasks.modeling import tokenize

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
        order = list(range(len(texts)))
        rng.shuffle(order)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * tc.batch_size:(b + 1) * tc.batch_size]
            enc = tokenize(tokenizer, [texts[i] for i in idx], tc.max_length, "pt")
            logits = model(**enc).logits
            loss = F.cross_entropy(logits, torch.tensor(y[idx]), weight=weights)
            optimizer_step(loss, model, opt, sched)
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


def serving_meta(role, onnx_path: Path, tokenizer, splits, max_length: int) -> dict:
    """The role's serving settings (the escalation detector's recall-tuned threshold), from the exported
    graph's probabilities in ONNX Runtime on the calibration rows."""
    from qat_tasks.modeling import OnnxClassifier, inputs_of

    rows = splits["calibration"]
    meta = role.serving_meta(
        lambda: OnnxClassifier(onnx_path, tokenizer, role.labels, max_length).predict_proba(inputs_of(rows)),
        np.array([role.labels.index(r["label"]) for r in rows]))
    if meta:
        log.info("%s serving settings from %d held-out rows: %s", role.mcfg.name, len(rows), meta)
    return meta


def ensure_champion(cfg: PipelineConfig, model_name: str, calibration_uri: str, ctx: tracking.RunContext) -> dict:
    """Return the current @champion of `model_name`, bootstrapping one from the backbone when there is none."""
    import mlflow

    client = tracking.configure(cfg)
    mcfg = cfg.model(model_name)
    name = tracking.registered_name(cfg, model_name)
    manifest = load_manifest(calibration_uri, cfg.traffic.s3_endpoint_url)
    parent = tracking.model_parent_run(cfg, model_name, ctx, manifest["version"])

    current = registry.alias_version(client, name, registry.CHAMPION)
    if current is not None:
        log.info("%s@champion is version %s: no bootstrap needed", name, current.version)
        return {"model": model_name, "registered_model": name, "version": str(current.version),
                "bootstrapped": False, "parent_run_id": parent, "calibration_version": manifest["version"]}

    exp_id = tracking.ensure_experiment(cfg, model_name)
    key = f"{ctx.run_id}:{model_name}:{STAGE}"
    cached = tracking.cached_result(exp_id, key)
    if cached is not None:
        # Finished before the alias was set (the task died in between): set it now, register nothing new.
        client.set_registered_model_alias(name, registry.CHAMPION, cached["version"])
        return {**cached, "parent_run_id": parent}

    from qat_tasks.evaluation import dataset
    from qat_tasks.modeling import inputs_of
    from qat_tasks.roles import role_for

    role = role_for(cfg, model_name)
    labels = role.labels
    splits = role_data.load(cfg, model_name, calibration_uri)
    rows = splits["qat_train"]
    texts = inputs_of(rows)
    y = [labels.index(r["label"]) for r in rows]
    log.info("no %s@champion yet: fine-tuning one from %s on %d rows of %s", name, mcfg.source, len(rows),
             manifest["version"])
    with tracking.stage_run(exp_id, key, STAGE, {**ctx.tags(), "calibration.version": manifest["version"],
                                                  "model.method": "fp32", "stage": STAGE}, parent) as run:
        from qat_tasks.modeling import build_classifier, check_export, export_onnx

        tc = mcfg.training
        mlflow.log_params({"source": mcfg.source, "calibration_version": manifest["version"], "train_rows": len(rows),
                           "data.digest": splits.summary["digest"],
                           **{f"training.{k}": v for k, v in tc.model_dump().items()}})
        mlflow.log_dict(splits.summary, "data_summary.json")
        mlflow.log_input(dataset(rows, calibration_uri, f"{model_name}-train-{manifest['version']}"), context="training")
        from transformers import set_seed

        set_seed(tc.seed)  # before the head is initialised, so a rerun trains the same champion
        model, tokenizer = build_classifier(cfg, mcfg.source, labels)
        history = train_classifier(model, tokenizer, texts, y, len(labels), tc,
                                   log_metric=lambda k, v, s: mlflow.log_metric(k, v, step=s))
        with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
            hf_dir = Path(tmp) / "hf"
            model.save_pretrained(hf_dir)
            tokenizer.save_pretrained(hf_dir)
            onnx_path = export_onnx(model, tokenizer, Path(tmp) / "onnx" / "model.onnx", tc.max_length, role.pair)
            mlflow.log_metric("export_max_abs_logit_diff", check_export(model, tokenizer, onnx_path, texts[:32],
                                                                        tc.max_length))
            meta = {"labels": labels, "max_length": tc.max_length, "role": mcfg.role, "pair": role.pair,
                    "precision": "fp32", "calibration_version": manifest["version"], "source": mcfg.source,
                    **serving_meta(role, onnx_path, tokenizer, splits, tc.max_length)}
            model_uri = registry.log_encoder(hf_dir, onnx_path, meta)
        mlflow.log_dict(history, "training_history.json")
        lineage = {"calibration_version": manifest["version"], "method": "fp32", "base_source": mcfg.source,
                   "airflow.dag_id": ctx.dag_id, "airflow.run_id": ctx.run_id}
        version = registry.register(client, name, model_uri, key, run.info.run_id, lineage,
                                    f"FP32 champion bootstrapped from {mcfg.source} on calibration {manifest['version']}")
        client.set_registered_model_alias(name, registry.CHAMPION, version)
        log.info("registered %s version %s and set @champion", name, version)
        result = {"model": model_name, "registered_model": name, "version": version, "bootstrapped": True,
                  "run_id": run.info.run_id, "calibration_version": manifest["version"]}
        tracking.set_result(result)
    return {**result, "parent_run_id": parent}
