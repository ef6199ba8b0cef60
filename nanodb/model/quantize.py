"""int8 post-training quantization of a converted image tower (NNCF), run as a child process.

    python -m nanodb.model.quantize MODEL.xml INPUTS.npy OUT.xml

NNCF draws progress bars on stdout and probes for CUDA when imported: neither belongs in the program
that uses nanodb, so the model's calibration runs here, in its own process (see runtimes/openvino_int8.py).
INPUTS.npy holds the calibration images as the converted model's float input (N, 3, H, W)."""

from __future__ import annotations

import sys


def quantize(model_xml: str, inputs_npy: str, out_xml: str) -> None:
    import nncf
    import numpy as np
    import openvino as ov

    inputs = np.load(inputs_npy)
    dataset = nncf.Dataset([inputs[i : i + 1] for i in range(len(inputs))])
    quantized = nncf.quantize(ov.Core().read_model(model_xml), dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(inputs))
    ov.save_model(quantized, out_xml, compress_to_fp16=False)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.splitlines()[2].strip())
    quantize(*sys.argv[1:])
