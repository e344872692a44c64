"""
Relay federation with delegated trust: media relays that link to each other
over mutual TLS and forward room media between them.

A relay's identity is the SHA-256 fingerprint of its TLS certificate, taken
from the verified handshake, never from anything the peer asserts
(L{fedserver_relay.fingerprint}).  Linked relays exchange versioned,
length-prefixed control messages on the TLS stream
(L{fedserver_relay.control}): the hello, the trust chain a forwarder vouches
for, room subscriptions, keepalives, and media when UDP is blocked.  Media
travels in one versioned frame carrying the room hash, the origin relay, a
TTL and a packet id (L{fedserver_relay.frames}), sealed for UDP with keys
exported from the TLS link (L{fedserver_relay.datagram}).

The modules named above are pure: no I/O, no reactor, no clock but one passed
in.  The links and the mesh that use them live elsewhere in this package.
"""
