"""OpenAI-compatible `/v1/audio/speech` serving. Installed as `vllm_qwen3tts.server`."""
