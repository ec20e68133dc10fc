"""Where kolm keeps things and which secrets it uses. Read once per call, fail fast on bad values.

Environment:
    KOLM_HOME          state directory (default ~/.kolm): observations.db, signing.key
    KOLM_STORE         observation store URL (default sqlite:///$KOLM_HOME/observations.db; or postgresql://...)
    KOLM_SIGNING_KEY   HMAC key for .kolm artifacts (else $KOLM_HOME/signing.key, created 0600)
    KOLM_ADMIN_TOKEN   when set, the bridge API requires `Authorization: Bearer <token>`
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from kolm_ray.errors import KolmError

_PLACEHOLDERS = {"", "changeme", "change-me", "secret", "xxx", "todo"}


def kolm_home() -> Path:
    """The state directory, created on first use."""
    home = Path(os.environ.get("KOLM_HOME") or Path.home() / ".kolm").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def store_url(override: str | None = None) -> str:
    """The observation store URL: the --store flag, else KOLM_STORE, else SQLite in KOLM_HOME."""
    url = override or os.environ.get("KOLM_STORE")
    if not url:
        return f"sqlite:///{kolm_home() / 'observations.db'}"
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        from kolm_ray.observations.store.base import redact_url

        raise KolmError(
            f"store URL {redact_url(url)!r} is not supported; use sqlite:///path/to/observations.db "
            "or postgresql://user:password@host:5432/db"
        )
    return url


def admin_token() -> str | None:
    """The bridge API's bearer token, or None when the API is open (local use)."""
    token = os.environ.get("KOLM_ADMIN_TOKEN")
    if token is None:
        return None
    if token.strip().lower() in _PLACEHOLDERS:
        raise KolmError(
            "KOLM_ADMIN_TOKEN is set to an empty or placeholder value; set a real token or unset it"
        )
    return token


def signing_key() -> tuple[bytes, str]:
    """The HMAC key for artifacts and its key_id (first 16 hex chars of its sha256).

    KOLM_SIGNING_KEY wins; otherwise $KOLM_HOME/signing.key, created with mode 0600 on first use.
    """
    env = os.environ.get("KOLM_SIGNING_KEY")
    if env is not None:
        if env.strip().lower() in _PLACEHOLDERS:
            raise KolmError("KOLM_SIGNING_KEY is empty or a placeholder; set a real key or unset it")
        key = env.encode()
    else:
        path = kolm_home() / "signing.key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        key = path.read_text().strip().encode()
    return key, hashlib.sha256(key).hexdigest()[:16]
