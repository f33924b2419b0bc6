"""Personal data scrubbing for calibration text.

Emails, phone numbers, street addresses and payment-card numbers are replaced by typed placeholders
([EMAIL], [PHONE], [ADDRESS], [CARD]) so that calibration sets never carry them, while the slot values
the models need (titles, volume numbers, order numbers such as MA-2026-104233) survive.
"""

from __future__ import annotations

import re
from collections import Counter

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# 13-19 digits in groups of 4 (or unbroken): payment cards. Checked before phones.
_CARD = re.compile(r"(?<![\w-])(?:\d{4}[ -]){3}\d{1,7}(?![\w-])|(?<![\w-])\d{15,19}(?![\w-])")
# International or national numbers with separators; a bare run of digits (an order number) is not a phone.
_PHONE = re.compile(
    r"(?<![\w-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?![\w-])"
)
_STREET_TYPES = (
    r"St(?:reet)?|Ave(?:nue)?|Rd|Road|Blvd|Boulevard|Dr(?:ive)?|Ln|Lane|Way|Ct|Court|Pl(?:ace)?|Terrace|Pkwy"
)
# Case-insensitive: customers type "12 pine road, springfield" as often as "12 Pine Road, Springfield".
# Over-scrubbing a few trailing words is the safe failure; leaking an address is not.
_ADDRESS = re.compile(
    r"\b\d{1,5}\s+(?:[a-z]+\.?\s+){1,3}(?:" + _STREET_TYPES + r")\b\.?"
    r"(?:,?\s*(?:apt|unit|suite|#)\s*\w+)?(?:,\s*[a-z]+(?:\s[a-z]+)*)?(?:,?\s*[a-z]{2}\s+\d{5})?"
    r"|\b\d{3}-\d{4}\s+\S+[都道府県]\S*",  # Japanese postal code + prefecture
    re.IGNORECASE,
)

_PATTERNS = (("EMAIL", _EMAIL), ("CARD", _CARD), ("ADDRESS", _ADDRESS), ("PHONE", _PHONE))
# Cheap pre-checks: most messages carry no PII, and a regex that cannot match should not run.
_HAS_DIGIT = re.compile(r"\d")


def scrub(text: str, counts: Counter | None = None) -> str:
    """Replace personal data in `text`; add what was found to `counts` (by kind)."""
    has_at = "@" in text
    if not has_at and not _HAS_DIGIT.search(text):
        return text
    for kind, pattern in _PATTERNS:
        if kind == "EMAIL" and not has_at:
            continue
        text, n = pattern.subn(f"[{kind}]", text)
        if n and counts is not None:
            counts[kind] += n
    return text
