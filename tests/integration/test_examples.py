"""
The shipped examples run as a user runs them: etc/wire/flows.py plays the
seed's three flows across two backends found through a real DNS server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

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
