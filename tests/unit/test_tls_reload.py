"""
L{fedserver.tls.TLSFiles} and the mtls authenticator following certificate
rotation.
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace
from typing import Any, List

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from fedserver import pki
from fedserver.builtin.mtls import MutualTLSAuthenticator, check_own_certificate
from fedserver.errors import ConfigError
from fedserver.tls import TLSFiles
from tests.unit.helpers import target


def _replace(src: str, dst: str) -> None:
    # as an operator's tooling should: write aside, then rename over
    shutil.copyfile(src, dst + ".new")
    os.replace(dst + ".new", dst)


@pytest.fixture
def rotation(dev_pki: Any) -> Any:
    cert, key = dev_pki.issue_files("fed.b.example")
    clock = Clock()
    files = TLSFiles.load(cert, key, [dev_pki.ca_path], clock)

    return SimpleNamespace(pki=dev_pki, cert=cert, key=key, clock=clock, files=files)


def _rotate(r: Any, name: str = "fed.b.example", **kwargs: Any) -> None:
    directory = os.path.join(r.pki.directory, "next")
    os.makedirs(directory, exist_ok=True)
    issued = pki.issue(r.pki.ca, [name], **kwargs)
    cert, key = pki.write_issued(directory, "next", issued, chain=[r.pki.ca])
    _replace(cert, r.cert)
    _replace(key, r.key)


def test_unchanged_files_keep_the_material(rotation: Any) -> None:
    first = rotation.files.material()
    rotation.clock.advance(5)
    assert rotation.files.material() is first


def test_changed_files_are_loaded_after_the_interval(rotation: Any) -> None:
    first = rotation.files.material()
    _rotate(rotation)
    assert rotation.files.material() is first  # checked at most every second
    rotation.clock.advance(1)
    second = rotation.files.material()
    assert second is not first
    assert second.leaf.serial_number != first.leaf.serial_number


def test_a_half_written_rotation_keeps_the_current_material_and_logs_once(rotation: Any) -> None:
    first = rotation.files.material()
    with open(rotation.key, "w") as f:
        f.write("-----BEGIN PRIVATE KEY-----\ntrunc")
    events: List[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(3):
            rotation.clock.advance(1)
            assert rotation.files.material() is first
    finally:
        globalLogPublisher.removeObserver(events.append)
    errors = [e for e in events if "not usable" in e.get("log_format", "")]
    assert len(errors) == 1
    # the operator finishes the rotation: it is taken
    _rotate(rotation)
    rotation.clock.advance(1)
    assert rotation.files.material() is not first


def test_a_rotation_refused_by_the_check_keeps_the_current_material(dev_pki: Any) -> None:
    cert, key = dev_pki.issue_files("fed.b.example")
    clock = Clock()
    files = TLSFiles.load(cert, key, [dev_pki.ca_path], clock,
                          check=lambda m: check_own_certificate(m, "fed.b.example"))
    first = files.material()
    _rotate(SimpleNamespace(pki=dev_pki, cert=cert, key=key), name="fed.wrong.example")
    clock.advance(1)
    assert files.material() is first


def test_a_check_refusing_at_startup_is_a_config_error(dev_pki: Any) -> None:
    cert, key = dev_pki.issue_files("fed.wrong.example")
    with pytest.raises(ConfigError, match=r"not for \[server\] infra_domain fed\.b\.example"):
        TLSFiles.load(cert, key, [dev_pki.ca_path], Clock(),
                      check=lambda m: check_own_certificate(m, "fed.b.example"))


def test_mtls_authenticator_uses_rotated_certificates_for_new_connections(rotation: Any) -> None:
    authenticator = MutualTLSAuthenticator(rotation.files.current, "b.example", files=rotation.files)
    server_before = authenticator.server_tls_options()
    client_before = authenticator.client_tls_options(target("fed.a.example"))
    assert authenticator.server_tls_options() is server_before
    _rotate(rotation)
    rotation.clock.advance(1)
    assert authenticator.server_tls_options() is not server_before
    assert authenticator.client_tls_options(target("fed.a.example")) is not client_before
    assert authenticator.material is rotation.files.current


def _peer_of(old_options: Any, dev_pki: Any, *, pki_for_peer: Any = None) -> Any:
    from fedserver.tls import PeerCertificate

    issuer = pki_for_peer or dev_pki
    leaf = pki.issue(issuer.ca, ["fed.a.example"]).certificate
    # verified at its handshake under the old settings
    return PeerCertificate(leaf, None, (issuer.ca.certificate,), old_options.context)


def test_a_connection_from_before_a_rotation_is_judged_by_the_current_cas(dev_pki: Any, other_pki: Any) -> None:
    from fedserver.values import InboundRequest

    cert, key = dev_pki.issue_files("fed.b.example")
    both = os.path.join(dev_pki.directory, "both-cas.pem")
    with open(both, "wb") as f:
        f.write(open(dev_pki.ca_path, "rb").read() + open(other_pki.ca_path, "rb").read())
    clock = Clock()
    files = TLSFiles.load(cert, key, [both], clock)
    authenticator = MutualTLSAuthenticator(files.current, "b.example", files=files)
    old = authenticator.server_tls_options()
    ours, theirs = _peer_of(old, dev_pki), _peer_of(old, dev_pki, pki_for_peer=other_pki)

    def authenticate(peer: Any) -> Any:
        request = InboundRequest(method="POST", path="/federation/brig/x", query="",
                                 headers=[("Wire-Origin-Domain", "a.example")], body=b"", tls=peer)
        results: List[Any] = []
        authenticator.authenticate(request).addBoth(results.append)
        return results[0]

    assert authenticate(theirs).claimed_domain == "a.example"
    # the operator stops trusting the other CA
    _replace(dev_pki.ca_path, both)
    clock.advance(1)
    assert authenticator.server_tls_options() is not old
    refused = authenticate(theirs)
    refused.trap(Exception)
    assert refused.value.label == "authentication-failure"
    assert "not a configured CA" in refused.value.message or "issuer" in refused.value.message
    assert authenticate(ours).claimed_domain == "a.example"


def test_the_client_pool_is_emptied_when_our_tls_settings_change(dev_pki: Any) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from fedserver.client import FederationClient
    from fedserver.values import OutboundRequest

    material = dev_pki.material("fed.b.example")
    settings = {"current": material.client_options("fed.a.example")}
    client = FederationClient(MemoryReactorClock(), lambda target: settings["current"])
    closed: List[int] = []
    client.pool.close = lambda keys=None: closed.append(1)  # type: ignore[method-assign,assignment]
    request = OutboundRequest(destination="a.example", method="POST", path="/x", headers=())
    for _ in range(2):
        client.send(target("fed.a.example"), request).addErrback(lambda f: None)
    assert closed == []
    settings["current"] = material.client_options("fed.a.example")
    client.send(target("fed.a.example"), request).addErrback(lambda f: None)
    assert closed == [1]
