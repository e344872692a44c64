"""Tests for fedserver.registry and the hook specifications."""

from __future__ import annotations

import types

import pytest
from zope.interface.verify import verifyObject

from fedserver import hookimpl
from fedserver.config import Options
from fedserver.errors import ConfigError
from fedserver.interfaces import IAuthorizer, IDiscovery
from fedserver.registry import (
    KINDS,
    PluginRegistry,
    check_provides,
    describe,
    make_plugin_manager,
)
from tests.unit.helpers import FakeAuthorizer, FakeDiscovery

FILE = "/etc/fedserver.toml"


def plugin_module(name, **answers):
    """A plugin module called C{name} whose hooks answer C{answers}."""
    module = types.ModuleType(name)
    for hook_name, answer in answers.items():
        setattr(module, hook_name, hookimpl(lambda answer=answer: answer))
    return module


def registry_of(*plugins):
    return PluginRegistry(make_plugin_manager(load_entrypoints=False, plugins=plugins))


def table(values, path="discovery"):
    return Options(values, file=FILE, path=path, base_dir="/etc")


def fixed_discovery(options, context):
    return FakeDiscovery({})


def test_the_built_ins_come_through_entry_points():
    registry = PluginRegistry(make_plugin_manager())
    names = {kind: set(registry.names(kind)) for kind in KINDS}
    assert {"static"} <= names["discovery"]
    assert {"mtls"} <= names["authenticator"]
    assert {"allow-list"} <= names["authorizer"]
    assert {"http-forward"} <= names["component"]
    assert registry.names("discovery")["static"].source.startswith("fedserver ")


def test_without_entry_points_nothing_is_installed():
    registry = registry_of()
    assert all(registry.names(kind) == {} for kind in KINDS)
    assert describe(registry) == []


def test_a_test_registers_exactly_its_plugins():
    registry = registry_of(
        plugin_module(
            "plugin_one",
            fedserver_discovery_plugins={"fixed": fixed_discovery},
            fedserver_authorizer_plugins={"yes": lambda o, c: FakeAuthorizer()},
        ),
        plugin_module("plugin_empty", fedserver_component_plugins=None),
    )
    assert describe(registry) == [
        ("discovery", "fixed", "plugin_one"),
        ("authorizer", "yes", "plugin_one"),
    ]


def test_a_name_registered_twice_names_both_plugins():
    one = plugin_module("plugin_one", fedserver_discovery_plugins={"fixed": fixed_discovery})
    two = plugin_module("plugin_two", fedserver_discovery_plugins={"fixed": fixed_discovery})
    with pytest.raises(ConfigError) as info:
        registry_of(one, two)
    message = str(info.value)
    assert "discovery plugin name 'fixed' is registered twice" in message
    assert "plugin_one" in message and "plugin_two" in message


def test_the_same_name_for_two_kinds_is_fine():
    registry = registry_of(
        plugin_module(
            "plugin_one",
            fedserver_discovery_plugins={"x": fixed_discovery},
            fedserver_authorizer_plugins={"x": lambda o, c: FakeAuthorizer()},
        )
    )
    assert set(registry.names("discovery")) == set(registry.names("authorizer")) == {"x"}


def test_build_passes_options_and_context_and_checks_the_product():
    seen = []

    def factory(options, context):
        seen.append((options.get_int("ttl"), context))
        return FakeDiscovery({})

    registry = registry_of(plugin_module("p", fedserver_discovery_plugins={"fixed": factory}))
    context = object()
    product = registry.build("discovery", table({"plugin": "fixed", "ttl": 5}), context)
    assert verifyObject(IDiscovery, product)
    assert seen == [(5, context)]


def test_build_of_a_name_nobody_provides_lists_what_is_installed():
    registry = registry_of(plugin_module("plugin_one", fedserver_discovery_plugins={"fixed": fixed_discovery}))
    with pytest.raises(ConfigError) as info:
        registry.build("discovery", table({"plugin": "wire-srv"}), None)
    message = str(info.value)
    assert message.startswith(f"{FILE}: [discovery] plugin:")
    assert "no installed discovery plugin is called 'wire-srv'" in message
    assert "installed: fixed (from plugin_one)" in message


def test_build_when_nothing_of_that_kind_is_installed():
    with pytest.raises(ConfigError, match="installed: none"):
        registry_of().build("authorizer", table({"plugin": "allow-list"}, "authorizers[0]"), None)


def test_build_refuses_options_the_plugin_did_not_read():
    registry = registry_of(plugin_module("p", fedserver_discovery_plugins={"fixed": fixed_discovery}))
    with pytest.raises(ConfigError, match=r"\[discovery\] nameservers: is not a known option here"):
        registry.build("discovery", table({"plugin": "fixed", "nameservers": []}), None)


def test_build_refuses_a_product_without_the_interface():
    registry = registry_of(
        plugin_module("plugin_bad", fedserver_authorizer_plugins={"bad": lambda o, c: FakeDiscovery({})})
    )
    with pytest.raises(ConfigError) as info:
        registry.build("authorizer", table({"plugin": "bad"}, "authorizers[0]"), None)
    message = str(info.value)
    assert "authorizer plugin 'bad' (plugin_bad)" in message
    assert "does not provide IAuthorizer" in message


def test_build_refuses_a_product_missing_a_method():
    class HalfAuthorizer(FakeAuthorizer):
        authorize_outbound = None

    registry = registry_of(plugin_module("p", fedserver_authorizer_plugins={"half": lambda o, c: HalfAuthorizer()}))
    with pytest.raises(ConfigError, match="authorize_outbound"):
        registry.build("authorizer", table({"plugin": "half"}, "authorizers[0]"), None)


def test_check_provides():
    check_provides(IAuthorizer, FakeAuthorizer(), "fake")
    with pytest.raises(ConfigError, match=r"^the thing built 1, which does not provide IAuthorizer"):
        check_provides(IAuthorizer, 1, "the thing")


def test_resource_and_service_hooks_reach_plugins_with_the_context():
    calls = []

    def resources(context):
        calls.append(context)
        return [("inward", b"keys", object())]

    module = types.ModuleType("plugin_res")
    module.fedserver_resources = hookimpl(resources)
    registry = registry_of(module)
    answers = registry.hook.fedserver_resources(context="ctx")
    assert calls == ["ctx"]
    assert answers[0][0][:2] == ("inward", b"keys")
    assert registry.hook.fedserver_services(context="ctx") == []


def test_a_hook_with_a_wrong_signature_is_refused_at_registration():
    module = types.ModuleType("plugin_wrong")

    def fedserver_services(context, extra):
        return []

    module.fedserver_services = hookimpl(fedserver_services)
    with pytest.raises(Exception, match="extra"):
        make_plugin_manager(load_entrypoints=False, plugins=[module])


class _FakeDistribution:
    def __init__(self, name: str, version: str, entry_points: list) -> None:
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = entry_points


def test_entry_points_of_two_distributions_with_one_name_are_both_seen(monkeypatch) -> None:
    import importlib.metadata
    import types

    from fedserver import hookimpl
    from fedserver.registry import PluginRegistry, make_plugin_manager

    def plugin_module(name: str) -> types.ModuleType:
        module = types.ModuleType(name)

        @hookimpl
        def fedserver_discovery_plugins() -> dict:
            return {"static": lambda options, context: None}

        module.fedserver_discovery_plugins = fedserver_discovery_plugins  # type: ignore[attr-defined]
        return module

    modules = {"first": plugin_module("first"), "second": plugin_module("second")}

    class EntryPoint:
        group = "fedserver"
        name = "static"

        def __init__(self, module: str) -> None:
            self.value = module

        def load(self) -> types.ModuleType:
            return modules[self.value]

    distributions = [
        _FakeDistribution("fedserver", "0.1.0", [EntryPoint("first")]),
        _FakeDistribution("shadow-plugin", "9.9", [EntryPoint("second")]),
        _FakeDistribution("fedserver", "0.1.0", [EntryPoint("first")]),  # on sys.path twice
    ]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: distributions)
    with pytest.raises(ConfigError, match=r"'static' is registered twice: by fedserver 0.1.0 and by shadow-plugin 9.9"):
        PluginRegistry(make_plugin_manager())


def test_an_entry_point_that_cannot_be_imported_is_named(monkeypatch) -> None:
    import importlib.metadata

    from fedserver.registry import make_plugin_manager

    class Broken:
        group = "fedserver"
        name = "broken"
        value = "no_such_module"

        def load(self) -> None:
            raise ImportError("No module named 'no_such_module'")

    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: [_FakeDistribution("broken-plugin", "1.0", [Broken()])])
    with pytest.raises(ConfigError, match=r"'broken' of broken-plugin 1.0 \(no_such_module\) cannot be imported"):
        make_plugin_manager()
