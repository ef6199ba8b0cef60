"""int8 post-training quantization of a converted image tower (NNCF), run as a child process.

    python -m nanodb.model.quantize MODEL.xml INPUTS.npy OUT.xml

NNCF draws progress bars on stdout and probes for CUDA when imported: neither belongs in the program
that uses nanodb, so the model's calibration runs here, in its own process (see runtimes/openvino_int8.py).
INPUTS.npy holds the calibration images as the converted model's float input (N, 3, H, W).

Two of NNCF's transformer defaults are turned off because they tie the tower to its calibration photos:
SmoothQuant (it moves activation outliers into the weights, scaled for the photos it saw) and quantile
activation ranges (they clip what those photos rarely reached). Calibrated on 64 face photos, a ViT-B-32
then stayed at cosine 0.9996 of floating point on COCO and ImageNet photos with both off, against 0.969
with NNCF's defaults (random weights; benchmarks/RESULTS.md), and ran as fast."""

from __future__ import annotations

import sys


def quantized(model, inputs):
    """The OpenVINO `model` quantized to int8 on `inputs` (N, 3, H, W), with the settings above."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    dataset = nncf.Dataset([inputs[i : i + 1] for i in range(len(inputs))])
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),  # -1: SmoothQuant off
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
    )
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(inputs),
                         advanced_parameters=advanced)


def quantize(model_xml: str, inputs_npy: str, out_xml: str) -> None:
    import numpy as np
    import openvino as ov

    model = quantized(ov.Core().read_model(model_xml), np.load(inputs_npy))
    ov.save_model(model, out_xml, compress_to_fp16=False)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.splitlines()[2].strip())
    quantize(*sys.argv[1:])
