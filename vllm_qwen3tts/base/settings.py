"""The package's settings, read from the environment once per process.

Every setting is a field of a frozen dataclass that owns its default, its environment variable
(one prefix: `QWEN3TTS_`), its `vllm-qwen3tts serve` flag where it has one, and its help text.
Two groups:

- `ServerSettings`: what an operator sets (keys, limits, voices, codec devices, ...). Each is a
  `serve` flag and a variable: `vllm-qwen3tts serve` writes the variables of the values it was
  given (`to_env`) into the environment of vLLM's API server, which it starts; under plain
  `vllm serve` the operator sets them. The speech plugin reads them there (`process_settings`).
- `TuningSettings`: debug and tuning switches, variables only. Their defaults are what
  production runs; they act in vLLM's engine core and in the codec workers, which inherit the
  environment of the process that starts them.

No other module of the package reads the environment for a setting of ours: it asks
`process_settings()`, which reads the environment at its first call, never at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

PREFIX = "QWEN3TTS_"
# Not a setting: `vllm-qwen3tts serve` hands the codec workers it launched to the server process.
LAUNCHED_CODEC_WORKERS_ENV = PREFIX + "CODEC_WORKERS"


class SettingsError(ValueError):
    """A variable's value cannot be read as its setting's type."""


def setting(*, env: str, help: str, flag: str | None = None, shown: str | None = None,
            metavar: str | None = None, secret: bool = False) -> dict[str, Any]:
    """The metadata of a dataclass field that is a setting: variable `QWEN3TTS_<env>`, `flag`
    (None: a variable only), help text; `shown`: the default as the README writes it, where the
    default is computed; `secret`: its values are never logged (`settings_line`)."""
    return {"env": PREFIX + env, "flag": flag, "help": help, "shown": shown, "metavar": metavar, "secret": secret}


def _default_voices_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/vllm_qwen3tts/voices"))


@dataclass(frozen=True)
class ServerSettings:
    """The speech server's settings: each a `vllm-qwen3tts serve` flag and a QWEN3TTS_* variable."""

    api_keys: tuple[str, ...] = field(default=(), metadata=setting(
        env="API_KEYS", flag="--api-key", metavar="KEY", secret=True,
        help="an API key (repeat the flag, or a comma list in the variable; one tenant each), required on every "
             "route the server serves but /health, /ready and the docs (vLLM's own routes are not served). It "
             "takes the place of vLLM's --api-key; under plain `vllm serve`, vLLM's --api-key / VLLM_API_KEY "
             "are such keys too. None: no auth"))
    api_keys_file: Path | None = field(default=None, metadata=setting(
        env="API_KEYS_FILE", flag="--api-keys-file", metavar="FILE",
        help='JSON list of {"key", "name", "max_concurrency", "requests_per_minute"} (one tenant per name)'))
    default_max_concurrency: int = field(default=16, metadata=setting(
        env="MAX_CONCURRENCY_PER_KEY", flag="--max-concurrency-per-key", metavar="N",
        help="requests in flight per key; beyond: 429 + Retry-After"))
    default_requests_per_minute: int = field(default=600, metadata=setting(
        env="REQUESTS_PER_MINUTE_PER_KEY", flag="--requests-per-minute-per-key", metavar="N",
        help="token bucket per key; beyond: 429 + Retry-After"))
    max_queued_requests: int = field(default=256, metadata=setting(
        env="MAX_QUEUED_REQUESTS", flag="--max-queued-requests", metavar="N",
        help="requests in flight on the server; beyond: 503"))
    max_input_chars: int = field(default=20_000, metadata=setting(
        env="MAX_INPUT_CHARS", flag="--max-input-chars", metavar="N",
        help="longest `input` a request may carry (at most 20000, the API's own bound)"))
    voices_dir: Path = field(default_factory=_default_voices_dir, metadata=setting(
        env="VOICES_DIR", flag="--voices-dir", metavar="DIR", shown="~/.cache/vllm_qwen3tts/voices",
        help="where saved voices are kept"))
    cache_dir: Path | None = field(default=None, metadata=setting(
        env="CACHE_DIR", flag="--cache-dir", metavar="DIR",
        help="where generated files are kept (the text tokenizer's files, the default checkpoint); "
             "none: $XDG_CACHE_HOME/vllm_qwen3tts, else ~/.cache/vllm_qwen3tts"))
    allow_url_ref_audio: bool = field(default=False, metadata=setting(
        env="ALLOW_URL_REF_AUDIO", flag="--allow-url-ref-audio",
        help="let `ref_audio` be a public http(s) URL (private and loopback addresses are always refused)"))
    max_ref_audio_bytes: int = field(default=10 * 1024 * 1024, metadata=setting(
        env="MAX_REF_AUDIO_BYTES", flag="--max-ref-audio-bytes", metavar="N",
        help="largest reference audio (upload or URL); beyond: 413"))
    max_frames_per_segment: int | None = field(default=None, metadata=setting(
        env="MAX_FRAMES", flag="--max-frames", metavar="N",
        help="cap on generated frames per sentence (a runaway guard); none: the model's room"))
    codec_devices: tuple[str, ...] = field(default=(), metadata=setting(
        env="CODEC_DEVICES", flag="--codec-device", metavar="DEVICE",
        help="run a codec worker on this device, cpu, cuda or cuda:N (repeat the flag, or a comma list in the "
             "variable; streams are spread over them). None: beside the talker, or one on each data-parallel "
             "rank's GPU"))
    codec_streams: int | None = field(default=None, metadata=setting(
        env="CODEC_STREAMS", flag="--codec-streams", metavar="N",
        help="audio decoding stream slots of each codec worker (a request holds one while it is synthesized); "
             "with every slot taken, new requests get 503 codec_busy before any audio and /ready says 503. "
             "None: max(64, 2 x --max-num-seqs)"))
    light_load_streams: int = field(default=32, metadata=setting(
        env="LIGHT_LOAD_STREAMS", flag="--light-load-streams", metavar="N",
        help="a request arriving while at most N streams are being synthesized gets a first audio chunk of 1 "
             "frame instead of 2 (one talker step sooner); 0: always 2. A request's "
             "initial_codec_chunk_frames overrides it"))
    write_stall_timeout_s: float = field(default=30.0, metadata=setting(
        env="WRITE_STALL_TIMEOUT_S", flag="--write-stall-timeout", metavar="SECONDS",
        help="end a streamed response (HTTP or WebSocket), and its synthesis, whose client has taken no "
             "audio for this long (it stopped reading)"))
    websocket_idle_timeout_s: float = field(default=300.0, metadata=setting(
        env="WEBSOCKET_IDLE_TIMEOUT_S", flag="--websocket-idle-timeout", metavar="SECONDS",
        help="a WebSocket session that sends nothing for this long while nothing is being spoken for it "
             "gets an idle_timeout error and is closed, its requests freed (a session may ask for less: "
             "idle_timeout_s in session.config)"))
    warmup: bool = field(default=True, metadata=setting(
        env="WARMUP", flag="--warmup",
        help="synthesize one short request at start, before /ready says ready"))
    shutdown_grace_s: float = field(default=30.0, metadata=setting(
        env="SHUTDOWN_GRACE_S", flag="--shutdown-grace", metavar="SECONDS",
        help="on SIGTERM (or SIGINT), how long the requests, streams and WebSocket sessions in flight may "
             "take to finish while new ones get 503 and /ready says 503; then those left are ended, and "
             "the server exits with status 0"))

    # Fixed, not settings.
    max_segment_chars: ClassVar[int] = 300  # longest sentence segment synthesized as one request
    ref_audio_fetch_timeout_s: ClassVar[float] = 10.0


@dataclass(frozen=True)
class TuningSettings:
    """Debug and tuning switches: QWEN3TTS_* variables, no flags. The defaults are the product."""

    predictor_kernels: str = field(default="1", metadata=setting(
        env="PREDICTOR_KERNELS",
        help="the Triton kernels in use on a GPU: 1 all, 0 none (PyTorch and cuBLAS), or a comma list of "
             "attention, sampler, linear (the code predictor's) and talker_linear (the talker's projections)"))
    small_batch_rows: int = field(default=2, metadata=setting(
        env="SMALL_BATCH_ROWS",
        help="batches of up to this many rows run the code predictor's layers as fused Triton kernels and "
             "the talker's projections as one Triton kernel each instead of cuBLAS; 0: never"))
    compile: bool = field(default=True, metadata=setting(
        env="COMPILE", help="torch.compile the code predictor and the codec decoder (0: eager, faster start)"))
    codec_graphs: bool = field(default=True, metadata=setting(
        env="CODEC_GRAPHS", help="capture the codec decoder as CUDA graphs"))
    codec_channels_last: bool = field(default=True, metadata=setting(
        env="CODEC_CHANNELS_LAST",
        help="run the codec decoder's convolutions on channels-last tensors on a GPU "
             "(0: their [batch, channels, time] layout)"))
    stack_samples_dir: Path | None = field(default=None, metadata=setting(
        env="STACK_SAMPLES_DIR",
        help="every process writes sampled Python stacks here (benchmarks/fold_stacks.py summarises them)"))
    stack_sample_interval_ms: float = field(default=5.0, metadata=setting(
        env="STACK_SAMPLE_INTERVAL_MS", help="time between two stack samples"))

    def kernel_chosen(self, kernel: str) -> bool:
        """Whether `predictor_kernels` chooses `kernel` ("attention", "sampler", "linear", "talker_linear")."""
        chosen = self.predictor_kernels.replace(" ", "")
        return chosen == "1" or kernel in chosen.split(",")


@dataclass(frozen=True)
class Settings:
    """One process's settings."""

    server: ServerSettings = field(default_factory=ServerSettings)
    tuning: TuningSettings = field(default_factory=TuningSettings)


GROUPS = (ServerSettings, TuningSettings)


# ------------------------------------------------------------------------------ the environment

def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings the environment (default: this process's) gives; an unset or empty variable
    leaves its default. Raises SettingsError for a value its type cannot take."""
    environ = os.environ if environ is None else environ
    return Settings(server=_from_env(ServerSettings, environ), tuning=_from_env(TuningSettings, environ))


def to_env(group: ServerSettings | TuningSettings) -> dict[str, str]:
    """Every setting of `group` as its variable (`load_settings` reads them back to `group`)."""
    return {f.metadata["env"]: format_value(getattr(group, f.name)) for f in dataclasses.fields(group)}


_process_settings: Settings | None = None


def process_settings() -> Settings:
    """This process's settings, read from its environment at the first call."""
    global _process_settings
    if _process_settings is None:
        _process_settings = load_settings()
    return _process_settings


def set_process_settings(settings: Settings | None) -> None:
    """Replace this process's settings (None: read the environment again at the next call)."""
    global _process_settings
    _process_settings = settings


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vllm_qwen3tts, else ~/.cache/vllm_qwen3tts."""
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "vllm_qwen3tts"


def launched_codec_workers(environ: Mapping[str, str] | None = None) -> str:
    """The codec workers `vllm-qwen3tts serve` launched for this server, as it wrote them (JSON)."""
    return (os.environ if environ is None else environ).get(LAUNCHED_CODEC_WORKERS_ENV, "")


def _from_env(cls: type, environ: Mapping[str, str]):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        text = environ.get(f.metadata["env"], "").strip()
        if text:
            values[f.name] = parse_value(hints[f.name], text, f.metadata["env"])
    return cls(**values)


def _optional(kind: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a hint like `int | None`."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], True
    return kind, False


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_value(kind: Any, text: str, name: str = "value") -> Any:
    """`text` (a variable's value) as a setting of type `kind`."""
    kind, _ = _optional(kind)
    try:
        if kind is bool:
            if text.lower() in TRUE:
                return True
            if text.lower() in FALSE:
                return False
            raise ValueError
        if kind == tuple[str, ...]:
            return tuple(v.strip() for v in text.split(",") if v.strip())
        return kind(text)
    except ValueError:
        expected = "1 or 0" if kind is bool else getattr(kind, "__name__", str(kind))
        raise SettingsError(f"{name}={text!r}: expected {expected}") from None


def format_value(value: Any) -> str:
    """A setting's value as its variable holds it ("" for None)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def settings_line(group: ServerSettings | TuningSettings) -> str:
    """Every setting of `group` as `name=value` on one line, for the log; a secret setting's
    values are masked (`api_keys=<2 masked>`), so the line can go wherever logs go."""
    parts = []
    for f in dataclasses.fields(group):
        value = getattr(group, f.name)
        if f.metadata["secret"] and value:
            count = len(value) if isinstance(value, tuple) else 1
            parts.append(f"{f.name}=<{count} masked>")
        else:
            parts.append(f"{f.name}={format_value(value) or 'none'}")
    return " ".join(parts)


def shown_default(f: dataclasses.Field) -> str:
    """A setting's default as the README's tables write it ("none" for no value)."""
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    return format_value(f.default) or "none"


# ------------------------------------------------------------------------------ the command line

class _Repeated(argparse.Action):
    """A repeatable flag whose values replace its default (from the environment) at first use."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (() if current is self.default else tuple(current)) + (values,))


def add_arguments(parser: argparse.ArgumentParser, defaults: ServerSettings) -> None:
    """One flag per server setting, defaulting to `defaults` (the environment's, for `serve`)."""
    hints = typing.get_type_hints(ServerSettings)
    for f in dataclasses.fields(ServerSettings):
        meta, value = f.metadata, getattr(defaults, f.name)
        kind, _ = _optional(hints[f.name])
        shown = format_value(value) or "none"
        help_text = f"{meta['help']} ({meta['env']}; default: {shown})".replace("%", "%%")
        common = {"dest": f.name, "default": value, "help": help_text}
        if kind is bool:  # --flag / --no-flag
            parser.add_argument(meta["flag"], action=argparse.BooleanOptionalAction, **common)
        elif kind == tuple[str, ...]:
            parser.add_argument(meta["flag"], action=_Repeated, metavar=meta["metavar"], **common)
        else:
            parser.add_argument(meta["flag"], type=kind, metavar=meta["metavar"], **common)


def from_arguments(args: argparse.Namespace) -> ServerSettings:
    """The server settings parsed by `add_arguments`' flags."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings)}
    return ServerSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})



# ------------------------------------------------------------------------------ vLLM's --additional-config

ADDITIONAL_CONFIG_KEY = "qwen3tts"  # `vllm serve ID --additional-config '{"qwen3tts": {...}}'`


def option_name(f: dataclasses.Field) -> str:
    """A server setting's name in `--additional-config`: its flag without dashes
    (`--max-concurrency-per-key` -> `max_concurrency_per_key`)."""
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def with_options(settings: ServerSettings, options: Mapping[str, Any]) -> ServerSettings:
    """`settings` with the values of `options` (`{option_name: JSON value}`: what
    `--additional-config '{"qwen3tts": {...}}'` carries under plain `vllm serve`) in place of
    theirs. Raises SettingsError naming an unknown option or a value its setting cannot take."""
    if not isinstance(options, Mapping):
        raise SettingsError(f"--additional-config {ADDITIONAL_CONFIG_KEY!r} must be a JSON object of speech "
                            f"settings, not {type(options).__name__}")
    hints = typing.get_type_hints(ServerSettings)
    fields = {option_name(f): f for f in dataclasses.fields(ServerSettings)}
    values = {}
    for name, raw in options.items():
        f = fields.get(name)
        if f is None:
            raise SettingsError(f"--additional-config {ADDITIONAL_CONFIG_KEY}.{name}: no such speech setting; "
                                f"known: {', '.join(sorted(fields))}")
        if raw is None:
            values[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
            continue
        if isinstance(raw, list):
            text = ",".join(str(v) for v in raw)
        elif isinstance(raw, bool):
            text = "1" if raw else "0"
        else:
            text = str(raw)
        values[f.name] = parse_value(hints[f.name], text, f"--additional-config {ADDITIONAL_CONFIG_KEY}.{name}")
    return dataclasses.replace(settings, **values)


__all__ = [
    "ADDITIONAL_CONFIG_KEY", "GROUPS", "LAUNCHED_CODEC_WORKERS_ENV", "PREFIX", "ServerSettings", "Settings", "SettingsError", "TuningSettings",
    "add_arguments", "default_cache_dir", "format_value", "from_arguments", "launched_codec_workers",
    "load_settings", "option_name", "parse_value", "process_settings", "set_process_settings", "setting", "settings_line", "shown_default",
    "to_env", "with_options",
]
