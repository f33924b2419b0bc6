"""Stages in a process of their own: the result and the exception come back, the memory does not stay."""

from __future__ import annotations

import os

import pytest

from qat_tasks.core import isolation


def _allocate(mb: int) -> dict:
    block = bytearray(mb * 2**20)  # touched: resident, not just reserved
    block[:: 4096] = b"x" * len(block[:: 4096])
    return {"pid": os.getpid(), "bytes": len(block)}


def _fail(why: str) -> None:
    raise ValueError(why)


def _die() -> None:
    os._exit(3)


def test_an_isolated_stage_runs_in_another_process_and_reports_its_own_peak():
    result, profile = isolation.run(_allocate, 300, task="allocate[300 MB]", isolate=True)
    assert result["pid"] != os.getpid() and result["bytes"] == 300 * 2**20
    assert profile["isolated"] is True and profile["task"] == "allocate[300 MB]"
    assert profile["peak_rss_mb"] >= 300  # the child's own high-water mark
    assert profile["tree_peak_rss_mb"] >= profile["peak_rss_mb"] * 0.5  # sampled, so it may miss the very top
    assert profile["wall_s"] > 0


def test_in_process_the_stage_runs_here_and_its_peak_is_sampled():
    result, profile = isolation.run(_allocate, 50, task="allocate", isolate=False)
    assert result["pid"] == os.getpid()
    assert profile["isolated"] is False and profile["peak_rss_mb"] > 0


def test_the_stage_s_exception_is_raised_as_it_was():
    with pytest.raises(ValueError, match="calibration split is empty"):
        isolation.run(_fail, "calibration split is empty", task="fail", isolate=True)


def test_a_process_that_dies_without_a_result_is_named_with_a_way_out():
    with pytest.raises(isolation.StageProcessDied, match="die: its process ended without a result.*rerun"):
        isolation.run(_die, task="die", isolate=True)


def test_a_stage_defined_in_the_main_script_runs_isolated(tmp_path):
    """A benchmark script isolates functions it defines itself: its process needs the script, which then runs again
    (under another name); a stage defined in a module starts without it."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "bench_like.py"
    script.write_text("import os\nfrom qat_tasks.core import isolation\n\n"
                      "def measure(x):\n    return {'pid': os.getpid(), 'twice': 2 * x}\n\n"
                      "if __name__ == '__main__':\n"
                      "    row, _ = isolation.run(measure, 21, task='measure', isolate=True)\n"
                      "    assert row['pid'] != os.getpid(), row\n    print('result', row['twice'])\n")
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(repo)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "result 42" in out.stdout
