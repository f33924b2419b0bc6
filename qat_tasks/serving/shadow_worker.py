"""The shadow process: a process of its own (started with multiprocessing's spawn by `mirror.Mirror`) that loads
the @shadow versions the service fetched, answers the mirrored requests from a bounded queue and logs the shadow's
answers in the traffic schema. It shares no GIL, no threads and no ONNX Runtime pool with the champion.

Each call has a deadline (`serving.shadow_timeout_ms`) on a runner thread (`executor`): an exception is an error, a
late or hung answer a timeout, a worker whose runners are all hung drops the mirror. Outcomes go back to the service
in batches, with a heartbeat, over a pipe; the service turns them into its metrics.

While the service answers a request it may hold the process paused (SIGSTOP, `serving.shadow_yield`); it adds
each pause to the shared `paused` seconds, and deadlines and call times here leave that time out.

Messages from the service: ("load", {model: (package, log root) or None}) and ("stop",). To the service:
("loaded", {model: info or {"error": ...}}), ("report", [(model, outcome, ms, agreed)], status), ("stopped",).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from qat_tasks.serving.executor import Executor, Saturated, lower_priority
from qat_tasks.serving.requests import agree, answer_fields

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.25  # outcomes are sent in batches at most this old (fewer wake-ups in the service)
HEARTBEAT_EVERY_S = 1.0  # a status message at least this often, so the service can tell a hung process


def run(settings: dict, jobs, control, results, paused) -> None:
    """The spawned process's entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [shadow] %(message)s",
                        datefmt="%H:%M:%S")
    lower_priority(settings["nice"], settings["idle"])  # first: every thread started later inherits it
    ShadowWorker(settings, jobs, control, results, paused).serve()


class ShadowWorker:
    def __init__(self, settings: dict, jobs, control, results, paused):
        self.settings, self.jobs, self.control, self.results = settings, jobs, control, results
        self.timeout_s = settings["timeout_ms"] / 1000
        self.models: dict = {}  # configured model name -> ServedModel
        self.roots: dict[str, str] = {}  # configured model name -> log root
        self.writers: dict = {}  # log root -> RecordWriter

        def clock() -> float:  # the time this process could run: the service's pauses left out
            return time.monotonic() - paused.value

        self.executors = [Executor(clock=clock) for _ in range(settings["workers"])]
        self.stop = threading.Event()
        self._send_lock, self._out_lock = threading.Lock(), threading.Lock()
        self._outcomes: list[tuple] = []
        self._log_errors = 0
        self._warned: dict[str, int] = {}

    # -- the main thread: control messages ------------------------------------------------------------------------
    def serve(self) -> None:
        threading.Thread(target=self._report_loop, daemon=True, name="shadow-reporter").start()
        workers = [threading.Thread(target=self._work, args=(ex,), daemon=True, name=f"shadow-worker-{i}")
                   for i, ex in enumerate(self.executors)]
        for t in workers:
            t.start()
        while not self.stop.is_set():
            try:
                if not self.control.poll(0.5):
                    continue
                msg = self.control.recv()
            except (EOFError, OSError):  # the service is gone: nothing to mirror for any more
                break
            if msg[0] == "load":
                self._load(msg[1])
            elif msg[0] == "stop":
                break
        self.stop.set()
        for t in workers:
            t.join(self.timeout_s + 1)
        for writer in self.writers.values():
            try:
                writer.close()
            except Exception as exc:
                log.error("could not write the last shadow records: %s: %s", type(exc).__name__, exc)
        with self._out_lock:
            batch, self._outcomes = self._outcomes, []
        self._send(("report", batch, self._status()))
        self._send(("stopped",))

    def _load(self, wanted: dict) -> None:
        from qat_tasks.serving.models import ServedModel

        factory = self.settings.get("factory") or ServedModel
        infos = {}
        for name, spec in wanted.items():
            if spec is None:
                self.models.pop(name, None)
                continue
            package, root = spec
            current = self.models.get(name)
            if current is not None and current.version == package.version:
                infos[name] = current.info()
                continue
            try:
                model = factory(package, self.settings["threads"])
            except Exception as exc:
                log.warning("could not load %s v%s as the shadow: %s: %s", package.registered, package.version,
                            type(exc).__name__, exc)
                infos[name] = {"version": package.version, "error": f"{type(exc).__name__}: {exc}"}
                continue
            self.roots[name] = root
            self.models[name] = model
            infos[name] = model.info()
            log.info("shadow %s %s loaded", package.registered, model.describe())
        self._send(("loaded", infos))

    # -- worker threads: one mirror at a time each ----------------------------------------------------------------
    def _work(self, executor: Executor) -> None:
        while not self.stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            except (EOFError, OSError, ValueError):  # the queue was closed
                return
            name = job[0]
            try:
                outcome = self._mirror(executor, *job)
            except Exception:  # a bug here must not end the worker: later mirrors still run
                log.exception("mirroring a request to the shadow failed")
                outcome = (name, "error", 0.0, False)
            with self._out_lock:
                self._outcomes.append(outcome)

    def _mirror(self, executor: Executor, name: str, record: dict, inputs) -> tuple:
        model = self.models.get(name)
        if model is None:
            return name, "dropped:not_loaded", 0.0, False
        try:
            call = executor.call(lambda: model.answer(inputs), self.timeout_s)
        except Saturated:
            return name, "dropped:stalled", 0.0, False
        except TimeoutError:
            self._warn("timeouts", "shadow %s did not answer within %.0f ms", model.describe(), 1000 * self.timeout_s)
            return name, "timeout", 1000 * self.timeout_s, False
        if call.error is not None:
            self._warn("errors", "shadow %s failed: %s: %s", model.describe(), type(call.error).__name__, call.error)
            return name, "error", call.ms, False
        fields = answer_fields(model.role, call.value, record)
        agreed = agree(model.role, record, fields)
        shadow_record = {**record, "event": "shadow_inference", "model": model.model_field, **fields,
                         "latency_ms": round(call.ms, 3)}
        try:
            self._writer(name).write(shadow_record)
        except Exception as exc:  # counted; the answer still counts as answered
            self._log_errors += 1
            log.warning("could not log a shadow record: %s", exc)
        return name, "answered", call.ms, agreed

    def _writer(self, name: str):
        from qat_tasks.serving.logs import RecordWriter

        root = self.roots[name]
        writer = self.writers.get(root)
        if writer is None:
            s = self.settings
            writer = self.writers[root] = RecordWriter(root, s["endpoint_url"], s["flush_records"], s["flush_seconds"])
        return writer

    def _warn(self, kind: str, fmt: str, *args) -> None:
        n = self._warned[kind] = self._warned.get(kind, 0) + 1
        if n <= 3 or n % 1000 == 0:
            log.warning(fmt + f" ({n} {kind} so far)", *args)

    # -- reporting back to the service ----------------------------------------------------------------------------
    def _status(self) -> dict:
        figures = [w.health() for w in list(self.writers.values())]
        log_figures = {k: sum(f[k] for f in figures) for k in ("records", "dropped", "flush_errors", "pending")}
        log_figures["refused"] = self._log_errors
        return {"stuck": sum(ex.stuck_calls() for ex in self.executors), "log": log_figures}

    def _send(self, msg) -> None:
        with self._send_lock:
            try:
                self.results.send(msg)
            except (BrokenPipeError, EOFError, OSError):
                self.stop.set()  # the service is gone

    def _report_loop(self) -> None:
        last = 0.0
        while not self.stop.is_set():
            time.sleep(REPORT_EVERY_S)
            with self._out_lock:
                batch, self._outcomes = self._outcomes, []
            now = time.monotonic()
            if batch or now - last >= HEARTBEAT_EVERY_S:
                self._send(("report", batch, self._status()))
                last = now
