"""Tests for the fedserver command (fedserver.cli)."""

from __future__ import annotations

import os
import textwrap

import pytest

from fedserver.cli import main
from fedserver.tls import TLSMaterial, certificate_names
from tests.unit.helpers import local_config_head


@pytest.fixture
def good_config(write_config, dev_pki):
    """A complete configuration whose [tls] files exist."""
    cert, key = dev_pki.issue_files("fed.a.example")

    def text(extra: str = "", **replace: str) -> str:
        body = local_config_head(cert, key, dev_pki.ca_path) + textwrap.dedent(f"""
            [discovery.domains."b.example"]
            infra_domain = "fed.b.example"
            port = 8443

            [authenticator]
            plugin = "mtls"

            [[authorizers]]
            plugin = "allow-list"
            domains = ["b.example"]

            [components.brig]
            plugin = "http-forward"
            url = "http://127.0.0.1:8081"
            {extra}
            """)
        for old, new in replace.items():
            body = body.replace(old, new)
        return write_config(body)

    return text


def test_check_config_accepts_a_good_file(good_config, capsys):
    path = good_config()
    assert main(["check-config", path]) == 0
    assert capsys.readouterr().out == f"{path}: OK\n"


def test_check_config_does_not_create_the_database(good_config, tmp_path):
    main(["check-config", good_config()])
    assert not (tmp_path / "etc" / "var" / "fedserver.sqlite").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("timeout_s = 3", "[components.brig] timeout_s: is not a known option here (known options: timeout, url)"),
        ("[limits]\nmax_body_bytes = true", "[limits] max_body_bytes: must be an integer, not true or false"),
        ('[matrix]\nserver_name = "a.example"', "[matrix]: is not a table that fedserver or an installed plugin"),
    ],
)
def test_check_config_names_the_bad_key(good_config, capsys, extra, expected):
    path = good_config(extra)
    assert main(["check-config", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fedserver: {path}: ")
    assert expected in err


def test_check_config_lists_installed_plugins_for_an_unknown_name(good_config, capsys):
    path = good_config(**{'plugin = "static"': 'plugin = "carrier-pigeon"'})
    assert main(["check-config", path]) == 1
    err = capsys.readouterr().err
    assert "[discovery] plugin: no installed discovery plugin is called 'carrier-pigeon'" in err
    assert "static (from fedserver " in err


def test_check_config_of_tls_files_that_do_not_match(good_config, dev_pki, capsys):
    _, other_key = dev_pki.issue_files("other.example")
    path = good_config(**{"fed.a.example.key": "other.example.key"})
    assert main(["check-config", path]) == 1
    assert f"{path}: [tls] private_key: {other_key} is not the key of the certificate" in capsys.readouterr().err


def test_check_config_of_a_missing_file(tmp_path, capsys):
    missing = str(tmp_path / "missing.toml")
    assert main(["check-config", missing]) == 1
    assert capsys.readouterr().err == f"fedserver: {missing}: the configuration file does not exist\n"


def test_plugins_lists_the_built_ins(capsys):
    assert main(["plugins"]) == 0
    listed = {tuple(line.split()[:2]) for line in capsys.readouterr().out.splitlines()}
    assert {
        ("discovery", "static"),
        ("authenticator", "mtls"),
        ("authorizer", "allow-list"),
        ("component", "http-forward"),
    } <= listed


def test_dev_pki_writes_material_that_loads(tmp_path, capsys):
    folder = str(tmp_path / "pki")
    assert main(["dev-pki", folder, "--domain", "fed.a.example", "--domain", "fed.b.example"]) == 0
    out = capsys.readouterr().out
    assert f"{folder}/fed.a.example.pem  {folder}/fed.a.example.key" in out
    assert f"{folder}/ca.pem" in out
    for name in ("fed.a.example", "fed.b.example"):
        material = TLSMaterial.load(
            os.path.join(folder, f"{name}.pem"), os.path.join(folder, f"{name}.key"), [os.path.join(folder, "ca.pem")]
        )
        assert certificate_names(material.leaf) == frozenset({name})


def test_dev_pki_needs_a_domain(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["dev-pki", str(tmp_path)])
    assert info.value.code == 2
    assert "--domain" in capsys.readouterr().err


def test_federation_request_refuses_a_body_that_is_not_json(good_config, capsys):
    args = ["federation-request", "--config", good_config(), "--body", "{", "b.example", "/federation/brig/x"]
    assert main(args) == 2
    assert "--body is not valid JSON" in capsys.readouterr().err


def test_federation_request_needs_an_absolute_path(good_config, capsys):
    assert main(["federation-request", "--config", good_config(), "b.example", "federation/brig/x"]) == 2
    assert "PATH must start with /" in capsys.readouterr().err


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
