"""
Plugin loading: the pluggy manager and the registry of named factories.

Built-in plugins are registered through the C{fedserver} entry-point group in
setup.cfg, exactly like third-party ones, so L{make_plugin_manager} is the
only way anything gets in.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Dict, Iterable, List, Mapping, Tuple, Type

import attrs
import pluggy
from zope.interface import Interface
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from fedserver import hookspecs
from fedserver.errors import ConfigError
from fedserver.interfaces import (
    IAuthenticator,
    IAuthorizer,
    IComponentHandler,
    IDiscovery,
    IIdentityProvider,
)

#: kind -> (hook name, interface every product must provide)
KINDS: Mapping[str, Tuple[str, Type[Interface]]] = {
    "discovery": ("fedserver_discovery_plugins", IDiscovery),
    "authenticator": ("fedserver_authenticator_plugins", IAuthenticator),
    "authorizer": ("fedserver_authorizer_plugins", IAuthorizer),
    "identity_provider": ("fedserver_identity_provider_plugins", IIdentityProvider),
    "component": ("fedserver_component_plugins", IComponentHandler),
}


def make_plugin_manager(
    load_entrypoints: bool = True, plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """
    A new plugin manager with fedserver's hookspecs.

    @param load_entrypoints: load every installed distribution's
        C{fedserver} entry points (the built-ins among them).
    @param plugins: further plugin objects (modules or instances) to
        register; tests use this to register exactly what they need.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    if load_entrypoints:
        _load_entry_points(manager)
    for plugin in plugins:
        manager.register(plugin)
    return manager


#: pluggy plugin name prefix of plugins loaded from entry points
_ENTRY_POINT = "entry point "


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    """
    Register every C{fedserver} entry point of every installed distribution.

    Unlike pluggy's own loader, this never skips an entry point because
    another distribution used the same entry point name: each is registered
    under its distribution's name, so two plugins offering one factory name
    reach L{PluginRegistry}, which refuses the duplicate and names both.
    """
    seen = set()
    for dist in importlib.metadata.distributions():
        project = dist.metadata["Name"] or "?"
        for entry_point in dist.entry_points:
            key = (project.lower().replace("_", "-"), entry_point.name)
            if entry_point.group != hookspecs.PROJECT or key in seen:
                continue  # the same distribution twice on sys.path counts once
            seen.add(key)
            source = f"{project} {dist.version}"
            try:
                plugin = entry_point.load()
            except Exception as e:
                raise ConfigError(
                    f"the fedserver plugin {entry_point.name!r} of {source} "
                    f"({entry_point.value}) cannot be imported: {type(e).__name__}: {e}"
                ) from None
            if not manager.is_registered(plugin):
                manager.register(plugin, name=f"{_ENTRY_POINT}{entry_point.name} of {source}")


@attrs.frozen
class Registration:
    """A named factory and where it came from (a distribution or a module)."""

    name: str
    factory: Any
    source: str


class PluginRegistry:
    """
    Every named factory the installed plugins offer, by kind.
    """

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self._manager = manager
        self._by_kind: Dict[str, Dict[str, Registration]] = {}
        for kind, (hook_name, _) in KINDS.items():
            table: Dict[str, Registration] = {}
            hook = getattr(manager.hook, hook_name)
            for impl in hook.get_hookimpls():
                answer = impl.function()
                if not answer:
                    continue
                source = _source(impl.plugin_name)
                for name, factory in dict(answer).items():
                    if name in table:
                        raise ConfigError(
                            f"the {kind} plugin name {name!r} is registered twice: "
                            f"by {table[name].source} and by {source}; "
                            "uninstall one of them"
                        )
                    table[name] = Registration(name, factory, source)
            self._by_kind[kind] = table

    @property
    def hook(self) -> Any:
        """The manager's hook caller (for the resource and service hooks)."""
        return self._manager.hook

    def names(self, kind: str) -> Dict[str, Registration]:
        """The registrations of one kind, by name."""
        return dict(self._by_kind[kind])

    def build(self, kind: str, options: Any, context: Any) -> object:
        """
        Build the provider that C{options} selects with its C{plugin} key.

        @param options: a L{fedserver.config.Options} table with a C{plugin} key.
        @raise ConfigError: no plugin of that name is installed, or the
            factory's product does not provide the interface.
        """
        name = options.plugin
        table = self._by_kind[kind]
        registration = table.get(name)
        if registration is None:
            installed = ", ".join(
                f"{n} (from {r.source})" for n, r in sorted(table.items())
            ) or "none"
            raise options.error(
                "plugin",
                f"no installed {kind} plugin is called {name!r}; installed: {installed}",
            )
        product = registration.factory(options, context)
        options.check_all_used()
        interface = KINDS[kind][1]
        check_provides(interface, product, f"{kind} plugin {name!r} ({registration.source})")
        return product


def check_provides(interface: Type[Interface], product: object, what: str) -> None:
    """
    Run C{verifyObject}; turn a failure into a L{ConfigError} naming C{what}.
    """
    try:
        verifyObject(interface, product)
    except Invalid as e:
        raise ConfigError(
            f"{what} built {product!r}, which does not provide "
            f"{interface.__name__}: {e}"
        ) from None


def _source(plugin_name: str) -> str:
    """Where a plugin came from: its distribution, else its pluggy name."""
    if plugin_name.startswith(_ENTRY_POINT):
        return plugin_name.rsplit(" of ", 1)[-1]
    return plugin_name


def describe(registry: PluginRegistry) -> List[Tuple[str, str, str]]:
    """(kind, name, source) for every registration, for C{fedserver plugins}."""
    rows = []
    for kind in KINDS:
        for name, registration in sorted(registry.names(kind).items()):
            rows.append((kind, name, registration.source))
    return rows


