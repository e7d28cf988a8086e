"""Tooling that is not the product: random checkpoints, the stack sampler, the talker's
PyTorch parts outside vLLM (for tests and benchmarks)."""
