"""qcpu: run GGUF-quantized Qwen2-family chat models on laptop CPUs with NumPy + Numba."""

__version__ = "0.1.0"
