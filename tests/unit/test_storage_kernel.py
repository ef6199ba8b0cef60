"""The C search kernel: a library that does not match the code is never called, and ./run.sh rebuilds it."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from importlib.machinery import EXTENSION_SUFFIXES

import pytest
from helpers import REPO

from nanodb.storage.kernel import KERNEL_ABI, built_kernel, load_kernel

SOURCE = REPO / "nanodb" / "storage" / "_scan.c"
ABI_FUNCTION = "int nanodb_kernel_abi(void)\n{\n    return NANODB_KERNEL_ABI;\n}\n"

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


def build(tmp_path, name: str, source: str):
    """A kernel library compiled from `source` the way an older or newer _scan.c would be."""
    (tmp_path / f"{name}.c").write_text(source)
    library = tmp_path / f"{name}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(library), str(tmp_path / f"{name}.c")], check=True)
    return library


def edited(old: str, new: str) -> str:
    source = SOURCE.read_text()
    assert source.count(old) == 1, old
    return source.replace(old, new)


@needs_cc
def test_a_library_built_from_this_source_is_loaded(tmp_path, caplog):
    lib = load_kernel(build(tmp_path, "current", SOURCE.read_text()))
    assert lib is not None and lib.nanodb_kernel_abi() == KERNEL_ABI
    assert lib.nanodb_level(3) == 0  # signatures set: an int64 argument, an int result
    assert not caplog.records


@needs_cc
@pytest.mark.parametrize("stale", [
    pytest.param(edited(ABI_FUNCTION, ""), id="built before the ABI function"),
    pytest.param(edited(f"#define NANODB_KERNEL_ABI {KERNEL_ABI}\n", "#define NANODB_KERNEL_ABI 999\n"),
                 id="another ABI"),
    pytest.param(edited("void nanodb_dots(", "void nanodb_dots_renamed("), id="without nanodb_dots"),
])
def test_a_stale_library_falls_back_with_one_log_line(tmp_path, caplog, stale):
    library = build(tmp_path, "stale", stale)
    with caplog.at_level(logging.WARNING):
        assert load_kernel(library) is None
    assert len(caplog.records) == 1 and str(library) in caplog.records[0].getMessage()


@needs_cc
def test_a_stale_build_beside_the_package_falls_back_with_one_log_line(tmp_path, caplog):
    """What `import nanodb` does with a library an older _scan.c left in place (it raised before)."""
    build(tmp_path, "stale", edited(ABI_FUNCTION, "")).rename(tmp_path / f"_scan{EXTENSION_SUFFIXES[0]}")
    with caplog.at_level(logging.WARNING):
        assert built_kernel(tmp_path) is None
    assert len(caplog.records) == 1 and "rebuild" in caplog.records[0].getMessage()
    (tmp_path / f"_scan{EXTENSION_SUFFIXES[0]}").unlink()
    assert built_kernel(tmp_path) is None and len(caplog.records) == 1  # none built: nothing to say


def test_a_file_that_is_no_library_falls_back_with_one_log_line(tmp_path, caplog):
    library = tmp_path / "_scan.so"
    library.write_bytes(b"not a shared library")
    with caplog.at_level(logging.WARNING):
        assert load_kernel(library) is None
    assert len(caplog.records) == 1 and "search kernel" in caplog.records[0].getMessage()


STUB_PYTHON = """#!/usr/bin/env bash
# stands in for python: `-m venv DIR` makes DIR/bin/python, `-m pip` records an install, the rest succeeds
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
if [ "$1 $2" = "-m pip" ]; then echo install >> "$STUB_LOG"; fi
exit 0
"""


def test_run_sh_reinstalls_when_the_kernel_source_changes(tmp_path):
    """`pip install -e` rebuilds _scan: run.sh must run it again after _scan.c changes, not only after
    the requirements do."""
    repo = tmp_path / "repo"
    (repo / "nanodb" / "storage").mkdir(parents=True)
    for name in ("run.sh", "pyproject.toml", "constraints.txt", "nanodb/storage/_scan.c"):
        shutil.copy2(REPO / name, repo / name)
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "installs"
    env = {**os.environ, "PYTHON": str(stub), "NANODB_VENV": str(tmp_path / "venv"), "STUB_LOG": str(log)}

    def installs_after_a_run() -> int:
        subprocess.run([str(repo / "run.sh"), "--help"], env=env, check=True, capture_output=True)
        return len(log.read_text().split())

    assert installs_after_a_run() == 1
    assert installs_after_a_run() == 1  # unchanged: nothing to do
    with open(repo / "nanodb" / "storage" / "_scan.c", "a") as f:
        f.write("/* an edited kernel */\n")
    assert installs_after_a_run() == 2
