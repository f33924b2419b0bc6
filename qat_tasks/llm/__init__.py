"""The fallback LLM's 4-bit track: the model (the stand-in from a GGUF in a PyPI wheel, Llama 3 8B in production),
weight formats, the llm-compressor adapter (resumable by layer chunk), the texts it is calibrated and judged on,
perplexity, intent routing and generations, per-block sensitivity, and the track itself."""
