"""The main job's budget: a run's task profiles against the profile's `budget`."""

from __future__ import annotations

from qat_tasks.core.config_operations import BudgetConfig
from qat_tasks.reporting import task_profile


def _run(wall_s: float, peak_mb: float, bootstrapped=("intent-classifier",), state="success") -> dict:
    tasks = [{"task": "ensure_champion[intent-classifier]", "state": "success", "wall_s": wall_s * 0.4,
              "peak_rss_mb": peak_mb * 0.8, "tree_peak_rss_mb": peak_mb, "isolated": True},
             {"task": "llm_4bit_challenger[fallback-llm]", "state": "success", "wall_s": wall_s * 0.5,
              "peak_rss_mb": 900.0, "tree_peak_rss_mb": 1300.0, "isolated": True},
             {"task": "plan", "state": "success", "wall_s": 1.0, "peak_rss_mb": None, "tree_peak_rss_mb": None,
              "isolated": None}]
    return {"dag_id": "quarterly_recalibration", "run_id": "r", "state": state, "wall_s": wall_s,
            "bootstrapped": list(bootstrapped), "tasks": tasks}


def test_a_run_within_budget_passes():
    assert task_profile.over_budget(_run(14 * 60, 3500), BudgetConfig()) == []


def test_a_slow_first_run_is_named_with_its_longest_tasks():
    problems = task_profile.over_budget(_run(16 * 60, 3500), BudgetConfig())
    assert len(problems) == 1 and "16.0 min is over the first run" in problems[0]
    assert "llm_4bit_challenger[fallback-llm] 8.0 min" in problems[0]


def test_a_rerun_has_the_tighter_budget():
    assert task_profile.over_budget(_run(12 * 60, 3500, bootstrapped=()), BudgetConfig())[0].startswith(
        "wall time 12.0 min is over the rerun")
    assert task_profile.over_budget(_run(12 * 60, 3500), BudgetConfig()) == []


def test_memory_over_budget_names_the_task_and_a_failed_run_never_passes():
    problems = task_profile.over_budget(_run(10 * 60, 5000), BudgetConfig())
    assert problems == ["peak memory 4.88 GB (during ensure_champion[intent-classifier]) is over the budget of 4 GB"]
    assert "ended failed" in task_profile.over_budget(_run(60, 100, state="failed"), BudgetConfig())[0]


def test_profiles_are_collected_from_task_results_and_tabulated():
    rows = task_profile.profiles_of({"profile": {"task": "refresh_calibration", "wall_s": 30.0, "peak_rss_mb": 512.0,
                                                 "tree_peak_rss_mb": 512.0, "isolated": False}},
                                    [{"profile": {"task": "evaluate_champion[reranker]", "wall_s": 75.5,
                                                  "peak_rss_mb": 1024.0, "tree_peak_rss_mb": 1536.0,
                                                  "isolated": True}}, {"no": "profile"}])
    assert [r["task"] for r in rows] == ["refresh_calibration", "evaluate_champion[reranker]"]
    text = task_profile.rows_text(rows)
    assert "1:15.5" in text[2] and "1.00 GB" in text[2] and "1.50 GB" in text[2] and text[2].endswith("own")
    assert task_profile.summary(rows) == {"tasks": 2, "task_wall_s": 105.5, "peak_rss_mb": 1024.0,
                                          "tree_peak_rss_mb": 1536.0}
