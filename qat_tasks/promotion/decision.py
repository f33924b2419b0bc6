"""The decision both quantization tracks make, made one way.

Every candidate is screened on the selection split (the gates as point rules against the champion there); when
none passed, nothing is registered and the decision says which gates each candidate failed. Otherwise the track
picks the finalist, the best screened candidate by its own ranking (the role's headline metric for an encoder,
MangaAssist perplexity for the LLM), and judges it on the evaluation split with paired gates (`judged`): a
failed gate, or one the rows cannot resolve when `gates.on_insufficient_evidence` is `block`, registers nothing
and says why. A finalist that passed is packaged, and `register_challenger` registers it once per stage (a retry
finds the same version), tags it `gates.offline=passed` with how its gates were decided (what shadow deployment
and promotion check before they act) and points @challenger at it.
"""

from __future__ import annotations

import json
import logging

from qat_tasks.core import registry
from qat_tasks.promotion import gates

log = logging.getLogger(__name__)


def passing(model_name: str, track: str, verdicts: dict[str, list[gates.GateResult]], run_id: str
            ) -> tuple[list[str], dict | None]:
    """The candidates that passed every gate, and, when none did, the decision that nothing is registered
    (also set as tags on the active MLflow run)."""
    import mlflow

    for name, outcome in verdicts.items():
        log.info("%s %s: %s", model_name, name, gates.summarize(outcome))
    passed = [n for n, v in verdicts.items() if all(r.passed for r in v)]
    if passed:
        return passed, None
    why = {n: gates.summarize(v) for n, v in verdicts.items()}
    mlflow.set_tags({"decision": "no candidate passed", "decision.why": json.dumps(why)[:5000]})
    log.warning("%s: no %s candidate passed the screen on the selection split; nothing registered", model_name, track)
    return [], {"model": model_name, "decision": "no candidate passed", "registered_version": None, "run_id": run_id,
                "why": {n: [r.gate for r in v if not r.passed] for n, v in verdicts.items()}}


def judged(model_name: str, finalist: str, outcome: list[gates.GateResult], run_id: str) -> dict | None:
    """None when the finalist passed its paired gates on the evaluation split; else the decision that nothing is
    registered, naming the gates that failed and those the rows could not resolve (with the evidence they lack)."""
    import mlflow

    for r in outcome:
        log.info("%s %s on the evaluation split: %s %s -> %s", model_name, finalist, r.gate, r.limit,
                 "passed" if r.passed else "NOT passed")
    blocked = [r for r in outcome if not r.passed]
    fallback = [r.gate for r in outcome if r.passed and r.insufficient]
    if fallback:
        log.warning("%s: %s could not be resolved by the evaluation rows and passed on the point rule "
                    "(gates.on_insufficient_evidence: point_rule)", model_name, fallback)
        mlflow.set_tag("decision.point_rule_gates", ", ".join(fallback))
    if not blocked:
        return None
    insufficient = [r for r in blocked if r.insufficient]
    failed = [r for r in blocked if not r.insufficient]
    what = "failed its gates" if failed else "insufficient evidence"
    mlflow.set_tags({"decision": f"finalist {finalist}: {what}; nothing registered",
                     "decision.why": gates.summarize(outcome)[:5000]})
    log.warning("%s: finalist %s %s on the evaluation split (failed: %s; unresolved: %s); nothing registered",
                model_name, finalist, what, [r.gate for r in failed], [r.gate for r in insufficient])
    return {"model": model_name, "decision": f"finalist {finalist}: {what}", "registered_version": None,
            "run_id": run_id, "finalist": finalist,
            "why": {finalist: [r.gate for r in blocked]},
            "insufficient_evidence": {r.gate: {"more_units": r.more_units, "unit": r.unit} for r in insufficient},
            "gates": gates.table(finalist, outcome)}


def gate_tags(outcome: list[gates.GateResult]) -> dict[str, str]:
    """Version tags saying how the offline gates were decided (interval, or point rule on insufficient evidence)."""
    by = sorted({r.decided_by for r in outcome if r.decided_by != "check"})
    return {"gates.decided_by": ", ".join(by),
            "gates.point_rule": ", ".join(r.gate for r in outcome if r.passed and r.insufficient) or "none"}


def log_against_models(client, registered_name: str, figures: dict[str, dict[str, float]], dataset=None) -> None:
    """Log each version's evaluation figures against its MLflow model (MLflow 3 model ids), linked to the data set
    they were measured on, so the Models view lists accuracy, intervals and P95 per version. Versions registered
    without a logged model are left out."""
    import mlflow

    for version, metrics in figures.items():
        model_id = model_id_of(client.get_model_version(registered_name, version))
        if model_id:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and v == v},
                               model_id=model_id, dataset=dataset)


def model_id_of(mv) -> str | None:
    """The MLflow model behind a registry version: its `model_id`, or the id in a `models:/m-...` source (what a
    SQL-backed registry returns for a version registered from a logged model)."""
    model_id = getattr(mv, "model_id", None)
    source = str(mv.source or "")
    if not model_id and source.startswith("models:/m-"):
        model_id = source.removeprefix("models:/").split("/")[0]
    return model_id or None


def gate_figures(rows: list[dict]) -> dict[str, float]:
    """A gate table as metrics: each gate's loss and interval (`gate.<name>.loss`, `.ci_low`, `.ci_high`)."""
    out: dict[str, float] = {}
    for r in rows:
        for key in ("loss", "ci_low", "ci_high"):
            if r[key] is not None:
                out[f"gate.{r['gate']}.{key}"] = r[key]
    return out


def earlier_choice(client, registered_name: str, stage_key: str) -> str | None:
    """The candidate an earlier attempt at this decision registered (its version's `method` tag), or None.

    A DAG run decides once: a retry that re-measured the champion could rank the candidates differently, and
    then the version it finds (registered by the earlier attempt) would carry another candidate's tags than its
    decision. The retry keeps the earlier choice instead."""
    mv = registry.find_version(client, registered_name, stage_key)
    return None if mv is None else mv.tags.get("method")


def keep_earlier(model_name: str, earlier: str, passing: list[str]) -> None:
    """Say that a retry keeps the earlier attempt's choice, and whether this attempt's figures still pass it."""
    if earlier in passing:
        log.info("%s: an earlier attempt of this decision registered %s; keeping it", model_name, earlier)
    else:
        log.warning("%s: an earlier attempt of this decision registered %s, which this attempt's re-measured "
                    "figures no longer pass; keeping it (one decision per DAG run): its review judges it next",
                    model_name, earlier)


def register_challenger(client, *, model_name: str, registered_name: str, best: str, model_uri: str | None,
                        stage_key: str,
                        run_id: str, lineage: dict[str, str], description: str) -> dict:
    """Register the chosen candidate as a version of `registered_name` (once per stage key) and alias it
    @challenger; returns the decision."""
    import mlflow

    version = registry.register(client, registered_name, model_uri, stage_key, run_id,
                                {**lineage, "method": best, "gates.offline": "passed"}, description)
    client.set_registered_model_alias(registered_name, registry.CHALLENGER, version)
    mlflow.set_tags({"decision": f"registered {registered_name} v{version} as @{registry.CHALLENGER}",
                     "decision.method": best})
    log.info("%s: %s passed every gate; registered as version %s with alias @%s", model_name, best, version,
             registry.CHALLENGER)
    return {"model": model_name, "decision": f"registered v{version} @{registry.CHALLENGER}",
            "registered_version": version, "method": best, "run_id": run_id}
