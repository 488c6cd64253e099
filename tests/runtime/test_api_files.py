"""protos/ holds the generated APIs; this fails when they are stale."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_protos_and_openapi_are_current(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "caikit_tuning.runtime.export_apis", str(tmp_path / "protos")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    fresh, committed = tmp_path / "protos", ROOT / "protos"
    comparison = filecmp.dircmp(fresh, committed)
    stale = comparison.left_only + comparison.right_only + comparison.diff_files
    assert not stale, (
        f"protos/ is stale ({sorted(stale)}); regenerate with "
        "`python -m caikit_tuning.runtime.export_apis protos`"
    )
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, comparison.common_files, shallow=False)
    assert not mismatch and not errors
