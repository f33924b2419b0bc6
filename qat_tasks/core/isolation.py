"""A pipeline stage in a process of its own, and what it cost: wall time and peak resident memory.

PyTorch, ONNX Runtime and llm-compressor keep memory they are done with (allocator caches, arenas, fragmented
heaps): one process that runs every stage of the quarterly run one after another ends holding the sum of them.
A stage run through `run(..., isolate=True)` executes in a freshly spawned Python process that exits when the
stage returns, so the operating system takes all of it back; the worker process stays small.

Every stage, isolated or not, comes back with a `profile`: wall seconds, the peak resident memory of the process
that ran it, and the peak of the whole process tree (the worker plus the stage's process) while it ran. The run
report prints them per task and logs them to MLflow; `scripts/check_budget.py` holds a run to its budget.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime

from qat_tasks.core.resources import RssSampler

log = logging.getLogger(__name__)


class StageProcessDied(RuntimeError):
    """The stage's process ended without a result (killed for memory, a segfault in a native library)."""


class _TreeSampler(RssSampler):
    """RssSampler over this process and its children (the stage's process): `peak_mb` is the tree's peak,
    `self_peak_mb` this process's own."""

    def __init__(self, interval_s: float = 0.25):
        super().__init__(interval_s)
        self.self_peak_mb = 0.0

    def _rss_mb(self) -> float:
        import psutil

        own = self._proc.memory_info().rss
        total = own
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
        self.self_peak_mb = max(self.self_peak_mb, own / 2**20)
        return total / 2**20


class _ConsoleFormatter(logging.Formatter):
    """The stage process's log lines in the shape of Airflow's task log (`<ISO time>Z [level] message [logger]`),
    so the worker's log, and the main job's console filter, read them like the worker's own."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = f"{stamp} [{record.levelname.lower():<9}] {record.getMessage()} [{record.name}] loc=stage-process"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _child_setup(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("qat_tasks").setLevel(level)


def _call(fn, args: tuple, kwargs: dict):
    result = fn(*args, **kwargs)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(fn, *args, task: str, isolate: bool, **kwargs):
    """`fn(*args, **kwargs)`, in a spawned process of its own when `isolate`; returns `(result, profile)`.

    `fn` and its arguments must be picklable (a module-level function; plain data, pydantic configs). An
    exception in the stage is raised here as it was raised there; a process that dies without one raises
    StageProcessDied with its exit code."""
    t0 = time.perf_counter()
    with _TreeSampler() as tree:
        if isolate:
            ctx = multiprocessing.get_context("spawn")  # no inherited threads, locks or half-built CUDA state
            level = logging.getLogger("qat_tasks").getEffectiveLevel()
            with ProcessPoolExecutor(1, mp_context=ctx, initializer=_child_setup, initargs=(level,)) as pool:
                try:
                    result, stage_peak = pool.submit(_call, fn, args, kwargs).result()
                except BrokenProcessPool as exc:
                    codes = [p.exitcode for p in getattr(pool, "_processes", {}).values()]
                    raise StageProcessDied(
                        f"{task}: its process ended without a result (exit code {codes or 'unknown'}; -9 is "
                        f"SIGKILL, often the kernel's out-of-memory killer). What it finished is kept: rerun the "
                        f"task") from exc
        else:
            result, stage_peak = fn(*args, **kwargs), None
    wall = time.perf_counter() - t0
    profile = {"task": task, "wall_s": round(wall, 2), "isolated": isolate,
               # in-process: the worker's own peak while the stage ran (sampled), not its lifetime high-water mark
               "peak_rss_mb": round(stage_peak if stage_peak is not None else tree.self_peak_mb, 1),
               "tree_peak_rss_mb": round(tree.peak_mb, 1)}
    log.info("%s: %.1f s, peak memory %.0f MB (%s; %.0f MB with the worker)", task, wall, profile["peak_rss_mb"],
             "own process" if isolate else "in the worker", profile["tree_peak_rss_mb"])
    return result, profile
