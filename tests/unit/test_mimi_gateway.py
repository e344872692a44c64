"""
The MIMI gateway (L{fedserver_mimi.gateway}, its internal interface
L{fedserver_mimi.gateway_api} and its store): every route of the internal
interface over HTTP through the resource the plugin mounts, every refusal,
the claim semantics, applications of one gateway reading each other, and
two gateways joined by real pipelines.  Each gateway is built by the
plugin's factory on a real SQLite store; see L{tests.unit.mimi_helpers}.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any, Dict, List, Tuple

import nacl.signing
import pytest
import pytest_twisted
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.defer import Deferred

from fedserver_mimi import encode, gateway_store
from fedserver_mimi.encode import KeyPackageSpec
from fedserver_mimi.gateway_api import GatewayAPI
from fedserver_mimi.keypackage import parse_key_package_message
from fedserver_mimi.messages import CONTENT_APPLICATION, CONTENT_PROPOSAL
from tests.unit.helpers import HTTPAnswer
from tests.unit.mimi_helpers import (
    CERTS,
    CHAT,
    DAY,
    DEFAULT_APPS,
    HOUR,
    LOCAL,
    NOW,
    OTHER,
    UNKNOWN,
    AppSpec,
    CertificateChain,
    Device,
    MimiBackend,
    b64,
    commit_message,
    group_path,
    make_gateway,
    proposal_message,
    ref_of,
    unb64,
    x509_providers,
)
from tests.unit.wire_helpers import answer_json, backend_factory, eventually, federate

A = "a.example"
B = "b.example"
CHAT_B = "b0b0b0b0-0000-4000-8000-00000000000b"
OTHER_B = "b0b0b0b0-0000-4000-8000-0000000000bb"
LOCAL_B = "b0b0b0b0-0000-4000-8000-000000000bbb"
APPS_B = (AppSpec("chat", CHAT_B), AppSpec("other", OTHER_B, provider="plain"),
          AppSpec("local", LOCAL_B, federate=False))


@pytest.fixture
def gateways(tmp_path):
    """C{gateways(domain="a.example", **options)}: a running gateway, stopped afterwards."""
    yield from backend_factory(tmp_path, make_gateway)


@pytest.fixture
def a(gateways) -> MimiBackend:
    return gateways(A)


def refused(answer: HTTPAnswer, code: int, label: str) -> Dict[str, Any]:
    """The labelled refusal C{answer} must be, without a traceback."""
    body = answer.labelled(code, label)
    assert isinstance(body["message"], str) and body["message"] and "Traceback" not in body["message"]
    return body


def parallel(*coroutines: Any) -> Deferred:
    """Run C{coroutines} concurrently; fire with their results in order."""
    return defer.gatherResults([Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True)


def client_path(client: str, app: str = CHAT) -> str:
    return f"/apps/{app}/clients/{client}"


def group_route(group_id: bytes, tail: str, app: str = CHAT) -> str:
    return f"/apps/{app}/groups/{group_path(group_id)}/{tail}"


async def with_keys(gw: MimiBackend, count: int = 3, *, app: str = "chat", owner: bytes = b"alice",
                    other: bytes = b"bob") -> Tuple[str, str, str, Device, List[bytes]]:
    """
    Client C{owner} with a queue (version 1, suite 1) of C{count}
    KeyPackages expiring in that order, and client C{other}: their ids, the
    queue, the device and the KeyPackages.
    """
    owner_id = await gw.register(owner, [f"account:{owner.decode()}"], app=app)
    other_id = await gw.register(other, [f"account:{other.decode()}"], app=app)
    queue = await gw.queue(owner_id, app=app)
    device = Device(owner)
    kps = [device.key_package(not_after=NOW + DAY + i) for i in range(count)]
    answer = await gw.fill(owner_id, queue, kps, app=app)
    assert answer.code == 200, answer.body
    return owner_id, other_id, queue, device, kps


def claimed(answer: HTTPAnswer) -> bytes:
    assert answer.code == 200, answer.body
    return unb64(answer.json()["keyPackage"])


# the interface itself: routes, tokens, queries, bodies


@pytest_twisted.ensureDeferred
async def test_the_openapi_document_needs_no_token(a):
    document = await a.ok("GET", "/openapi.json", app=None)
    assert document["openapi"].startswith("3.")
    assert "/mimi/apps/{appId}/clients" in document["paths"]


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods(a):
    refused(await a.api("GET", "/nothing"), 404, "no-endpoint")
    refused(await a.api("GET", f"/apps/{CHAT}/clients/x/y/z/w"), 404, "no-endpoint")
    body = refused(await a.api("DELETE", "/apps"), 405, "method-not-allowed")
    assert "GET, POST" in body["message"]
    refused(await a.api("POST", f"/apps/{CHAT}/groups", {}), 405, "method-not-allowed")


@pytest_twisted.ensureDeferred
async def test_tokens(a):
    path = f"/apps/{CHAT}"
    refused(await a.api("GET", path, app=None), 401, "missing-token")
    for header in (b"Basic dXNlcjpwYXNz", b"Bearer", b"Bearer   ", b"token-chat"):
        answer = await a.http("GET", "/mimi" + path, headers=[(b"Authorization", header)])
        refused(answer, 401, "missing-token")
    refused(await a.api("GET", path, token="not-a-token-of-anybody"), 401, "invalid-token")
    answer = await a.http("GET", "/mimi" + path, headers=[(b"Authorization", "Bearer tökén".encode("latin-1"))])
    refused(answer, 401, "invalid-token")
    # the scheme is case-insensitive; the token is not
    answer = await a.http("GET", "/mimi" + path, headers=[(b"Authorization", b"bearer " + a.tokens["chat"].encode())])
    assert answer.code == 200
    refused(await a.api("GET", path, token=a.tokens["chat"].upper()), 401, "invalid-token")


@pytest_twisted.ensureDeferred
async def test_a_token_acts_for_its_application_only(a):
    assert (await a.ok("GET", f"/apps/{CHAT}"))["appId"] == CHAT
    body = refused(await a.api("GET", f"/apps/{OTHER}"), 403, "access-denied")
    assert OTHER in body["message"]
    refused(await a.api("POST", f"/apps/{OTHER}/clients", {"clientHandle": b64(b"x")}), 403, "access-denied")
    refused(await a.api("GET", f"/apps/{CHAT}", app="admin"), 403, "access-denied")
    refused(await a.api("GET", f"/apps/{UNKNOWN}/clients", query={"tag": "t"}), 403, "access-denied")
    refused(await a.api("GET", "/apps/CHAT/clients", query={"tag": "t"}), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_query_strings_and_bodies_are_checked(a):
    alice = await a.register(b"alice")
    base = f"/mimi/apps/{CHAT}/clients"
    auth = [(b"Authorization", b"Bearer " + a.tokens["chat"].encode())]
    for query in (b"?tag=a&tag=b", b"?tag=a&colour=red", b"?tag=%ff", b"?"):
        answer = await a.http("GET", base + query.decode("latin-1"), headers=auth)
        refused(answer, 400, "bad-request")
    refused(await a.api("POST", f"/apps/{CHAT}/clients", raw=b"{not json"), 400, "bad-request")
    refused(await a.api("POST", f"/apps/{CHAT}/clients", raw=b"[1, 2]"), 400, "bad-request")
    refused(await a.api("POST", f"/apps/{CHAT}/clients", raw=b"\xff\xfe"), 400, "bad-request")
    refused(await a.api("POST", f"/apps/{CHAT}/clients", raw=b"[" * 100_000), 400, "bad-request")
    body = refused(await a.api("POST", f"/apps/{CHAT}/clients", {"clientHandle": b64(b"x"), "colour": 1}),
                   400, "bad-request")
    assert "colour" in body["message"]
    refused(await a.api("PATCH", client_path(alice), {"tagsToAdd": "t"}), 400, "bad-request")
    refused(await a.api("GET", client_path("not-a-uuid")), 400, "bad-request")
    refused(await a.api("GET", client_path(alice.upper())), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_refused_unread(a):
    limit = a.context.config.limits.max_body_bytes
    answer = await a.api("POST", f"/apps/{CHAT}/clients", raw=b" " * (limit + 1))
    refused(answer, 413, "request-too-large")


# applications


@pytest_twisted.ensureDeferred
async def test_listing_applications(a):
    listed = await a.ok("GET", "/apps", app="admin")
    apps = {app["appId"]: app for app in listed["apps"]}
    assert len(listed["apps"]) == 3 and set(apps) == {CHAT, OTHER, LOCAL}
    chat = apps[CHAT]
    assert chat == {"appId": CHAT, "name": "chat", "federate": True, "declared": True,
                    "identityProvider": "simple", "identityConfiguration": {"type": "basic"}}
    assert apps[LOCAL]["federate"] is False and apps[OTHER]["identityProvider"] == "plain"
    assert await a.ok("GET", "/apps") == {"apps": [chat]}
    assert await a.ok("GET", "/apps", query={"domain": A}) == {"apps": [chat]}
    assert await a.ok("GET", f"/apps/{CHAT}") == chat
    refused(await a.api("GET", "/apps", query={"domain": "Not A Domain"}), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_the_admin_creates_applications_whose_token_works(a):
    created = await a.ok("POST", "/apps", {"name": "made", "identityProvider": "plain", "federate": False},
                         app="admin", code=201)
    token = created.pop("token")
    assert len(token) >= 32
    assert created["name"] == "made" and created["declared"] is False and created["federate"] is False
    assert created["identityConfiguration"] == {"type": "basic"}
    assert await a.ok("GET", f"/apps/{created['appId']}", token=token) == created
    client = await a.ok("POST", f"/apps/{created['appId']}/clients", {"clientHandle": b64(b"m")}, token=token,
                        code=201)
    assert client["clientId"]
    assert created in (await a.ok("GET", "/apps", app="admin"))["apps"]
    second = await a.ok("POST", "/apps", {"name": "made", "identityProvider": "simple"}, app="admin", code=201)
    assert second["appId"] != created["appId"] and second["token"] != token and second["federate"] is True


@pytest_twisted.ensureDeferred
async def test_creating_applications_is_for_the_admin_only(a):
    body = {"name": "made", "identityProvider": "simple"}
    refused(await a.api("POST", "/apps", body), 403, "access-denied")
    refused(await a.api("POST", "/apps", body, app=None), 401, "missing-token")
    answer = refused(await a.api("POST", "/apps", {"name": "x", "identityProvider": "nope"}, app="admin"),
                     400, "bad-request")
    assert "nope" in answer["message"] and "simple" in answer["message"]
    for bad in ({"name": "x"}, {"name": "", "identityProvider": "simple"},
                {"name": "x" * 129, "identityProvider": "simple"},
                {"name": "x", "identityProvider": "simple", "federate": "yes"},
                {"name": "x", "identityProvider": "simple", "token": "mine"}):
        refused(await a.api("POST", "/apps", bad, app="admin"), 400, "bad-request")
    # the admin is no application: it cannot list another gateway's applications for one
    refused(await a.api("GET", "/apps", app="admin", query={"domain": B}), 403, "access-denied")


@pytest_twisted.ensureDeferred
async def test_without_an_admin_token_only_applications_get_in(gateways):
    gw = gateways(A, admin=False)
    refused(await gw.api("POST", "/apps", {"name": "x", "identityProvider": "simple"}), 403, "access-denied")
    refused(await gw.api("GET", "/apps", token="token-admin-a.example-0123456789abcdef"), 401, "invalid-token")


@pytest_twisted.ensureDeferred
async def test_a_restart_applies_the_configured_applications(gateways, tmp_path):
    database = str(tmp_path / "shared.sqlite")
    first = gateways(A, database=database)
    created = await first.ok("POST", "/apps", {"name": "made", "identityProvider": "plain"}, app="admin", code=201)
    first.stop()
    # chat's token changes, other is no longer configured, and plain is gone
    second = gateways(A, database=database, apps=[AppSpec("chat", CHAT)], providers={"simple": {"plugin": "basic"}},
                      tokens={"chat": "a-new-token-for-chat-0123456789"})
    assert (await second.ok("GET", f"/apps/{CHAT}"))["appId"] == CHAT
    refused(await second.api("GET", f"/apps/{CHAT}", token=first.tokens["chat"]), 401, "invalid-token")
    refused(await second.api("GET", f"/apps/{OTHER}", token=first.tokens["other"]), 401, "invalid-token")
    body = refused(await second.api("GET", f"/apps/{created['appId']}", token=created["token"]),
                   503, "identity-provider-missing")
    assert "'plain'" in body["message"]
    second.stop()
    # declared again, other is back as it was, with its data
    third = gateways(A, database=database)
    assert (await third.ok("GET", f"/apps/{OTHER}", app="other"))["federate"] is True
    assert (await third.ok("GET", f"/apps/{CHAT}"))["appId"] == CHAT


@pytest_twisted.ensureDeferred
async def test_a_configured_token_that_a_created_application_holds_is_refused(gateways, tmp_path):
    database = str(tmp_path / "shared.sqlite")
    first = gateways(A, database=database)
    created = await first.ok("POST", "/apps", {"name": "made", "identityProvider": "simple"}, app="admin", code=201)
    first.stop()
    second = gateways(A, database=database, tokens={"chat": created["token"]})
    body = refused(await second.api("GET", f"/apps/{CHAT}"), 503, "token-in-use")
    assert created["appId"] in body["message"]


# clients


@pytest_twisted.ensureDeferred
async def test_registering_reading_and_listing_clients_by_tag(a):
    alice = await a.register(b"alice", ["account:alice", "moderator"])
    a.clock.advance(1)  # listed in the order registered
    phone = await a.register(b"alice:phone", ["account:alice"])
    await a.register(b"bob", ["account:bob"])
    assert await a.ok("GET", client_path(alice)) == {
        "clientId": alice, "clientIdentity": b64(b"alice"), "tags": ["account:alice", "moderator"]}
    listed = await a.ok("GET", f"/apps/{CHAT}/clients", query={"tag": "account:alice"})
    assert [c["clientId"] for c in listed["identities"]] == [alice, phone]
    assert listed["identities"][1] == {"clientId": phone, "clientIdentity": b64(b"alice:phone"),
                                       "tags": ["account:alice"]}
    assert await a.ok("GET", f"/apps/{CHAT}/clients", query={"tag": "nobody"}) == {"identities": []}
    # another application's clients are not this one's
    await a.register(b"carol", ["account:alice"], app="other")
    assert len((await a.ok("GET", f"/apps/{CHAT}/clients", query={"tag": "account:alice"}))["identities"]) == 2
    refused(await a.api("GET", f"/apps/{CHAT}/clients"), 400, "bad-request")
    refused(await a.api("GET", f"/apps/{CHAT}/clients", query={"tag": "t" * 257}), 400, "bad-request")
    refused(await a.api("GET", f"/apps/{CHAT}/clients", query={"tag": ""}), 400, "bad-request")
    refused(await a.api("GET", client_path(UNKNOWN)), 404, "not-found")
    carol = (await a.ok("GET", f"/apps/{OTHER}/clients", query={"tag": "account:alice"}, app="other"))
    refused(await a.api("GET", client_path(carol["identities"][0]["clientId"])), 404, "not-found")


@pytest_twisted.ensureDeferred
async def test_registration_refusals(a):
    alice = await a.register(b"alice")
    body = refused(await a.api("POST", f"/apps/{CHAT}/clients", {"clientHandle": b64(b"alice")}),
                   409, "client-handle-exists")
    assert body["data"] == {"clientId": alice}
    # handles are unique per application
    await a.register(b"alice", app="other")
    for bad in ({}, {"clientHandle": "not base64!"}, {"clientHandle": ""}, {"clientHandle": 5},
                {"clientHandle": b64(b"x" * 1025)}, {"clientHandle": b64(b"x"), "tags": ["t"] * 65},
                {"clientHandle": b64(b"x"), "tags": [1]}, {"clientHandle": b64(b"x"), "tags": ["a\nb"]},
                {"clientHandle": b64(b"x"), "tags": "t"}):
        refused(await a.api("POST", f"/apps/{CHAT}/clients", bad), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_patching_a_client(gateways):
    gw = gateways(A, tags_per_client=3)
    alice = await gw.register(b"alice", ["a", "b"])
    bob = await gw.register(b"bob")
    patched = await gw.ok("PATCH", client_path(alice),
                          {"clientHandle": b64(b"alice2"), "tagsToAdd": ["c", "a"], "tagsToRemove": ["b", "z"]})
    assert patched == {"clientId": alice, "clientIdentity": b64(b"alice2"), "tags": ["a", "c"]}
    assert await gw.ok("GET", client_path(alice)) == patched
    assert await gw.ok("PATCH", client_path(alice), {}) == patched
    # the old handle is free again, the new one taken
    await gw.ok("PATCH", client_path(bob), {"clientHandle": b64(b"alice")})
    body = refused(await gw.api("PATCH", client_path(bob), {"clientHandle": b64(b"alice2"), "tagsToAdd": ["x"]}),
                   409, "client-handle-exists")
    assert body["data"] == {"clientId": alice}
    # too many tags: nothing changes
    refused(await gw.api("PATCH", client_path(alice), {"tagsToAdd": ["d", "e"], "clientHandle": b64(b"new")}),
            400, "bad-request")
    assert await gw.ok("GET", client_path(alice)) == patched
    assert (await gw.ok("GET", client_path(bob)))["tags"] == []
    refused(await gw.api("PATCH", client_path(UNKNOWN), {}), 404, "not-found")
    refused(await gw.api("PATCH", client_path(alice), {"tags": ["x"]}), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_deleting_a_client_deletes_its_queues(a):
    alice, bob, _queue, _device, kps = await with_keys(a)
    assert await a.ok("DELETE", client_path(alice)) == {}
    refused(await a.api("GET", client_path(alice)), 404, "not-found")
    refused(await a.api("DELETE", client_path(alice)), 404, "not-found")
    refused(await a.claim(alice, bob), 404, "not-found")
    # its KeyPackages went with it: they may be filed again for a new client with its handle
    again = await a.register(b"alice")
    assert again != alice
    answer = await a.fill(again, await a.queue(again), kps)
    assert answer.json() == {"keyPackagesInPool": 3}


# key queues


@pytest_twisted.ensureDeferred
async def test_queues_and_their_counts(a):
    alice = await a.register(b"alice")
    device = Device(b"alice")
    first = await a.queue(alice)
    labelled = await a.queue(alice, label="backup")
    suite3 = await a.queue(alice, suite=3)
    body = refused(await a.api("POST", client_path(alice) + "/queues", {"protocolVersion": 1, "cipherSuite": 1}),
                   409, "queue-exists")
    assert body["data"] == {"queueId": first}
    body = refused(await a.api("POST", client_path(alice) + "/queues",
                               {"protocolVersion": 1, "cipherSuite": 1, "appLabel": "backup"}), 409, "queue-exists")
    assert body["data"] == {"queueId": labelled}
    answer = await a.fill(alice, first, [device.key_package(), device.key_package()], final=device.key_package())
    assert answer.json() == {"keyPackagesInPool": 2}
    queues = {q["queueId"]: q for q in (await a.ok("GET", client_path(alice) + "/queues"))["queues"]}
    assert queues[first] == {"queueId": first, "protocolVersion": 1, "cipherSuite": 1, "appLabel": "",
                             "keyPackagesInPool": 2, "hasFinalKey": True}
    assert queues[labelled]["appLabel"] == "backup" and queues[labelled]["keyPackagesInPool"] == 0
    assert queues[suite3]["cipherSuite"] == 3 and queues[suite3]["hasFinalKey"] is False
    for bad in ({"protocolVersion": 1}, {"protocolVersion": 0, "cipherSuite": 1},
                {"protocolVersion": 1, "cipherSuite": 65536}, {"protocolVersion": True, "cipherSuite": 1},
                {"protocolVersion": 1, "cipherSuite": 1, "appLabel": "x" * 65},
                {"protocolVersion": 1, "cipherSuite": 1, "appLabel": 7}):
        refused(await a.api("POST", client_path(alice) + "/queues", bad), 400, "bad-request")
    refused(await a.api("POST", client_path(UNKNOWN) + "/queues", {"protocolVersion": 1, "cipherSuite": 1}),
            404, "not-found")
    refused(await a.api("GET", client_path(UNKNOWN) + "/queues"), 404, "not-found")
    refused(await a.fill(alice, UNKNOWN, [device.key_package()]), 404, "not-found")


@pytest_twisted.ensureDeferred
async def test_filing_key_packages_bare_or_framed_and_twice(a):
    alice = await a.register(b"alice")
    queue = await a.queue(alice)
    device = Device(b"alice")
    bare, framed = device.key_package(wrap=False), device.key_package()
    assert (await a.fill(alice, queue, [bare, framed])).json() == {"keyPackagesInPool": 2}
    # the same ones again are left as they are
    assert (await a.fill(alice, queue, [framed, bare])).json() == {"keyPackagesInPool": 2}
    # served framed, whichever way they came
    claims = [claimed(await a.claim(alice, await a.register(name))) for name in (b"r1", b"r2")]
    assert {ref_of(c) for c in claims} == {ref_of(bare), ref_of(framed)}
    assert all(c[:4] == b"\x00\x01\x00\x05" for c in claims)


@pytest_twisted.ensureDeferred
async def test_key_package_refusals(gateways):
    gw = gateways(A, key_packages_per_upload=3, key_packages_per_queue=4)
    alice = await gw.register(b"alice")
    queue = await gw.queue(alice)
    device = Device(b"alice")
    good = device.key_package()

    async def refused_upload(kp: bytes, code: int, label: str, *, as_final: bool = False) -> str:
        answer = await (gw.fill(alice, queue, final=kp) if as_final else gw.fill(alice, queue, [good, kp]))
        body = refused(answer, code, label)
        return str(body["message"])

    # another version or cipher suite than the queue's
    message = await refused_upload(device.key_package(suite=3), 422, "key-package-mismatch")
    assert "keyPackages[1]" in message and "cipher suite 3" in message
    # (MLS 1.0 is the only version there is, but a queue may be for another)
    version2 = await gw.queue(alice, version=2)
    body = refused(await gw.fill(alice, version2, [good]), 422, "key-package-mismatch")
    assert "protocol version 1" in body["message"] and "version 2" in body["message"]
    spec = KeyPackageSpec(
        signing_key=device.key, init_key=bytes(32), encryption_key=bytes(range(32)),
        credential=encode.encode_basic_credential(b"alice"),
        capabilities=encode.encode_capabilities(parse_key_package_message(good).leaf_node.capabilities),
        source=encode.encode_key_package_source(NOW - HOUR, NOW + DAY), version=2,
    )
    assert "unknown protocol version 2" in await refused_upload(spec.encode(), 400, "invalid-key-package")
    # another client's handle
    message = await refused_upload(Device(b"mallory").key_package(), 422, "key-package-mismatch")
    assert "'mallory'" in message and "'alice'" in message
    # not a KeyPackage at all
    await refused_upload(b"\x00\x01\x00\x05" + b"\x00" * 20, 400, "invalid-key-package")
    await refused_upload(good[:-1], 400, "invalid-key-package")
    await refused_upload(good + b"\x00", 400, "invalid-key-package")
    await refused_upload(encode.make_private_message(group_id=b"g", epoch=0), 400, "invalid-key-package")
    refused(await gw.api("PATCH", client_path(alice) + f"/queues/{queue}", {"keyPackages": ["%%%"]}),
            400, "bad-request")
    refused(await gw.api("PATCH", client_path(alice) + f"/queues/{queue}", {"keyPackages": [""]}),
            400, "bad-request")
    # signatures that do not verify
    forged = bytearray(good)
    forged[-1] ^= 1
    assert "does not verify" in await refused_upload(bytes(forged), 422, "invalid-key-package")
    leaf_forged = KeyPackageSpec(
        signing_key=device.key, init_key=bytes(32), encryption_key=bytes(range(32)),
        credential=encode.encode_basic_credential(b"alice"),
        capabilities=encode.encode_capabilities(parse_key_package_message(good).leaf_node.capabilities),
        source=encode.encode_key_package_source(NOW - HOUR, NOW + DAY), leaf_signature=bytes(64),
    )
    await refused_upload(leaf_forged.message(), 422, "invalid-key-package")
    # expired
    message = await refused_upload(device.key_package(not_before=NOW - DAY, not_after=NOW - 1), 422,
                                   "key-package-expired")
    assert str(NOW - 1) in message
    await refused_upload(device.key_package(not_before=NOW - DAY, not_after=NOW - 1), 422, "key-package-expired",
                         as_final=True)
    # a credential the application's identity provider refuses
    chain = CertificateChain.make()
    assert "x509" in await refused_upload(chain.device().key_package(), 422, "invalid-credential")
    await refused_upload(Device(b"\xff\xfe").key_package(), 422, "invalid-credential")
    # too many in one upload, or in the queue
    refused(await gw.fill(alice, queue, [device.key_package() for _ in range(4)]), 400, "bad-request")
    assert (await gw.fill(alice, queue, [device.key_package() for _ in range(3)])).code == 200
    body = refused(await gw.fill(alice, queue, [device.key_package() for _ in range(2)]), 400,
                   "too-many-key-packages")
    assert "5" in body["message"] and "4" in body["message"]
    # nothing of a refused upload was kept
    queues = {q["queueId"]: q for q in (await gw.ok("GET", client_path(alice) + "/queues"))["queues"]}
    assert queues[queue]["keyPackagesInPool"] == 3 and queues[queue]["hasFinalKey"] is False
    assert queues[version2]["keyPackagesInPool"] == 0
    for bad in ({"keyPackages": "x"}, {"isReset": 1}, {"finalKey": 1}, {"keyPackage": []}):
        refused(await gw.api("PATCH", client_path(alice) + f"/queues/{queue}", bad), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_a_key_package_belongs_to_one_queue(a):
    alice = await a.register(b"alice")
    queue = await a.queue(alice)
    backup = await a.queue(alice, label="backup")
    kp = Device(b"alice").key_package()
    assert (await a.fill(alice, queue, [kp])).code == 200
    body = refused(await a.fill(alice, backup, [kp]), 409, "key-package-exists")
    assert queue in body["message"]
    # also in another application's queue for a client with the same handle
    twin = await a.register(b"alice", app="other")
    refused(await a.fill(twin, await a.queue(twin, app="other"), [kp], app="other"), 409, "key-package-exists")


# claims


@pytest_twisted.ensureDeferred
async def test_claims_go_by_expiry_and_stay_with_their_receiver(a):
    alice = await a.register(b"alice")
    queue = await a.queue(alice)
    device = Device(b"alice")
    late, early, middle = (device.key_package(not_after=NOW + days * DAY) for days in (3, 1, 2))
    assert (await a.fill(alice, queue, [late, early, middle])).json() == {"keyPackagesInPool": 3}
    receivers = [await a.register(name) for name in (b"r1", b"r2", b"r3", b"r4")]
    first = await a.claim(alice, receivers[0])
    assert first.json() == {"keyPackage": b64(early), "isFinalKey": False}
    # the same receiver gets the same KeyPackage again
    assert (await a.claim(alice, receivers[0])).json() == first.json()
    assert claimed(await a.claim(alice, receivers[1])) == middle
    assert claimed(await a.claim(alice, receivers[2])) == late
    assert claimed(await a.claim(alice, receivers[0])) == early
    refused(await a.claim(alice, receivers[3]), 404, "no-key-package")
    queues = (await a.ok("GET", client_path(alice) + "/queues"))["queues"]
    assert queues[0]["keyPackagesInPool"] == 0


@pytest_twisted.ensureDeferred
async def test_claims_skip_expired_and_not_yet_valid_key_packages(a):
    alice = await a.register(b"alice")
    queue = await a.queue(alice)
    device = Device(b"alice")
    soon = device.key_package(not_after=NOW + HOUR)
    later = device.key_package(not_before=NOW + 2 * HOUR, not_after=NOW + DAY)
    assert (await a.fill(alice, queue, [later, soon])).json() == {"keyPackagesInPool": 2}
    r1, r2, r3 = [await a.register(name) for name in (b"r1", b"r2", b"r3")]
    held = claimed(await a.claim(alice, r1))
    assert held == soon
    # later is not yet valid
    refused(await a.claim(alice, r2), 404, "no-key-package")
    a.clock.advance(3 * HOUR)
    # soon has expired, for its holder too; later is valid now
    assert claimed(await a.claim(alice, r1)) == later
    refused(await a.claim(alice, r2), 404, "no-key-package")
    refused(await a.claim(alice, r3), 404, "no-key-package")
    assert (await a.ok("GET", client_path(alice) + "/queues"))["queues"][0]["keyPackagesInPool"] == 0


@pytest_twisted.ensureDeferred
async def test_a_claim_needs_a_matching_queue_and_a_receiver_of_the_application(a):
    alice, bob, _queue, _device, _kps = await with_keys(a, 1)
    refused(await a.claim(alice, bob, suite=3), 404, "no-key-package")
    refused(await a.claim(alice, bob, version=2), 404, "no-key-package")
    refused(await a.claim(alice, bob, label="backup"), 404, "no-key-package")
    refused(await a.claim(UNKNOWN, bob), 404, "not-found")
    refused(await a.claim(alice, UNKNOWN), 404, "not-found")
    carol = await a.register(b"carol", app="other")
    refused(await a.claim(alice, carol), 404, "not-found")
    path = client_path(alice) + "/keyPackage"
    for query in ({"protocolVersion": 1, "cipherSuite": 1},
                  {"cipherSuite": 1, "receiverClientId": bob},
                  {"protocolVersion": "one", "cipherSuite": 1, "receiverClientId": bob},
                  {"protocolVersion": 1, "cipherSuite": 0, "receiverClientId": bob},
                  {"protocolVersion": 1, "cipherSuite": 1, "receiverClientId": "bob"},
                  {"protocolVersion": 1, "cipherSuite": 1, "receiverClientId": bob, "appLabel": "x" * 65},
                  {"protocolVersion": 1, "cipherSuite": 1, "receiverClientId": bob, "app": "chat"},
                  {"protocolVersion": 1, "cipherSuite": 1, "receiverClientId": bob, "domain": "b.example"}):
        refused(await a.api("GET", path, query=query), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_the_final_key_is_given_when_the_queue_is_empty_and_never_consumed(a):
    alice = await a.register(b"alice")
    queue = await a.queue(alice)
    device = Device(b"alice")
    kp, final = device.key_package(), device.key_package(not_after=NOW + 30 * DAY)
    assert (await a.fill(alice, queue, [kp], final=final)).json() == {"keyPackagesInPool": 1}
    r1, r2, r3 = [await a.register(name) for name in (b"r1", b"r2", b"r3")]
    assert (await a.claim(alice, r1)).json() == {"keyPackage": b64(kp), "isFinalKey": False}
    assert (await a.claim(alice, r2)).json() == {"keyPackage": b64(final), "isFinalKey": True}
    assert (await a.claim(alice, r3)).json() == {"keyPackage": b64(final), "isFinalKey": True}
    # a Welcome may use it (more than once): it is never consumed
    await a.create_group(b"g1")
    welcomed = await a.commit(b"g1", 0, welcome_refs=[ref_of(final)])
    assert welcomed.code == 201, welcomed.body
    assert welcomed.json()["welcomed"] == [{"domain": A, "clientId": alice}]
    await a.create_group(b"g2")
    assert (await a.commit(b"g2", 0, welcome_refs=[ref_of(final)])).code == 201
    assert (await a.claim(alice, r2)).json()["isFinalKey"] is True
    assert (await a.claim(alice, await a.register(b"r4"))).json()["isFinalKey"] is True
    welcomes = (await a.ok("GET", client_path(alice) + "/welcome-msgs"))["welcomeMessages"]
    assert [w["groupId"] for w in welcomes] == [group_path(b"g1"), group_path(b"g2")]
    # a new final key replaces it
    newer = device.key_package(not_after=NOW + 60 * DAY)
    assert (await a.fill(alice, queue, final=newer)).json() == {"keyPackagesInPool": 0}
    assert claimed(await a.claim(alice, r3)) == newer
    # and it too expires
    a.clock.advance(61 * DAY)
    refused(await a.claim(alice, r3), 404, "no-key-package")


@pytest_twisted.ensureDeferred
async def test_a_final_key_that_nobody_claimed_cannot_be_welcomed(a):
    alice = await a.register(b"alice")
    device = Device(b"alice")
    final = device.key_package()
    assert (await a.fill(alice, await a.queue(alice), final=final)).code == 200
    await a.create_group(b"g")
    refused(await a.commit(b"g", 0, welcome_refs=[ref_of(final)]), 422, "unknown-key-package")


@pytest_twisted.ensureDeferred
async def test_a_reset_replaces_the_unclaimed_key_packages(a):
    alice, bob, queue, device, _kps = await with_keys(a, 3)
    held = claimed(await a.claim(alice, bob))
    fresh = [device.key_package(not_after=NOW + 2 * DAY), device.key_package(not_after=NOW + 2 * DAY)]
    assert (await a.fill(alice, queue, fresh, reset=True)).json() == {"keyPackagesInPool": 2}
    # bob keeps his; the others get the new ones
    assert claimed(await a.claim(alice, bob)) == held
    others = [claimed(await a.claim(alice, await a.register(n))) for n in (b"r1", b"r2")]
    assert {ref_of(k) for k in others} == {ref_of(k) for k in fresh}
    refused(await a.claim(alice, await a.register(b"r3")), 404, "no-key-package")
    # a reset with nothing empties the pool
    assert (await a.fill(alice, queue, [device.key_package()])).json() == {"keyPackagesInPool": 1}
    assert (await a.fill(alice, queue, reset=True)).json() == {"keyPackagesInPool": 0}


@pytest_twisted.ensureDeferred
async def test_a_welcome_consumes_a_claimed_key_package_once(a):
    alice, bob, queue, device, _kps = await with_keys(a, 2)
    first = claimed(await a.claim(alice, bob))
    await a.create_group(b"g")
    answer = await a.commit(b"g", 0, welcome_refs=[ref_of(first)])
    assert answer.code == 201, answer.body
    assert answer.json() == {"epoch": 1, "welcomed": [{"domain": A, "clientId": alice}], "queued": [], "failed": []}
    # consumed: bob's next claim gets another one, and no Welcome may use it again
    second = claimed(await a.claim(alice, bob))
    assert second != first
    body = refused(await a.commit(b"g", 1, welcome_refs=[ref_of(first)]), 422, "unknown-key-package")
    assert body["data"] == {"keyPackageRefs": [ref_of(first).hex()]}
    # an unclaimed one cannot be used either
    extra = device.key_package()
    assert (await a.fill(alice, queue, [extra])).code == 200
    refused(await a.commit(b"g", 1, welcome_refs=[ref_of(extra)]), 422, "unknown-key-package")
    # nothing of the refused commits was kept
    assert (await a.ok("GET", group_route(b"g", "group-info")))["epoch"] == 1


# welcome messages


@pytest_twisted.ensureDeferred
async def test_welcome_messages_since_an_id(a):
    alice, bob, _queue, _device, _kps = await with_keys(a, 3)
    refs = []
    for i, receiver in enumerate([bob, await a.register(b"r1"), await a.register(b"r2")]):
        refs.append(ref_of(claimed(await a.claim(alice, receiver))))
        group = f"g{i}".encode()
        await a.create_group(group)
        assert (await a.commit(group, 0, welcome_refs=[refs[-1]])).code == 201
    messages = (await a.ok("GET", client_path(alice) + "/welcome-msgs"))["welcomeMessages"]
    assert [(m["domain"], m["groupId"], m["epoch"]) for m in messages] == [
        (A, group_path(b"g0"), 1), (A, group_path(b"g1"), 1), (A, group_path(b"g2"), 1)]
    assert unb64(messages[0]["welcomePacket"])[:4] == b"\x00\x01\x00\x03"  # an MLSMessage of a Welcome
    since = await a.ok("GET", client_path(alice) + "/welcome-msgs", query={"since": messages[0]["id"]})
    assert since["welcomeMessages"] == messages[1:]
    assert (await a.ok("GET", client_path(alice) + "/welcome-msgs",
                       query={"since": messages[-1]["id"]}))["welcomeMessages"] == []
    assert (await a.ok("GET", client_path(bob) + "/welcome-msgs"))["welcomeMessages"] == []
    refused(await a.api("GET", client_path(alice) + "/welcome-msgs", query={"since": "-1"}), 400, "bad-request")
    refused(await a.api("GET", client_path(UNKNOWN) + "/welcome-msgs"), 404, "not-found")


# groups


@pytest_twisted.ensureDeferred
async def test_creating_and_reading_a_group(a):
    key = nacl.signing.SigningKey.generate()
    group_id = await a.create_group(b"\xfa\xfb group", key=key, tree=b"tree-0")
    assert group_id == group_path(b"\xfa\xfb group") and "=" not in group_id
    info = await a.ok("GET", group_route(b"\xfa\xfb group", "group-info"))
    assert info["groupId"] == group_id and info["epoch"] == 0 and unb64(info["ratchetTree"]) == b"tree-0"
    assert unb64(info["groupInfo"])[:4] == b"\x00\x01\x00\x04"
    await a.create_group(b"treeless")
    assert "ratchetTree" not in await a.ok("GET", group_route(b"treeless", "group-info"))
    # the same id again, by any application
    for app in ("chat", "other"):
        body = {"groupInfo": b64(encode.make_group_info(key, group_id=b"\xfa\xfb group", epoch=0))}
        refused(await a.api("PUT", f"/apps/{a.app_id(app)}/groups", body, app=app), 409, "group-exists")
    # another application does not see it
    refused(await a.api("GET", group_route(b"\xfa\xfb group", "group-info", OTHER), app="other"), 404, "not-found")


@pytest_twisted.ensureDeferred
async def test_group_creation_refusals(a):
    key = nacl.signing.SigningKey.generate()
    path = f"/apps/{CHAT}/groups"
    body = refused(await a.api("PUT", path, {"groupInfo": b64(encode.make_group_info(key, group_id=b"g", epoch=3))}),
                   422, "bad-epoch")
    assert "epoch 3" in body["message"]
    refused(await a.api("PUT", path, {"groupInfo": b64(b"\x00\x01\x00\x04garbage")}), 400, "invalid-mls-message")
    refused(await a.api("PUT", path, {"groupInfo": b64(commit_message(b"g", 0))}), 400, "invalid-mls-message")
    for bad in ({}, {"groupInfo": "***"}, {"groupInfo": b64(b"x"), "ratchetTree": 5},
                {"groupInfo": b64(b"x"), "epoch": 0}):
        refused(await a.api("PUT", path, bad), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_group_paths_are_canonical_base64url(a):
    await a.create_group(b"\xff\xfe")
    assert group_path(b"\xff\xfe") == "__4"
    for bad in ("__4=", "__5", "a+b", "a.b"):
        refused(await a.api("GET", f"/apps/{CHAT}/groups/{bad}/group-info"), 400, "bad-request")
    refused(await a.api("GET", f"/apps/{CHAT}/groups/{'A' * 400}/group-info"), 400, "bad-request")
    refused(await a.api("GET", group_route(b"nope", "group-info")), 404, "not-found")


@pytest_twisted.ensureDeferred
async def test_proposals_of_the_current_epoch(gateways):
    gw = gateways(A, proposals_per_epoch=2)
    await gw.create_group(b"g")
    route = group_route(b"g", "proposals")
    first, second = proposal_message(b"g", 0), proposal_message(b"g", 0)
    assert await gw.ok("PUT", route, {"proposal": b64(first)}, code=201) == {"epoch": 0}
    assert await gw.ok("PUT", route, {"proposal": b64(second)}, code=201) == {"epoch": 0}
    assert await gw.ok("GET", route) == {"epoch": 0, "proposals": [b64(first), b64(second)], "truncated": False}
    body = refused(await gw.api("PUT", route, {"proposal": b64(proposal_message(b"g", 0))}), 400,
                   "too-many-proposals")
    assert "2 proposals" in body["message"]
    # a PrivateMessage proposal is as good
    assert (await gw.commit(b"g", 0)).code == 201
    private = encode.make_private_message(group_id=b"g", epoch=1, content_type=CONTENT_PROPOSAL)
    assert await gw.ok("PUT", route, {"proposal": b64(private)}, code=201) == {"epoch": 1}
    assert await gw.ok("GET", route) == {"epoch": 1, "proposals": [b64(private)], "truncated": False}
    body = refused(await gw.api("PUT", route, {"proposal": b64(proposal_message(b"g", 0))}), 409, "stale-epoch")
    assert body["data"] == {"currentEpoch": 1}
    refused(await gw.api("PUT", route, {"proposal": b64(proposal_message(b"g", 2))}), 409, "stale-epoch")


@pytest_twisted.ensureDeferred
async def test_proposal_refusals(a):
    await a.create_group(b"g")
    route = group_route(b"g", "proposals")
    body = refused(await a.api("PUT", route, {"proposal": b64(commit_message(b"g", 0))}), 422, "wrong-content-type")
    assert "not a proposal" in body["message"]
    application = encode.make_private_message(group_id=b"g", epoch=0, content_type=CONTENT_APPLICATION)
    refused(await a.api("PUT", route, {"proposal": b64(application)}), 422, "wrong-content-type")
    body = refused(await a.api("PUT", route, {"proposal": b64(proposal_message(b"h", 0))}), 422, "wrong-group")
    assert group_path(b"h") in body["message"]
    refused(await a.api("PUT", route, {"proposal": b64(b"\x00\x01\x00\x01")}), 400, "invalid-mls-message")
    refused(await a.api("PUT", route, {"proposal": b64(encode.make_welcome(cipher_suite=1,
                                                                          key_package_refs=[bytes(32)]))}),
            400, "invalid-mls-message")
    refused(await a.api("PUT", route, {}), 400, "bad-request")
    refused(await a.api("PUT", group_route(b"h", "proposals"), {"proposal": b64(proposal_message(b"h", 0))}),
            404, "not-found")
    refused(await a.api("GET", group_route(b"h", "proposals")), 404, "not-found")


@pytest_twisted.ensureDeferred
async def test_commits_move_the_epoch_and_are_kept(a):
    key = nacl.signing.SigningKey.generate()
    await a.create_group(b"g", key=key, tree=b"tree-0")
    commits = []
    for epoch in range(3):
        commits.append(commit_message(b"g", epoch, public=epoch == 1))
        body: Dict[str, Any] = {"commitPacket": b64(commits[-1])}
        if epoch == 2:
            body["groupInfo"] = b64(encode.make_group_info(key, group_id=b"g", epoch=3))
            body["ratchetTree"] = b64(b"tree-3")
        answer = await a.ok("PUT", group_route(b"g", "epochs"), body, code=201)
        assert answer == {"epoch": epoch + 1, "welcomed": [], "queued": [], "failed": []}
    info = await a.ok("GET", group_route(b"g", "group-info"))
    assert info["epoch"] == 3 and unb64(info["ratchetTree"]) == b"tree-3"
    assert unb64(info["groupInfo"]) == unb64(body["groupInfo"])
    route = group_route(b"g", "control-msgs")
    everything = await a.ok("GET", route)
    assert everything == {"epoch": 3, "messages": [{"epoch": e, "commitPacket": b64(c)}
                                                   for e, c in enumerate(commits)], "truncated": False}
    assert [m["epoch"] for m in (await a.ok("GET", route, query={"startEpochId": 1}))["messages"]] == [1, 2]
    assert [m["epoch"] for m in (await a.ok("GET", route, query={"startEpochId": 0, "endEpochId": 1}))[
        "messages"]] == [0, 1]
    assert (await a.ok("GET", route, query={"startEpochId": 5}))["messages"] == []
    refused(await a.api("GET", route, query={"startEpochId": 2, "endEpochId": 1}), 400, "bad-request")
    refused(await a.api("GET", route, query={"startEpochId": "x"}), 400, "bad-request")
    refused(await a.api("GET", route, query={"epoch": 1}), 400, "bad-request")
    refused(await a.api("GET", group_route(b"h", "control-msgs")), 404, "not-found")


@pytest_twisted.ensureDeferred
async def test_commit_refusals(a):
    key = nacl.signing.SigningKey.generate()
    await a.create_group(b"g", key=key)
    route = group_route(b"g", "epochs")
    assert (await a.commit(b"g", 0)).code == 201
    body = refused(await a.commit(b"g", 0), 409, "stale-epoch")
    assert body["data"] == {"currentEpoch": 1}
    body = refused(await a.commit(b"g", 7), 409, "stale-epoch")
    assert body["data"] == {"currentEpoch": 1}
    refused(await a.api("PUT", route, {"commitPacket": b64(proposal_message(b"g", 1))}), 422, "wrong-content-type")
    refused(await a.api("PUT", route, {"commitPacket": b64(commit_message(b"h", 1))}), 422, "wrong-group")
    refused(await a.api("PUT", route, {"commitPacket": b64(b"garbage")}), 400, "invalid-mls-message")
    wrong_info = encode.make_group_info(key, group_id=b"g", epoch=1)
    body = refused(await a.commit(b"g", 1, groupInfo=b64(wrong_info)), 422, "bad-epoch")
    assert "epoch 2" in body["message"]
    other_group = encode.make_group_info(key, group_id=b"h", epoch=2)
    refused(await a.commit(b"g", 1, groupInfo=b64(other_group)), 422, "bad-epoch")
    refused(await a.commit(b"g", 1, groupInfo=b64(b"junk")), 400, "invalid-mls-message")
    refused(await a.commit(b"g", 1, welcomePacket=b64(b"\x00\x01\x00\x03junk")), 400, "invalid-mls-message")
    welcome = encode.make_welcome(cipher_suite=3, key_package_refs=[bytes(32)])
    body = refused(await a.commit(b"g", 1, welcomePacket=b64(welcome)), 422, "key-package-mismatch")
    assert "cipher suite 3" in body["message"]
    body = refused(await a.commit(b"g", 1, welcome_refs=[bytes(32), b"\x01" * 32]), 422, "unknown-key-package")
    assert body["data"] == {"keyPackageRefs": [bytes(32).hex(), (b"\x01" * 32).hex()]}
    for bad in ({}, {"commitPacket": "!"}, {"commitPacket": b64(commit_message(b"g", 1)), "extra": 1},
                {"commitPacket": b64(commit_message(b"g", 1)), "ratchetTree": ""}):
        refused(await a.api("PUT", route, bad), 400, "bad-request")
    refused(await a.commit(b"h", 0), 404, "not-found")
    refused(await a.commit(b"g", 1, app="other"), 404, "not-found")
    # none of it moved the group
    assert (await a.ok("GET", group_route(b"g", "group-info")))["epoch"] == 1


# applications of one gateway


@pytest_twisted.ensureDeferred
async def test_an_application_reads_and_claims_from_another_with_the_same_identity_configuration(a):
    alice, bob, _queue, _device, kps = await with_keys(a, 2)
    carol = await a.register(b"carol", app="other")
    # chat uses provider simple, other plain: both basic
    listed = await a.ok("GET", f"/apps/{OTHER}/clients", query={"tag": "account:alice", "app": CHAT}, app="other")
    assert [c["clientId"] for c in listed["identities"]] == [alice]
    kp = claimed(await a.claim(alice, carol, app="other", of=CHAT))
    assert ref_of(kp) == ref_of(kps[0])
    # other commits a Welcome for alice's KeyPackage: chat's client alice gets it
    await a.create_group(b"shared", app="other")
    answer = await a.commit(b"shared", 0, app="other", welcome_refs=[ref_of(kp)])
    assert answer.code == 201 and answer.json()["welcomed"] == [{"domain": A, "clientId": alice}]
    welcomes = (await a.ok("GET", client_path(alice) + "/welcome-msgs"))["welcomeMessages"]
    assert [w["groupId"] for w in welcomes] == [group_path(b"shared")]
    # and chat reads other's group
    info = await a.ok("GET", group_route(b"shared", "group-info"), query={"app": OTHER})
    assert info["epoch"] == 1
    # naming oneself is the same as not naming anyone
    assert (await a.ok("GET", f"/apps/{CHAT}/clients", query={"tag": "account:bob", "app": CHAT}))[
        "identities"][0]["clientId"] == bob
    refused(await a.api("GET", f"/apps/{CHAT}/clients", query={"tag": "t", "app": UNKNOWN}), 404, "not-found")
    refused(await a.api("GET", group_route(b"shared", "group-info"), query={"app": UNKNOWN}), 404, "not-found")


@pytest_twisted.ensureDeferred
async def test_applications_with_other_identity_configurations_do_not_read_each_other(gateways, tmp_path):
    chain = CertificateChain.make()
    gw = gateways(A, apps=[*DEFAULT_APPS, AppSpec("certs", CERTS, provider="devices")],
                  providers=x509_providers(tmp_path / A, chain))
    alice = await gw.register(b"alice")
    phone = await gw.register(b"phone", ["account:alice"], app="certs")
    certs = await gw.ok("GET", f"/apps/{CERTS}", app="certs")
    root = hashlib.sha256(chain.root.public_bytes(Encoding.DER)).hexdigest()
    assert certs["identityConfiguration"] == {
        "type": "x509",
        "parameters": {"deviceRange": [0, 0], "accountOffset": 1, "domainOffset": 2, "trustRoots": [root]},
    }
    body = refused(await gw.api("GET", f"/apps/{CHAT}/clients", query={"tag": "account:alice", "app": CERTS}),
                   409, "identity-mismatch")
    assert CERTS in body["message"] and "x509" in body["message"]
    refused(await gw.claim(phone, alice, of=CERTS), 409, "identity-mismatch")
    await gw.create_group(b"g", app="certs")
    refused(await gw.api("GET", group_route(b"g", "group-info"), query={"app": CERTS}), 409, "identity-mismatch")
    refused(await gw.api("GET", f"/apps/{CERTS}/clients", query={"tag": "t", "app": CHAT}, app="certs"),
            409, "identity-mismatch")


# x509 credentials


@pytest_twisted.ensureDeferred
async def test_x509_key_packages(gateways, tmp_path):
    chain = CertificateChain.make()
    gw = gateways(A, apps=[AppSpec("certs", CERTS, provider="devices")], providers=x509_providers(tmp_path / A, chain))
    phone = await gw.register(b"phone", ["account:alice"], app="certs")
    reader = await gw.register(b"reader", app="certs")
    queue = await gw.queue(phone, app="certs")
    device = chain.device()
    good = device.key_package()
    answer = await gw.fill(phone, queue, [good], app="certs")
    assert answer.json() == {"keyPackagesInPool": 1}, answer.body
    kp = parse_key_package_message(claimed(await gw.claim(phone, reader, app="certs")))
    assert kp.credential.certificates == tuple(chain.ders)

    async def refusal(kp: bytes, label: str = "invalid-credential") -> str:
        return str(refused(await gw.fill(phone, queue, [kp], app="certs"), 422, label)["message"])

    # the chain must be valid at the gateway's time
    expired = CertificateChain.make(root=(chain.root, chain.root_key), leaf_until=NOW - HOUR)
    assert "expired" in await refusal(expired.device().key_package())
    future = CertificateChain.make(root=(chain.root, chain.root_key), leaf_from=NOW + DAY)
    assert "not yet valid" in await refusal(future.device().key_package())
    stranger = CertificateChain.make(domain="elsewhere.example")
    assert "trust root" in await refusal(stranger.device().key_package())
    # the handle is the leaf's CN
    tablet = CertificateChain.make(root=(chain.root, chain.root_key), device="tablet")
    assert "'tablet'" in await refusal(tablet.device().key_package(), "key-package-mismatch")
    # a basic credential is not for this provider
    assert "basic" in await refusal(Device(b"phone").key_package())
    # the leaf's key must be the key that signs: else anyone could use alice's (public) chain
    thief = chain.device(key=nacl.signing.SigningKey.generate())
    assert "signature_key" in await refusal(thief.key_package())
    # a chain without the root is too short for domain_offset = 2
    short = Device(identity=None, certificates=chain.ders[:2], key=device.key)
    assert "offset 2" in await refusal(short.key_package())


# concurrency


@pytest_twisted.ensureDeferred
async def test_concurrent_claims_never_share_a_key_package(a):
    alice, _, _queue, _device, kps = await with_keys(a, 10)
    receivers = [await a.register(f"r{i}".encode()) for i in range(20)]
    answers: List[HTTPAnswer] = await parallel(*(a.claim(alice, r) for r in receivers))
    given = [claimed(x) for x in answers if x.code == 200]
    assert len(given) == 10 and len({ref_of(k) for k in given}) == 10
    assert {ref_of(k) for k in given} == {ref_of(k) for k in kps}
    for x in answers:
        if x.code != 200:
            refused(x, 404, "no-key-package")
    # each receiver holds its own
    again: List[HTTPAnswer] = await parallel(*(a.claim(alice, r) for r in receivers))
    assert [x.body for x in again] == [x.body for x in answers]


@pytest_twisted.ensureDeferred
async def test_concurrent_claims_with_a_final_key(a):
    alice = await a.register(b"alice")
    queue = await a.queue(alice)
    device = Device(b"alice")
    kps = [device.key_package() for _ in range(10)]
    final = device.key_package(not_after=NOW + 30 * DAY)
    assert (await a.fill(alice, queue, kps, final=final)).code == 200
    receivers = [await a.register(f"r{i}".encode()) for i in range(20)]
    answers = [x.json() for x in await parallel(*(a.claim(alice, r) for r in receivers))]
    pooled = [unb64(x["keyPackage"]) for x in answers if not x["isFinalKey"]]
    finals = [unb64(x["keyPackage"]) for x in answers if x["isFinalKey"]]
    assert len({ref_of(k) for k in pooled}) == 10 and len(pooled) == 10
    assert finals == [final] * 10


@pytest_twisted.ensureDeferred
async def test_concurrent_commits_for_one_epoch(a):
    await a.create_group(b"g")
    answers = await parallel(*(a.commit(b"g", 0) for _ in range(10)))
    assert sorted(x.code for x in answers) == [201] + [409] * 9
    for x in answers:
        if x.code == 409:
            assert refused(x, 409, "stale-epoch")["data"] == {"currentEpoch": 1}
    assert len((await a.ok("GET", group_route(b"g", "control-msgs")))["messages"]) == 1


# two gateways


@pytest.fixture
def pair(gateways):
    a, b = gateways(A), gateways(B, apps=APPS_B)
    network = federate([a, b])
    return a, b, network


@pytest_twisted.ensureDeferred
async def test_listing_another_gateways_applications_and_clients(pair):
    a, b, network = pair
    bob = await b.register(b"bob", ["account:bob"])
    listed = await a.ok("GET", "/apps", query={"domain": B})
    assert listed == {"apps": [{"appId": CHAT_B, "name": "chat", "identityConfiguration": {"type": "basic"}},
                               {"appId": OTHER_B, "name": "other", "identityConfiguration": {"type": "basic"}}]}
    clients = await a.ok("GET", f"/apps/{CHAT}/clients", query={"tag": "account:bob", "domain": B, "app": CHAT_B})
    assert clients == {"identities": [{"clientId": bob, "clientIdentity": b64(b"bob"), "tags": ["account:bob"]}]}
    # through the pipeline, as the mimi component
    assert {(t, r.path) for t, r in network.sent} == {
        (f"fed.{B}", "/federation/mimi/list-apps"), (f"fed.{B}", "/federation/mimi/list-clients")}
    body = json.loads(network.sent[1][1].body)
    assert body["requester"] == {"appId": CHAT, "identityConfiguration": {"type": "basic"}}
    refused(await a.api("GET", f"/apps/{CHAT}/clients", query={"tag": "t", "domain": B}), 400, "bad-request")
    refused(await a.api("GET", f"/apps/{LOCAL}/clients", query={"tag": "t", "domain": B, "app": CHAT_B}, app="local"),
            403, "federation-disabled")
    refused(await a.api("GET", "/apps", query={"domain": B}, app="local"), 403, "federation-disabled")
    # b's local application does not federate: it is not listed and not readable
    body = refused(await a.api("GET", f"/apps/{CHAT}/clients", query={"tag": "t", "domain": B, "app": LOCAL_B}),
                   533, "federation-remote-error")
    assert body["inner"]["label"] == "not-found" and body["data"]["domain"] == B


@pytest_twisted.ensureDeferred
async def test_claiming_from_another_gateway_and_welcoming_there(pair):
    a, b, _network = pair
    bob, _carol, _queue, _device, kps = await with_keys(b, 2, owner=b"bob", other=b"carol")
    alice = await a.register(b"alice")
    answer = await a.claim(bob, alice, domain=B, of=CHAT_B)
    kp = claimed(answer)
    assert answer.json()["isFinalKey"] is False and ref_of(kp) == ref_of(kps[0])
    # the same receiver gets the same one
    assert claimed(await a.claim(bob, alice, domain=B, of=CHAT_B)) == kp
    # a reads its own group's info, b reads it across
    key = nacl.signing.SigningKey.generate()
    await a.create_group(b"cross", key=key, tree=b"tree")
    info = await b.ok("GET", group_route(b"cross", "group-info", CHAT_B), query={"domain": A, "app": CHAT})
    assert info["groupId"] == group_path(b"cross") and info["epoch"] == 0 and unb64(info["ratchetTree"]) == b"tree"
    # a's commit welcomes b's client: the Welcome goes to b, which files it for bob
    answer = await a.commit(b"cross", 0, welcome_refs=[ref_of(kp)])
    assert answer.code == 201, answer.body
    assert answer.json() == {"epoch": 1, "welcomed": [{"domain": B, "clientId": bob}], "queued": [], "failed": []}
    welcomes = (await b.ok("GET", client_path(bob, CHAT_B) + "/welcome-msgs"))["welcomeMessages"]
    assert [(w["domain"], w["groupId"], w["epoch"]) for w in welcomes] == [(A, group_path(b"cross"), 1)]
    # consumed at b: the next claim for alice gets the other one
    assert ref_of(claimed(await a.claim(bob, alice, domain=B, of=CHAT_B))) == ref_of(kps[1])
    assert (await b.ok("GET", group_route(b"cross", "group-info", CHAT_B), query={"domain": A, "app": CHAT}))[
        "epoch"] == 1
    refused(await b.api("GET", group_route(b"cross", "group-info", CHAT_B), query={"domain": A}), 400, "bad-request")
    body = refused(await b.api("GET", group_route(b"nope", "group-info", CHAT_B), query={"domain": A, "app": CHAT}),
                   533, "federation-remote-error")
    assert body["inner"]["label"] == "not-found"


@pytest_twisted.ensureDeferred
async def test_a_welcome_for_both_gateways_and_a_final_key_across(pair):
    a, b, _network = pair
    bob = await b.register(b"bob")
    device = Device(b"bob")
    final = device.key_package(not_after=NOW + 30 * DAY)
    assert (await b.fill(bob, await b.queue(bob), final=final)).code == 200
    alice, dave, _queue, _local_device, _kps = await with_keys(a, 1)
    got = await a.claim(bob, alice, domain=B, of=CHAT_B)
    assert got.json() == {"keyPackage": b64(final), "isFinalKey": True}
    local = claimed(await a.claim(alice, dave))
    await a.create_group(b"g")
    answer = await a.commit(b"g", 0, welcome_refs=[ref_of(local), ref_of(final)])
    assert answer.code == 201, answer.body
    assert answer.json()["welcomed"] == [{"domain": A, "clientId": alice}, {"domain": B, "clientId": bob}]
    assert len((await b.ok("GET", client_path(bob, CHAT_B) + "/welcome-msgs"))["welcomeMessages"]) == 1


@pytest_twisted.ensureDeferred
async def test_a_welcome_that_cannot_be_delivered_is_reported_and_the_commit_stands(pair):
    a, b, network = pair
    bob, *_ = await with_keys(b, 1, owner=b"bob", other=b"carol")
    alice = await a.register(b"alice")
    kp = claimed(await a.claim(bob, alice, domain=B, of=CHAT_B))
    await a.create_group(b"g")
    network.down.add(f"fed.{B}")
    answer = await a.commit(b"g", 0, welcome_refs=[ref_of(kp)])
    assert answer.code == 201
    result = answer.json()
    assert result["epoch"] == 1 and result["welcomed"] == [] and result["failed"] == []
    # the Welcome waits in the durable outbound queue
    [queued] = result["queued"]
    assert queued["domain"] == B and queued["error"]["label"] == "federation-connection-refused"
    assert (await a.ok("GET", group_route(b"g", "group-info")))["epoch"] == 1
    refused(await a.claim(bob, alice, domain=B, of=CHAT_B), 521, "federation-connection-refused")
    # b is back: the first call b answers ends the backoff, and bob gets the Welcome once
    network.down.clear()
    assert (await a.ok("GET", "/apps", query={"domain": B}))["apps"]

    async def bob_welcomed() -> bool:
        return len((await b.ok("GET", client_path(bob, CHAT_B) + "/welcome-msgs"))["welcomeMessages"]) == 1

    await eventually(bob_welcomed, what="the Welcome at b")
    # b refuses the next Welcome for good: its client is gone
    dave = await b.register(b"dave")
    queue = await b.queue(dave)
    assert (await b.fill(dave, queue, [Device(b"dave").key_package()])).code == 200
    kp = claimed(await a.claim(dave, alice, domain=B, of=CHAT_B))
    assert (await b.ok("DELETE", client_path(dave, CHAT_B))) == {}
    result = (await a.commit(b"g", 1, welcome_refs=[ref_of(kp)])).json()
    assert result["epoch"] == 2 and result["welcomed"] == []
    error = result["failed"][0]["error"]
    assert (error["label"], error["inner"]["label"]) == ("federation-remote-error", "unknown-key-package")


@pytest_twisted.ensureDeferred
async def test_the_claimer_checks_the_key_package_it_is_given(pair, tmp_path):
    a, b, _network = pair
    bob, _, _, _, kps = await with_keys(b, 1, owner=b"bob", other=b"carol")
    alice = await a.register(b"alice")
    connection = sqlite3.connect(str(tmp_path / f"{B}.sqlite"))
    try:
        data = connection.execute("SELECT data FROM mimi_key_packages").fetchone()[0]
        connection.execute("UPDATE mimi_key_packages SET data = ?", (data[:-1] + bytes([data[-1] ^ 1]),))
        connection.commit()
    finally:
        connection.close()
    body = refused(await a.claim(bob, alice, domain=B, of=CHAT_B), 533, "federation-unexpected-body")
    assert "does not verify" in body["message"] and B in body["message"]
    # nothing was recorded as claimed from b
    await a.create_group(b"g")
    refused(await a.commit(b"g", 0, welcome_refs=[ref_of(kps[0])]), 422, "unknown-key-package")


@pytest_twisted.ensureDeferred
async def test_claiming_across_is_refused_for_another_identity_configuration(gateways, tmp_path):
    chain = CertificateChain.make()
    a = gateways(A)
    b = gateways(B, apps=[AppSpec("certs", CERTS, provider="devices")], providers=x509_providers(tmp_path / B, chain))
    federate([a, b])
    phone = await b.register(b"phone", app="certs")
    alice = await a.register(b"alice")
    body = refused(await a.claim(phone, alice, domain=B, of=CERTS), 533, "federation-remote-error")
    assert body["inner"]["label"] == "identity-mismatch"
    body = refused(await a.api("GET", f"/apps/{CHAT}/clients", query={"tag": "t", "domain": B, "app": CERTS}),
                   533, "federation-remote-error")
    assert body["inner"]["label"] == "identity-mismatch"
    listed = await a.ok("GET", "/apps", query={"domain": B})
    assert listed["apps"][0]["identityConfiguration"]["type"] == "x509"
    refused(await a.claim(phone, alice, domain=B, of=UNKNOWN), 533, "federation-remote-error")


@pytest_twisted.ensureDeferred
async def test_deliver_welcome_refusals(pair):
    a, b, _network = pair
    bob, _, _, _, kps = await with_keys(b, 2, owner=b"bob", other=b"carol")
    alice = await a.register(b"alice")
    kp = claimed(await a.claim(bob, alice, domain=B, of=CHAT_B))
    welcome = encode.make_welcome(cipher_suite=1, key_package_refs=[ref_of(kp)])
    body = {"groupId": group_path(b"g"), "epoch": 1, "welcome": b64(welcome)}

    async def answer(value: Any, origin: str = A, code: int = 200, label: str = "") -> Any:
        response = await b.call("deliver-welcome", value, origin=origin)
        decoded = answer_json(response)
        assert response.code == code, decoded
        if label:
            assert decoded["label"] == label, decoded
        return decoded

    # only a, which claimed it, may deliver a Welcome for it
    await answer(body, origin="c.example", code=422, label="unknown-key-package")
    unclaimed = encode.make_welcome(cipher_suite=1, key_package_refs=[ref_of(kps[1]), bytes(32)])
    await answer({**body, "welcome": b64(unclaimed)}, code=422, label="unknown-key-package")
    await answer({**body, "welcome": b64(b"\x00\x01\x00\x03x")}, code=400, label="invalid-mls-message")
    await answer({**body, "welcome": b64(commit_message(b"g", 0))}, code=400, label="invalid-mls-message")
    await answer({**body, "groupId": "a=b"}, code=400, label="bad-request")
    await answer({**body, "epoch": 0}, code=400, label="bad-request")
    await answer({"groupId": group_path(b"g"), "epoch": 1}, code=400, label="bad-request")
    await answer([1], code=400, label="bad-request")
    response = await b.call("deliver-welcome", None, origin=A, raw=b"{")
    assert response.code == 400 and answer_json(response)["label"] == "bad-request"
    # the real one, twice: delivered once
    assert await answer(body) == {"welcomed": [bob]}
    assert await answer(body) == {"welcomed": [bob]}
    assert len((await b.ok("GET", client_path(bob, CHAT_B) + "/welcome-msgs"))["welcomeMessages"]) == 1
    response = await b.call("no-such-rpc", {}, origin=A)
    assert response.code == 404 and answer_json(response)["label"] == "no-endpoint"


@pytest_twisted.ensureDeferred
async def test_external_rpc_refusals(pair):
    _, b, _network = pair
    requester = {"appId": CHAT, "identityConfiguration": {"type": "basic"}}

    async def label_of(rpc: str, body: Any) -> str:
        response = await b.call(rpc, body, origin=A)
        assert response.code >= 400
        return str(answer_json(response)["label"])

    assert await label_of("list-clients", {"appId": CHAT_B, "tag": "t"}) == "bad-request"
    assert await label_of("list-clients", {"appId": CHAT_B, "tag": "t", "requester": {}}) == "bad-request"
    assert await label_of("list-clients", {"appId": "x", "tag": "t", "requester": requester}) == "bad-request"
    assert await label_of("list-clients", {"appId": LOCAL_B, "tag": "t", "requester": requester}) == "not-found"
    assert await label_of("list-clients", {"appId": CHAT_B, "tag": "t", "requester": {
        "appId": CHAT, "identityConfiguration": {"type": "x509"}}}) == "identity-mismatch"
    claim = {"appId": CHAT_B, "clientId": UNKNOWN, "protocolVersion": 1, "cipherSuite": 1,
             "receiverClientId": UNKNOWN, "requester": requester}
    assert await label_of("claim-key-package", claim) == "not-found"
    assert await label_of("claim-key-package", {**claim, "cipherSuite": "1"}) == "bad-request"
    assert await label_of("group-info", {"appId": CHAT_B, "groupId": "x=", "requester": requester}) == "bad-request"
    assert await label_of("group-info", {"appId": CHAT_B, "groupId": "eA", "requester": requester}) == "not-found"
    # newer peers may add fields
    response = await b.call("list-clients", {"appId": CHAT_B, "tag": "t", "requester": requester, "new": 1},
                            origin=A)
    assert response.code == 200 and answer_json(response) == {"identities": []}
    response = await b.call("list-apps", {}, origin=A)
    assert [x["appId"] for x in answer_json(response)["apps"]] == [CHAT_B, OTHER_B]


# robustness: whatever the body or the query, a labelled answer and never a 500

JSON_LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | st.floats(allow_nan=False) | st.text(max_size=20)
               | st.binary(min_size=1, max_size=40).map(b64))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
_SIGNER = nacl.signing.SigningKey.generate()
_KEY_PACKAGE = Device(b"alice").key_package()
MLS_SAMPLES = [
    _KEY_PACKAGE,
    encode.make_group_info(_SIGNER, group_id=b"g", epoch=0),
    encode.make_group_info(_SIGNER, group_id=b"g", epoch=1),
    commit_message(b"g", 0),
    commit_message(b"g", 0, public=True),
    proposal_message(b"g", 0),
    encode.make_welcome(cipher_suite=1, key_package_refs=[ref_of(_KEY_PACKAGE)]),
]


@st.composite
def mls_values(draw: Any) -> str:
    """A real MLS message, as it is or with one byte changed or cut short, in base64."""
    data = bytearray(draw(st.sampled_from(MLS_SAMPLES)))
    change = draw(st.sampled_from(["none", "flip", "cut"]))
    position = draw(st.integers(min_value=0, max_value=len(data) - 1))
    if change == "flip":
        data[position] ^= draw(st.integers(min_value=1, max_value=255))
    elif change == "cut":
        del data[max(position, 1):]
    return b64(bytes(data))


_TAGS = st.lists(st.text(max_size=8), max_size=4)
_SMALL = st.sampled_from([1, 1, 1, 3, 0, 65536])
#: plausible values of each key, and now and then anything at all
VALUES = {key: st.one_of(plausible, plausible, plausible, JSON_VALUES) for key, plausible in {
    "name": st.text(max_size=10), "identityProvider": st.sampled_from(["simple", "plain", "nope"]),
    "federate": st.booleans(), "clientHandle": st.text(min_size=1, max_size=10).map(lambda t: b64(t.encode())),
    "tags": _TAGS, "tagsToAdd": _TAGS, "tagsToRemove": _TAGS, "protocolVersion": _SMALL, "cipherSuite": _SMALL,
    "appLabel": st.text(max_size=8), "keyPackages": st.lists(mls_values(), max_size=3), "isReset": st.booleans(),
    "finalKey": mls_values(), "groupInfo": mls_values(), "ratchetTree": st.binary(min_size=1, max_size=9).map(b64),
    "proposal": mls_values(), "commitPacket": mls_values(), "welcomePacket": mls_values(),
}.items()}
#: the keys each route's body may have
BODY_KEYS = {
    ("POST", "apps"): ["name", "identityProvider", "federate"],
    ("POST", "clients"): ["clientHandle", "tags"],
    ("PATCH", "clients"): ["clientHandle", "tagsToAdd", "tagsToRemove"],
    ("POST", "queues"): ["protocolVersion", "cipherSuite", "appLabel"],
    ("PATCH", "queues"): ["keyPackages", "isReset", "finalKey"],
    ("PUT", "groups"): ["groupInfo", "ratchetTree"],
    ("PUT", "proposals"): ["proposal"],
    ("PUT", "epochs"): ["commitPacket", "groupInfo", "welcomePacket", "ratchetTree"],
}
QUERY_VALUES = st.text(max_size=12) | st.sampled_from([CHAT, OTHER, UNKNOWN, A, B, "0", "1", "3", "65536"])


@pytest.fixture
def fuzzed(a):
    """
    a, with a client, a queue and a group to aim at and a pipeline that knows
    no other gateway; its routes with their parameters filled in.
    """
    federate([a])

    async def setup() -> List[Any]:
        alice, bob, queue, _device, _kps = await with_keys(a, 2)
        await a.create_group(b"g")
        values = {"apps": CHAT, "clients": alice, "queues": queue, "groups": group_path(b"g")}
        routes = []
        for method, template, query in GatewayAPI(a.gateway).router.routes():
            if method == "DELETE":
                continue  # keep alice for the others
            segments = [values[template[i - 1]] if part == "{}" else part for i, part in enumerate(template)]
            keys = BODY_KEYS.get((method, template[-1] if template[-1] != "{}" else template[-2]), [])
            routes.append((method, "/" + "/".join(segments), keys, list(query), bob))
        return routes

    return a, pytest_twisted.blockon(Deferred.fromCoroutine(setup()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest_twisted.ensureDeferred
async def test_random_requests_get_labelled_answers(fuzzed, data):
    gw, routes = fuzzed
    method, path, keys, query_names, bob = data.draw(st.sampled_from(routes), "route")
    shape = data.draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes"]), "shape")
    if shape == "fields" and keys:
        chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)), "keys")
        raw = json.dumps({key: data.draw(VALUES[key], key) for key in chosen})
    elif shape == "bytes":
        raw = data.draw(st.binary(max_size=60), "body")
    else:
        raw = json.dumps(data.draw(JSON_VALUES, "body"))
    values = QUERY_VALUES | st.just(bob) if "receiverClientId" in query_names else QUERY_VALUES
    names = st.sampled_from([*query_names, "colour"] if query_names else ["colour"])
    query = data.draw(st.just({}) | st.dictionaries(names, values, max_size=4), "query")
    token = data.draw(st.sampled_from(["chat"] * 6 + ["admin", None]), "as")
    answer = await gw.api(method, path, raw=raw.encode() if isinstance(raw, str) else raw, app=token, query=query)
    assert answer.code < 500, answer.body
    assert answer.header("content-type") == "application/json"
    decoded = answer.json()
    if answer.code >= 400:
        assert decoded["code"] == answer.code and isinstance(decoded["label"], str) and decoded["message"]


# the findings of the gateway's security review: each test failed before its fix

C = "c.example"
CHAT_C = "c0c0c0c0-0000-4000-8000-00000000000c"
CERTS_B = "b0b0b0b0-0000-4000-8000-0000000000cc"
REQUESTER_A = {"appId": CHAT, "identityConfiguration": {"type": "basic"}}
RECEIVERS = [f"a0a0a0a0-0000-4000-8000-00000000000{i}" for i in range(8)]


def write_sqlite(path: Any, sql: str, params: Tuple[Any, ...]) -> None:
    """Change a gateway's database behind its back (what a peer that misbehaves could serve)."""
    connection = sqlite3.connect(str(path))
    try:
        connection.execute(sql, params)
        connection.commit()
    finally:
        connection.close()


def welcome_body(group: bytes, refs: List[bytes], epoch: int = 1) -> Dict[str, Any]:
    welcome = encode.make_welcome(cipher_suite=1, key_package_refs=refs)
    return {"groupId": group_path(group), "epoch": epoch, "welcome": b64(welcome)}


@pytest_twisted.ensureDeferred
async def test_a_peers_claim_of_a_final_key_is_good_for_one_welcome(pair):
    a, b, _network = pair
    bob = await b.register(b"bob")
    final = Device(b"bob").key_package(not_after=NOW + 30 * DAY)
    assert (await b.fill(bob, await b.queue(bob), final=final)).code == 200
    alice = await a.register(b"alice")
    assert claimed(await a.claim(bob, alice, domain=B, of=CHAT_B)) == final

    async def deliver(group: bytes) -> Any:
        response = await b.call("deliver-welcome", welcome_body(group, [ref_of(final)]), origin=A)
        return response.code, answer_json(response)

    assert await deliver(b"g1") == (200, {"welcomed": [bob]})
    # the same Welcome again is still welcome
    assert await deliver(b"g1") == (200, {"welcomed": [bob]})
    # but the claim is used up: a Welcome of another (made-up) group is not filed
    for group in (b"g2", b"g3"):
        code, body = await deliver(group)
        assert (code, body["label"]) == (422, "unknown-key-package")
    welcomes = (await b.ok("GET", client_path(bob, CHAT_B) + "/welcome-msgs"))["welcomeMessages"]
    assert [w["groupId"] for w in welcomes] == [group_path(b"g1")]
    # a new claim is good for one more
    assert claimed(await a.claim(bob, alice, domain=B, of=CHAT_B)) == final
    assert await deliver(b"g2") == (200, {"welcomed": [bob]})
    assert (await deliver(b"g3"))[0] == 422


@pytest_twisted.ensureDeferred
async def test_a_local_claim_of_a_final_key_is_good_for_one_welcome(a):
    alice, bob = await a.register(b"alice"), await a.register(b"bob")
    final = Device(b"alice").key_package(not_after=NOW + 30 * DAY)
    assert (await a.fill(alice, await a.queue(alice), final=final)).code == 200
    assert (await a.claim(alice, bob)).json()["isFinalKey"] is True
    await a.create_group(b"g1")
    await a.create_group(b"g2")
    assert (await a.commit(b"g1", 0, welcome_refs=[ref_of(final)])).code == 201
    refused(await a.commit(b"g2", 0, welcome_refs=[ref_of(final)]), 422, "unknown-key-package")
    assert claimed(await a.claim(alice, bob)) == final
    assert (await a.commit(b"g2", 0, welcome_refs=[ref_of(final)])).code == 201


@pytest_twisted.ensureDeferred
async def test_a_client_keeps_at_most_welcomes_per_client(gateways):
    gw = gateways(A, welcomes_per_client=2)
    alice, bob, _queue, _device, _kps = await with_keys(gw, 3)
    for i in range(3):
        ref = ref_of(claimed(await gw.claim(alice, bob)))
        await gw.create_group(f"g{i}".encode())
        answer = await gw.commit(f"g{i}".encode(), 0, welcome_refs=[ref])
        assert answer.code == (201 if i < 2 else 429), answer.body
    body = refused(answer, 429, "too-many-welcomes")
    assert body["data"] == {"clientId": alice}
    # nothing of the refused commit was kept: the group did not move, and bob still holds the KeyPackage
    assert (await gw.ok("GET", group_route(b"g2", "group-info")))["epoch"] == 0
    assert ref_of(claimed(await gw.claim(alice, bob))) == ref
    assert len((await gw.ok("GET", client_path(alice) + "/welcome-msgs"))["welcomeMessages"]) == 2


@pytest_twisted.ensureDeferred
async def test_listings_are_bounded_by_bytes_as_well_as_rows(a, monkeypatch):
    alice, bob, _queue, _device, _kps = await with_keys(a, 3)
    for i in range(3):
        ref = ref_of(claimed(await a.claim(alice, bob)))
        await a.create_group(f"g{i}".encode())
        assert (await a.commit(f"g{i}".encode(), 0, welcome_refs=[ref])).code == 201
        assert (await a.commit(f"g{i}".encode(), 1)).code == 201
    await a.create_group(b"p")
    for _ in range(3):
        await a.ok("PUT", group_route(b"p", "proposals"), {"proposal": b64(proposal_message(b"p", 0))}, code=201)
    route = client_path(alice) + "/welcome-msgs"
    everything = await a.ok("GET", route)
    assert len(everything["welcomeMessages"]) == 3 and everything["truncated"] is False
    size = len(unb64(everything["welcomeMessages"][0]["welcomePacket"]))

    async def pages(path: str, cursor: str, advance: Any) -> List[Tuple[int, bool]]:
        """(rows, truncated) of each page, following the cursor."""
        seen, query = [], {}
        while True:
            page = await a.ok("GET", path, query=query)
            rows = page.get("welcomeMessages", page.get("messages", page.get("proposals")))
            seen.append((len(rows), page["truncated"]))
            if not page["truncated"]:
                return seen
            query = {cursor: advance(query, rows)}

    # by bytes: one row always, then no more than the limit
    monkeypatch.setattr(gateway_store, "MAX_LISTING_BYTES", 2 * size)
    assert await pages(route, "since", lambda q, rows: rows[-1]["id"]) == [(2, True), (1, False)]
    monkeypatch.setattr(gateway_store, "MAX_LISTING_BYTES", 1)
    assert await pages(route, "since", lambda q, rows: rows[-1]["id"]) == [(1, True)] * 2 + [(1, False)]
    assert await pages(group_route(b"g0", "control-msgs"), "startEpochId",
                       lambda q, rows: rows[-1]["epoch"] + 1) == [(1, True), (1, False)]
    assert await pages(group_route(b"p", "proposals"), "start",
                       lambda q, rows: int(q.get("start", 0)) + len(rows)) == [(1, True)] * 2 + [(1, False)]
    # by rows
    monkeypatch.setattr(gateway_store, "MAX_LISTING_BYTES", 1 << 30)
    monkeypatch.setattr(gateway_store, "MAX_LISTING", 2)
    assert await pages(route, "since", lambda q, rows: rows[-1]["id"]) == [(2, True), (1, False)]
    proposals = await a.ok("GET", group_route(b"p", "proposals"), query={"start": 2})
    assert len(proposals["proposals"]) == 1 and proposals["truncated"] is False
    assert (await a.ok("GET", group_route(b"p", "proposals"), query={"start": 9}))["proposals"] == []


@pytest_twisted.ensureDeferred
async def test_a_key_package_claimed_across_must_have_the_handle_the_peer_listed(pair, tmp_path):
    a, b, _network = pair
    bob, _carol, _queue, _device, kps = await with_keys(b, 2, owner=b"bob", other=b"carol")
    alice, dave = await a.register(b"alice"), await a.register(b"dave")
    # unlisted, the KeyPackage's credential is still checked (basic: any is valid)
    assert ref_of(claimed(await a.claim(bob, dave, domain=B, of=CHAT_B))) == ref_of(kps[0])
    # b lists bob under another handle than his KeyPackages give
    write_sqlite(tmp_path / f"{B}.sqlite", "UPDATE mimi_clients SET handle = ? WHERE id = ?", (b"robert", bob))
    listed = await a.ok("GET", f"/apps/{CHAT}/clients", query={"tag": "account:bob", "domain": B, "app": CHAT_B})
    assert listed["identities"][0]["clientIdentity"] == b64(b"robert")
    body = refused(await a.claim(bob, alice, domain=B, of=CHAT_B), 533, "federation-unexpected-body")
    assert "'bob'" in body["message"] and "'robert'" in body["message"]
    # nothing was recorded as claimed
    await a.create_group(b"g")
    refused(await a.commit(b"g", 0, welcome_refs=[ref_of(kps[1])]), 422, "unknown-key-package")


@pytest_twisted.ensureDeferred
async def test_a_key_package_claimed_across_is_checked_with_the_claimers_identity_provider(gateways, tmp_path):
    chain = CertificateChain.make(leaf_until=NOW + 2 * HOUR)
    a = gateways(A, apps=[AppSpec("certs", CERTS, provider="devices")], providers=x509_providers(tmp_path / A, chain))
    b = gateways(B, apps=[AppSpec("certs", CERTS_B, provider="devices")],
                 providers=x509_providers(tmp_path / B, chain))
    federate([a, b])
    phone = await b.register(b"phone", app="certs")
    device = chain.device()
    kps = [device.key_package(not_after=NOW + DAY + i) for i in range(3)]
    assert (await b.fill(phone, await b.queue(phone, app="certs"), kps, app="certs")).code == 200
    readers = [await a.register(f"reader{i}".encode(), app="certs") for i in range(3)]
    assert claimed(await a.claim(phone, readers[0], domain=B, of=CERTS_B, app="certs")) == kps[0]
    # b serves a KeyPackage whose leaf certificate's key is not the one that signs it (it took none such)
    thief = chain.device(key=nacl.signing.SigningKey.generate()).key_package(not_after=NOW + DAY + 1)
    write_sqlite(tmp_path / f"{B}.sqlite", "UPDATE mimi_key_packages SET data = ? WHERE ref = ?",
                 (thief, ref_of(kps[1])))
    body = refused(await a.claim(phone, readers[1], domain=B, of=CERTS_B, app="certs"), 533,
                   "federation-unexpected-body")
    assert "signature_key" in body["message"]
    # the chain is validated at the claimer's time: the leaf has expired since b took the KeyPackage
    for gateway in (a, b):
        gateway.clock.advance(3 * HOUR)
    body = refused(await a.claim(phone, readers[2], domain=B, of=CERTS_B, app="certs"), 533,
                   "federation-unexpected-body")
    assert "expired" in body["message"]


@pytest_twisted.ensureDeferred
async def test_a_key_package_is_recorded_as_claimed_from_one_domain_only(gateways):
    a, b = gateways(A), gateways(B, apps=APPS_B)
    c = gateways(C, apps=[AppSpec("chat", CHAT_C)])
    federate([a, b, c])
    bob, _carol, _queue, _device, kps = await with_keys(b, 1, owner=b"bob", other=b"carol")
    alice, dave = await a.register(b"alice"), await a.register(b"dave")
    kp = claimed(await a.claim(bob, alice, domain=B, of=CHAT_B))
    # c serves a copy of b's KeyPackage as its own bob's
    c_bob = await c.register(b"bob")
    assert (await c.fill(c_bob, await c.queue(c_bob), [kps[0]])).code == 200
    body = refused(await a.claim(c_bob, dave, domain=C, of=CHAT_C), 533, "federation-unexpected-body")
    assert B in body["message"]
    # a Welcome for it still goes to b
    assert await a.gateway.store.remote_claims([ref_of(kp)], CHAT) == {ref_of(kp): (B, CHAT_B, bob)}


@pytest_twisted.ensureDeferred
async def test_a_commit_uses_only_key_packages_its_own_clients_claimed(pair):
    a, b, _network = pair
    alice, _bob, _queue, _device, _kps = await with_keys(a, 3)
    carol = await a.register(b"carol", app="other")
    bert = await b.register(b"bert")
    # b's client holds one of alice's KeyPackages, and carol of application other another one
    remote = claimed(await b.claim(alice, bert, domain=A, of=CHAT))
    others = claimed(await a.claim(alice, carol, app="other", of=CHAT))
    await a.create_group(b"g")
    for kp in (remote, others):
        body = refused(await a.commit(b"g", 0, welcome_refs=[ref_of(kp)]), 422, "unknown-key-package")
        assert body["data"] == {"keyPackageRefs": [ref_of(kp).hex()]}
    assert (await a.ok("GET", client_path(alice) + "/welcome-msgs"))["welcomeMessages"] == []
    # each may still be used by whoever claimed it
    await a.create_group(b"h", app="other")
    answer = await a.commit(b"h", 0, app="other", welcome_refs=[ref_of(others)])
    assert answer.code == 201 and answer.json()["welcomed"] == [{"domain": A, "clientId": alice}]
    response = await a.call("deliver-welcome", welcome_body(b"x", [ref_of(remote)]), origin=B)
    assert response.code == 200 and answer_json(response) == {"welcomed": [alice]}


@pytest_twisted.ensureDeferred
async def test_only_the_application_that_claimed_across_sends_the_welcome(pair):
    a, b, _network = pair
    bob, _carol, _queue, _device, _kps = await with_keys(b, 1, owner=b"bob", other=b"carol")
    alice = await a.register(b"alice")
    kp = claimed(await a.claim(bob, alice, domain=B, of=CHAT_B))
    await a.create_group(b"g", app="other")
    refused(await a.commit(b"g", 0, app="other", welcome_refs=[ref_of(kp)]), 422, "unknown-key-package")
    assert await a.gateway.store.remote_claims([ref_of(kp)], OTHER) == {}
    assert (await b.ok("GET", client_path(bob, CHAT_B) + "/welcome-msgs"))["welcomeMessages"] == []


@pytest_twisted.ensureDeferred
async def test_a_peer_holds_a_bounded_number_of_claims_until_they_are_released(gateways):
    b = gateways(B, apps=APPS_B, claims_per_peer_per_queue=2, claim_ttl=HOUR)
    bob, _carol, queue, _device, _kps = await with_keys(b, 5, owner=b"bob", other=b"carol")

    async def claim(receiver: str, origin: str = A, client: str = bob) -> Tuple[int, Dict[str, Any]]:
        response = await b.call("claim-key-package", {
            "appId": CHAT_B, "clientId": client, "protocolVersion": 1, "cipherSuite": 1,
            "receiverClientId": receiver, "requester": REQUESTER_A}, origin=origin)
        return response.code, answer_json(response)

    first = await claim(RECEIVERS[0])
    assert first[0] == 200 and (await claim(RECEIVERS[1]))[0] == 200
    code, body = await claim(RECEIVERS[2])
    assert (code, body["label"]) == (429, "too-many-claims")
    assert A in body["message"] and queue not in body["message"]
    # a receiver that holds one gets it again; another domain has its own allowance
    assert await claim(RECEIVERS[0]) == first
    assert (await claim(RECEIVERS[2], origin=C))[0] == 200
    # a Welcome that uses one makes room for another
    response = await b.call("deliver-welcome", welcome_body(b"g", [ref_of(unb64(first[1]["keyPackage"]))]), origin=A)
    assert response.code == 200
    assert (await claim(RECEIVERS[2]))[0] == 200
    assert (await claim(RECEIVERS[3]))[0] == 429
    # claims that no Welcome used within claim_ttl are released, and claimable again
    b.clock.advance(HOUR + 1)
    assert (await claim(RECEIVERS[3]))[0] == 200
    assert (await claim(RECEIVERS[4]))[0] == 200
    assert (await claim(RECEIVERS[5]))[0] == 429
    # and so are claims of a final key
    dave = await b.register(b"dave")
    final = Device(b"dave").key_package(not_after=NOW + 30 * DAY)
    assert (await b.fill(dave, await b.queue(dave), final=final)).code == 200
    for receiver in RECEIVERS[:2]:
        code, body = await claim(receiver, client=dave)
        assert code == 200 and body["isFinalKey"] is True
    assert (await claim(RECEIVERS[0], client=dave))[0] == 200
    code, body = await claim(RECEIVERS[2], client=dave)
    assert (code, body["label"]) == (429, "too-many-claims")
    b.clock.advance(HOUR + 1)
    assert (await claim(RECEIVERS[2], client=dave))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_final_key_is_not_given_before_its_lifetime_begins(a):
    alice, bob = await a.register(b"alice"), await a.register(b"bob")
    final = Device(b"alice").key_package(not_before=NOW + HOUR, not_after=NOW + DAY)
    assert (await a.fill(alice, await a.queue(alice), final=final)).code == 200
    refused(await a.claim(alice, bob), 404, "no-key-package")
    a.clock.advance(2 * HOUR)
    assert (await a.claim(alice, bob)).json() == {"keyPackage": b64(final), "isFinalKey": True}


@pytest_twisted.ensureDeferred
async def test_a_peer_is_not_told_internal_queue_ids(pair):
    _a, b, _network = pair
    bob = await b.register(b"bob")
    queue = await b.queue(bob)
    response = await b.call("claim-key-package", {
        "appId": CHAT_B, "clientId": bob, "protocolVersion": 1, "cipherSuite": 1,
        "receiverClientId": RECEIVERS[0], "requester": REQUESTER_A}, origin=A)
    body = answer_json(response)
    assert (response.code, body["label"]) == (404, "no-key-package")
    assert queue not in json.dumps(body) and bob in body["message"]


@pytest_twisted.ensureDeferred
async def test_relayed_calls_are_refused(pair):
    _a, b, _network = pair
    bodies = {"list-apps": {}, "list-clients": {"appId": CHAT_B, "tag": "t", "requester": REQUESTER_A},
              "deliver-welcome": welcome_body(b"g", [bytes(32)])}
    for header in ("Fedserver-Relay-Origin", "Fedserver-Relay-Origin-Domain", "Fedserver-Relay-Hops"):
        for rpc, body in bodies.items():
            response = await b.call(rpc, body, origin=A, headers=[(header, "1")])
            decoded = answer_json(response)
            assert (response.code, decoded["label"]) == (403, "access-denied"), (header, rpc)
            assert "relayed calls are not accepted by the MIMI gateway" in decoded["message"]
    assert (await b.call("list-apps", {}, origin=A)).code == 200


@pytest_twisted.ensureDeferred
async def test_a_retired_application_is_not_reachable(gateways, tmp_path):
    database = str(tmp_path / "retiring.sqlite")
    a, b = gateways(A, database=database), gateways(B, apps=APPS_B)
    federate([a, b])
    carol, _dave, _queue, _device, _kps = await with_keys(a, 2, app="other", owner=b"carol", other=b"dave")
    kp = claimed(await b.claim(carol, await b.register(b"bert"), domain=A, of=OTHER))
    a.stop()
    # other is no longer declared: retired
    again = gateways(A, database=database, apps=[AppSpec("chat", CHAT), AppSpec("local", LOCAL, federate=False)])
    federate([again, b])
    alice = await again.register(b"alice")
    refused(await again.api("GET", f"/apps/{CHAT}/clients", query={"tag": "account:carol", "app": OTHER}),
            404, "not-found")
    refused(await again.claim(carol, alice, of=OTHER), 404, "not-found")
    response = await again.call("deliver-welcome", welcome_body(b"g", [ref_of(kp)]), origin=B)
    assert (response.code, answer_json(response)["label"]) == (404, "not-found")


@pytest_twisted.ensureDeferred
async def test_another_gateways_applications_are_rebuilt_field_by_field(pair, monkeypatch):
    a, b, _network = pair

    def answering(answer: Any) -> None:
        async def list_apps(call: Any, body: Any) -> Any:
            return answer
        monkeypatch.setattr(b.gateway, "_rpc_list_apps", list_apps)

    app = {"appId": CHAT_B, "name": "chat", "token": "secret",
           "identityConfiguration": {"type": "basic", "parameters": {"roots": ["x"]}, "private": "y"}}
    answering({"apps": [app], "more": True})
    assert await a.ok("GET", "/apps", query={"domain": B}) == {"apps": [
        {"appId": CHAT_B, "name": "chat", "identityConfiguration": {"type": "basic", "parameters": {"roots": ["x"]}}}]}
    for bad in ({"apps": {}}, {"apps": [1]}, {"apps": [app] * 1001}, {"apps": [{**app, "appId": "chat"}]},
                {"apps": [{**app, "name": "a\nb"}]}, {"apps": [{**app, "name": "n" * 129}]},
                {"apps": [{k: v for k, v in app.items() if k != "name"}]},
                {"apps": [{**app, "identityConfiguration": "basic"}]},
                {"apps": [{**app, "identityConfiguration": {"parameters": {}}}]},
                {"apps": [{**app, "identityConfiguration": {"type": "basic", "parameters": [1]}}]},
                {"apps": [{**app, "identityConfiguration": {"type": "basic", "parameters": {"p": "x" * 20_000}}}]}):
        answering(bad)
        refused(await a.api("GET", "/apps", query={"domain": B}), 533, "federation-unexpected-body")
