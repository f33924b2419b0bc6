"""Mirroring, the service's side: each answered request is handed to the shadow process through a bounded queue
that the request never waits on (full: the mirror is dropped and counted). The shadow process (`shadow_worker`)
runs in a process of its own, so it cannot take the champion's GIL or threads.

While the service answers a request the shadow process is held paused (SIGSTOP, then SIGCONT when no request
is in flight; `serving.shadow_yield`): on a machine whose cores it shares with the champion, its compute never runs
beside the champion's. Measured on a 2-core machine, a bursty neighbour at SCHED_IDLE on the other core (an ONNX
Runtime loop, or even a pure spin loop) slowed the champion's inference by 3 to 5 % at the median and 10 to 12 % at
P95: nice and SCHED_IDLE only decide who gets a core, not what the other core does meanwhile. The shadow then runs
in the gaps between requests; on a saturated service its mirrors queue and, past the queue, drop (counted). Its
deadlines and call times leave the paused time out (the shared `paused` seconds), so it is judged on the time it
could run.

A monitor thread reads the shadow's batched outcomes and heartbeats into the service's metrics, and restarts the
process when it dies or stops answering: the mirrors it held are counted as dropped (`worker_lost`), those that
arrive while it restarts too (`worker_down`), and the restart itself (`qat_shadow_worker_restarts_total`). A
process that keeps dying is restarted after a growing pause (up to a minute). Nothing here raises into the
request path.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import Counter

from qat_tasks.serving import shadow_worker
from qat_tasks.serving.executor import MAX_STUCK_CALLS
from qat_tasks.serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 30.0  # a shadow process silent this long (holding its GIL in native code, say) is killed
MAX_RESTART_PAUSE_S = 60.0


class Mirror:
    """The shadow process, its bounded job queue and the monitor thread. `settings` are shadow_worker's."""

    def __init__(self, settings: dict, metrics: ServiceMetrics):
        self.settings, self.metrics = settings, metrics
        self.ctx = mp.get_context("spawn")
        self._lock = threading.Lock()  # guards the process handles, readiness and the job accounting
        self._changed = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self.wanted: dict[str, tuple | None] = {}  # model -> (Package, log root) the shadow process should hold
        self.labels: dict[str, str] = {}  # model -> registered name (the metrics' label)
        self.ready: dict[str, dict] = {}  # model -> info of the version the running process confirmed
        self.failed: dict[str, str] = {}  # model -> why its wanted version did not load
        self.proc = self.jobs = self.control = self.results = None
        self.enqueued: Counter = Counter()  # mirrors put into this process's queue, per model
        self.reported: Counter = Counter()  # outcomes this process reported, per model
        self.restarting = False
        self.status: dict = {"stuck": 0, "log": {}}
        self.log_before: Counter = Counter()  # log figures of shadow processes that ended
        self._pause, self._next_start, self._heard = 1.0, 0.0, time.monotonic()
        # The pause gate: requests in flight, the running process's pidfd, the shared paused seconds.
        self._gate = threading.Lock()
        self._inflight, self._stopped_at, self._pidfd, self._paused = 0, None, None, None
        self._heard_paused = 0.0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._monitor, daemon=True, name="shadow-monitor")
        self._thread.start()

    # -- the service's calls --------------------------------------------------------------------------------------
    def hold(self) -> None:
        """A champion request starts: the first one in flight pauses the shadow process (serving.shadow_yield)."""
        with self._gate:
            self._inflight += 1
            if self._inflight == 1 and self._pidfd is not None and not self._closing.is_set():
                if self._signal(signal.SIGSTOP):
                    self._stopped_at = time.monotonic()

    def release(self) -> None:
        """A champion request is answered: the last one in flight resumes the shadow process."""
        with self._gate:
            self._inflight -= 1
            if self._inflight == 0 and self._stopped_at is not None:
                self._paused.value += time.monotonic() - self._stopped_at  # before it runs again
                self._stopped_at = None
                self._signal(signal.SIGCONT)

    def _signal(self, sig) -> bool:
        try:  # through the pidfd: never a process that took over the pid of one that died
            signal.pidfd_send_signal(self._pidfd, sig)
            return True
        except OSError:  # gone: the monitor restarts it
            return False

    def paused_seconds(self) -> float:
        """How long the running shadow process has been held paused, the current pause included."""
        with self._gate:
            if self._paused is None:
                return 0.0
            now = self._paused.value
            return now + (time.monotonic() - self._stopped_at if self._stopped_at is not None else 0.0)

    def update(self, wanted: dict[str, tuple | None]) -> None:
        """Set the @shadow version each model should be mirrored to ((Package, log root), or None for none). A
        changed model is not mirrored until the shadow process confirms it loaded the new version."""
        changed = {}
        with self._lock:
            for name, spec in wanted.items():
                old = self.wanted.get(name)
                if (old and old[0].version) == (spec and spec[0].version) and name not in self.failed:
                    continue  # unchanged; a version that failed to load is asked for again
                self.wanted[name] = changed[name] = spec
                self.ready.pop(name, None)
                self.failed.pop(name, None)
                if spec is not None:
                    self.labels[name] = spec[0].registered
            control = self.control
        if changed and control is not None:
            self._send(control, ("load", changed))
        # No process yet: the monitor starts one as soon as a shadow is wanted.

    def wait_ready(self, timeout: float) -> None:
        """Wait until every wanted shadow is loaded or failed to load (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while any(spec is not None and name not in self.ready and name not in self.failed
                      for name, spec in self.wanted.items()):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("the shadow process has not loaded every @shadow after %.0f s; serving without "
                                "them until it has", timeout)
                    return
                self._changed.wait(min(left, 0.5))

    def submit(self, name: str, record: dict, inputs) -> None:
        """Hand one answered request to the shadow; never blocks. `inputs` is what the champion answered (the record
        holds the scrubbed texts that are logged), so both models see the same request."""
        with self._lock:
            if name not in self.ready:
                if self.restarting and self.wanted.get(name) is not None:  # it was being mirrored: counted
                    label = self.labels[name]
                    self.metrics.mirrored.labels(label).inc()
                    self.metrics.dropped.labels(label, "worker_down").inc()
                return
            label = self.labels[name]
            self.metrics.mirrored.labels(label).inc()
            try:
                self.jobs.put_nowait((name, record, inputs))
                self.enqueued[name] += 1
            except queue.Full:
                self.metrics.dropped.labels(label, "queue_full").inc()
            except (ValueError, OSError):  # the queue closed under us: the process is being replaced
                self.metrics.dropped.labels(label, "worker_down").inc()

    @property
    def counts(self) -> _Counts:
        return _Counts(self.metrics)

    def state(self, name: str, mirroring: bool) -> str:
        with self._lock:
            if self.wanted.get(name) is None:
                return "no shadow"
            if name in self.failed:
                return f"not loaded: {self.failed[name]}"
            if name not in self.ready:
                return "shadow process restarting" if self.restarting else "loading"
            stuck = self.status.get("stuck", 0)
        if not mirroring:
            return "mirroring off"
        if stuck >= MAX_STUCK_CALLS * self.settings["workers"]:
            return f"stalled: {stuck} shadow calls hung; mirrors are dropped until one returns"
        return "mirroring" + (f" ({stuck} shadow calls hung)" if stuck else "")

    def shadow_info(self, name: str) -> dict | None:
        with self._lock:
            return self.ready.get(name)

    def health(self) -> dict:
        with self._lock:
            proc, jobs = self.proc, self.jobs
            return {"pid": proc.pid if proc is not None else None,
                    "up": proc is not None and proc.is_alive() and bool(self.ready),
                    "restarting": self.restarting, "queue": _qsize(jobs)}

    def log_figures(self) -> dict:
        with self._lock:
            now = self.status.get("log", {})
            figures = {k: self.log_before[k] + now.get(k, 0) for k in ("records", "dropped", "flush_errors", "refused")}
        return {"records": figures["records"], "errors": figures["dropped"] + figures["refused"],
                "flush_errors": figures["flush_errors"], "pending": now.get("pending", 0)}

    def close(self, timeout: float = 30.0) -> None:
        """Stop the shadow process after it wrote the records it holds."""
        self._closing.set()
        with self._gate:  # never leave it paused: it must write what it holds
            if self._stopped_at is not None:
                self._signal(signal.SIGCONT)
                self._stopped_at = None
        with self._lock:
            proc, control = self.proc, self.control
        if proc is not None:
            self._send(control, ("stop",))
        self._thread.join(timeout)
        if proc is not None and proc.is_alive():
            log.warning("the shadow process did not stop in %.0f s: killing it", timeout)
            proc.kill()
            proc.join(5)

    # -- the monitor thread ---------------------------------------------------------------------------------------
    def _monitor(self) -> None:
        while not self._closing.is_set() or self.proc is not None:
            try:
                self._watch()
            except Exception:  # a bug here must not end the monitor: the next pass tries again
                log.exception("watching the shadow process failed")
                time.sleep(0.5)

    def _watch(self) -> None:
        """One pass of the monitor: start the process if one is wanted, read its messages, notice its end."""
        proc, results = self.proc, self.results
        if proc is None:
            wanted = any(s is not None for s in self.wanted.values())
            if wanted and not self._closing.is_set() and time.monotonic() >= self._next_start:
                self._start()
            else:
                time.sleep(0.1)
            return
        try:
            if results.poll(0.25):
                self._handle(results.recv())
                return
        except (EOFError, OSError):
            proc.join(0.1)  # the process is gone or going; its exit is handled below
        if not proc.is_alive():
            self._ended("exited")
        elif time.monotonic() - self._heard - (self.paused_seconds() - self._heard_paused) > HEARTBEAT_TIMEOUT_S:
            # Silent for that long while it could run (the time it was held paused does not count).
            log.error("the shadow process (pid %s) sent nothing for %.0f s: killing it", proc.pid, HEARTBEAT_TIMEOUT_S)
            proc.kill()
            proc.join(5)
            self._ended("unresponsive")

    def _start(self) -> None:
        jobs = self.ctx.Queue(maxsize=self.settings["queue_size"])
        control_in, control = self.ctx.Pipe(duplex=False)
        results, results_out = self.ctx.Pipe(duplex=False)
        paused = self.ctx.Value("d", 0.0, lock=False)  # written here only, under the gate, before a SIGCONT
        proc = self.ctx.Process(target=shadow_worker.run, args=(self.settings, jobs, control_in, results_out, paused),
                                daemon=True, name="qat-shadow")
        try:
            proc.start()
        except Exception as exc:
            log.error("could not start the shadow process: %s: %s", type(exc).__name__, exc)
            self._next_start = time.monotonic() + self._pause
            self._pause = min(2 * self._pause, MAX_RESTART_PAUSE_S)
            return
        control_in.close()  # the child's ends: closed here, so a dead child reads as EOF
        results_out.close()
        try:
            pidfd = os.pidfd_open(proc.pid) if self.settings["yield"] else None
        except OSError as exc:  # no pidfds here (an old kernel, a seccomp profile): it runs beside the champion
            log.warning("cannot hold the shadow process paused during requests (pidfd_open: %s)", exc)
            pidfd = None
        with self._gate:
            self._pidfd, self._paused, self._stopped_at = pidfd, paused, None
        with self._lock:
            self.proc, self.jobs, self.control, self.results = proc, jobs, control, results
            self.enqueued.clear()
            self.reported.clear()
            self.status = {"stuck": 0, "log": {}}
            load = {name: spec for name, spec in self.wanted.items() if spec is not None}
        self._heard, self._heard_paused = time.monotonic(), 0.0
        self._send(control, ("load", load))
        log.info("shadow process started (pid %d) for %s", proc.pid, ", ".join(sorted(load)))

    def _handle(self, msg) -> None:
        self._heard, self._heard_paused = time.monotonic(), self.paused_seconds()
        kind = msg[0]
        if kind == "report":
            # Only this thread touches `reported` and replaces `status`: no lock, so a request handing over a
            # mirror never waits while a batch is counted.
            _, outcomes, self.status = msg
            for name, outcome, ms, agreed in outcomes:
                self.reported[name] += 1
                label = self.labels.get(name)
                if label is not None:
                    self.metrics.outcome(label, outcome, ms, agreed)
        elif kind == "loaded":
            with self._changed:
                for name, info in msg[1].items():
                    spec = self.wanted.get(name)
                    if spec is None or spec[0].version != info["version"]:
                        continue  # an older request; the newer one's answer follows
                    if "error" in info:
                        self.failed[name] = info["error"]
                        self.ready.pop(name, None)
                    else:
                        self.ready[name] = info
                        self.failed.pop(name, None)
                        self._pause = 1.0
                self.restarting = False
                self._changed.notify_all()

    def _ended(self, reason: str) -> None:
        """The shadow process is gone: account for what it held, and restart it unless the service is closing."""
        proc, results = self.proc, self.results
        try:
            while results.poll(0):  # outcomes it sent before it died still count
                self._handle(results.recv())
        except Exception:  # EOF, or a message cut off when it died
            pass
        closing = self._closing.is_set()
        with self._changed:
            for name in set(self.enqueued):
                lost = self.enqueued[name] - self.reported[name]
                if lost > 0 and not closing:
                    self.metrics.dropped.labels(self.labels[name], "worker_lost").inc(lost)
            log_now = self.status.get("log", {})
            for k in ("records", "dropped", "flush_errors", "refused"):
                self.log_before[k] += log_now.get(k, 0)
            self.status = {"stuck": 0, "log": {}}
            self.jobs.cancel_join_thread()  # mirrors still in its pipe are lost (counted above); never wait on them
            self.jobs.close()
            self.results.close()
            self.control.close()
            self.proc = self.jobs = self.control = self.results = None
            with self._gate:
                if self._pidfd is not None:
                    os.close(self._pidfd)
                self._pidfd = self._paused = self._stopped_at = None
            self.ready.clear()
            self.restarting = not closing
            self._changed.notify_all()
        proc.join(1)
        if closing:
            return
        self.metrics.restarts.labels(reason).inc()
        log.error("the shadow process (pid %s) %s (exit code %s): restarting it in %.0f s; the champion keeps "
                  "serving", proc.pid, "died" if reason == "exited" else "hung", proc.exitcode, self._pause)
        self._next_start = time.monotonic() + self._pause
        self._pause = min(2 * self._pause, MAX_RESTART_PAUSE_S)

    def _send(self, conn, msg) -> None:
        with self._send_lock:
            try:
                conn.send(msg)
            except (BrokenPipeError, EOFError, OSError) as exc:  # the monitor sees the dead process and restarts it
                log.warning("could not reach the shadow process: %s", exc)


class _Counts:
    """The shadow's counters summed over models: mirrored, answered, errors, timeouts, dropped, agree."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def snapshot(self) -> Counter:
        totals = self.metrics.totals()
        out = Counter({k: int(totals.get(f"qat_shadow_{k}", 0))
                       for k in ("mirrored", "answered", "errors", "timeouts", "dropped")})
        out["agree"] = int(totals.get("qat_shadow_agreements", 0))
        return out


def _qsize(jobs) -> int:
    if jobs is None:
        return 0
    try:
        return jobs.qsize()
    except (NotImplementedError, OSError, ValueError):
        return 0
