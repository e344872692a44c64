"""
L{fedserver_wire.reference}, the plugin as a whole: its factories and
options, the entry point, the C{/wire/} API mounted through the real
startup path, and the seed's three flows (user discovery, conversation
establishment, message sending) with the ownership rules end to end across
backends joined by real pipelines in memory.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Dict

import pytest
import pytest_twisted
from twisted.internet.testing import MemoryReactorClock

import fedserver.builtin.allow_list
import fedserver.builtin.mtls
import fedserver.builtin.static_discovery
from fedserver.errors import ConfigError, FederationError
from fedserver.registry import PluginRegistry, make_plugin_manager
from fedserver.service import build_service
from fedserver.storage import Store
from fedserver_wire import reference
from fedserver_wire.api import WireAPIResource
from fedserver_wire.brig import WireBrig
from fedserver_wire.galley import WireGalley
from fedserver_wire.store import SCHEMA_OWNER
from tests.unit.helpers import build_plugin, minimal_config_file
from tests.unit.wire_helpers import (
    Backend,
    answer_json,
    backend_factory,
    context_for,
    eventually,
    federate,
    qid,
    refusal,
    uid,
    wire_options,
)

A, B, C = "a.example", "b.example", "c.example"


# factories and options


@pytest.fixture
def context(tmp_path):
    return context_for(A, Store(f"sqlite:{tmp_path / 'x.sqlite'}", reactor=None))


def test_the_factories_build_components_and_register_the_schema(context):
    brig = build_plugin(reference, "component", wire_options("brig", plugin="wire-brig"), context)
    galley = build_plugin(reference, "component", wire_options("galley", plugin="wire-galley"), context)
    assert isinstance(brig, WireBrig) and isinstance(galley, WireGalley)
    assert (brig.prekeys, brig.search_policy, brig.search_limit) == (10, "exact_handle_search", 10)
    assert brig.backend_domain == galley.backend_domain == A
    assert brig.clock is context.reactor
    assert context.storage.migrate() == [(SCHEMA_OWNER, 1)]


def test_brig_options(context):
    options = wire_options("brig", plugin="wire-brig", prekeys=3, search_policy="full_search", search_limit=50)
    brig = build_plugin(reference, "component", options, context)
    assert (brig.prekeys, brig.search_policy, brig.search_limit) == (3, "full_search", 50)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"prekeys": 0}, r"\[components.brig\] prekeys: must be at least 1"),
        ({"prekeys": "10"}, r"prekeys: must be an integer"),
        ({"search_limit": 101}, r"search_limit: must be at most 100"),
        ({"search_policy": "everything"}, r"search_policy: must be one of no_search, exact_handle_search"),
        ({"colour": "red"}, r"\[components.brig\] colour: is not a known option"),
    ],
)
def test_bad_brig_options(context, values, message):
    with pytest.raises(ConfigError, match=message):
        build_plugin(reference, "component", wire_options("brig", plugin="wire-brig", **values), context)


def test_galley_has_no_options(context):
    with pytest.raises(ConfigError, match=r"\[components.galley\] prekeys: is not a known option"):
        build_plugin(reference, "component", wire_options("galley", plugin="wire-galley", prekeys=1), context)


@pytest.mark.parametrize("plugin, expected", [("wire-brig", "brig"), ("wire-galley", "galley")])
def test_the_components_must_have_their_wire_names(context, plugin, expected):
    with pytest.raises(ConfigError, match=rf"configure it as \[components.{expected}\]"):
        build_plugin(reference, "component", wire_options("users", plugin=plugin), context)


def test_the_entry_point_offers_both_components():
    names = PluginRegistry(make_plugin_manager()).names("component")
    assert names["wire-brig"].source.startswith("fedserver ")
    assert names["wire-galley"].factory is reference.make_galley


# the resource hook


def test_no_api_without_the_components(context):
    assert reference.fedserver_resources(context) == []


def test_the_api_is_mounted_on_the_outward_listener(context):
    context.components = {
        "brig": build_plugin(reference, "component", wire_options("brig", plugin="wire-brig"), context),
        "galley": build_plugin(reference, "component", wire_options("galley", plugin="wire-galley"), context),
    }
    [(listener, segment, resource)] = reference.fedserver_resources(context)
    assert (listener, segment) == ("outward", b"wire")
    assert isinstance(resource, WireAPIResource)
    assert resource.max_body_bytes == context.config.limits.max_body_bytes
    assert resource.api.brig is context.components["brig"]


@pytest.mark.parametrize("only", ["brig", "galley"])
def test_one_component_without_the_other_stops_startup(context, only):
    other = {"brig": "galley", "galley": "brig"}[only]
    context.components = {
        only: build_plugin(reference, "component", wire_options(only, plugin=f"wire-{only}"), context)
    }
    with pytest.raises(ConfigError, match=rf'needs \[components.{other}\] plugin = "wire-{other}"'):
        reference.fedserver_resources(context)


@pytest.fixture
def config_file(tmp_path):
    return minimal_config_file(tmp_path, "a.example", "fed.a.example", outward=True)


WIRE_TABLES = '[components.brig]\nplugin = "wire-brig"\n[components.galley]\nplugin = "wire-galley"\n'


def _build(path: str) -> Any:
    plugins = [fedserver.builtin.allow_list, fedserver.builtin.mtls, fedserver.builtin.static_discovery, reference]
    manager = make_plugin_manager(load_entrypoints=False, plugins=plugins)
    return build_service(path, reactor=MemoryReactorClock(), plugin_manager=manager)


def test_startup_mounts_the_api_and_migrates_the_schema(config_file):
    top = _build(config_file(WIRE_TABLES))
    assert isinstance(top.outward_resource.getStaticEntity(b"wire"), WireAPIResource)
    assert top.inward_resource.getStaticEntity(b"wire") is None
    assert isinstance(top.pipeline.components["brig"], WireBrig)
    with sqlite3.connect(top.context.storage.path) as connection:
        versions = dict(connection.execute("SELECT owner, version FROM fedserver_schema"))
    assert versions[SCHEMA_OWNER] == 1  # besides fedserver's own (the outbound queue, idempotency keys)


def test_startup_without_the_components_mounts_nothing(config_file):
    top = _build(config_file(""))
    assert top.outward_resource.getStaticEntity(b"wire") is None


def test_startup_with_half_of_them_is_refused(config_file):
    with pytest.raises(ConfigError, match=r"a.toml: \[components\]: .*needs \[components.galley\]"):
        _build(config_file('[components.brig]\nplugin = "wire-brig"\n'))


# the seed's flows, across backends joined by real pipelines


@pytest.fixture
def backends(tmp_path):
    yield from backend_factory(tmp_path)


@pytest.fixture
def world(backends) -> Dict[str, Backend]:
    a, b, c = backends(A), backends(B, search_policy="full_search"), backends(C)
    network = federate([a, b, c])
    return {"a": a, "b": b, "c": c, "network": network}


async def inbox(backend: Backend, user: Dict[str, Any]) -> list:
    return answer_json(await backend.request("GET", f"/wire/users/{uid(user)}/inbox"))["events"]


@pytest_twisted.ensureDeferred
async def test_user_discovery(world):
    a, b = world["a"], world["b"]
    await a.user("alice")
    bob = await b.user("bob", "Bob Builder")
    response = await a.request("GET", "/wire/search", query={"q": "@bob@b.example"})
    assert response.code == 200
    [document] = answer_json(response)["documents"]
    assert document == {"qualified_id": {"id": uid(bob), "domain": B}, "handle": "bob", "name": "Bob Builder"}
    by_handle = answer_json(await a.request("GET", "/wire/handles/b.example/bob"))
    assert by_handle["qualified_id"] == qid(bob)
    profile = answer_json(await a.request("GET", f"/wire/profiles/b.example/{uid(bob)}"))
    assert profile == document
    # it went through a's pipeline to b's inward side, with a's origin
    assert {r.header("Wire-Origin-Domain") for _, r in world["network"].sent} == {A}
    assert [r.path for _, r in world["network"].sent] == [
        "/federation/brig/search-users", "/federation/brig/get-user-by-handle", "/federation/brig/get-users-by-ids"
    ]


@pytest_twisted.ensureDeferred
async def test_conversation_establishment_and_message_sending(world, tmp_path):
    a, b, c = world["a"], world["b"], world["c"]
    alice, bob, carol = await a.user("alice"), await b.user("bob"), await c.user("carol")

    # establishment: bob's prekeys are claimed on b, the conversation is created on a and registered on b and c
    response = await a.request("POST", "/wire/conversations",
                               {"creator": uid(alice), "name": "Trio", "members": [qid(bob), qid(carol)]})
    assert response.code == 201, answer_json(response)
    created = answer_json(response)
    conv = created["conversation"]["qualified_id"]
    assert conv["domain"] == A and created["failed_to_add"] == []
    assert {b_["user"]["domain"] for b_ in created["prekey_bundles"]} == {B, C}
    with sqlite3.connect(str(tmp_path / "b.example.sqlite")) as connection:
        assert connection.execute("SELECT min(key_id) FROM wire_prekeys").fetchone() == (1,)
    [bob_event] = await inbox(b, bob)
    assert (bob_event["type"], bob_event["conversation"], bob_event["from"]) == (
        "conversation.create", conv, qid(alice)
    )

    # alice sends: b and c are told with on-message-sent
    path = f"/wire/conversations/{conv['domain']}/{conv['id']}"
    sent = await a.request("POST", path + "/messages", {"sender": uid(alice), "text": "hello"})
    assert sent.code == 201 and answer_json(sent)["failed_to_send"] == []
    for backend, user in [(b, bob), (c, carol)]:
        last = (await inbox(backend, user))[-1]
        assert (last["type"], last["data"]["text"], last["from"]) == ("conversation.message-add", "hello", qid(alice))

    # bob replies from b: send-message to the owner a, which delivers to alice and tells c
    reply = await b.request("POST", path + "/messages", {"sender": uid(bob), "text": "hi alice"})
    assert reply.code == 201, answer_json(reply)
    assert (await inbox(a, alice))[-1]["data"]["text"] == "hi alice"
    assert (await inbox(c, carol))[-1]["data"]["text"] == "hi alice"
    assert (await inbox(b, bob))[-1]["data"]["text"] == "hello"  # not his own

    # bob reads the metadata from the owner
    metadata = answer_json(await b.request("GET", path, query={"user": uid(bob)}))
    assert metadata["name"] == "Trio" and len(metadata["members"]) == 3

    # bob leaves through the owner; b is not told of later messages
    assert (await b.request("POST", path + "/leave", {"user": uid(bob)})).code == 200
    before = len(world["network"].sent)
    await a.request("POST", path + "/messages", {"sender": uid(alice), "text": "bob left"})
    targets = [t for t, _ in world["network"].sent[before:]]
    assert targets == ["fed.c.example"]
    assert (await inbox(b, bob))[-1]["data"]["text"] == "hello"
    refusal(await b.request("POST", path + "/messages", {"sender": uid(bob), "text": "x"}), 403, "access-denied")


@pytest_twisted.ensureDeferred
async def test_a_backend_cannot_speak_for_a_conversation_it_does_not_own(world):
    a, b, c = world["a"], world["b"], world["c"]
    alice, bob = await a.user("alice"), await b.user("bob")
    created = answer_json(await a.request("POST", "/wire/conversations",
                                          {"creator": uid(alice), "name": "Duo", "members": [qid(bob)]}))
    conv = created["conversation"]["qualified_id"]
    # c pretends to be the owner towards b
    forged = {"conversation": conv, "sender": qid(alice),
              "message": {"id": "00000000-0000-4000-8000-00000000dead", "text": "forged",
                          "time": "2024-05-08T12:00:00.000Z"}}
    with pytest.raises(FederationError) as info:
        await c.galley.remote.call(B, "galley", "on-message-sent", forged, "req-forged")
    error = info.value
    assert error.label == "federation-remote-error"
    assert error.inner["label"] == "not-conversation-owner"
    assert [e["type"] for e in await inbox(b, bob)] == ["conversation.create"]
    # c asks a for the metadata for bob, a user of b: refused
    with pytest.raises(FederationError) as info:
        await c.galley.remote.call(A, "galley", "get-conversations", {"user": qid(bob), "ids": [conv["id"]]}, "r")
    assert info.value.inner["label"] == "access-denied"
    # and c cannot take bob out of it
    with pytest.raises(FederationError) as info:
        await c.galley.remote.call(A, "galley", "leave-conversation", {"conversation": conv["id"], "user": qid(bob)},
                                   "r")
    assert info.value.inner["label"] == "access-denied"


@pytest_twisted.ensureDeferred
async def test_authorizers_apply_to_the_components_calls(backends):
    a, b = backends(A), backends(B)
    federate([a, b], denied={B: True})
    await b.user("bob")
    # b's authorizer refuses a's call inbound: a's client sees b's refusal, labelled
    body = refusal(await a.request("GET", "/wire/search", query={"q": "@bob@b.example"}), 533,
                   "federation-remote-error")
    assert body["inner"]["label"] == "federation-denied"
    # and b's own outbound calls
    bob_search = await b.request("GET", "/wire/search", query={"q": "@alice@a.example"})
    body = refusal(bob_search, 400, "federation-denied")
    assert body["data"] == {"type": "federation", "domain": A, "path": "/federation/brig/search-users"}


@pytest_twisted.ensureDeferred
async def test_an_unreachable_backend_is_reported_not_fatal(world):
    a, b, c = world["a"], world["b"], world["c"]
    alice, bob, carol = await a.user("alice"), await b.user("bob"), await c.user("carol")
    created = answer_json(await a.request("POST", "/wire/conversations",
                                          {"creator": uid(alice), "name": "T", "members": [qid(bob), qid(carol)]}))
    conv = created["conversation"]["qualified_id"]
    world["network"].down.add("fed.c.example")
    sent = answer_json(await a.request("POST", f"/wire/conversations/{A}/{conv['id']}/messages",
                                       {"sender": uid(alice), "text": "anyone?"}))
    # c is told later: on-message-sent waits in the durable outbound queue
    assert sent["failed_to_send"] == []
    [queued] = sent["queued"]
    assert (queued["domain"], queued["users"], queued["error"]["label"]) == (
        C, [qid(carol)], "federation-connection-refused"
    )
    assert (await inbox(b, bob))[-1]["data"]["text"] == "anyone?"
    # c is back: at the end of the backoff carol gets the message, once
    world["network"].down.clear()

    async def carol_has_it() -> bool:
        return [e["data"]["text"] for e in await inbox(c, carol) if e["type"] == "conversation.message-add"] == [
            "anyone?"]

    await eventually(carol_has_it, clock=a.clock, what="carol's message")
    state = await a.context.queue.describe(C)
    assert (state["depth"], state["failures"], state["dead"]) == (0, 0, 0)
