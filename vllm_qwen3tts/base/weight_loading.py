"""Reading checkpoint tensors, and copying them into modules through an explicit name map, strictly.

One reader (`read_safetensors`) serves every component. A name map sends each checkpoint tensor to
a parameter (`WeightTarget`); fused projections are filled shard by shard from the checkpoint's
separate matrices through `STACKED_PARAMS`, vLLM's `stacked_params_mapping` table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import CheckpointError


def read_safetensors(path: str | Path, prefix: str = "", *, strip_prefix: bool = False,
                     what: str = "weights") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a safetensors file whose name starts with `prefix`, on the
    CPU in the file's dtype; `strip_prefix` drops the prefix from the names. A checkpoint saved in
    shards has `<path>.index.json` instead of `path` (the Hugging Face layout: a `weight_map` from
    tensor name to shard file); its shards are read in turn. A missing file is a `CheckpointError`
    ("missing {what} {path}"), raised before the first tensor is read."""
    path = Path(path)
    if path.is_file():
        return _tensors([path], prefix, strip_prefix)
    index = path.with_name(path.name + ".index.json")
    if not index.is_file():
        raise CheckpointError(f"missing {what} {path}")
    with open(index, encoding="utf-8") as f:
        weight_map: dict[str, str] = json.load(f).get("weight_map") or {}
    shards = [path.with_name(name) for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"missing {what} shard {shard} (named in {index.name})")
    return _tensors(shards, prefix, strip_prefix)


def _tensors(paths: list[Path], prefix: str, strip_prefix: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in [n for n in f.keys() if n.startswith(prefix)]:  # noqa: SIM118 - a file handle, not a dict
                yield (name[len(prefix):] if strip_prefix else name), f.get_tensor(name)


@dataclass(frozen=True)
class WeightTarget:
    """Where a checkpoint tensor goes: a parameter, or a slice of its first dimension (stacked
    codebooks; fused qkv / gate-up projections, whose checkpoint matrices are separate)."""

    param: str
    index: int | slice | None = None

    def of(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dest = params[self.param]
        return dest if self.index is None else dest[self.index]


# vLLM's `stacked_params_mapping`: (fused parameter, checkpoint matrix, shard id). A fused
# projection holds its checkpoint matrices' rows in this order (q, k, v; gate, up).
STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


def stacked_shard_rows(num_heads: int, num_kv_heads: int, head_dim: int,
                       intermediate_size: int) -> dict[str | int, slice]:
    """The rows of each shard id of `STACKED_PARAMS` in the fused parameters of one geometry."""
    q, kv, inter = num_heads * head_dim, num_kv_heads * head_dim, intermediate_size
    return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv),
            0: slice(0, inter), 1: slice(inter, 2 * inter)}


def stacked_name_map(checkpoint_names: Mapping[str, str],
                     shard_rows: Mapping[str | int, slice]) -> dict[str, WeightTarget]:
    """Checkpoint name -> target, from parameter -> its checkpoint name (a fused parameter named as
    if the checkpoint held it, e.g. `...self_attn.qkv_proj.weight`): a fused parameter is filled
    from its checkpoint matrices (`STACKED_PARAMS`), each into its rows (`shard_rows`)."""
    out: dict[str, WeightTarget] = {}
    for param, checkpoint_name in checkpoint_names.items():
        stem, _, leaf = checkpoint_name.rpartition(".")
        module_stem, _, module = stem.rpartition(".")
        shards = [(part, shard) for fused, part, shard in STACKED_PARAMS if fused == module]
        if not shards:
            out[checkpoint_name] = WeightTarget(param)
        for part, shard in shards:
            out[f"{module_stem}.{part}.{leaf}" if module_stem else f"{part}.{leaf}"] = WeightTarget(param, shard_rows[shard])
    return out


def copy_tensors(
    params: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    name_map: Mapping[str, str | WeightTarget],
    *,
    what: str,
    accept_unmapped: bool | Callable[[str], bool] = True,
) -> set[str]:
    """Copy `tensors[checkpoint_name]` into `params[name_map[checkpoint_name]]` for every entry
    (into that slice of it, where the target is a `WeightTarget`).

    Missing tensors and shape mismatches raise `CheckpointError`; so do checkpoint tensors
    the map does not name, unless `accept_unmapped` allows them (True: the file holds other
    modules' tensors too). Values are cast to each parameter's dtype. Returns the checkpoint
    names consumed.
    """
    missing = sorted(n for n in name_map if n not in tensors)
    if callable(accept_unmapped):
        unexpected = sorted(n for n in tensors if n not in name_map and not accept_unmapped(n))
    else:
        unexpected = [] if accept_unmapped else sorted(n for n in tensors if n not in name_map)
    if missing or unexpected:
        raise CheckpointError(f"{what} weights do not match the config: missing [{abbreviate(missing)}], "
                              f"unexpected [{abbreviate(unexpected)}]")
    with torch.no_grad():
        for checkpoint_name, name in name_map.items():
            tensor = tensors[checkpoint_name]
            param = name.of(params) if isinstance(name, WeightTarget) else params[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{what} weight {checkpoint_name}: checkpoint shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(param.shape)}")
            param.copy_(tensor.to(param.dtype))
    return set(name_map)


def load_mapped(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                mapping: Mapping[str, str | WeightTarget]) -> set[str]:
    """Copy the checkpoint tensors named in `mapping` into `module`'s parameters; the
    stream may hold other modules' tensors too."""
    tensors = {name: t for name, t in weights if name in mapping}
    return copy_tensors(dict(module.named_parameters()), tensors, mapping, what=type(module).__name__)


def abbreviate(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
