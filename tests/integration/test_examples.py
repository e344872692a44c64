"""
The shipped examples run as a user runs them: etc/wire/flows.py plays the
seed's three flows across two backends found through a real DNS server,
etc/mimi/flows.py plays the MIMI cross-gateway flow between two gateways, and
etc/relay/mesh.py sends media across a three-relay mesh with delegated trust.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Any, List

from tests.integration.harness import tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_wire_flows_run_twice_on_the_same_data(tmp_path: Any) -> None:
    etc = tmp_path / "etc"
    shutil.copytree(os.path.join(ROOT, "etc", "wire"), etc / "wire", ignore=shutil.ignore_patterns("var"))
    shutil.copy(os.path.join(ROOT, "etc", "launcher.py"), etc / "launcher.py")
    for _attempt in range(2):
        result = subprocess.run([tool("python"), str(etc / "wire" / "flows.py"), "--once"],
                                capture_output=True, text=True, timeout=180)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert '"handle": "bob"' in output  # user discovery across backends
        assert 'on-conversation-created): ["conversation.create"' in output
        assert '"tea at five?"' in output and '"yes, see you then"' in output
        assert "all three flows completed" in output
    # both backends found each other through DNS SRV and validated origins
    log = (etc / "wire" / "var" / "b.example" / "fedserver.log").read_text()
    assert "inward galley/on-conversation-created from a.example -> 200" in log
    assert "Traceback" not in log
    for name in ("a.example", "b.example"):
        check = subprocess.run([tool("fedserver"), "check-config", str(etc / "wire" / f"{name}.toml")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr


def run_example(argv: List[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """
    Run an example script in its own process group, so that on a timeout
    (or any failure here) it and the twistd processes it started are
    stopped: first with SIGTERM to the script, which the launcher turns into
    stopping its processes, then by killing whatever is left of the group.
    """
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        process.terminate()  # the script stops what it started (signalling the group would stop them twice)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", ""
        raise AssertionError(f"{argv} did not finish in {timeout} s:\n{stdout}{stderr}") from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        process.wait()


def test_mimi_flow_runs_twice_on_the_same_data(tmp_path: Any) -> None:
    etc = tmp_path / "etc"
    shutil.copytree(os.path.join(ROOT, "etc", "mimi"), etc / "mimi", ignore=shutil.ignore_patterns("var"))
    shutil.copy(os.path.join(ROOT, "etc", "launcher.py"), etc / "launcher.py")
    for attempt in range(2):
        result = run_example([tool("python"), str(etc / "mimi" / "flows.py"), "--once"], timeout=120)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        # the second run finds the clients and queues of the first, and the KeyPackage Carol still holds
        registered = "registered by an earlier run" if attempt else "registered"
        assert f"alice's phone ({registered}):" in output and f"carol's laptop ({registered}):" in output, output
        held = "Carol has held it since an earlier run" if attempt else "uploaded above"
        assert f"claimed for Carol (claim-key-package; {held})" in output, output
        # discovery of the other gateway's application and clients
        assert '"6cae8cb6-aeea-4e6a-9923-7f2891dfcce4", "chat-a"' in output
        assert '"alice@a.example/phone"]]' in output
        assert '"credential": "alice@a.example/phone", "isFinalKey": false' in output
        assert "claimed again: the same KeyPackage: true" in output
        # the commit, and the Welcome delivered across gateways
        assert '"epoch": 1, "welcomed": [{"domain": "a.example", "clientId": ' in output
        assert '"failed": []' in output
        assert "it is the Welcome Carol sent: true" in output
        assert '(group-info): {"groupId": ' in output and '"epoch": 1}' in output
        assert 'HTTP 409: {"label": "stale-epoch", "data": {"currentEpoch": 1}}' in output
        assert "claimed for Carol again: another KeyPackage" in output
        assert "the cross-gateway flow completed" in output
    logs = {name: (etc / "mimi" / "var" / name / "fedserver.log").read_text() for name in ("a.example", "b.example")}
    for rpc in ("list-apps", "list-clients", "claim-key-package", "deliver-welcome"):
        assert f"inward mimi/{rpc} from b.example -> 200" in logs["a.example"], rpc
    assert "inward mimi/group-info from a.example -> 200" in logs["b.example"]
    for log in logs.values():
        assert "Traceback" not in log
    for name in ("a.example", "b.example"):
        check = subprocess.run([tool("fedserver"), "check-config", str(etc / "mimi" / f"{name}.toml")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr


def test_relay_mesh_runs_twice_on_the_same_data(tmp_path: Any) -> None:
    etc = tmp_path / "etc"
    shutil.copytree(os.path.join(ROOT, "etc", "relay"), etc / "relay", ignore=shutil.ignore_patterns("var"))
    shutil.copy(os.path.join(ROOT, "etc", "launcher.py"), etc / "launcher.py")
    for _attempt in range(2):
        result = run_example([tool("python"), str(etc / "relay" / "mesh.py"), "--once"], timeout=120)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        # Relay 1 delegates to the hub, which vouches for Relay 3
        assert 'Relay 1 -> Relay 2 (hub): delegate true, vouched for ["' in output, output
        # every packet from Relay 3's participant reached Relay 1's, with Relay 3 as its origin
        for i in range(5):
            assert f"Relay 1's participant got \"media packet {i} from Relay 3's participant\" (origin " in output
        assert output.count(": Relay 3, via Relay 2)") == 5, output
        assert 'accepted: {"Relay 2 (hub)": 5}; dropped: {}; originated 0, forwarded 0, delivered 5' in output
        assert 'accepted: {"Relay 3": 5}; dropped: {}; originated 0, forwarded 5, delivered 0' in output
        assert "accepted: {}; dropped: {}; originated 5, forwarded 5, delivered 0" in output
        assert "the three-relay mesh completed" in output
    logs = {name: (etc / "relay" / "var" / name / "fedserver.log").read_text() for name in ("r1", "r2", "r3")}
    assert "relay link to Relay 2 (hub)" in logs["r1"] and "UDP confirmed" in logs["r1"]
    for log in logs.values():
        assert "Traceback" not in log
    for name in ("r1", "r2", "r3"):
        check = subprocess.run([tool("fedserver"), "check-config", str(etc / "relay" / "var" / f"{name}.toml")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
