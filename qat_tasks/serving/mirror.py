"""Mirroring: each answered request goes to a bounded queue that the request never waits on (full: the mirror is
dropped and counted); shadow workers answer it with @shadow under a deadline and log the shadow's answer in the
traffic schema. Nothing here raises into the request path."""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from typing import TYPE_CHECKING

from qat_tasks.serving.executor import MAX_STUCK_CALLS, Executor, Saturated, lower_priority
from qat_tasks.serving.models import ServedModel

if TYPE_CHECKING:  # the service owns its mirror
    from qat_tasks.serving.service import Service

log = logging.getLogger(__name__)


class Counters:
    """Counters shared by request threads and shadow workers (a Counter's += is not atomic across threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._c: Counter = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self._c)


class Mirror:
    """The bounded mirror queue and the shadow workers. Nothing here raises into the request path."""

    def __init__(self, service: Service):
        sc = service.cfg.serving
        self.service, self.timeout_s, self.nice = service, sc.shadow_timeout_ms / 1000, sc.shadow_nice
        self.queue: queue.Queue = queue.Queue(maxsize=sc.shadow_queue_size)
        self.counts = Counters()
        self.executors = [Executor(self.nice, MAX_STUCK_CALLS) for _ in range(sc.shadow_workers)]
        for i, ex in enumerate(self.executors):
            threading.Thread(target=self._work, args=(ex,), daemon=True, name=f"shadow-worker-{i}").start()

    def submit(self, model: ServedModel, record: dict, text: str) -> None:
        """Hand a request to the shadow; never blocks. `text` is what the champion answered (the record holds the
        scrubbed text that is logged), so both models see the same input."""
        self.counts.add("mirrored")
        try:
            self.queue.put_nowait((model, record, text))
        except queue.Full:
            self.counts.add("dropped")

    def stuck(self) -> int:
        """Shadow calls hung past their deadline that have not returned yet."""
        return sum(r.busy() for ex in self.executors for r in list(ex.stuck))

    def _work(self, executor: Executor) -> None:
        lower_priority(self.nice)
        while True:
            model, record, text = self.queue.get()
            try:
                self._mirror(executor, model, record, text)
            except Exception:  # a bug here must not end the worker: later mirrors still run
                self.counts.add("errors")
                log.exception("mirroring a request to the shadow failed")

    def _mirror(self, executor: Executor, model: ServedModel, record: dict, text: str) -> None:
        try:
            call = executor.call(lambda: model.predict([text]), self.timeout_s)
        except Saturated:
            self.counts.add("dropped")
            return
        except TimeoutError:
            self.counts.add("timeouts")
            n = self.counts.snapshot()["timeouts"]
            if n <= 3 or n % 1000 == 0:
                log.warning("shadow %s did not answer within %.0f ms (%d timeouts so far)", model.describe(),
                            1000 * self.timeout_s, n)
            return
        if call.error is not None:
            self.counts.add("errors")
            n = self.counts.snapshot()["errors"]
            if n <= 3 or n % 1000 == 0:
                log.warning("shadow %s failed (%d errors so far): %s: %s", model.describe(), n,
                            type(call.error).__name__, call.error)
            return
        ((intent, conf),) = call.value
        self.counts.add("answered")
        self.counts.add("agree", int(intent == record["intent"]))
        self.service.log_record({**record, "event": "shadow_inference", "model": model.model_field, "intent": intent,
                                 "confidence": round(conf, 6), "latency_ms": round(call.ms, 3)})
