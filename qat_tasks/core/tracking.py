"""MLflow conventions: one experiment per model (plus one for calibration data), one parent run per DAG run,
and stage runs that a retried task finds again instead of duplicating.

A stage run is keyed by the tag `qat.run_key` (DAG run id + model + stage). A stage that already finished
returns the result it stored in the tag `qat.result` and does no work. An attempt that was cut off (still
RUNNING: the worker died) is resumed; one that FAILED stays as evidence and the retry starts a new run
tagged `qat.previous_attempt`, so a fixed config can be logged without clashing with the old params.

A measurement whose inputs have not changed since an earlier DAG run (the same registered version, calibration
rows, settings and library versions: the tag `qat.content_key`, a digest of them) is not made again: the new DAG
run gets a stage run of its own that carries the earlier result and metrics and names the run it came from
(`qat.reused_from`), where the artifacts stay.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from qat_tasks.core.config import PipelineConfig

log = logging.getLogger(__name__)

RUN_KEY = "qat.run_key"
RESULT = "qat.result"
CONTENT_KEY = "qat.content_key"
REUSED_FROM = "qat.reused_from"


@dataclass(frozen=True)
class RunContext:
    """Who asked for this work: the DAG run (or a CLI invocation) and why."""

    dag_id: str
    run_id: str
    reason: str
    trigger: str  # scheduled | manual | drift | cli | test

    def tags(self) -> dict[str, str]:
        return {"airflow.dag_id": self.dag_id, "airflow.run_id": self.run_id, "trigger.reason": self.reason,
                "trigger.type": self.trigger}

    def to_dict(self) -> dict:
        return asdict(self)


def configure(cfg: PipelineConfig):
    """Point MLflow at the configured store, with the configured retry policy, and return a client."""
    import mlflow
    from mlflow import MlflowClient

    from qat_tasks.core import resilience

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    resilience.configure(**cfg.retries.model_dump())  # MLflow's HTTP retries and the S3 clients made from now on
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_name(cfg: PipelineConfig, suffix: str) -> str:
    return f"{cfg.tracking.experiment_prefix}-{suffix}"


def registered_name(cfg: PipelineConfig, model_name: str) -> str:
    return f"{cfg.tracking.experiment_prefix}-{model_name}"


def ensure_experiment(cfg: PipelineConfig, suffix: str) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    name = experiment_name(cfg, suffix)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if cfg.tracking_uri.startswith("sqlite:///"):
        # Embedded store: keep artifacts beside the database, not in ./mlruns of whatever folder we run from.
        db = Path(cfg.tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "artifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={"mangaassist.profile": cfg.profile})
    except MlflowException as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # created concurrently by a sibling task


def find_run(experiment_id: str, key: str):
    """The newest attempt at the stage run `key`, or None."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY}` = '{_quote(key)}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def cached_result(experiment_id: str, key: str) -> dict | None:
    """The stored result of a stage run that already finished, or None."""
    run = find_run(experiment_id, key)
    if run is not None and run.info.status == "FINISHED" and RESULT in run.data.tags:
        return json.loads(run.data.tags[RESULT])
    return None


@contextmanager
def stage_run(experiment_id: str, key: str, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> Iterator:
    """Start the run for this stage, or resume the one an interrupted attempt left RUNNING."""
    import mlflow

    existing = find_run(experiment_id, key)
    all_tags = {RUN_KEY: key, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if existing is not None and existing.info.status != "RUNNING":
        all_tags["qat.previous_attempt"] = existing.info.run_id
        existing = None
    if existing is not None:
        log.info("resuming MLflow run %s (%s) left by an earlier attempt", existing.info.run_id, run_name)
        with mlflow.start_run(run_id=existing.info.run_id) as run:
            mlflow.set_tags(all_tags)
            yield run
    else:
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
            yield run


def set_result(result: dict) -> None:
    import mlflow

    mlflow.set_tag(RESULT, json.dumps(result, sort_keys=True))


def content_key(stage: str, *inputs) -> str:
    """A digest of what a measurement depends on (`inputs`: JSON-able: versions, data digests, settings), with the
    versions of the libraries that compute it and of this package."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    libraries = {}
    for pkg in ("qat-tasks", "torch", "transformers", "onnxruntime", "llmcompressor", "compressed-tensors"):
        try:
            libraries[pkg] = version(pkg)
        except PackageNotFoundError:
            libraries[pkg] = None
    # Through JSON once first: a result read back from a run's tag has string keys where the fresh one had numbers,
    # and sort_keys orders 2 before 10 but "10" before "2"; the key must not depend on which one it was given.
    inputs = json.loads(json.dumps(inputs, default=str))
    blob = json.dumps([stage, inputs, libraries], sort_keys=True, default=str)
    return f"{stage}:{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def reuse(cfg: PipelineConfig, experiment_id: str, key: str, content: str, run_name: str, tags: dict[str, str],
          parent_run_id: str | None = None) -> dict | None:
    """The result of an earlier, finished stage run with the same `content` key, logged again as this DAG run's stage
    run `key` (its metrics copied, `qat.reused_from` naming the source); None when there is none, or reuse is off."""
    from mlflow import MlflowClient

    if not cfg.scheduling.reuse_unchanged:
        return None
    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{CONTENT_KEY}` = '{_quote(content)}' and attributes.status = 'FINISHED'",
        max_results=5, order_by=["attributes.start_time DESC"])
    source = next((r for r in runs if RESULT in r.data.tags), None)
    if source is None:
        return None
    import mlflow

    origin = source.data.tags.get(REUSED_FROM, source.info.run_id)
    result = json.loads(source.data.tags[RESULT])
    with stage_run(experiment_id, key, f"{run_name} (unchanged)",
                   {**tags, CONTENT_KEY: content, REUSED_FROM: origin}, parent_run_id):
        if source.data.metrics:
            mlflow.log_metrics(source.data.metrics)
        set_result(result)
    log.info("%s, %s: inputs unchanged since MLflow run %s; its result is reused",
             MlflowClient().get_experiment(experiment_id).name, run_name, origin)
    return result


def model_parent_run(cfg: PipelineConfig, model_name: str, ctx: RunContext, calibration_version: str) -> str:
    """The parent run of this DAG run in the model's experiment (created once, found again on retry)."""
    from mlflow import MlflowClient

    exp_id = ensure_experiment(cfg, model_name)
    key = f"{ctx.run_id}:{model_name}"
    run = find_run(exp_id, key)
    if run is not None:
        return run.info.run_id
    tags = {RUN_KEY: key, **ctx.tags(), "calibration.version": calibration_version, "model.name": model_name,
            "mlflow.note.content": f"{ctx.dag_id} run `{ctx.run_id}` ({ctx.trigger}): {ctx.reason}"}
    # Left RUNNING until the DAG's last task closes it with the outcome of the whole run.
    return MlflowClient().create_run(exp_id, run_name=f"{ctx.dag_id} · {ctx.run_id}", tags=tags).info.run_id


def finish_parent(run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status)


def close_open_runs(cfg: PipelineConfig, airflow_run_id: str) -> dict[str, int]:
    """The DAG run's teardown: every MLflow run it left RUNNING (a model's parent run whose track failed, a stage
    whose worker died and was not retried) is ended FAILED; runs that ended are left as they are."""
    client = configure(cfg)
    prefix = cfg.tracking.experiment_prefix + "-"
    exps = [e.experiment_id for e in client.search_experiments() if e.name.startswith(prefix)]
    closed = finished = 0
    for exp in exps:
        for run in client.search_runs([exp], filter_string=f"tags.`airflow.run_id` = '{_quote(airflow_run_id)}'",
                                      max_results=5000):
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "FAILED")
                closed += 1
            else:
                finished += 1
    return {"closed_failed": closed, "already_ended": finished}


DATASET_COLUMNS = ("request_id", "id", "group", "text", "text_pair", "label", "label_source", "source", "language")


def dataset(rows: list[dict], source_uri: str, name: str):
    """Rows as an MLflow dataset (digest, schema, source) for the run's inputs."""
    import mlflow.data
    import pandas as pd

    df = pd.DataFrame([{k: r[k] for k in DATASET_COLUMNS if k in r} for r in rows])
    if df.empty:  # an empty split is still a dataset, with the columns a split has
        df = pd.DataFrame(columns=["text", "label"])
    return mlflow.data.from_pandas(df, source=source_uri, name=name, targets="label")
