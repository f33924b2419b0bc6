"""The seeded hash behind every split and sample, so that a conversation is in the same split every quarter (and a
shadow replay never reviews on training rows) and a sample does not depend on file order; and the language hint
that marks non-English turns as edge cases."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from qat_tasks.core.config import PipelineConfig

SPLITS = ("calibration", "qat_train", "selection", "evaluation")  # the splits a calibration version holds
# Rows that pick among candidates (ranking, sensitivity, the mixed-precision search) and rows that judge the one
# picked: both human-reviewed, never the same conversation or text.
JUDGED_SPLITS = ("selection", "evaluation")
# Conversations of this share go into no split: the replay review's traffic, which neither trained, picked nor
# judged the models it reviews.
REPLAY = "replay"
REGIONS = (*SPLITS, REPLAY)


def seed_key(seed: int) -> bytes:
    """The key `seeded_priority` takes for a configured seed (calibration.seed)."""
    return seed.to_bytes(8, "big", signed=True)


def seeded_priority(key: bytes, value: str) -> int:
    """A keyed hash: the order calibration samples by, independent of file order (also drift and replay)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8, key=key).digest(), "big")


def public_unit(seed: int, row_id: str) -> float:
    """A public data set's row id hashed to [0, 1) under `seed`: the split and the cap order of the VADER sentences
    and chitchat dialogues. It is not the conversations' hash (`splitter`), on purpose: registered champions were fine-tuned on the public rows
    this hash puts in qat_train, and assigning those rows with the conversation hash would move about half of
    them into evaluation, judging every champion on its own training rows. Changing it needs new champions (a
    new calibration.seed), not an upgrade."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "big") / 2**64


def _bounds(fractions, regions: tuple[str, ...] = REGIONS) -> list[tuple[float, str]]:
    """Each region's upper end in [0, 1): calibration.split_fractions added up in order, scaled to the regions
    asked for (public data sets have no replay traffic: their rows fall in the splits only)."""
    total = sum(getattr(fractions, s) for s in regions)
    out, acc = [], 0.0
    for s in regions:
        acc += getattr(fractions, s) / total
        out.append((acc, s))
    return out


def split_at(u: float, fractions, regions: tuple[str, ...] = REGIONS) -> str:
    """The region a point of [0, 1) falls in, cutting the interval at calibration.split_fractions."""
    return next((s for end, s in _bounds(fractions, regions) if u < end), regions[-1])


_NON_EN_HINTS = ("¿", "¡", " el ", " los ", " qu", " le ", " la ", " une ", " der ", " und ", " ist ", " você", " meu ",
                 " minha ", "ção", "ões", "ñ")


def split_of(cfg: PipelineConfig, conversation_id: str) -> str:
    """The split a conversation belongs to (or `replay`): a seeded hash of its id, so every quarter (and a shadow
    replay, which must not review on rows that trained, picked or judged the models) assigns it the same way."""
    return splitter(cfg)(conversation_id)


def splitter(cfg: PipelineConfig) -> Callable[[str], str]:
    """`split_of` for one configuration, with the keyed hash and the split boundaries worked out once: the
    refresh asks for every turn it reads."""
    key = seed_key(cfg.calibration.seed)
    bounds = _bounds(cfg.calibration.split_fractions)
    last = REGIONS[-1]

    def split(conversation_id: str) -> str:
        u = seeded_priority(key, conversation_id) / 2**64
        for end, s in bounds:
            if u < end:
                return s
        return last

    return split


def public_split_of(cfg: PipelineConfig, row_id: str) -> str:
    """The split a public data set's row belongs to (see `public_unit`); never `replay`."""
    return split_at(public_unit(cfg.calibration.seed, row_id), cfg.calibration.split_fractions, SPLITS)


def is_non_english(text: str, locale: str | None) -> bool:
    if locale:
        return not locale.lower().startswith("en")
    if not text.isascii():  # mostly CJK, Hangul, Cyrillic, ... letters (ASCII letters never are)
        letters = [c for c in text if c.isalpha()]
        if letters and sum(ord(c) > 0x24F for c in letters) / len(letters) > 0.3:
            return True
    padded = f" {text.lower()} "
    return any(h in padded for h in _NON_EN_HINTS)


def normalize(text: str) -> str:
    return " ".join(text.lower().split())
