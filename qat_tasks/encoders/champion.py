"""The FP32 champion: found by the registry alias @champion, or bootstrapped when a model has none yet.

Bootstrapping fine-tunes the configured backbone on the model's training rows of the current calibration
version (qat_tasks.data.role_splits; class-weighted cross-entropy, so rare intents and frustrated customers are not
drowned by the common case), exports it to ONNX, registers it with its lineage and points @champion at it.
The escalation detector's package also carries its decision threshold, tuned for recall in ONNX Runtime.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from qat_tasks.core import registry, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.data import role_splits
from qat_tasks.data.calibration_set import load_manifest
from qat_tasks.encoders import packaging
from qat_tasks.encoders.training import train_classifier

log = logging.getLogger(__name__)

STAGE = "bootstrap-champion"


def serving_meta(role, onnx_path: Path, tokenizer, splits, max_length: int) -> dict:
    """The role's serving settings (the escalation detector's recall-tuned threshold), from the exported
    graph's probabilities in ONNX Runtime on the calibration rows."""
    from qat_tasks.encoders.modeling import OnnxClassifier, inputs_of

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

    from qat_tasks.encoders.modeling import inputs_of
    from qat_tasks.encoders.roles import role_for

    role = role_for(cfg, model_name)
    labels = role.labels
    splits = role_splits.load(cfg, model_name, calibration_uri)
    rows = splits["qat_train"]
    texts = inputs_of(rows)
    y = [labels.index(r["label"]) for r in rows]
    log.info("no %s@champion yet: fine-tuning one from %s on %d rows of %s", name, mcfg.source, len(rows),
             manifest["version"])
    with tracking.stage_run(exp_id, key, STAGE, {**ctx.tags(), "calibration.version": manifest["version"],
                                                  "model.method": "fp32", "stage": STAGE}, parent) as run:
        from qat_tasks.encoders.modeling import build_classifier, check_export, export_onnx

        tc = mcfg.training
        mlflow.log_params({"source": mcfg.source, "calibration_version": manifest["version"], "train_rows": len(rows),
                           "data.digest": splits.summary["digest"],
                           **{f"training.{k}": v for k, v in tc.model_dump().items()}})
        mlflow.log_dict(splits.summary, "data_summary.json")
        mlflow.log_input(tracking.dataset(rows, calibration_uri, f"{model_name}-train-{manifest['version']}"), context="training")
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
            model_uri = packaging.log_encoder(hf_dir, onnx_path, meta)
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
