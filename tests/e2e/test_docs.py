"""The README says what the code does: its command-line table lists exactly the flags of `--help`."""

from __future__ import annotations

import re

from helpers import REPO

from nanodb.interfaces.cli import build_parser


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_the_readme_flag_table_lists_every_flag_of_help_and_no_other():
    table_rows = [line for line in readme_section("Command line").splitlines() if line.startswith("| `-")]
    in_readme = {flag for row in table_rows for flag in re.findall(r"--[a-z][a-z-]*", row.split("|")[1])}
    options = build_parser().format_help().split("options:", 1)[1]
    in_help = set(re.findall(r"^\s+(?:-\w[ A-Z_]*, )?(--[a-z][a-z-]*)", options, re.MULTILINE))
    assert in_readme == in_help - {"--help"}, (
        f"missing from the README: {sorted(in_help - {'--help'} - in_readme)}; "
        f"not in --help: {sorted(in_readme - in_help)}"
    )
