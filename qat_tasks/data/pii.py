"""Personal data scrubbing: what a customer types about themselves never reaches storage.

The serving component scrubs a request's text before it logs it, and the refresh scrubs every logged text again
(logs written by older services, or by other writers), so neither the traffic store nor a calibration set, the
quarantine or an MLflow artifact holds these values. Each is replaced by a typed placeholder:

  [EMAIL]    addresses, also spelled out ("jane at example dot com", "jane(at)example(dot)com")
  [CARD]     payment cards: 13 to 19 digits, written in a card's groups (4-4-4-4, 4-6-5) or Luhn-checked
  [IBAN]     bank accounts, mod-97 checked
  [SSN]      US social security numbers (3-2-4 digits)
  [PHONE]    numbers Google's libphonenumber (`phonenumbers`) holds valid: international (+44 ..., 0044 ...,
             E.164 without separators) and national formats of the shop's markets (US, GB, JP, DE, FR)
  [IP]       IPv4 and IPv6 addresses
  [ADDRESS]  street addresses (house numbers such as 12, 12B, 12-3; English, German and French street words),
             PO boxes (P.O. Box, Postfach, BP), and postcodes of those markets written as part of an address
             (US ZIP and ZIP+4 after a state, UK postcodes, JP 〒123-4567, DE/FR five digits before a town)

Full-width characters (common from Japanese keyboards) are read as their ASCII forms. What is not scrubbed,
on purpose: people's names (a customer's name is indistinguishable from a character's or an author's, and
manga titles and character names are what the models must learn), and the slot values the models need:
titles, volume numbers, prices, and order numbers such as MA-2026-104233, which are set aside before the
number patterns run.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

import phonenumbers

REGIONS = ("US", "GB", "JP", "DE", "FR")  # the shop's markets: national phone formats read as these

# Full-width ASCII forms and the ideographic space, mapped one character to one character, so a match found in
# the mapped text has the same span in the original.
_FULL_WIDTH = {**{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}, 0x3000: 0x20}
_HAS_FULL_WIDTH = re.compile("[\uff01-\uff5e\u3000]")

# Set aside before the number patterns run: order numbers the assistant needs (MA-2026-104233, #48213977) and
# dates (2026-10-05, 10/12/2026, 10.12.2026), which libphonenumber would otherwise read as valid numbers.
_PROTECTED = re.compile(r"\b(?i:[a-z]{2,3})-\d{4}-\d{4,8}\b|#\d{4,12}\b"
                        r"|\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}[/.]\d{1,2}[/.](?:\d{4}|\d{2})\b")

_AT = r"(?:\s*@\s*|\s*[(\[{]\s*at\s*[)\]}]\s*|\s+at\s+)"
_DOT = r"(?:\s*\.\s*|\s*[(\[{]\s*dot\s*[)\]}]\s*|\s+dot\s+)"
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_EMAIL_SPELLED = re.compile(rf"\b[A-Za-z0-9._%+-]+{_AT}[A-Za-z0-9-]+(?:{_DOT}[A-Za-z0-9-]+)*{_DOT}(?:com|net|org|edu|gov|io|"
                    r"co|me|jp|uk|de|fr|info|biz|us|ca|au)\b", re.IGNORECASE)
_CARD = re.compile(r"(?<![\w.-])\d(?:[ .-]?\d){12,18}(?![\w-]|\.\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b")
_SSN = re.compile(r"(?<![\w-])\d{3}[- ]\d{2}[- ]\d{4}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# A phone candidate: 7 to 15 digits, with the separators people type; libphonenumber decides.
_PHONE = re.compile(r"(?<![\w+-])(?:\+|00)?\(?\d[\d\s().\-/]{5,20}\d(?![\w-])")

_STREET_WORDS = (
    r"street|st|avenue|ave|road|rd|boulevard|blvd|drive|dr|lane|ln|way|court|ct|place|pl|terrace|parkway|pkwy|"
    r"close|crescent|gardens|square|sq|highway|hwy"
)
_HOUSE = r"\d{1,5}(?:[a-z]|-\d{1,4})?"
_ADDRESS = re.compile(
    # 12B Baker Street, Apt 5, Springfield, IL 62704
    rf"\b{_HOUSE}\s+(?:[a-z]+\.?\s+){{1,3}}(?:{_STREET_WORDS})\b\.?"
    r"(?:,?\s*(?:apt|unit|suite|flat|#)\s*\w+)?(?:,\s*[a-z]+(?:\s[a-z]+)*)?"
    r"(?:,?\s*[a-z]{2}\s+\d{5}(?:-\d{4})?)?"
    # Hauptstraße 5, 10115 Berlin / Musterstr. 12a
    r"|\b[a-zäöüß]+(?:straße|strasse|str\.|weg|allee|platz|gasse)\s+\d{1,4}[a-z]?(?:,?\s*\d{5}\s+[a-zäöü]+)?"
    # 12 rue de la Paix, 75002 Paris
    r"|\b\d{1,4}(?:\s*(?:bis|ter))?,?\s+(?:rue|avenue|boulevard|bd|place|impasse|allée|chemin|quai)\s+"
    r"(?:[a-zéèêàâîôûç'-]+\s+){0,4}[a-zéèêàâîôûç'-]+(?:,?\s*\d{5}\s+[a-zéèêàâîôûç-]+)?"
    # P.O. Box 1234 / Postfach 12 34 56 / BP 123
    r"|\b(?:p\.?\s*o\.?\s*box|post\s+office\s+box|postfach|b\.?p\.?)\s*\d[\d ]{0,8}\d?\b"
    # Japanese postal code (with or without 〒) and the prefecture after it
    r"|〒\s*\d{3}-?\d{4}(?:\s*\S+?[都道府県])?|\b\d{3}-\d{4}\s+\S+[都道府県]\S*",
    re.IGNORECASE,
)

# UK postcodes (SW1A 1AA, M1 1AE), written in capitals: case-blind, "v2 3rd" would read as one.
_UK_POSTCODE = re.compile(r"\b[A-Z]{1,2}\d[A-Z\d]?\s+\d[A-Z]{2}\b")

# Cheap pre-checks: most messages carry no personal data, and a pattern that cannot match should not run. Each
# rule needs a number of digits (counted at C speed) or a word the text must hold.
_DIGITS = b"0123456789"
# The words an address needs, one of which the text must hold before the address pattern runs: a street word
# (English or French), a PO box word, a German street suffix, or a Japanese postal mark or prefecture.
_ADDRESS_WORDS = frozenset(_STREET_WORDS.split("|") + ["rue", "bd", "impasse", "allée", "chemin", "quai", "box",
                                                        "postfach", "bp"])
_WORD = re.compile(r"\w+")


def _address_words(low: str) -> bool:
    if not _ADDRESS_WORDS.isdisjoint(_WORD.findall(low)):
        return True
    if "b.p" in low or "stra" in low or "str." in low or "weg" in low or "allee" in low or "platz" in low \
            or "gasse" in low:
        return True
    return not low.isascii() and ("〒" in low or "都" in low or "道" in low or "府" in low or "県" in low)


def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    s = re.sub(r"\s", "", candidate).upper()
    if not 15 <= len(s) <= 34 or not s[4:].isalnum():
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


# How cards are written: 4-4-4-4 (most), 4-6-5 (American Express), 4-4-4-4-3. Written so, a number is a card even
# when it fails the Luhn check (a customer's typo still carries most of the card); otherwise it must pass it.
_CARD_GROUPS = {(4, 4, 4, 4), (4, 6, 5), (4, 4, 4, 4, 3), (4, 6, 4)}


def _card_ok(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    if not 13 <= len(digits) <= 19:
        return False
    groups = tuple(len(g) for g in re.split(r"[ .-]", candidate))
    # Three or more short groups (8374 4039 848 64045): card-shaped, a mistyped card more likely than anything else
    # (no card number starts with 0: a leading 0 is a phone's trunk or international prefix)
    card_shaped = not digits.startswith("0") and len(groups) >= 3 and all(2 <= g <= 6 for g in groups)
    return groups in _CARD_GROUPS or card_shaped or _luhn(digits)


def _ip_ok(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return candidate.count(":") >= 2 or candidate.count(".") == 3


def _phone_ok(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    if not 7 <= digits <= 15:
        return False
    text = candidate.strip()
    bare = text.isdigit()
    # A bare run of digits is an order or item number unless it dials like a phone: international (+, 00), a
    # national trunk prefix (0: GB, JP, DE, FR) or the ten digits of a US number; and then it must be a valid
    # number. Written with a phone's separators ((415) 555-0134, 030 1234 5678), a number of a possible length
    # is scrubbed even when its area code is not assigned: leaking a number is the failure to avoid.
    if bare and not (text.startswith("0") or len(text) == 10):
        return False
    if text.startswith("00"):
        text = "+" + text[2:]
    if text.startswith("+"):  # dialled internationally: a phone number, valid or mistyped
        return True
    regions = REGIONS
    for region in regions:
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            continue
        if (not bare and phonenumbers.is_possible_number(number)) or phonenumbers.is_valid_number(number):
            return True
    return False


# (kind, pattern, check of the matched text or None, digits the text needs at least, pre-check of the text)
_RULES = (
    ("EMAIL", _EMAIL, None, 0, lambda view, low: "@" in view),
    ("EMAIL", _EMAIL_SPELLED, None, 0, lambda view, low: ("@" in view or _spelled_at(low))
                                                         and ("." in view or "dot" in low)),
    ("IBAN", _IBAN, _iban_ok, 10, lambda view, low: view != low),  # capitals: the country code
    ("CARD", _CARD, _card_ok, 13, None),
    ("SSN", _SSN, None, 9, None),
    ("IP", _IPV4, None, 4, lambda view, low: view.count(".") >= 3),
    ("IP", _IPV6, _ip_ok, 1, lambda view, low: view.count(":") >= 2),
    ("ADDRESS", _ADDRESS, None, 1, lambda view, low: _address_words(low)),
    ("ADDRESS", _UK_POSTCODE, None, 2, lambda view, low: view != low),
    ("PHONE", _PHONE, _phone_ok, 7, None),
)


def _digits(view: str) -> int:
    raw = view.encode()
    return len(raw) - len(raw.translate(None, _DIGITS))


def _spelled_at(low: str) -> bool:
    return " at " in low or "(at)" in low or "[at]" in low or "{at}" in low


def _replace(text: str, view: str, kind: str, pattern: re.Pattern, check, counts: Counter | None) -> tuple[str, str]:
    """Replace the matches of `pattern` in `view` (which `check` accepts) at the same spans of `text`."""
    first = pattern.search(view)
    if first is None:
        return text, view
    out, out_view, last, n = [], [], 0, 0
    for m in pattern.finditer(view, first.start()):
        if check is not None and not check(m.group(0)):
            continue
        out.append(text[last:m.start()])
        out_view.append(view[last:m.start()])
        out.append(f"[{kind}]")
        out_view.append(f"[{kind}]")
        last, n = m.end(), n + 1
    if not n:
        return text, view
    if counts is not None:
        counts[kind] += n
    out.append(text[last:])
    out_view.append(view[last:])
    return "".join(out), "".join(out_view)


def _protect(text: str, view: str, protected: list[str]) -> tuple[str, str]:
    if not ("-" in view or "#" in view or "/" in view or "." in view):
        return text, view
    spans: list[tuple[int, int]] = []

    def placeholder(m: re.Match) -> str:  # no digit in it: no rule counts it
        spans.append(m.span())
        return f"\x00{chr(0xE000 + len(spans) - 1)}\x00"

    new_view = _PROTECTED.sub(placeholder, view)
    if not spans:
        return text, view
    if view is text:
        protected.extend(text[a:b] for a, b in spans)
        return new_view, new_view
    out, last = [], 0
    for i, (a, b) in enumerate(spans):
        protected.append(text[a:b])
        out += [text[last:a], f"\x00{chr(0xE000 + i)}\x00"]
        last = b
    return "".join(out) + text[last:], new_view


def scrub(text: str, counts: Counter | None = None) -> str:
    """Replace personal data in `text`; add what was found to `counts` (by kind, never the values)."""
    view = text.translate(_FULL_WIDTH) if _HAS_FULL_WIDTH.search(text) else text
    low = view.lower()
    digits = _digits(view)
    if not digits and "@" not in view and not _spelled_at(low):
        return text
    protected: list[str] = []
    if digits >= 8:  # set order numbers and dates aside, as placeholders no pattern matches
        text, view = _protect(text, view, protected)
        if protected:
            low = view.lower()
            digits = _digits(view)
    for kind, pattern, check, min_digits, needs in _RULES:
        if digits >= min_digits and (needs is None or needs(view, low)):
            text, view = _replace(text, view, kind, pattern, check, counts)
            if kind == "ADDRESS":
                low = view.lower()
    for i, value in enumerate(protected):
        text = text.replace(f"\x00{chr(0xE000 + i)}\x00", value)
    return text
