"""Who may call the served API, and for what.

Two kinds of secret open ``/v1``:

- **API keys** the operator passes at start (``--api-key`` / ``--api-key-file``):
  every model the server has.
- **Scoped links** made in the studio's Share panel or by ``ftstudio share``:
  one model only, optionally expiring and limited to N requests, revocable,
  listed with their use count. The same token opens the embeddable chat page
  and works as an API key.

Links live in ``<work_dir>/.serve/credentials.json`` (mode 0600), shared by
the studio and any ``ftstudio serve`` on the same work directory. Only the
SHA-256 of each token is stored: tokens are 256 random bits, so a plain hash
cannot be reversed or guessed and needs no salt or slow KDF (those defend
low-entropy passwords). Hashes are compared with ``hmac.compare_digest``.
Every change is a read-modify-write under an ``flock`` on a lock file beside
the store, written as a temp file renamed into place, so counting a use is
one atomic check-and-increment across processes and readers never see half
a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

from backend.core.atomic import write_json
from backend.core.rundir import SERVE_STATE

log = logging.getLogger(__name__)

STORE_DIR = SERVE_STATE
STORE_FILE = "credentials.json"
LOCK_FILE = "credentials.lock"
TOKEN_PREFIX = "fts_"
ID_PREFIX = "lk_"
_VERSION = 1
_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                 429: "rate_limit_error"}


class AuthError(Exception):
    """A refused request: HTTP ``status``, OpenAI-style ``code`` and the ``message`` the caller sees."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    @property
    def type(self) -> str:
        """OpenAI's error ``type`` for this status."""
        return _STATUS_TYPES.get(self.status, "server_error")

    def __str__(self) -> str:
        return self.message


class StoreError(ValueError):
    """The credential store file cannot be read or is not ours; the message names the file."""


def model_not_found(name: str) -> AuthError:
    """The 404 for a model this caller cannot use: the same text whether the model does not
    exist or is outside the credential's scope, so a scoped key learns nothing."""
    return AuthError(404, "model_not_found", f"model {name} not found")


@dataclass(frozen=True)
class Scope:
    model: str | None       # None: every model; else the one model spec this credential may use
    credential: str | None  # the credential's id ('api-key' for a full key, None for open access)


@dataclass
class Credential:
    id: str
    kind: str
    model: str
    label: str
    created: float
    expires: float | None
    request_limit: int | None
    uses: int
    revoked: bool

    def state(self, now: float | None = None) -> str:
        """'active', 'expired', 'revoked' or 'used up' (revoked wins, then expired)."""
        now = time.time() if now is None else now
        if self.revoked:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        if self.request_limit is not None and self.uses >= self.request_limit:
            return "used up"
        return "active"

    def refusal(self, now: float | None = None) -> AuthError | None:
        """The error a request with this credential gets now, or None when it may go on."""
        state = self.state(now)
        if state == "revoked":
            return AuthError(401, "revoked_api_key", "this link was revoked")
        if state == "expired":
            return AuthError(401, "expired_api_key", f"this link expired at {format_time(self.expires)}")
        if state == "used up":
            return AuthError(429, "insufficient_quota", f"this link has used all its {self.request_limit} requests")
        return None


def format_time(epoch: float | None) -> str:
    return "never" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def new_token() -> str:
    """A fresh secret: 256 random bits, URL-safe (it travels in a URL fragment and a header)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | None) -> float | None:
    """'30m', '1h', '7d', '90s', '2w' -> seconds; 'never' (or '') -> None."""
    value = str(text or "").strip().lower()
    if value in ("", "never", "none"):
        return None
    match = _DURATION.match(value)
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
    if seconds <= 0:
        raise ValueError(f"expiry {text!r}: give a positive number with s, m, h, d or w (30m, 1h, 7d), or 'never'")
    return seconds


# --- the store ---------------------------------------------------------------------------

_FIELD_TYPES = {"id": str, "kind": str, "model": str, "label": str, "created": (int, float),
                "expires": (int, float, type(None)), "request_limit": (int, type(None)), "uses": int,
                "revoked": bool, "sha256": str}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CredentialStore:
    """Scoped links of one work directory (see the module docstring for the file and its locking)."""

    def __init__(self, work_dir: str | os.PathLike, *, clock: Callable[[], float] = time.time):
        self.dir = Path(work_dir).expanduser().absolute() / STORE_DIR
        self.path = self.dir / STORE_FILE
        self.clock = clock

    # reading ------------------------------------------------------------------------------

    def _load(self) -> list[dict]:
        """Every record as stored (with its hash); [] when there is no store yet."""
        if self.path.is_symlink():
            raise StoreError(f"{self.path}: a symbolic link, not the credential store; remove it")
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(f"{self.path}: cannot read the credential store ({e}); fix or remove it "
                             "(removing it ends every share link)") from None
        try:
            data = json.loads(text)
            return _check_records(data)
        except ValueError as e:
            raise StoreError(f"{self.path}: the credential store is damaged ({e}); fix or remove it "
                             "(removing it ends every share link)") from None

    def list(self) -> list[Credential]:
        return [_credential(r) for r in self._load()]

    def verify(self, token: str) -> Credential:
        """The credential of ``token`` if it may be used now; AuthError otherwise (401, or 429 used up)."""
        wanted = token_hash(token or "")
        found = None
        for record in self._load():  # compare with every record, found or not
            if hmac.compare_digest(record["sha256"], wanted):
                found = record
        if found is None:
            raise AuthError(401, "invalid_api_key", "invalid API key")
        cred = _credential(found)
        refusal = cred.refusal(self.clock())
        if refusal:
            raise refusal
        return cred

    # changing -----------------------------------------------------------------------------

    @contextmanager
    def _locked(self):
        """Exclusive flock on the lock file, then the records; whatever the body leaves in the
        list is written back atomically (temp file + rename, mode 0600)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            records = self._load()
            before = json.dumps(records, sort_keys=True)
            yield records
            if json.dumps(records, sort_keys=True) != before:
                write_json(self.path, {"version": _VERSION, "credentials": records})
        finally:
            os.close(fd)  # closing releases the lock

    def create(self, *, model: str, label: str = "", expires_in: float | None = None,
               request_limit: int | None = None) -> tuple[Credential, str]:
        """A new link for ``model``: (its record, the token, shown this once and never stored)."""
        model, label = str(model or "").strip(), str(label or "").strip()
        if not model:
            raise ValueError("model: give the model this link may chat with")
        if expires_in is not None and not expires_in > 0:
            raise ValueError(f"expiry {expires_in!r}: give a positive number of seconds, or none")
        if request_limit is not None and (isinstance(request_limit, bool) or not isinstance(request_limit, int)
                                          or request_limit < 1):
            raise ValueError(f"request limit {request_limit!r}: give a whole number of at least 1, or none")
        token, now = new_token(), self.clock()
        with self._locked() as records:
            taken = {r["id"] for r in records}
            cred_id = _new_id(taken)
            cred = Credential(cred_id, "link", model, label, now, None if expires_in is None else now + expires_in,
                              request_limit, 0, False)
            records.append({**asdict(cred), "sha256": token_hash(token)})
        return cred, token

    def revoke(self, cred_id: str) -> Credential:
        """Mark a link revoked (it stays listed); ValueError naming the id when there is none."""
        with self._locked() as records:
            record = _find(records, cred_id)
            record["revoked"] = True
            return _credential(record)

    def record_use(self, cred_id: str) -> Credential:
        """Count one request, only if the link may still be used (atomic across processes)."""
        with self._locked() as records:
            try:
                record = _find(records, cred_id)
            except ValueError:
                raise AuthError(401, "invalid_api_key", "invalid API key") from None
            refusal = _credential(record).refusal(self.clock())
            if refusal:
                raise refusal
            record["uses"] += 1
            return _credential(record)


def _new_id(taken: set[str]) -> str:
    while True:
        cred_id = ID_PREFIX + secrets.token_hex(4)
        if cred_id not in taken:
            return cred_id


def _find(records: list[dict], cred_id: str) -> dict:
    for record in records:
        if record["id"] == str(cred_id).strip():
            return record
    known = ", ".join(r["id"] for r in records) or "none yet"
    raise ValueError(f"no link with id {cred_id!r} (links: {known})")


def _credential(record: dict) -> Credential:
    return Credential(**{f.name: record[f.name] for f in fields(Credential)})


def _check_records(data) -> list[dict]:
    """The records of a parsed store file; ValueError saying what is wrong with it."""
    if not isinstance(data, dict) or not isinstance(data.get("credentials"), list):
        raise ValueError("expected an object with a 'credentials' list")
    if data.get("version") != _VERSION:
        raise ValueError(f"unknown version {data.get('version')!r}")
    records = data["credentials"]
    for n, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"entry {n} is not an object")
        for name, kind in _FIELD_TYPES.items():
            value = record.get(name)
            bad_bool = isinstance(value, bool) and kind is not bool
            if name not in record or not isinstance(value, kind) or bad_bool:
                raise ValueError(f"entry {n}: field {name!r} missing or of the wrong type")
        if not _SHA256.match(record["sha256"]):
            raise ValueError(f"entry {n}: 'sha256' is not a SHA-256 hex digest")
    return records


# --- deciding a request ------------------------------------------------------------------

class Authorizer:
    """One server's answer to 'who is this and what may they use?'.

    ``api_keys`` open every model. Stored links open their one model. With
    ``open_access`` (a local server without keys) a request without a token, or
    with one that is not a stored link (clients send placeholders like
    'EMPTY'), sees everything; a stored link's token still gets exactly that
    link's rights, so a revoked or expired link is refused there too.
    """

    def __init__(self, store: CredentialStore | None, api_keys: Sequence[str] = (), open_access: bool = False):
        self.store = store
        self._key_hashes = [token_hash(k) for k in api_keys if k]
        self.open_access = open_access

    def _is_api_key(self, token: str) -> bool:
        wanted = token_hash(token)
        matched = False
        for key_hash in self._key_hashes:  # no early exit
            matched |= hmac.compare_digest(key_hash, wanted)
        return matched

    def _stored(self, operation: str, arg: str) -> Credential:
        """``store.verify`` or ``store.record_use``; a broken store is the operator's to fix."""
        if self.store is None:
            raise AuthError(401, "invalid_api_key", "invalid API key")
        try:
            return getattr(self.store, operation)(arg)
        except StoreError as e:
            log.error("%s", e)  # the operator reads the file name; the caller only learns it failed
            raise AuthError(500, "server_error", "the server cannot read its credential store") from None

    def authorize(self, token: str | None, model: str | None = None, use: bool = False) -> Scope:
        token = (token or "").strip()
        if not token:
            if self.open_access:
                return Scope(None, None)
            raise AuthError(401, "missing_api_key", "missing API key: send Authorization: Bearer <key>")
        if self._is_api_key(token):
            return Scope(None, "api-key")
        try:
            cred = self._stored("verify", token)
        except AuthError as e:
            if self.open_access and e.code == "invalid_api_key":
                return Scope(None, None)
            raise
        if model is not None and model != cred.model:
            raise model_not_found(model)
        if use:
            self._stored("record_use", cred.id)
        return Scope(cred.model, cred.id)


def read_api_key(value: str | None, file: str | None) -> list[str]:
    """The keys of ``--api-key KEY`` or ``--api-key-file F`` (one key a line, '#' comments); [] for neither."""
    if value is not None and file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if value is not None:
        key = value.strip()
        if not key or any(c.isspace() for c in key):
            raise ValueError("--api-key: give a key without spaces")
        return [key]
    if file is None:
        return []
    try:
        text = Path(file).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--api-key-file {file}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {file}: cannot read it ({e})") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {file}: holds no key (one key a line)")
    if any(any(c.isspace() for c in k) for k in keys):
        raise ValueError(f"--api-key-file {file}: a key contains spaces (one key a line)")
    return keys
