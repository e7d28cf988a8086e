"""The talker decoder's projections at a few rows: `small_linear` instead of cuBLAS.

One stream decodes one row per step through 28 layers of four projections each. At one row a
projection is a matrix-vector product, which cuBLAS runs well below the speed at which the weight
could stream (`small_linear` streams it at close to the memory bandwidth). The predictor already
uses `small_linear` at up to `small_batch_rows()` rows; here the talker's decoder (vLLM's own
`Qwen3Model`) does too, without touching vLLM's layer code: each linear layer's `quant_method`
becomes `SmallBatchLinearMethod`, whose `apply` calls one custom op. The op chooses by rows at run
time, inside itself, because a Python branch on the batch size in the traced forward would put a
guard on it and vLLM compiles one graph for every batch size. Each CUDA graph size runs its own
choice: sizes up to `small_batch_rows()` the Triton kernel, larger ones cuBLAS, as before. The MLP's
SiLU gate moves into its down projection's op (`small_linear` applies it as it loads its input;
larger batches run vLLM's `silu_and_mul` kernel, then cuBLAS), which saves a kernel per layer at a
few rows; the MLP's `act_fn` becomes a pass-through. vLLM's norms and residual adds stay as they
are. Numerics: the projections differ from cuBLAS's by summation order; the gate rounds SiLU's
output to the activation dtype before the product, as PyTorch's eager `silu(gate) * up` does
(Inductor's fused version rounds once, after the product).

On by default: where the settings' QWEN3TTS_PREDICTOR_KERNELS is 1 or names "talker_linear", and
QWEN3TTS_SMALL_BATCH_ROWS > 0 (base/settings.py); on CUDA only (the CPU build packs its weights for oneDNN).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..base import vllm_adapter
from ..model.predictor_kernels import kernel_chosen, small_batch_rows, small_linear, triton

logger = logging.getLogger(__name__)

_LIBRARY = torch.library.Library("vllm_qwen3tts", "FRAGMENT")


def talker_kernels_wanted() -> bool:
    """QWEN3TTS_PREDICTOR_KERNELS is 1 (default) or names "talker_linear", and vLLM's batch-invariant
    mode (its own GEMMs, the same result at every batch size) is off."""
    return kernel_chosen("talker_linear") and not vllm_adapter.batch_invariant_mode()


@functools.cache
def talker_small_rows() -> int:
    """Rows up to which the talker's projections take `small_linear` in this process: the settings'
    `small_batch_rows()` where `talker_kernels_wanted()`, else 0. Decided once: the ops ask at every call."""
    return small_batch_rows() if talker_kernels_wanted() else 0


def _rows_take_small_linear(x: torch.Tensor) -> bool:
    # The knobs are checked here too, not only where the methods are swapped in: vLLM's compile
    # cache replays a graph traced with these ops whatever the settings say now.
    # Triton's interpreter (TRITON_INTERPRET=1, tests only) runs the kernel on CPU tensors.
    return (0 < x.shape[0] <= talker_small_rows() and triton is not None
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


def small_batch_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T: `small_linear` for up to `talker_small_rows()` rows, else F.linear."""
    if _rows_take_small_linear(x):
        return small_linear(x, weight)
    return F.linear(x, weight)


def small_batch_silu_down(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up @ weight.T for gate_up [M, 2I] (gate, then up) and weight [N, I]."""
    if _rows_take_small_linear(gate_up):
        return small_linear(gate_up, weight, silu_mul=True)
    return F.linear(_silu_and_mul(gate_up), weight)


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    d = gate_up.shape[-1] // 2
    # vLLM's kernel where this build registered it: one launch
    if gate_up.is_cuda and (kernel := vllm_adapter.optional("silu_and_mul_kernel")) is not None:
        out = gate_up.new_empty((gate_up.shape[0], d))
        kernel(out, gate_up)
        return out
    return F.silu(gate_up[:, :d]) * gate_up[:, d:]


def _projection_shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def _register_ops() -> None:
    from ..base.vllm_adapter import direct_register_custom_op

    for op in (small_batch_projection, small_batch_silu_down):
        direct_register_custom_op(op.__name__, op, mutates_args=[], fake_impl=_projection_shape, target_lib=_LIBRARY)


_register_ops()


def _small_batch_methods():
    from ..base.vllm_adapter import UnquantizedLinearMethod

    class SmallBatchLinearMethod(UnquantizedLinearMethod):
        """vLLM's unquantized method (weights created and loaded as before) whose product goes
        through `vllm_qwen3tts::small_batch_projection`."""

        def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            if bias is not None or x.dim() != 2:
                return super().apply(layer, x, bias)
            return torch.ops.vllm_qwen3tts.small_batch_projection(x, layer.weight)

    class SiluDownLinearMethod(UnquantizedLinearMethod):
        """The down projection of an MLP whose `act_fn` passes gate_up [M, 2I] through: the SiLU
        gate happens here (`vllm_qwen3tts::small_batch_silu_down`)."""

        def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            if bias is not None or x.dim() != 2:
                raise ValueError("the fused SiLU down projection takes 2-D input without a bias")
            return torch.ops.vllm_qwen3tts.small_batch_silu_down(x, layer.weight)

    return SmallBatchLinearMethod, SiluDownLinearMethod


class PassThrough(nn.Module):
    """An MLP's activation once its down projection applies it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def small_batch_projections_enabled() -> bool:
    """Whether this process's talker takes the small-batch projections (CUDA, Triton, the knobs)."""
    from ..base.vllm_adapter import current_platform

    return talker_small_rows() > 0 and triton is not None and current_platform.is_cuda()


def use_small_batch_projections(decoder: nn.Module) -> tuple[int, int]:
    """Gives every unquantized linear layer of `decoder` the small-batch method, and every SiLU MLP
    (vLLM's `gate_up_proj`, `act_fn`, `down_proj`) the fused gate; returns how many of each.
    Layers with another (quantized) method keep theirs."""
    from ..base.vllm_adapter import LinearBase, SiluAndMul, UnquantizedLinearMethod

    linear_method, silu_down_method = _small_batch_methods()
    mlps = 0
    for module in decoder.modules():
        down = getattr(module, "down_proj", None)
        if (isinstance(getattr(module, "act_fn", None), SiluAndMul) and isinstance(down, LinearBase)
                and type(down.quant_method) is UnquantizedLinearMethod and not down.skip_bias_add and down.bias is None):
            down.quant_method = silu_down_method()
            module.act_fn = PassThrough()
            mlps += 1
    projections = 0
    for module in decoder.modules():
        if isinstance(module, LinearBase) and type(module.quant_method) is UnquantizedLinearMethod:
            module.quant_method = linear_method()
            projections += 1
    logger.info("talker: %d projections and %d MLP gates take small_linear at <= %d rows", projections, mlps,
                talker_small_rows())
    return projections, mlps
