"""
Which addresses fedserver may connect to when DNS chose them.

A DNS answer is the remote operator's (or an attacker's) word; left alone it
could point federation at our own loopback, private network or cloud metadata
address.  Addresses that are not globally routable (private, loopback,
link-local, shared, documentation and other special ranges, and multicast)
are refused unless C{[outward] allow_ip_ranges} lists them.  Discovery checks
the addresses it resolved and hands on only those it checked, so a second,
different DNS answer (rebinding) cannot slip past.  Targets an operator
writes into configuration (C{static} discovery) are trusted as written.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, List, Sequence, Union

from fedserver.errors import ConfigError

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_networks(values: Iterable[str], key: str) -> List[Network]:
    """CIDR strings as networks; a bad one is a L{ConfigError} naming C{key}."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as e:
            raise ConfigError(f"{value!r} is not an IP network in CIDR form: {e}", path=key) from None
    return networks


class AddressPolicy:
    """
    @ivar allowed: networks allowed even though they are not global.
    """

    def __init__(self, allowed: Sequence[Network] = ()) -> None:
        self.allowed = list(allowed)

    def allows(self, address: str) -> bool:
        """Whether fedserver may connect to C{address} (an IP literal)."""
        ip: Address = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed):
            return True
        return ip.is_global and not ip.is_multicast

    def reason(self, address: str) -> str:
        """Why C{address} is refused, for messages."""
        return (
            f"{address} is not a public address; list its range in [outward] allow_ip_ranges "
            "to federate with it"
        )
