"""The agent runs without the registry's dependencies (Flask, peewee) or cloud SDKs."""

from __future__ import annotations

import json
import subprocess
import sys

BLOCKER = """
import importlib.abc, sys
BLOCKED = {"flask", "peewee", "werkzeug", "boto3", "awsiot", "awscrt", "azure", "google"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this device")
sys.meta_path.insert(0, Block())
import flowfleet.agent.service  # the long-running agent
from flowfleet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_agent_and_count_run_without_registry_or_cloud_packages(data):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKER,
            "count",
            str(data / "videos" / "traffic_frames.mp4"),
            "--line",
            "gantry:480,280,480,540",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["frames"] == 20


def test_the_tracker_does_not_import_all_of_scipy_optimize():
    """`linear_sum_assignment` is loaded on its own (agent/association.py): all of
    `scipy.optimize` is about 50 MB of resident memory the agent does not use."""
    code = (
        "import sys, numpy as np\n"
        "from flowfleet.agent import pipeline\n"
        "from flowfleet.agent.association import match\n"
        "rows, cols = match(np.array([[0.9, 0.8], [0.85, 0.1]]), 0.3)\n"
        "print(rows.tolist(), cols.tolist(), 'scipy.optimize' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[0,", "1]", "[1,", "0]", "False"]
