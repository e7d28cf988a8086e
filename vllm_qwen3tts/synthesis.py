"""Speech synthesis from a running talker engine and codec: `TTSEngine`.

The asyncio core shared by the public API (`engine.Qwen3TTS`), the CLI and the server: it turns a
`SynthesisRequest` into a talker prompt and sampling parameters, streams the talker's frames out of
vLLM, and has the codec worker turn them into 24 kHz audio chunk by chunk (a small first chunk for
a quick first sound, then larger ones). Cancelling the stream aborts the vLLM request and frees the
codec state. It starts nothing: `engine.start_engine` builds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .base.config import GenerationDefaults, TTSConfig, load_tts_config
from .base.params import (LARGEST_CHUNK_FRAMES, MAX_NEW_TOKENS, MIN_NEW_TOKENS, REPETITION_PENALTY, SEED,
                     SUBTALKER_TEMPERATURE, SUBTALKER_TOP_K, SUBTALKER_TOP_P, TEMPERATURE, TOP_K, TOP_P, ParamError,
                     PromptTooLong)
from .model.prompt import PromptError, SpeechRequest, build_prompt
from .talker.protocol import (Code0Params, SubtalkerParams, TalkerRequest, frames_from_output, hold_token_id,
                              talker_sampling_params)

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 1920
MAX_PROMPT_POSITIONS = 4096  # the talker's per-request buffers (talker.model.MAX_PROMPT_POSITIONS)
# Frame budget of a request that sets none: generous for real speech, a bound on runaways.
FRAMES_PER_TEXT_TOKEN_BUDGET = 16
DEFAULT_MIN_FRAME_BUDGET = 100
# The request parameters `resolve_params` checks, as `SynthesisParams` fields (`Bound.engine_name`).
ENGINE_BOUNDS = (TEMPERATURE, TOP_K, TOP_P, REPETITION_PENALTY, SUBTALKER_TEMPERATURE, SUBTALKER_TOP_K,
                 SUBTALKER_TOP_P, MAX_NEW_TOKENS, MIN_NEW_TOKENS, SEED)


# Releases of ended streams still running (`run_to_completion`): referenced until they finish,
# since the event loop keeps only weak references to tasks.
_RELEASING: set[asyncio.Task] = set()


async def run_to_completion(release: Coroutine[Any, Any, None]) -> None:
    """Run `release` to its end in a task of its own and wait for it. A cancellation of the
    caller ends the wait, not the release: under Starlette, a client's disconnect cancels the
    response again at every await, which would cut an inline cleanup short at its first one."""
    task = asyncio.ensure_future(release)
    _RELEASING.add(task)
    task.add_done_callback(_RELEASING.discard)
    await asyncio.shield(task)


@dataclass(frozen=True)
class VoiceProfile:
    """A cloned voice: what a Base checkpoint conditions on (computed once per voice)."""

    xvector: list[float]
    ref_codes: list[list[int]] | None = None  # None: x-vector only
    ref_text: str | None = None


@dataclass(frozen=True)
class SynthesisParams:
    """Sampling for one request; None fields take the checkpoint's generation_config.json.

    temperature 0 means greedy for code 0 and, unless its own fields say otherwise,
    for the code predictor too.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    subtalker_temperature: float | None = None
    subtalker_top_k: int | None = None
    subtalker_top_p: float | None = None
    max_frames: int | None = None  # frames at most (12.5 per second); None: 16 per prompt token, >= 100
    min_frames: int = 2  # EOS is masked before this many frames (= max_frames forces the length)
    seed: int | None = None


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    speaker: str | None = None  # CustomVoice preset speaker
    language: str = "auto"
    instructions: str | None = None
    voice: VoiceProfile | None = None  # Base: a cloned voice
    non_streaming_mode: bool | None = None
    params: SynthesisParams = field(default_factory=SynthesisParams)
    first_chunk_frames: int | None = None  # streaming: frames of the first chunk (None: the engine's schedule)


@dataclass(frozen=True)
class ChunkSchedule:
    """Frames per codec call: a small first chunk for time-to-first-audio, then growing.

    While few streams are being synthesized the first chunk is a single frame: it comes one
    talker step sooner, and the codec answers the next chunk within the 80 ms that frame plays.
    Under heavy load the codec's answer takes longer than that, so the first chunk carries two
    frames."""

    first: int = 2
    growth: float = 2.0
    largest: int = LARGEST_CHUNK_FRAMES  # the bound of the request's initial_codec_chunk_frames
    light_load_first: int = 1
    light_load_streams: int = 32  # at most this many streams synthesizing, this one included

    def for_load(self, active_streams: int) -> "ChunkSchedule":
        """The schedule for a request that arrives while `active_streams` are synthesizing (itself included)."""
        if active_streams <= self.light_load_streams:
            return replace(self, first=self.light_load_first)
        return self

    def sizes(self) -> Iterator[int]:
        size = float(self.first)
        while True:
            yield int(size)
            size = min(size * self.growth, self.largest)

    def starting_at(self, first: int | None) -> "ChunkSchedule":
        """This schedule with another first chunk (None: unchanged); ValueError outside [1, largest]."""
        if first is None:
            return self
        if not 1 <= first <= self.largest:
            raise ValueError(f"the first chunk must have between 1 and {self.largest} frames, got {first}")
        return replace(self, first=first)

    def distinct_sizes(self) -> tuple[int, ...]:
        """Every chunk length this schedule sends (the codec worker captures CUDA graphs for them)."""
        seen: list[int] = []
        for size in self.sizes():
            if size in seen:
                return tuple(sorted(seen))
            seen.append(size)


@dataclass
class AudioChunk:
    audio: np.ndarray  # float32 PCM at 24 kHz
    codes: np.ndarray  # [n, 16] int frames this chunk was decoded from
    finish_reason: str | None = None  # set on the last chunk: "stop" (EOS) or "length"


@dataclass
class SynthesisResult:
    codes: np.ndarray  # [T, 16] int
    audio: np.ndarray  # float32 PCM at 24 kHz
    sample_rate: int
    finish_reason: str  # "stop" (EOS) or "length" (frame budget)


class _BudgetSpent(Exception):
    """An incremental request has made every frame its budget allows: it ends ("length")."""



def sampling_with_defaults(p: SynthesisParams, g: GenerationDefaults) -> tuple[Code0Params, SubtalkerParams, int]:
    """A request's sampling with `generation_config.json`'s defaults filled in as the official
    code fills them (a value the request gives wins; `do_sample: false` makes code 0 greedy,
    `subtalker_dosample: false` the code predictor), plus one rule of ours: a request's
    temperature 0 makes the code predictor greedy too unless it names its own temperature.
    Returns (code 0's, the code predictor's, the most frames)."""
    def pick(value, default):
        return default if value is None else value

    code0 = Code0Params(
        temperature=float(pick(p.temperature, g.temperature if g.do_sample else 0.0)),
        top_k=int(pick(p.top_k, g.top_k)),
        top_p=float(pick(p.top_p, g.top_p)),
        repetition_penalty=float(pick(p.repetition_penalty, g.repetition_penalty)),
    )
    sub_default_t = 0.0 if (p.temperature == 0 or not g.subtalker_dosample) else g.subtalker_temperature
    sub = SubtalkerParams(
        temperature=float(pick(p.subtalker_temperature, sub_default_t)),
        top_k=int(pick(p.subtalker_top_k, g.subtalker_top_k)),
        top_p=float(pick(p.subtalker_top_p, g.subtalker_top_p)),
    )
    # the reference's max_new_tokens counts its final, unexpanded sample
    return code0, sub, int(pick(p.max_frames, g.max_new_tokens - 1))


class TTSEngine:
    def __init__(self, engine_client: Any, codec: Any, model_dir: str | Path, max_model_len: int,
                 chunk_schedule: ChunkSchedule = ChunkSchedule()):
        from .model.text_tokenizer import load_text_tokenizer

        self.engine = engine_client
        self.codec = codec
        self.model_dir = Path(model_dir)
        self.config: TTSConfig = load_tts_config(model_dir)
        self.tokenizer = load_text_tokenizer(model_dir)
        self.max_model_len = max_model_len
        self.chunk_schedule = chunk_schedule
        self.active_streams = 0  # requests inside stream(): the load the first chunk adapts to
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests

    def prepare(self, req: SynthesisRequest, tokens: tuple[list[int], list[int]] | None = None,
                input_closed: bool = True, frames_done: int = 0):
        """(TokensPrompt, SamplingParams) for the talker; raises PromptError on bad input: `ParamError`
        for a parameter out of its bounds (`params.BOUNDS`), `PromptTooLong` for a prompt that leaves
        the model no room for a frame. An incremental request's turn (`stream_text`) passes its
        committed `tokens`, whether its input is closed, and how many frames it has made."""
        from .base.vllm_adapter import TokensPrompt

        cfg = self.config
        try:
            self.chunk_schedule.starting_at(req.first_chunk_frames)
        except ValueError as e:
            raise ParamError(str(e), param="initial_codec_chunk_frames") from None
        code0, sub, max_frames = self.resolve_params(req.params)
        voice = req.voice
        recipe = build_prompt(cfg, self.tokenizer, SpeechRequest(
            text=req.text, language=req.language or "auto", speaker=req.speaker, instructions=req.instructions,
            ref_text=voice.ref_text if voice else None, ref_codes=voice.ref_codes if voice else None,
            xvector=voice.xvector if voice else None, non_streaming_mode=req.non_streaming_mode,
        ), tokens=tokens, input_closed=input_closed)
        # The talker's prompt buffers hold MAX_PROMPT_POSITIONS; every frame takes one more position.
        most = min(self.max_model_len - 1, MAX_PROMPT_POSITIONS)
        if len(recipe) > most:
            raise PromptTooLong(f"input too long: the prompt needs {len(recipe)} positions, at most {most} leave "
                                "room for audio; shorten the input (or the instructions or the reference)",
                                positions=len(recipe), most=most)
        room = self.max_model_len - len(recipe)
        if req.params.max_frames is None:
            # A model that never says EOS would talk until the context is full (minutes of
            # audio per sentence). Speech runs at ~2-5 frames per text token; allow ~4x that.
            text_tokens = (len(tokens[1]) if tokens is not None
                           else len(self.tokenizer(req.text, add_special_tokens=False)["input_ids"]))
            max_frames = min(max_frames, max(DEFAULT_MIN_FRAME_BUDGET, FRAMES_PER_TEXT_TOKEN_BUDGET * text_tokens))
        max_frames = min(max_frames, room)  # the model's room caps any request
        # EOS never among the first two samples (as the reference); a minimum above the maximum is the maximum
        min_frames = min(max(2, req.params.min_frames), max_frames)
        incremental = tokens is not None
        treq = TalkerRequest(recipe, sub, seed=req.params.seed, input_closed=input_closed, incremental=incremental,
                             min_frames=min_frames if incremental else 0)
        # a later turn of an incremental request counts its frames anew (vLLM moves them into the prompt)
        if frames_done >= max_frames:
            raise _BudgetSpent()
        sp = talker_sampling_params(treq, code0, max_frames - frames_done, cfg.talker.codec_eos_id,
                                    seed=req.params.seed, min_frames=min_frames,
                                    hold_id=hold_token_id(cfg.talker) if incremental else None)
        prompt = TokensPrompt(prompt_token_ids=[cfg.talker.codec_pad_id] * len(recipe), cache_salt=treq.cache_salt())
        return prompt, sp

    def resolve_params(self, p: SynthesisParams) -> tuple[Code0Params, SubtalkerParams, int]:
        """The request's sampling with the checkpoint's defaults filled in, every value checked
        against the request parameter bounds the HTTP schema states (`params.BOUNDS`): ParamError
        naming the `SynthesisParams` field and its range otherwise."""
        for bound in ENGINE_BOUNDS:
            field_name = bound.engine_name or bound.name
            value = getattr(p, field_name)
            if value is not None:
                bound.check(value, field_name)
        code0, sub, max_frames = sampling_with_defaults(p, self.config.generation)
        # the checkpoint's own defaults must be usable too
        for bound, value in ((TEMPERATURE, code0.temperature), (TOP_K, code0.top_k), (TOP_P, code0.top_p),
                             (REPETITION_PENALTY, code0.repetition_penalty)):
            bound.check(value)
        sub.validate()
        MAX_NEW_TOKENS.check(max_frames, "max_frames")
        return code0, sub, max_frames

    # ------------------------------------------------------------------ synthesis

    async def stream(self, req: SynthesisRequest, request_id: str | None = None,
                     priority: int = 0) -> AsyncIterator[AudioChunk]:
        """Audio chunks as frames are generated. The last chunk carries the finish reason
        (it may hold no audio if the talker stopped right after a chunk boundary)."""
        prompt, sp = self.prepare(req)
        request_id = request_id or self.new_request_id()
        outputs = self.engine.generate(prompt, sp, request_id, priority=priority)
        turns = ((out.outputs[0], out.finished, False) async for out in outputs)
        async for chunk in self._speak(req, request_id, outputs, turns):
            yield chunk

    async def stream_text(self, req: SynthesisRequest, pieces: AsyncIterator[str], request_id: str | None = None,
                          priority: int = 0, min_text_tokens: int = 0) -> AsyncIterator[AudioChunk]:
        """Audio chunks of `req` (its `text` ignored) spoken while its text arrives as `pieces`.

        The request starts once the text's first token is final (`IncrementalTokenizer`), or, with
        `min_text_tokens`, once that many are (or the text is complete): a lead for a client whose
        text may arrive more slowly than it is spoken. It speaks one text token per frame (streaming
        text mode). When the next frame needs a token
        that has not arrived, the talker ends the turn with HOLD: vLLM's streaming-input session
        keeps the request's KV cache and slot, out of the batch, and the next turn starts when more
        text (or its end) comes. The codes equal a one-shot `stream` of the whole text with
        `non_streaming_mode=False`, however the pieces are cut and timed."""
        from .base.vllm_adapter import StreamingInput, TokensPrompt
        from .model.incremental_text import IncrementalTokenizer
        from .model.prompt import TextIncomplete

        if req.non_streaming_mode:
            raise PromptError("text arriving in pieces is spoken in streaming text mode (non_streaming_mode false)")
        if not self.supports_text_streaming():
            raise PromptError("text arriving in pieces is not available on GPUs (Model Runner V2) yet")
        req = replace(req, non_streaming_mode=False)
        request_id = request_id or self.new_request_id()
        text = IncrementalTokenizer(self.tokenizer)
        pieces = aiter(pieces)

        async def more_text() -> bool:
            """Read pieces until a token is committed or the input ends (False then)."""
            while True:
                try:
                    piece = await anext(pieces)
                except StopAsyncIteration:
                    if not text.text.strip():
                        raise PromptError("input text is empty") from None
                    text.close()
                    return False
                if text.append(piece):
                    return True

        def turn(frames_done: int):
            tokens = (text.role_ids, list(text.ids))
            return self.prepare(replace(req, text=text.text), tokens, text.closed, frames_done)

        # the first turn: as soon as the layout of the prompt is fixed (and the lead is there)
        while True:
            open_input = await more_text()
            if open_input and len(text.ids) < min_text_tokens:
                continue
            try:
                prompt, sp = turn(0)
                break
            except TextIncomplete:
                if not open_input:
                    raise
        # The salt (vLLM takes the first turn's for the whole session) must not be shared: it
        # stands for the text track of every cached block, and this session's text is not known yet.
        prompt = {**prompt, "cache_salt": f"{prompt['cache_salt']}-{request_id}-{uuid.uuid4().hex}"}
        chunks: asyncio.Queue = asyncio.Queue()  # the next turns' inputs; None: no more
        ended = asyncio.Event()

        async def inputs():
            yield StreamingInput(prompt, sp)
            while (chunk := await chunks.get()) is not None:
                yield chunk
            await ended.wait()  # ending the inputs ends the session (an abort while it is paused)

        outputs = self.engine.generate(inputs(), sp, request_id, priority=priority)
        hold_id = hold_token_id(self.config.talker)
        eos_id = self.config.talker.codec_eos_id

        async def turns():
            made, last_code0 = 0, 0
            try:
                async for out in outputs:
                    completion = out.outputs[0]
                    frames = frames_from_output(completion, eos_id)
                    made += len(frames)
                    last_code0 = frames[-1][0] if frames else last_code0
                    if completion.finish_reason is None or completion.stop_reason != hold_id:
                        yield completion, completion.finish_reason is not None, False
                        if completion.finish_reason is not None:
                            return
                        continue
                    yield completion, False, True  # held: the frames so far go out as audio now
                    if not text.closed:
                        await more_text()
                    try:
                        _, turn_sp = turn(made)
                    except _BudgetSpent:
                        yield replace(completion, token_ids=[], logprobs=None, finish_reason="length"), True, False
                        return
                    # the held frame's code 0 again: vLLM dropped it when the turn ended on HOLD
                    chunks.put_nowait(StreamingInput(TokensPrompt(prompt_token_ids=[last_code0]), turn_sp))
            finally:
                ended.set()
                chunks.put_nowait(None)

        session = turns()
        try:
            async for chunk in self._speak(req, request_id, outputs, session):
                yield chunk
        finally:
            await session.aclose()  # its end lets the inputs end: vLLM then closes the session

    @staticmethod
    def supports_text_streaming() -> bool:
        """Whether `stream_text` is served here: on the V1 model runner (the CPU build). Model
        Runner V2 (GPUs) hands vLLM the HOLD token too, and the adapter carries what vLLM 0.26
        lacks, but the path stays off on GPUs until `test_gpu.py`'s text-in-pieces test (which
        lifts this gate for itself) passes there: its last run found the two defects fixed since
        and no other (NOTES §27)."""
        from .base.vllm_adapter import current_platform

        return current_platform.device_type != "cuda"

    async def _speak(self, req: SynthesisRequest, request_id: str, outputs: AsyncIterator,
                     turns: AsyncIterator) -> AsyncIterator[AudioChunk]:
        """Audio chunks of the frames in `turns` ((CompletionOutput, finished, held) of vLLM's
        `outputs` for `request_id`; held: the request waits for text, so the frames so far are
        decoded now): the codec stream, the chunk schedule, and the release of both however the
        consumer stops."""
        context = None
        if req.voice is not None and req.voice.ref_codes:
            context = np.asarray(req.voice.ref_codes, dtype=np.int64)
        # The codec stream opens while the talker prefills, not before it: under load the worker
        # answers only between decoder calls (tens of ms), and a voice clone's reference codes
        # are decoded into the stream's state at open.
        # It is awaited shielded: a cancelled consumer must not cancel an open the worker may
        # already have carried out (the stream would stay open there, forgotten here).
        opening = asyncio.ensure_future(self.codec.open_stream(request_id, context))
        sizes = self.chunk_schedule.for_load(self.active_streams + 1).starting_at(req.first_chunk_frames).sizes()
        want = next(sizes)
        pending: list[list[int]] = []
        done = False
        self.active_streams += 1
        try:
            async for completion, finished, held in turns:
                pending.extend(frames_from_output(completion, self.config.talker.codec_eos_id))
                # Chunks follow the schedule even when the last output brings many frames at once
                # (a consumer that fell behind): the client's first audio stays small.
                while len(pending) > want or (len(pending) == want and not finished):
                    chunk, pending = np.asarray(pending[:want], dtype=np.int64), pending[want:]
                    await asyncio.shield(opening)
                    yield AudioChunk(await self.codec.decode(request_id, chunk, final=False), chunk)
                    want = next(sizes)
                if held and pending:  # no frame comes until more text does: what there is, now
                    chunk, pending = np.asarray(pending, dtype=np.int64), []
                    await asyncio.shield(opening)
                    yield AudioChunk(await self.codec.decode(request_id, chunk, final=False), chunk)
                if finished:
                    done = True
                    chunk = np.asarray(pending, dtype=np.int64).reshape(-1, 16)
                    await asyncio.shield(opening)
                    audio = (await self.codec.decode(request_id, chunk, final=True) if len(chunk)
                             else np.zeros(0, dtype=np.float32))
                    yield AudioChunk(audio, chunk, finish_reason=completion.finish_reason or "stop")
        finally:
            self.active_streams -= 1
            # However the consumer stopped (a client that went away cancels it, and Starlette
            # cancels again at every await), the release runs to its end in a task of its own.
            await run_to_completion(self._release(request_id, outputs, opening, finished=done))

    async def _release(self, request_id: str, outputs: AsyncIterator, opening: asyncio.Future,
                       finished: bool) -> None:
        """Free what a stream holds: its vLLM request (aborted unless it finished) and its codec
        stream. The open is let finish first (not cancelled: the worker would hold a stream nobody
        closes); a failed open has nothing to close, and its error was raised to the consumer or
        is moot because the request ended first. Failures are logged, never raised: they must
        not replace the consumer's own outcome."""
        from .codec.client import CodecError

        try:
            if not finished:
                await self.engine.abort(request_id)
            await outputs.aclose()  # vLLM's generator, closed now rather than when collected
        except Exception:  # noqa: BLE001 - the engine has died: its requests went with it
            logger.warning("aborting vLLM request %s failed", request_id, exc_info=True)
        await asyncio.wait({opening})
        if opening.cancelled() or opening.exception() is not None:
            return
        try:
            await self.codec.close_stream(request_id)
        except CodecError as e:  # the worker is gone, and its streams with it
            logger.debug("closing codec stream %s: %s", request_id, e)
        except Exception:  # noqa: BLE001
            logger.warning("closing codec stream %s failed", request_id, exc_info=True)

    async def synthesize(self, req: SynthesisRequest, request_id: str | None = None) -> SynthesisResult:
        audio, codes, finish_reason = [], [], "stop"
        async with contextlib.aclosing(self.stream(req, request_id)) as chunks:
            async for chunk in chunks:
                audio.append(chunk.audio)
                codes.append(chunk.codes)
                finish_reason = chunk.finish_reason or finish_reason
        return SynthesisResult(
            codes=np.concatenate(codes) if codes else np.zeros((0, 16), dtype=np.int64),
            audio=np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32),
            sample_rate=SAMPLE_RATE,
            finish_reason=finish_reason,
        )

    def new_request_id(self) -> str:
        return f"tts-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    async def clone_voice(self, audio: bytes | tuple[np.ndarray, int], ref_text: str | None = None,
                          x_vector_only: bool = False) -> VoiceProfile:
        """Voice-clone conditioning from reference audio (encoded bytes, or a waveform and its rate)."""
        from .codec.client import CodecError

        if not self.config.supports_voice_clone:
            raise PromptError("this checkpoint cannot clone voices (only Base checkpoints can)")
        if isinstance(audio, tuple):
            import soundfile as sf

            buf = io.BytesIO()
            sf.write(buf, np.asarray(audio[0], dtype=np.float32), int(audio[1]), format="WAV", subtype="FLOAT")
            audio = buf.getvalue()
        try:
            enc = await self.codec.encode_reference(audio, ref_text, x_vector_only)
        except CodecError as e:
            raise PromptError(f"reference audio: {e}") from e
        codes = None if enc.ref_codes is None else enc.ref_codes.tolist()
        return VoiceProfile(xvector=enc.xvector.tolist(), ref_codes=codes, ref_text=ref_text)
