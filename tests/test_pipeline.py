from datetime import date, datetime

import pytest

from qat_tasks.core.params import ParamError, previous_quarter
from qat_tasks.pipeline import plan_run


@pytest.mark.parametrize("ref,window", [
    (date(2026, 10, 1), (date(2026, 7, 1), date(2026, 10, 1))),
    (date(2026, 11, 23), (date(2026, 7, 1), date(2026, 10, 1))),
    (date(2026, 1, 1), (date(2025, 10, 1), date(2026, 1, 1))),
    (date(2026, 3, 31), (date(2025, 10, 1), date(2026, 1, 1))),
    (date(2026, 4, 1), (date(2026, 1, 1), date(2026, 4, 1))),
])
def test_previous_quarter(ref, window):
    assert previous_quarter(ref) == window


def plan(cfg, **params):
    base = {"reason": "drift in checkout_help traffic", "models": [], "window_start": None, "window_end": None}
    return plan_run(cfg, {**base, **params}, dag_id="d", run_id="r", run_type="manual",
                    reference=datetime(2026, 10, 1))


def test_plan_defaults_to_previous_quarter_and_all_models(tiny_config):
    run = plan(tiny_config)
    assert run["window"] == {"start": "2026-07-01", "end": "2026-10-01"}
    assert run["models"] == [m.name for m in tiny_config.models]
    assert run["ctx"]["trigger"] == "manual" and run["ctx"]["reason"] == "drift in checkout_help traffic"


@pytest.mark.parametrize("params,match", [
    ({"reason": "  "}, "params.reason"),
    ({"models": ["intent-clasifier"]}, "unknown model"),
    ({"window_start": "2026-07-01"}, "go together"),
    ({"window_start": "2026-07-01", "window_end": "2026-06-01"}, "must be after"),
    ({"window_start": "2024-01-01", "window_end": "2026-01-01"}, "longer than"),
    ({"window_start": "2999-01-01", "window_end": "2999-02-01"}, "future"),
    ({"window_start": "July", "window_end": "August"}, "not an ISO date"),
])
def test_plan_rejects_bad_params(tiny_config, params, match):
    with pytest.raises(ParamError, match=match):
        plan(tiny_config, **params)


def test_scheduled_runs_use_their_data_interval(tiny_config):
    # A data-interval timetable: the run that fires on 1 October has logical date 1 July.
    run = plan_run(tiny_config, {"reason": "scheduled quarterly recalibration", "triggered_by": "manual"},
                   dag_id="d", run_id="scheduled__x", run_type="DagRunType.SCHEDULED", reference=datetime(2026, 7, 1),
                   interval=(datetime(2026, 7, 1), datetime(2026, 10, 1)))
    assert run["ctx"]["trigger"] == "scheduled"
    assert run["window"] == {"start": "2026-07-01", "end": "2026-10-01"}
    # A manual run has an empty interval at its logical date: the quarter before it.
    run = plan_run(tiny_config, {"reason": "manual"}, dag_id="d", run_id="manual__x", run_type="manual",
                   reference=datetime(2026, 10, 1), interval=(datetime(2026, 10, 1), datetime(2026, 10, 1)))
    assert run["window"] == {"start": "2026-07-01", "end": "2026-10-01"}
