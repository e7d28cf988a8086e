"""The package's layers, and that no import runs back up them.

    base/ (foundations: checkpoint config, settings, request bounds, weight loading, the vLLM adapter)
      -> model/ (model pieces in plain PyTorch) and tools/ (checkpoint generation, profiling)
      -> talker/ (vLLM glue only) and codec/ (the speech tokenizer and its worker)
      -> synthesis (a request -> talker frames -> audio chunks)
      -> server/ (the OpenAI-compatible speech server)
      -> the public API: engine (Qwen3TTS, start_engine), cli, mps

A module may import its own layer and the layers below it, never one above: the server may use
synthesis, synthesis never the server. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE_DIRS = {"vllm_qwen3tts": ROOT / "vllm_qwen3tts", "vllm_qwen3tts.codec": ROOT / "codec",
                "vllm_qwen3tts.server": ROOT / "server"}
LAYERS = {  # module (or subpackage) prefix -> rank; the longest matching prefix decides
    "vllm_qwen3tts.base": 0,
    "vllm_qwen3tts.model": 1,
    "vllm_qwen3tts.tools": 1,
    "vllm_qwen3tts.talker": 2,
    "vllm_qwen3tts.codec": 2,
    "vllm_qwen3tts.synthesis": 3,
    "vllm_qwen3tts.server": 4,
    "vllm_qwen3tts.engine": 5,
    "vllm_qwen3tts.cli": 5,
    "vllm_qwen3tts.mps": 5,
    "vllm_qwen3tts": 5,  # the package's __init__
}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (codec/ and server/ under it)."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            if package == "vllm_qwen3tts" and path.relative_to(folder).parts[0] in ("codec", "server"):
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def imported_modules(name: str, path: Path) -> set[str]:
    """Our modules that `name` imports (absolute or relative, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # `from .base import settings`
    known = modules()
    return {m for m in found if m in known}


def test_every_module_has_a_layer():
    assert all(layer(m) is not None for m in modules())
    flat = sorted(m for m in modules() if m.count(".") == 1 and layer(m) == LAYERS["vllm_qwen3tts"]
                  and m not in LAYERS)
    assert flat == [], f"modules at the package's top that belong in a layer's subpackage: {flat}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_import_runs_up_the_layers(name):
    path = modules()[name]
    upward = sorted(m for m in imported_modules(name, path) if layer(m) > layer(name))
    assert upward == [], f"{name} (layer {layer(name)}) imports from a higher layer: {upward}"


def test_the_check_notices_an_upward_import(tmp_path):
    """The scan itself: a model piece importing the server is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..server import routes\n")
    found = imported_modules("vllm_qwen3tts.model.probe", probe)
    assert "vllm_qwen3tts.server.routes" in found
    assert layer("vllm_qwen3tts.server.routes") > layer("vllm_qwen3tts.model.probe")
