"""
The relay's configuration (the C{[relay]} table) and the trust policy it
describes.

    [relay]
    listen = "tcp:7443:interface=127.0.0.1"   # relay links (mutual TLS with [tls] certificate and key)
    udp = "127.0.0.1:7443"                    # protected frames between linked relays; "" = TLS stream only
    udp_advertise_port = 0                    # the UDP port linked relays send to, when not udp's (NAT, port
                                              # forwarding); 0 = udp's port
    participants = "127.0.0.1:7500"           # local participants (UDP); "" = none
    label = "Relay 1"
    max_federation_hops = 2                   # TTL of our frames; frames never travel further
    room_rate_limit = 2000                    # frames per second per room from all sources (burst: one second)
    link_rate_limit = 10000                   # frames per second from each relay link (burst: one second)

    [[relay.peers]]                           # we connect out, and trust
    address = "127.0.0.1:7444"
    fingerprint = "ab:cd:..."                 # SHA-256 of its certificate (DER); fedserver relay-fingerprint
    label = "Relay 2"

    [[relay.trusted]]                         # we accept its connections
    fingerprint = "..."
    label = "Relay 3"
    delegate = false                          # true: also accept what it forwards from relays it vouches for

    [[relay.rooms]]                           # rooms local participants may join
    name = "standup"
    token = "a secret of 16 characters or more"

A relay in neither C{peers} nor C{trusted} is refused during the TLS
handshake, and media it originates is dropped unless a peer trusted with
C{delegate = true} vouches for it.
"""

from __future__ import annotations

import ipaddress
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import attrs

from fedserver.config import Options
from fedserver_relay.fingerprint import SHORT_ID_SIZE, parse_fingerprint, short_id
from fedserver_relay.frames import MAX_TTL

#: a room token has at least this many characters
MIN_TOKEN_LENGTH = 16


@attrs.frozen
class PeerEntry:
    """A relay we connect to (C{[[relay.peers]]})."""

    host: str
    port: int
    fingerprint: str
    label: str


@attrs.frozen
class TrustedEntry:
    """A relay whose connections we accept (C{[[relay.trusted]]})."""

    fingerprint: str
    label: str
    delegate: bool


@attrs.frozen
class Room:
    """A room local participants may join, with its token."""

    name: str
    token: str


@attrs.frozen
class RelaySettings:
    """The C{[relay]} table, checked."""

    listen: str
    udp: Optional[Tuple[str, int]]
    participants: Optional[Tuple[str, int]]
    label: str
    max_hops: int
    room_rate_limit: int
    peers: Tuple[PeerEntry, ...]
    trusted: Tuple[TrustedEntry, ...]
    rooms: Tuple[Room, ...]
    #: the UDP port announced to linked relays in C{Hello} (C{udp}'s port unless C{udp_advertise_port} is set)
    udp_advertise_port: int = 0
    #: frames per second accepted from each relay link
    link_rate_limit: int = 10_000


class TrustPolicy:
    """
    Whom a relay talks to and whose media it accepts, from its C{peers} and
    C{trusted} entries.
    """

    def __init__(self, peers: Sequence[PeerEntry], trusted: Sequence[TrustedEntry]) -> None:
        self._labels: Dict[str, str] = {}
        for peer in peers:
            self._labels[peer.fingerprint] = peer.label
        self._delegates: Dict[str, bool] = {}
        for entry in trusted:
            self._labels.setdefault(entry.fingerprint, entry.label)
            self._delegates[entry.fingerprint] = self._delegates.get(entry.fingerprint, False) or entry.delegate
        self._by_short: Dict[bytes, str] = {short_id(fp): fp for fp in self._labels}

    @property
    def known(self) -> FrozenSet[str]:
        """Every fingerprint in C{peers} or C{trusted}."""
        return frozenset(self._labels)

    def may_connect(self, fingerprint: str) -> bool:
        """Whether a relay with this certificate fingerprint may hold a link with us."""
        return fingerprint in self._labels

    def label(self, fingerprint: str) -> str:
        """The configured label of C{fingerprint}, or its first 16 hex digits."""
        return self._labels.get(fingerprint) or fingerprint[:16]

    def delegates(self, fingerprint: str) -> bool:
        """Whether C{fingerprint} is trusted with C{delegate = true}."""
        return self._delegates.get(fingerprint, False)

    def directly_trusted(self, origin: bytes) -> bool:
        """Whether the short id C{origin} belongs to a relay in C{peers} or C{trusted}."""
        return origin in self._by_short

    def fingerprint_of(self, origin: bytes) -> Optional[str]:
        """The configured fingerprint with short id C{origin}, if any."""
        return self._by_short.get(origin)


def _address(options: Options, key: str, value: str) -> Tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise options.error(key, f"{value!r} is not IP:PORT (an IP address and a port, e.g. 127.0.0.1:7443)") from None
    if not sep or not 0 < number < 65536:
        raise options.error(key, f"{value!r} is not IP:PORT with a port from 1 to 65535")
    return host, number


def _optional_address(options: Options, key: str) -> Optional[Tuple[str, int]]:
    # "" is documented as "none", which get_str would refuse as an empty string
    value = options._get(key, "", (str,), "a string")
    return _address(options, key, value) if value else None


def _fingerprint(options: Options, own_fingerprint: str, shorts: Dict[bytes, str]) -> str:
    raw = options.get_str("fingerprint")
    try:
        fingerprint = parse_fingerprint(raw)
    except ValueError as e:
        raise options.error("fingerprint", str(e)) from None
    if fingerprint == own_fingerprint:
        raise options.error("fingerprint", "is our own certificate's fingerprint ([tls] certificate); "
                                           "list other relays")
    other = shorts.setdefault(short_id(fingerprint), fingerprint)
    if other != fingerprint:
        raise options.error("fingerprint", f"shares its first {SHORT_ID_SIZE} bytes (the short id frames carry) "
                                           f"with {other}: frames could not tell the two relays apart")
    return fingerprint


def read_settings(options: Options, own_fingerprint: str) -> RelaySettings:
    """Check the C{[relay]} table; errors name the file, table and key."""
    listen = options.get_str("listen")
    udp = _optional_address(options, "udp")
    advertise = options.get_int("udp_advertise_port", 0, minimum=0, maximum=65535)
    if advertise and udp is None:
        raise options.error("udp_advertise_port", "announces a UDP port: set udp = \"IP:PORT\" too")
    participants = _optional_address(options, "participants")
    label = options.get_str("label", own_fingerprint[:16])
    if not 1 <= len(label.encode("utf-8")) <= 128:
        raise options.error("label", "must have 1 to 128 bytes")
    max_hops = options.get_int("max_federation_hops", 2, minimum=1, maximum=MAX_TTL)
    rate = options.get_int("room_rate_limit", 2000, minimum=1, maximum=1_000_000)
    link_rate = options.get_int("link_rate_limit", 10_000, minimum=1, maximum=1_000_000)
    shorts: Dict[bytes, str] = {short_id(own_fingerprint): own_fingerprint}
    peers: List[PeerEntry] = []
    for entry in options.get_table_list("peers", []):
        host, port = _address(entry, "address", entry.get_str("address"))
        fp = _fingerprint(entry, own_fingerprint, shorts)
        if any(peer.fingerprint == fp for peer in peers):
            # two diallers to one relay would keep replacing each other's link
            raise entry.error("fingerprint", f"{fp[:16]}... is already in [[relay.peers]]; a relay is dialled "
                                             "at one address")
        peers.append(PeerEntry(host, port, fp, entry.get_str("label", fp[:16])))
        entry.check_all_used()
    trusted: List[TrustedEntry] = []
    for entry in options.get_table_list("trusted", []):
        fp = _fingerprint(entry, own_fingerprint, shorts)
        trusted.append(TrustedEntry(fp, entry.get_str("label", fp[:16]), entry.get_bool("delegate", False)))
        entry.check_all_used()
    rooms: List[Room] = []
    names = set()
    for entry in options.get_table_list("rooms", []):
        name = entry.get_str("name")
        if not 1 <= len(name.encode("utf-8")) <= 255 or name in names:
            raise entry.error("name", f"{name!r} must be 1 to 255 bytes and unique")
        token = entry.get_str("token")
        if len(token) < MIN_TOKEN_LENGTH:
            raise entry.error("token", f"must have at least {MIN_TOKEN_LENGTH} characters")
        names.add(name)
        rooms.append(Room(name, token))
        entry.check_all_used()
    if rooms and participants is None:
        raise options.error("rooms", "rooms are for local participants: set participants = \"IP:PORT\" too")
    return RelaySettings(
        listen=listen, udp=udp, participants=participants, label=label, max_hops=max_hops, room_rate_limit=rate,
        peers=tuple(peers), trusted=tuple(trusted), rooms=tuple(rooms),
        udp_advertise_port=advertise or (udp[1] if udp is not None else 0), link_rate_limit=link_rate,
    )
