"""API keys, pure: their format, generation, hashing and scope checks (no I/O).

A key is `cem_<prefix>_<secret>`: `prefix` (8 of a-z0-9) is its public handle, shown in lists
and used to find its row; `secret` (43 of A-Za-z0-9, 256 bits) is known only to its holder.
The database keeps HMAC-SHA256(pepper, key), never the key. A slow hash (scrypt, argon2) buys
nothing for a 256-bit random secret, which no one can guess however fast each try is, and would
cost every request that misses the cache; it is the right tool for low-entropy passwords only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass

KEY_TAG = "cem"
PREFIX_LENGTH = 8
SECRET_LENGTH = 43  # 43 * log2(62) = 256.1 bits
PREFIX_ALPHABET = string.ascii_lowercase + string.digits
SECRET_ALPHABET = string.ascii_letters + string.digits
KEY_PATTERN = re.compile(rf"{KEY_TAG}_([a-z0-9]{{{PREFIX_LENGTH}}})_([A-Za-z0-9]{{{SECRET_LENGTH}}})")
KEY_FORMAT = f"{KEY_TAG}_<{PREFIX_LENGTH} of a-z0-9>_<{SECRET_LENGTH} of A-Za-z0-9>"

EVENTS_WRITE = "events:write"  # post events to ingest
SCORES_READ = "scores:read"  # every read of the query API
ALERTS_WRITE = "alerts:write"  # acknowledge and resolve alerts
ADMIN = "admin"  # every scope
SCOPES = (EVENTS_WRITE, SCORES_READ, ALERTS_WRITE, ADMIN)


class InvalidKey(ValueError):
    """The presented text is not an API key of this service."""


@dataclass(frozen=True)
class PresentedKey:
    prefix: str
    secret: str

    @property
    def text(self) -> str:
        return f"{KEY_TAG}_{self.prefix}_{self.secret}"


def generate_key() -> PresentedKey:
    return PresentedKey(
        prefix="".join(secrets.choice(PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH)),
        secret="".join(secrets.choice(SECRET_ALPHABET) for _ in range(SECRET_LENGTH)),
    )


def parse_key(text: str) -> PresentedKey:
    match = KEY_PATTERN.fullmatch(text)
    if match is None:
        raise InvalidKey(f"not an API key: the format is {KEY_FORMAT}")
    return PresentedKey(prefix=match.group(1), secret=match.group(2))


def hash_key(key: PresentedKey, pepper: bytes = b"") -> bytes:
    """HMAC-SHA256 of the whole key under the server's pepper (plain SHA-256 semantics without one)."""
    return hmac.new(pepper, key.text.encode(), hashlib.sha256).digest()


def key_matches(key: PresentedKey, stored_hash: bytes, pepper: bytes = b"") -> bool:
    return hmac.compare_digest(hash_key(key, pepper), stored_hash)


def display_key(prefix: str) -> str:
    """How a key is shown once created: its prefix, never its secret."""
    return f"{KEY_TAG}_{prefix}_…"


def parse_scopes(text: str | Iterable[str]) -> tuple[str, ...]:
    """Scopes from `a,b` or a list: known, de-duplicated, in the canonical order. Raises ValueError."""
    items = [item.strip() for item in (text.split(",") if isinstance(text, str) else text)]
    chosen = {item for item in items if item}
    unknown = sorted(chosen - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope '{unknown[0]}'; known scopes: {', '.join(SCOPES)}")
    if not chosen:
        raise ValueError(f"at least one scope is needed; known scopes: {', '.join(SCOPES)}")
    return tuple(scope for scope in SCOPES if scope in chosen)


def has_scope(granted: Iterable[str], required: str) -> bool:
    granted = set(granted)
    return ADMIN in granted or required in granted


def missing_scopes(granted: Iterable[str], required: Iterable[str]) -> list[str]:
    granted = tuple(granted)
    return [scope for scope in required if not has_scope(granted, scope)]
