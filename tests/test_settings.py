"""The settings object is the one place of every QWEN3TTS_* setting: each field owns its variable,
flag and help; `serve`'s flags and the README's tables agree with it; the environment round-trips
through it; and no other module of the package reads the environment."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from vllm_qwen3tts.base import settings as S

ROOT = Path(__file__).resolve().parents[1]
# `serve`'s own flags, which start things rather than configure the server process
SERVE_LAUNCH_FLAGS = {"-h", "--help", "--model", "--host", "--port", "--device", "--dtype", "--max-model-len", "--mps"}


@pytest.fixture
def clean_env(monkeypatch):
    """No QWEN3TTS_* variable set, and the process settings read again afterwards."""
    import os

    for name in list(os.environ):
        if name.startswith(S.PREFIX):
            monkeypatch.delenv(name)
    S.set_process_settings(None)
    yield
    S.set_process_settings(None)


def test_every_setting_has_its_variable_help_and_user_settings_a_flag():
    names = []
    for group in S.GROUPS:
        for f in dataclasses.fields(group):
            meta = f.metadata
            assert re.fullmatch(r"QWEN3TTS_[A-Z0-9_]+", meta["env"]), f.name
            assert meta["help"].strip(), f.name
            names.append(meta["env"])
            if group is S.ServerSettings:
                assert meta["flag"] and meta["flag"].startswith("--"), f.name
            else:
                assert meta["flag"] is None, f"{f.name}: debug and tuning settings are variables only"
    assert len(names) == len(set(names)), "a variable names two settings"
    assert S.LAUNCHED_CODEC_WORKERS_ENV not in names


def serve_parser() -> argparse.ArgumentParser:
    from vllm_qwen3tts.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_serve_has_exactly_the_server_settings_flags_with_their_defaults(clean_env):
    serve = serve_parser()
    defaults = S.ServerSettings()
    by_dest = {a.dest: a for a in serve._actions}
    flags = {flag for a in serve._actions for flag in a.option_strings} - SERVE_LAUNCH_FLAGS
    expected = set()
    for f in dataclasses.fields(S.ServerSettings):
        action = by_dest[f.name]
        assert f.metadata["flag"] in action.option_strings, f.name
        assert action.default == getattr(defaults, f.name), f.name
        assert f.metadata["env"] in action.help, f.name
        expected.update(action.option_strings)  # a boolean's --no-... too
    assert flags == expected
    args, rest = serve.parse_known_args([])
    assert S.from_arguments(args) == defaults and rest == []


def test_serve_flags_default_to_the_environment_and_override_it(clean_env, monkeypatch):
    monkeypatch.setenv("QWEN3TTS_MAX_QUEUED_REQUESTS", "7")
    monkeypatch.setenv("QWEN3TTS_CODEC_DEVICES", "cpu,cuda:1")
    monkeypatch.setenv("QWEN3TTS_WARMUP", "0")
    S.set_process_settings(None)
    serve = serve_parser()
    got = S.from_arguments(serve.parse_known_args([])[0])
    assert (got.max_queued_requests, got.codec_devices, got.warmup) == (7, ("cpu", "cuda:1"), False)
    got = S.from_arguments(serve.parse_known_args(["--max-queued-requests", "9", "--codec-device", "cuda",
                                                   "--codec-device", "cpu", "--warmup"])[0])
    # a repeated flag replaces the variable's list rather than adding to it
    assert (got.max_queued_requests, got.codec_devices, got.warmup) == (9, ("cuda", "cpu"), True)


def test_serve_hands_the_server_process_the_settings_it_was_given(clean_env, tiny_checkpoint):
    """`serve` execs vLLM's API server, whose speech plugin reads its settings from the environment
    `serve` hands it: the same settings, whatever vLLM's own arguments."""
    from vllm_qwen3tts.cli import build_parser, serve_command

    args, rest = build_parser().parse_known_args([
        "serve", "--model", str(tiny_checkpoint("0.6b-custom_voice")), "--device", "cpu", "--max-frames", "40",
        "--no-warmup", "--api-key", "k1", "--api-key", "k2", "--codec-device", "cpu", "--write-stall-timeout", "2.5",
        "--max-num-seqs", "4"])
    plan = serve_command(args, rest)
    assert S.load_settings(plan.env).server == S.from_arguments(args)
    assert S.load_settings(plan.env).server.max_frames_per_segment == 40
    assert plan.argv[-2:] == ["--max-num-seqs", "4"]


def test_environment_round_trips():
    server = S.ServerSettings(api_keys=("k1", "k2"), api_keys_file=Path("/tmp/keys.json"), default_max_concurrency=3,
                              voices_dir=Path("/tmp/voices"), allow_url_ref_audio=True, max_frames_per_segment=40,
                              codec_devices=("cpu", "cuda:1"), light_load_streams=0, write_stall_timeout_s=2.5,
                              warmup=False, cache_dir=Path("/tmp/cache"))
    tuning = S.TuningSettings(predictor_kernels="attention,sampler", small_batch_rows=0, compile=False,
                              codec_graphs=False, codec_channels_last=False, stack_samples_dir=Path("/tmp/stacks"),
                              stack_sample_interval_ms=7.5)
    environ = {**S.to_env(server), **S.to_env(tuning)}
    assert S.load_settings(environ) == S.Settings(server, tuning)
    assert S.load_settings({**S.to_env(S.ServerSettings()), **S.to_env(S.TuningSettings())}) == S.Settings()
    assert S.load_settings({}) == S.Settings()  # unset: the defaults
    assert S.load_settings({"QWEN3TTS_MAX_FRAMES": "", "QWEN3TTS_API_KEYS": " , "}) == S.Settings()


def test_values_are_parsed_or_refused_by_name():
    got = S.load_settings({"QWEN3TTS_API_KEYS": " a, b ,", "QWEN3TTS_COMPILE": "false", "QWEN3TTS_WARMUP": "yes"})
    assert got.server.api_keys == ("a", "b") and got.tuning.compile is False and got.server.warmup is True
    with pytest.raises(S.SettingsError, match="QWEN3TTS_MAX_QUEUED_REQUESTS='many'"):
        S.load_settings({"QWEN3TTS_MAX_QUEUED_REQUESTS": "many"})
    with pytest.raises(S.SettingsError, match="QWEN3TTS_CODEC_GRAPHS='maybe': expected 1 or 0"):
        S.load_settings({"QWEN3TTS_CODEC_GRAPHS": "maybe"})


def test_additional_config_names_each_server_setting_as_its_flag_does():
    """Under plain `vllm serve`, `--additional-config '{"qwen3tts": {...}}'` carries the same settings as
    `vllm-qwen3tts serve`'s flags, named as the flags are; an unknown name or a value of the wrong kind is
    refused naming it."""
    names = {S.option_name(f) for f in dataclasses.fields(S.ServerSettings)}
    assert names == {f.metadata["flag"][2:].replace("-", "_") for f in dataclasses.fields(S.ServerSettings)}
    base = S.ServerSettings()
    got = S.with_options(base, {"max_concurrency_per_key": 4, "api_key": ["k1", "k2"], "warmup": False,
                                "write_stall_timeout": 2.5, "codec_device": "cpu", "max_frames": None})
    assert (got.default_max_concurrency, got.api_keys, got.warmup) == (4, ("k1", "k2"), False)
    assert (got.write_stall_timeout_s, got.codec_devices, got.max_frames_per_segment) == (2.5, ("cpu",), None)
    assert S.with_options(base, {}) == base
    with pytest.raises(S.SettingsError, match="qwen3tts.max_concurency_per_key: no such speech setting"):
        S.with_options(base, {"max_concurency_per_key": 4})
    with pytest.raises(S.SettingsError, match="qwen3tts.max_queued_requests"):
        S.with_options(base, {"max_queued_requests": "many"})
    with pytest.raises(S.SettingsError, match="JSON object"):
        S.with_options(base, ["max_queued_requests"])


def test_kernel_choice():
    assert S.TuningSettings().kernel_chosen("talker_linear")
    assert not S.TuningSettings(predictor_kernels="0").kernel_chosen("attention")
    chosen = S.TuningSettings(predictor_kernels="attention, sampler")
    assert chosen.kernel_chosen("sampler") and not chosen.kernel_chosen("linear")


def test_defaults_agree_with_the_engine_and_the_api():
    from vllm_qwen3tts.engine import ChunkSchedule
    from vllm_qwen3tts.base.params import MAX_INPUT_CHARS

    assert S.ServerSettings().light_load_streams == ChunkSchedule.light_load_streams
    assert S.ServerSettings().max_input_chars == MAX_INPUT_CHARS


def readme_table(heading: str) -> list[list[str]]:
    """The rows (cells, backticks removed) of the first table under `heading` in the README."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("#").strip() == heading and line.startswith("#"))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip().replace("`", "") for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # below the header and its rule


def test_readme_tables_match_the_settings():
    rows = {row[1]: row for row in readme_table("Server settings")}
    fields = {f.metadata["env"]: f for f in dataclasses.fields(S.ServerSettings)}
    assert set(rows) == set(fields)
    for env, f in fields.items():
        flag, _, default, meaning = rows[env]
        assert flag == f.metadata["flag"], env
        assert default == S.shown_default(f), env
        assert meaning, env
    rows = {row[0]: row for row in readme_table("Debug and tuning settings")}
    fields = {f.metadata["env"]: f for f in dataclasses.fields(S.TuningSettings)}
    assert set(rows) == set(fields)
    for env, f in fields.items():
        assert rows[env][1] == S.shown_default(f), env


# Outside the settings module: vLLM's and the platform's variables, not settings of ours (file,
# variable, or "*" for the whole environment handed to a child process)
SETTINGS_MODULE = "vllm_qwen3tts/base/settings.py"
ENVIRONMENT_ALLOWED = {
    ("vllm_qwen3tts/cli.py", "*"),  # the environment of the server process it starts
    ("vllm_qwen3tts/cli.py", "CUDA_VISIBLE_DEVICES"),  # `synthesize --device cuda:N`, before vLLM starts
    ("vllm_qwen3tts/mps.py", "*"),  # the environment of NVIDIA's control binary
    ("vllm_qwen3tts/engine.py", "VLLM_CPU_KVCACHE_SPACE"),
    ("vllm_qwen3tts/model/predictor_kernels.py", "TRITON_INTERPRET"),
    ("vllm_qwen3tts/talker/projections.py", "TRITON_INTERPRET"),
}


def environment_uses(path: Path) -> set[str]:
    """The variables `path` reads or writes through os.environ / os.getenv ("*" where not a constant)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    from_os = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module == "os" for alias in node.names}
    found = [node for node in ast.walk(tree)
             if (isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "putenv")
                 and isinstance(node.value, ast.Name) and node.value.id == "os")
             or (isinstance(node, ast.Name) and node.id in from_os & {"environ", "environb", "getenv", "putenv"})]
    names = set()
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in found:
        parent = parents.get(node)
        key = None
        if isinstance(parent, ast.Subscript) and isinstance(parent.slice, ast.Constant):
            key = parent.slice.value
        elif isinstance(parent, ast.Attribute):  # os.environ.get(...), .setdefault(...), .pop(...)
            call = parents.get(parent)
            if isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Constant):
                key = call.args[0].value
        elif isinstance(parent, ast.Call) and parent.func is node and parent.args \
                and isinstance(parent.args[0], ast.Constant):  # os.getenv("X")
            key = parent.args[0].value
        names.add(key if isinstance(key, str) else "*")
    return names


def test_only_the_settings_module_reads_the_environment():
    uses = set()
    for folder in ("vllm_qwen3tts", "codec", "server"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel != SETTINGS_MODULE:
                uses.update((rel, name) for name in environment_uses(path))
    assert not uses - ENVIRONMENT_ALLOWED, "read the setting through vllm_qwen3tts.base.settings instead"
    assert environment_uses(ROOT / SETTINGS_MODULE)  # the check sees the one module that reads it


def test_the_environment_check_sees_every_form_of_read(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('import os\nfrom os import environ\na = os.environ.get("QWEN3TTS_X")\nb = os.getenv("B")\n'
                     'c = environ["C"]\nd = dict(os.environ)\n')
    assert environment_uses(probe) == {"QWEN3TTS_X", "B", "C", "*"}
    probe.write_text('import os\ndef f(environ):\n    return environ.get("A_MAPPING_OF_ITS_OWN")\n')
    assert environment_uses(probe) == set()
