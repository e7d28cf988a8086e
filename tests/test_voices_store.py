"""Saved voices: per-owner CRUD, isolation between owners, names, profile validation, quota,
persistence across restarts, atomic writes, and startup that survives bad files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from vllm_qwen3tts.engine import VoiceProfile
from vllm_qwen3tts.server.voices import (
    InvalidVoiceName,
    InvalidVoiceProfile,
    VoiceExists,
    VoiceMetadata,
    VoiceNotFound,
    VoiceQuotaExceeded,
    VoiceStore,
    owner_directory_name,
)

ALICE = "tenant-alice"
BOB = "tenant-bob"


def icl_profile(seed: int = 0, frames: int = 5) -> VoiceProfile:
    rng = np.random.default_rng(seed)
    return VoiceProfile(
        xvector=rng.standard_normal(8).astype(np.float32).astype(float).tolist(),
        ref_codes=rng.integers(0, 2048, size=(frames, 16)).tolist(),
        ref_text="The quick brown fox.",
    )


def xvector_profile(seed: int = 0) -> VoiceProfile:
    return VoiceProfile(xvector=np.random.default_rng(seed).standard_normal(8).tolist())


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0  # every voice gets its own creation time
        return self.now


@pytest.fixture
def store(tmp_path) -> VoiceStore:
    return VoiceStore(tmp_path / "voices", clock=FakeClock())


# ---- CRUD ------------------------------------------------------------------------------


def test_a_created_voice_can_be_read_back_listed_and_deleted(store):
    profile = icl_profile()
    created = store.create(ALICE, "narrator", profile, VoiceMetadata(consent="I own this voice", description="calm"))

    assert created.name == "narrator" and created.owner == ALICE
    assert created.metadata.created_at is not None, "the store stamps the creation time"
    assert store.get(ALICE, "narrator") == created
    assert [v.name for v in store.list(ALICE)] == ["narrator"]

    store.delete(ALICE, "narrator")
    with pytest.raises(VoiceNotFound):
        store.get(ALICE, "narrator")
    assert store.list(ALICE) == []
    with pytest.raises(VoiceNotFound):
        store.delete(ALICE, "narrator")


def test_names_are_unique_and_looked_up_without_regard_to_case_but_keep_their_spelling(store):
    store.create(ALICE, "MyVoice", xvector_profile())

    assert store.get(ALICE, "myvoice").name == "MyVoice"
    with pytest.raises(VoiceExists):
        store.create(ALICE, "MYVOICE", xvector_profile(1))
    store.delete(ALICE, "myVOICE")
    assert store.list(ALICE) == []


def test_list_is_oldest_first(store):
    for name in ["c", "a", "b"]:
        store.create(ALICE, name, xvector_profile())
    assert [v.name for v in store.list(ALICE)] == ["c", "a", "b"]


def test_the_public_view_shows_what_a_voice_is_but_not_its_embedding_or_codes(store):
    icl = store.create(ALICE, "icl", icl_profile(frames=7), VoiceMetadata(source_audio_seconds=3.5, model="0.6b-base"))
    xvec = store.create(ALICE, "xvec", xvector_profile())

    public = icl.to_public_dict()
    assert "xvector" not in public and "ref_codes" not in public and "owner" not in public and "extra" not in public
    json.dumps(public)  # ready for a JSON response
    assert public["name"] == "icl"
    assert public["mode"] == "icl" and public["has_ref_codes"] is True and public["ref_code_frames"] == 7
    assert public["ref_text"] == "The quick brown fox."
    assert public["embedding_dim"] == 8
    assert public["source_audio_seconds"] == 3.5 and public["model"] == "0.6b-base"
    assert public["created_at"] == icl.metadata.created_at

    assert xvec.to_public_dict()["mode"] == "x_vector"
    assert xvec.to_public_dict()["has_ref_codes"] is False


def test_profiles_are_stored_as_plain_python_lists_whatever_numbers_they_came_as(store):
    profile = VoiceProfile(
        xvector=tuple(np.arange(4, dtype=np.float32)),  # numpy scalars, which json cannot encode
        ref_codes=[tuple(np.ones(16, dtype=np.int64))] * 3,
        ref_text="hi",
    )
    stored = store.create(ALICE, "v", profile).profile

    assert stored == VoiceProfile(xvector=[0.0, 1.0, 2.0, 3.0], ref_codes=[[1] * 16] * 3, ref_text="hi")
    assert all(type(v) is float for v in stored.xvector) and type(stored.ref_codes[0][0]) is int
    assert VoiceStore(store.root).get(ALICE, "v").profile == stored


def test_metadata_must_be_a_voice_metadata(store):
    with pytest.raises(TypeError):
        store.create(ALICE, "v", xvector_profile(), {"consent": "yes"})
    assert files_under(store.root) == []


# ---- owners ----------------------------------------------------------------------------


def test_owners_never_see_each_others_voices(store):
    store.create(ALICE, "shared-name", icl_profile(0))
    store.create(BOB, "shared-name", icl_profile(1))
    store.create(ALICE, "alice-only", xvector_profile())

    assert store.get(ALICE, "shared-name").profile == icl_profile(0)
    assert store.get(BOB, "shared-name").profile == icl_profile(1)
    assert {v.name for v in store.list(BOB)} == {"shared-name"}
    with pytest.raises(VoiceNotFound):
        store.get(BOB, "alice-only")
    with pytest.raises(VoiceNotFound):
        store.delete(BOB, "alice-only")

    store.delete(BOB, "shared-name")
    assert store.get(ALICE, "shared-name").profile == icl_profile(0)


def test_owner_ids_with_any_characters_become_hashed_directories(store):
    owner = "../../etc/passwd \u2603 /"
    store.create(owner, "v", xvector_profile())

    [path] = files_under(store.root)
    assert path.parent.parent == store.root
    assert path.parent.name == owner_directory_name(owner)
    assert all(c in "0123456789abcdef" for c in path.parent.name)


# ---- validation and quota --------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "x" * 65, "has space", "a/b", "../up", "caf\u00e9", "tab\t", "a\\b", None])
def test_invalid_names_are_refused(store, name):
    with pytest.raises(InvalidVoiceName):
        store.create(ALICE, name, xvector_profile())
    assert files_under(store.root) == []


@pytest.mark.parametrize("name", ["a", "x" * 64, "Speaker_1.v2-final", "..", "-"])
def test_valid_names_are_stored_inside_their_owners_directory(store, name):
    store.create(ALICE, name, xvector_profile())
    [path] = files_under(store.root)
    assert path.parent == store.root / owner_directory_name(ALICE)
    assert store.get(ALICE, name).name == name


@pytest.mark.parametrize(
    "profile",
    [
        VoiceProfile(xvector=[]),
        VoiceProfile(xvector=[0.1, float("nan")]),
        VoiceProfile(xvector=[True, False]),
        VoiceProfile(xvector=[0.1], ref_codes=[[1] * 15], ref_text="t"),
        VoiceProfile(xvector=[0.1], ref_codes=[[1] * 16, [1] * 17], ref_text="t"),
        VoiceProfile(xvector=[0.1], ref_codes=[[-1] * 16], ref_text="t"),
        VoiceProfile(xvector=[0.1], ref_codes=[[0.5] * 16], ref_text="t"),
        VoiceProfile(xvector=[0.1], ref_codes=[], ref_text="t"),
        VoiceProfile(xvector=[0.1], ref_codes=[[1] * 16], ref_text=None),
    ],
    ids=[
        "empty-xvector",
        "nan",
        "bools",
        "15-codebooks",
        "ragged",
        "negative-code",
        "float-code",
        "no-frames",
        "icl-without-text",
    ],
)
def test_profiles_that_cannot_condition_the_talker_are_refused(store, profile):
    with pytest.raises(InvalidVoiceProfile):
        store.create(ALICE, "v", profile)
    assert store.list(ALICE) == []


def test_each_owner_has_a_quota_of_voices(tmp_path):
    store = VoiceStore(tmp_path, max_voices_per_owner=2)
    store.create(ALICE, "one", xvector_profile())
    store.create(ALICE, "two", xvector_profile())

    with pytest.raises(VoiceQuotaExceeded):
        store.create(ALICE, "three", xvector_profile())
    store.create(BOB, "three", xvector_profile())  # another owner's quota is its own

    store.delete(ALICE, "one")
    store.create(ALICE, "three", xvector_profile())
    assert {v.name for v in store.list(ALICE)} == {"two", "three"}


def test_a_duplicate_is_reported_as_such_even_at_quota(tmp_path):
    store = VoiceStore(tmp_path, max_voices_per_owner=1)
    store.create(ALICE, "only", xvector_profile())
    with pytest.raises(VoiceExists):
        store.create(ALICE, "ONLY", xvector_profile())


def test_concurrent_creates_respect_uniqueness_and_quota(tmp_path):
    store = VoiceStore(tmp_path, max_voices_per_owner=5)
    outcomes: list[tuple[str, str]] = []
    outcomes_lock = threading.Lock()

    def create(name: str) -> None:
        try:
            store.create(ALICE, name, xvector_profile())
            result = "created"
        except (VoiceExists, VoiceQuotaExceeded) as exc:
            result = type(exc).__name__
        with outcomes_lock:
            outcomes.append((name, result))

    # Eight threads race for one name, twelve for distinct names, all under a quota of five.
    threads = [threading.Thread(target=create, args=("same",)) for _ in range(8)]
    threads += [threading.Thread(target=create, args=(f"v{i}",)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    created = [name for name, result in outcomes if result == "created"]
    assert len(created) == 5 and len(set(created)) == 5, "never over quota, never a name twice"
    assert store.count(ALICE) == 5
    assert len(files_under(tmp_path)) == 5


# ---- persistence -----------------------------------------------------------------------


def test_voices_survive_a_restart_exactly(tmp_path):
    first = VoiceStore(tmp_path)
    icl = first.create(
        ALICE,
        "Narrator",
        icl_profile(3),
        VoiceMetadata(
            consent="yes", source_audio_seconds=4.25, description="d", model="m", extra={"source": "upload.wav"}
        ),
    )
    xvec = first.create(BOB, "plain", xvector_profile(4))
    first.create(ALICE, "deleted", xvector_profile())
    first.delete(ALICE, "deleted")

    second = VoiceStore(tmp_path)
    assert second.get(ALICE, "narrator") == icl, "profile floats, codes and metadata round-trip exactly"
    assert second.get(BOB, "plain") == xvec
    assert [v.name for v in second.list(ALICE)] == ["Narrator"]
    with pytest.raises(VoiceExists):
        second.create(ALICE, "NARRATOR", xvector_profile())


def test_a_write_that_cannot_be_serialized_leaves_nothing_behind(store):
    unserializable = VoiceMetadata(extra={"handle": object()})
    with pytest.raises(TypeError):
        store.create(ALICE, "v", xvector_profile(), unserializable)

    assert files_under(store.root) == []
    with pytest.raises(VoiceNotFound):
        store.get(ALICE, "v")
    store.create(ALICE, "v", xvector_profile())  # the name was never taken


def test_a_write_that_fails_midway_leaves_no_partial_file_and_no_voice(store, monkeypatch):
    store.create(ALICE, "kept", xvector_profile())

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        store.create(ALICE, "lost", icl_profile())
    monkeypatch.undo()

    assert [p.name for p in files_under(store.root)] == ["kept.json"]
    with pytest.raises(VoiceNotFound):
        store.get(ALICE, "lost")
    assert [v.name for v in VoiceStore(store.root).list(ALICE)] == ["kept"]


def test_startup_skips_corrupt_files_with_a_warning_and_loads_the_rest(tmp_path):
    good = VoiceStore(tmp_path)
    good.create(ALICE, "good", icl_profile())
    alice_dir = tmp_path / owner_directory_name(ALICE)

    (alice_dir / "truncated.json").write_text('{"format_version": 1, "owner": "tenant-al')
    (alice_dir / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (alice_dir / "wrong-shape.json").write_text(json.dumps({"format_version": 1, "owner": ALICE}))
    bad_profile = json.loads((alice_dir / "good.json").read_text())
    bad_profile["name"] = "bad-profile"
    bad_profile["profile"]["xvector"] = []
    (alice_dir / "bad-profile.json").write_text(json.dumps(bad_profile))
    misplaced = json.loads((alice_dir / "good.json").read_text())
    misplaced["name"] = "misplaced"
    (tmp_path / owner_directory_name(BOB)).mkdir()
    (tmp_path / owner_directory_name(BOB) / "misplaced.json").write_text(json.dumps(misplaced))
    (alice_dir / "notes.txt").write_text("ignored: not a voice file")

    with vllm_log_records() as records:
        restored = VoiceStore(tmp_path)

    assert [v.name for v in restored.list(ALICE)] == ["good"]
    assert restored.list(BOB) == []
    warned = " ".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
    for name in ["truncated.json", "binary.json", "wrong-shape.json", "bad-profile.json", "misplaced.json"]:
        assert name in warned
    assert "notes.txt" not in warned


def test_a_temp_file_left_by_a_crash_is_removed_at_startup_and_never_loaded(tmp_path):
    VoiceStore(tmp_path).create(ALICE, "good", xvector_profile())
    alice_dir = tmp_path / owner_directory_name(ALICE)
    leftover = alice_dir / ".voice-abc123.tmp"
    leftover.write_text((alice_dir / "good.json").read_text()[:20])

    restored = VoiceStore(tmp_path)
    assert not leftover.exists()
    assert [v.name for v in restored.list(ALICE)] == ["good"]


# ---- crashes and the server's log ------------------------------------------------------------


@contextlib.contextmanager
def vllm_log_records():
    """Records that reach the "vllm" logger, where vLLM's log handler sits in the server (vLLM
    configures it not to propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, vllm_logger = Keep(logging.INFO), logging.getLogger("vllm")
    level = vllm_logger.level
    vllm_logger.addHandler(handler)
    vllm_logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        vllm_logger.removeHandler(handler)
        vllm_logger.setLevel(level)


def test_warnings_about_unreadable_saved_voices_reach_the_servers_log_handler(tmp_path):
    VoiceStore(tmp_path).create(ALICE, "good", xvector_profile())
    (tmp_path / owner_directory_name(ALICE) / "broken.json").write_text("{")
    with vllm_log_records() as records:
        VoiceStore(tmp_path)
    assert [r.levelno for r in records if "broken.json" in r.getMessage()] == [logging.WARNING]


WRITER = """
import sys
from pathlib import Path
import numpy as np
from vllm_qwen3tts.engine import VoiceProfile
from vllm_qwen3tts.server.voices import VoiceStore

def profile(i):
    rng = np.random.default_rng(i)
    return VoiceProfile(xvector=rng.standard_normal(64).tolist(), ref_codes=rng.integers(0, 2048, (400, 16)).tolist(),
                        ref_text=f"voice {i}")

store, owner = VoiceStore(Path(sys.argv[1])), sys.argv[2]
i = 0
while True:  # create v<i>, then delete v<i-2>: at most three voices at any time
    store.create(owner, f"v{i}", profile(i))
    print(f"create {i}", flush=True)
    if i >= 2:
        store.delete(owner, f"v{i - 2}")
        print(f"delete {i - 2}", flush=True)
    i += 1
"""
WRITERS = 4  # at once, each in a directory of its own, killed together


def writer_profile(i: int) -> VoiceProfile:
    rng = np.random.default_rng(i)
    return VoiceProfile(xvector=rng.standard_normal(64).tolist(), ref_codes=rng.integers(0, 2048, (400, 16)).tolist(),
                        ref_text=f"voice {i}")


def voices_after(operations: list[str]) -> set[str]:
    names: set[str] = set()
    for line in operations:
        op, i = line.split()
        (names.add if op == "create" else names.discard)(f"v{i}")
    return names


@pytest.mark.parametrize("round_", range(6))
def test_voices_written_while_the_process_is_killed_are_whole_or_absent_after_restart(tmp_path, round_):
    """Processes creating and deleting voices in a loop, SIGKILLed at a random moment: a fresh
    store holds exactly the voices of the operations that had returned, give or take the one in
    progress, each one whole, and there is nothing to warn about."""
    owners = [f"tenant-{k}" for k in range(WRITERS)]
    roots = {owner: tmp_path / owner for owner in owners}  # a store's startup tidies its whole directory
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(roots[owner]), owner], stdout=subprocess.PIPE,
                                text=True) for owner in owners]
    acknowledged: dict[str, list[str]] = {}
    try:
        for owner, writer in zip(owners, writers):
            acknowledged[owner] = [writer.stdout.readline().strip() for _ in range(6)]  # in its loop
        threading.Event().wait(random.Random(round_).uniform(0.0, 0.2))
    finally:
        for writer in writers:
            writer.send_signal(signal.SIGKILL)
        for owner, writer in zip(owners, writers):
            acknowledged.setdefault(owner, []).extend(writer.stdout.read().split("\n"))
            writer.wait()

    with vllm_log_records() as records:
        restored = {owner: VoiceStore(roots[owner]) for owner in owners}

    for owner in owners:
        done = [line for line in acknowledged[owner] if line]
        op, n = done[-1].split()
        in_progress = f"delete {int(n) - 2}" if op == "create" else f"create {int(n) + 3}"  # the writer's next step
        names = {v.name for v in restored[owner].list(owner)}
        assert names in (voices_after(done), voices_after([*done, in_progress])), (owner, done[-3:], names)
        for voice in restored[owner].list(owner):
            assert voice.profile == writer_profile(int(voice.name[1:])), (owner, voice.name)
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not [p for p in files_under(tmp_path) if p.suffix != ".json"]  # no temp file left behind


def test_a_starting_store_leaves_the_writes_of_live_processes_sharing_its_directory_alone(tmp_path):
    """API server processes may share one voices directory: a store starting in one removes the
    temp files of crashed writes, not the write another live process is making right now."""
    VoiceStore(tmp_path).create("alice", "kept", VoiceProfile(xvector=[0.5] * 8))
    directory = next(p for p in tmp_path.iterdir() if p.is_dir())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        in_progress = directory / f".voice-{live.pid}-abc.tmp"
        crashed = directory / f".voice-{dead.pid}-def.tmp"
        for path in (in_progress, crashed):
            path.write_text("{partial")
        store = VoiceStore(tmp_path)
        assert in_progress.exists() and not crashed.exists()
        assert [v.name for v in store.list("alice")] == ["kept"]
    finally:
        live.kill()
        live.wait()
