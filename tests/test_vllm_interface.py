"""The vLLM internals the talker glue depends on, checked against the installed vLLM.

A vLLM upgrade that renames or moves any of them fails here, at a line that says
what to update, instead of inside a running engine. The GPU runs vLLM 0.26 and CI
runs 0.32; `compat.TESTED_MINOR_VERSIONS` lists the range.
"""

from __future__ import annotations

import dataclasses
import inspect

from vllm_qwen3tts.talker import compat


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(getattr(cls, "__annotations__", {})) | set(getattr(cls, "_fields", ()))


def test_vllm_version_is_in_the_tested_range():
    lo, hi = compat.TESTED_MINOR_VERSIONS[0], compat.TESTED_MINOR_VERSIONS[-1]
    assert lo <= compat.vllm_version() <= hi


def test_model_runner_v2_model_state_hooks_keep_their_signatures():
    from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    from vllm_qwen3tts.talker.model_state_v2 import Qwen3TTSModelState

    assert "get_model_state_cls" in inspect.getsource(resolve_model_state_cls)
    expected = {
        "__init__": ["self", "vllm_config", "model", "encoder_cache", "device"],
        "add_request": ["self", "req_index", "new_req_data"],
        "remove_request": ["self", "req_id"],
        "prepare_inputs": ["self", "input_batch", "req_states"],
        "prepare_dummy_inputs": ["self", "num_reqs", "num_tokens"],
        "custom_sampler": ["self", "sampler"],
    }
    for name, names in expected.items():
        assert params(getattr(DefaultModelState, name)) == names, f"DefaultModelState.{name} changed"
        assert params(getattr(Qwen3TTSModelState, name)) == names
    assert not getattr(Qwen3TTSModelState, "__abstractmethods__", None)


def test_model_runner_v2_batch_and_sampler_fields():
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.sample.output import SamplerOutput

    assert {"req_ids", "num_reqs", "idx_mapping", "num_tokens", "num_tokens_after_padding", "query_start_loc",
            "positions", "logits_indices"} <= fields(InputBatch)
    assert {"sampled_token_ids", "logprobs_tensors"} <= fields(SamplerOutput)
    assert {"req_id", "prompt_token_ids", "prefill_token_ids", "sampling_params"} <= fields(NewRequestData)


def test_model_runner_v2_registers_requests_with_the_sampler_the_way_the_wrapper_expects():
    # TalkerSampler.add_request hands vLLM's sampler a copy of the params without logprobs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu.sample.sampler import Sampler

    # 0.26: (req_idx, prompt_len, sampling_params); 0.32: (req_idx, sampling_params)
    assert params(Sampler.add_request) in (["self", "req_idx", "prompt_len", "sampling_params"],
                                           ["self", "req_idx", "sampling_params"])
    assert "self.sampler.add_request(" in inspect.getsource(GPUModelRunner)
    sp = SamplingParams(logprobs=15, max_tokens=7)
    copy = sp.clone()
    copy.logprobs = None
    assert sp.logprobs == 15 and copy.max_tokens == 7


def test_logprobs_channel_types():
    from vllm.logprobs import FlatLogprobs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import LogprobsTensors

    assert LogprobsTensors._fields[:3] == ("logprob_token_ids", "logprobs", "selected_token_ranks")
    assert {"start_indices", "end_indices", "token_ids"} <= fields(FlatLogprobs)
    sp = SamplingParams(logprobs=15, flat_logprobs=True, detokenize=False, ignore_eos=True, extra_args={"a": 1})
    assert sp.extra_args == {"a": 1}


def test_model_runner_v1_attributes_the_cpu_driver_reads():
    from vllm.v1.worker.gpu_input_batch import CachedRequestState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_qwen3tts.talker.runner_v1 import REQUIRED_RUNNER_ATTRS

    init = inspect.getsource(GPUModelRunner.__init__)
    for attr in REQUIRED_RUNNER_ATTRS:
        assert f"self.{attr} =" in init or f"self.{attr}:" in init, f"GPUModelRunner.{attr} moved"
    assert {"prompt_token_ids", "sampling_params", "output_token_ids"} <= fields(CachedRequestState)
