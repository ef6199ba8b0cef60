"""The layers stay one-way: each sub-package imports only those below it, and no private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

# Each layer, and the nanodb packages it may import (besides itself and `config`, settings as data that
# imports nothing of nanodb). Lowest first.
LAYERS = {
    "media": set(),
    "storage": {"media"},
    "model": {"media"},
    "search": {"media", "storage", "model"},
    "pipeline": {"media"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_pipeline_imports_nothing_of_nanodb_but_the_media_layer():
    for path in (REPO / "pipeline").rglob("*.py"):
        above = [m for m in imported_modules(path)
                 if m.split(".")[0] == "nanodb" and m.split(".")[1] not in ("media", "pipeline")]
        assert not above, path


def test_no_module_imports_another_modules_private_names():
    """`from m import _name` reaches into m (ruff's SLF001 catches `obj._name`)."""
    for path in [*(REPO / "nanodb").rglob("*.py"), *(REPO / "pipeline").rglob("*.py"), *(REPO / "tests").rglob("*.py"),
                 *(REPO / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                assert not private, f"{path.relative_to(REPO)} imports {private} from {node.module}"


def test_interfaces_never_touch_the_store_or_the_index():
    for path in (REPO / "nanodb" / "interfaces").glob("*.py"):
        text = path.read_text()
        assert "nanodb.storage.store" not in text and "nanodb.storage.index" not in text, path
        assert ".store." not in text and ".index." not in text, path


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_the_layers_below_it(layer):
    folder = REPO / "pipeline" if layer == "pipeline" else REPO / "nanodb" / layer
    for path in folder.rglob("*.py"):
        used = {m.split(".")[1] for m in imported_modules(path) if m.startswith("nanodb.")} - {layer, "config"}
        assert used <= LAYERS[layer], f"{path.relative_to(REPO)} imports {sorted(used - LAYERS[layer])}"
