"""
A third-party-style fedserver plugin for the benchmark: the component
C{bench-echo}, which answers in the fedserver process itself, with the same
JSON document as C{bench/component.py}.

    [components.brig]
    plugin = "bench-echo"

It is not installed: C{bench/run.py} puts this folder and a folder holding a
C{fedserver_bench_echo-0.dist-info} (whose C{entry_points.txt} names this
module in the group C{fedserver}) on the C{PYTHONPATH} of C{twistd}, so
fedserver's entry-point loading finds it as it finds any installed plugin.
"""

from __future__ import annotations

from component import answer
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from fedserver import FederatedCall, Response, hookimpl
from fedserver.config import Options
from fedserver.context import Context
from fedserver.interfaces import IComponentHandler

_HEADERS = (("Content-Type", "application/json"),)


@implementer(IComponentHandler)
class EchoComponent:
    """Answers every call at once with the benchmark component's document."""

    def handle(self, call: FederatedCall) -> Deferred[Response]:
        return defer.succeed(Response(200, _HEADERS, answer(call.rpc)))


def make_echo(options: Options, context: Context) -> EchoComponent:
    # no options: any key but "plugin" is refused by the loader
    return EchoComponent()


@hookimpl
def fedserver_component_plugins() -> dict:
    return {"bench-echo": make_echo}
