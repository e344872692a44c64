"""
The TOML configuration file.

L{load_config} reads a file into a L{Config}; every table that selects a
plugin is an L{Options}, which the plugin reads with typed getters.  Whatever a
table holds that nobody read is an error naming the file, the table and the
key, so a misspelt option never goes unnoticed.  Relative paths resolve
against the configuration file's folder.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import attrs

from fedserver.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

_REQUIRED = object()


def _describe_type(value: object) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


class Options:
    """
    One table of the configuration, read by the plugin or section it
    belongs to.

    @ivar file: the configuration file's path (for messages).
    @ivar path: the table's dotted path, e.g. C{discovery} or C{components.brig}.
    @ivar base_dir: the folder relative paths resolve against.
    @ivar name: for a table of a table of tables (C{[components.NAME]}),
        its NAME; else C{None}.
    """

    def __init__(
        self, values: Mapping[str, Any], *, file: str, path: str, base_dir: str, name: Optional[str] = None
    ) -> None:
        self._values = dict(values)
        self._used: set = set()
        self.file = file
        self.path = path
        self.base_dir = base_dir
        self.name = name

    def __repr__(self) -> str:
        return f"<Options [{self.path}] of {self.file}>"

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def keys(self) -> List[str]:
        """Every key the table holds."""
        return list(self._values)

    def error(self, key: Optional[str], message: str) -> ConfigError:
        """A L{ConfigError} about C{key} of this table (or the table itself)."""
        if not self.path and key:
            # a top-level key is itself a table: "[server]", not "[] server"
            where = f"[{key}]"
        else:
            where = f"[{self.path}]" + (f" {key}" if key else "")
        return ConfigError(message, file=self.file, path=where)

    def _get(self, key: str, default: Any, types: tuple, expected: str) -> Any:
        self._used.add(key)
        if key not in self._values:
            if default is _REQUIRED:
                raise self.error(key, f"is required ({expected})")
            return default
        value = self._values[key]
        # bool is an int in Python; never accept one for the other
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise self.error(key, f"must be {expected}, not {_describe_type(value)} {value!r}")
        return value

    @property
    def plugin(self) -> str:
        """The C{plugin} key: the name of the plugin this table selects."""
        return self.get_str("plugin")

    def get_str(self, key: str, default: Any = _REQUIRED) -> Any:
        """A string option."""
        value = self._get(key, default, (str,), "a string")
        if key in self._values and not value:
            raise self.error(key, "must not be empty")
        return value

    def get_bool(self, key: str, default: Any = _REQUIRED) -> Any:
        """A boolean option."""
        return self._get(key, default, (bool,), "true or false")

    def get_int(
        self,
        key: str,
        default: Any = _REQUIRED,
        *,
        minimum: Optional[int] = None,
        maximum: Optional[int] = None,
    ) -> Any:
        """An integer option, optionally bounded (inclusive)."""
        value = self._get(key, default, (int,), "an integer")
        if key in self._values:
            self._check_range(key, value, minimum, maximum)
        return value

    def get_number(
        self,
        key: str,
        default: Any = _REQUIRED,
        *,
        minimum: Optional[float] = None,
        maximum: Optional[float] = None,
    ) -> Any:
        """A number option (integer or float), returned as a float."""
        value = self._get(key, default, (int, float), "a number")
        if key in self._values:
            value = float(value)
            if value != value:  # TOML's nan passes every comparison
                raise self.error(key, "must be a number, not nan")
            self._check_range(key, value, minimum, maximum)
        return value

    def _check_range(self, key: str, value: float, minimum: Any, maximum: Any) -> None:
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, not {value}")

    def get_str_list(self, key: str, default: Any = _REQUIRED) -> Any:
        """A list of non-empty strings."""
        value = self._get(key, default, (list,), "a list of strings")
        if key not in self._values:
            return value
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(key, f"item {i} must be a non-empty string, not {item!r}")
        return list(value)

    def get_path(self, key: str, default: Any = _REQUIRED) -> Any:
        """A file system path, resolved against the configuration's folder."""
        value = self.get_str(key, default)
        if key not in self._values:
            return value
        return self.resolve(value)

    def get_path_list(self, key: str, default: Any = _REQUIRED) -> Any:
        """A list of paths, each resolved against the configuration's folder."""
        value = self.get_str_list(key, default)
        if key not in self._values:
            return value
        return [self.resolve(v) for v in value]

    def resolve(self, path: str) -> str:
        """C{path} made absolute against the configuration's folder."""
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(path)))

    def get_table(self, key: str, default: Any = _REQUIRED) -> Any:
        """A sub-table, as L{Options}."""
        value = self._get(key, default, (dict,), "a table")
        if key not in self._values:
            return value
        return self._child(_quote(key), value)

    def get_tables(self, key: str, default: Any = _REQUIRED) -> Any:
        """A table of tables (C{[key.NAME]}), as a dict of name to L{Options}."""
        value = self._get(key, default, (dict,), "a table of tables")
        if key not in self._values:
            return value
        result = {}
        for name, sub in value.items():
            if not isinstance(sub, dict):
                raise self.error(f"{key}.{name}", f"must be a table, not {_describe_type(sub)}")
            result[name] = self._child(f"{key}.{_quote(name)}", sub, name=name)
        return result

    def get_table_list(self, key: str, default: Any = _REQUIRED, *, single_ok: bool = False) -> Any:
        """
        An array of tables (C{[[key]]}), as a list of L{Options}; with
        C{single_ok}, a lone table (C{[key]}) is taken as a list of one.
        """
        if single_ok and isinstance(self._values.get(key), dict):
            return [self.get_table(key)]
        value = self._get(key, default, (list,), "an array of tables ([[...]])")
        if key not in self._values:
            return value
        result = []
        for i, sub in enumerate(value):
            if not isinstance(sub, dict):
                raise self.error(f"{key}[{i}]", "must be a table")
            result.append(self._child(f"{_quote(key)}[{i}]", sub))
        return result

    def _child(self, key: str, values: Mapping[str, Any], name: Optional[str] = None) -> Options:
        path = f"{self.path}.{key}" if self.path else key
        return Options(values, file=self.file, path=path, base_dir=self.base_dir, name=name)

    def was_read(self) -> bool:
        """Whether anybody read any key of this table."""
        return bool(self._used)

    def check_all_used(self) -> None:
        """
        Raise L{ConfigError} for the first key nobody read: unknown keys are
        mistakes, never ignored.
        """
        unknown = [k for k in self._values if k not in self._used]
        if unknown:
            known = ", ".join(sorted(self._used - {"plugin"})) or "none"
            raise self.error(unknown[0], f"is not a known option here (known options: {known})")


def _quote(name: str) -> str:
    return name if name.replace("-", "").replace("_", "").isalnum() else f'"{name}"'


@attrs.frozen
class ServerSection:
    backend_domain: str
    infra_domain: str
    data_dir: str


@attrs.frozen
class TLSSection:
    certificate: Optional[str]
    private_key: Optional[str]
    ca_certificates: Sequence[str]


@attrs.frozen
class QueueSettings:
    """
    C{[queue]}: the durable outbound queue (L{fedserver.outbound_queue}) and
    the deduplication of inbound calls that carry an idempotency key
    (L{fedserver.idempotency}); docs/queue.md explains each.

    @ivar initial_backoff: seconds before the first retry of a destination.
    @ivar backoff_multiplier: each further failure multiplies the wait.
    @ivar max_backoff: the wait between retries grows to at most this.
    @ivar jitter: each wait is changed at random by up to this fraction.
    @ivar max_lifetime: seconds after which an undelivered item is given up
        into the dead letters.
    @ivar dead_letter_ttl: seconds dead letters are kept.
    @ivar dedup_ttl: seconds the answer to an inbound call with an
        idempotency key is kept for repeats.
    @ivar poll_interval: seconds between looks at the queue's table (what
        other workers and C{fedserver queue} changed, backoffs that ended).
    @ivar concurrency: destinations this worker delivers to at once.
    @ivar worker_id: this worker's name in the queue's claims; by default
        the host name and the inward listener, which a restarted worker
        keeps, so that it takes over its own claims at once.
    """

    initial_backoff: float = 10.0
    backoff_multiplier: float = 2.0
    max_backoff: float = 4000.0
    jitter: float = 0.2
    max_lifetime: float = 5 * 86400.0
    dead_letter_ttl: float = 30 * 86400.0
    dedup_ttl: float = 6 * 86400.0
    poll_interval: float = 1.0
    concurrency: int = 64
    worker_id: Optional[str] = None


@attrs.frozen
class Limits:
    """
    @ivar max_body_bytes: larger request bodies get 413 without being read.
    @ivar request_timeout: seconds for a whole outbound federated request.
    @ivar connect_timeout: seconds to establish an outbound connection.
    @ivar component_timeout: seconds for a local component to answer.
    @ivar idle_timeout: seconds a listener keeps an idle connection open.
    @ivar header_timeout: seconds a request's line and headers may take to
        arrive on a listener, from its first byte.
    @ivar body_timeout: seconds a request's body may take to arrive on a
        listener, from the end of its headers.
    @ivar max_connections: connections the inward listener holds at once;
        more are closed as they arrive.
    @ivar max_outbound_per_destination: outbound calls in flight at once to
        one destination domain; more wait in a queue.
    @ivar max_outbound_queue_per_destination: outbound calls that may wait
        for one destination; more fail at once (C{federation-overloaded}).
    @ivar max_inbound_per_peer: inbound calls one authenticated peer domain
        may have in progress at once; more get 429 (C{too-many-requests}).
    @ivar inbound_rate_per_peer: inbound calls per second one authenticated
        peer domain may make (a token bucket with a burst of the same size);
        more get 429 (C{too-many-requests}).
    """

    max_body_bytes: int = 1024 * 1024
    request_timeout: float = 30.0
    connect_timeout: float = 10.0
    component_timeout: float = 30.0
    idle_timeout: float = 60.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1024
    max_outbound_per_destination: int = 32
    max_outbound_queue_per_destination: int = 1000
    max_inbound_per_peer: int = 64
    inbound_rate_per_peer: float = 5000.0


@attrs.frozen
class Config:
    """
    A validated configuration.  Plugin tables stay L{Options} until the
    plugin that owns them reads them.
    """

    file: str
    base_dir: str
    server: ServerSection
    inward_listen: str
    outward_listen: Optional[str]
    #: CIDRs that DNS-based discovery may connect to although not public
    allow_ip_ranges: Sequence[str]
    tls: TLSSection
    limits: Limits
    storage_database: str
    discovery: Options
    authenticator: Options
    authorizers: List[Options]
    components: Dict[str, Options]
    identity_providers: Dict[str, Options]
    #: top-level tables that protocol plugins read (e.g. C{[matrix]})
    sections: Dict[str, Options]
    #: C{[logging] format}: C{text}, C{json} (one object a line), or C{None}:
    #: the runner's choice (see L{fedserver.logs})
    log_format: Optional[str] = None
    #: C{[queue]}
    queue: QueueSettings = QueueSettings()

    def section(self, name: str) -> Optional[Options]:
        """A top-level table that a protocol plugin owns, if present."""
        return self.sections.get(name)


_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_-]+")

_DOMAIN_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-.")


def is_domain_name(value: str) -> bool:
    """Whether C{value} is a lower-case DNS domain name of ASCII labels."""
    labels = value.split(".")
    return not (
        not value
        or len(value) > 253
        or any(not label or len(label) > 63 for label in labels)
        or not set(value) <= _DOMAIN_CHARS
        or any(label.startswith("-") or label.endswith("-") for label in labels)
    )


def check_domain(options: Options, key: str, value: str) -> str:
    """Validate a DNS domain name (lower case ASCII labels); return it."""
    if not is_domain_name(value):
        raise options.error(key, f"{value!r} is not a lower-case DNS domain name")
    return value


def load_config(path: str) -> Config:
    """Read and validate the configuration file at C{path}."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("the configuration file does not exist", file=path) from None
    except OSError as e:
        raise ConfigError(f"cannot read the configuration file: {e.strerror}", file=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"is not valid TOML: {e}", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"is not valid TOML: it is not UTF-8 ({e.reason} at byte {e.start})", file=path) from None
    except RecursionError:
        raise ConfigError("is not valid TOML for fedserver: its arrays or tables are nested too deeply",
                          file=path) from None
    return parse_config(raw, file=path, base_dir=os.path.dirname(path))


_LOCAL_INTERFACES = {"127.0.0.1", "::1", "localhost", "0:0:0:0:0:0:0:1"}


def listens_locally(description: str) -> bool:
    """
    Whether a Twisted server endpoint description listens on this machine
    only: a UNIX socket, or TCP bound to a loopback interface.  Other
    endpoint types cannot be judged and count as not local.
    """
    kind, _, rest = description.partition(":")
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False
    for part in rest.replace("\\:", "\0").split(":"):
        key, _, value = part.partition("=")
        if key == "interface":
            value = value.replace("\0", ":")
            return value in _LOCAL_INTERFACES or value.startswith("127.")
    return False


def _queue_settings(table: Optional[Options]) -> QueueSettings:
    default = QueueSettings()
    if table is None:
        return default
    day = 86400.0
    initial = table.get_number("initial_backoff", default.initial_backoff, minimum=0.01, maximum=day)
    settings = QueueSettings(
        initial_backoff=initial,
        backoff_multiplier=table.get_number("backoff_multiplier", default.backoff_multiplier, minimum=1, maximum=10),
        max_backoff=table.get_number("max_backoff", max(default.max_backoff, initial), minimum=0.01,
                                     maximum=7 * day),
        jitter=table.get_number("jitter", default.jitter, minimum=0, maximum=0.9),
        max_lifetime=table.get_number("max_lifetime", default.max_lifetime, minimum=1, maximum=365 * day),
        dead_letter_ttl=table.get_number("dead_letter_ttl", default.dead_letter_ttl, minimum=60,
                                         maximum=3650 * day),
        dedup_ttl=table.get_number("dedup_ttl", default.dedup_ttl, minimum=60, maximum=365 * day),
        poll_interval=table.get_number("poll_interval", default.poll_interval, minimum=0.05, maximum=60),
        concurrency=table.get_int("concurrency", default.concurrency, minimum=1, maximum=10_000),
        worker_id=table.get_str("worker_id", None),
    )
    table.check_all_used()
    if settings.max_backoff < settings.initial_backoff:
        raise table.error("max_backoff", f"({settings.max_backoff} s) must not be less than initial_backoff "
                          f"({settings.initial_backoff} s)")
    if settings.worker_id is not None and (len(settings.worker_id) > 200 or not settings.worker_id.isprintable()):
        raise table.error("worker_id", "must be at most 200 printable characters")
    return settings


def parse_config(raw: Mapping[str, Any], *, file: str, base_dir: str) -> Config:
    """Validate an already parsed configuration mapping."""
    top = Options(raw, file=file, path="", base_dir=base_dir)

    server = top.get_table("server")
    backend = check_domain(server, "backend_domain", server.get_str("backend_domain"))
    infra = check_domain(server, "infra_domain", server.get_str("infra_domain", backend))
    data_dir = server.get_path("data_dir", os.path.join(base_dir, "var", backend))
    server.check_all_used()

    inward = top.get_table("inward")
    inward_listen = inward.get_str("listen")
    inward.check_all_used()
    outward = top.get_table("outward", None)
    outward_listen = None
    allow_ip_ranges: List[str] = []
    if outward is not None:
        outward_listen = outward.get_str("listen", None)
        expose = outward.get_bool("expose", False)
        if outward_listen and not expose and not listens_locally(outward_listen):
            raise outward.error(
                "listen",
                f"{outward_listen!r} listens beyond this machine, but the outward listener has no "
                "authentication: anyone reaching it could federate as this backend. Listen on "
                "127.0.0.1 or ::1 (interface=...), or set expose = true if a firewall guards it",
            )
        allow_ip_ranges = outward.get_str_list("allow_ip_ranges", [])
        outward.check_all_used()

    tls = top.get_table("tls", None)
    if tls is None:
        tls_section = TLSSection(None, None, ())
    else:
        tls_section = TLSSection(
            tls.get_path("certificate", None),
            tls.get_path("private_key", None),
            tuple(tls.get_path_list("ca_certificates", [])),
        )
        if (tls_section.certificate is None) != (tls_section.private_key is None):
            raise tls.error(None, "certificate and private_key go together: set both or neither")
        tls.check_all_used()

    limits_table = top.get_table("limits", None)
    limits = Limits()
    if limits_table is not None:
        limits = Limits(
            max_body_bytes=limits_table.get_int(
                "max_body_bytes", limits.max_body_bytes, minimum=1, maximum=1 << 30
            ),
            request_timeout=limits_table.get_number(
                "request_timeout", limits.request_timeout, minimum=0.1, maximum=3600
            ),
            connect_timeout=limits_table.get_number(
                # unset, it never exceeds the request timeout
                "connect_timeout",
                min(limits.connect_timeout, limits_table.get_number("request_timeout", limits.request_timeout)),
                minimum=0.1, maximum=600,
            ),
            component_timeout=limits_table.get_number(
                "component_timeout", limits.component_timeout, minimum=0.1, maximum=3600
            ),
            idle_timeout=limits_table.get_number(
                "idle_timeout", limits.idle_timeout, minimum=1, maximum=86400
            ),
            header_timeout=limits_table.get_number(
                "header_timeout", limits.header_timeout, minimum=0.1, maximum=3600
            ),
            body_timeout=limits_table.get_number(
                "body_timeout", limits.body_timeout, minimum=0.1, maximum=86400
            ),
            max_connections=limits_table.get_int(
                "max_connections", limits.max_connections, minimum=1, maximum=1_000_000
            ),
            max_outbound_per_destination=limits_table.get_int(
                "max_outbound_per_destination", limits.max_outbound_per_destination, minimum=1, maximum=100_000
            ),
            max_outbound_queue_per_destination=limits_table.get_int(
                "max_outbound_queue_per_destination", limits.max_outbound_queue_per_destination,
                minimum=0, maximum=1_000_000
            ),
            max_inbound_per_peer=limits_table.get_int(
                "max_inbound_per_peer", limits.max_inbound_per_peer, minimum=1, maximum=100_000
            ),
            inbound_rate_per_peer=limits_table.get_number(
                "inbound_rate_per_peer", limits.inbound_rate_per_peer, minimum=0.1, maximum=1_000_000
            ),
        )
        limits_table.check_all_used()
        if limits.connect_timeout > limits.request_timeout:
            raise limits_table.error(
                "connect_timeout",
                f"({limits.connect_timeout} s) must not exceed request_timeout ({limits.request_timeout} s)",
            )

    storage = top.get_table("storage", None)
    database = f"sqlite:{os.path.join(data_dir, 'fedserver.sqlite')}"
    if storage is not None:
        database = storage.get_str("database", database)
        if database.startswith("sqlite:") and database != "sqlite:":
            # like every other path, a relative SQLite file is relative to this file
            database = "sqlite:" + storage.resolve(database[len("sqlite:"):])
        storage.check_all_used()

    logging_table = top.get_table("logging", None)
    log_format = None
    if logging_table is not None:
        log_format = logging_table.get_str("format", None)
        if log_format not in (None, "text", "json"):
            raise logging_table.error("format", f"must be \"text\" or \"json\", not {log_format[:40]!r}")
        logging_table.check_all_used()

    queue = _queue_settings(top.get_table("queue", None))

    discovery = top.get_table("discovery")
    authenticator = top.get_table("authenticator")
    for table in (discovery, authenticator):
        table.plugin  # noqa: B018 - a missing plugin key is reported here
    authorizers = top.get_table_list("authorizers", [])
    for table in authorizers:
        table.plugin  # noqa: B018
    components = top.get_tables("components", {})
    for name in components:
        if not _COMPONENT_NAME.fullmatch(name):
            raise top.error(
                f"components.{_quote(name)}",
                "component names are ASCII letters, digits, '_' and '-' (they appear in "
                "/federation/{component}/{rpc})",
            )
    identity_providers = top.get_tables("identity_providers", {})
    for table in [*components.values(), *identity_providers.values()]:
        table.plugin  # noqa: B018

    sections = {key: top.get_table(key) for key in top.keys() if key not in top._used}
    return Config(
        file=file,
        base_dir=base_dir,
        server=ServerSection(backend, infra, data_dir),
        inward_listen=inward_listen,
        outward_listen=outward_listen,
        allow_ip_ranges=tuple(allow_ip_ranges),
        tls=tls_section,
        limits=limits,
        storage_database=database,
        discovery=discovery,
        authenticator=authenticator,
        authorizers=authorizers,
        components=components,
        identity_providers=identity_providers,
        sections=sections,
        log_format=log_format,
        queue=queue,
    )
