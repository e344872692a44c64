"""
Labelled errors.

Every error that a peer or a local component sees is JSON::

    {"code": 403, "label": "validation-error", "message": "...",
     "data": {"type": "federation", "domain": "b.example", "path": "..."},
     "inner": {...}}

C{data} and C{inner} appear only when set.  Labels and codes follow
wire-server's federator (see docs/errors.md); a label's code is fixed in
L{LABELS} so that the same failure always looks the same to a peer.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

#: label -> HTTP status code.  The single source of truth for both.
LABELS: Mapping[str, int] = {
    # request shape
    "invalid-endpoint": 403,
    "unknown-component": 403,
    "no-origin-domain": 403,
    "invalid-json": 400,
    "request-too-large": 413,
    # authentication and origin
    "no-client-certificate": 403,
    "certificate-parse-error": 403,
    "authentication-failure": 403,
    "validation-error": 403,
    # authorization
    "federation-denied": 400,
    # discovery
    "invalid-domain": 422,
    "discovery-failure": 400,
    # talking to the remote backend
    "federation-connection-refused": 521,
    "federation-tls-error": 525,
    "federation-timeout": 504,
    "federation-remote-error": 533,
    "federation-not-available": 500,
    # [limits] max_outbound_per_destination and its queue are full
    "federation-overloaded": 503,
    # talking to a local component
    "component-unavailable": 502,
    # idempotency keys of inbound calls (fedserver.idempotency)
    "invalid-idempotency-key": 400,
    "idempotency-key-reused": 422,
    "request-in-progress": 409,
    # [limits] max_inbound_per_peer, inbound_rate_per_peer
    "too-many-requests": 429,
    # everything else; the message never carries a traceback
    "internal-error": 500,
}


class FederationError(Exception):
    """
    A failure with a label from L{LABELS}, shown to whoever made the request.

    @ivar label: the machine-readable label.
    @ivar code: the HTTP status code (from L{LABELS}).
    @ivar message: a sentence for a person: what happened, to which domain or
        key, and what to do next.
    @ivar data: optional context (domain, path) as in wire-server.
    @ivar inner: optional error of a remote backend, carried unchanged.
    @ivar headers: extra response headers for the answer (C{Retry-After}).
    """

    default_label = "internal-error"

    def __init__(
        self,
        message: str,
        label: Optional[str] = None,
        *,
        data: Optional[Mapping[str, Any]] = None,
        inner: Any = None,
        headers: Sequence[Tuple[str, str]] = (),
    ) -> None:
        label = label or self.default_label
        if label not in LABELS:
            raise ValueError(f"unknown error label {label!r}")
        super().__init__(message)
        self.label = label
        self.code = LABELS[label]
        self.message = message
        self.data = dict(data) if data else None
        self.inner = inner
        self.headers = list(headers)

    def to_json(self) -> Dict[str, Any]:
        """The error as the JSON object a peer or component receives."""
        body: Dict[str, Any] = {
            "code": self.code,
            "label": self.label,
            "message": self.message,
        }
        if self.data:
            body["data"] = self.data
        if self.inner is not None:
            body["inner"] = self.inner
        return body

    def to_bytes(self) -> bytes:
        """L{to_json}, encoded."""
        return json.dumps(self.to_json()).encode("utf-8")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}: {self.message}>"


class DiscoveryFailure(FederationError):
    """Discovery found no usable target (C{discovery-failure}, C{invalid-domain})."""

    default_label = "discovery-failure"


class AuthenticationFailure(FederationError):
    """The peer did not prove who it is (C{authentication-failure} and kin)."""

    default_label = "authentication-failure"


class FederationDenied(FederationError):
    """An authorizer refused the call (C{federation-denied})."""

    default_label = "federation-denied"


class ValidationError(FederationError):
    """The claimed origin domain is not served by the authenticated peer."""

    default_label = "validation-error"


class ConfigError(Exception):
    """
    A configuration problem, naming the file, the table and the key.

    Raised by L{fedserver.config} and by plugins validating their options;
    startup stops with its message and a non-zero exit.
    """

    def __init__(self, message: str, *, file: Optional[str] = None, path: str = "") -> None:
        self.file = file
        self.path = path
        self.reason = message
        where = ": ".join(p for p in (file, path) if p)
        super().__init__(f"{where}: {message}" if where else message)
