"""Training across the emulated desk cluster: 2 ranks, 2 network namespaces, distinct IPs, a shaped link.

This is the hostfile path a real cluster takes (MLX_HOSTFILE with each machine's
address), without SSH. Skipped where network namespaces are not permitted.
"""

import json
import sys

import pytest

from conftest import MLX_DP, ROOT, run, tiny_recipe
from lab.netem import check_permitted

pytestmark = pytest.mark.e2e  # every test here starts real processes

REASON = check_permitted()


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_two_ranks_train_across_namespaces(tmp_path):
    recipe = tiny_recipe(tmp_path, training={"batch_size": 2, "steps": 3})
    hostfile = tmp_path / "ring.json"
    result = run([sys.executable, str(ROOT / "scripts" / "emulate_cluster.py"), "-n", "2", "--link", "1gbe",
                  "--write-hostfile", str(hostfile), "--", MLX_DP, "train", str(recipe)], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    hosts = json.loads(hostfile.read_text())
    ips = {entry[0].rsplit(":", 1)[0] for entry in hosts}
    assert len(ips) == 2 and not any(ip.startswith("127.") for ip in ips), hosts
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "completed" and status["world_size"] == 2
    assert "global batch = 2 x 2 x 1 = 4 sequences" in result.stdout
