"""The calibration refresh as an MLflow run (experiment `<prefix>-calibration`): parameters, counts, the manifest,
the composition chart, the quarantined lines and each split as an MLflow dataset."""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import date
from pathlib import Path

from qat_tasks.core import storage
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.schema import INTENTS
from qat_tasks.data.calibration_set import RefreshError, RefreshResult, load_split
from qat_tasks.data.refresh import refresh
from qat_tasks.data.sampling import SPLITS

log = logging.getLogger(__name__)


def refresh_tracked(cfg: PipelineConfig, start: date, end: date, ctx, progress: bool = True) -> dict:
    """Run the refresh inside its MLflow run (experiment `<prefix>-calibration`) and log what it produced.

    Returns what downstream tasks need (XCom-sized): version, URI, MLflow run id. A retry of a finished
    refresh returns the logged result; an unfinished one reruns into the same MLflow run and, by
    construction, writes the same version.
    """
    import mlflow

    from qat_tasks.core import plots, tracking

    tracking.configure(cfg)
    exp_id = tracking.ensure_experiment(cfg, "calibration")
    key = f"{ctx.run_id}:refresh-calibration"
    cached = tracking.cached_result(exp_id, key)
    if cached is not None:
        log.info("calibration refresh for this DAG run already finished: version %s", cached["version"])
        return cached
    with tracking.stage_run(exp_id, key, f"refresh {start}..{end}",
                            {**ctx.tags(), "stage": "refresh-calibration", "window.start": start.isoformat(),
                             "window.end": end.isoformat(), "traffic.source": cfg.traffic_source}) as run:
        mlflow.log_params({"window_start": start.isoformat(), "window_end": end.isoformat(), "seed": cfg.calibration.seed,
                           "source": cfg.traffic_source, "max_invalid_fraction": cfg.traffic.max_invalid_fraction,
                           **{f"size.{k}": v for k, v in cfg.calibration.sizes.model_dump().items()},
                           "llm_conversations": cfg.calibration.llm_conversations,
                           "min_per_intent": cfg.calibration.min_per_intent})
        try:
            result = refresh(cfg, start, end, progress=progress)
        except RefreshError as exc:
            mlflow.set_tag("error", str(exc)[:5000])
            _log_quarantine(cfg, start, end)
            raise
        m = result.manifest
        inp = m["input"]
        mlflow.log_metrics({"lines": inp["lines"], "valid": inp["valid"], "invalid": inp["invalid"],
                            "invalid_fraction": inp["invalid_fraction"], "duplicate_requests": inp["duplicate_requests"],
                            "duplicate_texts": inp["duplicate_texts"], "out_of_window": inp["out_of_window"],
                            **{f"pii_scrubbed.{k}": v for k, v in inp["pii_scrubbed"].items()},
                            **{f"rows.{s}": m["splits"][s]["rows"] for s in SPLITS},
                            "llm_conversations": m["llm_conversations"]["conversations"],
                            "warnings": len(m["warnings"]),
                            **{f"labels.{k}": v for k, v in m["labels"].items() if isinstance(v, int)}})
        mlflow.set_tags({"calibration.version": result.version, "calibration.uri": result.uri,
                         "calibration.sha256": m["content_sha256"]})
        mlflow.log_dict(m, "manifest.json")
        fig = plots.composition(m, list(INTENTS))
        mlflow.log_figure(fig, "composition.png")
        plots.close(fig)
        _log_quarantine(cfg, start, end)
        _log_datasets(cfg, result)
        out = {"version": result.version, "uri": result.uri, "run_id": run.info.run_id,
               "rows": {s: m["splits"][s]["rows"] for s in SPLITS}, "warnings": len(m["warnings"])}
        tracking.set_result(out)
    return out


def _log_quarantine(cfg: PipelineConfig, start: date, end: date) -> None:
    import mlflow

    uri = storage.join(cfg.calibration_store, "quarantine", f"{start:%Y%m%d}-{end:%Y%m%d}.jsonl.gz")
    if storage.exists(uri, cfg.traffic.s3_endpoint_url):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "quarantine.jsonl.gz"
            local.write_bytes(storage.read_bytes(uri, cfg.traffic.s3_endpoint_url))
            mlflow.log_artifact(str(local), "quarantine")


def _log_datasets(cfg: PipelineConfig, result: RefreshResult) -> None:
    """Each split as an MLflow dataset input, tagged with its composition."""
    import mlflow
    import mlflow.data
    import pandas as pd

    m = result.manifest
    for split in SPLITS:
        rows = load_split(result.uri, split, cfg.traffic.s3_endpoint_url)
        df = pd.DataFrame(rows).drop(columns=["edge"]) if rows else pd.DataFrame(columns=["request_id", "text", "label"])
        ds = mlflow.data.from_pandas(df, source=result.split_uri(split), name=f"{split}-{result.version}",
                                     targets="label")
        meta = m["splits"][split]
        mlflow.log_input(ds, context=split, tags={
            "calibration.version": result.version, "window": f"{m['window']['start']}..{m['window']['end']}",
            "source": m["source"], "sha256": meta["sha256"], "rows": str(meta["rows"]),
            "per_intent": json.dumps(meta["per_intent"], sort_keys=True)})
