"""A first query in a fresh process, as a user types it: `nanodb search`, the console's first text query and
`nanodb similar`, each cold (a new process, the disk warm) and warm (again in the same process), beside
the plain open_clip text-encoding script a user would otherwise write, and beside today's torch path
(backend torch, from a --config file: the text tower in torch, as before the export).

`--cold-paths` times only the one-shot cold paths of issue 36: the first text query after install (no text
export cached yet), a search by an image file that is not indexed, and the rescan after one file was
renamed (its vector reused by content hash).

    python benchmarks/bench_cold_query.py                     # ViT-B-32, random weights, 40 COCO photos
    python benchmarks/bench_cold_query.py --model ViT-S-32 --runs 3
    python benchmarks/bench_cold_query.py --cold-paths --runs 3

The database and the caches (the image tower's conversion, the text tower's export) lie in a temporary
folder (NANODB_CACHE), so the first query pays the one-time export, shown on its own line.
"""

from __future__ import annotations

import argparse
import os
import pty
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import coco_photos  # noqa: E402

PLAIN_OPEN_CLIP = """
import sys, time, torch, open_clip
model = open_clip.create_model("{model}", pretrained=None)
model.eval()
tokenizer = open_clip.get_tokenizer("{model}")
times = []
with torch.no_grad():
    for _ in range(int(sys.argv[1])):
        t = time.perf_counter()
        v = model.encode_text(tokenizer(["a red car"]))
        v = v / v.norm(dim=-1, keepdim=True)
        times.append(time.perf_counter() - t)
print(sorted(times[1:] or times)[len(times[1:] or times) // 2])
"""

WARM = """
import sys, time
from nanodb import NanoDB
db = NanoDB(sys.argv[1], read_only=True, backend=sys.argv[2])
query = sys.argv[3]
item = int(query) if query.isdigit() else None
search = (lambda: db.search(item, k=8)) if item is not None else (lambda: db.search(text=query, k=8))
search()
times = []
for _ in range(20):
    t = time.perf_counter(); search(); times.append(time.perf_counter() - t)
print(sorted(times)[len(times) // 2])
"""


def children_cpu() -> float:
    """CPU seconds (user + system) of the ended child processes so far: less swayed by other load than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict, runs: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `command`, run `runs` times, each a fresh process (output discarded)."""
    times, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), children_cpu()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
        cpu.append(children_cpu() - c)
    return statistics.median(times), statistics.median(cpu)


def console_first_query(db: Path, env: dict, runs: int) -> tuple[float, float]:
    """Median seconds from starting `nanodb --path DB` on a terminal, the query typed at once, to its first
    result on the screen; and the console process's CPU seconds, up to its exit."""
    times, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), children_cpu()
        pid, fd = pty.fork()
        if pid == 0:
            os.execve(sys.executable, [sys.executable, "-m", "nanodb", "--path", str(db), "--read-only"],
                      {**env, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"})
        os.write(fd, b"a red car\r")
        screen = b""
        while b"index=" not in screen:
            screen += os.read(fd, 65536)
        times.append(time.perf_counter() - t)
        os.write(fd, b"exit\r")
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass
        os.waitpid(pid, 0)
        cpu.append(children_cpu() - c)
    return statistics.median(times), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--photos", type=int, default=40)
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per cold timing (median)")
    ap.add_argument("--cold-paths", action="store_true",
                    help="only the first text query, a query by an image file not indexed, a rescan after a rename")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    env = {**os.environ, "NANODB_CACHE": str(work / "cache")}
    nanodb = [sys.executable, "-m", "nanodb"]
    db = work / "db"
    try:
        photos = work / "photos"
        photos.mkdir()
        for p in coco_photos(args.photos):
            shutil.copy(p, photos)
        subprocess.run([*nanodb, "--path", str(db), "--model", args.model, "--pretrained", "none", "--scan",
                        str(photos), "--autosave"], env=env, check=True, stdout=subprocess.DEVNULL)
        search = [*nanodb, "search", "--path", str(db), "a red car"]
        torch_config = work / "torch.yaml"
        torch_config.write_text("backend: torch\n")
        first = timed(search, env, 1)  # loads the torch model and exports the text tower
        if args.cold_paths:
            rows = cold_paths(nanodb, db, photos, first, env, args.runs)
        else:
            rows = all_rows(nanodb, db, search, first, torch_config, env, args)
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        print(f"# {args.model} random weights, {args.photos} photos, {os.cpu_count()} CPUs, load average {load}")
        print(f"{'command':<66} {'cold (s)':>9} {'cold CPU (s)':>13} {'warm (ms)':>10}")
        for name, (cold, cpu), hot in rows:
            print(f"{name:<66} {cold:>9.2f} {cpu:>13.2f} {'' if hot is None else f'{hot * 1000:.1f}':>10}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cold_paths(nanodb: list[str], db: Path, photos: Path, first: tuple[float, float], env: dict, runs: int) -> list:
    """The one-shot cold paths of issue 36, each a fresh process."""
    query_image = next(p for p in coco_photos(10 * runs + 200)[::-1] if not (photos / p.name).exists())
    renamed = []
    for n in range(runs):  # a new name each run: the rescan finds one file gone, one new with a known content
        rename = [sys.executable, "-c", RENAME, str(photos), str(n)]
        scan = [*nanodb, "--path", str(db), "--scan", str(photos), "--autosave"]
        renamed.append((rename, scan))
    return [
        ("first text query after install (no text export yet)", first, None),
        ("nanodb similar --path DB PHOTO.jpg (a file not indexed)",
         timed([*nanodb, "similar", "--path", str(db), str(query_image)], env, runs), None),
        ("nanodb --path DB --scan PHOTOS --autosave, one file renamed", timed_pairs(renamed, env), None),
    ]


RENAME = """
import os, sys
folder = sys.argv[1]
name = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))[0]
os.rename(os.path.join(folder, name), os.path.join(folder, f"renamed-{sys.argv[2]}-{name}"))
"""


def timed_pairs(pairs: list[tuple[list[str], list[str]]], env: dict) -> tuple[float, float]:
    """Median wall and CPU seconds of each pair's second command, its first run (untimed) just before."""
    times, cpu = [], []
    for prepare, command in pairs:
        subprocess.run(prepare, env=env, check=True)
        t, c = time.perf_counter(), children_cpu()
        subprocess.run(command, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
        cpu.append(children_cpu() - c)
    return statistics.median(times), statistics.median(cpu)


def all_rows(nanodb: list[str], db: Path, search: list[str], first, torch_config: Path, env: dict, args) -> list:
    """Every first query of the cold-query benchmark (issue 21)."""
    return [
        ("first text query ever (torch model + one-time export)", first, None),
        ("nanodb search --path DB 'a red car'", timed(search, env, args.runs), warm(db, env, "auto", "a red car")),
        ("  the same, text tower in torch (backend: torch, as before)",
         timed([*search, "--config", str(torch_config)], env, args.runs), warm(db, env, "torch", "a red car")),
        ("console: first text query (typed at once) -> first result", console_first_query(db, env, args.runs),
         None),
        ("nanodb similar --path DB 3", timed([*nanodb, "similar", "--path", str(db), "3"], env, args.runs),
         warm(db, env, "auto", "3")),
        ("plain open_clip script: build the model, encode one text",
         timed([sys.executable, "-c", PLAIN_OPEN_CLIP.format(model=args.model), "1"], env, args.runs),
         plain_warm(args.model, env)),
        ("python -c 'import nanodb.interfaces.cli' (the floor)",
         timed([sys.executable, "-c", "import nanodb.interfaces.cli"], env, args.runs), None),
    ]


def warm(db: Path, env: dict, backend: str, query: str) -> float:
    """Median seconds of the same query again in one process (after its first)."""
    out = subprocess.run([sys.executable, "-c", WARM, str(db), backend, query], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


def plain_warm(model: str, env: dict) -> float:
    """Median seconds per text of the plain script's loop, after its first text."""
    out = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP.format(model=model), "21"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


if __name__ == "__main__":
    main()
