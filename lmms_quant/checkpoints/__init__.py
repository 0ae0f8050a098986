"""Real low-bit checkpoints: pack, save, reload, export, detect, and run quantized models.

* :func:`save_quantized` / :func:`load_quantized`: our ``lmms-quant-packed``
  format (integer codes packed at their bit width, scales, zero points, AWQ
  input scales, the QuantReport in the metadata); a reload is bit-identical.
* :func:`export_compressed_tensors`, :func:`export_gptq`, :func:`export_awq`:
  the formats other tools load (compressed-tensors ``pack-quantized``;
  AutoGPTQ/GPTQModel; AutoAWQ GEMM), where they can express the recipe.
* :func:`detect_quantization`, :func:`load_prequantized`,
  :func:`ensure_not_quantized`: evaluate checkpoints quantized elsewhere on
  the CPU (dequantized to float), and refuse to quantize them twice.
* :func:`to_lowbit_`: run the packed weights through int4/int8 kernels.

Importing this package imports neither compressed-tensors nor torchao.
"""

from .autoawq import export_awq
from .autogptq import export_gptq
from .compressed_tensors import export_compressed_tensors
from .detect import AlreadyQuantizedError, DetectedQuant, detect_quantization, ensure_not_quantized
from .kernels import LowBitLinear, layers_from_report, to_lowbit_
from .load import is_packed_checkpoint, load_prequantized, load_quantized, read_packed_layers
from .pack import pack_int32, unpack_int32
from .qlayer import CheckpointError, CheckpointShapeError, QuantizedLinearData
from .save import save_quantized

__all__ = [
    "AlreadyQuantizedError",
    "CheckpointError",
    "CheckpointShapeError",
    "DetectedQuant",
    "LowBitLinear",
    "QuantizedLinearData",
    "detect_quantization",
    "ensure_not_quantized",
    "export_awq",
    "export_compressed_tensors",
    "export_gptq",
    "is_packed_checkpoint",
    "layers_from_report",
    "load_prequantized",
    "load_quantized",
    "pack_int32",
    "read_packed_layers",
    "save_quantized",
    "to_lowbit_",
    "unpack_int32",
]
