"""Tests for the MIMI identity providers (fedserver_mimi.identity) and C{fedserver mimi-identity}."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import textwrap
import time
from typing import Any, Dict, List, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import fedserver_mimi.identity
from fedserver.cli import main
from fedserver.config import Options
from fedserver.errors import ConfigError, FederationError
from fedserver.interfaces import IIdentityProvider
from fedserver.registry import PluginRegistry, make_plugin_manager
from fedserver.values import Identity
from fedserver_mimi.identity import BasicIdentityProvider, X509IdentityProvider
from tests.unit.helpers import local_config_head

deferreds = SynchronousTestCase()

UTC = datetime.timezone.utc


def ts(year: int, month: int = 1, day: int = 1) -> int:
    return int(datetime.datetime(year, month, day, tzinfo=UTC).timestamp())


LEAF_START, LEAF_END = ts(2024), ts(2025)
DURING, AFTER, BEFORE = ts(2024, 6), ts(2026), ts(2023)


def new_key(kind: str) -> Any:
    return ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())


def certificate(
    cn: str,
    key: Any,
    issuer: Optional[x509.Certificate],
    issuer_key: Any,
    *,
    ca: bool,
    not_before: int = ts(2020),
    not_after: int = ts(2040),
) -> x509.Certificate:
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(not_before, UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(not_after, UTC))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, algorithm)


class Chain:
    """root (domain CN) -> intermediate (account CN) -> leaf (device CN)."""

    def __init__(self, kind: str, *, domain: str = "example.com", account: str = "alice",
                 device: str = "phone") -> None:
        root_key, inter_key, leaf_key = new_key(kind), new_key(kind), new_key(kind)
        self.root = certificate(domain, root_key, None, root_key, ca=True)
        self.intermediate = certificate(account, inter_key, self.root, root_key, ca=True)
        self.leaf = certificate(device, leaf_key, self.intermediate, inter_key, ca=False,
                                not_before=LEAF_START, not_after=LEAF_END)

    @property
    def certificates(self) -> List[x509.Certificate]:
        return [self.leaf, self.intermediate, self.root]

    def identity(self, *, with_root: bool = True) -> Identity:
        certs = self.certificates if with_root else self.certificates[:2]
        return Identity("x509", [c.public_bytes(Encoding.DER) for c in certs])

    def write_root(self, path: Any) -> str:
        path.write_bytes(self.root.public_bytes(Encoding.PEM))
        return str(path.name)


def build(tmp_path: Any, **table: Any) -> Any:
    manager = make_plugin_manager(load_entrypoints=False, plugins=[fedserver_mimi.identity])
    options = Options(table, file=str(tmp_path / "test.toml"), path="identity_providers.devices",
                      base_dir=str(tmp_path), name="devices")
    return PluginRegistry(manager).build("identity_provider", options, context=None)


def x509_provider(tmp_path: Any, chain: Chain, **extra: Any) -> X509IdentityProvider:
    table: Dict[str, Any] = {
        "plugin": "x509",
        "trust_roots": [chain.write_root(tmp_path / "roots.pem")],
        "device_range": {"start": 0, "end": 0},
        "account_offset": 1,
        "domain_offset": 2,
    }
    table.update(extra)
    provider = build(tmp_path, **{k: v for k, v in table.items() if v is not None})
    assert isinstance(provider, X509IdentityProvider)
    return provider


def refusal(provider: Any, identity: Identity, context: Any) -> FederationError:
    failure = deferreds.failureResultOf(provider.validate(identity, [], context), FederationError)
    return failure.value


KINDS = ["p256", "ed25519"]


@pytest.fixture(params=KINDS)
def chain(request: Any) -> Chain:
    return Chain(request.param)


def test_valid_chain_and_identifiers(tmp_path, chain):
    provider = x509_provider(tmp_path, chain)
    assert verifyObject(IIdentityProvider, provider)
    assert provider.supported_credentials() == ("x509",)
    identity = chain.identity()
    assert deferreds.successResultOf(provider.validate(identity, [], {"msg_timestamp": DURING})) is None
    assert deferreds.successResultOf(provider.validate(identity, [], DURING)) is None
    assert provider.client_handle(identity) == "phone"
    assert provider.account_identifier(identity) == "alice"
    assert provider.domain_identifier(identity) == "example.com"


def test_range_joins_common_names(tmp_path, chain):
    provider = x509_provider(tmp_path, chain, device_range={"start": 0, "end": 1}, account_offset=None)
    assert provider.client_handle(chain.identity()) == "phone:alice"
    assert provider.account_identifier(chain.identity()) is None


def test_root_may_be_left_out_when_no_offset_reaches_it(tmp_path, chain):
    provider = x509_provider(tmp_path, chain, domain_offset=None)
    identity = chain.identity(with_root=False)
    assert deferreds.successResultOf(provider.validate(identity, [], DURING)) is None
    assert provider.domain_identifier(identity) is None
    short = x509_provider(tmp_path, chain)
    assert "offset 2" in refusal(short, identity, DURING).message


def test_expired_at_the_timestamp_but_valid_before(tmp_path, chain):
    provider = x509_provider(tmp_path, chain)
    error = refusal(provider, chain.identity(), {"msg_timestamp": AFTER})
    assert error.label == "authentication-failure"
    assert "expired" in error.message and "2026-01-01" in error.message
    assert "not yet valid" in refusal(provider, chain.identity(), BEFORE).message
    assert deferreds.successResultOf(provider.validate(chain.identity(), [], LEAF_END - 60)) is None


def test_wrong_root(tmp_path, chain):
    other = Chain("ed25519", domain="other.example")
    provider = x509_provider(tmp_path, chain, trust_roots=[other.write_root(tmp_path / "other.pem")])
    error = refusal(provider, chain.identity(), DURING)
    assert error.label == "authentication-failure"
    assert "does not lead to a trust root" in error.message
    # a root of the same name but another key
    impostor = Chain("p256")
    provider = x509_provider(tmp_path, chain, trust_roots=[impostor.write_root(tmp_path / "impostor.pem")])
    assert "signature" in refusal(provider, chain.identity(), DURING).message


def test_chain_out_of_order_or_with_strangers(tmp_path, chain):
    provider = x509_provider(tmp_path, chain)
    der = [c.public_bytes(Encoding.DER) for c in chain.certificates]
    stranger = Chain("p256").leaf.public_bytes(Encoding.DER)
    for credential in ([der[0], stranger, der[1], der[2]], [der[0], der[2], der[1]]):
        assert "not the validated chain" in refusal(provider, Identity("x509", credential), DURING).message


@pytest.mark.parametrize("bad", ["al@ice", "a/b", "x#1", "$me", "a:b"])
def test_forbidden_characters(tmp_path, bad):
    chain = Chain("ed25519", account=bad)
    provider = x509_provider(tmp_path, chain)
    error = refusal(provider, chain.identity(), DURING)
    assert "may not contain any of @ / # $ :" in error.message and repr(bad) in error.message
    with pytest.raises(FederationError, match="may not contain"):
        provider.account_identifier(chain.identity())
    # a CN outside every configured offset is not used, so it does not matter
    lenient = x509_provider(tmp_path, chain, account_offset=None)
    assert deferreds.successResultOf(lenient.validate(chain.identity(), [], DURING)) is None


def test_bad_credentials_and_contexts(tmp_path):
    chain = Chain("p256")
    provider = x509_provider(tmp_path, chain)
    assert refusal(provider, Identity("basic", b"alice"), DURING).label == "authentication-failure"
    assert refusal(provider, Identity("x509", [b"not DER"]), DURING).label == "certificate-parse-error"
    assert refusal(provider, Identity("x509", []), DURING).label == "certificate-parse-error"
    assert "msg_timestamp" in refusal(provider, chain.identity(), None).message
    assert "msg_timestamp" in refusal(provider, chain.identity(), {"msg_timestamp": True}).message


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"device_range": {"start": 2, "end": 1}}, r"device_range: device_range end \(1\) must be at least"),
        ({"account_offset": 0}, r"account_offset: account_offset \(0\) must be greater than the device_range end"),
        ({"domain_offset": 0, "account_offset": None},
         r"domain_offset: domain_offset \(0\) must be greater than the device_range end"),
        ({"account_offset": 2, "domain_offset": 1},
         r"domain_offset: domain_offset \(1\) must be greater than account_offset"),
        ({"account_offset": 2, "domain_offset": 2}, r"domain_offset \(2\) must be greater than account_offset \(2\)"),
        ({"account_offset": 256}, r"account_offset: must be at most 255"),
        ({"device_range": {"start": 0}}, r"\[identity_providers.devices.device_range\] end: is required"),
        ({"device_range": {"start": 0, "end": 0, "stop": 1}},
         r"\[identity_providers.devices.device_range\] stop: is not a known option"),
        ({"colour": "blue"}, r"colour: is not a known option"),
        ({"trust_roots": ["missing.pem"]}, r"trust_roots: cannot read .*missing.pem"),
        ({"trust_roots": []}, r"trust_roots: must list at least one PEM file"),
    ],
)
def test_bad_configuration(tmp_path, extra, message):
    chain = Chain("p256")
    extra = {k: v for k, v in extra.items()}
    table: Dict[str, Any] = {
        "plugin": "x509",
        "trust_roots": [chain.write_root(tmp_path / "roots.pem")],
        "device_range": {"start": 0, "end": 0},
        "account_offset": 1,
        "domain_offset": 2,
    }
    table.update(extra)
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        build(tmp_path, **table)


def test_trust_roots_not_pem(tmp_path):
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match=r"junk\.pem holds no PEM certificate"):
        build(tmp_path, plugin="x509", trust_roots=["junk.pem"], device_range={"start": 0, "end": 0})


def test_valid_successor(tmp_path, chain):
    provider = x509_provider(tmp_path, chain)
    # a new leaf for the same device, under the same account
    same = Chain("p256", device="phone")
    other_device = Chain("p256", device="laptop")
    assert provider.valid_successor(chain.identity(), same.identity())
    assert not provider.valid_successor(chain.identity(), other_device.identity())
    assert not provider.valid_successor(chain.identity(), Identity("x509", [b"junk"]))


def test_basic_provider(tmp_path):
    provider = build(tmp_path, plugin="basic")
    assert isinstance(provider, BasicIdentityProvider)
    assert verifyObject(IIdentityProvider, provider)
    assert provider.supported_credentials() == ("basic",)
    for credential in (b"alice@example.com", "alice@example.com"):
        identity = Identity("basic", credential)
        assert deferreds.successResultOf(provider.validate(identity, [], None)) is None
        assert provider.client_identifier(identity) == credential
        assert provider.client_handle(identity) == "alice@example.com"
    assert provider.valid_successor(Identity("basic", b"alice"), Identity("basic", "alice"))
    assert not provider.valid_successor(Identity("basic", b"alice"), Identity("basic", b"bob"))
    assert not provider.valid_successor(Identity("basic", b"alice"), Identity("x509", [b"alice"]))
    error = deferreds.failureResultOf(provider.validate(Identity("x509", []), [], None), FederationError).value
    assert "only basic credentials" in error.message
    with pytest.raises(FederationError, match="not UTF-8"):
        provider.client_handle(Identity("basic", b"\xff"))
    with pytest.raises(ConfigError, match="colour: is not a known option"):
        build(tmp_path, plugin="basic", colour="blue")


# --- chains made by openssl ---------------------------------------------------------

def openssl(*args: str, cwd: Any) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def openssl_chain(directory: Any, kind: str, days: int = 30, account: str = "alice") -> None:
    """root.pem (CN example.com) -> inter.pem (CN C{account}) -> leaf.pem (CN phone), chain.pem leaf first."""
    assert shutil.which("openssl"), "these tests need the openssl command (tests/run.sh installs it)"
    directory.mkdir()
    algorithm = ["-algorithm", "ED25519"] if kind == "ed25519" else [
        "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    for name in ("root", "inter", "leaf"):
        openssl("genpkey", *algorithm, "-out", f"{name}.key", cwd=directory)
    (directory / "ca.ext").write_text(
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    (directory / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl("req", "-x509", "-new", "-key", "root.key", "-subj", "/CN=example.com", "-days", "3650",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "root.pem", cwd=directory)
    for name, issuer, cn, ext, valid in (("inter", "root", account, "ca.ext", "3650"),
                                         ("leaf", "inter", "phone", "leaf.ext", str(days))):
        subject = "/CN=" + cn.replace("/", "\\/")  # -subj escapes a slash in a value with a backslash
        openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=directory)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.pem", "-CAkey", f"{issuer}.key",
                "-CAcreateserial", "-days", valid, "-extfile", ext, "-out", f"{name}.pem", cwd=directory)
    chain = b"".join((directory / f"{n}.pem").read_bytes() for n in ("leaf", "inter", "root"))
    (directory / "chain.pem").write_bytes(chain)


def pem_identity(path: Any) -> Identity:
    certs = x509.load_pem_x509_certificates(path.read_bytes())
    return Identity("x509", [c.public_bytes(Encoding.DER) for c in certs])


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_made_chain(tmp_path, kind):
    openssl_chain(tmp_path / "ossl", kind)
    provider = build(tmp_path, plugin="x509", trust_roots=["ossl/root.pem"],
                     device_range={"start": 0, "end": 0}, account_offset=1, domain_offset=2)
    identity = pem_identity(tmp_path / "ossl" / "chain.pem")
    now = int(time.time())
    assert deferreds.successResultOf(provider.validate(identity, [], {"msg_timestamp": now})) is None
    assert (provider.client_handle(identity), provider.account_identifier(identity),
            provider.domain_identifier(identity)) == ("phone", "alice", "example.com")
    assert "expired" in refusal(provider, identity, now + 60 * 86400).message
    assert "not yet valid" in refusal(provider, identity, now - 86400).message


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_made_chain_with_another_root(tmp_path, kind):
    openssl_chain(tmp_path / "ossl", kind)
    openssl_chain(tmp_path / "other", kind)
    provider = build(tmp_path, plugin="x509", trust_roots=["other/root.pem"], device_range={"start": 0, "end": 0})
    identity = pem_identity(tmp_path / "ossl" / "chain.pem")
    message = refusal(provider, identity, int(time.time())).message
    assert message == "the certificate chain does not lead to a trust root of this identity provider"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["@", "/", "#", "$", ":"])
def test_openssl_made_chain_with_a_forbidden_character(tmp_path, kind, bad):
    openssl_chain(tmp_path / "ossl", kind, account=f"al{bad}ice")
    provider = build(tmp_path, plugin="x509", trust_roots=["ossl/root.pem"],
                     device_range={"start": 0, "end": 0}, account_offset=1)
    identity = pem_identity(tmp_path / "ossl" / "chain.pem")
    message = refusal(provider, identity, int(time.time())).message
    assert message == (f"the Common Name 'al{bad}ice' of certificate 1 (counting from the leaf) contains {bad}; "
                       "Common Names may not contain any of @ / # $ :")
    # a CN outside the configured offsets is not an identifier, so it is not checked
    narrow = build(tmp_path, plugin="x509", trust_roots=["ossl/root.pem"], device_range={"start": 0, "end": 0})
    assert deferreds.successResultOf(narrow.validate(identity, [], {"msg_timestamp": int(time.time())})) is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "offsets, message",
    [
        ({"device_range": {"start": 1, "end": 0}}, "device_range end (0) must be at least its start (1)"),
        ({"device_range": {"start": 0, "end": 1}, "account_offset": 1},
         "account_offset (1) must be greater than the device_range end (1)"),
        ({"device_range": {"start": 0, "end": 0}, "account_offset": 2, "domain_offset": 1},
         "domain_offset (1) must be greater than account_offset (2)"),
        ({"device_range": {"start": 0, "end": 0}, "domain_offset": 0},
         "domain_offset (0) must be greater than the device_range end (0)"),
    ],
)
def test_openssl_made_chain_with_bad_offsets(tmp_path, kind, offsets, message):
    openssl_chain(tmp_path / "ossl", kind)
    with pytest.raises(ConfigError) as info:
        build(tmp_path, plugin="x509", trust_roots=["ossl/root.pem"], **offsets)
    assert message in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_made_chain_too_short_for_the_offsets(tmp_path, kind):
    openssl_chain(tmp_path / "ossl", kind)
    provider = build(tmp_path, plugin="x509", trust_roots=["ossl/root.pem"],
                     device_range={"start": 0, "end": 0}, account_offset=1, domain_offset=2)
    chain = x509.load_pem_x509_certificates((tmp_path / "ossl" / "chain.pem").read_bytes())
    identity = Identity("x509", [c.public_bytes(Encoding.DER) for c in chain[:2]])
    assert "offset 2 from the leaf" in refusal(provider, identity, int(time.time())).message


# --- fedserver mimi-identity --------------------------------------------------------


@pytest.fixture
def mimi_config(write_config, dev_pki, tmp_path):
    cert, key = dev_pki.issue_files("fed.a.example")
    chain = Chain("ed25519")
    chain.write_root(tmp_path / "etc-roots.pem")
    (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in chain.certificates))
    path = write_config(local_config_head(cert, key, dev_pki.ca_path) + textwrap.dedent("""
        [authenticator]
        plugin = "mtls"

        [[authorizers]]
        plugin = "allow-list"
        allow_all = true

        [identity_providers.devices]
        plugin = "x509"
        trust_roots = ["../etc-roots.pem"]
        device_range = { start = 0, end = 0 }
        account_offset = 1
        domain_offset = 2

        [identity_providers.simple]
        plugin = "basic"
        """))
    return path, str(tmp_path / "chain.pem")


def test_cli_valid_chain(mimi_config, capsys):
    config, chain = mimi_config
    assert main(["mimi-identity", "--config", config, "--provider", "devices", "--at", str(DURING), chain]) == 0
    out = capsys.readouterr().out
    assert "client handle: phone" in out and "account:       alice" in out and "domain:        example.com" in out
    assert main(["mimi-identity", "--config", config, "--provider", "devices", "--at", str(DURING),
                 "--json", chain]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"provider": "devices", "chain": chain, "at": DURING, "valid": True,
                      "client_handle": "phone", "account": "alice", "domain": "example.com"}


def test_cli_refused_chain(mimi_config, capsys):
    config, chain = mimi_config
    assert main(["mimi-identity", "--config", config, "--provider", "devices", "--at", str(AFTER), chain]) == 1
    err = capsys.readouterr().err
    assert "is refused: authentication-failure: a certificate of the chain had expired" in err
    assert main(["mimi-identity", "--config", config, "--provider", "devices", "--at", str(AFTER),
                 "--json", chain]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is False and result["label"] == "authentication-failure"


def test_cli_mistakes(mimi_config, tmp_path, capsys):
    config, chain = mimi_config
    assert main(["mimi-identity", "--config", config, "--provider", "nope", chain]) == 1
    assert "has no [identity_providers.nope] (configured: devices, simple)" in capsys.readouterr().err
    assert main(["mimi-identity", "--config", config, "--provider", "devices", str(tmp_path / "gone.pem")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["mimi-identity", "--config", config, "--provider", "simple", chain]) == 1
    assert "only basic credentials" in capsys.readouterr().err
