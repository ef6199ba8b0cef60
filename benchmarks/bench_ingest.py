"""Ingestion benchmark: model-only vs the full nanodb pipeline vs a sequential loop, one process run.

0. --compare N: the float32 loop that NanoDB and rclip run (open_clip's own preprocess + encode_image,
   batches of 32) against NanoDB.scan through the Python API with the model loaded, for each
   precision/backend, interleaved over --rounds in one run; images/s, ratio to the loop of the same
   round, and the cosine of each scan's vectors to the loop's float32 vectors for the same files.
   The N photos are half COCO, half ImageNet; the int8 tower is calibrated first, outside the clock, by
   a scan of face photos (256 from one folder; --calibrate-folders 4: 16 from each of four caltech101
   folders), so on none of the photos timed (in a model cache of this run's own). The row
   "int8-unchecked" is int8 with its fidelity checks patched out, to show what they cost;
   "int8-onestream" runs the int8 tower in one OpenVINO stream (its threads in lockstep), as before issue 37.

1. model-only: the CLIP stage alone on pre-decoded pixels at the production batch size;
2. pipeline:   NanoDB.scan (walk -> decode pool -> CLIP stage -> appender), pool and model warm;
3. sequential: decode one image, embed it, append it (NanoDB.add per file), as NanoDB and rclip do.

Then, optionally, a rescan of an unchanged folder vs its first scan (--rescan), and the peak RSS of
`nanodb --scan` over synthetic trees of hard links to small real JPEGs (--rss-trees).

    python benchmarks/bench_ingest.py --limit 0 --compare 320          # precisions vs the float32 loop
    python benchmarks/bench_ingest.py --limit 0 --compare 128 --rounds 3 --calibrate-folders 4 \
        --scans bfloat16/openvino int8/openvino int8-unchecked/openvino       # int8 against the default
    python benchmarks/bench_ingest.py --limit 640                      # throughput table
    python benchmarks/bench_ingest.py --limit 0 --rescan --rescan-model ViT-S-32
    python benchmarks/bench_ingest.py --limit 0 --rss-trees 2000 20000

Random weights (--pretrained none): no download, same speed as trained ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers import DATA as SHARED  # noqa: E402
from nanodb.pipeline.decode import DecodedImage, decode_file  # noqa: E402
from nanodb.pipeline.walk import DirectoryWalker  # noqa: E402

from nanodb import NanoDB  # noqa: E402

DATA = SHARED / "caltech101"
COCO = SHARED / "coco-val2017" / "images"
IMAGENET = SHARED / "imagenet-sample" / "images"
FACES = SHARED / "caltech101" / "Faces"
# (precision, backend, decode workers or 0 for one per core) of each NanoDB.scan row of --compare
SCAN_CONFIGS = [
    ("float32", "torch", 0), ("bfloat16", "torch", 0), ("float32", "openvino", 0),
    ("bfloat16", "openvino", 0), ("int8", "openvino", 0), ("int8", "openvino", 1), ("int8-unchecked", "openvino", 0),
    ("int8-onestream", "openvino", 0),
]


def subset(files: list[str], n: int) -> list[str]:
    """n files spread evenly over the sorted list (every category represented)."""
    if n <= 0 or n >= len(files):
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]


def link_tree(files: list[str], root: Path, prefix: bool = True) -> Path:
    root.mkdir(parents=True)
    for i, f in enumerate(files):
        os.symlink(f, root / (f"{i:06d}_{Path(f).name}" if prefix else Path(f).name))
    return root


def decode_then_model(db: NanoDB, files: list[str], batch: int) -> tuple[float, float]:
    """(images/s of decoding in one process, images/s of the CLIP stage on the decoded pixels)."""
    start = time.perf_counter()
    transform, limit = db.model.pixel_transform, db.settings.max_image_pixels
    pixels = [r.pixels for f in files if isinstance(r := decode_file(f, transform, limit), DecodedImage)]
    decode_rate = len(files) / (time.perf_counter() - start)
    db.model.encode_pixels(np.stack(pixels[:batch]))  # warm-up
    start = time.perf_counter()
    for lo in range(0, len(pixels), batch):
        db.model.encode_pixels(np.stack(pixels[lo : lo + batch]))
    return decode_rate, len(pixels) / (time.perf_counter() - start)


def pipeline(db: NanoDB, folder: Path, warmup: Path) -> float:
    db.scan(warmup)  # starts the decode workers and loads the model before the clock starts
    start = time.perf_counter()
    report = db.scan(folder)
    return (report.added + report.updated) / (time.perf_counter() - start)


def sequential(db: NanoDB, files: list[str]) -> float:
    db.add(files[0])  # warm-up
    start = time.perf_counter()
    done = 0
    for f in files:
        try:
            db.add(f)
            done += 1
        except ValueError:
            pass
    return done / (time.perf_counter() - start)


def openclip_loop(model, preprocess, files: list[str], batch: int = 32) -> tuple[float, np.ndarray]:
    """The float32 loop of NanoDB and rclip: open, preprocess, encode_image per batch of 32 files."""
    import torch
    from PIL import Image

    vectors = []
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(files), batch):
            x = torch.stack([preprocess(Image.open(f)) for f in files[lo : lo + batch]])
            vectors.append(torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy())
    return len(files) / (time.perf_counter() - start), np.concatenate(vectors)


def compare(args, tmp: Path) -> None:
    """Table 0: the float32 open_clip loop against NanoDB.scan per precision/backend, interleaved."""
    from nanodb.pipeline.fidelity import SPREAD_IMAGES

    from nanodb.model.clip import ModelConfig, ModelSpec, load_model

    os.environ["NANODB_CACHE"] = str(tmp / "model-cache")  # the int8 tower calibrated in this run, on faces
    coco, imagenet = sorted(map(str, COCO.glob("*.jpg"))), sorted(map(str, IMAGENET.glob("*")))
    chosen = coco[: args.compare // 2] + imagenet[: args.compare - args.compare // 2]
    folder, warmup = link_tree(chosen, tmp / "compare", prefix=False), link_tree(coco[-16:], tmp / "compare-warmup")
    if args.calibrate_folders > 1:  # 16 photos of each of the first caltech101 folders, from Faces on
        folders = sorted(p for p in DATA.iterdir() if p.is_dir() and p.name >= "Faces")[: args.calibrate_folders]
        calibration = tmp / "calibration"
        for f in folders:
            link_tree(sorted(map(str, f.glob("*.jpg")))[:16], calibration / f.name)
    else:
        calibration = link_tree(sorted(map(str, FACES.glob("*.jpg")))[:SPREAD_IMAGES], tmp / "faces")
    configs = [c for c in SCAN_CONFIGS if not args.scans or f"{c[0]}/{c[1]}" in args.scans]
    if any(c[0].startswith("int8") for c in configs):  # calibrated once, before the clock starts
        with NanoDB(tmp / "db-calibration", args.model, pretrained="none", device="cpu", precision="int8",
                    backend="openvino", follow_symlinks=True) as db:
            db.scan(calibration)
            assert db.model.quantization.quantized, "the int8 tower was not calibrated"
    int8_summaries = []
    by_name = {Path(f).name: i for i, f in enumerate(chosen)}
    folder_paths = {str(p) for p in folder.iterdir()}
    reference = load_model(ModelConfig(ModelSpec(args.model, "none"), "cpu", "float32", "torch"))  # the loop's own model
    rates: dict[str, list[float]] = {}
    cosines: dict[str, np.ndarray] = {}
    ref_vectors = None
    for r in range(args.rounds):
        rate, ref_vectors = openclip_loop(reference.model, reference.preprocess, chosen)
        rates.setdefault("open_clip float32 loop (preprocess + encode_image, batch 32)", []).append(rate)
        for config, backend, workers in configs:
            precision = config.split("-")[0]
            opts = dict(pretrained="none", device="cpu", precision=precision, backend=backend, workers=workers,
                        follow_symlinks=True)  # trees of links to the data
            with NanoDB(tmp / f"db-{config}-{backend}-{workers}-{r}", args.model, **opts) as db, variant(db, config):
                db.scan(warmup)  # starts the decode workers
                start = time.perf_counter()
                report = db.scan(folder)
                rate = (report.added + report.updated) / (time.perf_counter() - start)
                name = f"NanoDB.scan {db.model.precision_id}{config.removeprefix(precision)}, " \
                       f"{db.settings.decode_workers} decode workers"
                if config == "int8":
                    int8_summaries.append(f"{workers or 'one per core'} decode worker(s): {report.summary()}")
                rates.setdefault(name, []).append(rate)
                rows = {by_name[Path(p).name]: i for i in range(len(db.vectors)) if (p := db.path_of(i)) in folder_paths}
                order = sorted(rows)
                v = db.vectors[[rows[j] for j in order]].astype(np.float32)
                cosines[name] = np.sum(v * ref_vectors[order], axis=1) / np.linalg.norm(v, axis=1)
        print(f"  round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    loop = np.median(next(iter(rates.values())))
    print(f"\n{args.model}, random weights, cpu, {len(chosen)} COCO and ImageNet photos (int8: calibrated on "
          f"{len(list(calibration.rglob('*.jpg')))} caltech101 photos of {max(1, args.calibrate_folders)} folder(s)), "
          f"median of {args.rounds} interleaved rounds")
    print("| run | images/s (each round) | vs float32 loop | cosine to loop, min / mean |\n|---|---:|---:|---:|")
    for name, values in rates.items():
        cos = f"{cosines[name].min():.4f} / {cosines[name].mean():.5f}" if name in cosines else "(reference)"
        each = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {np.median(values):.1f} ({each}) | {np.median(values) / loop:.2f}x | {cos} |")
    print("\n".join(f"int8 scan: {line}" for line in int8_summaries))


@contextmanager
def variant(db: NanoDB, config: str):
    """The model of `db` as the row `config` runs it: int8 "-unchecked" without its fidelity checks (no
    image of a batch checked), to measure what they cost; "-onestream" with a tower in one stream, as
    before issue 37."""
    from nanodb.pipeline import fidelity

    from nanodb.model.runtimes.openvino_int8 import Int8ImageTower

    model = db.model  # loaded (and OpenVINO's conversion cached) before the clock starts
    checked, tower, quantization = fidelity.CHECKED_PER_BATCH, model.image_tower, model.quantization
    if config.endswith("-unchecked"):
        fidelity.CHECKED_PER_BATCH = 0
    if config.endswith("-onestream"):
        Int8ImageTower.STREAMS = False
        try:
            model.image_tower = model.quantization = Int8ImageTower(model)
        finally:
            Int8ImageTower.STREAMS = True
    try:
        yield
    finally:
        fidelity.CHECKED_PER_BATCH = checked
        model.image_tower, model.quantization = tower, quantization


def peak_rss_of_scan(tree: Path, db_path: Path, model_args: list[str]) -> tuple[float, float, float]:
    """(seconds, peak RSS of nanodb itself, peak RSS of nanodb + its decode workers) in MiB."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nanodb", "--path", str(db_path), *model_args, "--scan", str(tree)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ps = psutil.Process(proc.pid)
    main_peak = total_peak = 0
    while proc.poll() is None:
        try:
            main = ps.memory_info().rss
            total = main + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            continue
        main_peak, total_peak = max(main_peak, main), max(total_peak, total)
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"nanodb --scan failed with exit status {proc.returncode}")
    return time.perf_counter() - start, main_peak / 2**20, total_peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="image folder (default ../shared/data/caltech101)")
    p.add_argument("--limit", type=int, default=640, help="images in the throughput runs (0 = skip them)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=None, help="default: configs/default.yaml")
    p.add_argument("--workers", type=int, default=0, help="decode processes (0 = one per core)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compare", type=int, default=0, metavar="N",
                   help="the float32 open_clip loop vs NanoDB.scan per precision on N COCO photos (0 = skip)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of --compare")
    p.add_argument("--calibrate-folders", type=int, default=1,
                   help="calibrate int8 on 256 face photos (1), or 16 photos of each of N caltech101 folders")
    p.add_argument("--scans", nargs="*", default=[], metavar="PRECISION/BACKEND",
                   help="the NanoDB.scan rows of --compare, e.g. int8/openvino (default: all)")
    p.add_argument("--rescan", action="store_true", help="time a first scan of --data, then a rescan")
    p.add_argument("--rescan-model", default=None, help="model for --rescan (default --model)")
    p.add_argument("--rss-trees", type=int, nargs="*", default=[], metavar="N",
                   help="peak RSS of `nanodb --scan` over trees of N hard links to small JPEGs (test model)")
    args = p.parse_args()

    files = [f.path for f in DirectoryWalker([str(args.data)])]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, {args.data} ({len(files)} images)")
    opts = dict(pretrained="none", workers=args.workers, batch_size=args.batch_size, device=args.device,
                follow_symlinks=True)  # trees of links to the data
    print("load average at start: {:.1f} {:.1f} {:.1f} (other processes share these cores)".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory(prefix="nanodb-bench-") as tmp:
        tmp = Path(tmp)
        if args.compare:
            compare(args, tmp)
        if args.limit:
            chosen = subset(files, args.limit)
            folder = link_tree(chosen, tmp / "subset")
            warmup = link_tree(subset([f for f in files if f not in set(chosen)], 64), tmp / "warmup")
            with NanoDB(tmp / "db-model", args.model, **opts) as db:
                batch = db.settings.batch_size
                decode_rate, model_rate = decode_then_model(db, chosen, batch)
                rows = [("model-only (CLIP stage on pre-decoded pixels)", model_rate)]
            with NanoDB(tmp / "db-pipeline", args.model, **opts) as db:
                rows.append((f"full pipeline ({db.settings.decode_workers} decode workers)", pipeline(db, folder, warmup)))
            with NanoDB(tmp / "db-sequential", args.model, **opts) as db:
                rows.append(("sequential loop (decode, embed, append one by one)", sequential(db, chosen)))
            print(f"\n{args.model}, random weights, {args.device}, batch {batch}, {len(chosen)} images of {args.data.name}")
            print("| run | images/s | vs model-only |\n|---|---:|---:|")
            for name, rate in rows:
                print(f"| {name} | {rate:.1f} | {rate / rows[0][1]:.0%} |")
            print(f"(decoding alone, one process: {decode_rate:.1f} images/s)")
        if args.rescan:
            with NanoDB(tmp / "db-rescan", args.rescan_model or args.model, **opts) as db:
                first = db.scan(args.data)
                again = db.scan(args.data)
            print(f"\nrescan of unchanged {args.data} ({first.found} images, {args.rescan_model or args.model}): "
                  f"first scan {first.seconds:.1f}s, rescan {again.seconds:.2f}s "
                  f"({again.seconds / first.seconds:.2%} of the first; {again.unchanged} unchanged, "
                  f"{again.added + again.updated} embedded)")
        if args.rss_trees:
            small = sorted(files, key=os.path.getsize)[:200]
            print("\n| files | scan s | peak RSS nanodb MiB | peak RSS nanodb + workers MiB |\n|---:|---:|---:|---:|")
            for n in args.rss_trees:
                tree = tmp / f"tree{n}"
                for i in range(n):
                    d = tree / f"{i // 1000:03d}"
                    d.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(small[i % len(small)], d / f"{i:06d}.jpg")
                    except OSError:  # another filesystem: copy (the files are small)
                        shutil.copyfile(small[i % len(small)], d / f"{i:06d}.jpg")
                seconds, main_mib, total_mib = peak_rss_of_scan(tree, tmp / f"db-rss{n}", ["--config", "test"])
                print(f"| {n} | {seconds:.0f} | {main_mib:.0f} | {total_mib:.0f} |")
    print("load average at end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
