"""Command line: NanoDB's flags, as a thin layer over the NanoDB Python API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import shtab

from nanodb import __version__
from nanodb.config import load_settings
from nanodb.database import NanoDB
from nanodb.interfaces.console import Console, counted, format_validation
from nanodb.interfaces.preview import preview, preview_protocol
from nanodb.interfaces.query_args import command_query, similar_query
from nanodb.interfaces.stopping import StopOnSignals
from nanodb.media.paths import DEFAULT_EXCLUDES
from nanodb.model.clip import BACKENDS, PRECISIONS, ModelLoadError
from nanodb.pipeline.walk import RAW_PAIRS
from nanodb.search.duplicates import check_threshold
from nanodb.search.request import Filters, SearchRequest
from nanodb.service import IngestService
from nanodb.storage.cluster_manifest import is_sharded
from nanodb.storage.format import DatabaseError

EPILOG = """\
examples:
  nanodb --scan ~/Pictures --path ~/.nanodb/pictures --autosave
  nanodb --path ~/.nanodb/pictures --server --port 7860
  nanodb --scan /mnt/nas/photos --path ~/.nanodb/nas --ray auto --autosave
  nanodb --scan /mnt/shared/laion --path /mnt/shared/db --ray auto --shards 8 --autosave
  nanodb --path ~/.nanodb/pictures --watch ~/Pictures --watch /mnt/camera --exclude '*.tmp.jpg'
  printf 'a red car\\nsave\\n' | nanodb --path ~/.nanodb/pictures
  nanodb search --path ~/.nanodb/pictures "a red car" -k 5 --json
  nanodb similar --path ~/.nanodb/pictures ~/Pictures/cat.jpg --preview
  nanodb duplicates --path ~/.nanodb/pictures --threshold 0.95
  nanodb --print-completion bash > ~/.local/share/bash-completion/completions/nanodb

Defaults come from configs/default.yaml; --config FILE overrides them, and flags override both."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line `nanodb: error: ...` and a pointer to --help, not the
    whole usage (the subcommands' parsers are of this class too)."""

    def error(self, message: str, help_of: str | None = None):
        self.exit(2, f"nanodb: error: {message}; see `{help_of or self.prog} --help`\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown flag after a subcommand points to that subcommand's --help."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = getattr(parsed, "command", None)
            self.error(f"unrecognized arguments: {' '.join(unknown)}", f"{self.prog} {command}" if command else None)
        return parsed


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="nanodb",
        description="Search your images by text or by image, with CLIP embeddings.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shtab.add_argument_to(p, ["--print-completion"], help="print a shell completion script for this shell")
    p.add_argument("--path", help="database folder (created if missing, loaded if present); required").complete = (
        shtab.DIRECTORY)
    p.add_argument("--scan", action="append", default=[], metavar="DIR",
                   help="add the images under a folder (recursively) or a single file, an fsspec URL prefix "
                        "(s3://bucket/photos/) or webdataset tar shards ('data/{00000..00099}.tar'); repeatable"
                   ).complete = shtab.FILE
    p.add_argument("--watch", action="append", default=[], metavar="DIR",
                   help="scan a folder, then keep indexing what changes in it until Ctrl-C/SIGTERM "
                        "(repeatable; implies --autosave)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files and folders whose name or path matches (repeatable; hidden folders, "
                        "@eaDir, .thumbnails and the database folder are always skipped)")
    p.add_argument("--follow-symlinks", action="store_true", default=None,
                   help="with --scan/--watch: also index files reached through symlinks that lead outside the "
                        "folders given (skipped by default: the server would send them)")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --scan/--watch: decode again the files that failed before (by default one is "
                        "retried only once it changes)")
    p.add_argument("--raw-pairs", choices=RAW_PAIRS, default=None,
                   help="a camera RAW file beside a JPEG or export (PNG, TIFF, HEIF, WebP, AVIF) of the same "
                        "name: index the JPEG/export alone (default: jpeg) or both")
    p.add_argument("--autosave", action="store_true",
                   help="save after each scan and after every `autosave_every` (1000) new images")
    p.add_argument("--read-only", action="store_true",
                   help="open for searching only: no lock, no scans or saves (another process may be writing)")
    p.add_argument("--repair", action="store_true",
                   help="make a damaged database openable: keep its longest consistent part, then rescan")
    p.add_argument("--validate", action="store_true",
                   help="check that every stored vector finds itself first; list duplicate groups")
    p.add_argument("-k", "--k", type=_positive, default=None, help="results per query (default 8)")
    p.add_argument("--model", help="open_clip model name (default from config: ViT-B-32)")
    p.add_argument("--pretrained", metavar="TAG|FILE|none",
                   help="open_clip pretrained tag, a local checkpoint file, or 'none' for random weights")
    p.add_argument("--seed", type=int, default=None, help="seed of the random weights with --pretrained none")
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (or a name in configs/, e.g. 'test')")
    p.add_argument("--batch-size", type=_positive, default=None, help="images per CLIP forward pass")
    p.add_argument("--workers", type=int, default=None, help="image decode processes (0 = one per core)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where the model runs")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="model arithmetic (default auto: float16 on a GPU, bfloat16 on a CPU that has it; "
                        "int8: fastest on a CPU, calibrated once on the first photos scanned)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="image tower runtime on a CPU (default auto: OpenVINO if installed)")
    p.add_argument("--server", action="store_true", help="serve the web UI (Gradio)")
    p.add_argument("--host", default="0.0.0.0", help="web UI address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=7860, help="web UI port (default 7860)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="decode and embed on a Ray cluster, and open a sharded database there: auto, HOST:PORT, "
                        "ray://HOST:PORT, or local (needs pip install 'nanodb[ray]')")
    p.add_argument("--shards", type=_positive, metavar="N",
                   help="with --ray, for a new database: keep its items in N shards on the cluster (the --path "
                        "folder then holds only the cluster manifest)")
    p.add_argument("--shard-dir", metavar="DIR",
                   help="with --shards: put the shards' folders under DIR on each node's own disk (default: inside "
                        "--path, which every node must reach, e.g. a shared filesystem)")
    p.add_argument("--auth", metavar="USER:PASS", help="with --server: ask for this user and password")
    p.add_argument("--trusted-proxy", metavar="ADDRESS", action="append", default=[],
                   help="with --server: a reverse proxy whose X-Forwarded-For names the client (repeatable; by "
                        "default a client is the address it connects from)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--version", action="version", version=f"nanodb {__version__}")
    add_one_shot_commands(p)
    return p


def add_one_shot_commands(p: argparse.ArgumentParser) -> None:
    """`nanodb search`, `nanodb similar` and `nanodb duplicates`, which print their results and exit."""
    commands = p.add_subparsers(dest="command", metavar="{search,similar,duplicates}",
                                description="one-shot commands for scripts: print the results and exit")
    search = commands.add_parser("search", help="search by text, an image or both, print the results and exit")
    search.add_argument("query", nargs="+",
                        help="words, an image file or URL, #INDEX, or a combined query such as "
                             "'./cat.jpg - 3:cat + 2:bee' (joined with spaces; \"quoted\" is words)")
    search.add_argument("--text", action="store_true",
                        help="the query is words, even if it looks like a path (e.g. 'notes.jpg')")
    similar = commands.add_parser("similar", help="images similar to a photo, an item index or an image URL")
    similar.add_argument("photo", help="an image file, an item index, an http(s) URL or a combined query"
                         ).complete = shtab.FILE
    for sub in (search, similar):
        sub.add_argument("--path", required=True, help="database folder").complete = shtab.DIRECTORY
        sub.add_argument("-k", "--k", type=_positive, default=None, help="results (default 8)")
        sub.add_argument("--json", action="store_true", help="one JSON object per line instead of result lines")
        sub.add_argument("--preview", action="store_true",
                         help="show thumbnails in terminals that can (kitty, iTerm2, WezTerm)")
        for f in Filters.described():
            sub.add_argument(f"--{f.flag}", dest=f.name, metavar=f.metavar, action="append" if f.choices else "store",
                             help=f.help)
        sub.add_argument("--config", metavar="FILE", help="YAML file of settings (or a name in configs/)")
        sub.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where the model runs")
        sub.add_argument("--ray", metavar="ADDRESS", help="the Ray cluster of a sharded database (auto, HOST:PORT)")
    duplicates = commands.add_parser("duplicates", help="groups of near-duplicate images (bursts, resized, "
                                     "re-encoded or lightly edited copies), largest first")
    duplicates.add_argument("--path", required=True, help="database folder").complete = shtab.DIRECTORY
    duplicates.add_argument("--threshold", type=_threshold, default=0.95, metavar="S",
                            help="least similarity (cosine) of two near-duplicates, more than 0 and at most 1 "
                                 "(default 0.95)")
    duplicates.add_argument("--min-size", type=_positive, default=2, metavar="N",
                            help="only groups of at least N items (default 2)")
    duplicates.add_argument("--json", action="store_true", help="one JSON object per group instead of lines")


def _threshold(text: str) -> float:
    try:
        return check_threshold(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


@contextlib.contextmanager
def web_upload_folder() -> Iterator[str]:
    """A private folder (mode 0700) for the web UI's uploads, removed with them when the server stops,
    instead of the shared /tmp/gradio.

    Gradio has no per-app setting for it: it reads the GRADIO_TEMP_DIR environment variable when the
    app is built and again at each upload. So the program's entry point, and only it, sets that
    variable, before gradio is imported, and takes it back when the server is gone (main() may run
    again in one process). A GRADIO_TEMP_DIR set by the user is theirs: used as it is, never removed."""
    if os.environ.get("GRADIO_TEMP_DIR"):
        yield os.environ["GRADIO_TEMP_DIR"]
        return
    folder = tempfile.mkdtemp(prefix="nanodb-uploads-")
    os.environ["GRADIO_TEMP_DIR"] = folder
    try:
        yield folder
    finally:
        os.environ.pop("GRADIO_TEMP_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """The `nanodb` command. Output its reader stopped reading (`nanodb search ... | head -2`) ends it
    quietly with exit status 141, as a standard tool killed by SIGPIPE (`yes | head`) ends."""
    try:
        try:
            return run_command(argv)
        finally:
            sys.stdout.flush()  # here, where a closed pipe is caught, not at exit (a traceback there)
    except BrokenPipeError:
        discard_stdout()
        return 128 + signal.SIGPIPE


def discard_stdout() -> None:
    """Point stdout at /dev/null, so that what Python still flushes at exit raises nothing."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class CurrentStderrHandler(logging.StreamHandler):
    """Log lines to sys.stderr as it is at each line: the console's prompt puts its own in place while
    it runs, which prints them above the prompt instead of through it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.stderr


def run_command(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.path:
        parser.error("the following arguments are required: --path")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        handlers=[CurrentStderrHandler()],
    )
    # what a first query or scan waits for (the model's load, a tower's export) and how long it took
    logging.getLogger("nanodb.loading").setLevel(logging.INFO)
    if getattr(args, "watch", None):  # one line per change the watch indexes (pipeline/watch.py)
        logging.getLogger("nanodb.pipeline.watch").setLevel(logging.INFO)
    try:
        if args.command:
            return one_shot(args)
        return asyncio.run(run(args))
    except BrokenPipeError:
        raise  # not an error: see main()
    except (DatabaseError, ModelLoadError, ValueError, OSError) as e:
        print(f"nanodb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a Ctrl-C before the stop signals' handlers were set
        return 128 + signal.SIGINT


def one_shot(args: argparse.Namespace) -> int:
    """`nanodb search` / `nanodb similar` / `nanodb duplicates`: open the database read-only, print the
    results, exit."""
    if args.command == "duplicates":
        return print_duplicates(args)
    settings = load_settings(args.config, k=args.k, device=args.device)
    with NanoDB(args.path, settings=settings, read_only=True, ray=ray_options(args)) as db:
        words = " ".join(args.query) if args.command == "search" else None
        query = command_query(words, args.text) if words is not None else similar_query(args.photo)
        filters = Filters(**{f.name: getattr(args, f.name) for f in Filters.described()})
        results = db.find(SearchRequest(k=args.k, filters=filters, **query))
        print_results(db, results, args, filtered=bool(filters))
    return 0


def print_results(db: NanoDB, results, args: argparse.Namespace, filtered: bool) -> None:
    """Result lines (with thumbnails under --preview) or, with --json, JSON lines and nothing else.
    No results: stdout stays empty, and stderr says why."""
    protocol = None
    if args.preview and args.json:
        print("nanodb: --preview is ignored with --json (its output is only JSON)", file=sys.stderr)
    elif args.preview and (protocol := preview_protocol()) is None:
        print("nanodb: --preview needs a terminal that shows images (kitty, iTerm2, WezTerm)", file=sys.stderr)
    if not results:
        why = " (the database is empty)" if len(db) == 0 else " match the filters" if filtered else ""
        print(f"nanodb: no results{why}", file=sys.stderr)
    for r in results:
        if args.json:
            at = {} if r.time is None else {"time": r.time}  # a video's frame: its moment, in seconds
            print(json.dumps({"index": r.index, "path": r.path, **at, "similarity": round(r.similarity, 6)}))
            continue
        print(r)
        if protocol and r.path:
            print(preview(r.path, protocol, db.settings.max_image_pixels))


def print_duplicates(args: argparse.Namespace) -> int:
    """`nanodb duplicates`: each group's items as result lines (a header line before each group, a blank
    line between groups) or, with --json, one JSON object per group; a summary on stderr."""
    if is_sharded(Path(args.path).expanduser()):  # not a missing --ray: there is no cross-shard join yet
        raise DatabaseError(f"{args.path} is a sharded database: near-duplicates of a sharded database are not "
                            f"available yet (they need a join across the shards)")
    with NanoDB(args.path, read_only=True) as db:
        groups = db.near_duplicates(args.threshold, min_size=args.min_size)
        for number, group in enumerate(groups, 1):
            if args.json:
                print(json.dumps({"group": number, **group.to_dict()}))
                continue
            if number > 1:
                print()
            print(f"group {number}: {counted(len(group), 'item')}")
            for item in group:
                print(item)
        at = f"at similarity >= {args.threshold:g}"
        if args.min_size > 2:
            at += f" in groups of {args.min_size} or more"
        if not groups:
            why = " (the database is empty)" if len(db) == 0 else ""
            print(f"nanodb: no near-duplicates {at}{why}", file=sys.stderr)
        else:
            items = counted(sum(len(g) for g in groups), "item")
            print(f"nanodb: {counted(len(groups), 'group')} of near-duplicates {at} ({items})", file=sys.stderr)
    return 0


async def open_database(args: argparse.Namespace, settings, stop: StopOnSignals | None = None) -> NanoDB:
    """The database of `--path`, repaired first with `--repair`. A stop signal gives up joining a Ray
    cluster (Ray's own connection loop would retry for minutes)."""
    if args.repair:
        report = await asyncio.to_thread(
            NanoDB.repair, args.path, args.model, args.pretrained, seed=args.seed, settings=settings
        )
        print(f"nanodb: {report.summary()}", file=sys.stderr)
    if args.read_only and (args.scan or args.watch or args.autosave):
        raise ValueError("--read-only cannot be combined with --scan, --watch or --autosave")
    ray = ray_options(args)
    if ray is not None and stop is not None:
        ray.stop_joining = lambda: stop.received > 0
    return NanoDB(args.path, args.model, args.pretrained, seed=args.seed, settings=settings,
                  autosave=args.autosave or bool(args.watch), read_only=args.read_only, ray=ray)


def ray_options(args: argparse.Namespace):
    """The Ray cluster of --ray (with --shards, --shard-dir), or None."""
    shards, shard_dir = getattr(args, "shards", None), getattr(args, "shard_dir", None)
    if not args.ray:
        if shards or shard_dir:
            raise ValueError("--shards and --shard-dir need --ray ADDRESS (the cluster that holds the shards)")
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # this program's Ray reports nothing anywhere
    from nanodb.cluster import RayOptions

    return RayOptions(address=args.ray, shards=shards, shard_dir=shard_dir)


async def run(args: argparse.Namespace) -> int:
    settings = load_settings(
        args.config, k=args.k, batch_size=args.batch_size, workers=args.workers, device=args.device,
        precision=args.precision, backend=args.backend, follow_symlinks=args.follow_symlinks,
        raw_pairs=args.raw_pairs,
    )
    # Ctrl-C, SIGTERM (a service manager) and SIGHUP (a closed terminal) stop cleanly: ingestion is
    # cancelled (in-flight batches dropped) and what was indexed is saved below. Set before the database
    # opens (a new one loads the model): a signal meanwhile stops the program at its first wait. The
    # exit status is 128 + the signal's number if it stopped a scan or the start, 0 if nothing was running.
    server = service = db = None

    def anything_to_save() -> bool:
        """Asked by the signal handler, so without a Ray call: a sharded database may always have some."""
        if db is None:
            return False
        return db.cluster is not None or db.unsaved > 0 or (service is not None and service.scanning)

    starting = True  # until the --scan scans are under way: a stop meanwhile cuts the start short
    stop = StopOnSignals(asyncio.current_task(), busy=lambda: starting or service.scanning,
                         saving=lambda: anything_to_save() or (starting and db is not None and bool(args.scan)))
    try:
        db = await open_database(args, settings, stop)
    except BaseException as e:
        stop.restore()
        if stop.received:  # stopped while it opened: nothing to save
            if isinstance(e, Exception):  # what the stop cut short (joining a Ray cluster names its address)
                print(f"nanodb: {e}", file=sys.stderr)
            return stop.exit_status
        raise
    uploads = contextlib.ExitStack()
    try:
        print(f"nanodb: {db}", file=sys.stderr)
        if args.server:  # first, so the web UI serves while the scans below run
            uploads.enter_context(web_upload_folder())  # before gradio is imported
            from nanodb.interfaces.server import parse_auth, start_server

            server = start_server(db, args.host, args.port, parse_auth(args.auth) if args.auth else None,
                                  trusted_proxies=tuple(args.trusted_proxy))
            print(f"nanodb: web UI at {server.url} , HTTP API docs at {server.url}docs", file=sys.stderr)
        service = IngestService(db, [*DEFAULT_EXCLUDES, *args.exclude] if args.exclude else None,
                                retry_failed=args.retry_failed)
        show = lambda report: print(report.summary(), file=sys.stderr)  # noqa: E731
        for folder in args.scan:
            service.scan(folder, on_done=show)
        starting = False
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            await service.wait_scans()  # a script's commands expect the --scan results (`scan` does not wait)
        if args.watch:
            service.watch(args.watch, on_ready=show)
        if args.validate:
            await service.wait_scans()
            print(format_validation(db, await asyncio.to_thread(db.validate)))
        console = Console(db, settings.k, service=service)
        await console.run()
        if not console.exited:  # end of input: let the scans finish; a watch runs until stopped
            if args.watch:
                print(f"nanodb: watching {', '.join(args.watch)}; Ctrl-C or SIGTERM to stop", file=sys.stderr)
            await service.wait()
            if server is not None and not sys.stdin.isatty():  # e.g. a service with no input
                print("nanodb: input ended; serving until Ctrl-C", file=sys.stderr)
                await asyncio.to_thread(server.thread.join)
    finally:
        stop.stopping = True  # a signal from now on cancels nothing: the save below goes on
        if service is not None:
            await service.stop()
        if server is not None:
            server.stop()
        uploads.close()
        try:
            if db.unsaved:
                db.save()
                print(f"nanodb: saved {counted(len(db), 'item')} to {db.path}", file=sys.stderr)
        finally:  # a failed save (a removed shard folder) still ends the Ray cluster, here in the main thread
            db.close()
        stop.exit_if_stopped()
        stop.restore()
    return 0
