"""Tests for fedserver.config."""

from __future__ import annotations

import copy
import os

import pytest

from fedserver.config import Limits, Options, check_domain, load_config, parse_config
from fedserver.errors import ConfigError

FILE = "/srv/fed/etc/fedserver.toml"
BASE_DIR = "/srv/fed/etc"

MINIMAL = {
    "server": {"backend_domain": "a.example"},
    "inward": {"listen": "tcp:8443"},
    "discovery": {"plugin": "static"},
    "authenticator": {"plugin": "mtls"},
}


def parse(changes=None, *, drop=()):
    """L{parse_config} of L{MINIMAL} with C{changes} merged per table."""
    raw = copy.deepcopy(MINIMAL)
    for table in drop:
        del raw[table]
    for table, values in (changes or {}).items():
        if isinstance(values, dict) and isinstance(raw.get(table), dict):
            raw[table].update(values)
        else:
            raw[table] = values
    return parse_config(raw, file=FILE, base_dir=BASE_DIR)


def config_error(changes=None, *, drop=()) -> str:
    """The message of the L{ConfigError} that parsing raises."""
    with pytest.raises(ConfigError) as info:
        parse(changes, drop=drop)
    assert info.value.file == FILE
    return str(info.value)


def options(values, path="test"):
    return Options(values, file=FILE, path=path, base_dir=BASE_DIR)


# whole files


def test_minimal_configuration_defaults():
    config = parse()
    assert config.server.backend_domain == "a.example"
    assert config.server.infra_domain == "a.example"
    assert config.server.data_dir == os.path.join(BASE_DIR, "var", "a.example")
    assert config.storage_database == "sqlite:" + os.path.join(
        BASE_DIR, "var", "a.example", "fedserver.sqlite"
    )
    assert config.outward_listen is None
    assert config.limits == Limits()
    assert config.tls.certificate is None and config.tls.ca_certificates == ()
    assert config.authorizers == [] and config.components == {} and config.sections == {}
    assert config.discovery.plugin == "static"


def test_relative_paths_resolve_against_the_configuration_folder(write_config, tmp_path):
    path = write_config(
        """
        [server]
        backend_domain = "a.example"
        infra_domain = "fed.a.example"
        data_dir = "../var/a"
        [inward]
        listen = "tcp:8443"
        [outward]
        listen = "tcp:8080:interface=127.0.0.1"
        [tls]
        certificate = "pki/a.pem"
        private_key = "pki/a.key"
        ca_certificates = ["pki/ca.pem", "/abs/ca2.pem"]
        [storage]
        database = "sqlite:db/fed.sqlite"
        [discovery]
        plugin = "static"
        [authenticator]
        plugin = "mtls"
        """
    )
    config = load_config(os.path.relpath(path))
    etc = str(tmp_path / "etc")
    assert config.file == path
    assert config.base_dir == etc
    assert config.server.infra_domain == "fed.a.example"
    assert config.server.data_dir == str(tmp_path / "var" / "a")
    assert config.tls.certificate == os.path.join(etc, "pki", "a.pem")
    assert config.tls.private_key == os.path.join(etc, "pki", "a.key")
    assert config.tls.ca_certificates == (os.path.join(etc, "pki", "ca.pem"), "/abs/ca2.pem")
    assert config.storage_database == "sqlite:" + os.path.join(etc, "db", "fed.sqlite")
    assert config.outward_listen == "tcp:8080:interface=127.0.0.1"


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(missing)
    assert info.value.file == missing


def test_invalid_toml(write_config):
    path = write_config("[server\nbackend_domain = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        load_config(path)
    assert str(info.value).startswith(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("table", ["server", "inward", "discovery", "authenticator"])
def test_missing_required_table_is_named(table):
    message = config_error(drop=[table])
    assert f"[{table}]" in message
    assert "is required" in message


@pytest.mark.parametrize(
    "table, key",
    [
        ("server", "backend_domian"),
        ("inward", "port"),
        ("outward", "interface"),
        ("tls", "key"),
        ("limits", "max_body"),
        ("storage", "url"),
    ],
)
def test_unknown_key_names_file_table_and_key(table, key):
    listen = {"listen": "tcp:1:interface=127.0.0.1"} if table == "outward" else {}
    message = config_error({table: {**listen, key: "x"}})
    assert message.startswith(FILE)
    assert f"[{table}] {key}" in message
    assert "is not a known option here" in message


def test_unknown_key_lists_the_known_ones():
    message = config_error({"server": {"colour": "blue"}})
    assert "known options: backend_domain, data_dir, infra_domain" in message


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"server": {"backend_domain": 7}}, "[server] backend_domain: must be a string, not an integer 7"),
        ({"server": {"backend_domain": ""}}, "[server] backend_domain: must not be empty"),
        ({"inward": {"listen": ["tcp:1"]}}, "[inward] listen: must be a string, not a list"),
        ({"limits": {"max_body_bytes": True}}, "[limits] max_body_bytes: must be an integer, not true or false"),
        ({"limits": {"max_body_bytes": 1.5}}, "[limits] max_body_bytes: must be an integer, not a number"),
        ({"limits": {"request_timeout": True}}, "[limits] request_timeout: must be a number, not true or false"),
        ({"limits": {"request_timeout": "5"}}, "[limits] request_timeout: must be a number, not a string"),
        ({"limits": {"max_body_bytes": 0}}, "[limits] max_body_bytes: must be at least 1, not 0"),
        ({"limits": {"connect_timeout": 601}}, "[limits] connect_timeout: must be at most 600, not 601.0"),
        ({"tls": {"ca_certificates": "ca.pem"}}, "[tls] ca_certificates: must be a list of strings"),
        ({"tls": {"ca_certificates": ["", "x"]}}, "[tls] ca_certificates: item 0 must be a non-empty string"),
        ({"storage": 3}, "[storage]: must be a table, not an integer"),
        ({"authorizers": {"plugin": "allow-list"}}, "[authorizers]: must be an array of tables"),
        ({"authorizers": [{"plugin": "a"}, 3]}, "[authorizers[1]]: must be a table"),
        ({"components": {"brig": 3}}, "[components.brig]: must be a table, not an integer"),
        ({"discovery": {"plugin": 1}}, "[discovery] plugin: must be a string"),
    ],
)
def test_wrong_types_and_ranges(changes, expected):
    assert expected in config_error(changes)


def test_bool_is_not_an_integer_nor_an_integer_a_bool():
    table = options({"n": True, "flag": 1})
    with pytest.raises(ConfigError, match="must be an integer, not true or false True"):
        table.get_int("n")
    with pytest.raises(ConfigError, match="must be true or false, not an integer 1"):
        table.get_bool("flag")


def test_limits_are_read():
    config = parse({"limits": {"max_body_bytes": 2048, "request_timeout": 15, "component_timeout": 1.5}})
    assert config.limits == Limits(2048, 15.0, 10.0, 1.5)
    assert isinstance(config.limits.request_timeout, float)


def test_header_and_body_deadlines():
    assert (Limits().header_timeout, Limits().body_timeout) == (10.0, 60.0)
    config = parse({"limits": {"header_timeout": 2, "body_timeout": 0.5}})
    assert (config.limits.header_timeout, config.limits.body_timeout) == (2.0, 0.5)
    assert "[limits] header_timeout: must be at least 0.1, not 0.0" in config_error({"limits": {"header_timeout": 0}})
    assert "[limits] body_timeout: must be at most 86400, not 1000000.0" in config_error(
        {"limits": {"body_timeout": 1e6}})
    assert "[limits] idle_timeout: must be a number, not nan" in config_error(
        {"limits": {"idle_timeout": float("nan")}})


@pytest.mark.parametrize(
    "domain", ["A.example", "a..example", "-a.example", "a-.example", "a_b.example", "é.example", "a." + "x" * 64]
)
def test_backend_domain_must_be_a_lower_case_dns_name(domain):
    assert "is not a lower-case DNS domain name" in config_error({"server": {"backend_domain": domain}})


def test_infra_domain_is_checked_too():
    assert "[server] infra_domain" in config_error({"server": {"infra_domain": "Fed.A.example"}})


def test_certificate_and_key_go_together():
    message = config_error({"tls": {"certificate": "a.pem"}})
    assert "[tls]" in message and "certificate and private_key go together" in message


def test_a_plugin_table_without_plugin_key():
    message = config_error({"authenticator": {"mode": "x"}}, drop=["authenticator"])
    assert "[authenticator] plugin: is required" in message


def test_plugin_tables_stay_options_for_their_plugin():
    config = parse(
        {
            "authorizers": [{"plugin": "allow-list", "domains": ["b.example"]}, {"plugin": "other"}],
            "components": {"brig": {"plugin": "http-forward", "url": "http://x"}},
            "identity_providers": {"basic": {"plugin": "basic"}, "my.idp": {"plugin": "p"}},
        }
    )
    assert [a.plugin for a in config.authorizers] == ["allow-list", "other"]
    assert config.authorizers[0].path == "authorizers[0]"
    assert config.authorizers[0].get_str_list("domains") == ["b.example"]
    assert config.components["brig"].path == "components.brig"
    assert config.identity_providers["my.idp"].path == 'identity_providers."my.idp"'
    assert config.identity_providers["basic"].plugin == "basic"
    with pytest.raises(ConfigError, match=r'\[identity_providers\."my\.idp"\] colour'):
        config.identity_providers["my.idp"].get_str("colour")


def test_a_plugin_key_needs_its_table_read_by_the_plugin():
    config = parse({"components": {"brig": {"plugin": "http-forward", "url": "http://x"}}})
    brig = config.components["brig"]
    with pytest.raises(ConfigError, match=r"\[components.brig\] url: is not a known option here"):
        brig.check_all_used()


def test_other_top_level_tables_are_kept_for_protocol_plugins():
    config = parse({"matrix": {"signing_key": "k"}})
    section = config.section("matrix")
    assert section is not None and not section.was_read()
    assert section.get_str("signing_key") == "k"
    assert section.was_read()
    assert config.section("mimi") is None


def test_a_top_level_value_that_is_not_a_table():
    assert "[colour]: must be a table, not a string" in config_error({"colour": "blue"})


# Options


def test_options_basics():
    table = options({"a": "x", "b": 2})
    assert "a" in table and "c" not in table
    assert table.keys() == ["a", "b"]
    assert not table.was_read()
    assert table.get_str("missing", None) is None
    assert table.get_int("b", minimum=1, maximum=2) == 2
    assert table.get_number("b") == 2.0
    assert "test" in repr(table) and FILE in repr(table)


def test_options_required_key_names_the_expected_type():
    with pytest.raises(ConfigError, match=r"\[test\] port: is required \(an integer\)"):
        options({}).get_int("port")


def test_options_paths():
    table = options({"one": "rel/x.pem", "many": ["a", "/b", "~/c"]})
    assert table.get_path("one") == os.path.join(BASE_DIR, "rel", "x.pem")
    assert table.get_path_list("many") == [
        os.path.join(BASE_DIR, "a"),
        "/b",
        os.path.join(os.path.expanduser("~"), "c"),
    ]
    assert table.get_path("none", None) is None


def test_options_tables():
    table = options({"one": {"x": 1}, "many": {"p": {"y": 2}}, "list": [{"z": 3}]}, path="top")
    assert table.get_table("one").get_int("x") == 1
    assert table.get_tables("many")["p"].path == "top.many.p"
    assert [t.get_int("z") for t in table.get_table_list("list")] == [3]
    single = options({"list": {"z": 4}})
    assert [t.get_int("z") for t in single.get_table_list("list", single_ok=True)] == [4]


def test_check_all_used_without_known_options():
    with pytest.raises(ConfigError, match=r"\[test\] stray: is not a known option here \(known options: none\)"):
        table = options({"plugin": "p", "stray": 1})
        assert table.plugin == "p"
        table.check_all_used()


def test_check_domain_returns_valid_names():
    table = options({})
    assert check_domain(table, "d", "fed-1.b.example") == "fed-1.b.example"
    with pytest.raises(ConfigError, match=r"\[test\] d: '' is not"):
        check_domain(table, "d", "")


def test_a_value_equal_to_its_default_is_still_checked(tmp_path):
    from fedserver.config import Options

    options = Options({"n": 0, "s": "", "f": 2, "p": "rel"}, file="f.toml", path="t", base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"\[t\] n: must be at least 1"):
        options.get_int("n", 0, minimum=1)
    with pytest.raises(ConfigError, match=r"\[t\] s: must not be empty"):
        options.get_str("s", "")
    assert isinstance(options.get_number("f", 2), float)
    assert options.get_path("p", "rel") == str(tmp_path / "rel")


def test_component_names_must_fit_the_route(tmp_path):
    raw = {
        "server": {"backend_domain": "b.example"},
        "inward": {"listen": "tcp:0"},
        "discovery": {"plugin": "static"},
        "authenticator": {"plugin": "mtls"},
        "components": {"brig.v2": {"plugin": "http-forward", "url": "http://127.0.0.1:1"}},
    }
    with pytest.raises(ConfigError, match=r'\[components\."brig\.v2"\]: component names are ASCII letters'):
        parse_config(raw, file="b.toml", base_dir=str(tmp_path))
    raw["components"] = {"brig": {"plugin": "http-forward", "url": "http://127.0.0.1:1"}}
    assert parse_config(raw, file="b.toml", base_dir=str(tmp_path)).components["brig"].name == "brig"


@pytest.mark.parametrize(
    "listen, local",
    [
        ("tcp:8080:interface=127.0.0.1", True),
        ("tcp6:8080:interface=\\:\\:1", True),
        ("unix:/run/fedserver.sock", True),
        ("tcp:8080", False),
        ("tcp:8080:interface=0.0.0.0", False),
        ("tcp:8080:interface=192.0.2.7", False),
        ("systemd:domain=INET:index=0", False),
    ],
)
def test_the_outward_listener_stays_on_this_machine_unless_exposed(listen, local):
    if local:
        assert parse({"outward": {"listen": listen}}).outward_listen == listen
    else:
        assert "listens beyond this machine" in config_error({"outward": {"listen": listen}})
        assert parse({"outward": {"listen": listen, "expose": True}}).outward_listen == listen


def test_connect_timeout_within_the_request_timeout():
    message = config_error({"limits": {"request_timeout": 5, "connect_timeout": 6}})
    assert "[limits] connect_timeout: (6.0 s) must not exceed request_timeout (5.0 s)" in message


def test_an_unset_connect_timeout_follows_a_short_request_timeout():
    assert parse({"limits": {"request_timeout": 2}}).limits.connect_timeout == 2.0
    assert parse({"limits": {}}).limits.connect_timeout == 10.0
