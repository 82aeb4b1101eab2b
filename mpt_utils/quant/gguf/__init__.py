"""GGUF for real: export torch models, quantize with llama.cpp, read back what the file holds."""

from mpt_utils.quant.gguf.export import export_gguf
from mpt_utils.quant.gguf.fileinfo import GGUFInfo, read_gguf
from mpt_utils.quant.gguf.quantize import NEEDS_IMATRIX, SCHEMES, quantize_gguf

__all__ = ["NEEDS_IMATRIX", "SCHEMES", "GGUFInfo", "export_gguf", "quantize_gguf", "read_gguf"]
