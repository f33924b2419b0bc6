"""The decision both quantization tracks make, made one way.

Every candidate's gate verdicts are logged; when none passed, nothing is registered and the decision says which
gates each candidate failed. Otherwise the track picks the best passing candidate by its own ranking (the
role's headline metric for an encoder, MangaAssist perplexity for the LLM), packages it, and `register_challenger`
registers it once per stage (a retry finds the same version), tags it `gates.offline=passed` (what shadow
deployment and promotion check before they act) and points @challenger at it.
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
    log.warning("%s: no %s candidate passed every gate; nothing registered", model_name, track)
    return [], {"model": model_name, "decision": "no candidate passed", "registered_version": None, "run_id": run_id,
                "why": {n: [r.gate for r in v if not r.passed] for n, v in verdicts.items()}}


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
