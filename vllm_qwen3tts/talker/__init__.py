"""The talker as a vLLM model: HF config registration, the talker model, per-request state and runner glue.

Only `plugin.register` runs at import time in every vLLM process; it must stay
cheap and CUDA-free.
"""
