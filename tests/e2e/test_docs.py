"""The README says what the code does: its flag tables list exactly the flags of `--help`, the main
parser's and every subcommand's, and it names every console command."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from helpers import REPO

from nanodb.interfaces.cli import build_parser
from nanodb.interfaces.console import HELP, Console

FLAG = r"(?<![\w-])(--?[a-z][a-z-]*)"  # `-k`, `--read-only`; not a metavar (upper case) or a date


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def table_flags(section: str) -> set[str]:
    """The flags in the first column of a README section's table (`\\|` inside a cell is not a column)."""
    rows = [line for line in readme_section(section).splitlines() if line.startswith("| `-")]
    return {flag for row in rows for flag in re.findall(FLAG, re.split(r"(?<!\\)\|", row)[1])}


def help_flags(help_text: str) -> set[str]:
    """The flags that `--help` lists under "options:" (the invocations only, not the help text)."""
    options = help_text.split("options:", 1)[1]
    invocations = re.findall(r"^  (-\S.*?)(?: {2,}|$)", options, re.MULTILINE)
    return {flag for invocation in invocations for flag in re.findall(FLAG, invocation)} - {"-h", "--help"}


def run_parser(*argv: str) -> tuple[str, str]:
    """(stdout, stderr) of the command line parser given `argv`, which ends it (--help, or an error)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        build_parser().parse_args(list(argv))
    return out.getvalue(), err.getvalue()


def subcommands() -> list[str]:
    """The subcommands, as argparse lists them in its error for an unknown one (it has no public list)."""
    _, err = run_parser("no-such-command")
    listed = re.search(r"choose from (.+)\)", err).group(1)
    return [name.strip(" '\"") for name in listed.split(",")]


def test_the_readme_flag_table_lists_every_flag_of_help_and_no_other():
    in_readme = {flag for flag in table_flags("Command line") if flag.startswith("--")}
    options = build_parser().format_help().split("options:", 1)[1]
    in_help = set(re.findall(r"^\s+(?:-\w[ A-Z_]*, )?(--[a-z][a-z-]*)", options, re.MULTILINE))
    assert in_readme == in_help - {"--help"}, (
        f"missing from the README: {sorted(in_help - {'--help'} - in_readme)}; "
        f"not in --help: {sorted(in_readme - in_help)}"
    )


def test_the_readme_documents_every_flag_of_every_subcommand_and_no_other():
    names = subcommands()
    assert names == ["search", "similar", "duplicates"], names  # a new subcommand: document it, then add it here
    readme = (REPO / "README.md").read_text()
    in_readme = table_flags("One-shot commands for scripts")
    in_help = {}
    for name in names:
        assert f"nanodb {name} " in readme, f"the README never shows `nanodb {name}`"
        in_help[name] = help_flags(run_parser(name, "--help")[0])
        assert in_help[name], f"no options found in `nanodb {name} --help`"
        missing = in_help[name] - in_readme
        assert not missing, f"`nanodb {name}` flags missing from the README's one-shot table: {sorted(missing)}"
    extra = in_readme - set().union(*in_help.values())
    assert not extra, f"the README's one-shot table lists flags no subcommand has: {sorted(extra)}"


def test_help_and_the_readme_list_every_console_command():
    listed = readme_section("Console")
    for command in set(Console.COMMANDS) - {"quit"}:  # `quit`: an alias of exit, not advertised
        assert re.search(rf"^  {command}\b", HELP, re.MULTILINE) or f" / {command} " in HELP, f"help lacks {command}"
        assert f"`{command}" in listed, f"the README's Console section does not list `{command}`"


def test_the_setup_says_how_long_the_first_run_takes_and_how_much_disk_it_needs():
    """`a few minutes` was 6 min 20 s and 6.9 GB: the README's set-up and run.sh's first-run line both say so."""
    setup = readme_section("Set-up: two commands")
    minutes, size = re.search(r"\(about (\d+) minutes, (\d+(?:\.\d+)?) GB\)", setup).groups()
    assert f"takes about {minutes} minutes" in " ".join(setup.split()) and f"{size} GB of disk" in setup
    first_run = next(line for line in (REPO / "run.sh").read_text().splitlines() if "first run only" in line)
    assert f"about {minutes} minutes, {size} GB" in first_run
