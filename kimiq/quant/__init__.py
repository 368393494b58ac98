"""Quantization: a registry of weight formats (GGUF blocks, mlx affine/MXFP4, float passthrough).

``kimiq.quant.formats`` is the entry point (``get_format(name).quantize(w)`` / ``.dequantize``);
``ggml`` / ``kquants`` / ``kquants_imatrix`` restate llama.cpp's quantizers byte for byte,
``affine`` restates mlx's, ``dequant`` holds the torch reference dequantizers.
"""

from .formats import FORMATS, Format, format_names, get_format

__all__ = ["FORMATS", "Format", "format_names", "get_format"]
