"""
The C{fedserver} command: operator tools over the library.

    fedserver check-config FILE
    fedserver plugins
    fedserver federation-request --config FILE [--method M] [--body JSON] DESTINATION PATH
    fedserver discover [--config FILE] [--json] DOMAIN
    fedserver dev-pki DIR --domain NAME [--domain NAME ...]
    fedserver generate-signing-key [--key-version VERSION] FILE
    fedserver mimi-identity --config FILE --provider NAME [--at UNIX_TS] [--json] CHAIN.pem
    fedserver relay-fingerprint CERT.pem
    fedserver queue --config FILE [--json] [list | retry DOMAIN [--dead] | drop DOMAIN [--dead] | dead [DOMAIN]]
    fedserver backup --config FILE DEST
    fedserver restore --config FILE BACKUP
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any, Optional, Sequence

from fedserver.errors import ConfigError, FederationError


def _check_config(args: argparse.Namespace) -> int:
    from fedserver.service import build_service

    try:
        build_service(args.file, migrate=False)
    except ConfigError as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from fedserver.registry import PluginRegistry, describe, make_plugin_manager

    try:
        registry = PluginRegistry(make_plugin_manager())
    except ConfigError as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return 1
    rows = describe(registry)
    width = max((len(kind) for kind, _, _ in rows), default=4)
    name_width = max((len(name) for _, name, _ in rows), default=4)
    for kind, name, source in rows:
        print(f"{kind:<{width}}  {name:<{name_width}}  {source}")
    return 0


def _federation_request(args: argparse.Namespace) -> int:
    from twisted.internet import task

    body = b""
    if args.body is not None:
        try:
            json.loads(args.body)
        except ValueError as e:
            print(f"fedserver: --body is not valid JSON: {e}", file=sys.stderr)
            return 2
        body = args.body.encode("utf-8")
    if not args.path.startswith("/"):
        print("fedserver: PATH must start with /", file=sys.stderr)
        return 2
    # react() stops the reactor and exits with the code main fails with
    task.react(_send_federation_request, (args, body))
    return 1  # pragma: no cover - react() exits


async def _run_federation_request(reactor: Any, args: argparse.Namespace, body: bytes) -> int:
    from fedserver.service import build_service
    from fedserver.values import FederatedCall, OutboundRequest

    try:
        service = build_service(args.config, reactor=reactor, migrate=False, listen=False)
    except ConfigError as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return 1
    pipeline = service.pipeline
    parts = args.path.split("?", 1)[0].split("/")
    component, rpc = (parts[2], parts[3]) if len(parts) == 4 and parts[1] == "federation" else ("", "")
    call = FederatedCall(
        origin_domain=pipeline.backend_domain,
        target_domain=args.destination,
        component=component,
        rpc=rpc,
        method=args.method,
        headers=(),
        body=body,
        request_id=f"federation-request-{uuid.uuid4()}",
    )
    headers = [("Request-Id", call.request_id)]
    if body:
        headers.append(("Content-Type", "application/json"))
    request = OutboundRequest(
        destination=args.destination, method=args.method, path=args.path, headers=headers, body=body
    )
    try:
        await pipeline.authorize_outbound(args.destination, call)
        response = await pipeline.send(request)
    except FederationError as e:
        print(json.dumps(e.to_json(), indent=2))
        print(f"fedserver: {e.label}: {e.message}", file=sys.stderr)
        return 1
    finally:
        await pipeline.client.close()
    print(f"HTTP {response.code}", file=sys.stderr)
    text = response.body.decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    print(text)
    return 0 if 200 <= response.code < 300 else 1


def _send_federation_request(reactor: Any, args: argparse.Namespace, body: bytes) -> Any:
    from twisted.internet.defer import Deferred

    d = Deferred.fromCoroutine(_run_federation_request(reactor, args, body))

    def exit_with(code: int) -> None:
        raise SystemExit(code)

    d.addCallback(exit_with)
    return d


def _discover(args: argparse.Namespace) -> int:
    from twisted.internet import task

    task.react(_run_discover, (args,))
    return 1  # pragma: no cover - react() exits


def _run_discover(reactor: Any, args: argparse.Namespace) -> Any:
    from twisted.internet.defer import Deferred

    d = Deferred.fromCoroutine(_check_domain(reactor, args))

    def exit_with(code: int) -> None:
        raise SystemExit(code)

    return d.addCallback(exit_with)


async def _check_domain(reactor: Any, args: argparse.Namespace) -> int:
    from fedserver.checker import check, format_report

    material = None
    if args.config:
        from fedserver.service import build_service

        try:
            service = build_service(args.config, reactor=reactor, migrate=False, listen=False)
        except ConfigError as e:
            print(f"fedserver: {e}", file=sys.stderr)
            return 2
        discovery = service.context.discovery
        if service.context.config.tls.certificate and service.context.config.tls.ca_certificates:
            material = service.context.tls_material("fedserver discover")
        # else: no client certificate to present, the system's roots to trust
    else:
        from fedserver.addresses import AddressPolicy
        from fedserver.dns import DNSLookup
        from fedserver_wire.discovery import SRVDiscovery

        discovery = SRVDiscovery(DNSLookup(reactor, timeout=args.timeout), AddressPolicy(), reactor)
    report = await check(reactor, discovery, args.domain.lower(), material, timeout=args.timeout)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report.reachable else 1


def _dev_pki(args: argparse.Namespace) -> int:
    from fedserver.pki import create_dev_pki

    create_dev_pki(args.directory, args.domain)
    for domain in args.domain:
        print(f"{args.directory}/{domain}.pem  {args.directory}/{domain}.key")
    print(f"{args.directory}/ca.pem  (the CA every backend lists in [tls] ca_certificates)")
    return 0


def _generate_signing_key(args: argparse.Namespace) -> int:
    from fedserver_matrix.keys import KeyFormatError, generate_signing_key, key_id_of, write_signing_keys

    try:
        key = generate_signing_key(args.key_version)
        write_signing_keys(args.file, [key])
    except KeyFormatError as e:
        print(f"fedserver: --key-version: {e}", file=sys.stderr)
        return 2
    except FileExistsError:
        print(f"fedserver: {args.file} exists; a signing key is never overwritten (move it away first)",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"fedserver: cannot write {args.file}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"{args.file}: Matrix signing key {key_id_of(key)}")
    return 0


def _mimi_identity(args: argparse.Namespace) -> int:
    import time

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from fedserver.service import build_service
    from fedserver.values import Identity

    try:
        service = build_service(args.config, reactor=Clock(), migrate=False, listen=False)
    except ConfigError as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return 1
    provider = service.context.identity_providers.get(args.provider)
    if provider is None:
        known = ", ".join(sorted(service.context.identity_providers)) or "none"
        print(f"fedserver: {args.config} has no [identity_providers.{args.provider}] (configured: {known})",
              file=sys.stderr)
        return 1
    try:
        with open(args.chain, "rb") as f:
            chain = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(f.read())]
    except OSError as e:
        print(f"fedserver: cannot read {args.chain}: {e.strerror}", file=sys.stderr)
        return 1
    except ValueError:
        print(f"fedserver: {args.chain} holds no PEM certificate", file=sys.stderr)
        return 1
    moment = int(time.time()) if args.at is None else args.at
    identity = Identity(credential_type="x509", credential=chain)
    outcome: list = []
    provider.validate(identity, [], {"msg_timestamp": moment}).addBoth(outcome.append)
    result: dict = {"provider": args.provider, "chain": args.chain, "at": moment}
    try:
        if not outcome:
            raise FederationError(f"identity provider {args.provider!r} did not answer at once", "internal-error")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        result["client_handle"] = provider.client_handle(identity)
        for name in ("account", "domain"):
            method = getattr(provider, f"{name}_identifier", None)
            result[name] = method(identity) if method else None
    except FederationError as e:
        result.update(valid=False, label=e.label, reason=e.message)
        if args.json:
            print(json.dumps(result, indent=2))
        print(f"fedserver: {args.chain} is refused: {e.label}: {e.message}", file=sys.stderr)
        return 1
    result["valid"] = True
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"client handle: {result['client_handle']}")
        print(f"account:       {result['account'] if result['account'] is not None else '(not configured)'}")
        print(f"domain:        {result['domain'] if result['domain'] is not None else '(not configured)'}")
    return 0


def _relay_fingerprint(args: argparse.Namespace) -> int:
    from fedserver_relay.fingerprint import fingerprint_of_der, fingerprint_of_pem, format_fingerprint

    try:
        with open(args.certificate, "rb") as f:
            data = f.read()
    except OSError as e:
        print(f"fedserver: cannot read {args.certificate}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        if b"-----BEGIN" in data:
            fingerprint = fingerprint_of_pem(data)
            blocks = data.count(b"-----BEGIN CERTIFICATE-----")
            if blocks > 1:
                print(f"fedserver: {args.certificate} holds {blocks} certificates: this is the fingerprint of "
                      "the first (the leaf, which the relay presents)", file=sys.stderr)
        else:
            fingerprint = fingerprint_of_der(data)
    except ValueError:
        print(f"fedserver: {args.certificate} holds no certificate (expected PEM, as [tls] certificate names, "
              "or DER); a relay's fingerprint is that of its [tls] certificate", file=sys.stderr)
        return 1
    print(format_fingerprint(fingerprint))
    print(format_fingerprint(fingerprint, colons=False))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedserver", description="fedserver operator tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check-config", help="validate a configuration as startup does")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=_check_config)

    plugins = commands.add_parser("plugins", help="list installed plugins by interface")
    plugins.set_defaults(run=_plugins)

    request = commands.add_parser(
        "federation-request",
        help="send a request to a remote backend's inward listener as this backend",
    )
    request.add_argument("--config", required=True, metavar="FILE")
    request.add_argument("--method", default="POST", type=str.upper)
    request.add_argument("--body", metavar="JSON", help="request body (JSON)")
    request.add_argument("destination", metavar="DESTINATION", help="backend domain")
    request.add_argument("path", metavar="PATH", help="e.g. /federation/brig/get-user-by-handle")
    request.set_defaults(run=_federation_request)

    discover = commands.add_parser(
        "discover", help="check whether this backend can federate with a domain, and why not"
    )
    discover.add_argument("--config", metavar="FILE",
                          help="use this backend's discovery, address policy and certificate "
                          "(default: Wire SRV discovery with the system resolver, no client certificate)")
    discover.add_argument("--json", action="store_true", help="print the report as JSON")
    discover.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    discover.add_argument("domain", metavar="DOMAIN", help="a backend domain")
    discover.set_defaults(run=_discover)

    pki = commands.add_parser("dev-pki", help="make a development CA and certificates")
    pki.add_argument("directory", metavar="DIR")
    pki.add_argument("--domain", action="append", required=True, metavar="NAME")
    pki.set_defaults(run=_dev_pki)

    signing_key = commands.add_parser(
        "generate-signing-key", help="write a new Matrix signing key file (Synapse's format, mode 0600)"
    )
    signing_key.add_argument("--key-version", metavar="VERSION",
                             help="the key version: letters, digits and _ (default: a_ and 4 random characters)")
    signing_key.add_argument("file", metavar="FILE")
    signing_key.set_defaults(run=_generate_signing_key)

    mimi = commands.add_parser(
        "mimi-identity", help="check an X.509 chain with a configured MIMI identity provider"
    )
    mimi.add_argument("--config", required=True, metavar="FILE")
    mimi.add_argument("--provider", required=True, metavar="NAME",
                      help="the NAME of an [identity_providers.NAME] table")
    mimi.add_argument("--at", type=int, metavar="UNIX_TS",
                      help="the message timestamp to validate at (default: now)")
    mimi.add_argument("--json", action="store_true", help="print the result as JSON")
    mimi.add_argument("chain", metavar="CHAIN.pem", help="PEM certificates, leaf first")
    mimi.set_defaults(run=_mimi_identity)

    relay = commands.add_parser(
        "relay-fingerprint",
        help="print a relay certificate's fingerprint for other relays' [[relay.peers]] and [[relay.trusted]]",
        description="Print the SHA-256 fingerprint of a certificate (of its DER encoding): first with colons, "
        "then as 64 hex digits. Other relays list it as the fingerprint of this relay; either form works.",
    )
    relay.add_argument("certificate", metavar="CERT.pem",
                       help="the relay's [tls] certificate (PEM, leaf first; DER also works)")
    relay.set_defaults(run=_relay_fingerprint)

    from fedserver.backup import add_commands as add_backup_commands

    add_backup_commands(commands)

    from fedserver.queue_cli import add_commands as add_queue_commands

    add_queue_commands(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
