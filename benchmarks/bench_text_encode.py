"""The text tower run only as far as a batch's longest text (nanodb/model/text_length.py) against the full
77-token context (as before): one query, and a batch of 32 as the server's batcher makes under 32 clients.

    python benchmarks/bench_text_encode.py                   # ViT-B-32, random weights
    python benchmarks/bench_text_encode.py --model ViT-S-32 --runs 5

Five encoders of the same model: the OpenVINO export (what a text query runs) made with and without the
cut, the export called once per text (what the batcher's shared pass runs: each text's vector has the bits
it has alone), and the torch model (backend torch; bfloat16 autocast on a CPU, as `precision auto`) with and without
it. The exports lie in a temporary NANODB_CACHE. Each timing is the median of --runs calls, the encoders
taken in turn so that a change of the machine's load falls on all of them; the vectors of each are
compared with open_clip's float32 encode_text at the full length.
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

    from unittest import mock

    import numpy as np
    import torch

    from nanodb.model import text_export
    from nanodb.model.clip import ModelConfig, ModelSpec, load_model
    from nanodb.model.text_length import needed_length

    spec = ModelSpec(args.model, "none")
    model = load_model(ModelConfig(spec, "auto", "auto", "torch"))
    cut_export = text_export.ExportedTextTower(text_export.export_text_tower(model))
    with mock.patch.object(text_export, "EXPORT_FORMAT", -1), mock.patch.object(text_export, "cuttable",
                                                                                  lambda m: False):
        full_export = text_export.ExportedTextTower(text_export.export_text_tower(model))
    assert cut_export.cut and not full_export.cut

    def torch_full(texts):
        saved, model._cut_text = model._cut_text, False  # noqa: SLF001 (the path as before, for comparison)
        try:
            return model.encode_text(texts)
        finally:
            model._cut_text = saved  # noqa: SLF001

    def one_by_one(texts):  # what the batcher's shared pass runs: each text alone, its lone vector's bits
        return np.concatenate([cut_export.encode_text([text]) for text in texts])

    encoders = [("OpenVINO export, cut (now)", cut_export.encode_text),
                ("OpenVINO export, cut, one text a call", one_by_one),
                ("OpenVINO export, 77 tokens (before)", full_export.encode_text),
                ("torch bf16, cut (now)", model.encode_text),
                ("torch bf16, 77 tokens (before)", torch_full)]
    batches = {"1 query": ["a red car"], "32 queries": [f"{WORDS[i % len(WORDS)]} {i}" for i in range(32)]}

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
        print(f"\n{name}: token positions run {needed_length(tokens)} of {tokens.shape[1]}")
        print(f"{'encoder':<40}{'median ms':>12}{'min ms':>10}{'min cosine':>12}")
        for label, encode in encoders:
            cosine = (encode(texts) * reference).sum(1).min()
            print(f"{label:<40}{1000 * statistics.median(times[label]):>12.1f}{1000 * min(times[label]):>10.1f}"
                  f"{cosine:>12.5f}")
    print(f"\n# {args.model} random weights, {os.cpu_count()} CPUs, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
