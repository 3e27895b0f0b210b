"""A small run of scripts/fault_campaign.py on the tiny model: `chatkv ask` SIGKILLed at
random points loses nothing it showed, saves nothing twice, and leaves a store that opens.
(`--kills 100` is the full campaign; see the script.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fault_campaign.py"


def test_sigkill_at_random_points_loses_and_duplicates_nothing(tiny_model_dir, tmp_path):
    env_home = tmp_path / "campaign"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--kills",
            "6",
            "--finished",
            "1",
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "24",
            "--seed",
            "5",
            "--home",
            str(env_home),
            "--json",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CHATKV_MODEL_DEVICE": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["problems"] == []
    assert summary["killed"] >= 4 and summary["rounds"] == 8
