"""`vllm-qwen3tts` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path


def _make_checkpoint(args: argparse.Namespace) -> int:
    import tempfile

    from .tools.checkpoint import make_checkpoint
    from .tools.hub_cache import place_in_hub_cache

    shape = {"shards": args.shards, "extra_speaker": args.extra_speaker}
    if args.hub_id is None:
        if args.out is None:
            print("error: give --out, or --hub-id to write into the Hugging Face cache", file=sys.stderr)
            return 2
        path = make_checkpoint(args.variant, args.scale, args.out, seed=args.seed, **shape)
    else:
        from huggingface_hub import constants

        with tempfile.TemporaryDirectory() as tmp:
            made = make_checkpoint(args.variant, args.scale, Path(tmp) / "ckpt", seed=args.seed, **shape)
            path = place_in_hub_cache(made, args.hub_id, args.out or constants.HF_HUB_CACHE, args.revision)
    print(f"wrote {args.variant} ({args.scale}) checkpoint to {path}")
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    from .engine import DeviceError, Qwen3TTS, SynthesisParams, SynthesisRequest, resolve_device
    from .base.params import PromptError

    if (args.text is None) == (args.text_file is None):
        print("error: give exactly one of --text or --text-file", file=sys.stderr)
        return 2
    texts = [args.text] if args.text is not None else [
        line.strip() for line in Path(args.text_file).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    params = SynthesisParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, subtalker_temperature=args.subtalker_temperature,
        subtalker_top_k=args.subtalker_top_k, subtalker_top_p=args.subtalker_top_p,
        max_frames=args.max_new_tokens, seed=args.seed,
    )
    out = Path(args.out)
    outputs = [out] if len(texts) == 1 else [out.with_name(f"{out.stem}_{i:04d}{out.suffix}") for i in range(len(texts))]
    try:
        device, _ = resolve_device(args.device, args.dtype)
        if device.startswith("cuda:"):
            # vLLM runs its engine on the first GPU it sees (vLLM 0.26 takes no index): this process
            # and its children see only that one, as `serve` does for its server
            os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
            device = "cuda"
        with Qwen3TTS(args.model, revision=args.revision, device=device, dtype=args.dtype,
                      max_model_len=args.max_model_len, enforce_eager=args.enforce_eager) as tts:
            voice = None
            if args.ref_audio:
                voice = tts.clone_voice(Path(args.ref_audio).read_bytes(), args.ref_text, x_vector_only=args.x_vector_only)
            requests = [
                SynthesisRequest(text=t, speaker=args.voice, language=args.language, instructions=args.instructions,
                                 voice=voice, params=params)
                for t in texts
            ]
            results = tts.generate(requests, progress=len(requests) > 1)
    except (PromptError, DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, result in zip(outputs, results):
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), result.audio, result.sample_rate)
        print(f"{path}: {len(result.audio) / result.sample_rate:.2f} s, {len(result.codes)} frames ({result.finish_reason})")
    if args.codes_out:
        codes_out = Path(args.codes_out)
        for i, result in enumerate(results):
            target = codes_out if len(results) == 1 else codes_out.with_name(f"{codes_out.stem}_{i:04d}{codes_out.suffix}")
            np.save(target, result.codes.astype(np.int64))
    return 0


DEFAULT_VARIANT = "1.7b-custom_voice"


def default_checkpoint() -> str:
    """The embedded default model: a tiny random CustomVoice checkpoint, generated once."""
    import os
    from pathlib import Path

    from .tools.checkpoint import make_checkpoint
    from .model.text_tokenizer import cache_dir

    path = cache_dir() / "default-checkpoint" / f"{DEFAULT_VARIANT}-tiny"
    if not (path / "speech_tokenizer" / "model.safetensors").is_file():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        make_checkpoint(DEFAULT_VARIANT, "tiny", tmp, seed=0)
        try:
            os.replace(tmp, path)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        print(f"generated the default checkpoint (random weights, {DEFAULT_VARIANT}, tiny) in {path}")
    return str(Path(path))


@dataclass(frozen=True)
class ServePlan:
    argv: list[str]  # vLLM's OpenAI API server
    env: dict[str, str]
    codec_devices: list[str]  # codec workers to start before it (`codec_launch_devices`)


def serve_command(args: argparse.Namespace, vllm_args: list[str]) -> ServePlan:
    """How `serve` starts: vLLM's OpenAI API server with our plugins and settings, and the codec
    workers started beside it."""
    import os

    from .base.settings import from_arguments, to_env
    from .base.vllm_adapter import API_SERVER_MODULE
    from .engine import DeviceError, resolve_device

    from .base.config import load_tts_config
    from .base.model_source import resolve_checkpoint

    named = args.model or default_checkpoint()
    # a hub id is resolved once, here: vLLM and the codec workers then read the same snapshot
    model = str(resolve_checkpoint(named, option_value(vllm_args, "--revision"),
                                   option_value(vllm_args, "--download-dir")))
    load_tts_config(model)  # clear errors before starting anything
    device, dtype = resolve_device(args.device, args.dtype)
    env = dict(os.environ)
    env["VLLM_PLUGINS"] = ",".join(p for p in ("qwen3_tts", "qwen3_tts_speech",
                                               *[x for x in env.get("VLLM_PLUGINS", "").split(",") if x]) if p)
    server = from_arguments(args)
    codec_devices = list(server.codec_devices)
    for d in codec_devices:
        if d != "cpu" and not (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
            raise DeviceError(f"unknown codec device {d!r}; use cpu, cuda or cuda:N")
    if device.startswith("cuda:"):
        # only that GPU is visible to every process of the server: it is cuda:0 to all of them
        others = [d for d in codec_devices if d.startswith("cuda:") and d != device]
        if others:
            raise DeviceError(f"--device {device} makes only that GPU visible, so --codec-device {others[0]} "
                              "cannot be reached; use --device cuda (vLLM takes GPU 0) to put codec workers "
                              "on other GPUs")
        codec_devices = ["cuda" if d == device else d for d in codec_devices]
        env["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if args.mps:
            raise DeviceError("--mps shares a CUDA GPU between the engine and the codec worker; this server runs on the CPU")
    # the server process (vLLM's, with our plugin) reads its settings from these variables
    env.update(to_env(dataclasses.replace(server, codec_devices=tuple(codec_devices))))
    if model != named and option_value(vllm_args, "--served-model-name") is None:
        vllm_args = [*vllm_args, "--served-model-name", named]  # clients name the model as the user did
    argv = [sys.executable, "-m", API_SERVER_MODULE, "--model", model,
            "--host", args.host, "--port", str(args.port), "--dtype", dtype,
            "--max-model-len", str(args.max_model_len), "--scheduling-policy", "priority",
            # the talker consumes embeddings, not text tokens; with no tokenizer loaded no
            # text route can ask for ids outside its 3072-entry vocabulary
            "--skip-tokenizer-init"]
    if not any(a.startswith("--gpu-memory-utilization") for a in vllm_args):
        if device == "cpu":
            argv += ["--gpu-memory-utilization", "0.1"]
        else:
            # the talker's engine and a codec worker share each GPU unless the codec has its own
            shares_gpu = not codec_devices or any(d in ("cuda", "cuda:0") for d in codec_devices)
            argv += ["--gpu-memory-utilization", f"{engine_memory_share(_gpu_total_bytes(), shares_gpu):.2f}"]
    return ServePlan(argv + vllm_args, env, codec_launch_devices(device, codec_devices, vllm_args))


def option_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in an argument list (`--flag V` or `--flag=V`; the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


# What a codec worker holds on its GPU at the defaults: the decoder, 2 x max_num_seqs stream states
# and the CUDA graph pool, plus room.
CODEC_WORKER_GPU_BYTES = 13 * 2**30
GPU_HEADROOM_BYTES = 2 * 2**30  # CUDA contexts of the processes, fragmentation


def engine_memory_share(total_bytes: int, shares_gpu_with_codec: bool) -> float:
    """vLLM's --gpu-memory-utilization when none is given: all the GPU but what the codec
    worker beside it needs, within [0.3, 0.9] (vLLM's own default is 0.9)."""
    reserved = GPU_HEADROOM_BYTES + (CODEC_WORKER_GPU_BYTES if shares_gpu_with_codec else 0)
    return round(min(0.9, max(0.3, 1 - reserved / total_bytes)), 2)


def _gpu_total_bytes() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


DATA_PARALLEL_FLAGS = ("--data-parallel-size", "-dp", "--data-parallel-size-local", "-dpl")


def codec_launch_devices(device: str, codec_devices: list[str], vllm_args: list[str]) -> list[str]:
    """Where `serve` starts codec workers before vLLM execs: the devices the server would give
    them. None with data parallelism on GPUs and no --codec-device: their GPUs follow vLLM's
    ranks, which only the running server knows, so it starts them itself (after the engine)."""
    if codec_devices:
        return list(codec_devices)
    if device == "cpu":
        return ["cpu"]
    if any(a.split("=")[0] in DATA_PARALLEL_FLAGS for a in vllm_args):
        return []
    return ["cuda"]


def _serve(args: argparse.Namespace, vllm_args: list[str]) -> int:
    import os

    from .base.settings import LAUNCHED_CODEC_WORKERS_ENV, from_arguments, process_settings, set_process_settings
    from .codec.worker import launch_codec_worker, launched_workers_to_env
    from .base.config import CheckpointError
    from .engine import DeviceError
    from .mps import MPSError, start_private_mps

    try:
        # this process's settings are its environment's and its flags (e.g. --cache-dir for the default checkpoint)
        set_process_settings(dataclasses.replace(process_settings(), server=from_arguments(args)))
        plan = serve_command(args, vllm_args)
        argv, env = plan.argv, plan.env
        if args.mps:
            # before any CUDA process starts: they connect to the daemon named in their environment
            env = start_private_mps(env, owner_pid=os.getpid())
            print(f"CUDA MPS control daemon started ({env['CUDA_MPS_PIPE_DIRECTORY']})", flush=True)
    except (CheckpointError, DeviceError, MPSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The codec workers load and compile while vLLM starts its engine (minutes on a GPU with a
    # cold compile cache), instead of after it. They stay our children across the exec below.
    model = argv[argv.index("--model") + 1]
    workers = [launch_codec_worker(model, device, env) for device in plan.codec_devices]
    if workers:
        env[LAUNCHED_CODEC_WORKERS_ENV] = launched_workers_to_env(workers)
        print(f"started codec worker{'s' if len(workers) > 1 else ''} {[w.pid for w in workers]} on "
              f"{[w.device for w in workers]}", flush=True)
    print("starting:", " ".join(argv[1:]), flush=True)
    os.execvpe(argv[0], argv, env)  # vLLM's server owns the process (signals, shutdown) from here


def version_text() -> str:
    """This package's version and the installed vLLM's (read from its metadata: vLLM is not
    imported, so this answers in a moment)."""
    from . import __version__
    from .base.vllm_adapter import installed_vllm_version

    vllm = installed_vllm_version()
    return f"vllm-qwen3tts {__version__} (vLLM {vllm or 'not installed'})"


class _PrintVersion(argparse.Action):
    """`--version`: print `version_text()` and exit 0 (computed only when asked for)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print this package's version and vLLM's, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from .base.settings import add_arguments, process_settings
    from .tools.checkpoint import SCALES, VARIANTS

    parser = argparse.ArgumentParser(prog="vllm-qwen3tts", description=__doc__)
    parser.add_argument("--version", action=_PrintVersion)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the released layout")
    p.add_argument("--variant", required=True, choices=VARIANTS)
    p.add_argument("--scale", required=True, choices=SCALES)
    p.add_argument("--out", help="output directory (with --hub-id: the hub cache, default HF_HUB_CACHE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1,
                   help="the model weights in this many safetensors files with an index, as large releases are")
    p.add_argument("--extra-speaker", metavar="NAME",
                   help="a CustomVoice checkpoint with one more speaker, as Qwen's fine-tuning recipe adds one")
    p.add_argument("--hub-id", metavar="OWNER/NAME",
                   help="lay the checkpoint out in the Hugging Face cache as this repository, as a download "
                        "would leave it (then `--model OWNER/NAME` reads it, also with HF_HUB_OFFLINE=1)")
    p.add_argument("--revision", default="main", help="with --hub-id: the ref that names the snapshot")
    p.set_defaults(func=_make_checkpoint)

    p = sub.add_parser("synthesize", help="text to a WAV file (one utterance, or one per line of --text-file)")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face hub id")
    p.add_argument("--revision", help="of a hub id: branch, tag or commit (default: main)")
    p.add_argument("--text")
    p.add_argument("--text-file", help="one utterance per line; outputs OUT_0000.wav, OUT_0001.wav, ...")
    p.add_argument("--voice", help="CustomVoice preset speaker (e.g. ryan, vivian)")
    p.add_argument("--language", default="auto")
    p.add_argument("--instructions", help="style instructions (CustomVoice 1.7B) or voice description (VoiceDesign)")
    p.add_argument("--ref-audio", help="reference audio to clone (Base checkpoints)")
    p.add_argument("--ref-text", help="transcript of --ref-audio (in-context cloning)")
    p.add_argument("--x-vector-only", action="store_true", help="clone from the speaker embedding only")
    p.add_argument("--temperature", type=float, help="code-0 temperature; 0 = greedy (code predictor too)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--subtalker-temperature", type=float, help="code-predictor temperature; 0 = greedy")
    p.add_argument("--subtalker-top-k", type=int)
    p.add_argument("--subtalker-top-p", type=float)
    p.add_argument("--max-new-tokens", type=int, help="at most this many frames (12.5 per second of audio)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (faster start)")
    p.add_argument("--out", required=True, help="output WAV path")
    p.add_argument("--codes-out", help="also save the codes, [T, 16] int, as .npy")
    p.set_defaults(func=_synthesize)

    p = sub.add_parser("serve", help="OpenAI-compatible speech server (vLLM's API server with our plugins)",
                       epilog="Arguments this command does not know are passed to vLLM's server "
                              "(e.g. --max-num-seqs 128 --gpu-memory-utilization 0.8 --data-parallel-size 2).")
    p.add_argument("--model", help="checkpoint directory or Hugging Face hub id (default: a generated tiny "
                                    "CustomVoice checkpoint); vLLM's --revision and --download-dir apply")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    # the server's settings: one flag each, defaulting to its QWEN3TTS_* variable (base/settings.py)
    add_arguments(p, process_settings().server)
    p.add_argument("--mps", action="store_true",
                   help="run the engine and the codec worker under a CUDA MPS control daemon private to this "
                        "server (started with it, quit after it), so their kernels share the GPU at once "
                        "instead of taking turns; needs nvidia-cuda-mps-control on PATH")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .base.settings import SettingsError

    try:
        parser = build_parser()  # `serve`'s flags default to the environment's settings
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args, rest = parser.parse_known_args(argv)
    if args.func is _serve:
        return _serve(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
