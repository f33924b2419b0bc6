"""Moving @champion on evidence, and back.

  promote   @champion -> the reviewed version, @previous -> the old champion; refused unless the version passed
            the offline gates and a shadow review against the current champion
  rollback  @champion -> @previous

Each one is an MLflow run (stage `promotion` or `rollback`) in the model's experiment, with the reason.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from qat_tasks.core import registry, tracking
from qat_tasks.core.config import PipelineConfig

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """A promotion or rollback that the evidence does not allow; the message says what is missing."""


def promote(cfg: PipelineConfig, model_name: str, ctx: tracking.RunContext, version: str | None = None,
            approved_by: str | None = None) -> dict:
    """Move @champion to `version` (default @shadow) and keep the old champion as @previous.

    Refused without a passed offline decision and a passed shadow review against today's champion; with
    `shadow.review: live`, a review of replayed logs does not count; with `shadow.promotion: manual`, a person
    must have approved it (`approved_by`: the Airflow user who answered the shadow_review DAG's approval task, or
    the user who ran `qat-tasks promote`)."""
    import mlflow

    client = tracking.configure(cfg)
    name = tracking.registered_name(cfg, model_name)
    exp_id = tracking.ensure_experiment(cfg, model_name)
    key = f"{ctx.run_id}:{model_name}:promotion"
    cached = tracking.cached_result(exp_id, key)
    if cached is not None:
        return cached
    if version is None:
        shadow_mv = registry.alias_version(client, name, registry.SHADOW)
        if shadow_mv is None:
            raise PromotionError(f"{name} has no @shadow to promote; name a version explicitly")
        version = str(shadow_mv.version)
    mv = client.get_model_version(name, version)
    champion = registry.alias_version(client, name, registry.CHAMPION)
    if champion is not None and str(champion.version) == str(version):
        return {"model": model_name, "outcome": f"v{version} is already @champion", "champion_version": str(version)}
    if mv.tags.get("gates.offline") != "passed":
        raise PromotionError(f"refusing to promote {name} v{version}: it has no record of passing the offline gates")
    verdict = mv.tags.get("shadow.review")
    if verdict != "passed":
        raise PromotionError(f"refusing to promote {name} v{version}: its shadow review "
                             + (f"says {verdict!r} (MLflow run {mv.tags.get('shadow.review_run')})" if verdict else
                                "never ran"))
    if cfg.shadow.review == "live" and mv.tags.get("shadow.review_source") != "live":
        raise PromotionError(f"refusing to promote {name} v{version}: its review judged "
                             f"{mv.tags.get('shadow.review_source') or 'unrecorded'} evidence, and this profile "
                             f"(shadow.review: live) promotes on a live shadow review only")
    if cfg.shadow.promotion == "manual" and not approved_by:
        raise PromotionError(f"refusing to promote {name} v{version}: shadow.promotion is manual and nobody approved "
                             f"it (approve the shadow_review DAG's approval task in the Airflow UI, or run "
                             f"qat-tasks promote)")
    if champion is not None and mv.tags.get("shadow.review_champion") != str(champion.version):
        raise PromotionError(f"refusing to promote {name} v{version}: it was reviewed against "
                             f"v{mv.tags.get('shadow.review_champion')}, but @champion is now v{champion.version}; "
                             f"review it again")
    old = str(champion.version) if champion is not None else None
    with tracking.stage_run(exp_id, key, f"promotion v{version}", {**ctx.tags(), "stage": "promotion"}) as run:
        mlflow.log_params({"from_version": old, "to_version": version, "approved_by": approved_by or "auto",
                           "review_run": mv.tags.get("shadow.review_run"), "reason": ctx.reason[:500]})
        if old is not None:  # @previous first: a crash in between leaves the old champion serving, and findable
            client.set_registered_model_alias(name, registry.PREVIOUS, old)
        client.set_registered_model_alias(name, registry.CHAMPION, version)
        for alias in (registry.SHADOW, registry.CHALLENGER):
            held = registry.alias_version(client, name, alias)
            if held is not None and str(held.version) == str(version):
                client.delete_registered_model_alias(name, alias)
        client.set_model_version_tag(name, version, "promoted_by", ctx.run_id)
        client.set_model_version_tag(name, version, "approved_by", approved_by or "auto (shadow.promotion: auto)")
        client.set_model_version_tag(name, version, "promoted_at", datetime.now(UTC).isoformat(timespec="seconds"))
        result = {"model": model_name, "outcome": f"promoted v{version} to @champion (@previous v{old})",
                  "champion_version": version, "previous_version": old, "run_id": run.info.run_id}
        mlflow.set_tag("decision", result["outcome"])
        tracking.set_result(result)
    log.info("%s: %s; roll back with: qat-tasks rollback --model %s --reason ...", name, result["outcome"], model_name)
    _tell(cfg, "promoted", name, result, ctx, f"roll back with: qat-tasks rollback --model {model_name} --reason ...")
    return result


def _tell(cfg: PipelineConfig, event: str, name: str, result: dict, ctx: tracking.RunContext, hint: str) -> None:
    from qat_tasks.core.notify import mlflow_run_url, send

    link = mlflow_run_url(result.get("run_id", ""))
    send(cfg.notifications, event, f"{name}: {result['outcome']}",
         "\n".join([f"{name}: {result['outcome']}", f"by {ctx.dag_id} run {ctx.run_id} ({ctx.trigger})",
                    f"reason: {ctx.reason}", hint] + ([f"MLflow: {link}"] if link else [])))


def awaiting_approval(cfg: PipelineConfig, model_name: str) -> dict | None:
    """What an approver is asked about: @shadow with a passed live review against today's champion, not yet
    promoted; None when there is nothing to approve."""
    client = tracking.configure(cfg)
    name = tracking.registered_name(cfg, model_name)
    mv = registry.alias_version(client, name, registry.SHADOW)
    champion = registry.alias_version(client, name, registry.CHAMPION)
    if mv is None or mv.tags.get("shadow.review") != "passed":
        return None
    if champion is not None and mv.tags.get("shadow.review_champion") != str(champion.version):
        return None
    return {"model": model_name, "registered_model": name, "version": str(mv.version),
            "champion_version": str(champion.version) if champion is not None else None,
            "method": mv.tags.get("method", "?"), "review_run": mv.tags.get("shadow.review_run", "?"),
            "review_source": mv.tags.get("shadow.review_source", "?"),
            "gates_decided_by": mv.tags.get("gates.decided_by", "?")}


def approver_of(response: dict) -> str | None:
    """Who approved, from an Airflow approval task's response (None when it was rejected or timed out)."""
    if not response or response.get("chosen_options") != ["Approve"]:
        return None
    user = response.get("responded_by_user") or {}
    return f"airflow:{user.get('name') or user.get('id') or 'unknown'}"


def rollback(cfg: PipelineConfig, model_name: str, ctx: tracking.RunContext) -> dict:
    """Restore @previous as @champion; the demoted version is tagged with the reason."""
    import mlflow

    client = tracking.configure(cfg)
    name = tracking.registered_name(cfg, model_name)
    exp_id = tracking.ensure_experiment(cfg, model_name)
    key = f"{ctx.run_id}:{model_name}:rollback"
    cached = tracking.cached_result(exp_id, key)
    if cached is not None:
        return cached
    previous = registry.alias_version(client, name, registry.PREVIOUS)
    if previous is None:
        raise PromotionError(f"{name} has no @previous version to roll back to (nothing was promoted over a champion, "
                             f"or it was rolled back already)")
    champion = registry.alias_version(client, name, registry.CHAMPION)
    demoted = str(champion.version) if champion is not None else None
    with tracking.stage_run(exp_id, key, f"rollback to v{previous.version}", {**ctx.tags(), "stage": "rollback"}) as run:
        mlflow.log_params({"from_version": demoted, "to_version": str(previous.version), "reason": ctx.reason[:500]})
        if demoted != str(previous.version):
            client.set_registered_model_alias(name, registry.CHAMPION, previous.version)
            if demoted is not None:
                client.set_model_version_tag(name, demoted, "rolled_back", ctx.reason[:500])
                client.set_model_version_tag(name, demoted, "rolled_back_by", ctx.run_id)
        # Gone, so a second rollback refuses instead of flipping back to the version just demoted.
        client.delete_registered_model_alias(name, registry.PREVIOUS)
        result = {"model": model_name, "outcome": f"rolled back: @champion v{demoted} -> v{previous.version}",
                  "champion_version": str(previous.version), "demoted_version": demoted, "run_id": run.info.run_id}
        mlflow.set_tag("decision", result["outcome"])
        tracking.set_result(result)
    log.warning("%s: %s (%s)", name, result["outcome"], ctx.reason)
    _tell(cfg, "rolled_back", name, result, ctx, f"v{result['demoted_version']} keeps its files; promote it "
                                                   f"again with: qat-tasks promote --model {model_name} --version ...")
    return result
