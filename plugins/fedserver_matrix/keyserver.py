"""
The key server, on the inward listener, unauthenticated:

 - C{GET /_matrix/key/v2/server} answers our keys document, self-signed
   with every current key (see
   L{fedserver_matrix.authenticator.MatrixSignatureAuthenticator.server_keys_json},
   which signs it once per half validity period, so serving it costs no
   signature);
 - the notary, C{POST /_matrix/key/v2/query} with
   C{{"server_keys": {SERVER: {KEY_ID: {"minimum_valid_until_ts": MS}}}}}
   (no key ids: every key of the server) and
   C{GET /_matrix/key/v2/query/{serverName}[?minimum_valid_until_ts=MS]},
   answers C{{"server_keys": [...]}}: each server's keys document as that
   server signed it, with our signature added by every current key of ours.
   The keys come from the authenticator's keyring, which fetches (and
   stores) them when what it has is not valid until the
   C{minimum_valid_until_ts} asked for (by default now).  A server whose
   keys cannot be fetched is answered with what was fetched before, even if
   expired, as the specification says; one of which nothing is known is left
   out of the list.  Our own server name answers our own document.  A query
   names at most L{MAX_SERVERS} servers and L{MAX_KEY_IDS} key ids in all,
   in at most L{MAX_QUERY_BYTES} bytes.

Any other path under C{/_matrix/key/} is a Matrix 404; another method on
one of these paths a Matrix 405.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

from canonicaljson import encode_canonical_json
from signedjson.sign import sign_json
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import resource, server

from fedserver.errors import FederationError
from fedserver.values import Response
from fedserver.web import body_of, refuse, request_id_from, serve, write_response
from fedserver_matrix.errors import MatrixRefusal, matrix_error, matrix_response
from fedserver_matrix.keyring import ServerKey
from fedserver_matrix.xmatrix import is_server_name

log = Logger(namespace="fedserver.matrix.keyserver")

SERVER_PATH = b"/_matrix/key/v2/server"
QUERY_PATH = b"/_matrix/key/v2/query"

#: the most servers one notary query may name
MAX_SERVERS = 100
#: the most key ids one notary query may name, over all its servers
MAX_KEY_IDS = 100
#: the largest notary query body, in bytes (the listener's own limit applies too)
MAX_QUERY_BYTES = 64 * 1024


class NotaryQueryError(MatrixRefusal):
    """A notary query that is refused, with its Matrix error code and status."""


#: one server's part of a query: the key ids asked for (none: all), and until when they must be valid (ms)
Criteria = Tuple[List[str], int]


def _timestamp(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_query(body: bytes, now_ms: int) -> Dict[str, Criteria]:
    """
    The criteria of a C{POST /_matrix/key/v2/query} body, per server name.
    A key's C{minimum_valid_until_ts} defaults to C{now_ms}; a server's is
    the latest of its keys'.

    @raise NotaryQueryError: the body is not JSON (C{M_NOT_JSON}), not of
        the expected shape (C{M_BAD_JSON}), or names too many servers or
        keys (C{M_TOO_LARGE}, 413).
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise NotaryQueryError("the query is not JSON", "M_NOT_JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("server_keys"), dict):
        raise NotaryQueryError('the query must be an object with a "server_keys" object')
    servers = document["server_keys"]
    if len(servers) > MAX_SERVERS:
        raise NotaryQueryError(f"the query names {len(servers)} servers, more than the limit of {MAX_SERVERS}",
                               "M_TOO_LARGE", 413)
    criteria: Dict[str, Criteria] = {}
    count = 0
    for server_name, keys in servers.items():
        where = f"server_keys.{server_name[:100]!r}"
        if not isinstance(keys, dict):
            raise NotaryQueryError(f"{where} must be an object of key ids")
        count += len(keys)
        if count > MAX_KEY_IDS:
            raise NotaryQueryError(f"the query names more than the limit of {MAX_KEY_IDS} key ids",
                                   "M_TOO_LARGE", 413)
        minimum = now_ms
        for key_id, criterion in keys.items():
            if not isinstance(criterion, dict):
                raise NotaryQueryError(f"{where}.{key_id[:100]!r} must be an object")
            if "minimum_valid_until_ts" in criterion:
                ts = _timestamp(criterion["minimum_valid_until_ts"])
                if ts is None:
                    raise NotaryQueryError(
                        f"{where}.{key_id[:100]!r}.minimum_valid_until_ts must be a non-negative integer"
                    )
                minimum = max(minimum, ts)
        criteria[server_name] = (list(keys), minimum)
    return criteria


def _as_signed_by(server_name: str, response: Any) -> Dict[str, Any]:
    """A copy of a keys document with only the signatures of C{server_name} (not a notary's it came through)."""
    document = dict(response)
    signatures = response.get("signatures", {})
    document["signatures"] = {server_name: dict(signatures.get(server_name, {}))}
    return document


class KeyServer(resource.Resource):
    """
    C{/_matrix/key/...}.

    @param authenticator: the C{matrix-signature} authenticator: its
        C{server_name}, C{signing_keys}, C{server_keys_json()} and
        C{keyring} (without a keyring, the notary knows only our own keys).
    """

    isLeaf = True

    def __init__(self, authenticator: Any) -> None:
        super().__init__()
        self.authenticator = authenticator

    def render_error(self, error: FederationError) -> Response:
        return matrix_error(error)

    def render(self, request: server.Request) -> int:
        path = request.path.rstrip(b"/")
        method = request.method
        # the key id in the path is deprecated: the whole document answers it too
        if path == SERVER_PATH or path.startswith(SERVER_PATH + b"/"):
            if method in (b"GET", b"HEAD"):
                write_response(request, Response(200, [("Content-Type", "application/json")],
                                                 self.authenticator.server_keys_json()))
                return server.NOT_DONE_YET
            return self._not_allowed(request, "GET")
        if path == QUERY_PATH:
            if method == b"POST":
                return self._query(request, self._post_criteria)
            return self._not_allowed(request, "POST")
        if path.startswith(QUERY_PATH + b"/"):
            if method in (b"GET", b"HEAD"):
                return self._query(request, self._get_criteria)
            return self._not_allowed(request, "GET")
        return self._not_found(request)

    # the notary

    def _now_ms(self) -> int:
        keyring = getattr(self.authenticator, "keyring", None)
        return int(keyring.now_ms()) if keyring is not None else int(time.time() * 1000)

    def _post_criteria(self, request: server.Request) -> Dict[str, Criteria]:
        return parse_query(body_of(request, MAX_QUERY_BYTES), self._now_ms())

    def _get_criteria(self, request: server.Request) -> Dict[str, Criteria]:
        # /_matrix/key/v2/query/{serverName}, or the deprecated .../{serverName}/{keyId}
        rest = request.path.rstrip(b"/")[len(QUERY_PATH) + 1:].split(b"/")
        if len(rest) > 2:
            raise FederationError(f"{request.path.decode('latin-1')[:200]} is not served here", "invalid-endpoint")
        server_name = urllib.parse.unquote(rest[0].decode("latin-1"))
        key_ids = [urllib.parse.unquote(rest[1].decode("latin-1"))] if len(rest) == 2 else []
        minimum = self._now_ms()
        args: Dict[bytes, List[bytes]] = request.args or {}
        values = args.get(b"minimum_valid_until_ts")
        if values:
            text = values[0].decode("latin-1")
            sane = len(values) == 1 and 0 < len(text) <= 20 and text.isascii() and text.isdigit()
            ts = int(text) if sane else None
            if ts is None:
                raise NotaryQueryError("minimum_valid_until_ts must be one non-negative integer", "M_INVALID_PARAM")
            minimum = max(minimum, ts)
        return {server_name: (key_ids, minimum)}

    def _query(self, request: server.Request, criteria_of: Any) -> int:
        request_id = request_id_from(request, b"request-id")
        try:
            criteria = criteria_of(request)
        except FederationError as e:
            return refuse(request, e, request_id, matrix_error)
        return serve(
            request, lambda: Deferred.fromCoroutine(self._answer(criteria)),
            describe=f"matrix key query for {len(criteria)} server(s)", request_id=request_id,
            only=("content-type",), render_error=matrix_error,
        )

    async def _answer(self, criteria: Dict[str, Criteria]) -> Response:
        names = list(criteria)
        found = await defer.gatherResults(
            [Deferred.fromCoroutine(self._documents_of(name, *criteria[name])) for name in names],
            consumeErrors=True,
        )
        documents = [document for server_documents in found for document in server_documents]
        body = encode_canonical_json({"server_keys": documents})
        return Response(200, [("Content-Type", "application/json")], body)

    async def _documents_of(self, server_name: str, key_ids: List[str], minimum: int) -> List[Dict[str, Any]]:
        """The keys documents of C{server_name} we answer with, signed by us; none when nothing is known."""
        if server_name == self.authenticator.server_name:
            return [json.loads(self.authenticator.server_keys_json())]
        keyring = getattr(self.authenticator, "keyring", None)
        if keyring is None or not is_server_name(server_name):
            return []
        try:
            known: Dict[str, ServerKey] = await keyring.keys_for_notary(server_name, key_ids, minimum)
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("looking up the keys of {server} for a notary query failed", server=server_name)
            return []
        chosen = [known[key_id] for key_id in key_ids if key_id in known] if key_ids else list(known.values())
        if not chosen and known:
            # none of the keys asked for: the newest document says which keys the server has
            chosen = [max(known.values(), key=lambda k: k.fetched_ts)]
        documents: Dict[bytes, Dict[str, Any]] = {}
        for key in sorted(chosen, key=lambda k: k.fetched_ts, reverse=True):
            document = _as_signed_by(server_name, key.response)
            documents.setdefault(encode_canonical_json(document), document)
        return [self._countersigned(document) for document in documents.values()]

    def _countersigned(self, document: Dict[str, Any]) -> Dict[str, Any]:
        """C{document} signed by us too, with every current key."""
        for key in self.authenticator.signing_keys:
            sign_json(document, self.authenticator.server_name, key)
        return document

    # refusals

    @staticmethod
    def _not_allowed(request: server.Request, allowed: str) -> int:
        write_response(request, matrix_response(405, "M_UNRECOGNIZED", f"only {allowed} is answered here"))
        return server.NOT_DONE_YET

    @staticmethod
    def _not_found(request: server.Request) -> int:
        error = FederationError(f"{request.path.decode('latin-1')[:200]} is not served here", "invalid-endpoint")
        return refuse(request, error, request_id_from(request, b"request-id"), matrix_error)
