"""
Our Ed25519 signing keys: Synapse's key file, old keys, and the
self-signed server keys document of C{GET /_matrix/key/v2/server}.

The key file holds one key per line, as Synapse writes it::

    ed25519 a_Xy1z YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1

that is the algorithm, the key version (letters, digits and C{_}) and the
unpadded base64 of the 32-byte seed.  The key id is C{ed25519:VERSION}.  The
first key signs; every key in the file is published as current.  Blank lines
are allowed.  The seed is decoded leniently about the unused low bits of the
last base64 character (the specification's own test seed sets them), but
strictly about the alphabet and the length.

The key and signature formats are those of C{signedjson} and PyNaCl; this
module adds the file handling, the checks and the messages.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import string
from typing import Any, Dict, Iterable, List, Optional, Sequence

import attrs
import nacl.exceptions
import nacl.signing
from signedjson.key import decode_verify_key_bytes, encode_verify_key_base64, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey, VerifyKey

from fedserver.errors import ConfigError

ALGORITHM = "ed25519"
#: what a key version may be made of (the specification's C{[a-zA-Z0-9_]})
_VERSION = re.compile(r"[A-Za-z0-9_]+")
#: standard or URL-safe base64, without or with its padding
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
SEED_BYTES = 32


class KeyFormatError(ValueError):
    """A key, key id or base64 value that is not what Matrix expects."""


def decode_base64(text: str, what: str = "value") -> bytes:
    """
    Decode (un)padded standard or URL-safe base64, refusing any character
    outside the alphabet (Python's decoder would silently drop them) but
    accepting non-zero unused bits in the last character, as the
    specification's test seed needs.
    """
    if not _BASE64.fullmatch(text) or len(text.rstrip("=")) % 4 == 1:
        raise KeyFormatError(f"{what} {_shorten(text)!r} is not base64")
    stripped = text.rstrip("=")
    padded = stripped + "=" * (-len(stripped) % 4)
    try:
        return base64.b64decode(padded, altchars=b"-_")
    except (binascii.Error, ValueError) as e:  # pragma: no cover - the pattern already refused these
        raise KeyFormatError(f"{what} {_shorten(text)!r} is not base64: {e}") from None


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def key_id_of(key: Any) -> str:
    """C{ed25519:VERSION} of a signedjson signing or verify key."""
    return f"{key.alg}:{key.version}"


def split_key_id(key_id: str) -> tuple:
    """
    C{(algorithm, version)} of a key id; L{KeyFormatError} unless it is
    C{ALGORITHM:VERSION} with a version of letters, digits and C{_}.
    """
    algorithm, sep, version = key_id.partition(":")
    if not sep or not algorithm or not _VERSION.fullmatch(version):
        raise KeyFormatError(
            f"key id {_shorten(key_id)!r} is not ALGORITHM:VERSION with a version of letters, digits and _"
        )
    return algorithm, version


def signing_key_from_seed(version: str, seed_base64: str) -> SigningKey:
    """A signing key from its version and the base64 of its 32-byte seed."""
    if not _VERSION.fullmatch(version):
        raise KeyFormatError(f"key version {_shorten(version)!r} is not made of letters, digits and _")
    seed = decode_base64(seed_base64, "the seed")
    if len(seed) != SEED_BYTES:
        raise KeyFormatError(f"the seed is {len(seed)} bytes, not {SEED_BYTES}")
    key: Any = nacl.signing.SigningKey(seed)
    key.version = version
    key.alg = ALGORITHM
    return key


def verify_key_from_base64(key_id: str, key_base64: str) -> VerifyKey:
    """A verify key from its id (C{ed25519:VERSION}) and unpadded base64."""
    algorithm, _ = split_key_id(key_id)
    if algorithm != ALGORITHM:
        raise KeyFormatError(f"key id {_shorten(key_id)!r} is not an {ALGORITHM} key")
    raw = decode_base64(key_base64, f"the key {key_id}")
    if len(raw) != 32:
        raise KeyFormatError(f"the key {key_id} is {len(raw)} bytes, not 32")
    try:
        return decode_verify_key_bytes(key_id, raw)
    except (ValueError, nacl.exceptions.CryptoError) as e:  # pragma: no cover - 32 bytes always decode
        raise KeyFormatError(f"the key {key_id} is not usable: {e}") from None


def encode_verify_key(key: VerifyKey) -> str:
    """The unpadded base64 of a verify key."""
    return encode_verify_key_base64(key)


def generate_signing_key(version: Optional[str] = None) -> SigningKey:
    """
    A new random key; its version defaults to C{a_} and four random letters
    and digits, as Synapse names new keys.
    """
    if version is None:
        version = "a_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(4))
    if not _VERSION.fullmatch(version):
        raise KeyFormatError(f"key version {_shorten(version)!r} is not made of letters, digits and _")
    return signing_key_from_seed(version, base64.b64encode(secrets.token_bytes(SEED_BYTES)).decode())


def encode_signing_key_line(key: SigningKey) -> str:
    """One line of the key file (with its newline)."""
    seed = base64.b64encode(key.encode()).decode("ascii").rstrip("=")
    return f"{key.alg} {key.version} {seed}\n"


def parse_signing_keys(text: str, source: str) -> List[SigningKey]:
    """
    The keys of a key file's content.  A bad line raises L{ConfigError}
    naming C{source} and the line number; so does a file without keys or
    with a key version twice.
    """
    keys: List[SigningKey] = []
    seen: Dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{source} line {number}"
        if len(fields) != 3:
            raise ConfigError(
                f"{where}: expected 'ed25519 VERSION SEED' (three fields), found {len(fields)} field(s)"
            )
        algorithm, version, seed = fields
        if algorithm != ALGORITHM:
            raise ConfigError(f"{where}: the algorithm {_shorten(algorithm)!r} is not supported; only {ALGORITHM}")
        try:
            key = signing_key_from_seed(version, seed)
        except KeyFormatError as e:
            raise ConfigError(f"{where}: {e}") from None
        if version in seen:
            raise ConfigError(f"{where}: the key version {version!r} is already on line {seen[version]}")
        seen[version] = number
        keys.append(key)
    if not keys:
        raise ConfigError(f"{source} holds no signing key; make one with: fedserver generate-signing-key FILE")
    return keys


def read_signing_keys(path: str) -> List[SigningKey]:
    """
    The keys of the key file at C{path}, the signing key first.

    @raise ConfigError: the file cannot be read, or a line is bad (the
        message names the file and the line).
    """
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a signing key file: it holds non-ASCII bytes") from None
    except OSError as e:
        raise ConfigError(f"cannot read the signing key file {path}: {e.strerror}") from None
    return parse_signing_keys(text, path)


def write_signing_keys(path: str, keys: Iterable[SigningKey]) -> None:
    """
    Write C{keys} to a new file at C{path}, readable by its owner only
    (0600).  An existing file is never replaced: a key that was published
    must not be lost by accident (C{FileExistsError}).
    """
    data = "".join(encode_signing_key_line(key) for key in keys).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.frozen
class OldVerifyKey:
    """
    A key we no longer sign with, still published so that what it signed
    can be checked.

    @ivar expired_ts: when it stopped being used, in milliseconds since the epoch.
    """

    key_id: str
    verify_key: VerifyKey
    expired_ts: int

    @classmethod
    def from_base64(cls, key_id: str, key_base64: str, expired_ts: int) -> OldVerifyKey:
        return cls(key_id, verify_key_from_base64(key_id, key_base64), expired_ts)


def server_keys_document(
    server_name: str,
    signing_keys: Sequence[SigningKey],
    valid_until_ts: int,
    old_keys: Sequence[OldVerifyKey] = (),
) -> Dict[str, Any]:
    """
    The answer of C{GET /_matrix/key/v2/server}: C{server_name},
    C{valid_until_ts} (milliseconds), C{verify_keys} (every current key),
    C{old_verify_keys} (with C{expired_ts}), signed by every current key.
    """
    document: Dict[str, Any] = {
        "server_name": server_name,
        "valid_until_ts": int(valid_until_ts),
        "verify_keys": {
            key_id_of(key): {"key": encode_verify_key(get_verify_key(key))} for key in signing_keys
        },
        "old_verify_keys": {
            old.key_id: {"key": encode_verify_key(old.verify_key), "expired_ts": int(old.expired_ts)}
            for old in old_keys
        },
    }
    for key in signing_keys:
        sign_json(document, server_name, key)
    return document

