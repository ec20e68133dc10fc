"""Where kolm keeps things and which secrets it uses. Read once per call, fail fast on bad values.

Environment:
    KOLM_HOME          state directory (default ~/.kolm, created 0700): observations.db, signing.key
    KOLM_STORE         observation store URL (default sqlite:///$KOLM_HOME/observations.db, files 0600;
                       or postgresql://user:password@host:5432/db)
    KOLM_SIGNING_KEY   HMAC key for .kolm artifacts, >= 16 bytes (else $KOLM_HOME/signing.key, created
                       0600 and atomically when an artifact is first signed; verifying never creates it)
    KOLM_SIGNING_KEY_FILE  an Ed25519 private key (`kolm signing generate`): where set, artifacts are
                       signed with it instead (kolm_ray/artifact/signing.py)
    KOLM_TRUSTED_KEYS  a .pub file, or a directory of them: the Ed25519 public keys verifying nodes accept
    KOLM_ADMIN_TOKEN   when set, the bridge API requires `Authorization: Bearer <token>`
    KOLM_CACHE         built models reused across runs (default $KOLM_HOME/cache): clustering's static
                       MiniLM vectors and MiniLM's ONNX export (kolm_ray/clustering/static.py)

Everything under KOLM_HOME is the user's alone: the store holds every prompt, the key signs artifacts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import tempfile
from pathlib import Path

from kolm_ray.errors import KolmError

_PLACEHOLDERS = {"", "changeme", "change-me", "secret", "xxx", "todo"}


MIN_KEY_BYTES = (
    16  # 128 bits: below that an HMAC key can be guessed; an empty key verifies anything it signed
)


def kolm_home() -> Path:
    """The state directory, created 0700 on first use (the default ~/.kolm is tightened to 0700 too)."""
    default = Path.home() / ".kolm"
    home = Path(os.environ.get("KOLM_HOME") or default).expanduser()
    try:
        home.mkdir(parents=True, mode=0o700)
        os.chmod(home, 0o700)  # mkdir's mode passes through the umask; say it exactly
    except FileExistsError:
        # ~/.kolm is kolm's own (earlier versions made it 0755): close it. A KOLM_HOME the user made, and
        # so may share on purpose, is left as it is.
        if home == default:
            _tighten(home, 0o700)
    except OSError as e:
        raise KolmError(f"cannot create KOLM_HOME {home}: {e.strerror or e}") from None
    return home


def _tighten(path: Path, mode: int) -> None:
    """chmod `path` to `mode` when it is ours and more open than that; never fails the caller."""
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o777 & ~mode:
            os.chmod(path, mode)
    except OSError:
        pass


def private_file(path: str | Path) -> Path:
    """Make sure `path` exists with mode 0600: created so (O_EXCL, whatever the umask), or tightened when it
    is ours. For files that hold prompts or secrets, before a library opens them: SQLite gives a database's
    -wal and -shm files the database's own mode, so they are 0600 too (existing ones are tightened here)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
            if p.exists():
                _tighten(p, 0o600)
    else:
        os.fchmod(fd, 0o600)
        os.close(fd)
    return path


def store_url(override: str | None = None) -> str:
    """The observation store URL: the --store flag, else KOLM_STORE, else SQLite in KOLM_HOME."""
    url = override or os.environ.get("KOLM_STORE")
    if not url:
        return f"sqlite:///{kolm_home() / 'observations.db'}"
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise KolmError(
            f"store URL {redact_url(url)!r} is not supported; use sqlite:///path/to/observations.db "
            "or postgresql://user:password@host:5432/db"
        )
    return url


_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/?#]*):(?P<pw>[^@/?#]*)@", re.I)
_PW_PARAM = re.compile(r"(?P<key>(?:^|[?&\s])password=)(?P<pw>[^&\s]*)", re.I)


def redact_url(url: str) -> str:
    """The URL with its password (userinfo or `password=` parameter) replaced by `***`."""
    url = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)
    return _PW_PARAM.sub(lambda m: f"{m['key']}***", url)


def secrets_of(url: str) -> list[str]:
    """The password strings a URL carries (to scrub from driver messages that might echo them)."""
    found = [m["pw"] for m in _USERINFO.finditer(url)] + [m["pw"] for m in _PW_PARAM.finditer(url)]
    from urllib.parse import unquote

    return [s for p in found if p for s in {p, unquote(p)}]


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


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1): a bind only this machine can reach."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in ("localhost", "localhost.")


def check_bind(host: str) -> None:
    """`kolm capture --host`: a bind other machines can reach needs KOLM_ADMIN_TOKEN, or anyone on the
    network could read every stored prompt through the bridge API (and write observations into it)."""
    if not is_loopback(host) and admin_token() is None:
        raise KolmError(
            f"--host {host} is reachable from other machines and the bridge API would be open: "
            "set KOLM_ADMIN_TOKEN (its bearer token) or bind 127.0.0.1"
        )


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def _home_key_path() -> Path:
    """$KOLM_HOME/signing.key, without creating KOLM_HOME (a node that only verifies writes nothing)."""
    return Path(os.environ.get("KOLM_HOME") or Path.home() / ".kolm").expanduser() / "signing.key"


def hmac_key() -> tuple[bytes, str] | None:
    """The HMAC key this node holds and its key_id, or None when none is configured. Never creates one.

    KOLM_SIGNING_KEY wins; otherwise $KOLM_HOME/signing.key when it exists. For verifying: a key made up on
    the spot could verify nothing anyone else signed, so a verifier without one says what to set instead.
    A key shorter than MIN_KEY_BYTES (an empty file, a 5-byte variable) is refused with exit 2, never used.
    """
    env = os.environ.get("KOLM_SIGNING_KEY")
    if env is not None:
        if env.strip().lower() in _PLACEHOLDERS:
            raise KolmError("KOLM_SIGNING_KEY is empty or a placeholder; set a real key or unset it")
        key = env.encode()
        if len(key) < MIN_KEY_BYTES:
            raise KolmError(
                f"KOLM_SIGNING_KEY is {len(key)} bytes; a signing key needs at least {MIN_KEY_BYTES} "
                "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return key, _key_id(key)
    path = _home_key_path()
    if not path.exists():
        return None
    key = _read_key(path)
    return key, _key_id(key)


def signing_key() -> tuple[bytes, str]:
    """The HMAC key to sign artifacts with and its key_id (first 16 hex chars of its sha256).

    KOLM_SIGNING_KEY wins; otherwise $KOLM_HOME/signing.key, created with mode 0600 on first use: only
    signing (pack) may create it, never verifying (hmac_key).
    """
    found = hmac_key()
    if found is not None:
        return found
    path = kolm_home() / "signing.key"
    _create_key(path)
    key = _read_key(path)
    return key, _key_id(key)


def _create_key(path: Path) -> None:
    """Write a new random key to `path` unless another process gets there first; both then use one key.

    The key is written and fsync'd in a private temporary file (mkstemp: O_EXCL, 0600), then hard-linked to
    its name: link(2) fails when the name exists, so exactly one creator wins and nobody ever reads a half
    written key (a rename would silently replace a key another process may already have signed with).
    """
    fd, tmp = tempfile.mkstemp(prefix=".signing.key.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won; _read_key reads its key
        except OSError:  # a filesystem without hard links: exclusive create, still never replaced
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            with os.fdopen(fd, "w") as f:
                f.write(Path(tmp).read_text())
                f.flush()
                os.fsync(f.fileno())
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new name survives a crash
        finally:
            os.close(dir_fd)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as e:
        raise KolmError(f"cannot read the signing key {path}: {e.strerror or e}") from None
    if len(key) < MIN_KEY_BYTES:
        what = "empty" if not key else f"{len(key)} bytes"
        raise KolmError(
            f"signing key {path} is {what}; a key needs at least {MIN_KEY_BYTES} bytes "
            "(remove the file and kolm makes a new one, or set KOLM_SIGNING_KEY)"
        )
    _tighten(path, 0o600)
    return key
