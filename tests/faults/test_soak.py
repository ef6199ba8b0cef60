"""The soak: nanodb watching a folder under continuous churn (add, delete, rename, modify), answering
queries from its console (stdin) and its HTTP API meanwhile, killed with -9 and restarted every minute
or so. At the end the index is the folder (paths, and vectors for a sample), and memory stayed flat.

Bounded and self-stopping: NANODB_SOAK_SECONDS (default 600) of churn, then a few minutes of checks.
The figures are printed (run with -s) and written to NANODB_SOAK_REPORT if set, for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from helpers.churn import FolderChurn, check_caught_up, check_committed, source_photos
from helpers.killharness import KilledRun, start, write_config

SOAK_SECONDS = float(os.environ.get("NANODB_SOAK_SECONDS", "600"))
KILL_EVERY = (30.0, min(90.0, max(30.0, SOAK_SECONDS / 2)))  # seconds between kill -9s (a short soak kills too)
WARM_UP_S = 20.0  # RSS samples this soon after a start (model loading, first scan) are not compared
TEXT_QUERIES = ["a dog on a beach", "two people riding horses", "a red car + night - snow", "2:kitchen + table",
                "pizza", "a cat sleeping on a sofa", "street signs in the city"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Figures:
    churn_ops: dict = field(default_factory=dict)
    restarts: int = 0
    console_queries: int = 0
    console_answers: int = 0
    console_errors: list[str] = field(default_factory=list)
    http_ok: int = 0
    http_client_errors: int = 0  # 4xx: e.g. an item renumbered by a compaction between two requests
    http_errors: list[str] = field(default_factory=list)  # 5xx, or no answer while the server was up
    log_errors: list[str] = field(default_factory=list)  # ERROR or Traceback lines in nanodb's log
    log_warnings: int = 0  # e.g. a file deleted between its event and its decoding: skipped, logged
    commits: int = 0
    rss: list[tuple[float, float, int]] = field(default_factory=list)  # (time, time since start, bytes)


class NanodbUnderTest:
    """One life of `nanodb --watch --server` with its console on a pipe; reads its answers."""

    def __init__(self, args: list[str], log_path: Path, figures: Figures):
        self.log_path, self.figures = log_path, figures
        self.proc = start(args, log_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.started = time.monotonic()
        self.stdout_lines: list[str] = []
        self.serving = False
        self.killed = False

    def poll_log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        self.serving = self.serving or "web UI at" in text
        return text

    def ask(self, line: str) -> None:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            self.figures.console_queries += 1
        except (BrokenPipeError, ValueError):
            pass  # killed under our feet: that query is simply lost

    def rss(self) -> int | None:
        try:
            p = psutil.Process(self.proc.pid)
            return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
        except psutil.Error:
            return None

    def kill(self) -> KilledRun:
        """kill -9. Flagged first: requests failing from now on are expected (Popen.poll() cannot tell,
        it answers None while another thread waits on the process)."""
        self.killed = True
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()
        return self._ended(killed=True, orphans=len(alive))

    def terminate(self) -> KilledRun:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        return self._ended(killed=False, orphans=0)

    def _ended(self, killed: bool, orphans: int) -> KilledRun:
        log = self.poll_log()
        lines = log.splitlines()
        self.figures.log_errors += [line for line in lines if line.startswith("ERROR") or "Traceback" in line]
        self.figures.log_warnings += sum(line.startswith("WARNING") and "pretrained" not in line for line in lines)
        return KilledRun(self.proc.returncode, killed, log, orphans)


def console_reader(proc: subprocess.Popen, figures: Figures) -> None:
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith("error:"):
            figures.console_errors.append(line)
        elif " items, " in line and " unsaved" in line:  # the `status` line closing each round
            figures.console_answers += 1


def http_client(base: str, current: list[NanodbUnderTest], figures: Figures, stop: threading.Event,
                rng: random.Random) -> None:
    """Search, stats, and thumbnails of the results, one request at a time, as long as the soak runs."""
    client, client_life = None, None
    while not stop.wait(rng.uniform(0.1, 0.6)):
        life = current[0]
        if not life.serving or life.killed:
            continue
        if client_life is not life:  # fresh connections for each life: the old ones died with it
            if client is not None:
                client.close()
            client, client_life = httpx.Client(base_url=base, timeout=120), life
        requests = [("/api/search/text", {"q": rng.choice(TEXT_QUERIES), "k": 5}), ("/api/stats", None)]
        try:
            for url, params in requests:
                r = client.get(url, params=params)
                _count(r, figures)
                for hit in r.json().get("results", [])[:2] if r.status_code == 200 else []:
                    _count(client.get(hit["thumbnail"]), figures)
        except httpx.TransportError as e:
            if not life.killed:  # up, yet no answer
                figures.http_errors.append(f"{type(e).__name__}: {e}")


def _count(r: httpx.Response, figures: Figures) -> None:
    if r.status_code < 400:
        figures.http_ok += 1
    elif r.status_code < 500:
        figures.http_client_errors += 1
    else:
        figures.http_errors.append(f"{r.request.url.path} -> {r.status_code}: {r.text[:200]}")


def rss_ratio(samples: list[tuple[float, float, int]]) -> tuple[float, float]:
    """Median RSS of the first and of the last third of the soak, warm-up samples left out."""
    warm = [(t, b) for t, since, b in samples if since >= WARM_UP_S]
    if len(warm) < 6:
        pytest.fail(f"too few RSS samples after warm-up: {len(warm)} (is the soak too short?)")
    t0, t1 = samples[0][0], samples[-1][0]
    first = [b for t, b in warm if t < t0 + (t1 - t0) / 3]
    last = [b for t, b in warm if t > t1 - (t1 - t0) / 3]
    return statistics.median(first), statistics.median(last)


@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_SECONDS) + 900)
def test_soak_watch_churn_queries_and_kills(tmp_path):
    rng = random.Random(6)
    churn = FolderChurn(tmp_path / "watched", source_photos(384), seed=6, initial=40, keep_between=(30, 80))
    config = write_config(tmp_path / "soak.yaml", autosave_every=16, autosave_seconds=5, settle_seconds=0.5,
                          compact_dead_fraction=0.25)
    db_path, port = tmp_path / "db", free_port()
    args = ["--path", str(db_path), "--config", str(config), "--watch", str(churn.folder),
            "--server", "--host", "127.0.0.1", "--port", str(port)]
    figures, stop = Figures(), threading.Event()
    current = [NanodbUnderTest(args, tmp_path / "life0.log", figures)]
    threading.Thread(target=console_reader, args=(current[0].proc, figures), daemon=True).start()
    client = threading.Thread(target=http_client, args=(f"http://127.0.0.1:{port}", current, figures, stop,
                                                        random.Random(7)), daemon=True)
    client.start()
    churn.start(every=0.3)
    committed, end = None, time.monotonic() + SOAK_SECONDS
    next_kill = time.monotonic() + rng.uniform(*KILL_EVERY)
    try:
        while time.monotonic() < end:
            life = current[0]
            life.poll_log()
            assert life.proc.poll() is None, f"nanodb exited by itself: {life.poll_log()[-3000:]}"
            if (rss := life.rss()) is not None:
                figures.rss.append((time.monotonic(), time.monotonic() - life.started, rss))
            life.ask(rng.choice(TEXT_QUERIES))
            life.ask("status")
            if time.monotonic() >= next_kill:
                run = life.kill()
                assert run.orphans == 0, "a decode worker outlived its killed process"
                figures.commits += len(run.saves()[0])
                committed = check_committed(db_path, run, committed, churn, rng)
                figures.restarts += 1
                current[0] = NanodbUnderTest(args, tmp_path / f"life{figures.restarts}.log", figures)
                threading.Thread(target=console_reader, args=(current[0].proc, figures), daemon=True).start()
                next_kill = time.monotonic() + rng.uniform(*KILL_EVERY)
            time.sleep(2.0)
        churn.stop()
        life = current[0]
        files = len(churn.files())
        deadline, agreeing = time.monotonic() + 120, 0  # the last changes settle and are indexed
        while agreeing < 5:
            assert time.monotonic() < deadline, f"the index never reached the folder's {files} files"
            life.poll_log()
            agreeing = agreeing + 1 if life.serving and _items(port) == files else 0
            time.sleep(1.0)
        stop.set()
        client.join(150)
        run = life.terminate()
        assert run.returncode == 0, run.log[-3000:]
        figures.commits += len(run.saves()[0])
    finally:
        churn.stop()
        stop.set()
        if current[0].proc.poll() is None:
            current[0].kill()
    check_caught_up(db_path, churn, rng, sample=10)

    figures.churn_ops = dict(churn.counts)
    first, last = rss_ratio(figures.rss)
    summary = {
        "seconds": SOAK_SECONDS, "churn": figures.churn_ops, "churn_total": churn.operations,
        "restarts": figures.restarts, "commits": figures.commits, "files_at_end": files,
        "console_queries": figures.console_queries, "console_answers": figures.console_answers,
        "console_errors": len(figures.console_errors), "http_ok": figures.http_ok,
        "http_4xx": figures.http_client_errors, "http_errors": len(figures.http_errors),
        "log_errors": len(figures.log_errors), "log_warnings": figures.log_warnings,
        "peak_rss_mb": round(max(b for _, _, b in figures.rss) / 2**20),
        "rss_first_third_mb": round(first / 2**20), "rss_last_third_mb": round(last / 2**20),
    }
    print("\nsoak:", json.dumps(summary))
    if report := os.environ.get("NANODB_SOAK_REPORT"):
        Path(report).write_text(json.dumps({**summary, "errors": figures.console_errors[:20] + figures.http_errors[:20]
                                            + figures.log_errors[:20]}, indent=2))
    assert not figures.http_errors, figures.http_errors[:10]
    assert not figures.console_errors, figures.console_errors[:10]
    assert not figures.log_errors, figures.log_errors[:10]
    assert figures.restarts >= 1 and figures.console_answers > 0 and figures.http_ok > 0
    assert last <= 1.25 * first, f"RSS grew from {first / 2**20:.0f} MB to {last / 2**20:.0f} MB"


def _items(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/stats", timeout=30).json()["items"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
