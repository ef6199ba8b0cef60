"""The few fixed shapes the text tower's export runs in, so that a text's vector is the same bits whether
it came alone or with others, by construction.

A matrix product's kernel (and so a result's last bits) may depend on the shape it runs in: the rows and
the token positions. So the export never runs a batch's own shape: each text runs at its token-length
bucket (LENGTHS: the smallest that holds it up to its end token; a CLIP text tower masks attention
causally and takes a text's feature at its end token, so the zero tokens after it change nothing but the
shape), in a call of one of a few row counts (ROWS), the rows a call's texts leave padded with a filler
text. Whether each shape gives each row bits that depend only on that row (not on its neighbours nor its
place), and the same bits in every row count, is checked once, when the tower is exported, and kept in its
meta.json; a row count that fails is not used (texts of that length run in the others, one by one at
worst, logged). An export checked on another CPU is checked again when it is loaded here."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

ROWS = (1, 2, 4, 8, 16, 32)  # a lone query runs 1 row: padded to 32 it would cost ~8x (benchmarks/RESULTS.md)
LENGTHS = (4, 8, 16, 32, 77)  # token positions, start and end included (4: a word or two); at most the context
CALL_COST = 32  # token positions a call costs beyond its rows' (measured: benchmarks/bench_text_encode.py)
MIN_PROBES = 8  # probe texts each row count runs (the larger ones: as many as their rows)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_id() -> str:
    """What names this CPU's kernels: OpenVINO's name and capabilities for it, and the vector ISA flags."""
    import openvino as ov

    core = ov.Core()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        pass
    caps = ",".join(sorted(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
    isa = ",".join(flag for flag in ISA_FLAGS if flag in flags) or platform.machine()
    return f"{core.get_property('CPU', 'FULL_DEVICE_NAME')} [{caps}] [{isa}]"


@dataclass(frozen=True)
class TextShapes:
    """The shapes a text tower runs in: for each token-length bucket, the row counts of its calls (each
    giving every row the same bits), and the CPU they were checked on."""

    rows: dict[int, tuple[int, ...]]  # token length -> row counts, ascending
    cpu: str

    @classmethod
    def one_by_one(cls, lengths: tuple[int, ...], cpu: str = "") -> TextShapes:
        """Every text in a call of its own (exact with no check: a call of one row has no neighbours)."""
        return cls({length: (1,) for length in lengths}, cpu)

    @classmethod
    def from_meta(cls, meta: dict) -> TextShapes:
        return cls({int(length): tuple(rows) for length, rows in meta["rows"].items()}, meta["cpu"])

    def to_meta(self) -> dict:
        return {"rows": {str(length): list(rows) for length, rows in self.rows.items()}, "cpu": self.cpu}

    def bucket(self, needed: int) -> int:
        """The token length a text that needs `needed` positions runs at."""
        return next(length for length in sorted(self.rows) if length >= needed)

    def calls(self, texts: int, length: int) -> list[int]:
        """The row counts of the calls that run `texts` texts of one bucket, the cheapest: a call costs
        CALL_COST token positions beyond its rows' (reading the weights), so short texts share few
        calls and long ones are padded little (17 texts: 16 + 1, not 32)."""
        rows = self.rows[length]
        cost, first = [0.0], [0]  # for k texts: the least cost, and the first call's rows
        for k in range(1, texts + 1):
            options = [(CALL_COST + n * length + cost[max(0, k - n)], n) for n in rows]
            best = min(options)
            cost.append(best[0])
            first.append(best[1])
        calls = []
        while texts > 0:
            calls.append(first[texts])
            texts -= first[texts]
        return sorted(calls, reverse=True)


def run_shaped(features: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, needed: np.ndarray,
               shapes: TextShapes, filler: np.ndarray, dim: int) -> np.ndarray:
    """The features (N, dim) of token rows (N, context length), each run at the bucket of its `needed`
    positions in calls of the checked row counts, padded with `filler` rows (one text's tokens)."""
    buckets = np.array([shapes.bucket(int(n)) for n in needed], dtype=np.int64)
    out = np.empty((len(tokens), dim), np.float32)
    for length in np.unique(buckets):
        todo = np.flatnonzero(buckets == length)
        for n in shapes.calls(len(todo), int(length)):
            chunk, todo = todo[:n], todo[n:]
            batch = np.repeat(filler[None, :length], n, axis=0)
            batch[: len(chunk)] = tokens[chunk, :length]
            out[chunk] = features(batch)[: len(chunk)]
    return out


def probe_tokens(count: int, shortest: int, length: int, sot: int, eot: int, rng) -> np.ndarray:
    """`count` token rows (count, length) of random words, each `shortest` to `length` positions long."""
    tokens = np.zeros((count, length), np.int64)
    for i, row in enumerate(tokens):
        n = (shortest, length)[i] if i < 2 else int(rng.integers(shortest, length + 1))
        row[0], row[n - 1] = sot, eot
        row[1 : n - 1] = rng.integers(1, min(sot, eot), n - 2)
    return tokens


def bucket_lengths(cut: bool, context_length: int) -> tuple[int, ...]:
    """The token lengths a tower runs at: LENGTHS up to the context length where it may run cut, else the
    context length alone."""
    return tuple(sorted({min(length, context_length) for length in LENGTHS})) if cut else (context_length,)


def check_shapes(features: Callable[[np.ndarray], np.ndarray], lengths: tuple[int, ...], sot: int, eot: int,
                 rows: tuple[int, ...] = ROWS) -> TextShapes:
    """The row counts of each bucket in which each row's features depend only on that row, the same bits
    in each of them. Probe texts of the bucket's lengths run in calls of each row count: in order (at
    least MIN_PROBES, one by one too), then all but one reversed behind a filler row (other neighbours,
    other places); a row count whose two runs differ is dropped, and of the others, those that give the
    largest one's bits to the probes they share are kept."""
    rng = np.random.default_rng(0)
    verdict: dict[int, tuple[int, ...]] = {}
    shortest = 2
    for length in sorted(lengths):
        probes = probe_tokens(max(max(rows), MIN_PROBES), shortest, length, sot, eot, rng)
        filler = probe_tokens(1, 2, length, sot, eot, rng)[0]
        alike: dict[int, np.ndarray] = {}
        for n in rows:
            ordered = np.concatenate([_call(features, probes[i : i + n], n, filler, 0)
                                      for i in range(0, max(n, MIN_PROBES), n)])
            if n == 1 or np.array_equal(_call(features, probes[n - 1 : 0 : -1], n, filler, 1),
                                        ordered[n - 1 : 0 : -1]):
                alike[n] = ordered
        top = alike[max(alike)]
        verdict[length] = tuple(n for n in sorted(alike) if np.array_equal(alike[n], top[: len(alike[n])]))
        if verdict[length] != tuple(rows):
            log.warning("on this CPU texts of up to %d tokens run in calls of %s rows only (%s give other bits)",
                        length, "/".join(map(str, verdict[length])),
                        "/".join(str(n) for n in rows if n not in verdict[length]))
        shortest = length + 1
    return TextShapes(verdict, cpu_id())


def _call(features, chunk: np.ndarray, n: int, filler: np.ndarray, lead: int) -> np.ndarray:
    """The features of `chunk`'s rows run in one call of `n` rows, behind `lead` filler rows."""
    batch = np.repeat(filler[None], n, axis=0)
    batch[lead : lead + len(chunk)] = chunk
    return features(batch)[lead : lead + len(chunk)]
