"""PII redaction for what the capture proxy stores (`kolm capture --redact pii`): pure functions.

    redact_pii("mail jane.doe@example.com or call +1 415 555 0100")   # -> "mail [EMAIL] or call [PHONE]"
    redact_pii_json({"messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]})   # a copy

Five kinds, each replaced by its tag: e-mail addresses [EMAIL], phone numbers [PHONE], payment card
numbers [CARD], IBANs [IBAN], US social security numbers [SSN]. Who does what:

- google-re2 finds the candidates in one linear-time pass (as scrub.py does for credentials): an e-mail
  shape, an IBAN shape (two capital letters, two digits, 11-30 letters/digits, spaces allowed), or a run
  of digits and separators. Text with no candidate (most text) costs that one pass and nothing else.
- python-stdnum checks what a shape cannot: the Luhn digit of a card number (a 16-digit order id with
  a wrong check digit is left alone), and an IBAN's mod-97 check and its country's length.
- phonenumbers (Google's libphonenumber metadata) decides whether a run of digits is a phone number of
  some country: `+44 20 7946 0958`, `(415) 555-0100`, `020 7946 0958` (national, in a default region),
  with a leniency that rejects dates, times and numbers grouped unlike any real plan's numbers.
- Rules of our own for what neither library knows: an SSN is 3-2-4 digits with hyphens or spaces (or 9
  digits right after "SSN"/"social security"), never area 000/666/9xx, group 00 or serial 0000; a bare
  digit string right after "order", "invoice", "tracking", "#" ... is an id, never a phone.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import phonenumbers
import re2
from stdnum import iban as _iban
from stdnum import luhn

TAGS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "iban": "[IBAN]", "ssn": "[SSN]"}
KINDS = tuple(TAGS)

# Regions a phone number written without "+" is read in (numbers with "+" are read in any country):
# the US (the most common national format in the traffic kolm sees); one with a leading 0 (a trunk
# prefix) is read as British first.
PHONE_REGIONS = ("US",)
# Chosen on the validation half of benchmarks/data/pii_labelled.jsonl (benchmarks/redact.py --choose):
# VALID takes every number some plan could dial, POSSIBLE also takes bare lengths, and the GROUPING
# levels also require the digits to be grouped as the country writes them (they miss `4155550100`).
PHONE_LENIENCY = phonenumbers.Leniency.VALID

_CANDIDATES = re2.compile(
    r"(?P<email>[A-Za-z0-9][A-Za-z0-9._%+\-]*@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24})"
    r"|(?P<iban>\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,32})"
    r"|(?P<num>[+(]?[0-9][0-9()./ \-]{5,30}[0-9])"
)
_DIGITS = re.compile(r"\d+")
# Dates and clock times in the shapes people write them: never a phone number, whatever the digits.
_DATE_OR_TIME = re.compile(
    r"(?<!\d)(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{1,2}:\d{2}(?::\d{2})?)(?!\d)"
)
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# A bare digit string after one of these words is an identifier, not a phone number.
_ID_WORDS = re.compile(
    r"(?:order|invoice|inv|tracking|track|shipment|parcel|package|ref|reference|confirmation|booking|"
    r"ticket|case|account|acct|customer|member|policy|serial|sku|po|id|no|#)[\s.:#-]{0,3}$",
    re.IGNORECASE,
)
_SSN_WORDS = re.compile(r"(?:ssn|social security(?: number| no\.?)?)[\s.:#-]{0,4}$", re.IGNORECASE)
_CARD_PREFIXES = ("4", "34", "37", "36", "38", "30", "35", "6011", "64", "65", "62") + tuple(
    str(p) for p in [*range(51, 56), *range(2221, 2721)]
)
_SURROGATES = re.compile("([\ud800-\udfff]+)")


def _inside_token(text: str, s: int) -> bool:
    """Whether a digit run starting at `s` continues a token: a letter, digit or currency sign right before
    it, or a joiner ("-", "/", ".", "_") with one of those before that."""
    before = text[max(0, s - 2) : s]
    if before[-1:] and (before[-1].isalnum() or before[-1] in "_$€£¥#"):
        return True
    return len(before) == 2 and before[1] in "-/._" and (before[0].isalnum() or before[0] in "$€£¥")


def _ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def set_phone_leniency(leniency: int) -> None:
    """Use another phonenumbers leniency (benchmarks/redact.py compares them); forgets cached answers."""
    global PHONE_LENIENCY
    PHONE_LENIENCY = leniency
    _numbers_in.cache_clear()
    _phones_in.cache_clear()


def _kind(text: str, seq: list[tuple[int, int]]) -> str | None:
    """ "ssn", "card" or None for consecutive digit groups `seq` of `text` (one separator between each)."""
    seps = {text[a[1] : b[0]] for a, b in zip(seq, seq[1:], strict=False)}
    if len(seps) > 1 or (seps and not seps <= {" ", "-"}):
        return None
    lens = [b - a for a, b in seq]
    digits = "".join(text[a:b] for a, b in seq)
    if lens == [3, 2, 4] or (lens == [9] and _SSN_WORDS.search(text[max(0, seq[0][0] - 24) : seq[0][0]])):
        return "ssn" if _ssn_ok(digits[:3], digits[3:5], digits[5:]) else None
    if 13 <= len(digits) <= 19 and (len(seq) == 1 or lens[0] == 4) and digits.startswith(_CARD_PREFIXES):
        return "card" if luhn.is_valid(digits) else None
    return None


def _numbers(text: str, start: int, end: int) -> list[tuple[int, int, str]]:
    """SSNs, card numbers and phones in the candidate text[start:end] (what decides is the candidate, the
    24 characters before it and the one after: so the answer is cached on those)."""
    lo = max(0, start - 24)
    found = _numbers_in(text[lo:start], text[start:end], text[end : end + 1])
    return [(s + start, e + start, kind) for s, e, kind in found]


@functools.lru_cache(maxsize=8192)  # system prompts and templates repeat: each number is judged once
def _numbers_in(before: str, span: str, after: str) -> tuple[tuple[int, int, str], ...]:
    """SSNs and card numbers among the digit groups of `span` (longest run first), then phones in what is
    left; positions relative to `span`."""
    if _DATE_OR_TIME.fullmatch(span):
        return ()
    text, start, end = before + span + after, len(before), len(before) + len(span)
    groups = [m.span() for m in _DIGITS.finditer(text, start, end)]
    found: list[tuple[int, int, str]] = []
    i = 0
    while i < len(groups):
        for j in range(min(len(groups), i + 5), i, -1):
            kind = _kind(text, groups[i:j])
            if kind is not None:
                found.append((groups[i][0], groups[j - 1][1], kind))
                i = j
                break
        else:
            i += 1
    if not (len(found) == 1 and found[0][:2] == (groups[0][0], groups[-1][1])):  # else: one number, no phone
        for ps, pe in _phones(text, start, end):
            if not any(ps < fe and fs < pe for fs, fe, _ in found):
                found.append((ps, pe, "phone"))
    return tuple((s - start, e - start, kind) for s, e, kind in found)


def _phones(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Phone numbers phonenumbers finds in text[start:end] (a candidate with a little context)."""
    lo, hi = max(0, start - 1), min(len(text), end + 1)
    found = [(s + lo, e + lo) for s, e in _phones_in(text[lo:hi])]
    return [
        (s, e) for s, e in found if not (text[s:e].isdigit() and _ID_WORDS.search(text[max(0, s - 24) : s]))
    ]


@functools.lru_cache(maxsize=8192)  # system prompts and templates repeat: each number is parsed once
def _phones_in(window: str) -> tuple[tuple[int, int], ...]:
    digits = sum(ch.isdigit() for ch in window)
    if not 7 <= digits <= 17 or _DATE_OR_TIME.search(window):
        return ()  # no plan has numbers this short or long (E.164: at most 15 digits + a little slack)
    core = window.lstrip("( ")
    # "+": the number says its country. A leading 0 is a trunk prefix (UK and most of Europe); else the US.
    regions = (
        ("ZZ",) if "+" in window else (("GB", "US") if core[1:2] == "0" or core[:1] == "0" else PHONE_REGIONS)
    )
    for region in regions:
        found = tuple(
            (m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=PHONE_LENIENCY)
        )
        if found:
            return found
    return ()


def _iban_span(text: str, start: int, end: int) -> int | None:
    """The end of the longest valid IBAN starting at `start` (the shape may have eaten a next word)."""
    for stop in range(end, start + 14, -1):
        if text[stop - 1] == " ":
            continue
        if stop < len(text) and text[stop].isalnum() and stop != end:
            continue  # cut inside a word or group
        if _iban.is_valid(text[start:stop]):
            return stop
    return None


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every PII span in `text`, in order, non-overlapping."""
    spans: list[tuple[int, int, str]] = []
    for m in _CANDIDATES.finditer(text):
        kind, s, e = m.lastgroup, m.start(), m.end()
        if kind == "email":
            spans.append((s, e, "email"))
        elif kind == "iban":
            stop = _iban_span(text, s, e)
            if stop is not None:
                spans.append((s, stop, "iban"))
        else:
            if _inside_token(text, s) or _IPV4.fullmatch(text, s, e):
                continue  # part of a word, an id or an amount ("INV-2024-694202", "$1,234 567"), an address
            spans.extend(_numbers(text, s, e))
    spans.sort()
    out: list[tuple[int, int, str]] = []
    for span in spans:
        if not out or span[0] >= out[-1][1]:
            out.append(span)
    return out


def _redact(text: str) -> str:
    spans = find_pii(text)
    if not spans:
        return text
    parts, at = [], 0
    for s, e, kind in spans:
        parts.append(text[at:s])
        parts.append(TAGS[kind])
        at = e
    parts.append(text[at:])
    return "".join(parts)


def has_candidates(text: str) -> bool:
    """Whether one RE2 pass finds anything PII-shaped in `text` (False: nothing to redact)."""
    try:
        return _CANDIDATES.search(text) is not None
    except UnicodeEncodeError:
        return _CANDIDATES.search(_SURROGATES.sub("\ufffd", text)) is not None


def redact_pii(text: str) -> str:
    """`text` with every e-mail, phone, card number, IBAN and SSN replaced by its tag ([EMAIL] ...)."""
    if not text or not has_candidates(text):
        return text
    try:
        return _redact(text)
    except UnicodeEncodeError:  # RE2 works on UTF-8: redact the pieces between lone surrogates
        parts = _SURROGATES.split(text)
        return "".join(p if i % 2 else _redact(p) for i, p in enumerate(parts))


def _walk(value: Any) -> Any:
    if isinstance(value, str):
        return redact_pii(value)
    if isinstance(value, dict):
        return {k: _walk(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v) for v in value]
    return value


def redact_pii_json(value: Any) -> Any:
    """A JSON value with `redact_pii` applied to every string in it (keys kept). Never mutates `value`;
    returns it as it is when no string holds a candidate (one RE2 pass over the serialised value)."""
    if isinstance(value, str):
        return redact_pii(value)
    if not isinstance(value, (dict, list)):
        return value
    import json

    if not has_candidates(json.dumps(value, ensure_ascii=False)):
        return value
    return _walk(value)
