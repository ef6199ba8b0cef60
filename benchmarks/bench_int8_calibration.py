"""int8 fidelity beyond the calibration photos: NNCF's settings compared (issue 24).

The OpenVINO image tower is quantized on 64 face photos (caltech101/Faces) with each setting, then
its vectors of 96 COCO and 96 ImageNet photos are compared with open_clip's float32 ones.

    python benchmarks/bench_int8_calibration.py --model ViT-B-32

Random weights (--pretrained none): no download.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers import DATA  # noqa: E402


def settings():
    """Name -> nncf.quantize keyword arguments (the last is what --precision int8 uses)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters as Advanced
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    no_smooth_quant = AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
    return {
        "NNCF defaults (SmoothQuant, quantile activation ranges)": Advanced(),
        "min-max activation ranges": Advanced(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX),
        "SmoothQuant off": Advanced(smooth_quant_alphas=no_smooth_quant),
        "both (nanodb.model.quantize)": Advanced(smooth_quant_alphas=no_smooth_quant,
                                                 activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ["NANODB_CACHE"] = tempfile.mkdtemp(prefix="nanodb-bench-")
    import nncf
    import openvino as ov
    from PIL import Image

    from nanodb.model.clip import ClipModel, ModelConfig, ModelSpec

    spec = ModelSpec(args.model, "none", seed=args.seed)
    float32 = ClipModel(ModelConfig(spec, "cpu", "float32", "torch"))
    tower = ClipModel(ModelConfig(spec, "cpu", "int8", "openvino")).quantization

    def pixels(files):
        return np.stack([float32.image_pixels(Image.open(f)) for f in files])

    faces = pixels(sorted((DATA / "caltech101" / "Faces").glob("*.jpg"))[:64])
    photos = pixels(sorted((DATA / "coco-val2017" / "images").glob("*.jpg"))[:96]
                    + sorted((DATA / "imagenet-sample" / "images").glob("*"))[:96])
    reference = float32.encode_pixels(photos)
    inputs = tower.normalized(faces)
    dataset = nncf.Dataset([inputs[i : i + 1] for i in range(len(inputs))])
    print(f"{args.model}, random weights (seed {args.seed}), {os.cpu_count()} cores, load average "
          "{:.1f} {:.1f} {:.1f}; calibrated on 64 face photos".format(*os.getloadavg()))
    print("| NNCF setting | cosine to float32 on 96 COCO, min | on 96 ImageNet, min | mean | quantize s |\n"
          "|---|---:|---:|---:|---:|")
    for name, advanced in settings().items():
        start = time.perf_counter()
        model = nncf.quantize(ov.Core().read_model(tower.float_xml), dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(inputs), advanced_parameters=advanced)
        seconds = time.perf_counter() - start
        path = Path(os.environ["NANODB_CACHE"]) / "quantized.xml"
        ov.save_model(model, path, compress_to_fp16=False)
        vectors = tower.compile(path).infer({0: photos})[0]
        cosines = np.sum(vectors * reference, axis=1) / np.linalg.norm(vectors, axis=1)
        print(f"| {name} | {cosines[:96].min():.4f} | {cosines[96:].min():.4f} | {cosines.mean():.5f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
