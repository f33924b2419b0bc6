"""Shadow calls with a deadline, inside the shadow process: each call runs on a reusable runner thread, so
whatever the shadow does (raise, run late, hang) is counted and the next mirror still runs. A call that hangs keeps
its thread; later calls run on fresh ones, at most MAX_STUCK_CALLS hung at once per worker."""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time

log = logging.getLogger(__name__)

MAX_STUCK_CALLS = 4  # hung shadow calls (each holding a thread) per worker before mirrors are dropped


def lower_priority(nice: int, idle: bool) -> None:
    """Lower the shadow process's CPU priority. Called on its main thread before any other thread starts: Linux
    schedules threads as tasks, and the threads started later (workers, runners, ONNX Runtime's pool) inherit the
    nice value and the policy. With `idle` the process runs under SCHED_IDLE, which a waking champion thread always
    preempts at once; the price: on a saturated machine the shadow waits for idle CPU, and its late answers count
    as timeouts. Elsewhere than Linux it does nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        log.warning("could not lower the shadow's CPU priority (nice %d, idle %s): %s", nice, idle, exc)


class _Call:
    """One shadow call handed to a runner thread; the runner times it, the caller waits with a deadline."""

    def __init__(self, fn):
        self.fn, self.done = fn, threading.Event()
        self.value = self.error = None
        self.ms = 0.0


class _Runner:
    """A daemon thread that runs shadow calls one at a time, timed on `clock`."""

    def __init__(self, clock):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.clock = clock
        self.last: _Call | None = None  # set by the submitting thread, so busy() never races the runner
        threading.Thread(target=self._loop, daemon=True, name="shadow-runner").start()

    def submit(self, call: _Call) -> None:
        self.last = call
        self.inbox.put(call)

    def _loop(self) -> None:
        while True:
            call = self.inbox.get()
            t0 = self.clock()
            try:
                call.value = call.fn()
            except BaseException as exc:  # whatever the shadow raises stays on this thread
                call.error = exc
            call.ms = (self.clock() - t0) * 1000
            call.done.set()

    def busy(self) -> bool:
        return self.last is not None and not self.last.done.is_set()


class Saturated(Exception):
    """Every runner this worker may hold is stuck in a hung call."""


class Executor:
    """Runs calls with a deadline on reusable runner threads; one whose call hangs is set aside (not reused until
    the call returns) and a fresh runner takes the next call, up to `max_stuck` set aside at once.

    Deadlines and call times are kept on `clock` (seconds): the shadow process passes one that leaves out the time
    the service held it paused, so a call is judged on the time it could run."""

    def __init__(self, max_stuck: int = MAX_STUCK_CALLS, clock=time.perf_counter):
        self.max_stuck, self.clock = max_stuck, clock
        self.idle: list[_Runner] = []
        self.stuck: list[_Runner] = []

    def call(self, fn, timeout_s: float) -> _Call:
        returned = [r for r in self.stuck if not r.busy()]
        if returned:
            self.stuck = [r for r in self.stuck if r.busy()]
            self.idle.extend(returned)
        if len(self.stuck) >= self.max_stuck:
            raise Saturated
        runner = self.idle.pop() if self.idle else _Runner(self.clock)
        call = _Call(fn)
        runner.submit(call)
        start = self.clock()
        while not call.done.wait(max(0.001, timeout_s - (self.clock() - start))):
            if self.clock() - start >= timeout_s:
                self.stuck.append(runner)
                raise TimeoutError
        self.idle.append(runner)
        return call

    def stuck_calls(self) -> int:
        """Calls hung past their deadline that have not returned yet."""
        return sum(r.busy() for r in list(self.stuck))
