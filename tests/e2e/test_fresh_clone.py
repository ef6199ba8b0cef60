"""The README's `./run.sh test` works in a fresh clone with no ../shared/data beside it: the suite's
photos are in the repository, and only the optional large-data tests skip (inside the test)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from helpers import REPO


def test_the_suite_collects_without_the_shared_data(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    clone = tmp_path / "nanodb"  # no shared/ beside it
    for name in filter(None, files):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=clone, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "error" not in run.stdout.lower().splitlines()[-1], run.stdout[-3000:]
    helper = subprocess.run([sys.executable, "-c", "import helpers; print(len(helpers.coco_photos(96)))"],
                            cwd=clone / "tests", capture_output=True, text=True, timeout=60)
    assert helper.stdout.strip() == "96", helper.stderr[-2000:]
