"""
The key server: C{GET /_matrix/key/v2/server} answers our keys document,
self-signed with every current key (see
L{fedserver_matrix.authenticator.MatrixSignatureAuthenticator.server_keys_json},
which signs it once per half validity period, so serving it costs no
signature).  Any other path under C{/_matrix/key/} is a Matrix 404.
"""

from __future__ import annotations

from typing import Any

from twisted.web import resource, server

from fedserver.errors import FederationError
from fedserver.values import Response
from fedserver.web import refuse, request_id_from, write_response
from fedserver_matrix.errors import matrix_error, matrix_response


class KeyServer(resource.Resource):
    """C{/_matrix/key/...}."""

    isLeaf = True

    def __init__(self, authenticator: Any) -> None:
        super().__init__()
        self.authenticator = authenticator

    def render_error(self, error: FederationError) -> Response:
        return matrix_error(error)

    def render_GET(self, request: server.Request) -> int:
        path = request.path.rstrip(b"/")
        # the key id in the path is deprecated: the whole document answers it too
        if path == b"/_matrix/key/v2/server" or path.startswith(b"/_matrix/key/v2/server/"):
            write_response(request, Response(200, [("Content-Type", "application/json")],
                                             self.authenticator.server_keys_json()))
            return server.NOT_DONE_YET
        return self._not_found(request)

    def render(self, request: server.Request) -> int:
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)
        if request.path.rstrip(b"/") == b"/_matrix/key/v2/server":
            write_response(request, matrix_response(405, "M_UNRECOGNIZED", "only GET is answered here"))
            return server.NOT_DONE_YET
        return self._not_found(request)

    @staticmethod
    def _not_found(request: server.Request) -> int:
        error = FederationError(f"{request.path.decode('latin-1')[:200]} is not served here", "invalid-endpoint")
        return refuse(request, error, request_id_from(request, b"request-id"), matrix_error)
