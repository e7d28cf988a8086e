"""The vLLM internals the product depends on, checked against the installed vLLM.

`vllm_adapter.INTERNALS` lists every one; `CHECKS` below holds, for each, what we rely on (a
signature, fields, a hook). A vLLM upgrade that renames or moves any of them fails here, at a
line that says what to update, instead of inside a running engine; an entry added to the table
without a check here fails `test_every_internal_has_a_check`. The GPU runs vLLM 0.26 and CI runs
0.32; `vllm_adapter.TESTED_MINOR_VERSIONS` lists the range.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import vllm._custom_ops  # noqa: F401  registers vLLM's compiled kernels (torch.ops._C), as vLLM's processes do

from vllm_qwen3tts.base import vllm_adapter
from vllm_qwen3tts.base.vllm_adapter import GPU_ONLY_MODULES, INTERNALS

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "vllm_qwen3tts" / "base" / "vllm_adapter.py"


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(getattr(cls, "__annotations__", {})) | set(getattr(cls, "_fields", ()))


# ---------------------------------------------------------------------------- one check per internal

def check_async_engine_args(cls):
    # engine.start_engine passes these (plus the caller's engine_args)
    assert {"model", "dtype", "max_model_len", "max_num_seqs", "skip_tokenizer_init", "enforce_eager",
            "gpu_memory_utilization"} <= fields(cls)


def check_async_llm(cls):
    assert params(cls.generate)[:4] == ["self", "prompt", "sampling_params", "request_id"]
    assert "priority" in params(cls.generate)
    assert params(cls.from_engine_args)[0] == "engine_args"
    for name in ("abort", "shutdown"):
        assert callable(getattr(cls, name)), f"AsyncLLM.{name}"
    assert isinstance(inspect.getattr_static(cls, "errored"), property)  # vllm_adapter.engine_errored


def check_tokens_prompt(cls):
    assert "prompt_token_ids" in cls.__annotations__


def check_streaming_input(cls):
    # TTSEngine.stream_text's turns: StreamingInput(prompt, sampling_params) from an async generator
    assert params(cls) == ["prompt", "sampling_params"]


def check_sampling_params(cls):
    # every field talker_sampling_params sets, and the clone TalkerSampler.add_request makes
    kind = vllm_adapter.resolve("RequestOutputKind")
    sp = cls(temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05, max_tokens=7, min_tokens=2,
             stop_token_ids=[3], ignore_eos=True, seed=1, logprobs=15, flat_logprobs=True, detokenize=False,
             skip_special_tokens=False, output_kind=kind.DELTA, extra_args={"a": 1})
    copy = sp.clone()
    copy.logprobs = None
    assert sp.logprobs == 15 and copy.max_tokens == 7 and copy.extra_args == {"a": 1}


def check_request_output_kind(cls):
    assert cls.DELTA in cls


def check_flat_logprobs(cls):
    assert {"start_indices", "end_indices", "token_ids"} <= fields(cls)


def check_logprobs_tensors(cls):
    assert cls._fields[:3] == ("logprob_token_ids", "logprobs", "selected_token_ranks")


def check_input_processor(cls):
    # vllm_adapter.install_prompt_token_check wraps it
    assert params(cls._validate_model_input) == ["self", "prompt_input", "prompt_type"]


def check_validation_error(cls):
    err = cls("bad id", parameter="prompt_token_ids")
    assert isinstance(err, Exception) and err.parameter == "prompt_token_ids"


def check_model_registry(registry):
    assert params(registry.register_model)[:2] == ["model_arch", "model_cls"]
    assert isinstance(registry.models, dict)  # talker/plugin.py reads who registered the released name


def check_current_platform(platform):
    assert platform.device_type in ("cpu", "cuda")
    assert isinstance(platform.is_cuda(), bool)


def check_envs(envs):
    assert isinstance(envs.VLLM_BATCH_INVARIANT, bool)


def check_api_server(module):
    assert module.__name__ == vllm_adapter.API_SERVER_MODULE
    assert 'if __name__ == "__main__"' in inspect.getsource(module)  # `python -m` runs it (cli.py)


def check_serve_http(fn):
    # vllm_adapter.before_engine_shutdown: on a signal, the engine client is shut down (in a
    # thread) before uvicorn is told to stop, so a drain hooked there runs while the server answers
    source = inspect.getsource(fn)
    assert "add_signal_handler(signal.SIGTERM" in source
    shutdown = re.search(r"run_in_executor\(\s*None, partial\(engine_client\.shutdown, timeout=", source)
    assert shutdown and shutdown.start() < source.index("server.should_exit = True") < source.index("server_task.cancel()")


def check_authentication_middleware(cls):
    # vllm_adapter.vllm_api_key_middleware_tokens matches it by name and reads tokens=
    assert cls.__name__ == "AuthenticationMiddleware" and cls.__module__.startswith("vllm.")
    assert params(cls.__init__) == ["self", "app", "tokens"]


def check_vllm_config(cls):
    assert {"model_config", "scheduler_config", "device_config", "compilation_config"} <= fields(cls)
    assert hasattr(cls, "use_v2_model_runner")  # vllm_adapter.uses_model_runner_v2


def check_cudagraph_mode(cls):
    # runner_v1.attach_v1_driver refuses FULL graphs
    assert cls.FULL.has_full_cudagraphs() and not cls.PIECEWISE.has_full_cudagraphs()


def check_qwen3_model(cls):
    assert {"vllm_config", "prefix"} <= set(params(cls.__init__))
    assert params(cls.forward)[:5] == ["self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds"]
    assert callable(cls.load_weights)


def check_linear_base(cls):
    # projections.use_small_batch_projections reads quant_method, skip_bias_add, bias
    assert {"skip_bias_add", "bias", "quant_config"} <= set(params(cls.__init__))
    assert "self.quant_method" in inspect.getsource(cls.__init__)


def check_unquantized_linear_method(cls):
    assert params(cls.apply) == ["self", "layer", "x", "bias"]


def check_silu_and_mul(cls):
    assert issubclass(cls, torch.nn.Module)


def check_direct_register_custom_op(fn):
    assert {"op_name", "op_func", "mutates_args", "fake_impl", "target_lib"} <= set(params(fn))


def check_silu_and_mul_kernel(op):
    # called positionally as (out, input); vLLM 0.26 names the output `result`, 0.32 `out`
    out, gate_up = op.default._schema.arguments
    assert out.alias_info is not None and out.alias_info.is_write, "the first argument is no longer the output"
    assert gate_up.name == "input" and gate_up.alias_info is None


def check_default_model_state(cls):
    from vllm_qwen3tts.talker.model_state_v2 import Qwen3TTSModelState

    expected = {
        "__init__": ["self", "vllm_config", "model", "encoder_cache", "device"],
        "add_request": ["self", "req_index", "new_req_data"],
        "remove_request": ["self", "req_id"],
        "prepare_inputs": ["self", "input_batch", "req_states"],
        "prepare_dummy_inputs": ["self", "num_reqs", "num_tokens"],
        "custom_sampler": ["self", "sampler"],
    }
    for name, names in expected.items():
        assert params(getattr(cls, name)) == names, f"DefaultModelState.{name} changed"
        assert params(getattr(Qwen3TTSModelState, name)) == names
    assert issubclass(Qwen3TTSModelState, cls)
    assert not getattr(Qwen3TTSModelState, "__abstractmethods__", None)


def check_resolve_model_state_cls(fn):
    # 0.32's resolve_model_state_cls and 0.26's init_model_state both ask the model for its class
    assert "get_model_state_cls" in inspect.getsource(fn)  # Qwen3TTSTalkerForVLLM.get_model_state_cls


def check_input_batch(cls):
    assert {"req_ids", "num_reqs", "idx_mapping", "num_tokens", "num_tokens_after_padding", "query_start_loc",
            "positions", "logits_indices"} <= fields(cls)


def check_sampler_output(cls):
    assert {"sampled_token_ids", "logprobs_tensors"} <= fields(cls)


def check_sampler(cls):
    # TalkerSampler.add_request hands the base sampler a copy of the params without logprobs;
    # vllm_adapter.split_sampler_add_request_args takes the params as the last argument
    assert params(cls.add_request) in (["self", "req_idx", "prompt_len", "sampling_params"],  # 0.26
                                       ["self", "req_idx", "sampling_params"])  # 0.32


def check_model_runner_v2(cls):
    assert "self.sampler.add_request(" in inspect.getsource(cls)


def check_new_request_data(cls):
    assert {"req_id", "prompt_token_ids", "prefill_token_ids", "sampling_params"} <= fields(cls)


def check_gpu_model_runner(cls):
    from vllm_qwen3tts.talker.runner_v1 import REQUIRED_RUNNER_ATTRS

    init = inspect.getsource(cls.__init__)
    for attr in REQUIRED_RUNNER_ATTRS:
        assert f"self.{attr} =" in init or f"self.{attr}:" in init, f"GPUModelRunner.{attr} moved"


def check_cached_request_state(cls):
    assert {"prompt_token_ids", "sampling_params", "output_token_ids"} <= fields(cls)


def check_verify_and_update_config(cls):
    # talker/plugin.py configure_model / configure_engine, through vllm_adapter.install_model_config_hook
    assert params(cls.verify_and_update_config) == ["vllm_config"]
    assert params(cls.verify_and_update_model_config) == ["model_config"]


def check_models_config_map(table):
    from vllm.config import ModelConfig, VllmConfig

    assert isinstance(table, dict)
    # each hook is looked up by architecture when the configuration is built
    assert "MODELS_CONFIG_MAP" in inspect.getsource(ModelConfig._try_verify_and_update_model_config)
    assert "MODELS_CONFIG_MAP" in inspect.getsource(VllmConfig.try_verify_and_update_config)


def check_plugins(module):
    # vllm_adapter.autoload_endpoint_plugin replaces load_endpoint_plugins; the app builder must
    # look it up at each call (0.32: plugins.endpoint_plugins.interface; 0.26: the API server)
    assert params(module.load_endpoint_plugins) == ["supported_tasks"]
    assert module.ENDPOINT_PLUGINS_GROUP == "vllm.endpoint_plugins"
    callers = []
    for name in ("vllm.plugins.endpoint_plugins.interface", vllm_adapter.API_SERVER_MODULE):
        try:
            callers.append(inspect.getsource(importlib.import_module(name)))
        except ImportError:
            pass
    # imported inside the caller's function, at each call: a module-level import would keep the original
    assert any(re.search(r"\n[ \t]+from vllm\.plugins import load_endpoint_plugins\b", src) for src in callers)


def check_scheduler(cls):
    # vllm_adapter.install_session_rollback wraps _handle_stopped_request before 0.32; 0.32 rolls back itself
    assert params(cls._handle_stopped_request) == ["self", "request"]
    from vllm.v1.request import Request

    source = inspect.getsource(Request.__init__)
    assert "self.num_output_placeholders" in source and "self.resumable" in source
    # ... and _update_request_as_session(self, session, update), whose update carries max_tokens
    assert params(cls._update_request_as_session) == ["self", "session", "update"]
    from vllm.v1.request import StreamingUpdate

    assert "max_tokens" in {f.name for f in dataclasses.fields(StreamingUpdate)}
    if vllm_adapter.vllm_version() >= (0, 32):
        assert "num_output_placeholders" in inspect.getsource(cls._handle_stopped_request)
        assert "session.max_tokens = update.max_tokens" in inspect.getsource(cls._update_request_as_session)
    else:
        assert "self.async_tokens_to_discard" in source


CHECKS = {
    "AsyncEngineArgs": check_async_engine_args,
    "AsyncLLM": check_async_llm,
    "TokensPrompt": check_tokens_prompt,
    "StreamingInput": check_streaming_input,
    "SamplingParams": check_sampling_params,
    "RequestOutputKind": check_request_output_kind,
    "FlatLogprobs": check_flat_logprobs,
    "LogprobsTensors": check_logprobs_tensors,
    "InputProcessor": check_input_processor,
    "VLLMValidationError": check_validation_error,
    "ModelRegistry": check_model_registry,
    "current_platform": check_current_platform,
    "envs": check_envs,
    "VerifyAndUpdateConfig": check_verify_and_update_config,
    "MODELS_CONFIG_MAP": check_models_config_map,
    "plugins": check_plugins,
    "Scheduler": check_scheduler,
    "api_server": check_api_server,
    "serve_http": check_serve_http,
    "AuthenticationMiddleware": check_authentication_middleware,
    "VllmConfig": check_vllm_config,
    "CUDAGraphMode": check_cudagraph_mode,
    "Qwen3Model": check_qwen3_model,
    "LinearBase": check_linear_base,
    "UnquantizedLinearMethod": check_unquantized_linear_method,
    "SiluAndMul": check_silu_and_mul,
    "direct_register_custom_op": check_direct_register_custom_op,
    "silu_and_mul_kernel": check_silu_and_mul_kernel,
    "DefaultModelState": check_default_model_state,
    "resolve_model_state_cls": check_resolve_model_state_cls,
    "InputBatch": check_input_batch,
    "SamplerOutput": check_sampler_output,
    "Sampler": check_sampler,
    "ModelRunnerV2": check_model_runner_v2,
    "NewRequestData": check_new_request_data,
    "GPUModelRunner": check_gpu_model_runner,
    "CachedRequestState": check_cached_request_state,
}


def resolve_or_skip(name: str):
    """The internal, or a skip where it lives only in GPU-only modules this vLLM build lacks."""
    try:
        return vllm_adapter.resolve(name)
    except ImportError:
        modules = [module for module, _ in INTERNALS[name]]
        if all(m.startswith(GPU_ONLY_MODULES) and importlib.util.find_spec(m) is None for m in modules):
            pytest.skip(f"{name}: {', '.join(modules)} is GPU-only and absent from this vLLM build")
        raise


def test_every_internal_has_a_check():
    assert set(CHECKS) == set(INTERNALS), "each vllm_adapter.INTERNALS entry needs its check here"


@pytest.mark.parametrize("name", list(INTERNALS))
def test_internal_resolves_and_keeps_what_we_rely_on(name):
    CHECKS[name](resolve_or_skip(name))


def test_names_imported_from_the_adapter_are_the_vllm_objects():
    from vllm.model_executor.models.qwen3 import Qwen3Model

    from vllm_qwen3tts.base.vllm_adapter import Qwen3Model as through_adapter

    assert through_adapter is Qwen3Model
    with pytest.raises(AttributeError):
        vllm_adapter.NotAnInternal  # noqa: B018


# ---------------------------------------------------------------------------- versions

def test_vllm_version_is_in_the_tested_range():
    lo, hi = vllm_adapter.TESTED_MINOR_VERSIONS[0], vllm_adapter.TESTED_MINOR_VERSIONS[-1]
    assert lo <= vllm_adapter.vllm_version() <= hi


def test_pyproject_pins_the_tested_range():
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^gpu = \["vllm>=(\d+)\.(\d+),<(\d+)\.(\d+)"\]', text, re.MULTILINE)
    assert m, "pyproject.toml: gpu = [\"vllm>=LO,<HI\"]"
    lo, hi = vllm_adapter.TESTED_MINOR_VERSIONS[0], vllm_adapter.TESTED_MINOR_VERSIONS[-1]
    assert (int(m[1]), int(m[2])) == lo
    assert (int(m[3]), int(m[4])) == (hi[0], hi[1] + 1)


def test_split_sampler_add_request_args_takes_the_params_last():
    sp = object()
    assert vllm_adapter.split_sampler_add_request_args((12, sp)) == ((12,), sp)  # 0.26
    assert vllm_adapter.split_sampler_add_request_args((sp,)) == ((), sp)  # 0.32


def test_api_key_middleware_tokens_of_vllms_middleware_only():
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware

    auth = vllm_adapter.resolve("AuthenticationMiddleware")
    assert vllm_adapter.vllm_api_key_middleware_tokens(Middleware(auth, tokens=["k1", "k2"])) == ["k1", "k2"]
    assert vllm_adapter.vllm_api_key_middleware_tokens(Middleware(GZipMiddleware)) is None


# ---------------------------------------------------------------------------- one place

def vllm_imports(path: Path) -> list[str]:
    """`file:line module` for every import of vLLM in `path`, inside functions too, and every
    `import_module("vllm...")` / `__import__("vllm...")` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            if getattr(func, "attr", getattr(func, "id", None)) in ("import_module", "__import__"):
                names = [str(node.args[0].value)]
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n == "vllm" or n.startswith("vllm.")]
    return found


def test_only_the_adapter_imports_vllm():
    files = [p for d in ("vllm_qwen3tts", "codec", "server") for p in sorted((ROOT / d).rglob("*.py"))]
    assert ADAPTER in files and len(files) > 30
    assert vllm_imports(ADAPTER), "the scan no longer sees the adapter's own imports"
    offenders = [hit for p in files if p != ADAPTER for hit in vllm_imports(p)]
    assert not offenders, f"import vLLM through vllm_qwen3tts.base.vllm_adapter: {offenders}"


def test_importing_the_adapter_loads_no_vllm():
    code = ("import sys, vllm_qwen3tts.base.vllm_adapter as a; a.INTERNALS; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
