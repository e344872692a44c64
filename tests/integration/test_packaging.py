"""
The wheel, installed outside the checkout, brings the twistd dropin, the
console script and the built-in plugins (daphne once shipped a release without
its dropin because nothing checked).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(argv: list, cwd: Any, timeout: float = 600) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_outside_checkout(tmp_path: Any) -> None:
    # build from the files git tracks, as a clean clone has them
    source = tmp_path / "source"
    files = _run(["git", "ls-files", "-z"], ROOT).split("\0")
    for name in filter(None, files):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(open(os.path.join(ROOT, name), "rb").read())
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)], tmp_path)
    (wheel,) = wheels.glob("fedserver-*.whl")

    venv = tmp_path / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], tmp_path)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    location = _run([str(venv / "bin" / "python"), "-c", "import fedserver; print(fedserver.__file__)"],
                    elsewhere)
    assert location.startswith(str(venv)), location
    listing = _run([str(venv / "bin" / "twistd"), "--help"], elsewhere)
    assert "fedserver" in listing
    usage = _run([str(venv / "bin" / "twistd"), "fedserver", "--help"], elsewhere)
    assert "--config" in usage
    plugins = _run([str(venv / "bin" / "fedserver"), "plugins"], elsewhere)
    for name in ("static", "mtls", "allow-list", "http-forward"):
        assert name in plugins
