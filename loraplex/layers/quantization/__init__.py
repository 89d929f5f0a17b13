"""Quantized base weights (GPTQ, AWQ, bitsandbytes, FP8, MXFP4, compressed-tensors' int
and NVFP4 weights): which checkpoints load, and their linear layers."""

from loraplex.layers.quantization.bitsandbytes import BnB4bitLinear, BnB8bitLinear
from loraplex.layers.quantization.compressed_tensors import CompressedTensorsLinear
from loraplex.layers.quantization.config import (
    SUPPORTED_METHODS,
    QuantConfig,
    quant_config_from_hf,
    read_side_config,
)
from loraplex.layers.quantization.fp8 import FP8Linear
from loraplex.layers.quantization.linear import AWQLinear, GPTQLinear, QuantLinear, unpack
from loraplex.layers.quantization.nvfp4 import NVFP4Linear

__all__ = ["SUPPORTED_METHODS", "AWQLinear", "BnB4bitLinear", "BnB8bitLinear",
           "CompressedTensorsLinear", "FP8Linear",
           "GPTQLinear", "NVFP4Linear",
           "QuantConfig", "QuantLinear",
           "quant_config_from_hf", "read_side_config", "unpack"]
