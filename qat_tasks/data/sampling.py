"""The seeded hash behind every split and sample, so that a conversation is in the same split every quarter (and a
shadow replay never reviews on training rows) and a sample does not depend on file order; and the language hint
that marks non-English turns as edge cases."""

from __future__ import annotations

import hashlib

from qat_tasks.core.config import PipelineConfig

SPLITS = ("calibration", "qat_train", "evaluation")


def seeded_priority(key: bytes, value: str) -> int:
    """A keyed hash: the order calibration samples by, independent of file order (also drift and replay)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8, key=key).digest(), "big")


_NON_EN_HINTS = ("¿", "¡", " el ", " los ", " qu", " le ", " la ", " une ", " der ", " und ", " ist ", " você", " meu ",
                 " minha ", "ção", "ões", "ñ")


def split_of(cfg: PipelineConfig, conversation_id: str) -> str:
    """The split a conversation belongs to: a seeded hash of its id, so every quarter (and a shadow replay, which
    must not review on training rows) assigns it the same way."""
    u = seeded_priority(cfg.calibration.seed.to_bytes(8, "big", signed=True), conversation_id) / 2**64
    acc = 0.0
    for s in SPLITS:
        acc += getattr(cfg.calibration.split_fractions, s)
        if u < acc:
            return s
    return SPLITS[-1]


def is_non_english(text: str, locale: str | None) -> bool:
    if locale:
        return not locale.lower().startswith("en")
    letters = [c for c in text if c.isalpha()]
    if letters and sum(ord(c) > 0x24F for c in letters) / len(letters) > 0.3:  # CJK, Hangul, Cyrillic, ...
        return True
    padded = f" {text.lower()} "
    return any(h in padded for h in _NON_EN_HINTS)


def normalize(text: str) -> str:
    return " ".join(text.lower().split())
