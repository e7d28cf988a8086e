"""Saved voices: voice-clone profiles stored per owner (API tenant) and persisted on disk.

A saved voice lets a client clone a voice once (upload reference audio, the codec worker
computes the profile) and then synthesize with it by name, without re-encoding the audio
on every request. This module only stores and validates profiles, which are the engine's
own `VoiceProfile` (plain lists, ready for a `SynthesisRequest`); computing them happens
elsewhere (`TTSEngine.clone_voice`, through the codec worker).

Layout on disk, one JSON file per voice:

    <root>/<sha256(owner)>/<lower-cased name>.json

Owner ids are hashed because they may contain any character (and should not be readable
from a directory listing); names are stored lower-cased because uniqueness is
case-insensitive, which also keeps case-insensitive filesystems consistent. The display
name, with its original case, is inside the file. Every write goes to a temporary file in
the same directory, is fsynced and then renamed over the target, so a crash leaves either
the old file or the new one, never a partial one.

The store is synchronous and guarded by a `threading.Lock`. Writes fsync, so an asyncio
caller should run mutations off the event loop: `await asyncio.to_thread(store.create, ...)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vllm_qwen3tts.synthesis import VoiceProfile
from vllm_qwen3tts.base.params import MAX_CONSENT_CHARS, MAX_DESCRIPTION_CHARS, MAX_REF_TEXT_CHARS

# Under vLLM's logger, as the rest of the server: its handler, format and level apply. Outside
# "vllm" a record finds no handler in the server, only Python's bare last-resort stderr output.
logger = logging.getLogger("vllm.qwen3tts.server.voices")

FILE_FORMAT_VERSION = 1
NUM_CODEBOOKS = 16  # every 12 Hz Qwen3-TTS codec: reference codes are [T, 16]
VOICE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TEMP_PREFIX = ".voice-"
_TEMP_SUFFIX = ".tmp"  # not ".json", so a leftover temp file is never loaded as a voice


class VoiceStoreError(Exception):
    """Base of every error this module raises on purpose."""


class InvalidVoiceName(VoiceStoreError, ValueError):
    pass


class InvalidVoiceProfile(VoiceStoreError, ValueError):
    pass


class InvalidVoiceMetadata(VoiceStoreError, ValueError):
    pass


class VoiceExists(VoiceStoreError):
    pass


class VoiceNotFound(VoiceStoreError, LookupError):
    pass


class VoiceQuotaExceeded(VoiceStoreError):
    pass


def normalized_profile(profile: VoiceProfile) -> VoiceProfile:
    """A plain-list copy of `profile` (Python floats and ints, as JSON gives them back), or
    `InvalidVoiceProfile` unless it can condition the talker.

    `ref_codes` None is x-vector-only mode; otherwise ICL mode, which also needs `ref_text`.
    """
    xvector = profile.xvector
    if not isinstance(xvector, (list, tuple)) or not xvector:
        raise InvalidVoiceProfile("xvector must be a non-empty list of numbers")
    # bool is a number to Python; a list of booleans is certainly a bug upstream. numbers.Real
    # also admits numpy scalars, which json cannot encode, hence the conversion.
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in xvector):
        raise InvalidVoiceProfile("xvector must contain only finite numbers")
    if profile.ref_text is not None and not isinstance(profile.ref_text, str):
        raise InvalidVoiceProfile("ref_text must be a string or null")
    ref_codes = profile.ref_codes
    if ref_codes is not None:
        if not isinstance(ref_codes, (list, tuple)) or not ref_codes:
            raise InvalidVoiceProfile(f"ref_codes must be null or a non-empty [T, {NUM_CODEBOOKS}] list of lists")
        for row in ref_codes:
            if not isinstance(row, (list, tuple)) or len(row) != NUM_CODEBOOKS:
                raise InvalidVoiceProfile(f"every ref_codes frame must hold {NUM_CODEBOOKS} codes")
            if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0 for c in row):
                raise InvalidVoiceProfile("ref_codes must contain only non-negative integers")
        # ICL mode's prompt pairs the transcript with the codes; without it the codes are
        # meaningless (create_voice_clone_profile refuses the same).
        if not profile.ref_text:
            raise InvalidVoiceProfile("a profile with ref_codes (ICL mode) needs ref_text")
        ref_codes = [[int(c) for c in row] for row in ref_codes]
    return VoiceProfile(xvector=[float(v) for v in xvector], ref_codes=ref_codes, ref_text=profile.ref_text)


@dataclass(frozen=True)
class VoiceMetadata:
    """Facts about a voice that are not needed to synthesize with it.

    `created_at` (Unix seconds) is filled in by the store when left None. `model` names the
    checkpoint the profile was computed with: a profile is only valid for the checkpoint
    (its x-vector size is the talker's hidden size). `extra` keeps anything else the caller
    wants stored; it must be JSON-serializable and is not part of public listings.
    """

    created_at: float | None = None
    consent: str | None = None
    source_audio_seconds: float | None = None
    description: str | None = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Voice:
    """A saved voice. Shared by every reader: treat the profile's lists as read-only."""

    name: str  # as the owner spelled it; lookups are case-insensitive
    owner: str
    profile: VoiceProfile
    metadata: VoiceMetadata

    @property
    def mode(self) -> str:
        """"icl" (reference codes + transcript + x-vector) or "x_vector" (speaker embedding only)."""
        return "x_vector" if self.profile.ref_codes is None else "icl"

    @property
    def embedding_dim(self) -> int:
        return len(self.profile.xvector)

    @property
    def has_ref_codes(self) -> bool:
        return self.profile.ref_codes is not None

    def to_public_dict(self) -> dict[str, Any]:
        """What an API listing shows: no x-vector, no codes, no owner id, no `extra`."""
        return {
            "object": "voice",
            "name": self.name,
            "created_at": self.metadata.created_at,
            "mode": self.mode,
            "has_ref_codes": self.has_ref_codes,
            "ref_code_frames": len(self.profile.ref_codes) if self.profile.ref_codes is not None else 0,
            "ref_text": self.profile.ref_text,
            "embedding_dim": self.embedding_dim,
            "source_audio_seconds": self.metadata.source_audio_seconds,
            "consent": self.metadata.consent,
            "description": self.metadata.description,
            "model": self.metadata.model,
        }


def validate_metadata(metadata: VoiceMetadata) -> None:
    """Raise `InvalidVoiceMetadata` unless the caller's texts are strings within their limits
    (the voice upload's form states the same limits)."""
    for field_name, limit in (("consent", MAX_CONSENT_CHARS), ("description", MAX_DESCRIPTION_CHARS)):
        value = getattr(metadata, field_name)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            raise InvalidVoiceMetadata(f"{field_name} must be a string of at most {limit} characters")


def validate_voice_name(name: str) -> None:
    """Raise `InvalidVoiceName` unless `name` is 1-64 characters of [A-Za-z0-9_.-]."""
    if not isinstance(name, str) or VOICE_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidVoiceName("voice names are 1-64 characters of letters, digits, '_', '.' and '-'")


def owner_directory_name(owner: str) -> str:
    """Directory of an owner's voices: a hash, since owner ids may contain any character."""
    return hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()


class VoiceStore:
    """Saved voices of every owner, in memory and on disk under `root`."""

    def __init__(
        self,
        root: Path,
        max_voices_per_owner: int = 100,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_voices_per_owner < 1:
            raise ValueError("max_voices_per_owner must be at least 1")
        self.root = Path(root)
        self.max_voices_per_owner = max_voices_per_owner
        self._clock = clock
        self._lock = threading.Lock()
        # owner -> lower-cased name -> voice
        self._voices: dict[str, dict[str, Voice]] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._restore()

    # ---- queries -------------------------------------------------------------------------

    def get(self, owner: str, name: str) -> Voice:
        with self._lock:
            voice = self._voices.get(owner, {}).get(_key(name))
        if voice is None:
            raise VoiceNotFound(f"no saved voice named {name!r}")
        return voice

    def list(self, owner: str) -> list[Voice]:
        """The owner's voices, oldest first."""
        with self._lock:
            voices = list(self._voices.get(owner, {}).values())
        return sorted(voices, key=lambda v: (v.metadata.created_at or 0.0, v.name.lower()))

    def count(self, owner: str) -> int:
        with self._lock:
            return len(self._voices.get(owner, {}))

    # ---- mutations -----------------------------------------------------------------------

    def create(
        self, owner: str, name: str, profile: VoiceProfile, metadata: VoiceMetadata | None = None
    ) -> Voice:
        """Store a new voice; raises `InvalidVoiceName`, `InvalidVoiceProfile`, `InvalidVoiceMetadata`,
        `VoiceExists`, `VoiceQuotaExceeded`, or the write's own error (then nothing is stored)."""
        validate_voice_name(name)
        profile = normalized_profile(profile)
        if profile.ref_text is not None and len(profile.ref_text) > MAX_REF_TEXT_CHARS:
            raise InvalidVoiceProfile(f"ref_text must be at most {MAX_REF_TEXT_CHARS} characters")
        metadata = metadata or VoiceMetadata()
        if not isinstance(metadata, VoiceMetadata):
            raise TypeError(f"metadata must be a VoiceMetadata, not {type(metadata).__name__}")
        validate_metadata(metadata)
        if metadata.created_at is None:
            metadata = replace(metadata, created_at=self._clock())
        voice = Voice(name=name, owner=owner, profile=profile, metadata=metadata)
        # Serialize before taking the lock or touching the disk: a value json cannot encode
        # fails here, leaving no file behind.
        payload = json.dumps(_voice_to_json(voice), allow_nan=False, separators=(",", ":"))
        with self._lock:
            owned = self._voices.get(owner, {})
            if _key(name) in owned:
                raise VoiceExists(f"a voice named {name!r} already exists")
            if len(owned) >= self.max_voices_per_owner:
                raise VoiceQuotaExceeded(
                    f"at most {self.max_voices_per_owner} saved voices per API key; delete one first"
                )
            directory = self.root / owner_directory_name(owner)
            if not directory.is_dir():
                directory.mkdir(exist_ok=True)
                _fsync_directory(self.root)  # the new directory's entry, before a voice goes in it
            _write_atomically(directory / f"{_key(name)}.json", payload)
            # Only a voice that reached the disk becomes visible.
            self._voices.setdefault(owner, {})[_key(name)] = voice
        return voice

    def delete(self, owner: str, name: str) -> None:
        with self._lock:
            owned = self._voices.get(owner, {})
            if _key(name) not in owned:
                raise VoiceNotFound(f"no saved voice named {name!r}")
            directory = self.root / owner_directory_name(owner)
            try:
                (directory / f"{_key(name)}.json").unlink()
            except FileNotFoundError:
                pass  # removed behind our back: the voice is gone either way
            _fsync_directory(directory)
            del owned[_key(name)]
            if not owned:
                del self._voices[owner]

    # ---- startup -------------------------------------------------------------------------

    def _restore(self) -> None:
        """Load every voice file under root; skip (with a warning) what cannot be read."""
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for path in sorted(directory.iterdir()):
                if path.name.startswith(_TEMP_PREFIX) and path.name.endswith(_TEMP_SUFFIX):
                    if _writer_alive(path):
                        continue  # another process sharing the directory is writing it now
                    # Left by a write that crashed before its rename: never a complete voice.
                    logger.info("removing %s, left by a voice write that did not finish", path)
                    _unlink_quietly(path)
                    continue
                if path.suffix != ".json" or not path.is_file():
                    continue
                try:
                    voice = _voice_from_json(json.loads(path.read_text(encoding="utf-8")))
                    # A file copied or renamed by hand would otherwise be filed under the
                    # wrong owner or be unreachable by its name.
                    if owner_directory_name(voice.owner) != directory.name:
                        raise ValueError("owner does not match the directory")
                    if f"{_key(voice.name)}.json" != path.name:
                        raise ValueError("name does not match the file name")
                except Exception as exc:  # noqa: BLE001 - a bad file must never stop startup
                    logger.warning("skipping unreadable saved voice %s: %s", path, exc)
                    continue
                self._voices.setdefault(voice.owner, {})[_key(voice.name)] = voice
        total = sum(len(v) for v in self._voices.values())
        if total:
            logger.info("restored %d saved voices of %d owners from %s", total, len(self._voices), self.root)


# ---- helpers ---------------------------------------------------------------------------


def _key(name: str) -> str:
    return name.lower()


def _voice_to_json(voice: Voice) -> dict[str, Any]:
    m = voice.metadata
    return {
        "format_version": FILE_FORMAT_VERSION,
        "owner": voice.owner,
        "name": voice.name,
        "profile": {
            "xvector": voice.profile.xvector,
            "ref_codes": voice.profile.ref_codes,
            "ref_text": voice.profile.ref_text,
        },
        "metadata": {
            "created_at": m.created_at,
            "consent": m.consent,
            "source_audio_seconds": m.source_audio_seconds,
            "description": m.description,
            "model": m.model,
            "extra": m.extra,
        },
    }


def _voice_from_json(data: Any) -> Voice:
    if not isinstance(data, dict) or data.get("format_version") != FILE_FORMAT_VERSION:
        raise ValueError("not a saved voice of a known format version")
    owner, name = data["owner"], data["name"]
    if not isinstance(owner, str):
        raise ValueError("owner must be a string")
    validate_voice_name(name)
    p, m = data["profile"], data["metadata"]
    profile = normalized_profile(VoiceProfile(xvector=p["xvector"], ref_codes=p["ref_codes"], ref_text=p["ref_text"]))
    created_at = m.get("created_at")
    if not isinstance(created_at, (int, float)) or isinstance(created_at, bool):
        raise ValueError("created_at must be a number")
    extra = m.get("extra", {})
    if not isinstance(extra, dict):
        raise ValueError("metadata.extra must be an object")
    metadata = VoiceMetadata(
        created_at=float(created_at),
        consent=_optional_str(m, "consent"),
        source_audio_seconds=_optional_number(m, "source_audio_seconds"),
        description=_optional_str(m, "description"),
        model=_optional_str(m, "model"),
        extra=extra,
    )
    return Voice(name=name, owner=owner, profile=profile, metadata=metadata)


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string or null")
    return value


def _optional_number(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number or null")
    return float(value)


def _writer_alive(temp: Path) -> bool:
    """Whether the process that named temp file `temp` (`_write_atomically`: the prefix, its
    pid, a dash) is another live process: API servers sharing a voices directory
    (`--api-server-count`) must not remove each other's writes in progress at start-up."""
    pid = temp.name[len(_TEMP_PREFIX):].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomically(path: Path, text: str) -> None:
    """Temp file in the same directory + fsync + rename: readers (and a restart after a
    crash) see the old file or the complete new one, never a prefix of it."""
    fd, temp_name = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        _unlink_quietly(Path(temp_name))
        raise
    # The rename itself is durable only once the directory entry is.
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms that cannot open directories (Windows) have no such step
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


__all__ = [
    "InvalidVoiceMetadata",
    "InvalidVoiceName",
    "InvalidVoiceProfile",
    "NUM_CODEBOOKS",
    "Voice",
    "VoiceExists",
    "VoiceMetadata",
    "VoiceNotFound",
    "VoiceProfile",
    "VoiceQuotaExceeded",
    "VoiceStore",
    "VoiceStoreError",
    "normalized_profile",
    "owner_directory_name",
    "validate_metadata",
    "validate_voice_name",
]
