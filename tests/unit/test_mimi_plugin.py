"""
The C{mimi-gateway} plugin (L{fedserver_mimi.plugin}): its configuration,
checked by the factory at startup (every error names the file, the table and
the key), and its resource hook.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest

import fedserver_mimi.plugin
from fedserver.errors import ConfigError
from fedserver.registry import PluginRegistry, make_plugin_manager
from fedserver.storage import Store
from fedserver_mimi.gateway import Gateway, GatewayLimits, token_hash
from fedserver_mimi.gateway_api import SEGMENT
from fedserver_mimi.gateway_store import SCHEMA_OWNER
from tests.unit.mimi_helpers import CHAT, OTHER, build_gateway, gateway_context, write_file

TOKEN = "chat-token-0123456789"
ADMIN = "admin-token-0123456789"


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "etc"


@pytest.fixture
def context(folder, tmp_path):
    return gateway_context(folder, "a.example", Store(f"sqlite:{tmp_path / 'db.sqlite'}", reactor=None))


def app(folder: Any, **changes: Any) -> Dict[str, Any]:
    values: Dict[str, Any] = {"id": CHAT, "name": "chat", "identity_provider": "simple",
                              "token_file": write_file(folder, "chat.token", TOKEN)}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def refusal(folder: Any, context: Any, values: Dict[str, Any], name: str = "mimi") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_gateway(folder, context, {"plugin": "mimi-gateway", **values}, name)
    error = info.value
    assert str(error).startswith(f"{folder / 'fedserver.toml'}: [components.{name}")
    return error


def test_a_complete_configuration(folder, context):
    admin = write_file(folder, "admin.token", f"  {ADMIN}\n")
    gateway = build_gateway(folder, context, {
        "plugin": "mimi-gateway", "admin_token_file": admin, "key_packages_per_upload": 1000,
        "key_packages_per_queue": 1, "tags_per_client": 7, "proposals_per_epoch": 10_000,
        "claims_per_peer_per_queue": 5, "claim_ttl": 3600, "welcomes_per_client": 50,
        "apps": [app(folder), app(folder, id=OTHER, name="other", identity_provider="plain", federate=False,
                                  token_file=write_file(folder, "other.token", "other-token-0123456789"))],
    })
    assert isinstance(gateway, Gateway) and gateway.backend_domain == "a.example"
    assert gateway.limits == GatewayLimits(key_packages_per_upload=1000, key_packages_per_queue=1, tags_per_client=7,
                                           proposals_per_epoch=10_000, claims_per_peer_per_queue=5, claim_ttl=3600,
                                           welcomes_per_client=50)
    assert gateway.admin_token_hash == token_hash(ADMIN)
    assert gateway._declared == (
        (CHAT, "chat", "simple", token_hash(TOKEN), True),
        (OTHER, "other", "plain", token_hash("other-token-0123456789"), False),
    )
    assert set(gateway.providers) == {"simple", "plain"}
    # the schema is registered: migrating creates the gateway's tables
    assert (SCHEMA_OWNER, 1) in context.storage.migrate()


def test_the_defaults(folder, context):
    gateway = build_gateway(folder, context, {"plugin": "mimi-gateway"})
    assert gateway.limits == GatewayLimits()
    assert (gateway.limits.claims_per_peer_per_queue, gateway.limits.claim_ttl,
            gateway.limits.welcomes_per_client) == (100, 7 * 24 * 3600, 1000)
    assert gateway.admin_token_hash is None and gateway._declared == ()


def test_the_plugin_is_installed_under_its_name():
    registry = PluginRegistry(make_plugin_manager(load_entrypoints=True))
    assert registry.names("component")["mimi-gateway"].factory is fedserver_mimi.plugin.make_gateway


def test_the_internal_interface_is_mounted_on_the_outward_listener(folder, context):
    assert fedserver_mimi.plugin.fedserver_resources(context) == []
    context.components = {"mimi": build_gateway(folder, context, {"plugin": "mimi-gateway"})}
    [(listener, segment, resource)] = fedserver_mimi.plugin.fedserver_resources(context)
    assert (listener, segment) == ("outward", SEGMENT.encode()) == ("outward", b"mimi")
    assert resource.max_body_bytes == context.config.limits.max_body_bytes


def test_the_component_must_be_called_mimi(folder, context):
    error = refusal(folder, context, {}, name="gateway")
    assert error.path == "[components.gateway] plugin"
    assert "[components.mimi]" in error.reason and "/federation/mimi/" in error.reason


@pytest.mark.parametrize("raw", ["6C1D3AD0-5B0E-4B6E-9D43-5A2A3C0F7E11", "chat", "6c1d3ad05b0e4b6e9d435a2a3c0f7e11",
                                 "{6c1d3ad0-5b0e-4b6e-9d43-5a2a3c0f7e11}"])
def test_an_application_id_is_a_lower_case_uuid(folder, context, raw):
    error = refusal(folder, context, {"apps": [app(folder, id=raw)]})
    assert error.path == "[components.mimi.apps[0]] id"
    assert repr(raw) in error.reason and "lower-case UUID" in error.reason


def test_an_application_is_declared_once(folder, context):
    second = app(folder, name="again", token_file=write_file(folder, "again.token", "again-token-0123456789"))
    error = refusal(folder, context, {"apps": [app(folder), second]})
    assert (error.path, error.reason) == ("[components.mimi.apps[1]] id", f"{CHAT} is declared twice")


def test_an_application_names_a_configured_identity_provider(folder, context):
    error = refusal(folder, context, {"apps": [app(folder, identity_provider="nope")]})
    assert error.path == "[components.mimi.apps[0]] identity_provider"
    assert error.reason == "there is no [identity_providers.nope] (configured: plain, simple)"


@pytest.mark.parametrize("changes, key, reason", [
    ({"id": None}, "id", "is required"),
    ({"id": 7}, "id", "must be a string"),
    ({"name": None}, "name", "is required"),
    ({"name": ""}, "name", "must not be empty"),
    ({"name": "n" * 129}, "name", "must have 1 to 128 characters"),
    ({"identity_provider": None}, "identity_provider", "is required"),
    ({"token_file": None}, "token_file", "is required"),
    ({"federate": "yes"}, "federate", "must be true or false"),
    ({"colour": "red"}, "colour", "is not a known option here"),
])
def test_application_keys(folder, context, changes, key, reason):
    error = refusal(folder, context, {"apps": [app(folder, **changes)]})
    assert error.path == f"[components.mimi.apps[0]] {key}"
    assert error.reason.startswith(reason), error.reason


def test_apps_is_an_array_of_tables(folder, context):
    error = refusal(folder, context, {"apps": {"id": CHAT}})
    assert error.path == "[components.mimi] apps"
    error = refusal(folder, context, {"apps": ["chat"]})
    assert error.path == "[components.mimi] apps[0]"


@pytest.mark.parametrize("content", ["short", "a token with spaces in it", "tökén-0123456789-0123456789", "",
                                     "\n\n", "0123456789abcde\n"])
def test_token_files_hold_one_long_ascii_token(folder, context, content):
    path = write_file(folder, "bad.token", content)
    reason = f"{folder / 'bad.token'} must hold one token of at least 16 ASCII characters without spaces"
    error = refusal(folder, context, {"apps": [app(folder, token_file=path)]})
    assert (error.path, error.reason) == ("[components.mimi.apps[0]] token_file", reason)
    error = refusal(folder, context, {"admin_token_file": path})
    assert (error.path, error.reason) == ("[components.mimi] admin_token_file", reason)


def test_token_files_must_be_readable(folder, context):
    error = refusal(folder, context, {"apps": [app(folder, token_file="missing.token")]})
    assert error.path == "[components.mimi.apps[0]] token_file"
    assert error.reason == f"cannot read {folder / 'missing.token'}: No such file or directory"
    error = refusal(folder, context, {"admin_token_file": "missing.token"})
    assert error.path == "[components.mimi] admin_token_file" and "No such file or directory" in error.reason
    (folder / "binary.token").write_bytes(b"\xff\xfe" * 20)
    error = refusal(folder, context, {"apps": [app(folder, token_file="binary.token")]})
    assert error.reason.startswith(f"cannot read {folder / 'binary.token'}: ")
    error = refusal(folder, context, {"apps": [app(folder, token_file=".")]})
    assert error.reason.startswith(f"cannot read {folder}: ")


def test_two_applications_never_share_a_token(folder, context):
    second = app(folder, id=OTHER, name="other", token_file=write_file(folder, "other.token", f"{TOKEN}\n"))
    error = refusal(folder, context, {"apps": [app(folder), second]})
    assert error.path == "[components.mimi.apps[1]] token_file"
    assert error.reason == f"holds the same token as application {CHAT}"


def test_the_admin_has_a_token_of_its_own(folder, context):
    error = refusal(folder, context, {"admin_token_file": write_file(folder, "admin.token", TOKEN),
                                      "apps": [app(folder)]})
    assert error.path == "[components.mimi] admin_token_file"
    assert "holds the token of an application" in error.reason


@pytest.mark.parametrize("key, bad, reason", [
    ("key_packages_per_upload", 0, "must be at least 1, not 0"),
    ("key_packages_per_upload", 1001, "must be at most 1000, not 1001"),
    ("key_packages_per_queue", 0, "must be at least 1, not 0"),
    ("key_packages_per_queue", 100_001, "must be at most 100000, not 100001"),
    ("tags_per_client", 0, "must be at least 1, not 0"),
    ("tags_per_client", 1001, "must be at most 1000, not 1001"),
    ("proposals_per_epoch", 0, "must be at least 1, not 0"),
    ("proposals_per_epoch", 10_001, "must be at most 10000, not 10001"),
    ("proposals_per_epoch", "many", "must be an integer, not a string 'many'"),
    ("claims_per_peer_per_queue", 0, "must be at least 1, not 0"),
    ("claims_per_peer_per_queue", 100_001, "must be at most 100000, not 100001"),
    ("claim_ttl", 59, "must be at least 60, not 59"),
    ("claim_ttl", 365 * 24 * 3600 + 1, "must be at most 31536000, not 31536001"),
    ("welcomes_per_client", 0, "must be at least 1, not 0"),
    ("welcomes_per_client", 100_001, "must be at most 100000, not 100001"),
    ("tags_per_client", True, "must be an integer, not true or false True"),
    ("tags_per_client", 2.5, "must be an integer, not a number 2.5"),
])
def test_limits(folder, context, key, bad, reason):
    error = refusal(folder, context, {key: bad})
    assert (error.path, error.reason) == (f"[components.mimi] {key}", reason)


def test_unknown_options_are_errors(folder, context):
    error = refusal(folder, context, {"max_clients": 5})
    assert error.path == "[components.mimi] max_clients"
    assert "is not a known option here" in error.reason and "key_packages_per_queue" in error.reason
