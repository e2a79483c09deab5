"""The quantization tool: HF safetensors checkpoint -> GGUF, and GGUF -> GGUF requantization."""
