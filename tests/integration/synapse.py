"""
A real Synapse homeserver for Matrix interop tests, on 127.0.0.1 only.

Synapse is installed from PyPI (C{matrix-synapse==SYNAPSE_VERSION}, its
dependencies pinned by L{SYNAPSE_CONSTRAINTS}) into its own virtualenv under
the test cache (C{$FEDSERVER_TEST_CACHE}, else C{$XDG_CACHE_HOME/fedserver-tests}
or C{~/.cache/fedserver-tests}), never into the virtualenv that runs the
tests: its Twisted and other pins must not disturb ours.  The virtualenv is
built once (under a lock, so two test processes do not build it at once, in
bounded time) and reused while it still runs C{synapse.app.homeserver --help}.

    python = synapse_or_skip()          # in a fixture: builds or reuses the venv
    pki = PKI(str(tmp_path / "pki"))
    with SynapseServer(str(tmp_path / "hs"), pki, python=python) as hs:
        alice = hs.register("alice")
        hs.profile(alice, "@bob:localhost:8449")           # a federation query
        hs.send_to_device(alice, "@bob:localhost:8449", {"hi": 1})  # a transaction with an EDU

The server name is C{localhost:<federation port>}: with an explicit port,
Synapse does no well-known or SRV lookup, connects to C{localhost} (only
127.0.0.1 is allowed) at that port, and checks the certificate for
C{localhost} against the test CA (C{federation_custom_ca_list}).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import ssl
import string
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import attrs

from tests.integration.harness import PKI, free_port, post, post_tls, stop, tls_context

SYNAPSE_VERSION = "1.163.2"

# What `pip freeze` showed in a virtualenv where SYNAPSE_VERSION installed and
# ran (Python 3.11): a build on a fresh machine gets the same releases.
SYNAPSE_CONSTRAINTS = """
annotated-types==0.8.0
attrs==26.1.0
Automat==25.4.16
bcrypt==5.0.0
bleach==6.4.0
canonicaljson==2.0.0
certifi==2026.10.18
cffi==2.1.1
charset-normalizer==3.5.2
constantly==23.10.4
cryptography==50.0.2
hyperlink==21.0.0
idna==3.20
ijson==3.6.0
immutabledict==4.3.1
Incremental==24.11.0
Jinja2==3.1.6
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
MarkupSafe==3.0.4
matrix-common==1.3.0
msgpack==1.2.4
multipart==2.0.1
netaddr==1.3.0
packaging==26.3
phonenumbers==9.0.43
pillow==13.0.0
prometheus_client==0.26.0
pyasn1==0.6.5
pyasn1_modules==0.4.2
pycparser==3.12
pydantic==2.14.3
pydantic_core==2.50.4
pymacaroons==0.13.0
PyNaCl==1.6.2
pyOpenSSL==26.4.0
pyparsing==3.3.3
pyrsistent==0.20.0
python-multipart==0.0.34
PyYAML==6.0.3
referencing==0.37.0
requests==2.34.2
rpds-py==2026.9.1
semantic-version==2.10.0
service-identity==26.1.0
setuptools-rust==1.13.0
signedjson==1.1.4
six==1.17.0
sortedcontainers==2.4.0
treq==26.7.0
Twisted==26.10.0
typing-inspection==0.4.5
typing_extensions==4.16.0
unpaddedbase64==2.1.0
urllib3==2.8.0
webencodings==0.6.1
zope.interface==8.7
"""

INSTALL_TIMEOUT = 600.0  # building the virtualenv, first time: pip may take minutes
CHECK_TIMEOUT = 60.0  # `python -m synapse.app.homeserver --help`
PROBE_TIMEOUT = 90.0  # asking the package index whether it answers
START_TIMEOUT = 90.0  # Synapse answering on both ports (creating its SQLite schema takes seconds)

UNREACHABLE = "PyPI is unreachable, so the Synapse virtualenv cannot be built"


class SynapseUnavailable(Exception):
    """The Synapse virtualenv cannot be built because PyPI is unreachable (the only reason to skip)."""


# the virtualenv

def cache_dir() -> str:
    """Where test tools are cached, outside the checkout."""
    explicit = os.environ.get("FEDSERVER_TEST_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedserver-tests")


def venv_dir() -> str:
    return os.path.join(cache_dir(), "synapse-venv")


def venv_python(venv: Optional[str] = None) -> str:
    return os.path.join(venv or venv_dir(), "bin", "python")


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def _marker_text() -> str:
    """What the marker file of a complete build says: the pins and the Python version."""
    pins = hashlib.sha256(SYNAPSE_CONSTRAINTS.encode()).hexdigest()[:16]
    return f"matrix-synapse=={SYNAPSE_VERSION} constraints={pins} python{sys.version_info[0]}.{sys.version_info[1]}\n"


def _clean_env() -> Dict[str, str]:
    """Our environment without what would mix our interpreter's packages into Synapse's."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _progress(message: str) -> None:
    print(f"[synapse-venv] {message}", file=sys.stderr, flush=True)


def _usable(venv: str) -> bool:
    """The build completed for these pins and Synapse's entry point runs."""
    try:
        with open(os.path.join(venv, ".fedserver-build")) as f:
            if f.read() != _marker_text():
                return False
    except OSError:
        return False
    try:
        done = subprocess.run([venv_python(venv), "-m", "synapse.app.homeserver", "--help"], env=_clean_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=CHECK_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@contextlib.contextmanager
def _locked(path: str, timeout: float) -> Iterator[None]:
    """An exclusive lock on C{path} (flock, so it dies with its holder), waited for at most C{timeout} s."""
    deadline = time.monotonic() + timeout
    with open(path, "a") as f:
        said = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another process held {path} for over {timeout:.0f} s") from None
                if not said:
                    _progress("another test process is building the Synapse virtualenv; waiting for it")
                    said = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run_logged(argv: Sequence[str], log: IO[str], timeout: float, *, show: bool = True,
                said: Optional[List[str]] = None) -> int:
    """
    Run C{argv}, copying its output to C{log} (and to stderr if C{show}, and
    into C{said} if given); kill it (its whole session) after C{timeout} s.
    Returns its exit code.
    """
    process = subprocess.Popen(list(argv), env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    assert process.stdout is not None
    stream = process.stdout

    def copy() -> None:
        for line in stream:
            log.write(line)
            log.flush()
            if said is not None:
                said.append(line.strip())
            # pip warns about every index location of this machine that is missing; not progress
            if show and "is ignored: it is neither a file nor a directory" not in line:
                _progress(line.rstrip())

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    started = time.monotonic()
    deadline = started + timeout
    while True:
        try:
            process.wait(timeout=min(30.0, max(0.1, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
                reader.join(timeout=5)
                stream.close()
                raise TimeoutError(f"{argv[0]} {' '.join(argv[1:4])} ... took over {timeout:.0f} s") from None
            if show:
                _progress(f"still running after {time.monotonic() - started:.0f} s")
    reader.join(timeout=30)
    stream.close()
    return process.returncode


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _index_answers(python: str, log: IO[str]) -> Tuple[bool, str]:
    """Whether the package index pip is configured with answers for matrix-synapse (pip's own settings)."""
    log.write("== probing the package index\n")
    argv = [python, "-m", "pip", "index", "versions", "matrix-synapse", "--retries", "1", "--timeout", "20"]
    said: List[str] = []
    try:
        code = _run_logged(argv, log, PROBE_TIMEOUT, show=False, said=said)
    except TimeoutError as e:
        return False, str(e)
    said = [line for line in said if line and "is ignored" not in line and "experimental command" not in line]
    return code == 0, " / ".join(said[-3:])


def _build(venv: str, deadline: float) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    log_path = venv + ".build.log"
    with open(log_path, "w") as log:
        _progress(f"creating {venv} with {_base_python()}")
        code = _run_logged([_base_python(), "-m", "venv", venv], log, 120.0)
        if code != 0:
            raise RuntimeError(f"`{_base_python()} -m venv` failed (on Debian: apt-get install python3-venv):\n"
                               f"{_tail(log_path)}")
        python = venv_python(venv)
        answers, said = _index_answers(python, log)
        if not answers:
            raise SynapseUnavailable(f"{UNREACHABLE} (pip index versions matrix-synapse: {said})")
        constraints = os.path.join(venv, "constraints.txt")
        with open(constraints, "w") as f:
            f.write(SYNAPSE_CONSTRAINTS.lstrip())
        _progress(f"installing matrix-synapse=={SYNAPSE_VERSION} (the first time takes a minute or more)")
        log.write("== pip install\n")
        argv = [python, "-m", "pip", "install", "--progress-bar", "off", "--timeout", "60", "--retries", "3",
                "-c", constraints, f"matrix-synapse=={SYNAPSE_VERSION}"]
        output: List[str] = []
        try:
            code = _run_logged(argv, log, max(1.0, deadline - time.monotonic()), said=output)
        except TimeoutError as e:
            code, failure = -1, str(e)
        else:
            failure = f"pip install exited with {code}"
        if code != 0:
            answers, said = _index_answers(python, log)
            if not answers:
                raise SynapseUnavailable(f"{UNREACHABLE} (pip index versions matrix-synapse: {said})")
            shown = "\n".join([line for line in output if "is ignored" not in line][-30:])
            raise RuntimeError(f"{failure}; the index answers, so this is not a network problem "
                               f"(whole log: {log_path}):\n{shown}")
    with open(os.path.join(venv, ".fedserver-build"), "w") as f:
        f.write(_marker_text())


_ready: Optional[str] = None


def ensure_synapse(timeout: float = INSTALL_TIMEOUT) -> str:
    """
    The Python of a virtualenv where Synapse runs: reused if usable, else
    built (under a lock, in at most C{timeout} s).  Raises
    L{SynapseUnavailable} only if PyPI is unreachable; any other problem
    raises another exception.
    """
    global _ready
    if _ready is not None:
        return _ready
    venv = venv_dir()
    os.makedirs(cache_dir(), exist_ok=True)
    started = time.monotonic()
    # waiting for another builder may take its whole build time, then ours
    with _locked(venv + ".lock", 2 * timeout + 60):
        if not _usable(venv):
            _build(venv, time.monotonic() + timeout)
            if not _usable(venv):
                raise RuntimeError(f"Synapse was installed in {venv} but `python -m synapse.app.homeserver --help` "
                                   f"fails; log {venv}.build.log")
            _progress(f"Synapse {SYNAPSE_VERSION} ready in {time.monotonic() - started:.0f} s")
    _ready = venv_python(venv)
    return _ready


def synapse_or_skip() -> str:
    """L{ensure_synapse}, the test skipped (with exactly that reason) only if PyPI is unreachable."""
    import pytest

    try:
        return ensure_synapse()
    except SynapseUnavailable as e:
        pytest.skip(str(e))


# configuration

RELAXED = {"per_second": 1000, "burst_count": 10000}


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    """C{extra} over C{base}: dicts merged recursively, other values replace, None removes the key."""
    merged = dict(base)
    for key, value in extra.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def homeserver_config(
    directory: str,
    *,
    federation_port: int,
    client_port: int,
    tls_certificate: str,
    tls_private_key: str,
    ca_certificates: Sequence[str],
    signing_key_path: str,
    registration_shared_secret: str,
    log_config_path: str,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """
    homeserver.yaml for a Synapse named C{localhost:<federation_port>} on
    127.0.0.1: federation (and key server) over TLS on C{federation_port},
    the client API (and admin API) over plain HTTP on C{client_port}, SQLite
    and media under C{directory}.  C{extra} is merged over it (see L{_merge}),
    e.g. C{{"federation_domain_whitelist": ["localhost:8449"]}}.
    """
    loopback = ["127.0.0.1"]
    config: Dict[str, Any] = {
        "server_name": f"localhost:{federation_port}",
        "public_baseurl": f"http://127.0.0.1:{client_port}/",
        "pid_file": os.path.join(directory, "homeserver.pid"),
        "listeners": [
            {"port": federation_port, "bind_addresses": loopback, "type": "http", "tls": True,
             "x_forwarded": False, "resources": [{"names": ["federation"], "compress": False}]},
            {"port": client_port, "bind_addresses": loopback, "type": "http", "tls": False,
             "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}]},
        ],
        "tls_certificate_path": tls_certificate,
        "tls_private_key_path": tls_private_key,
        # outbound federation: certificates checked (the default) against the test CA only
        "federation_verify_certificates": True,
        "federation_custom_ca_list": list(ca_certificates),
        # loopback is in Synapse's default blocklist; allow only 127/8 (so ::1 stays refused)
        "ip_range_whitelist": ["127.0.0.0/8"],
        # fetch keys from the servers themselves, never from matrix.org
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "signing_key_path": signing_key_path,
        "database": {"name": "sqlite3", "args": {"database": os.path.join(directory, "homeserver.db")}},
        "media_store_path": os.path.join(directory, "media_store"),
        "log_config": log_config_path,
        "report_stats": False,
        "enable_metrics": False,
        "url_preview_enabled": False,
        "serve_server_wellknown": False,
        "presence": {"enabled": False},  # no presence EDUs mixed into the transactions under test
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "registration_shared_secret": registration_shared_secret,
        "macaroon_secret_key": secrets.token_hex(32),
        "form_secret": secrets.token_hex(32),
        # a failing destination is retried after 1 s (default 10 min) and short timeouts, so
        # an interop test does not wait on Synapse's backoff; tests may override
        "federation": {
            "client_timeout": "20s",
            "max_short_retry_delay": "1s",
            "max_long_retry_delay": "2s",
            "max_long_retries": 3,
            "destination_min_retry_interval": "1s",
            "destination_retry_multiplier": 1,
            "destination_max_retry_interval": "2s",
        },
        "rc_message": RELAXED,
        "rc_registration": RELAXED,
        "rc_registration_token_validity": RELAXED,
        "rc_login": {"address": RELAXED, "account": RELAXED, "failed_attempts": RELAXED},
        "rc_joins": {"local": RELAXED, "remote": RELAXED},
        "rc_joins_per_room": RELAXED,
        "rc_invites": {"per_room": RELAXED, "per_user": RELAXED, "per_issuer": RELAXED},
        "rc_key_requests": RELAXED,
        "rc_3pid_validation": RELAXED,
        "rc_admin_redaction": RELAXED,
        "rc_media_create": RELAXED,
        "rc_presence": {"per_user": RELAXED},
        "rc_room_creation": RELAXED,
        "rc_profile": RELAXED,
        "rc_user_directory": RELAXED,
        "rc_reports": RELAXED,
        "rc_delayed_event_mgmt": RELAXED,
        "rc_federation": {"window_size": 1000, "sleep_limit": 10000, "sleep_delay": 1,
                          "reject_limit": 10000, "concurrent": 1000},
        "federation_rr_transactions_per_room_per_second": 1000,
    }
    return _merge(config, extra or {})


def log_config(log_path: str, level: str = "INFO") -> Dict[str, Any]:
    """Python logging configuration for Synapse: everything at C{level} into C{log_path}, unbuffered."""
    return {
        "version": 1,
        "formatters": {"precise": {
            "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "formatter": "precise", "filename": log_path,
                              "encoding": "utf8"}},
        # DEBUG on synapse.storage.SQL would log access tokens and floods the file
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": level, "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def write_yaml(path: str, document: Dict[str, Any]) -> None:
    """Write C{document} as YAML Synapse reads (JSON is YAML; no YAML library needed here)."""
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def write_signing_key(path: str) -> str:
    """A new Ed25519 signing key in Synapse's format (C{ed25519 <version> <unpadded base64 seed>}); its key id."""
    import base64

    version = "a_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(4))
    seed = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"ed25519 {version} {seed}\n")
    return f"ed25519:{version}"


# the server

@attrs.frozen
class User:
    """A user registered or logged in on a L{SynapseServer}."""

    user_id: str
    access_token: str
    device_id: str
    password: str


class SynapseServer:
    """
    A Synapse process named C{localhost:<federation_port>}.  Made with its
    configuration written into C{directory}; L{start} (or C{with}) runs it,
    L{stop} ends it.  C{pki} is the test's CA: Synapse's certificate for
    C{localhost} is issued by it, and it is the only CA Synapse trusts for
    outbound federation (plus C{extra_ca_certificates}).
    """

    def __init__(self, directory: str, pki: PKI, *, python: Optional[str] = None,
                 federation_port: Optional[int] = None, client_port: Optional[int] = None,
                 extra: Optional[Dict[str, Any]] = None, extra_ca_certificates: Sequence[str] = (),
                 log_level: str = "INFO") -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.pki = pki
        self.python = python or ensure_synapse()
        self.federation_port = federation_port or free_port()
        self.client_port = client_port or free_port()
        self.server_name = f"localhost:{self.federation_port}"
        self.certificate, self.private_key = pki.issue(f"synapse-{self.federation_port}", ["localhost"])
        self.signing_key_path = os.path.join(self.directory, "signing.key")
        self.key_id = write_signing_key(self.signing_key_path)
        self.shared_secret = secrets.token_hex(16)
        self.log_path = os.path.join(self.directory, "homeserver.log")
        self.output_path = os.path.join(self.directory, "output.log")
        self.log_config_path = os.path.join(self.directory, "log.yaml")
        write_yaml(self.log_config_path, log_config(self.log_path, log_level))
        self.config = homeserver_config(
            self.directory,
            federation_port=self.federation_port,
            client_port=self.client_port,
            tls_certificate=self.certificate,
            tls_private_key=self.private_key,
            ca_certificates=[pki.ca_path, *extra_ca_certificates],
            signing_key_path=self.signing_key_path,
            registration_shared_secret=self.shared_secret,
            log_config_path=self.log_config_path,
            extra=extra,
        )
        self.config_path = os.path.join(self.directory, "homeserver.yaml")
        write_yaml(self.config_path, self.config)
        self.process: Optional[subprocess.Popen] = None
        self._output: Optional[IO[bytes]] = None

    # process

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Run Synapse; return once the client API and the TLS key server answer (else stop it and raise)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self._output = open(self.output_path, "ab")
        self.process = subprocess.Popen(
            [self.python, "-m", "synapse.app.homeserver", "-c", self.config_path],
            cwd=self.directory, env=_clean_env(), stdin=subprocess.DEVNULL, stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready(timeout)
        except Exception as e:
            self.stop()
            raise AssertionError(f"Synapse {self.server_name} did not start: {e}\n"
                                 f"--- output\n{self.output()}\n--- log (tail)\n{self.log()[-20000:]}") from None

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        context = self.tls_context()
        client_ok = keys_ok = False
        last: object = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}")
            try:
                if not client_ok:
                    code, _, _ = post(self.client_port, "/_matrix/client/versions", method="GET", timeout=5)
                    client_ok = code == 200
                    last = f"/_matrix/client/versions answered {code}"
                if client_ok and not keys_ok:
                    code, _, _ = post_tls(self.federation_port, "localhost", context, "/_matrix/key/v2/server",
                                          method="GET", timeout=5)
                    keys_ok = code == 200
                    last = f"/_matrix/key/v2/server answered {code}"
                if client_ok and keys_ok:
                    return
            except (OSError, ssl.SSLError) as e:
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"not ready after {timeout:.0f} s (last: {last})")

    def stop(self) -> None:
        """Terminate Synapse (bounded; killed if it does not exit); nothing happens if it is not running."""
        if self.process is not None:
            stop(self.process, timeout=20.0)
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> SynapseServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        """Synapse's log file."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def output(self) -> str:
        """What the process wrote to stdout and stderr (tracebacks before logging starts)."""
        try:
            with open(self.output_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """Wait until C{text} appears in the log; return the first line with it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if text in line:
                    return line
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not in the log of {self.server_name} after {timeout} s")

    # federation side (what a remote server sees)

    def tls_context(self) -> ssl.SSLContext:
        """A client context trusting the test CA, as a remote homeserver would connect."""
        return tls_context(self.pki.ca_path)

    def federation(self, path: str, body: Any = None, *, method: str = "GET",
                   headers: Optional[Dict[str, str]] = None, timeout: float = 30.0) -> Tuple[int, Dict[str, str], Any]:
        """An (unsigned) request to the federation listener over TLS, SNI and certificate name C{localhost}."""
        return post_tls(self.federation_port, "localhost", self.tls_context(), path, body, method=method,
                        headers=headers, timeout=timeout)

    def key_document(self) -> Dict[str, Any]:
        """C{GET /_matrix/key/v2/server}: Synapse's self-signed key document."""
        code, _, document = self.federation("/_matrix/key/v2/server")
        assert code == 200, (code, document)
        return document

    # client side

    def client(self, method: str, path: str, body: Any = None, *, user: Optional[User] = None,
               timeout: float = 30.0) -> Tuple[int, Any]:
        """A client (or admin) API request over plain HTTP, as C{user} if given; (status, decoded JSON)."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if user is not None:
            headers["Authorization"] = f"Bearer {user.access_token}"
        code, _, document = post(self.client_port, path, body, method=method, headers=headers, timeout=timeout)
        return code, document

    def register(self, localpart: str, password: Optional[str] = None, *, admin: bool = False) -> User:
        """Create a user with the shared-secret admin API; logged in (one device)."""
        password = password or secrets.token_hex(12)
        code, answer = self.client("GET", "/_synapse/admin/v1/register")
        assert code == 200, (code, answer)
        nonce = answer["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(),
                                 b"admin" if admin else b"notadmin"]))
        code, answer = self.client("POST", "/_synapse/admin/v1/register", {
            "nonce": nonce, "username": localpart, "password": password, "admin": admin,
            "mac": mac.hexdigest()})
        assert code == 200, (code, answer)
        return User(answer["user_id"], answer["access_token"], answer["device_id"], password)

    def login(self, localpart: str, password: str) -> User:
        """Log in with a password: a new device and access token."""
        code, answer = self.client("POST", "/_matrix/client/v3/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart},
            "password": password})
        assert code == 200, (code, answer)
        return User(answer["user_id"], answer["access_token"], answer["device_id"], password)

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def send_to_device(self, sender: User, recipient: str, content: Dict[str, Any], *, device_id: str = "*",
                       event_type: str = "org.fedserver.test", txn_id: Optional[str] = None) -> Tuple[int, Any]:
        """
        C{PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}}: to a user
        of another server, Synapse sends it as an C{m.direct_to_device} EDU
        in C{PUT /_matrix/federation/v1/send/{txnId}} to that server.
        """
        txn_id = txn_id or secrets.token_hex(8)
        path = (f"/_matrix/client/v3/sendToDevice/{urllib.parse.quote(event_type, safe='')}/"
                f"{urllib.parse.quote(txn_id, safe='')}")
        return self.client("PUT", path, {"messages": {recipient: {device_id: content}}}, user=sender)

    def profile(self, user: User, user_id: str, field: Optional[str] = None,
                timeout: float = 60.0) -> Tuple[int, Any]:
        """
        C{GET /_matrix/client/v3/profile/{userId}[/{field}]}: for a user of
        another server, Synapse asks it with
        C{GET /_matrix/federation/v1/query/profile?user_id=...[&field=...]}.
        """
        path = f"/_matrix/client/v3/profile/{urllib.parse.quote(user_id, safe='')}"
        if field:
            path += f"/{urllib.parse.quote(field, safe='')}"
        return self.client("GET", path, user=user, timeout=timeout)


def synapse_versions() -> List[str]:
    """For a report: the Synapse and Twisted versions in the Synapse virtualenv."""
    done = subprocess.run(
        [ensure_synapse(), "-c", "import synapse, twisted; print(synapse.__version__, twisted.__version__)"],
        env=_clean_env(), capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=True)
    return done.stdout.split()
