"""
What a plugin factory is given besides its own options.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import attrs

from fedserver.addresses import AddressPolicy, parse_networks
from fedserver.config import Config
from fedserver.errors import ConfigError
from fedserver.metrics import Metrics
from fedserver.tls import TLSFiles, TLSMaterial


@attrs.define(eq=False)
class Context:
    """
    Shared resources for plugin factories, built once at startup.

    @ivar reactor: the reactor; plugins never import the global one.
    @ivar config: the whole validated L{Config}.
    @ivar storage: the L{fedserver.storage.Store}; a plugin that keeps data
        registers its schema with C{storage.register_schema}.
    @ivar http: a treq-compatible HTTP client with a persistent pool, for
        talking to local services.
    @ivar component_pool: the L{fedserver.http11.HTTP11Pool} that
        connections to local components share (the lean client of the hot
        path).
    @ivar client: the L{fedserver.client.FederationClient} for remote
        backends, once the authenticator is built.
    @ivar pipeline: the L{fedserver.pipeline.Pipeline}, once every provider
        is built (for the resource and service hooks).
    @ivar metrics: the L{fedserver.metrics.Metrics} served at C{/metrics};
        a plugin adds its own numbers with C{metrics.register_collector}.
    @ivar queue: the durable outbound queue
        (L{fedserver.outbound_queue.OutboundQueue}) for one-way
        notifications that must arrive; C{None} outside a built fedserver.
    @ivar plugin_state: where a plugin's hooks keep what they share (the
        resource hook builds something the service hook runs), under keys
        named after the plugin.
    """

    reactor: Any
    config: Config
    storage: Any
    http: Any
    component_pool: Any = None
    discovery: Any = None
    authenticator: Any = None
    authorizers: List[Any] = attrs.Factory(list)
    identity_providers: Dict[str, Any] = attrs.Factory(dict)
    components: Dict[str, Any] = attrs.Factory(dict)
    client: Any = None
    pipeline: Any = None
    queue: Any = None
    plugin_state: Dict[str, Any] = attrs.Factory(dict)
    metrics: Metrics = attrs.Factory(lambda: Metrics(process=False))
    _tls: Optional[TLSFiles] = None
    _address_policy: Optional[AddressPolicy] = None

    @property
    def backend_domain(self) -> str:
        """Our backend domain."""
        return self.config.server.backend_domain

    @property
    def infra_domain(self) -> str:
        """Our infrastructure domain."""
        return self.config.server.infra_domain

    @property
    def address_policy(self) -> AddressPolicy:
        """Which resolved addresses DNS-based discovery may hand on."""
        if self._address_policy is None:
            networks = parse_networks(self.config.allow_ip_ranges, "[outward] allow_ip_ranges")
            self._address_policy = AddressPolicy(networks)
        return self._address_policy

    def tls_material(self, needed_by: str) -> TLSMaterial:
        """
        Our certificate, key and CA certificates from C{[tls]} as they are
        now (see L{tls_files} for a plugin that follows changes).

        @param needed_by: who needs them, for the message when C{[tls]} is
            incomplete.
        """
        return self.tls_files(needed_by).material()

    def tls_files(self, needed_by: str, check: Any = None) -> TLSFiles:
        """
        The C{[tls]} files, loaded once and reloaded when they change.

        @param check: called with the material at load and at every reload;
            raises L{ConfigError} to refuse it (at startup, startup fails; on
            a reload, the current material stays).
        """
        if self._tls is None:
            tls = self.config.tls
            if not tls.certificate or not tls.ca_certificates:
                raise ConfigError(
                    f"{needed_by} needs [tls] certificate, private_key and ca_certificates",
                    file=self.config.file,
                    path="[tls]",
                )
            try:
                self._tls = TLSFiles.load(tls.certificate, tls.private_key or "", tls.ca_certificates,
                                          self.reactor, check=check)
            except ConfigError as e:
                raise ConfigError(e.reason, file=self.config.file, path=e.path) from None
        return self._tls
