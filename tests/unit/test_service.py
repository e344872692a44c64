"""
L{fedserver.service.build_service}: the hooks through the real startup path,
protocol sections, schemas, and stopping while requests are in flight.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, List

import pytest
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.web import resource
from zope.interface import implementer

import fedserver.builtin.allow_list
import fedserver.builtin.http_forward
import fedserver.builtin.mtls
import fedserver.builtin.static_discovery
from fedserver import ConfigError, hookimpl
from fedserver.interfaces import IIdentityProvider
from fedserver.registry import make_plugin_manager
from fedserver.service import DRAIN_TIMEOUT, _Drain, _InFlight, build_service
from fedserver.values import Identity
from tests.unit.helpers import minimal_config_file

BUILTINS = [
    fedserver.builtin.allow_list,
    fedserver.builtin.http_forward,
    fedserver.builtin.mtls,
    fedserver.builtin.static_discovery,
]


class Text(resource.Resource):
    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self.text = text

    def render(self, request: Any) -> bytes:
        return self.text


@implementer(IIdentityProvider)
class NamedIdentities:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def supported_credentials(self) -> List[str]:
        return ["basic"]

    def validate(self, identity: Identity, group_context_extensions: Any, application_context: Any) -> Any:
        return defer.succeed(None)

    def client_handle(self, identity: Identity) -> str:
        return f"{self.prefix}{identity.credential}"

    def valid_successor(self, predecessor: Identity, successor: Identity) -> bool:
        return predecessor.credential == successor.credential


class Recorder(Service):
    def __init__(self) -> None:
        self.events: List[str] = []

    def startService(self) -> None:
        super().startService()
        self.events.append("start")

    def stopService(self) -> Any:
        super().stopService()
        self.events.append("stop")


class ProtocolPlugin:
    """A protocol plugin using every extension point of the core."""

    def __init__(self) -> None:
        self.service = Recorder()
        self.seen_section: Any = None

    @hookimpl
    def fedserver_identity_provider_plugins(self) -> dict:
        def make(options: Any, context: Any) -> NamedIdentities:
            context.storage.register_schema("proto", ["CREATE TABLE proto_items (id INTEGER PRIMARY KEY)"])
            return NamedIdentities(options.get_str("prefix"))

        return {"named": make}

    @hookimpl
    def fedserver_resources(self, context: Any) -> list:
        section = context.config.section("proto")
        self.seen_section = section.get_str("greeting") if section is not None else None
        return [
            ("inward", b"_proto", Text(b"inward")),
            ("outward", b"_proto_admin", Text(b"outward")),
        ]

    @hookimpl
    def fedserver_services(self, context: Any) -> list:
        return [self.service]


@pytest.fixture()
def config_file(tmp_path: Any) -> Any:
    return minimal_config_file(tmp_path, "b.example", "fed.b.example")


def _rewrite(path: str, old: str, new: str) -> None:
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def _build(path: str, *plugins: Any, **kwargs: Any) -> Any:
    manager = make_plugin_manager(load_entrypoints=False, plugins=[*BUILTINS, *plugins])
    return build_service(path, reactor=MemoryReactorClock(), plugin_manager=manager, **kwargs)


def test_protocol_plugin_hooks_through_startup(config_file: Any) -> None:
    plugin = ProtocolPlugin()
    path = config_file('[identity_providers.users]\nplugin = "named"\nprefix = "u:"\n'
                       '[proto]\ngreeting = "hello"\n')
    top = _build(path, plugin)
    provider = top.context.identity_providers["users"]
    assert provider.client_handle(Identity("basic", "alice")) == "u:alice"
    assert plugin.seen_section == "hello"
    assert isinstance(top.inward_resource.getStaticEntity(b"_proto"), Text)
    assert isinstance(top.outward_resource.getStaticEntity(b"_proto_admin"), Text)
    # the schema registered by the factory was applied at startup
    database = os.path.join(os.path.dirname(path), "var", "b.example", "fedserver.sqlite")
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        version = connection.execute("SELECT version FROM fedserver_schema WHERE owner = 'proto'").fetchone()
    assert "proto_items" in tables
    assert version == (1,)
    top.startService()
    assert plugin.service.events == ["start"]
    top.stopService()
    assert plugin.service.events == ["start", "stop"]


def test_unread_protocol_section_is_an_error(config_file: Any) -> None:
    with pytest.raises(ConfigError, match=r"\[nothing\]: is not a table that fedserver or an installed plugin reads"):
        _build(config_file("[nothing]\nx = 1\n"))


def test_unknown_key_in_a_protocol_section_is_an_error(config_file: Any) -> None:
    with pytest.raises(ConfigError, match=r"\[proto\] colour: is not a known option"):
        _build(config_file('[proto]\ngreeting = "hi"\ncolour = "red"\n'), ProtocolPlugin())


def test_identity_provider_that_does_not_provide_the_interface(config_file: Any) -> None:
    class Broken:
        @hookimpl
        def fedserver_identity_provider_plugins(self) -> dict:
            return {"broken": lambda options, context: object()}

    with pytest.raises(ConfigError, match="does not provide IIdentityProvider"):
        _build(config_file('[identity_providers.x]\nplugin = "broken"\n'), Broken())


@pytest.mark.parametrize(
    "answer, message",
    [
        ([("inward", b"federation", Text(b""))], "/federation is mounted twice"),
        ([("sideways", b"x", Text(b""))], "unknown listener 'sideways'"),
        ([("inward", b"x", object())], "does not provide IResource"),
    ],
)
def test_bad_resources_stop_startup(config_file: Any, answer: list, message: str) -> None:
    class Mounting:
        @hookimpl
        def fedserver_resources(self, context: Any) -> list:
            return answer

    with pytest.raises(ConfigError, match=message):
        _build(config_file(), Mounting())


def test_service_that_is_not_a_service(config_file: Any) -> None:
    class NotAService:
        @hookimpl
        def fedserver_services(self, context: Any) -> list:
            return [object()]

    with pytest.raises(ConfigError, match="does not provide IService"):
        _build(config_file(), NotAService())


class PendingRequest:
    """Stands for a request being answered: finishes when told to."""

    def __init__(self) -> None:
        self.finished: defer.Deferred = defer.Deferred()

    def notifyFinish(self) -> defer.Deferred:
        return self.finished


def test_stop_drains_requests_before_plugin_services_and_store(config_file: Any) -> None:
    plugin = ProtocolPlugin()
    top = _build(config_file(), plugin)
    top.startService()
    (drain,) = [child for child in top if isinstance(child, _Drain)]
    request = PendingRequest()
    drain._in_flight.track(request)  # type: ignore[arg-type]
    stopped = top.stopService()
    # the listeners are down, the plugin service and store still run
    assert plugin.service.events == ["start"]
    assert top.context.storage.running
    request.finished.callback(None)
    assert stopped.called
    assert plugin.service.events == ["start", "stop"]
    assert not top.context.storage.running


def test_stop_gives_up_waiting_after_the_drain_timeout() -> None:
    reactor = MemoryReactorClock()
    in_flight = _InFlight()
    drain = _Drain(reactor, in_flight)
    drain.startService()
    in_flight.track(PendingRequest())  # type: ignore[arg-type]
    stopped = drain.stopService()
    reactor.advance(DRAIN_TIMEOUT - 1)
    assert not stopped.called
    reactor.advance(2)
    assert stopped.called


def test_no_authorizer_is_an_error(config_file: Any) -> None:
    path = config_file()
    _rewrite(path, '[[authorizers]]\nplugin = "allow-list"\nallow_all = true\n', "")
    with pytest.raises(ConfigError, match=r"no \[\[authorizers\]\] table"):
        _build(path)


def test_bad_listen_description_names_the_key(config_file: Any) -> None:
    path = config_file()
    _rewrite(path, 'listen = "tcp:0"', 'listen = "tcpp:0"')
    with pytest.raises(ConfigError, match=r"\[inward\] listen: 'tcpp:0' is not a Twisted server endpoint"):
        _build(path)


def test_resources_are_plain_twisted_resources(config_file: Any) -> None:
    top = _build(config_file())
    assert resource.IResource.providedBy(top.inward_resource)
    assert resource.IResource.providedBy(top.outward_resource)


def test_connection_limit_refuses_connections_beyond_it() -> None:
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import StringTransport

    from fedserver.service import ConnectionLimit

    limit = ConnectionLimit(Factory.forProtocol(Protocol), 2)
    first, second = limit.buildProtocol(None), limit.buildProtocol(None)
    for protocol in (first, second):
        protocol.makeConnection(StringTransport())
    assert limit.buildProtocol(None) is None
    assert limit.refused == 1
    first.connectionLost(None)
    assert limit.buildProtocol(None) is not None


def test_an_ssl_inward_endpoint_would_wrap_tls_twice(config_file: Any) -> None:
    path = config_file()
    _rewrite(path, 'listen = "tcp:0"', 'listen = "ssl:0:privateKey=k.pem"')
    with pytest.raises(ConfigError, match=r"\[inward\] listen: .* second TLS layer"):
        _build(path)


def test_without_migrating_the_database_is_still_checked(config_file: Any, tmp_path: Any) -> None:
    path = config_file('[identity_providers.users]\nplugin = "named"\nprefix = "u:"\n')
    plugin = ProtocolPlugin()
    _build(path, plugin)  # migrates: proto schema version 1
    database = os.path.join(os.path.dirname(path), "var", "b.example", "fedserver.sqlite")
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE fedserver_schema SET version = 7 WHERE owner = 'proto'")
    with pytest.raises(ConfigError, match="proto schema version 7, but this fedserver knows only up to 1"):
        _build(path, ProtocolPlugin(), migrate=False)
    before = os.stat(database).st_mtime_ns
    with pytest.raises(ConfigError):
        _build(path, ProtocolPlugin(), migrate=False)
    assert os.stat(database).st_mtime_ns == before  # checking writes nothing
