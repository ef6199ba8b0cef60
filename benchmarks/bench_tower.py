"""The CLIP image tower alone, every runtime and precision tried for the CPU, on real photos.

    python benchmarks/bench_tower.py                       # ViT-B-32, 32-photo batches, the default set
    python benchmarks/bench_tower.py --only openvino       # rows whose name contains "openvino"
    python benchmarks/bench_tower.py --rounds 5 --only "torch float32" "bfloat16 hint" "on 64 photos"

Prints images/s (median of --repeats batches per row after a warm-up, over --rounds rounds that take the
rows in turn, so a shared machine's load falls on each alike) and the cosine of each path's vectors to the
first row's (torch float32: keep it in --only) on photos no calibration saw. The int8 rows calibrate on other photos first (NNCF post-training quantization, as `--precision int8` does)
or, for comparison, on synthetic images. Needs the `bench` extra plus onnxruntime for its rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers import coco_photos  # noqa: E402
from PIL import Image  # noqa: E402

from nanodb.model.clip import ModelConfig, ModelSpec, load_model  # noqa: E402


def normalized(model, files) -> np.ndarray:
    """Float NCHW model input of photos, through the model's own pixel transform."""
    mean = np.asarray(model.preprocess.transforms[-1].mean, np.float32)[None, :, None, None]
    std = np.asarray(model.preprocess.transforms[-1].std, np.float32)[None, :, None, None]
    x = np.stack([model.image_pixels(Image.open(f)) for f in files]).astype(np.float32).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x / 255 - mean) / std)


def synthetic(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields plus noise, normalised roughly like photos."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.uniform(0, 255, (3, rng.integers(2, 16), rng.integers(2, 16))).astype(np.uint8)
        planes = [np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC), np.float32) for p in low]
        x = np.clip(np.stack(planes) + rng.normal(0, rng.uniform(0, 30), (3, size, size)), 0, 255) / 255
        out.append((x - 0.45) / 0.27)
    return np.stack(out).astype(np.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=4, help="batches timed per row and round")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over the rows, interleaved (a shared machine)")
    ap.add_argument("--only", nargs="*", default=[], help="run only the rows whose name contains one of these")
    args = ap.parse_args(argv)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    import torch

    model = load_model(ModelConfig(ModelSpec(args.model, "none"), "cpu", "float32", "torch"))
    visual = model.model.visual.eval()
    photos = coco_photos(64 + args.batch)
    calibration, batch = normalized(model, photos[:64]), normalized(model, photos[64:])
    tmp = Path(tempfile.mkdtemp())

    def torch_run(precision):
        def run(x):
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                return visual(torch.from_numpy(x)).float().numpy()
        return run

    def openvino_model():
        """The tower converted once (then read back from disk: nncf changes the model it is given)."""
        import openvino as ov

        path = tmp / "tower.xml"
        if not path.exists():
            with torch.no_grad():
                ov.save_model(ov.convert_model(visual, example_input=torch.from_numpy(batch[:1]),
                                               input=[ov.PartialShape([-1, *batch.shape[1:]])]), path)
        return ov.Core().read_model(path)

    def openvino_run(ov_model, hint, extra=None):
        """One infer request (latency: its threads in lockstep), or with the THROUGHPUT hint a batch split
        among the streams as --precision int8 runs it (openvino_float.Requests)."""
        import openvino as ov

        from nanodb.model.runtimes.openvino_float import Requests

        compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint, **(extra or {})})
        return Requests(compiled).infer

    quantized_models = {}

    def nncf_static(data):
        from nanodb.model.quantize import quantized

        key = data.tobytes()  # one calibration per data set, whatever rows use it
        if key not in quantized_models:
            quantized_models[key] = quantized(openvino_model(), data)  # as --precision int8 quantizes
        return quantized_models[key]

    def nncf_weights():
        import nncf

        return nncf.compress_weights(openvino_model(), mode=nncf.CompressWeightsMode.INT8_ASYM)

    def onnx_path():
        path = tmp / "tower.onnx"
        if not path.exists():
            torch.onnx.export(visual, (torch.from_numpy(batch[:1]),), str(path), input_names=["x"],
                              dynamic_axes={"x": {0: "n"}}, dynamo=False)
        return path

    def onnxruntime_run(path):
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"x": x})[0]

    def onnx_int8_dynamic():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = tmp / "tower-int8.onnx"
        quantize_dynamic(str(onnx_path()), str(out), weight_type=QuantType.QInt8)
        return onnxruntime_run(out)

    def compiled():
        fn = torch.compile(visual)

        def run(x):
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                return fn(torch.from_numpy(x)).float().numpy()
        return run

    rows = [
        ("torch float32 (eager; open_clip's attention is already fused SDPA)", lambda: torch_run("f32")),
        ("torch bfloat16 autocast", lambda: torch_run("bf16")),
        ("torch.compile + bfloat16 autocast", compiled),
        ("openvino float32", lambda: openvino_run(openvino_model(), "f32")),
        ("openvino bfloat16 hint", lambda: openvino_run(openvino_model(), "bf16")),
        ("openvino int8 weights + dynamic int8 activations (nncf.compress_weights)",
         lambda: openvino_run(nncf_weights(), "bf16", {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"})),
        ("openvino int8 static, calibrated on 64 photos (nncf.quantize), one request",
         lambda: openvino_run(nncf_static(calibration), "bf16")),
        ("openvino int8 static, calibrated on 64 photos, in streams (THROUGHPUT hint; --precision int8)",
         lambda: openvino_run(nncf_static(calibration), "bf16", {"PERFORMANCE_HINT": "THROUGHPUT"})),
        ("openvino bfloat16 hint, in streams (THROUGHPUT hint)",
         lambda: openvino_run(openvino_model(), "bf16", {"PERFORMANCE_HINT": "THROUGHPUT"})),
        ("openvino int8 static, calibrated on 64 synthetic images",
         lambda: openvino_run(nncf_static(synthetic(64, batch.shape[-1])), "bf16")),
        ("onnxruntime float32", lambda: onnxruntime_run(onnx_path())),
        ("onnxruntime int8 dynamic (quantize_dynamic)", onnx_int8_dynamic),
    ]
    print(f"# {args.model}, random weights, batch {args.batch} COCO photos, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, median of {args.repeats} batches "
          f"x {args.rounds} interleaved round(s)")
    print("| path | images/s | cosine to torch float32, min / mean |\n|---|---:|---:|")
    runs, reference = [], None
    for name, make in rows:
        if args.only and not any(part in name for part in args.only):
            continue
        try:
            run = make()
            vectors = np.asarray(run(batch), np.float64)  # warm-up (and the vectors)
        except Exception as e:  # a runtime not installed, or one that cannot run this model
            print(f"| {name} | - | {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''} |", flush=True)
            continue
        reference = vectors if reference is None else reference
        runs.append((name, run, vectors))
    seconds = {name: [] for name, _, _ in runs}
    for _ in range(args.rounds):
        for name, run, _ in runs:
            for _ in range(args.repeats):
                start = time.perf_counter()
                run(batch)
                seconds[name].append(time.perf_counter() - start)
    for name, _, vectors in runs:
        cos = np.sum(vectors * reference, 1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
        print(f"| {name} | {len(batch) / float(np.median(seconds[name])):.1f} | {cos.min():.4f} / {cos.mean():.5f} |")
    print(f"# load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
