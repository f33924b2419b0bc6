"""A pipeline stage in a process of its own, and what it cost: wall time and peak resident memory.

PyTorch, ONNX Runtime and llm-compressor keep memory they are done with (allocator caches, arenas, fragmented
heaps): one process that runs every stage of the quarterly run one after another ends holding the sum of them.
A stage run through `run(..., isolate=True)` executes in a process of its own that exits when the stage returns,
so the operating system takes all of it back; the worker process stays small.

Stage processes are forked from a fork server that has imported the heavy libraries once (torch, transformers,
MLflow, ONNX Runtime: 6 s and 600 MB a process on two cores), so a stage starts in a fraction of a second, shares
those pages with the server instead of copying them, and inherits nothing of the worker (no threads, locks or
Airflow state: the server is a fresh interpreter). Where fork servers do not exist, stages are spawned.

Every stage, isolated or not, comes back with a `profile`: wall seconds, the peak resident memory of the process
that ran it, and the peak of the whole process tree (worker, fork server and the stage's process) while it ran,
counted as proportional set size so that pages they share are counted once. The run report prints them per task
and logs them to MLflow; `scripts/check_budget.py` holds a run to its budget.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from datetime import UTC, datetime

from qat_tasks.core.resources import RssSampler

log = logging.getLogger(__name__)


class StageProcessDied(RuntimeError):
    """The stage's process ended without a result (killed for memory, a segfault in a native library)."""


# What the fork server imports once, for every stage process forked from it.
PRELOAD = ("torch", "transformers", "transformers.models.auto.modeling_auto", "transformers.models.bert.modeling_bert",
           "transformers.models.llama.modeling_llama", "onnxruntime", "mlflow", "pandas", "matplotlib.pyplot",
           "qat_tasks.pipeline")


def _pss_mb(pid: int) -> float | None:
    """Proportional set size of `pid` (pages shared with n processes count 1/n each), or None where the kernel does
    not report it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class _TreeSampler(RssSampler):
    """RssSampler over this process and its descendants (fork server, the stage's process): `peak_mb` is the tree's
    peak in proportional set size (resident size where the kernel has none), `self_peak_mb` this process's own
    resident size."""

    def __init__(self, interval_s: float = 1.0, tree: bool = True):
        super().__init__(interval_s)
        self.tree = tree  # False: this process alone
        self.self_peak_mb = 0.0

    def _rss_mb(self) -> float:
        import psutil

        own = self._proc.memory_info().rss / 2**20
        self.self_peak_mb = max(self.self_peak_mb, own)
        if not self.tree:
            return own
        total = 0.0
        for proc in [self._proc, *self._proc.children(recursive=True)]:
            try:
                pss = _pss_mb(proc.pid)
                total += pss if pss is not None else proc.memory_info().rss / 2**20
            except psutil.Error:  # exited between listing and reading
                pass
        return total


def _context():
    """The fork server's context, with the heavy libraries preloaded; spawn where there is no fork server."""
    _allow_children()
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # read when the server starts: the first stage of this process
    return ctx


def _allow_children() -> None:
    """A task under a Celery worker runs in a descendant of the prefork pool's child, which Celery's billiard set
    up: multiprocessing sees it daemonic ("daemonic processes are not allowed to have children") and holding
    billiard's authentication key, which a new process cannot inherit ("Pickling an AuthenticationString object is
    disallowed"). The task process owns its stage processes and joins each (the pool's context manager), so it is
    made an ordinary parent: not daemonic, the same key as the standard library's type. This process only."""
    config = multiprocessing.current_process()._config
    key = config.get("authkey")
    if config.get("daemon") or (key is not None and type(key) is not multiprocessing.process.AuthenticationString):
        config["daemon"] = False
        config["authkey"] = multiprocessing.process.AuthenticationString(bytes(key) if key else os.urandom(32))


@contextmanager
def _main_script_hidden(fn):
    """A new process runs the parent's main script again unless the main is a module: for a worker started as
    the `airflow` script, that re-imports Airflow, which in a task process (no metadata database) fails, and
    costs seconds anyway. A stage defined elsewhere needs nothing from it, so the script's path is hidden while it
    starts; a stage defined in the script itself (a benchmark's) needs the script, which then runs again."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if (main is None or path is None or getattr(main, "__spec__", None) is not None
            or getattr(fn, "__module__", None) == "__main__"):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


class _ConsoleFormatter(logging.Formatter):
    """The stage process's log lines in the shape of Airflow's task log (`<ISO time>Z [level] message [logger]`),
    so the worker's log, and the main job's console filter, read them like the worker's own."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = f"{stamp} [{record.levelname.lower():<9}] {record.getMessage()} [{record.name}] loc=stage-process"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_IN_STAGE = "QAT_STAGE_PROCESS"  # set in stage processes: a step isolated inside one is sampled by the task's sampler


def _child_setup(level: int, environ: dict[str, str], cwd: str) -> None:
    # As a spawned process would start: the worker's environment and folder now, not the fork server's at its start.
    import os

    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ[_IN_STAGE] = "1"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("qat_tasks").setLevel(level)


def _call(fn, args: tuple, kwargs: dict):
    result = fn(*args, **kwargs)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def warm_up() -> None:
    """Start the fork server now, so it imports the heavy libraries while the worker does light work (the refresh)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        _context()
        from multiprocessing import forkserver

        forkserver.ensure_running()


def run(fn, *args, task: str, isolate: bool, **kwargs):
    """`fn(*args, **kwargs)`, in a process of its own when `isolate`; returns `(result, profile)`.

    `fn` and its arguments must be picklable (a module-level function; plain data, pydantic configs). An
    exception in the stage is raised here as it was raised there; a process that dies without one raises
    StageProcessDied with its exit code."""
    t0 = time.perf_counter()
    # Proportional set sizes cost the kernel a walk of each process's page tables: once a second, and only in the
    # task's process (a step isolated inside a stage is already inside the task's tree).
    with _TreeSampler(1.0, tree=not os.environ.get(_IN_STAGE)) as tree:
        if isolate:
            ctx = _context()
            level = logging.getLogger("qat_tasks").getEffectiveLevel()
            with ProcessPoolExecutor(1, mp_context=ctx, initializer=_child_setup,
                                     initargs=(level, dict(os.environ), os.getcwd())) as pool:
                try:
                    with _main_script_hidden(fn):  # the stage process starts here
                        future = pool.submit(_call, fn, args, kwargs)
                    result, stage_peak = future.result()
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
    if tree.tree:
        log.info("%s: %.1f s, peak memory %.0f MB (%s; %.0f MB with the worker)", task, wall, profile["peak_rss_mb"],
                 "own process" if isolate else "in the worker", profile["tree_peak_rss_mb"])
    else:  # a step inside a stage process: the task's own sampler counts the tree
        log.info("%s: %.1f s, peak memory %.0f MB (%s)", task, wall, profile["peak_rss_mb"],
                 "own process" if isolate else "in the stage's process")
    return result, profile
