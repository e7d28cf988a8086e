"""Qwen3-TTS served through vLLM.

Importing this package must stay cheap and CUDA-free: vLLM imports it in every
process (API server, engine core, workers) through its plugin entry points.
"""

__version__ = "0.1.0"
