"""
The real-Synapse test peer itself (tests/integration/synapse.py): Synapse
installs into its own virtualenv, starts on 127.0.0.1 with TLS, serves its
self-signed keys, registers users, and sends signed federation requests to a
server named C{localhost:PORT}.  Skipped only if PyPI is unreachable.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from tests.integration.harness import PKI
from tests.integration.synapse import SynapseServer, synapse_or_skip


@pytest.fixture(scope="module")
def synapse_python() -> str:
    return synapse_or_skip()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def synapse(synapse_python: str, pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    server = SynapseServer(str(tmp_path_factory.mktemp("synapse")), pki, python=synapse_python)
    with server:
        yield server


def test_synapse_starts_serves_keys_and_registers(synapse: SynapseServer) -> None:
    document = synapse.key_document()
    assert document["server_name"] == synapse.server_name == f"localhost:{synapse.federation_port}"
    assert list(document["verify_keys"]) == [synapse.key_id]
    assert list(document["signatures"]) == [synapse.server_name]
    verify_key = decode_verify_key_bytes(synapse.key_id, decode_base64(document["verify_keys"][synapse.key_id]["key"]))
    verify_signed_json(document, synapse.server_name, verify_key)  # self-signed

    alice = synapse.register("alice")
    assert alice.user_id == synapse.user_id("alice") == f"@alice:localhost:{synapse.federation_port}"
    code, answer = synapse.client("GET", "/_matrix/client/v3/account/whoami", user=alice)
    assert (code, answer["user_id"]) == (200, alice.user_id)
    again = synapse.login("alice", alice.password)
    assert again.user_id == alice.user_id and again.device_id != alice.device_id


class Recorder:
    """A TLS server for C{localhost} that records federation requests and answers them like a homeserver."""

    def __init__(self, pki: PKI) -> None:
        self.requests: List[Tuple[str, str, Dict[str, str], Any]] = []
        self.arrived = threading.Condition()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                # several Authorization headers when Synapse signs with several keys
                headers["authorization"] = " | ".join(self.headers.get_all("Authorization") or [])
                document = json.loads(body) if body else None
                answer: Dict[str, Any]
                if self.path.startswith("/_matrix/federation/v1/query/profile"):
                    code, answer = 200, {"displayname": "Bob from the recorder"}
                elif self.path.startswith("/_matrix/federation/v1/send/"):
                    code, answer = 200, {"pdus": {}}
                else:
                    code, answer = 404, {"errcode": "M_UNRECOGNIZED", "error": "not here"}
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with recorder.arrived:
                    recorder.requests.append((self.command, self.path, headers, document))
                    recorder.arrived.notify_all()

            do_GET = do_PUT = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.server_name = f"localhost:{self.port}"
        cert, key = pki.issue(f"recorder-{self.port}", ["localhost"])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, prefix: str, timeout: float = 30.0) -> Tuple[str, str, Dict[str, str], Any]:
        with self.arrived:
            found = self.arrived.wait_for(
                lambda: [r for r in self.requests if r[1].startswith(prefix)], timeout=timeout)
            assert found, f"no request for {prefix} after {timeout} s; got {[r[1] for r in self.requests]}"
            return found[0]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder(pki: PKI) -> Iterator[Recorder]:
    server = Recorder(pki)
    yield server
    server.close()


def test_helpers_make_synapse_send_signed_federation_requests(synapse: SynapseServer, recorder: Recorder) -> None:
    """The profile and to-device helpers reach a server named localhost:PORT over TLS, signed with X-Matrix."""
    bob = f"@bob:{recorder.server_name}"
    sender = synapse.register("sender")

    code, answer = synapse.profile(sender, bob)
    assert (code, answer) == (200, {"displayname": "Bob from the recorder"})
    method, path, headers, _ = recorder.wait_for("/_matrix/federation/v1/query/profile")
    assert method == "GET" and "user_id=%40bob%3Alocalhost%3A" in path
    auth = headers["authorization"]
    assert auth.startswith("X-Matrix ")
    assert f'origin="{synapse.server_name}"' in auth and f'destination="{recorder.server_name}"' in auth
    assert f'key="{synapse.key_id}"' in auth
    assert headers["host"] == recorder.server_name

    code, answer = synapse.send_to_device(sender, bob, {"hello": "bob"})
    assert (code, answer) == (200, {})
    method, path, headers, document = recorder.wait_for("/_matrix/federation/v1/send/")
    assert method == "PUT" and document["origin"] == synapse.server_name
    edus = [edu for edu in document["edus"] if edu["edu_type"] == "m.direct_to_device"]
    assert edus, document
    content = edus[0]["content"]
    assert content["sender"] == sender.user_id and content["type"] == "org.fedserver.test"
    assert content["messages"] == {bob: {"*": {"hello": "bob"}}}
