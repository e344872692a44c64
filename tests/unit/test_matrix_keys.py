"""
Tests for fedserver_matrix.keys: the specification's appendix vectors
(canonical JSON, JSON signing, event signing), Synapse's key file, old keys,
our server keys document, and the generate-signing-key command.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
from canonicaljson import encode_canonical_json
from signedjson.key import get_verify_key
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from unpaddedbase64 import encode_base64

from fedserver.cli import main
from fedserver.errors import ConfigError
from fedserver_matrix.keys import (
    KeyFormatError,
    OldVerifyKey,
    decode_base64,
    encode_signing_key_line,
    encode_verify_key,
    generate_signing_key,
    key_id_of,
    parse_signing_keys,
    read_signing_keys,
    server_keys_document,
    signing_key_from_seed,
    split_key_id,
    verify_key_from_base64,
    write_signing_keys,
)

# The appendix "Cryptographic Test Vectors": SIGNING_KEY_SEED, SERVER_NAME, KEY_ID.
# The last character of the seed has non-zero padding bits.
SIGNING_KEY_SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
SERVER_NAME = "domain"
KEY_ID = "ed25519:1"


@pytest.fixture
def spec_key():
    return signing_key_from_seed("1", SIGNING_KEY_SEED)


# the specification's appendix: canonical JSON


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("{}", "{}"),
        ('{\n    "one": 1,\n    "two": "Two"\n}', '{"one":1,"two":"Two"}'),
        ('{\n    "b": "2",\n    "a": "1"\n}', '{"a":"1","b":"2"}'),
        ('{"b":"2","a":"1"}', '{"a":"1","b":"2"}'),
        (
            """{
    "auth": {
        "success": true,
        "mxid": "@john.doe:example.com",
        "profile": {
            "display_name": "John Doe",
            "three_pids": [
                {
                    "medium": "email",
                    "address": "john.doe@example.org"
                },
                {
                    "medium": "msisdn",
                    "address": "123456789"
                }
            ]
        }
    }
}""",
            '{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":'
            '[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},'
            '"success":true}}',
        ),
        ('{\n    "a": "日本語"\n}', '{"a":"日本語"}'),
        ('{\n    "本": 2,\n    "日": 1\n}', '{"日":1,"本":2}'),
        ('{\n    "a": "\\u65E5"\n}', '{"a":"日"}'),
        ('{\n    "a": null\n}', '{"a":null}'),
    ],
)
def test_canonical_json_vectors(given, canonical):
    assert encode_canonical_json(json.loads(given)) == canonical.encode("utf-8")


def test_canonical_json_vector_with_negative_zero_and_exponent():
    # {"a": -0, "b": 1e10} -> {"a":0,"b":10000000000}: a JSON parser yields
    # -0 as the integer 0 and 1e10 as a float, which canonical JSON has as an integer
    value = json.loads('{\n    "a": -0,\n    "b": 1e10\n}')
    value["b"] = int(value["b"])
    assert encode_canonical_json(value) == b'{"a":0,"b":10000000000}'


# the specification's appendix: JSON signing


def test_signing_key_seed_with_nonzero_padding_bits_decodes(spec_key):
    assert key_id_of(spec_key) == KEY_ID
    # the same 32 bytes as the canonical encoding, whose padding bits are zero
    assert spec_key.encode() == decode_base64(SIGNING_KEY_SEED[:-1] + "0")
    assert len(spec_key.encode()) == 32


def test_json_signing_vector_empty_object(spec_key):
    assert sign_json({}, SERVER_NAME, spec_key) == {
        "signatures": {
            "domain": {
                "ed25519:1": "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
            }
        }
    }


def test_json_signing_vector_with_data(spec_key):
    assert sign_json({"one": 1, "two": "Two"}, SERVER_NAME, spec_key) == {
        "one": 1,
        "signatures": {
            "domain": {
                "ed25519:1": "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
            }
        },
        "two": "Two",
    }


def test_the_signing_vectors_verify(spec_key):
    signed = sign_json({"one": 1, "two": "Two"}, SERVER_NAME, spec_key)
    verify_signed_json(signed, SERVER_NAME, get_verify_key(spec_key))
    signed["two"] = "Three"
    with pytest.raises(SignatureVerifyException):
        verify_signed_json(signed, SERVER_NAME, get_verify_key(spec_key))


# the specification's appendix: event signing (room version 1 redaction,
# content hash), to check the primitives against the full vectors

_V1_KEPT = {"event_id", "type", "room_id", "sender", "state_key", "content", "hashes", "signatures", "depth",
            "prev_events", "prev_state", "auth_events", "origin", "origin_server_ts", "membership"}


def _sign_event(event, key):
    event = dict(event)
    hashed = {k: v for k, v in event.items() if k not in ("unsigned", "signatures", "hashes")}
    event["hashes"] = {"sha256": encode_base64(hashlib.sha256(encode_canonical_json(hashed)).digest())}
    redacted = {k: v for k, v in event.items() if k in _V1_KEPT}
    redacted["content"] = {}  # neither event type keeps content keys
    event["signatures"] = sign_json(redacted, SERVER_NAME, key)["signatures"]
    return event


def test_event_signing_vector_minimal_event(spec_key):
    event = {
        "room_id": "!x:domain",
        "sender": "@a:domain",
        "origin": "domain",
        "origin_server_ts": 1000000,
        "signatures": {},
        "hashes": {},
        "type": "X",
        "content": {},
        "prev_events": [],
        "auth_events": [],
        "depth": 3,
        "unsigned": {"age_ts": 1000000},
    }
    assert _sign_event(event, spec_key) == {
        "auth_events": [],
        "content": {},
        "depth": 3,
        "hashes": {"sha256": "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"},
        "origin": "domain",
        "origin_server_ts": 1000000,
        "prev_events": [],
        "room_id": "!x:domain",
        "sender": "@a:domain",
        "signatures": {
            "domain": {
                "ed25519:1": "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"
            }
        },
        "type": "X",
        "unsigned": {"age_ts": 1000000},
    }


def test_event_signing_vector_redactable_content(spec_key):
    event = {
        "content": {"body": "Here is the message content"},
        "event_id": "$0:domain",
        "origin": "domain",
        "origin_server_ts": 1000000,
        "type": "m.room.message",
        "room_id": "!r:domain",
        "sender": "@u:domain",
        "signatures": {},
        "unsigned": {"age_ts": 1000000},
    }
    assert _sign_event(event, spec_key) == {
        "content": {"body": "Here is the message content"},
        "event_id": "$0:domain",
        "hashes": {"sha256": "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"},
        "origin": "domain",
        "origin_server_ts": 1000000,
        "type": "m.room.message",
        "room_id": "!r:domain",
        "sender": "@u:domain",
        "signatures": {
            "domain": {
                "ed25519:1": "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn241eYHYMGCA5McEiVPdhzBA"
            }
        },
        "unsigned": {"age_ts": 1000000},
    }


# base64 and key ids


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", b""), ("Zg", b"f"), ("Zm8", b"fo"), ("Zm9v", b"foo"), ("Zm9vYg", b"foob"), ("Zm9vYmE", b"fooba"),
     ("Zm9vYmFy", b"foobar"), ("Zm8=", b"fo"), ("-_8", b"\xfb\xff"), ("+/8", b"\xfb\xff")],
)
def test_decode_base64_accepts_unpadded_padded_and_urlsafe(text, expected):
    assert decode_base64(text) == expected


@pytest.mark.parametrize("text", ["Zm9v!", "Zm 9v", "Zm9vY", "Zg===", "Z=g", "Zm9v\n"])
def test_decode_base64_refuses_what_is_not_base64(text):
    with pytest.raises(KeyFormatError, match="is not base64"):
        decode_base64(text)


def test_split_key_id():
    assert split_key_id("ed25519:a_Xy1") == ("ed25519", "a_Xy1")
    for bad in ("ed25519", "ed25519:", ":abc", "ed25519:a-b", "ed25519:a:b"):
        with pytest.raises(KeyFormatError, match="is not ALGORITHM:VERSION"):
            split_key_id(bad)


def test_verify_key_from_base64(spec_key):
    public = encode_verify_key(get_verify_key(spec_key))
    key = verify_key_from_base64("ed25519:1", public)
    assert key.encode() == get_verify_key(spec_key).encode()
    assert (key.alg, key.version) == ("ed25519", "1")
    with pytest.raises(KeyFormatError, match="not an ed25519 key"):
        verify_key_from_base64("curve25519:1", public)
    with pytest.raises(KeyFormatError, match="is 3 bytes, not 32"):
        verify_key_from_base64("ed25519:1", "Zm9v")


# the key file


def test_key_file_round_trip(tmp_path):
    keys = [generate_signing_key("first"), generate_signing_key()]
    path = tmp_path / "signing.key"
    write_signing_keys(str(path), keys)
    text = path.read_text()
    assert text.splitlines()[0].startswith("ed25519 first ")
    assert all(len(line.split()[2]) == 43 and not line.endswith("=") for line in text.splitlines())
    read = read_signing_keys(str(path))
    assert [key_id_of(k) for k in read] == [key_id_of(k) for k in keys]
    assert [k.encode() for k in read] == [k.encode() for k in keys]


def test_generated_versions_look_like_synapse_ones():
    version = generate_signing_key().version
    assert version.startswith("a_") and len(version) == 6 and version[2:].isalnum()
    with pytest.raises(KeyFormatError, match="letters, digits and _"):
        generate_signing_key("bad version")


def test_key_file_accepts_the_spec_seed_and_blank_lines(tmp_path, spec_key):
    path = tmp_path / "signing.key"
    path.write_text(f"\ned25519 1 {SIGNING_KEY_SEED}\n   \ned25519 a_b2 {SIGNING_KEY_SEED[:-1]}A\n")
    keys = read_signing_keys(str(path))
    assert [key_id_of(k) for k in keys] == ["ed25519:1", "ed25519:a_b2"]
    assert keys[0].encode() == spec_key.encode()
    # written back in the canonical form, with zero padding bits
    assert encode_signing_key_line(keys[0]) == f"ed25519 1 {SIGNING_KEY_SEED[:-1]}0\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("ed25519 1\n", r"line 1: expected 'ed25519 VERSION SEED' \(three fields\), found 2"),
        (f"ed25519 1 {SIGNING_KEY_SEED} extra\n", "line 1: expected .* found 4"),
        (f"\n\ncurve25519 1 {SIGNING_KEY_SEED}\n", "line 3: the algorithm 'curve25519' is not supported"),
        (f"ed25519 a-b {SIGNING_KEY_SEED}\n", "line 1: key version 'a-b' is not made of letters, digits and _"),
        ("ed25519 1 Zm9v!\n", r"line 1: the seed 'Zm9v!' is not base64"),
        ("ed25519 1 Zm9vYmFy\n", "line 1: the seed is 6 bytes, not 32"),
        (f"ed25519 1 {SIGNING_KEY_SEED}\ned25519 1 {SIGNING_KEY_SEED}\n",
         "line 2: the key version '1' is already on line 1"),
        ("\n  \n", "holds no signing key; make one with: fedserver generate-signing-key FILE"),
    ],
)
def test_bad_key_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "signing.key"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        read_signing_keys(str(path))
    assert str(path) in str(info.value)


def test_unreadable_key_files(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the signing key file .*missing.key: No such file"):
        read_signing_keys(str(tmp_path / "missing.key"))
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"ed25519 1 \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not a signing key file: it holds non-ASCII bytes"):
        read_signing_keys(str(binary))


def test_parse_names_the_source():
    with pytest.raises(ConfigError, match=r"^somewhere line 1: "):
        parse_signing_keys("ed25519\n", "somewhere")


def test_written_key_files_are_private_and_never_replaced(tmp_path):
    path = tmp_path / "signing.key"
    old_umask = os.umask(0)
    try:
        write_signing_keys(str(path), [generate_signing_key("one")])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    before = path.read_text()
    with pytest.raises(FileExistsError):
        write_signing_keys(str(path), [generate_signing_key("two")])
    assert path.read_text() == before


# the server keys document


def test_server_keys_document_is_signed_by_every_current_key(spec_key):
    second = generate_signing_key("second")
    old_key = generate_signing_key("old")
    old = OldVerifyKey.from_base64("ed25519:old", encode_verify_key(get_verify_key(old_key)), 1_600_000_000_000)
    document = server_keys_document("a.example:8448", [spec_key, second], 1_700_000_000_000, [old])
    assert document["server_name"] == "a.example:8448"
    assert document["valid_until_ts"] == 1_700_000_000_000
    assert document["verify_keys"] == {
        "ed25519:1": {"key": encode_verify_key(get_verify_key(spec_key))},
        "ed25519:second": {"key": encode_verify_key(get_verify_key(second))},
    }
    assert document["old_verify_keys"] == {
        "ed25519:old": {"key": encode_verify_key(get_verify_key(old_key)), "expired_ts": 1_600_000_000_000}
    }
    assert set(document["signatures"]["a.example:8448"]) == {"ed25519:1", "ed25519:second"}
    for key in (spec_key, second):
        verify_signed_json(document, "a.example:8448", get_verify_key(key))
    json.dumps(document)  # plain JSON


def test_server_keys_document_without_old_keys(spec_key):
    document = server_keys_document("domain", [spec_key], 5)
    assert document["old_verify_keys"] == {}
    verify_signed_json(document, "domain", get_verify_key(spec_key))


# fedserver generate-signing-key


def test_generate_signing_key_command(tmp_path, capsys):
    path = tmp_path / "signing.key"
    assert main(["generate-signing-key", str(path)]) == 0
    (key,) = read_signing_keys(str(path))
    assert capsys.readouterr().out == f"{path}: Matrix signing key {key_id_of(key)}\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_generate_signing_key_command_with_a_version(tmp_path, capsys):
    path = tmp_path / "signing.key"
    assert main(["generate-signing-key", "--key-version", "k1", str(path)]) == 0
    assert [key_id_of(k) for k in read_signing_keys(str(path))] == ["ed25519:k1"]


def test_generate_signing_key_command_never_overwrites(tmp_path, capsys):
    path = tmp_path / "signing.key"
    path.write_text("precious\n")
    assert main(["generate-signing-key", str(path)]) == 1
    assert "exists; a signing key is never overwritten" in capsys.readouterr().err
    assert path.read_text() == "precious\n"


def test_generate_signing_key_command_errors(tmp_path, capsys):
    assert main(["generate-signing-key", "--key-version", "no-dash", str(tmp_path / "k")]) == 2
    assert "--key-version: key version 'no-dash'" in capsys.readouterr().err
    assert main(["generate-signing-key", str(tmp_path / "no" / "such" / "dir" / "k")]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()
