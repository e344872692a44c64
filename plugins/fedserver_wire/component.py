"""
What the reference brig and galley share as federated components: a
dispatch from the RPC name to a method, the JSON body decoded, and refusals
answered as labelled JSON rather than raised.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Awaitable, Callable, Coroutine, Dict, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from fedserver.values import FederatedCall, Response
from fedserver_wire.checks import WireError, json_response, parse_json

log = Logger(namespace="fedserver_wire")

P = ParamSpec("P")
T = TypeVar("T")


def deferred(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """Make an C{async def} return a L{Deferred}, as Twisted APIs do."""

    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(method(*args, **kwargs))

    return run


#: an RPC implementation: C{(call, decoded body) -> JSON answer}
RPC = Callable[[FederatedCall, Any], Awaitable[Any]]


class RPCComponent(metaclass=abc.ABCMeta):
    """
    Answers federated calls by RPC name (C{rpcs}).  A L{WireError} becomes
    its JSON answer with its status; a L{fedserver.errors.FederationError}
    is left to the pipeline, which answers it labelled; anything else is a
    bug, which the pipeline logs and answers as C{internal-error} without
    a traceback.

    @ivar name: the component name (C{brig}, C{galley}), for messages.
    """

    name: str

    @abc.abstractmethod
    def rpcs(self) -> Dict[str, RPC]:
        """The RPCs this component answers, by name."""

    def handle(self, call: FederatedCall) -> Deferred[Response]:
        """Answer C{call} (L{fedserver.interfaces.IComponentHandler})."""
        return Deferred.fromCoroutine(self._handle(call))

    async def _handle(self, call: FederatedCall) -> Response:
        try:
            rpc = self.rpcs().get(call.rpc)
            if rpc is None:
                known = ", ".join(sorted(self.rpcs()))
                raise WireError(404, "no-endpoint", f"{self.name} has no RPC {call.rpc!r} (it has: {known})")
            body = parse_json(call.body, f"the body of {call.rpc}")
            return json_response(await rpc(call, body))
        except WireError as e:
            log.info(
                "{component} refused {rpc} from {origin}: {code} {label}: {message} [request {request_id}]",
                component=self.name,
                rpc=call.rpc,
                origin=call.origin_domain,
                code=e.code,
                label=e.label,
                message=e.message,
                request_id=call.request_id,
            )
            return e.response()
