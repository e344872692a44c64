"""
Matrix's error format: C{{"errcode": "M_...", "error": "..."}}.

Every labelled fedserver error becomes the Matrix error a Matrix peer (or a
homeserver behind fedserver) expects; the label stays in C{fedserver_label}.
An error may carry its own C{errcode} and C{matrix_status} (the X-Matrix
authenticator's failures do).
"""

from __future__ import annotations

import json
from typing import Dict, Sequence, Tuple

from fedserver.errors import FederationError
from fedserver.values import Response

#: label -> (status, errcode)
ERRCODES: Dict[str, Tuple[int, str]] = {
    "request-too-large": (413, "M_TOO_LARGE"),
    "invalid-json": (400, "M_NOT_JSON"),
    "authentication-failure": (401, "M_UNAUTHORIZED"),
    "validation-error": (401, "M_UNAUTHORIZED"),
    "federation-denied": (403, "M_FORBIDDEN"),
    "invalid-endpoint": (404, "M_UNRECOGNIZED"),
    "unknown-component": (404, "M_UNRECOGNIZED"),
    "too-many-requests": (429, "M_LIMIT_EXCEEDED"),
}


class MatrixRefusal(FederationError):
    """
    A refusal a Matrix route raises with its own Matrix error code and
    status, which L{matrix_error} answers (the label stays for fedserver's
    logs and metrics).
    """

    def __init__(self, message: str, errcode: str = "M_BAD_JSON", status: int = 400,
                 label: str = "invalid-json") -> None:
        super().__init__(message, label)
        self.errcode = errcode
        self.matrix_status = status


def matrix_response(status: int, errcode: str, message: str, *, headers: Sequence[Tuple[str, str]] = (),
                    **extra: object) -> Response:
    """A Matrix error answer, with C{headers} beside its Content-Type."""
    body = {"errcode": errcode, "error": message, **extra}
    return Response(status, [("Content-Type", "application/json"), *headers], json.dumps(body).encode())


def matrix_error(error: FederationError) -> Response:
    """
    C{error} as the Matrix error answer, with the error's headers; a
    C{Retry-After} is also given as C{retry_after_ms}, as Matrix clients
    and servers read it.
    """
    status, errcode = ERRCODES.get(error.label, (error.code, "M_UNKNOWN"))
    status = getattr(error, "matrix_status", None) or status
    errcode = getattr(error, "errcode", None) or errcode
    extra: Dict[str, object] = {"fedserver_label": error.label}
    for name, value in error.headers:
        if name.lower() == "retry-after" and value.isascii() and value.isdigit():
            extra["retry_after_ms"] = int(value) * 1000
    return matrix_response(status, errcode, error.message, headers=error.headers, **extra)
