"""``bench/serve.py --quick``: both servers start, every level runs, the champion moves twice, reports are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains two tiny models and starts four servers: minutes on 2 shared cores
def test_serve_bench_quick_runs_both_servers_and_writes_results(tmp_path):
    out = tmp_path / "serve-quick"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "bench/serve.py", "--quick", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    md = out.with_suffix(".md").read_text()
    for text in ("## bench-digits (image)", "## bench-sentiment (text)", "| 32 | mlflow models serve |"):
        assert text in md, text
    assert "load average" in md
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["machine"]["kserve"] == "0.21.0"
    for name in ("bench-digits", "bench-sentiment"):
        r = res["results"][name]
        assert [lv["tlops"]["clients"] for lv in r["levels"]] == [1, 8, 32]
        for level in r["levels"]:
            for side in ("tlops", "mlflow"):
                assert level[side]["ok"] > 0 and level[side]["failed"] == 0, (name, side, level[side]["failures"])
            assert set(level["tlops"]["versions"]) == {"1"} and level["tlops"]["unnamed"] == 0
        follow = r["follow"]
        # champion moved twice under load: nothing failed, every response named its version, both were seen
        assert follow["failed"] == 0 and follow["unnamed"] == 0, follow["failures"]
        assert set(follow["versions"]) == {"1", "2"}, follow["versions"]
