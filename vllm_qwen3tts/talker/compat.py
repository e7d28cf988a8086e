"""Everything that differs between the vLLM versions we support, in one place.

Supported: 0.26 (the CUDA build on the GPU machine, Model Runner V2) through
0.32 (the CPU build in CI, Model Runner V1 only: V2 needs Triton kernels). The
MRv2 hooks we override (`DefaultModelState.add_request/remove_request/
prepare_inputs/prepare_dummy_inputs/custom_sampler`) kept their signatures over
that range; `tests/test_vllm_interface.py` checks them against the installed
vLLM so a version bump that moves them fails loudly.
"""

from __future__ import annotations

import re

TESTED_MINOR_VERSIONS = ((0, 26), (0, 32))


def vllm_version() -> tuple[int, int]:
    import vllm

    m = re.match(r"(\d+)\.(\d+)", vllm.__version__)
    if not m:
        raise RuntimeError(f"cannot parse vLLM version {vllm.__version__!r}")
    return int(m.group(1)), int(m.group(2))


def check_vllm_version() -> None:
    version = vllm_version()
    lo, hi = TESTED_MINOR_VERSIONS[0], TESTED_MINOR_VERSIONS[-1]
    if not (lo <= version <= hi):
        import warnings

        warnings.warn(
            f"vllm-qwen3tts is tested with vLLM {lo[0]}.{lo[1]} through {hi[0]}.{hi[1]}; found "
            f"{version[0]}.{version[1]}. The talker relies on Model Runner V2 internals "
            "(DefaultModelState, InputBatch, SamplerOutput.logprobs_tensors).",
            stacklevel=2,
        )


def uses_model_runner_v2(vllm_config) -> bool:
    # 0.26 and 0.32 both record the choice on VllmConfig.
    return bool(getattr(vllm_config, "use_v2_model_runner", False))
