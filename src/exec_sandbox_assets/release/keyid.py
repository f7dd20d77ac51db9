"""Key ids without the crypto stack: what the cache's warm path checks records against.

A key id is the sha256 hex of the key's DER SubjectPublicKeyInfo (`keys.PublicKey`
computes it with `key_id_from_der` after `cryptography` re-encodes the key). A PEM
`PUBLIC KEY` block is the base64 of that same DER for every key written by cosign,
openssl or `keygen`, so `key_id_from_pem` gives the same id with base64 + hashlib only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

_PEM_RE = re.compile(
    rb"-----BEGIN PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END PUBLIC KEY-----"
)
# Key files are a few hundred bytes (same cap as `keys`).
_MAX_KEY_FILE = 64 * 1024


def key_id_from_der(der: bytes) -> str:
    """The id of a key given as DER SubjectPublicKeyInfo."""
    return hashlib.sha256(der).hexdigest()


def key_id_from_pem(data: bytes) -> str | None:
    """The id of the first `PUBLIC KEY` block of a PEM file, or None if there is none."""
    m = _PEM_RE.search(data)
    if m is None:
        return None
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key_id_from_der(der) if der else None


def key_ids_of_files(paths: Iterable[Path]) -> frozenset[str]:
    """Ids of the readable key files among `paths` (an unreadable one adds none: the
    cold path reports it when it loads the keys)."""
    ids = set()
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX_KEY_FILE)
        except OSError:
            continue
        if (key_id := key_id_from_pem(data)) is not None:
            ids.add(key_id)
    return frozenset(ids)


__all__ = ["key_id_from_der", "key_id_from_pem", "key_ids_of_files"]
