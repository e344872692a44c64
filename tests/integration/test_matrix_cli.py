"""
C{fedserver federation-request} against a real Synapse: the operator's
debugging tool discovers, signs and sends a Matrix federation request.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from typing import Any, Dict

from tests.integration.harness import tool
from tests.integration.test_matrix_interop import matrix  # noqa: F401 - the fixture


def test_federation_request_to_synapse(matrix: Dict[str, Any]) -> None:  # noqa: F811
    synapse = matrix["synapse"]
    synapse.register("erin")
    user_id = urllib.parse.quote(synapse.user_id("erin"), safe="")
    result = subprocess.run(
        [tool("fedserver"), "federation-request", "--config", matrix["fedserver"].config_path, "--method", "GET",
         synapse.server_name, f"/_matrix/federation/v1/query/profile?user_id={user_id}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["displayname"] == "erin"
    assert "HTTP 200" in result.stderr
