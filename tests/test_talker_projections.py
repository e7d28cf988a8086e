"""The talker's vLLM linear layers with the small-batch method, and vLLM's MLP with its SiLU gate
moved into the down projection, compute what vLLM's own path computes, take `small_linear` exactly
at the rows it is meant for, and stay one traced graph for every batch size (the choice is made
inside the custom op, not by a guard in the traced forward).

The Triton kernel runs under Triton's interpreter here (TRITON_INTERPRET=1 must be set before the
kernel is defined, hence a child process); on a GPU the same layers run compiled in the engine,
checked end to end by `benchmarks/talker_gpu_check.py`. Run as a script, this file does the
checks itself: `python tests/test_talker_projections.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def build_layers(device: str, dtype: torch.dtype):
    """vLLM's QKV, output, gate/up and down projections (a Qwen3 layer's four) and a Qwen3 MLP, tiny,
    random, in a one-process 'distributed' setup, with the small-batch methods swapped in."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                                   RowParallelLinear)
    from vllm.model_executor.models.qwen3 import Qwen3MLP

    from vllm_qwen3tts.talker.projections import use_small_batch_projections

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        ensure_model_parallel_initialized(1, 1)
        # widths that are not powers of two: the kernel's masked edges
        layers = torch.nn.ModuleDict(dict(
            qkv=QKVParallelLinear(96, 32, 4, 2, bias=False),
            o=RowParallelLinear(128, 96, bias=False),
            gate_up=MergedColumnParallelLinear(96, [80, 80], bias=False),
            down=RowParallelLinear(80, 96, bias=False),
            mlp=Qwen3MLP(96, 80, "silu"),
        ))
        torch.manual_seed(0)
        for layer in layers.modules():
            if hasattr(layer, "weight"):
                with torch.no_grad():
                    layer.weight.normal_(0, layer.weight.shape[1] ** -0.5)
        swapped = use_small_batch_projections(layers)
    return layers.to(device=device, dtype=dtype), swapped


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    import torch._dynamo

    import vllm_qwen3tts.talker.projections as projections

    layers, swapped = build_layers(device, dtype)
    assert swapped == (5, 1), swapped  # the four, the MLP's gate_up; the MLP's gate with its down
    mlp = layers["mlp"]
    calls = []
    real = projections.small_linear
    projections.small_linear = lambda x, w, **kw: calls.append(x.shape[0]) or real(x, w, **kw)

    def inputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        wide = {name: torch.cat((x, -x), dim=1)[:, : layers[name].input_size] for name in ("o", "down")}
        return dict(qkv=x, gate_up=x, mlp=x, **wide)

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return [mlp(x) if name == "mlp" else layers[name](inputs(x)[name])[0] for name in layers]

    def expected(x: torch.Tensor) -> list[torch.Tensor]:
        linear = torch.nn.functional.linear
        gate, up = linear(x, mlp.gate_up_proj.weight).chunk(2, dim=-1)
        out = [linear(inputs(x)[name], layers[name].weight) for name in ("qkv", "o", "gate_up", "down")]
        return out + [linear(torch.nn.functional.silu(gate) * up, mlp.down_proj.weight)]

    # One trace for every size, as vLLM compiles; Dynamo itself specialises a size of 1 (vLLM
    # replays its general graph there without Dynamo's guards), so 1 row runs uncompiled.
    torch._dynamo.config.error_on_recompile = True
    compiled = torch.compile(forward, backend="aot_eager", dynamic=True, fullgraph=True)
    worst = 0.0
    for rows, run in ((2, compiled), (5, compiled), (3, compiled), (1, forward)):
        x = torch.randn(rows, 96, device=device, dtype=dtype)
        calls.clear()
        with torch.no_grad():
            got, want = run(x), expected(x)
        small = rows <= projections.talker_small_rows()  # 0 where the talker's kernels are switched off
        assert calls == ([rows] * 6 if small else []), f"{rows} rows took small_linear {len(calls)} times"
        for name, a, b in zip(layers, got, want):
            assert a.shape == b.shape, (name, a.shape, b.shape)
            diff = (a.float() - b.float()).abs().max().item()
            assert diff < (1e-5 if dtype == torch.float32 else 2e-2), f"{name} at {rows} rows differs by {diff} ({dtype})"
            worst = max(worst, diff)
    torch._dynamo.reset()
    return (f"{device} {str(dtype).removeprefix('torch.')} projections max diff {worst:.3g}; small_linear at <= "
            f"{projections.small_batch_rows()} rows; one graph")


def test_small_batch_method_matches_cublas_path_and_keeps_one_graph():
    pytest.importorskip("triton", reason="Triton is not installed with this build of torch")
    env = dict(os.environ, TRITON_INTERPRET="1", QWEN3TTS_SMALL_BATCH_ROWS="2")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "one graph" in done.stdout


def test_switched_off_ops_take_the_cublas_path():
    """With the talker's kernels switched off the ops themselves compute with PyTorch's linear (a graph
    from vLLM's compile cache may call them whatever the environment says now)."""
    pytest.importorskip("triton", reason="Triton is not installed with this build of torch")
    env = dict(os.environ, TRITON_INTERPRET="1", QWEN3TTS_SMALL_BATCH_ROWS="2",
               QWEN3TTS_PREDICTOR_KERNELS="attention,sampler,linear")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "one graph" in done.stdout


def test_cpu_build_keeps_vllm_projections():
    """On the CPU build vLLM packs the weights for oneDNN; the talker must not swap its methods."""
    from vllm_qwen3tts.talker.projections import small_batch_projections_enabled

    assert not small_batch_projections_enabled()


@pytest.mark.gpu
def test_small_batch_method_on_gpu():
    done = subprocess.run([sys.executable, __file__, "cuda"], env=dict(os.environ, QWEN3TTS_SMALL_BATCH_ROWS="2"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


if __name__ == "__main__":
    if (sys.argv[1] if len(sys.argv) > 1 else "cpu") == "cuda":
        print(check("cuda", torch.float32))
        print(check("cuda", torch.bfloat16))
    else:
        print(check())
