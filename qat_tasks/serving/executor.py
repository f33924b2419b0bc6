"""The shadow's threads: calls run with a deadline on reusable runner threads at a lower CPU priority, so whatever
the shadow does (raise, run late, hang) never reaches the champion's requests. A call that hangs keeps its thread;
later calls run on fresh ones, at most MAX_STUCK_CALLS hung at once per worker."""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time

log = logging.getLogger(__name__)



MAX_STUCK_CALLS = 4  # hung shadow calls (each holding a thread) per worker before mirrors are dropped


# Shadow threads in SCHED_IDLE (see lower_priority): set by serve() for the service's own process. Tests and
# replays keep the nice value alone, so a busy CI machine cannot starve their shadow past its deadline.
IDLE_SHADOWS = False


def lower_priority(nice: int) -> None:
    """Linux schedules threads as tasks, so this lowers the calling thread alone (and threads it starts later,
    such as ONNX Runtime's pool): the champion's threads get the CPU first. Elsewhere it would renice the whole
    process, so it does nothing.

    In the service (IDLE_SHADOWS) the thread also goes to SCHED_IDLE, which a waking champion thread always
    preempts at once: measured with bench/shadow_load.py on an idle 2-core machine, mirroring added 21.6 % to the
    champion's P95 at nice 10 and 4.4 % at SCHED_IDLE (an A/A run: 2.0 %). The price: on a saturated machine the
    shadow waits for idle CPU, and its late answers count as timeouts."""
    if nice and sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            if IDLE_SHADOWS:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.warning("could not lower the shadow's CPU priority (nice %d): %s", nice, exc)


def in_thread(fn, nice: int = 0):
    """fn() on a fresh thread at `nice`, waited for: a shadow session created there starts its threads niced."""
    box: dict = {}

    def run() -> None:
        lower_priority(nice)
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, name="model-loader")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class _Call:
    """One shadow call handed to a runner thread; the runner times it, the caller waits with a deadline."""

    def __init__(self, fn):
        self.fn, self.done = fn, threading.Event()
        self.value = self.error = None
        self.ms = 0.0


class _Runner:
    """A daemon thread that runs shadow calls one at a time."""

    def __init__(self, nice: int):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.last: _Call | None = None  # set by the submitting thread, so busy() never races the runner
        threading.Thread(target=self._loop, args=(nice,), daemon=True, name="shadow-runner").start()

    def submit(self, call: _Call) -> None:
        self.last = call
        self.inbox.put(call)

    def _loop(self, nice: int) -> None:
        lower_priority(nice)
        while True:
            call = self.inbox.get()
            t0 = time.perf_counter()
            try:
                call.value = call.fn()
            except BaseException as exc:  # whatever the shadow raises stays on this thread
                call.error = exc
            call.ms = (time.perf_counter() - t0) * 1000
            call.done.set()

    def busy(self) -> bool:
        return self.last is not None and not self.last.done.is_set()


class Saturated(Exception):
    """Every runner this worker may hold is stuck in a hung call."""


class Executor:
    """Runs calls with a deadline on reusable runner threads; one whose call hangs is set aside (not reused until
    the call returns) and a fresh runner takes the next call, up to `max_stuck` set aside at once."""

    def __init__(self, nice: int, max_stuck: int):
        self.nice, self.max_stuck = nice, max_stuck
        self.idle: list[_Runner] = []
        self.stuck: list[_Runner] = []

    def call(self, fn, timeout_s: float) -> _Call:
        returned = [r for r in self.stuck if not r.busy()]
        if returned:
            self.stuck = [r for r in self.stuck if r.busy()]
            self.idle.extend(returned)
        if len(self.stuck) >= self.max_stuck:
            raise Saturated
        runner = self.idle.pop() if self.idle else _Runner(self.nice)
        call = _Call(fn)
        runner.submit(call)
        if not call.done.wait(timeout_s):
            self.stuck.append(runner)
            raise TimeoutError
        self.idle.append(runner)
        return call
