"""The text tower's export run in its fixed shapes (nanodb/model/text_shapes.py: each text at its
token-length bucket, in calls of 1/2/4/8/16/32 rows checked at export to give each row its own bits)
against what ran before: one query, and a batch of 32 as the server's batcher makes under 32 clients.

    python benchmarks/bench_text_encode.py                   # ViT-B-32, random weights
    python benchmarks/bench_text_encode.py --model ViT-S-32 --runs 5

Encoders of the same model: the OpenVINO export in fixed shapes (what a text query and the batcher run
now, exact), and as before: one call for the batch cut to its longest text (`encode_text` before: not
exact in a batch), one call per text (before: the batcher's exact fallback, and each new shape's first
call), texts of one length in calls of 16/8/4/2 (before: `encode_each` once its shapes were checked);
the torch model (backend torch; bfloat16 autocast on a CPU, as
`precision auto`) cut and at 77 tokens; and a text asked again, from the cache of text vectors. The
exports lie in a temporary NANODB_CACHE. Each timing is the median of --runs calls, the encoders taken in
turn so that a change of the machine's load falls on all of them; the vectors of each are compared with
open_clip's float32 encode_text at the full length.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the queries bench_server.py sends
WORDS = ("dog", "beach", "red car", "snow", "city at night", "a cat on a sofa", "mountains", "birthday cake",
         "old bridge", "children playing", "sunset", "a bowl of fruit", "train station", "forest path")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--runs", type=int, default=7, help="calls per timing (median)")
    args = ap.parse_args()
    os.environ["NANODB_CACHE"] = tempfile.mkdtemp(prefix="nanodb-bench-text-")

    import numpy as np
    import torch

    from nanodb.model import text_export
    from nanodb.model.clip import ModelConfig, ModelSpec, load_model
    from nanodb.model.text_length import needed_length
    from nanodb.search.text_cache import TextVectorCache, encode_cached

    spec = ModelSpec(args.model, "none")
    model = load_model(ModelConfig(spec, "auto", "auto", "torch"))
    t = time.perf_counter()
    cut_export = text_export.ExportedTextTower(text_export.export_text_tower(model))
    print(f"export, its shapes checked: {time.perf_counter() - t:.1f} s; shapes "
          + "; ".join(f"{length} tokens: {'/'.join(map(str, rows))} rows" for length, rows in cut_export.shapes.rows.items()))
    assert cut_export.cut

    def torch_full(texts):
        saved, model._cut_text = model._cut_text, False  # noqa: SLF001 (the path as before, for comparison)
        try:
            return model.encode_text(texts)
        finally:
            model._cut_text = saved  # noqa: SLF001

    def cut_to_longest(texts):  # encode_text before: the batch's own shape
        tokens = cut_export.tokenizer(texts)
        return text_export.unit_rows(cut_export.features(np.ascontiguousarray(tokens[:, :needed_length(tokens)])))

    def one_by_one(texts):  # the batcher's exact fallback before: each text alone, at its own length
        return np.concatenate([cut_to_longest([text]) for text in texts])

    def by_length(texts):  # encode_each before, its shapes checked: texts of one length in calls of 16/8/4/2
        tokens = cut_export.tokenizer(texts)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(tokens):
            groups.setdefault(needed_length(row[None]), []).append(i)
        out = np.empty((len(texts), cut_export.dim), np.float32)
        for length, rows in groups.items():
            while rows:
                n = next(n for n in (16, 8, 4, 2, 1) if n <= len(rows))
                out[rows[:n]] = cut_export.features(np.ascontiguousarray(tokens[rows[:n], :length]))
                rows = rows[n:]
        return text_export.unit_rows(out)

    def cached(texts):  # a text asked again: the cache of text vectors (filled by the warm-up call)
        return encode_cached(cut_export, texts, cache)

    cache = TextVectorCache()
    encoders = [("export, fixed shapes (now; exact)", cut_export.encode_text),
                ("export, cut to the longest (before)", cut_to_longest),
                ("export, one call per text (before)", one_by_one),
                ("export, one length in 16/8/4/2 (before)", by_length),
                ("torch bf16, cut", model.encode_text),
                ("torch bf16, 77 tokens", torch_full),
                ("asked again: the cache (now)", cached)]
    batches = {"1 query": ["a red car"], "32 queries": [f"{WORDS[i % len(WORDS)]} {i}" for i in range(32)],
               "32 queries, 2 to 40 words": [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i * 13 % 40))
                                             for i in range(32)]}

    for name, texts in batches.items():
        tokens = model.tokenizer(texts).numpy()
        with torch.no_grad():
            reference = torch.nn.functional.normalize(model.model.encode_text(torch.from_numpy(tokens)),
                                                      dim=-1).numpy()
        times = {label: [] for label, _ in encoders}
        for _, encode in encoders:
            encode(texts)  # warm: the shape's first run compiles
        for _ in range(args.runs):
            for label, encode in encoders:
                t = time.perf_counter()
                encode(texts)
                times[label].append(time.perf_counter() - t)
        buckets = [cut_export.shapes.bucket(int(n)) for n in tokens.argmax(1) + 1]
        calls = [f"{n}x{length}" for length in sorted(set(buckets))
                 for n in cut_export.shapes.calls(buckets.count(length), length)]
        print(f"\n{name}: longest {needed_length(tokens)} token positions; fixed shapes run {', '.join(calls)}")
        print(f"{'encoder':<40}{'median ms':>12}{'min ms':>10}{'min cosine':>12}")
        for label, encode in encoders:
            cosine = (encode(texts) * reference).sum(1).min()
            print(f"{label:<40}{1000 * statistics.median(times[label]):>12.1f}{1000 * min(times[label]):>10.1f}"
                  f"{cosine:>12.5f}")
    print(f"\n# {args.model} random weights, {os.cpu_count()} CPUs, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
