"""The 12 Hz speech tokenizer: codec decoder (codes -> 24 kHz audio), codec encoder
and speaker encoder (reference audio -> voice-clone conditioning).

Installed as `vllm_qwen3tts.codec`.
"""
