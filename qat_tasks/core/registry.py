"""The MLflow model registry: aliases (@champion, @challenger, ...) instead of stages.

What a version holds is each track's packaging (`encoders.packaging`, `llm.packaging`); this module registers,
finds, aliases and downloads versions.

Registration is idempotent: a version is tagged with the stage that produced it (`qat.run_key`: DAG run,
model, stage), and any retry of that stage finds the version instead of creating a second one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

log = logging.getLogger(__name__)

# The registry's aliases, defined once: what each one means is the promotion lifecycle.
CHAMPION = "champion"      # what production serves
CHALLENGER = "challenger"  # passed the offline gates of a quarterly run
SHADOW = "shadow"          # mirrored beside the champion, under review
PREVIOUS = "previous"      # the champion before the last promotion: what rollback restores


def served_model(name: str, version) -> str:
    """The `model` field of the service's log records for a registered version."""
    return f"{name}/v{version}"


def served_size_bytes(name: str, alias: str) -> int | None:
    """Bytes of what production loads from `name@alias`: the ONNX graph of an encoder, the checkpoint folder of
    the LLM. None when the alias does not exist."""
    from mlflow.exceptions import MlflowException

    def walk(path: str, whole: bool) -> int:  # whole: inside the LLM's checkpoint folder, every file counts
        total = 0
        for a in mlflow.artifacts.list_artifacts(artifact_uri=f"models:/{name}@{alias}/{path}"):
            if a.is_dir:
                total += walk(a.path, whole or a.path.endswith("checkpoint"))
            elif whole or a.path.endswith(".onnx"):
                total += a.file_size or 0
        return total

    try:
        return walk("artifacts", False) or None
    except MlflowException:
        return None


def _absent(exc: Exception) -> bool:
    """Whether an MLflow error says the registered model or the alias does not exist (the registry answered),
    as opposed to a registry that did not answer or failed: that must fail the stage, never read as 'none'."""
    code = getattr(exc, "error_code", None)
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "alias" in str(exc) and "not found" in str(exc))


def find_version(client, name: str, stage_key: str):
    """The version an earlier attempt at the same stage (same `qat.run_key`) registered, or None when the
    registry says there is none. A registry that cannot answer raises (after the client's retries): answering
    'none' then would register the stage's model a second time."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if _absent(exc):
            return None
        raise
    return next((v for v in versions if v.tags.get("qat.run_key") == stage_key), None)


def register(client, name: str, model_uri: str, stage_key: str, run_id: str, tags: dict[str, str],
             description: str) -> str:
    """Register `model_uri` as a version of `name` once per stage of a DAG run; returns the version number.

    Keyed by the stage's run key, not the MLflow run id: a retry after a failed attempt runs in a new MLflow
    run, and must still find the version the failed attempt registered before it died.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    existing = find_version(client, name, stage_key)
    if existing is not None:
        log.info("model %s version %s already registered for %s: reusing it", name, existing.version, stage_key)
        return str(existing.version)
    try:
        client.create_registered_model(name, description="MangaAssist model; versions are promoted by alias")
    except MlflowException as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = mlflow.register_model(model_uri, name, tags={"qat.run_key": stage_key, "source_run_id": run_id, **tags})
    client.update_model_version(name, mv.version, description=description)
    return str(mv.version)


def alias_version(client, name: str, alias: str):
    """The model version behind `name@alias`, or None when the registry says there is none (no such model or
    alias). A registry that cannot answer raises: 'no @champion' would bootstrap a second one."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _absent(exc):
            return None
        raise


def download(name: str, alias_or_version: str | int, dest: Path) -> dict[str, Path]:
    """Local paths of a packaged encoder version (by alias, or by number, as MLflow's int or a string): hf folder,
    onnx file and meta."""
    alias_or_version = str(alias_or_version)
    ref = f"models:/{name}@{alias_or_version}" if not alias_or_version.isdigit() else f"models:/{name}/{alias_or_version}"
    root = Path(mlflow.artifacts.download_artifacts(ref, dst_path=str(dest)))
    art = root / "artifacts"
    onnx = next(art.glob("*.onnx"), None) or next(art.rglob("*.onnx"))
    return {"root": root, "hf": art / "hf", "onnx": onnx, "meta": art / "meta.json"}
