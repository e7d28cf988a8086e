"""Copying checkpoint tensors into modules through an explicit name map, strictly."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import CheckpointError


@dataclass(frozen=True)
class WeightTarget:
    """Where a checkpoint tensor goes: a parameter, or a slice of its first dimension (stacked
    codebooks; fused qkv / gate-up projections, whose checkpoint matrices are separate)."""

    param: str
    index: int | slice | None = None

    def of(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dest = params[self.param]
        return dest if self.index is None else dest[self.index]


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
