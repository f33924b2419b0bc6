"""What a step costs the machine: resident memory now, its high-water mark, a sampler for the peak during a block,
and the bytes a folder takes on disk."""

from __future__ import annotations

import threading
from pathlib import Path


def rss_mb() -> float:
    """Resident memory of this process, MB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def dir_size_bytes(path) -> int:
    """Bytes of every regular file under `path` (the checkpoint as it would be uploaded; symlinks not followed)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the operating system. glibc keeps freed memory in its
    arenas; after a model is quantized and dropped, the process stays about 1 GB larger than it needs to be
    (measured on SmolLM2-135M: 1,392 MB resident after an RTN checkpoint was written, 715 MB after this), and the
    next step's model comes on top of it."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            pass


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark since it started, MB (Linux ru_maxrss is KiB).

    It never goes down, so it cannot attribute memory to one step of a long process: run the step in its own
    subprocess (then this is the step's peak), or wrap it in RssSampler for the peak and growth during it."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples this process's RSS every `interval_s` on a background thread while the block runs:

        with RssSampler() as mem:
            model = load(...)
        mem.peak_mb, mem.delta_mb   # highest RSS seen, and how far above the RSS at entry it went

    A 50 ms sampler can miss a spike shorter than the interval; it reports what a serving process would hold."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_mb = self.peak_mb = self.end_mb = 0.0
        self.samples = 0

    def _rss_mb(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def _sample(self) -> None:
        rss = self._rss_mb()
        self.samples += 1
        if rss > self.peak_mb:
            self.peak_mb = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.start_mb = self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.end_mb = self._rss_mb()

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb

    def as_dict(self) -> dict:
        return {"start_mb": self.start_mb, "peak_mb": self.peak_mb, "end_mb": self.end_mb, "delta_mb": self.delta_mb}
