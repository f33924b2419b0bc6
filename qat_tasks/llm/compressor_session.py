"""One llm-compressor session that leaves nothing behind in the process.

llm-compressor keeps a process-wide session, and its sequential pipeline compiles each traced forward in a copy
of its module's globals holding `self` (the model being calibrated); torch.fx.wrap keeps every such namespace in
a process-wide table for good. Without releasing both, every calibrated chunk's model stays in memory (measured
on SmolLM2-135M with AWQ: 0.5 to 0.7 GB more after each chunk, a peak of 4.25 GB for one candidate against
2.39 GB with this)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def compressor_session() -> Iterator[None]:
    """A fresh llm-compressor session for the block; the torch.fx.wrap namespaces it registered are forgotten after."""
    from llmcompressor.core.session_functions import create_session
    from torch.fx import _symbolic_trace

    table = _symbolic_trace._wrapped_fns_to_patch
    before = set(table)
    try:
        with create_session():
            yield
    finally:
        for key in set(table) - before:
            del table[key]
