"""What nanodb claims in a user's Python: the `nanodb` namespace only."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from helpers import REPO


@pytest.mark.parametrize("own", ["pipeline.py", "pipeline/__init__.py", "media.py", "storage/__init__.py"])
def test_nanodb_imports_beside_a_users_module_of_a_generic_name(tmp_path, own):
    """A user's own `pipeline.py` (or folder) in the working directory must not shadow nanodb's parts."""
    (tmp_path / own).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / own).write_text("raise SystemExit('the user module was imported instead of nanodb')\n")
    code = "import nanodb, nanodb.database, nanodb.pipeline.coordinator; print(nanodb.NanoDB.__name__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "NanoDB"


def test_every_installed_package_is_under_the_nanodb_namespace():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "nanodb" or p.startswith("nanodb.") for p in setuptools["packages"]), setuptools["packages"]
    assert setuptools["package-dir"]["nanodb.pipeline"] == "pipeline"  # the folder stays at the top level
