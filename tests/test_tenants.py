"""API keys and admission: who a request belongs to, per-tenant rate and concurrency limits,
the global bound, slots released however a request ends, and fair priorities."""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path

import pytest

from vllm_qwen3tts.server import tenants as tenants_module
from vllm_qwen3tts.server.tenants import (
    ANONYMOUS_TENANT_ID,
    AdmissionController,
    AdmissionRejected,
    Overloaded,
    RateLimited,
    Tenant,
    TenantLimits,
    TenantRegistry,
    TooManyConcurrent,
    Unauthorized,
)

KEY_A = "sk-alpha-0123456789"
KEY_B = "sk-bravo-9876543210"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tenant(id: str = "a", max_concurrency: int | None = None, requests_per_minute: float | None = None) -> Tenant:
    return Tenant(id=id, name=id, max_concurrency=max_concurrency, requests_per_minute=requests_per_minute)


def write_keys_file(tmp_path: Path, entries) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    return path


# ---- authentication --------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer anything", "Basic Zm9vOmJhcg==", "garbage"])
def test_without_keys_auth_is_off_and_everyone_is_the_anonymous_tenant(header):
    registry = TenantRegistry.from_sources()
    assert not registry.auth_enabled
    assert registry.authenticate(header).id == ANONYMOUS_TENANT_ID
    assert [t.id for t in registry.tenants] == [ANONYMOUS_TENANT_ID]


def test_the_anonymous_tenant_is_unlimited_unless_configured():
    assert TenantRegistry.from_sources().authenticate(None).max_concurrency is None
    limited = TenantRegistry.from_sources(anonymous_limits=TenantLimits(max_concurrency=8, requests_per_minute=600))
    anonymous = limited.authenticate(None)
    assert (anonymous.max_concurrency, anonymous.requests_per_minute) == (8, 600)


def test_a_configured_key_identifies_its_tenant_by_an_id_that_is_not_the_key():
    registry = TenantRegistry.from_sources(keys=[KEY_A, KEY_B], default_limits=TenantLimits(max_concurrency=2))
    assert registry.auth_enabled

    a = registry.authenticate(f"Bearer {KEY_A}")
    b = registry.authenticate(f"bearer   {KEY_B} ")  # scheme is case-insensitive; spaces tolerated
    assert a.id != b.id
    for t in (a, b):
        assert KEY_A not in t.id and KEY_B not in t.id and KEY_A not in t.name
        assert t.max_concurrency == 2
    # Voices are stored under the id, so it must not change between restarts.
    assert TenantRegistry.from_sources(keys=[KEY_A]).authenticate(f"Bearer {KEY_A}").id == a.id


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {KEY_A}",
        f"Token {KEY_A}",
        KEY_A,
        f"Bearer {KEY_A}x",
        f"Bearer {KEY_A[:-1]}",
        "Bearer sk-unknown",
    ],
)
def test_missing_malformed_or_unknown_keys_are_unauthorized(header):
    registry = TenantRegistry.from_sources(keys=[KEY_A])
    with pytest.raises(Unauthorized) as excinfo:
        registry.authenticate(header)
    assert KEY_A[:8] not in str(excinfo.value), "errors never echo a key"


def test_keys_are_compared_in_constant_time_against_every_configured_key(monkeypatch):
    registry = TenantRegistry.from_sources(keys=[KEY_A, KEY_B, "sk-charlie-5555555555"])
    comparisons = []
    real_compare_digest = hmac.compare_digest

    def spy(a, b):
        comparisons.append((a, b))
        return real_compare_digest(a, b)

    monkeypatch.setattr(tenants_module.hmac, "compare_digest", spy)
    registry.authenticate(f"Bearer {KEY_A}")  # matches the first key ...
    assert len(comparisons) == 3, "... and still compares against all of them"
    comparisons.clear()
    with pytest.raises(Unauthorized):
        registry.authenticate("Bearer sk-nope")
    assert len(comparisons) == 3
    assert all(isinstance(a, bytes) and len(a) == len(b) for a, b in comparisons), "fixed-length digests"


def test_a_keys_file_names_tenants_and_sets_their_limits(tmp_path):
    path = write_keys_file(
        tmp_path,
        [
            {"key": KEY_A, "name": "team-a", "max_concurrency": 4, "requests_per_minute": 120},
            {"key": KEY_B, "name": "team-b", "max_concurrency": None},
            {"key": "sk-rotated-new-key", "name": "team-a", "max_concurrency": 4, "requests_per_minute": 120},
        ],
    )
    registry = TenantRegistry.from_sources(
        keys=["sk-cli-key"], keys_file=path, default_limits=TenantLimits(max_concurrency=2, requests_per_minute=30)
    )

    a = registry.authenticate(f"Bearer {KEY_A}")
    assert (a.id, a.name, a.max_concurrency, a.requests_per_minute) == ("team-a", "team-a", 4, 120)
    b = registry.authenticate(f"Bearer {KEY_B}")
    # null means unlimited; a missing field takes the default
    assert (b.id, b.max_concurrency, b.requests_per_minute) == ("team-b", None, 30)
    assert registry.authenticate("Bearer sk-rotated-new-key") == a, "two keys of one name are one tenant"
    cli = registry.authenticate("Bearer sk-cli-key")
    assert cli.id.startswith("key-") and (cli.max_concurrency, cli.requests_per_minute) == (2, 30)
    assert sorted(t.id for t in registry.tenants) == sorted(["team-a", "team-b", cli.id])


@pytest.mark.parametrize(
    "entries",
    [
        {"key": KEY_A},  # not a list
        [KEY_A],
        [{"name": "no-key"}],
        [{"key": ""}],
        [{"key": f" {KEY_A}"}],
        [{"key": KEY_A, "max_concurency": 4}],  # misspelt field
        [{"key": KEY_A, "max_concurrency": 0}],
        [{"key": KEY_A, "max_concurrency": 1.5}],
        [{"key": KEY_A, "requests_per_minute": -1}],
        [{"key": KEY_A, "name": ""}],
        [{"key": KEY_A, "name": "x"}, {"key": KEY_A, "name": "y"}],  # one key, two tenants
        [{"key": KEY_A, "name": "x", "max_concurrency": 1}, {"key": KEY_B, "name": "x", "max_concurrency": 2}],
    ],
)
def test_a_malformed_keys_file_is_refused_without_revealing_keys(tmp_path, entries):
    with pytest.raises(ValueError) as excinfo:
        TenantRegistry.from_sources(keys_file=write_keys_file(tmp_path, entries))
    assert KEY_A not in str(excinfo.value) and KEY_B not in str(excinfo.value)


def test_an_unreadable_keys_file_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError):
        TenantRegistry.from_sources(keys_file=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError):
        TenantRegistry.from_sources(keys_file=tmp_path / "bad.json")


# ---- rate limit ------------------------------------------------------------------------


def test_the_token_bucket_allows_a_minutes_burst_then_refills_at_the_configured_rate():
    clock = FakeClock()
    controller = AdmissionController(100, clock=clock)
    t = tenant(requests_per_minute=3)  # one token every 20 s

    for _ in range(3):
        controller.try_admit(t).release()
    with pytest.raises(RateLimited) as excinfo:
        controller.try_admit(t)
    assert excinfo.value.retry_after_s == 20 and excinfo.value.status_code == 429

    clock.advance(15)
    with pytest.raises(RateLimited) as excinfo:
        controller.try_admit(t)
    assert excinfo.value.retry_after_s == 5

    clock.advance(5)
    controller.try_admit(t).release()
    with pytest.raises(RateLimited):
        controller.try_admit(t)

    clock.advance(3600)  # a long idle refills to one minute's worth, not more
    for _ in range(3):
        controller.try_admit(t).release()
    with pytest.raises(RateLimited):
        controller.try_admit(t)


@pytest.mark.parametrize(
    ("requests_per_minute", "elapsed_s", "retry_after_s"),
    [
        (7, 0.0, 9),  # 60/7 = 8.57 s rounds up
        (3, 14.0, 6),  # 20 s per token, 14 s in: 6 s left, though the float is 6.000000000000001
        (600, 0.0, 1),  # 0.1 s, but never less than a second
        (60, 0.999, 1),
    ],
)
def test_retry_after_is_the_wait_for_the_next_token_in_whole_seconds(requests_per_minute, elapsed_s, retry_after_s):
    clock = FakeClock()
    controller = AdmissionController(1000, clock=clock)
    t = tenant(requests_per_minute=requests_per_minute)
    for _ in range(requests_per_minute):
        controller.try_admit(t).release()
    clock.advance(elapsed_s)
    with pytest.raises(RateLimited) as excinfo:
        controller.try_admit(t)
    assert excinfo.value.retry_after_s == retry_after_s


def test_rate_limits_are_per_tenant():
    controller = AdmissionController(100, clock=FakeClock())
    a, b = tenant("a", requests_per_minute=1), tenant("b", requests_per_minute=1)
    controller.try_admit(a).release()
    with pytest.raises(RateLimited):
        controller.try_admit(a)
    controller.try_admit(b).release()


def test_a_refused_request_spends_no_token():
    controller = AdmissionController(100, clock=FakeClock())
    t = tenant(max_concurrency=1, requests_per_minute=2)
    held = controller.try_admit(t)
    for _ in range(5):
        with pytest.raises(TooManyConcurrent):
            controller.try_admit(t)
    held.release()
    controller.try_admit(t).release()  # the second token is still there


# ---- concurrency and the global bound ---------------------------------------------------


def test_a_tenant_over_its_concurrency_gets_429_while_others_are_admitted():
    controller = AdmissionController(100)
    a = tenant("a", max_concurrency=2)
    held = [controller.try_admit(a), controller.try_admit(a)]

    with pytest.raises(TooManyConcurrent) as excinfo:
        controller.try_admit(a)
    assert excinfo.value.status_code == 429 and excinfo.value.retry_after_s >= 1
    controller.try_admit(tenant("b", max_concurrency=2)).release()

    held[0].release()
    controller.try_admit(a).release()


def test_the_slot_is_released_when_the_request_raises():
    async def main():
        controller = AdmissionController(100)
        t = tenant(max_concurrency=1)
        with pytest.raises(RuntimeError):
            async with controller.admit(t):
                raise RuntimeError("engine failed")
        assert controller.stats().tenants["a"].active == 0 and controller.in_flight == 0
        async with controller.admit(t) as ticket:
            assert ticket.priority == 0

    asyncio.run(main())


def test_the_slot_is_released_when_the_request_task_is_cancelled():
    async def main():
        controller = AdmissionController(100)
        t = tenant(max_concurrency=1)
        inside = asyncio.Event()

        async def request() -> None:
            async with controller.admit(t):
                inside.set()
                await asyncio.Event().wait()  # a generation that never finishes by itself

        task = asyncio.create_task(request())
        await inside.wait()
        with pytest.raises(TooManyConcurrent):
            controller.try_admit(t)

        task.cancel()  # the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await task
        assert controller.in_flight == 0 and controller.stats().tenants["a"].active == 0
        controller.try_admit(t).release()

    asyncio.run(main())


def test_the_global_bound_refuses_with_503_whoever_asks():
    controller = AdmissionController(max_queued_requests=3)
    held = [controller.try_admit(tenant("a")), controller.try_admit(tenant("a")), controller.try_admit(tenant("b"))]

    for who in ("a", "b", "c"):
        with pytest.raises(Overloaded) as excinfo:
            controller.try_admit(tenant(who))
        assert excinfo.value.status_code == 503 and excinfo.value.retry_after_s >= 1
        assert isinstance(excinfo.value, AdmissionRejected)

    held[2].release()
    controller.try_admit(tenant("c")).release()


def test_a_ticket_released_twice_frees_one_slot():
    controller = AdmissionController(2)
    first, _second = controller.try_admit(tenant()), controller.try_admit(tenant())
    first.release()
    first.release()
    assert first.released and controller.in_flight == 1


def test_a_ticket_can_outlive_the_scope_that_admitted_it():
    """A streamed response keeps its slot after the handler returns, until the stream ends."""

    async def main():
        controller = AdmissionController(1)

        async def handler():
            ticket = controller.try_admit(tenant())

            async def stream():
                try:
                    yield b"chunk"
                finally:
                    ticket.release()

            return stream()

        body = await handler()
        assert controller.in_flight == 1
        async for _ in body:
            pass
        assert controller.in_flight == 0

    asyncio.run(main())


# ---- fairness and stats ----------------------------------------------------------------


def test_another_tenants_first_request_outranks_a_bursting_tenants_next_one():
    controller = AdmissionController(100)
    a, b = tenant("a"), tenant("b")
    burst = [controller.try_admit(a) for _ in range(5)]
    assert [t.priority for t in burst] == [0, 1, 2, 3, 4]

    a_sixth = controller.try_admit(a)
    b_first = controller.try_admit(b)
    assert b_first.priority < a_sixth.priority, "lower runs first in vLLM's priority scheduler"
    assert (b_first.priority, a_sixth.priority) == (0, 5)

    for ticket in burst:
        ticket.release()
    assert controller.try_admit(a).priority == 1, "only a's remaining in-flight request counts"


def test_stats_count_active_admitted_and_rejected_per_tenant():
    clock = FakeClock()
    controller = AdmissionController(3, clock=clock)
    a = tenant("a", max_concurrency=2, requests_per_minute=3)
    b = tenant("b")

    held_a = [controller.try_admit(a), controller.try_admit(a)]
    with pytest.raises(TooManyConcurrent):
        controller.try_admit(a)
    held_b = controller.try_admit(b)
    with pytest.raises(Overloaded):
        controller.try_admit(b)
    held_a[0].release()
    controller.try_admit(a).release()  # third and last token
    with pytest.raises(RateLimited):
        controller.try_admit(a)

    stats = controller.stats()
    assert (stats.in_flight, stats.max_in_flight) == (2, 3)
    sa, sb = stats.tenants["a"], stats.tenants["b"]
    assert (sa.active, sa.admitted, sa.rejected_too_many_concurrent, sa.rejected_rate_limited) == (1, 3, 1, 1)
    assert (sb.active, sb.admitted, sb.rejected_overloaded, sb.rejected) == (1, 1, 1, 1)

    held_b.release()
    assert stats.tenants["b"].active == 1, "a snapshot does not change afterwards"
