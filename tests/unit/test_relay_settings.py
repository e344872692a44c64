"""
The C{[relay]} table (L{fedserver_relay.settings.read_settings}): a complete
configuration, the defaults, every error (each naming the file, the table
and the key), and the L{TrustPolicy} it describes.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest

from fedserver.errors import ConfigError
from fedserver_relay.fingerprint import format_fingerprint, short_id
from fedserver_relay.settings import (
    MIN_TOKEN_LENGTH,
    PeerEntry,
    RelaySettings,
    Room,
    TrustedEntry,
    TrustPolicy,
    read_settings,
)
from tests.unit.helpers import options_for
from tests.unit.relay_helpers import OURS, A, B, C, D

TOKEN = "t" * MIN_TOKEN_LENGTH


def settings(**values: Any) -> RelaySettings:
    table: Dict[str, Any] = {"listen": "tcp:7443", **values}
    options = options_for("relay", {k: v for k, v in table.items() if v is not None})
    result = read_settings(options, OURS)
    return result


def refused(key: str, match: str, **values: Any) -> ConfigError:
    """The error C{values} make, which must name C{key} (a table path and key, as in the message)."""
    with pytest.raises(ConfigError, match=match) as info:
        settings(**values)
    error = info.value
    assert error.file == "/etc/fedserver.toml"
    assert error.path == key, error
    assert str(error).startswith(f"/etc/fedserver.toml: {key}: ")
    return error


# a complete table, and the defaults


def test_a_complete_table():
    result = settings(
        udp="127.0.0.1:7443", participants="[::1]:7500", label="Relay 1", max_federation_hops=3,
        room_rate_limit=50,
        peers=[{"address": "192.0.2.7:7444", "fingerprint": format_fingerprint(A).upper(), "label": "Relay A"}],
        trusted=[{"fingerprint": B, "label": "Relay B", "delegate": True}, {"fingerprint": C}],
        rooms=[{"name": "standup", "token": TOKEN}, {"name": "retro", "token": TOKEN + "x"}],
    )
    assert result == RelaySettings(
        listen="tcp:7443", udp=("127.0.0.1", 7443), participants=("::1", 7500), label="Relay 1", max_hops=3,
        room_rate_limit=50,
        peers=(PeerEntry("192.0.2.7", 7444, A, "Relay A"),),
        trusted=(TrustedEntry(B, "Relay B", True), TrustedEntry(C, C[:16], False)),
        rooms=(Room("standup", TOKEN), Room("retro", TOKEN + "x")),
        udp_advertise_port=7443,
    )


def test_the_defaults():
    result = settings()
    assert (result.udp, result.participants, result.label, result.max_hops, result.room_rate_limit) == (
        None, None, OURS[:16], 2, 2000
    )
    assert result.peers == result.trusted == result.rooms == ()
    assert result.udp_advertise_port == 0


def test_empty_addresses_mean_none():
    result = settings(udp="", participants="")
    assert result.udp is None and result.participants is None


@pytest.mark.parametrize("key", ["udp", "participants"])
def test_an_address_is_a_string(key):
    refused(f"[relay] {key}", "must be a string", **{key: 7443})


def test_an_advertised_udp_port():
    assert settings(udp="0.0.0.0:7443", udp_advertise_port=17443).udp_advertise_port == 17443
    refused("[relay] udp_advertise_port", "set udp", udp_advertise_port=17443)
    refused("[relay] udp_advertise_port", "at most 65535", udp="0.0.0.0:7443", udp_advertise_port=65536)


def test_listen_is_required():
    with pytest.raises(ConfigError, match="is required") as info:
        read_settings(options_for("relay", {}), OURS)
    assert info.value.path == "[relay] listen"


# addresses


@pytest.mark.parametrize("value", [
    "127.0.0.1", "localhost:7443", "127.0.0.1:port", "127.0.0.1:0", "127.0.0.1:65536", ":7443", "300.1.1.1:80",
    "[::1]", "127.0.0.1:-1",
])
@pytest.mark.parametrize("key", ["udp", "participants"])
def test_a_bad_address(key, value):
    error = refused(f"[relay] {key}", "is not IP:PORT", **{key: value})
    assert repr(value) in error.reason


def test_a_bad_peer_address():
    refused("[relay.peers[0]] address", "is not IP:PORT", peers=[{"address": "relay.example:7444", "fingerprint": A}])


def test_a_peer_needs_an_address():
    refused("[relay.peers[0]] address", "is required", peers=[{"fingerprint": A}])


# fingerprints


@pytest.mark.parametrize("value", ["", "abc", A[:-2], A + "00", "sha256:" + A, " " + A, A.replace("a", "g")])
@pytest.mark.parametrize("table", ["peers", "trusted"])
def test_a_bad_fingerprint(table, value):
    entry = {"fingerprint": value, **({"address": "127.0.0.1:7444"} if table == "peers" else {})}
    refused(f"[relay.{table}[0]] fingerprint", "not a relay fingerprint|must not be empty", **{table: [entry]})


@pytest.mark.parametrize("table", ["peers", "trusted"])
def test_our_own_fingerprint_listed(table):
    entry = {"fingerprint": format_fingerprint(OURS), **({"address": "127.0.0.1:7444"} if table == "peers" else {})}
    refused(f"[relay.{table}[0]] fingerprint", "our own certificate's fingerprint", **{table: [entry]})


def test_two_relays_sharing_a_short_id():
    twin = OURS[:16] + "0" * 48
    assert short_id(twin) == short_id(OURS) and twin != OURS
    refused("[relay.trusted[0]] fingerprint", "short id", trusted=[{"fingerprint": twin}])
    other = A[:16] + "f" * 48
    refused("[relay.trusted[1]] fingerprint", f"with {A}", peers=[{"address": "127.0.0.1:7444", "fingerprint": A}],
            trusted=[{"fingerprint": B}, {"fingerprint": other}])


def test_a_relay_both_peer_and_trusted_is_fine():
    result = settings(peers=[{"address": "127.0.0.1:7444", "fingerprint": A}],
                      trusted=[{"fingerprint": A, "delegate": True}])
    assert result.peers[0].fingerprint == result.trusted[0].fingerprint == A


# rooms


def test_a_short_token():
    refused("[relay.rooms[0]] token", f"at least {MIN_TOKEN_LENGTH} characters", participants="127.0.0.1:7500",
            rooms=[{"name": "standup", "token": TOKEN[:-1]}])


def test_a_duplicate_room():
    refused("[relay.rooms[1]] name", "unique", participants="127.0.0.1:7500",
            rooms=[{"name": "standup", "token": TOKEN}, {"name": "standup", "token": TOKEN + "2"}])


@pytest.mark.parametrize("name, match", [("", "must not be empty"), ("x" * 256, "1 to 255 bytes")])
def test_a_bad_room_name(name, match):
    refused("[relay.rooms[0]] name", match, participants="127.0.0.1:7500", rooms=[{"name": name, "token": TOKEN}])


def test_rooms_without_participants():
    refused("[relay] rooms", "participants", rooms=[{"name": "standup", "token": TOKEN}])


# numbers and labels


@pytest.mark.parametrize("value, match", [(0, "at least 1"), (256, "at most 255"), ("2", "an integer"),
                                          (True, "an integer")])
def test_hops_out_of_range(value, match):
    refused("[relay] max_federation_hops", match, max_federation_hops=value)


@pytest.mark.parametrize("value, match", [(0, "at least 1"), (1_000_001, "at most 1000000")])
def test_rate_limit_out_of_range(value, match):
    refused("[relay] room_rate_limit", match, room_rate_limit=value)


@pytest.mark.parametrize("value, match", [("", "must not be empty"), ("é" * 65, "1 to 128 bytes")])
def test_a_bad_label(value, match):
    refused("[relay] label", match, label=value)


def test_a_bad_delegate():
    refused("[relay.trusted[0]] delegate", "true or false", trusted=[{"fingerprint": B, "delegate": "yes"}])


# unknown keys (those of [relay] itself are reported by the startup path, which reads every table)


@pytest.mark.parametrize("table, entry, unknown", [
    ("peers", {"address": "127.0.0.1:7444", "fingerprint": A, "delegate": True}, "delegate"),
    ("trusted", {"fingerprint": B, "address": "127.0.0.1:7444"}, "address"),
    ("rooms", {"name": "standup", "token": TOKEN, "password": "x"}, "password"),
])
def test_unknown_keys_in_entries(table, entry, unknown):
    refused(f"[relay.{table}[0]] {unknown}", "is not a known option here", participants="127.0.0.1:7500",
            **{table: [entry]})


def test_unknown_keys_of_the_table_are_left_unread():
    options = options_for("relay", {"listen": "tcp:7443", "max_hops": 3})
    read_settings(options, OURS)
    with pytest.raises(ConfigError, match="is not a known option here") as info:
        options.check_all_used()
    assert info.value.path == "[relay] max_hops"


# TrustPolicy


def test_the_trust_policy():
    policy = TrustPolicy(
        [PeerEntry("127.0.0.1", 7444, A, "Relay A")],
        [TrustedEntry(A, "another name", False), TrustedEntry(B, "Relay B", True), TrustedEntry(C, "", False)],
    )
    assert policy.known == {A, B, C}
    assert [policy.may_connect(fp) for fp in (A, B, C, D)] == [True, True, True, False]
    # a peer's label wins; an empty label and an unknown relay show 16 hex digits
    assert [policy.label(fp) for fp in (A, B, C, D)] == ["Relay A", "Relay B", C[:16], D[:16]]
    assert [policy.delegates(fp) for fp in (A, B, C, D)] == [False, True, False, False]
    assert [policy.directly_trusted(short_id(fp)) for fp in (A, B, C, D)] == [True, True, True, False]
    assert policy.fingerprint_of(short_id(B)) == B and policy.fingerprint_of(short_id(D)) is None


def test_delegation_from_any_trusted_entry_counts():
    policy = TrustPolicy([], [TrustedEntry(B, "one", True), TrustedEntry(B, "two", False)])
    assert policy.delegates(B) and policy.label(B) == "one"
    policy = TrustPolicy([], [TrustedEntry(B, "one", False), TrustedEntry(B, "two", True)])
    assert policy.delegates(B)


def test_a_peer_is_never_a_delegate():
    policy = TrustPolicy([PeerEntry("127.0.0.1", 7444, A, "Relay A")], [])
    assert policy.may_connect(A) and not policy.delegates(A)


def test_the_policy_of_a_checked_table():
    result = settings(peers=[{"address": "127.0.0.1:7444", "fingerprint": A, "label": "Relay A"}],
                      trusted=[{"fingerprint": B, "delegate": True}])
    policy = TrustPolicy(result.peers, result.trusted)
    assert policy.known == {A, B} and policy.delegates(B) and policy.label(B) == B[:16]


def test_a_relay_dialled_twice():
    refused("[relay.peers[1]] fingerprint", "already in", peers=[
        {"address": "127.0.0.1:7444", "fingerprint": A}, {"address": "[::1]:7444", "fingerprint": A.upper()},
    ])
