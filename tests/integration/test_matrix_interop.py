"""
fedserver and a real Synapse federating over Matrix, in both directions, on
127.0.0.1: Synapse verifies fedserver's signatures with the keys it fetches
from fedserver's key server, and fedserver verifies Synapse's with the keys
it fetches from Synapse.  The homeserver logic behind fedserver is a small
recording HTTP service (the component C{[components.matrix]}).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any, Dict, Iterator

import pytest
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json

from fedserver_matrix.keys import decode_base64, generate_signing_key, write_signing_keys
from tests.integration.harness import PKI, Component, Fedserver, free_port, post, post_tls, tls_context, wait_until
from tests.integration.synapse import SynapseServer, synapse_or_skip


def homeserver_answer(path: str, headers: Dict[str, str], body: bytes) -> tuple:
    if path.startswith("/_matrix/federation/v1/query/profile"):
        return 200, {"displayname": "Alice via fedserver"}
    if path.startswith("/_matrix/federation/v1/send/"):
        return 200, {"pdus": {}}
    return 404, {"errcode": "M_NOT_FOUND", "error": "not here"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    synapse_or_skip()
    tmp = tmp_path_factory.mktemp("matrix")
    pki = PKI(str(tmp / "pki"))
    homeserver = Component(homeserver_answer)
    synapse = SynapseServer(str(tmp / "synapse"), pki)
    server = None
    try:
        synapse.start()
        inward, outward = free_port(), free_port()
        key_path = str(tmp / "signing.key")
        write_signing_keys(key_path, [generate_signing_key("fed1")])
        cert, key = pki.issue("fedserver", ["localhost"])
        config = {
            "server": {"backend_domain": "localhost", "infra_domain": "localhost", "data_dir": "var/fedserver"},
            "inward": {"listen": f"tcp:{inward}:interface=127.0.0.1"},
            "outward": {"listen": f"tcp:{outward}:interface=127.0.0.1", "allow_ip_ranges": ["127.0.0.0/8"]},
            "tls": {"certificate": cert, "private_key": key, "ca_certificates": [pki.ca_path]},
            "discovery": {"plugin": "matrix"},
            "authenticator": {"plugin": "matrix-signature", "server_name": f"localhost:{inward}",
                              "signing_key": key_path},
            "authorizers": [{"plugin": "allow-list", "domains": [synapse.server_name]}],
            "components": {"matrix": {"plugin": "matrix-http", "url": homeserver.url}},
        }
        server = Fedserver(str(tmp), "fedserver", config)
        yield {"synapse": synapse, "fedserver": server, "homeserver": homeserver, "pki": pki,
               "server_name": f"localhost:{inward}"}
    finally:
        if server is not None:
            server.stop()
        synapse.stop()
        homeserver.close()


def test_synapse_queries_a_profile_through_fedserver(matrix: Dict[str, Any]) -> None:
    synapse = matrix["synapse"]
    bob = synapse.register("bob")
    status, answer = synapse.profile(bob, f"@alice:{matrix['server_name']}")
    assert status == 200, (answer, matrix["fedserver"].log()[-3000:])
    assert answer["displayname"] == "Alice via fedserver"
    path, headers, _ = next(r for r in matrix["homeserver"].requests if "query/profile" in r[0])
    assert headers["x-matrix-origin"] == synapse.server_name
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["user_id"] == [f"@alice:{matrix['server_name']}"]


def test_a_synapse_transaction_with_an_edu_reaches_the_homeserver(matrix: Dict[str, Any]) -> None:
    synapse = matrix["synapse"]
    sender = synapse.register("dave")
    status, _ = synapse.send_to_device(sender, f"@alice:{matrix['server_name']}", {"hello": "fedserver"})
    assert status == 200

    def transaction() -> Any:
        for path, _, body in matrix["homeserver"].requests:
            if path.startswith("/_matrix/federation/v1/send/"):
                document = json.loads(body)
                if any(e.get("edu_type") == "m.direct_to_device" for e in document.get("edus", [])):
                    return document
        return None

    document = wait_until("Synapse's transaction with the to-device EDU", transaction)
    assert document["origin"] == synapse.server_name
    (edu,) = [e for e in document["edus"] if e["edu_type"] == "m.direct_to_device"]
    assert edu["content"]["messages"][f"@alice:{matrix['server_name']}"]["*"] == {"hello": "fedserver"}


def test_synapse_accepts_fedserver_signed_requests(matrix: Dict[str, Any]) -> None:
    synapse = matrix["synapse"]
    synapse.register("carol")
    user_id = urllib.parse.quote(synapse.user_id("carol"), safe="")
    status, _, answer = post(
        matrix["fedserver"].outward_port, f"/_matrix/federation/v1/query/profile?user_id={user_id}",
        method="GET", headers={"X-Matrix-Destination": synapse.server_name},
    )
    # Synapse fetched fedserver's keys from its key server and verified the signature
    assert status == 200, answer
    assert answer["displayname"] == "carol"


def test_an_unsigned_request_gets_a_matrix_error(matrix: Dict[str, Any]) -> None:
    context = tls_context(matrix["pki"].ca_path)
    status, _, answer = post_tls(int(matrix["server_name"].split(":")[1]), "localhost", context,
                                 "/_matrix/federation/v1/version", method="GET")
    assert (status, answer["errcode"]) == (401, "M_UNAUTHORIZED")


def test_fedserver_answers_as_a_notary_for_synapse_s_keys(matrix: Dict[str, Any]) -> None:
    synapse = matrix["synapse"]
    port = int(matrix["server_name"].split(":")[1])
    context = tls_context(matrix["pki"].ca_path)
    status, _, ours = post_tls(port, "localhost", context, "/_matrix/key/v2/server", method="GET")
    assert status == 200, ours
    published = synapse.key_document()
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    status, _, answer = post_tls(
        port, "localhost", context, "/_matrix/key/v2/query",
        {"server_keys": {synapse.server_name: {synapse.key_id: {"minimum_valid_until_ts": int(time.time() * 1000)}},
                         nobody: {}}},
    )
    assert status == 200, (answer, matrix["fedserver"].log()[-3000:])
    status, _, by_get = post_tls(port, "localhost", context,
                                 f"/_matrix/key/v2/query/{urllib.parse.quote(synapse.server_name)}", method="GET")
    assert status == 200, by_get
    for documents in (answer["server_keys"], by_get["server_keys"]):
        (document,) = documents  # the server that cannot be reached is left out
        assert document["server_name"] == synapse.server_name
        assert document["verify_keys"] == published["verify_keys"]
        # as Synapse signed it, and signed by fedserver
        assert set(document["signatures"]) == {synapse.server_name, matrix["server_name"]}
        for server_name, keys in ((synapse.server_name, published), (matrix["server_name"], ours)):
            for key_id in keys["verify_keys"]:
                verify_key = decode_verify_key_bytes(key_id, decode_base64(keys["verify_keys"][key_id]["key"]))
                verify_signed_json(document, server_name, verify_key)
