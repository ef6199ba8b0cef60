"""A server's memory: RssAnon (what the process holds itself, the mapped database files excluded), RssFile
and VmRSS from /proc/PID/status, at start, after a text query, after an image query, and after the image
tower's idle time.

    python benchmarks/bench_server_memory.py DB [DB ...]         # each database in its own server process
    python benchmarks/bench_server_memory.py --rows 20000         # a database of random vectors, made here

The server is `start_server` on the database opened read-only (ViT-B-32 random weights for a database
built by benchmarks/bench_server.py). The image query is one photo of /work/shared/data, uploaded
through the HTTP API. Set NANODB_CACHE to measure with no export made yet (the first text query makes it).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHOTO_DIRS = (ROOT.parent / "shared" / "data", Path("/work/shared/data"))
FIELDS = ("VmRSS", "RssAnon", "RssFile")

# the server as `nanodb --path DB --server` starts it, read-only (the database may be another run's)
SERVER = """
import logging, sys, time
from nanodb import NanoDB
from nanodb.interfaces.server import start_server
logging.basicConfig(level=logging.INFO, format="server: %(message)s")
start_server(NanoDB(sys.argv[1], read_only=True, image_tower_idle_seconds=float(sys.argv[3])), "127.0.0.1",
             int(sys.argv[2]))
time.sleep(1e9)
"""


def status(pid: int) -> dict[str, float]:
    """The memory fields of /proc/PID/status, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            values[name] = int(rest.split()[0]) / 1024
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def a_photo() -> Path:
    for folder in PHOTO_DIRS:
        if folder.is_dir():
            return next(p for p in sorted(folder.rglob("*.jpg")))
    raise SystemExit("no photo found under shared/data")


def random_database(folder: Path, rows: int) -> Path:
    from nanodb import NanoDB

    rng = np.random.default_rng(0)
    with NanoDB(folder, "ViT-B-32", "none") as db:
        for lo in range(0, rows, 100_000):
            chunk = rng.standard_normal((min(100_000, rows - lo), 512)).astype(np.float32)
            db.add(chunk / np.linalg.norm(chunk, axis=1, keepdims=True))
        db.save()
    return folder


def measure(db: Path, idle_s: float) -> list[tuple[str, dict[str, float]]]:
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(db), str(port), str(idle_s)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    rows = []
    try:
        with httpx.Client(timeout=600) as client:
            for _ in range(1200):
                try:
                    client.get(f"{url}/stats").raise_for_status()
                    break
                except httpx.HTTPError:
                    if server.poll() is not None:
                        raise SystemExit(f"the server on {db} exited ({server.returncode})") from None
                    time.sleep(0.5)
            time.sleep(2)
            rows.append(("started", status(server.pid)))
            client.get(f"{url}/search/text", params={"q": "a dog on a beach", "k": 10}).raise_for_status()
            rows.append(("after a text query", status(server.pid)))
            with open(a_photo(), "rb") as f:
                client.post(f"{url}/search/image", params={"k": 10}, files={"file": f}).raise_for_status()
            rows.append(("after an image query", status(server.pid)))
            time.sleep(idle_s + 5)
            rows.append((f"after {idle_s:.0f} s idle", status(server.pid)))
    finally:
        server.terminate()
        server.wait(60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("databases", nargs="*", type=Path)
    ap.add_argument("--rows", type=int, help="measure a database of this many random ViT-B-32 vectors, made here")
    ap.add_argument("--idle", type=float, default=20.0, help="the image tower's idle time in the server (s)")
    args = ap.parse_args()
    databases = list(args.databases)
    with tempfile.TemporaryDirectory(prefix="nanodb-bench-memory-") as work:
        if args.rows:
            databases.append(random_database(Path(work) / "db", args.rows))
        print("| database | when | RssAnon MB | RssFile MB | VmRSS MB |\n|---|---|---:|---:|---:|")
        for db in databases:
            for when, m in measure(db, args.idle):
                print(f"| {db.name} | {when} | {m['RssAnon']:,.0f} | {m['RssFile']:,.0f} | {m['VmRSS']:,.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
