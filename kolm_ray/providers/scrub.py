"""Credential scrubbing for everything the capture proxy stores: request bodies, `input` and `output`.

    scrub_text("use my key sk-proj-abc...xyz")   # -> "use my key [redacted]"
    scrub_credentials({"api_key": "...", "messages": [...]})   # a copy: key fields dropped, keys redacted

Two rules. A field whose name's words say it holds a secret (`api_key`, `apiKeys`, `client_secret`,
`tokens`, `pwd`, `Authorization` ...; not `max_tokens` or `budget_tokens`, which count tokens) is
dropped unless it holds an object (a JSON schema's `{"token": {"type": "string"}}` is not a secret,
so objects are scrubbed like the rest). And every key-shaped substring anywhere (in any string, in
any text) is replaced with `[redacted]`: one compiled RE2 regex, run once over the serialised value
rather than once per string, so a 32 MiB body costs one linear C++ pass (~0.1 s) instead of a Python
call per string.
"""

from __future__ import annotations

import json
import re
from typing import Any

import re2

REDACTED = "[redacted]"

# Key families, in RE2 (google-re2): a linear-time DFA, ~0.1 s over 39 MiB where the same alternation
# in `re` takes ~0.8 s (measured; benchmarks/capture.py records the figure), and no catastrophic
# backtracking whatever a client sends. RE2 has no look-around, so the left-boundary check (no letter
# or digit right before a key) and Basic's "has a digit" check run in `_keep_or_redact`, on candidates only.
_KEY_RE = re2.compile(
    r"sk-[A-Za-z0-9_\-]{16,}"  # OpenAI (sk-, sk-proj-, sk-svcacct-), Anthropic (sk-ant-)
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{10,}"  # Stripe secret / restricted keys
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|xox[abeprs]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|AIza[0-9A-Za-z_\-]{30,}"  # Google API key
    r"|ya29\.[0-9A-Za-z_\-]{20,}"  # Google OAuth access token
    r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # a JWT (its header starts {")
    r"|[Bb]earer\s+[A-Za-z0-9._~+/\-]{6,}=*"  # an Authorization value pasted anywhere
    r"|Basic\s+[A-Za-z0-9+/]{8,}={0,2}"  # base64 user:pass
)
# JSON escapes that put a letter right before a key in serialised text (`"line\nsk-..."`): a key
# there still starts a word of the original string.
_ESCAPES = ("\\n", "\\t", "\\r", "\\b", "\\f", '\\"', "\\/", "\\\\")


def _keep_or_redact(m: re.Match[str]) -> str:
    s, i = m.string, m.start()
    key = m.group(0)
    if i and (s[i - 1].isalnum() or s[i - 1] == "_") and s[i - 2 : i] not in _ESCAPES:
        return key  # inside a word ("task-..."): not a key prefix
    if key.startswith("Basic") and not any(c.isdigit() or c in "+/=" for c in key[6:]):
        return key  # "Basic instructions": prose, not base64 (a real user:pass nearly always has one)
    return REDACTED


_SURROGATES = re.compile("([\ud800-\udfff]+)")


def scrub_text(text: str) -> str:
    """`text` with every key-shaped substring replaced by `[redacted]` (lone surrogates kept as they are)."""
    if not text:
        return text
    try:
        return _KEY_RE.sub(_keep_or_redact, text)
    except UnicodeEncodeError:  # RE2 works on UTF-8: scrub the pieces between lone surrogates
        parts = _SURROGATES.split(text)
        return "".join(p if i % 2 else _KEY_RE.sub(_keep_or_redact, p) for i, p in enumerate(parts))


def _words(name: str) -> list[str]:
    """A field name's words, lower-cased: `openai_api_key`, `apiKey`, `X-API-Key` -> [..., "api", "key"]."""
    return re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).lower())


# A field is a credential when its name's last word is one of these (`api_key`, `api_keys`, `github_token`,
# `apiKey`, `client_secret`, `Authorization`, `APIKEY`, `pwd` ...).
CREDENTIAL_WORDS = frozenset(
    "key keys token tokens secret secrets password passwords passwd pwd passphrase credential credentials"
    " authorization auth bearer cookie cookies apikey apikeys xapikey accesstoken refreshtoken idtoken"
    " sessiontoken authtoken secretkey privatekey clientsecret"
    " pat pats".split()
)
# `token(s)` after one of these words counts tokens (`max_tokens`, `budget_tokens`, `cached_tokens`).
_COUNTING = frozenset(
    "max min budget input output prompt completion total cached cache reasoning audio text image num n"
    " count stop special accepted rejected thinking creation read limit remaining used".split()
)
NOT_CREDENTIALS = frozenset({("prompt", "cache", "key")})  # OpenAI's cache-routing hint: a label, not a key


def is_credential_field(name: str) -> bool:
    """True when a field named `name` holds a secret, judged by the words of its name."""
    words = _words(name)
    if not words or words[-1] not in CREDENTIAL_WORDS or tuple(words[-3:]) in NOT_CREDENTIALS:
        return False
    if words[-1] in ("token", "tokens") and any(w in _COUNTING for w in words[:-1]):
        return False
    return True


# A cheap pre-check on serialised JSON: does any field name end in a credential-ish word? Only then is
# the (Python-speed) walk that drops fields needed; typical requests only hit it for `max_tokens`.
# RE2 finds where a name ends in such a word; the name's start is the quote before it.
_NAME_END_RE = re2.compile(
    r'(?i)(?:keys?|tokens?|secrets?|passw[a-z]*|pwd|credentials?|auth[a-z]*|bearer|cookies?|pats?)"\s*:'
)


def _names_with_credentials(text: str) -> bool:
    try:
        matches = list(_NAME_END_RE.finditer(text))
    except UnicodeEncodeError:  # lone surrogates: scan a copy with U+FFFD in their place (same indices)
        matches = list(_NAME_END_RE.finditer(_SURROGATES.sub(lambda m: "\ufffd" * len(m.group(0)), text)))
    for m in matches:
        end = m.group(0).index('"') + m.start()
        start = text.rfind('"', max(0, end - 200), end)
        if start >= 0 and is_credential_field(text[start + 1 : end]):
            return True
    return False


def _drop_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _drop_fields(v)
            for k, v in value.items()
            if isinstance(v, dict) or not is_credential_field(str(k))
        }
    if isinstance(value, list):
        return [_drop_fields(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """The store's serialisation (compact, non-ASCII kept): scrubbing works on exactly this text."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def scrub_credentials(value: Any) -> Any:
    """A JSON value without credentials (see the module docstring for the two rules).

    Never mutates `value`; returns `value` itself when there was nothing to scrub (no reparse).
    """
    if isinstance(value, str):
        return scrub_text(value)
    if not isinstance(value, (dict, list)):
        return value
    text = dumps(value)
    if _names_with_credentials(text):
        value = _drop_fields(value)
        text = dumps(value)
    scrubbed = scrub_text(text)
    return value if scrubbed == text else json.loads(scrubbed)
