"""End-to-end snapshots of the command line: every --help, the one-shot commands' output and errors.

Run through `main()`, the entry point of `python -m nanodb`, in this process (fast). Searches by item
index are the same on every machine (see the `vector_db` fixture); a text search's values depend on the
model's arithmetic, so only its shape is kept. Rewrite with NANODB_UPDATE_SNAPSHOTS=1 after a
deliberate change, and review the diff.
"""

from __future__ import annotations

import json

import pytest
from helpers.snapshots import assert_matches_snapshot

from nanodb.interfaces.cli import main


@pytest.fixture
def nanodb(capsys, monkeypatch, vector_db, tmp_path):
    """Runs `nanodb ARGS...` (`{db}` and `{tmp}` in an argument name the database and a temporary folder);
    returns (exit status, stdout, stderr), paths normalised."""
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps its help to the terminal's width
    monkeypatch.delenv("NANODB_PREVIEW", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        argv = [arg.format(db=vector_db, tmp=tmp_path) for arg in args]
        capsys.readouterr()
        try:
            status = main(argv)
        except SystemExit as e:  # argparse: --help, or a bad flag
            status = e.code
        out, err = capsys.readouterr()
        normalise = lambda text: text.replace(str(vector_db), "<DB>").replace(str(tmp_path), "<TMP>")
        return status, normalise(out), normalise(err)

    return run


@pytest.mark.parametrize("command", ["", "search", "similar", "duplicates"])
def test_help_matches_its_snapshot(nanodb, command):
    status, out, err = nanodb(*filter(None, [command]), "--help")
    assert status == 0 and not err
    assert_matches_snapshot(f"cli_help_{command or 'main'}.txt", out)


def test_similar_result_lines_and_json_lines_match_their_snapshot(nanodb):
    transcript = []
    for args in (("0", "-k", "4"), ("5", "--json", "-k", "3"), ("9", "--folder", "cluster0", "-k", "2"),
                 ("2", "--json", "--k", "2", "--type", "png"), ("11", "--type", "jpg", "-k", "1")):
        status, out, err = nanodb("similar", "--path", "{db}", *args)
        assert status == 0 and err == ("" if out else "nanodb: no results match the filters\n"), err
        transcript.append(f"$ nanodb similar --path <DB> {' '.join(args)}\n{out}")
    assert_matches_snapshot("cli_similar.txt", "".join(transcript))


def test_duplicates_lines_and_json_match_their_snapshot(nanodb):
    """Groups of the stored vectors only: the same on every machine."""
    transcript = []
    for args in (("--threshold", "0.9"), ("--threshold", "0.92", "--json"), ("--threshold", "0.9", "--min-size", "5"),
                 ()):
        status, out, err = nanodb("duplicates", "--path", "{db}", *args)
        assert status == 0 and len(err.splitlines()) == 1, err
        transcript.append(f"$ nanodb duplicates --path <DB> {' '.join(args)}\n{out}{err}")
    assert_matches_snapshot("cli_duplicates.txt", "".join(transcript))


def test_search_json_has_the_snapshot_shape(nanodb):
    """Text search with random weights: which items and how similar depend on the machine, not the shape."""
    status, out, err = nanodb("search", "--path", "{db}", "a", "red", "car", "--json", "-k", "5")
    assert status == 0 and not err, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["similarity"] for r in rows] == sorted((r["similarity"] for r in rows), reverse=True)
    assert len({r["index"] for r in rows}) == len(rows)
    shapes = [json.dumps({key: type(value).__name__ for key, value in row.items()}) for row in rows]
    assert_matches_snapshot("cli_search_json_shape.txt", "\n".join(shapes) + "\n")


ERRORS = [
    ("similar", "--path", "{db}", "-1"),
    ("similar", "--path", "{db}", "12"),
    ("similar", "--path", "{db}", "{tmp}/nope.jpg"),
    ("search", "--path", "{tmp}/no-db", "cat"),
    ("search", "--path", "{db}", "cat", "--since", "soon"),
    ("search", "--path", "{db}", "cat", "--until", "2024-13-01"),
    ("search", "--path", "{db}", "cat", "-k", "0"),
    ("search", "--path", "{db}", "cat", "-k", "abc"),
    ("search", "--path", "{db}", "cat", "--no-such-flag"),
    ("search", "cat"),
    ("similar", "--path", "{db}"),
    ("duplicates", "--path", "{db}", "--threshold", "0"),
    ("duplicates", "--path", "{db}", "--threshold", "high"),
    ("duplicates", "--path", "{tmp}/no-db"),
    ("--k", "0"),
    ("--scan", "{tmp}"),
    ("--no-such-flag",),
    ("no-such-command",),
]


def test_one_shot_errors_match_their_snapshot(nanodb):
    """Each error, a bad argument's too: one line on stderr, exit status 2, nothing on stdout."""
    transcript = []
    for args in ERRORS:
        status, out, err = nanodb(*args)
        assert status == 2 and not out and len(err.splitlines()) == 1, (args, status, out, err)
        shown = " ".join(args).replace("{db}", "<DB>").replace("{tmp}", "<TMP>")
        transcript.append(f"$ nanodb {shown}\n{err}")
    assert_matches_snapshot("cli_errors.txt", "".join(transcript))
