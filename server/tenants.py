"""API keys, per-tenant limits, fair priorities and the server's global bound on requests.

Tenants come from `--api-key` style keys and/or a keys file. The keys file is a JSON list
of objects; only "key" is required:

    [
      {"key": "sk-team-a-...", "name": "team-a", "max_concurrency": 4, "requests_per_minute": 120},
      {"key": "sk-team-b-...", "name": "team-b"},
      {"key": "sk-team-a-new", "name": "team-a", "max_concurrency": 4, "requests_per_minute": 120}
    ]

- "name" becomes the tenant id (saved voices and metrics are keyed by it), so it should be
  stable: keep the name when rotating a key. Several keys with the same name are one tenant
  (old and new key valid together during a rotation); they must then give the same limits.
  A key without a name gets the id "key-<hash of the key>", never the key itself.
- "max_concurrency": requests of the tenant in flight at once; "requests_per_minute": the
  refill rate of its token bucket, which holds at most one minute's worth of requests.
  A missing field takes the registry's default limits; null means no limit.

With no key configured at all, authentication is off and every request belongs to one
anonymous tenant (limited by `anonymous_limits`, unlimited by default).

`AdmissionController` admits a request of a tenant or refuses it at once (it never queues):
the tenant's token bucket and concurrency cap first, then the global bound on requests in
flight. An admitted request gets a scheduling priority for vLLM (lower runs first) equal to
the number of requests its tenant already had in flight, so a tenant's first request is
never behind another tenant's burst. The controller is meant for one event loop: admission
and release never await, so they cannot interleave and need no lock.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

ANONYMOUS_TENANT_ID = "anonymous"
_KEY_ID_DOMAIN = b"vllm-qwen3tts tenant id\x00"  # so the id is not a bare sha256 of the key
_KEYS_FILE_FIELDS = {"key", "name", "max_concurrency", "requests_per_minute"}
# Refusals whose wait cannot be computed (a concurrency slot or a global slot frees when some
# request finishes) still send a Retry-After hint so clients back off instead of spinning.
DEFAULT_RETRY_AFTER_S = 1


# ---- tenants and keys ------------------------------------------------------------------


def _check_limit(name: str, value: Any, *, integer: bool) -> None:
    if value is None:
        return
    valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid_type or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {kind} or null, got {value!r}")


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits; None means no limit."""

    max_concurrency: int | None = None
    requests_per_minute: float | None = None

    def __post_init__(self) -> None:
        _check_limit("max_concurrency", self.max_concurrency, integer=True)
        _check_limit("requests_per_minute", self.requests_per_minute, integer=False)


@dataclass(frozen=True)
class Tenant:
    id: str  # stable; owns saved voices and labels metrics. Never the raw key.
    name: str
    max_concurrency: int | None = None
    requests_per_minute: float | None = None


class Unauthorized(Exception):
    """Missing, malformed or unknown API key (HTTP 401). The message never contains the key."""


@dataclass(frozen=True)
class _KeyEntry:
    digest: bytes  # sha256 of the key: fixed length, so comparing leaks nothing about length
    tenant: Tenant


class TenantRegistry:
    """Who a request belongs to, from its Authorization header."""

    def __init__(self, entries: Iterable[tuple[str, Tenant]] = (), anonymous_limits: TenantLimits = TenantLimits()):
        self._entries = [_KeyEntry(_digest(key), tenant) for key, tenant in entries]
        self._anonymous = Tenant(
            id=ANONYMOUS_TENANT_ID,
            name=ANONYMOUS_TENANT_ID,
            max_concurrency=anonymous_limits.max_concurrency,
            requests_per_minute=anonymous_limits.requests_per_minute,
        )

    @classmethod
    def from_sources(
        cls,
        keys: Iterable[str] = (),
        keys_file: Path | None = None,
        default_limits: TenantLimits = TenantLimits(),
        anonymous_limits: TenantLimits = TenantLimits(),
    ) -> TenantRegistry:
        """Keys given directly (unnamed, default limits) plus those of a keys file (see the
        module docstring). Raises ValueError for a malformed file, an empty or repeated key,
        or one name given with two different limits; messages never contain a key."""
        specs: list[tuple[str, str | None, TenantLimits]] = [
            (key, None, default_limits) for key in keys
        ]
        if keys_file is not None:
            specs += _read_keys_file(Path(keys_file), default_limits)

        entries: list[tuple[str, Tenant]] = []
        tenants_by_id: dict[str, Tenant] = {}
        seen_digests: set[bytes] = set()
        for index, (key, name, limits) in enumerate(specs):
            where = f"API key #{index + 1}" + (f" ({name!r})" if name else "")
            if not isinstance(key, str) or not key or key != key.strip() or any(c.isspace() for c in key):
                raise ValueError(f"{where}: a key must be a non-empty string without whitespace")
            digest = _digest(key)
            if digest in seen_digests:
                raise ValueError(f"{where}: the same key is configured twice")
            seen_digests.add(digest)
            tenant_id = name if name else _key_tenant_id(key)
            tenant = Tenant(
                id=tenant_id,
                name=name or tenant_id,
                max_concurrency=limits.max_concurrency,
                requests_per_minute=limits.requests_per_minute,
            )
            existing = tenants_by_id.get(tenant_id)
            if existing is not None and existing != tenant:
                raise ValueError(f"{where}: tenant {tenant_id!r} is configured with two different limits")
            tenants_by_id[tenant_id] = tenant
            entries.append((key, tenant))
        return cls(entries, anonymous_limits=anonymous_limits)

    @property
    def auth_enabled(self) -> bool:
        return bool(self._entries)

    @property
    def tenants(self) -> list[Tenant]:
        """Every tenant a request can belong to (for metrics that list all of them up front)."""
        if not self.auth_enabled:
            return [self._anonymous]
        unique: dict[str, Tenant] = {}
        for entry in self._entries:
            unique.setdefault(entry.tenant.id, entry.tenant)
        return list(unique.values())

    def authenticate(self, authorization_header: str | None) -> Tenant:
        """Tenant of `Authorization: Bearer <key>`; raises `Unauthorized`.

        With authentication off every request, whatever its header, is the anonymous tenant:
        OpenAI clients always send some key.
        """
        if not self.auth_enabled:
            return self._anonymous
        if not authorization_header:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, credentials = authorization_header.strip().partition(" ")
        key = credentials.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        digest = _digest(key)
        # Compare against every configured key, in constant time each, without stopping at a
        # match: neither how long a comparison takes nor how many ran depends on the key.
        match: Tenant | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                match = entry.tenant
        if match is None:
            raise Unauthorized("invalid API key")
        return match


def _read_keys_file(path: Path, default_limits: TenantLimits) -> list[tuple[str, str | None, TenantLimits]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read API keys file {path}: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"API keys file {path}: expected a JSON list of objects")
    specs = []
    for index, item in enumerate(data):
        where = f"API keys file {path}, entry #{index + 1}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object")
        unknown = set(item) - _KEYS_FILE_FIELDS
        if unknown:  # a misspelt limit would otherwise silently mean "default"
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        if "key" not in item:
            raise ValueError(f"{where}: missing 'key'")
        name = item.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"{where}: 'name' must be a non-empty string")
        try:
            limits = TenantLimits(
                max_concurrency=item.get("max_concurrency", default_limits.max_concurrency),
                requests_per_minute=item.get("requests_per_minute", default_limits.requests_per_minute),
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        specs.append((item["key"], name, limits))
    return specs


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _key_tenant_id(key: str) -> str:
    return "key-" + hashlib.sha256(_KEY_ID_DOMAIN + key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# ---- admission -------------------------------------------------------------------------


class AdmissionRejected(Exception):
    """A request refused before it reached the engine; carries its HTTP status and a
    Retry-After in whole seconds."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: int = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(AdmissionRejected):
    """The tenant's requests-per-minute budget is spent (429)."""


class TooManyConcurrent(AdmissionRejected):
    """The tenant already has `max_concurrency` requests in flight (429)."""


class Overloaded(AdmissionRejected):
    """The server holds as many requests as it accepts in total (503)."""

    status_code = 503


@dataclass
class TenantAdmissionStats:
    active: int = 0
    admitted: int = 0  # totals since start, for Prometheus counters
    rejected_rate_limited: int = 0
    rejected_too_many_concurrent: int = 0
    rejected_overloaded: int = 0

    @property
    def rejected(self) -> int:
        return self.rejected_rate_limited + self.rejected_too_many_concurrent + self.rejected_overloaded


@dataclass(frozen=True)
class AdmissionStats:
    in_flight: int
    max_in_flight: int
    tenants: dict[str, TenantAdmissionStats]  # by tenant id; a snapshot, safe to keep


@dataclass
class _TokenBucket:
    tokens: float
    updated_at: float


@dataclass
class _TenantState:
    stats: TenantAdmissionStats = field(default_factory=TenantAdmissionStats)
    bucket: _TokenBucket | None = None


class AdmissionTicket:
    """An admitted request. Hold it until the request is completely done — for a streamed
    response that is when the stream ends, after the handler has returned — then
    `release()` it (idempotent), or use it as an (async) context manager."""

    def __init__(self, controller: AdmissionController, tenant_id: str, priority: int):
        self.tenant_id = tenant_id
        self.priority = priority  # for vLLM's priority scheduler: lower runs first
        self._controller: AdmissionController | None = controller

    @property
    def released(self) -> bool:
        return self._controller is None

    def release(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller._release(self.tenant_id)

    def __enter__(self) -> AdmissionTicket:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    async def __aenter__(self) -> AdmissionTicket:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"AdmissionTicket(tenant_id={self.tenant_id!r}, priority={self.priority}, {state})"


class AdmissionController:
    """Admits requests per tenant and in total, or refuses them at once.

    `max_queued_requests` bounds the requests in flight across all tenants (running or
    waiting in the engine); beyond it requests get 503 rather than queueing without bound.
    """

    def __init__(self, max_queued_requests: int, *, clock: Callable[[], float] = time.monotonic):
        if max_queued_requests < 1:
            raise ValueError("max_queued_requests must be at least 1")
        self.max_queued_requests = max_queued_requests
        self._clock = clock
        self._in_flight = 0
        self._tenants: dict[str, _TenantState] = {}

    def admit(self, tenant: Tenant) -> _Admission:
        """`async with controller.admit(tenant) as ticket:` — raises a subclass of
        `AdmissionRejected` on entry; releases the slot on any exit, cancellation included."""
        return _Admission(self, tenant)

    def try_admit(self, tenant: Tenant) -> AdmissionTicket:
        """Admit now or raise `RateLimited`, `TooManyConcurrent` or `Overloaded`. The caller
        must `release()` the ticket; prefer `admit()` unless the request outlives the scope
        that admitted it (streamed responses)."""
        state = self._tenants.setdefault(tenant.id, _TenantState())
        now = self._clock()

        # The bucket is checked first but only spent once every check has passed: a refused
        # request costs the tenant nothing.
        if tenant.requests_per_minute is not None:
            bucket = self._refilled_bucket(state, tenant.requests_per_minute, now)
            if bucket.tokens < 1.0:
                state.stats.rejected_rate_limited += 1
                wait_s = _whole_seconds((1.0 - bucket.tokens) * 60.0 / tenant.requests_per_minute)
                raise RateLimited(
                    f"rate limit reached: this API key may make {tenant.requests_per_minute:g} requests per minute "
                    f"(requests_per_minute); retry in {wait_s} s",
                    retry_after_s=wait_s,
                )
        if tenant.max_concurrency is not None and state.stats.active >= tenant.max_concurrency:
            state.stats.rejected_too_many_concurrent += 1
            limit = tenant.max_concurrency
            raise TooManyConcurrent(f"concurrency limit reached: this API key may have {limit} request"
                                    f"{'s' if limit > 1 else ''} in flight at once (max_concurrency) and has "
                                    f"{state.stats.active}; retry when one finishes")
        if self._in_flight >= self.max_queued_requests:
            state.stats.rejected_overloaded += 1
            raise Overloaded("server overloaded: too many requests in flight, retry later")

        if tenant.requests_per_minute is not None:
            assert state.bucket is not None
            state.bucket.tokens -= 1.0
        priority = state.stats.active
        state.stats.active += 1
        state.stats.admitted += 1
        self._in_flight += 1
        return AdmissionTicket(self, tenant.id, priority)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            in_flight=self._in_flight,
            max_in_flight=self.max_queued_requests,
            tenants={
                tenant_id: TenantAdmissionStats(**vars(state.stats)) for tenant_id, state in self._tenants.items()
            },
        )

    def _refilled_bucket(self, state: _TenantState, requests_per_minute: float, now: float) -> _TokenBucket:
        # Capacity is one minute's worth: a tenant may burst its whole per-minute budget.
        capacity = requests_per_minute
        if state.bucket is None:
            state.bucket = _TokenBucket(tokens=capacity, updated_at=now)
        else:
            elapsed = max(0.0, now - state.bucket.updated_at)  # a clock that steps back refills nothing
            state.bucket.tokens = min(capacity, state.bucket.tokens + elapsed * requests_per_minute / 60.0)
            state.bucket.updated_at = now
        return state.bucket

    def _release(self, tenant_id: str) -> None:
        self._tenants[tenant_id].stats.active -= 1
        self._in_flight -= 1


class _Admission:
    """The async context manager of `AdmissionController.admit`."""

    def __init__(self, controller: AdmissionController, tenant: Tenant):
        self._controller = controller
        self._tenant = tenant
        self._ticket: AdmissionTicket | None = None

    async def __aenter__(self) -> AdmissionTicket:
        self._ticket = self._controller.try_admit(self._tenant)
        return self._ticket

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._ticket is not None:
            self._ticket.release()


def _whole_seconds(seconds: float) -> int:
    # The tolerance keeps float noise (5.999999999 or 6.000000001 for an exact 6 s) from
    # adding a second; Retry-After is never below 1 s.
    return max(1, math.ceil(seconds - 1e-9))


__all__ = [
    "ANONYMOUS_TENANT_ID",
    "AdmissionController",
    "AdmissionRejected",
    "AdmissionStats",
    "AdmissionTicket",
    "Overloaded",
    "RateLimited",
    "Tenant",
    "TenantAdmissionStats",
    "TenantLimits",
    "TenantRegistry",
    "TooManyConcurrent",
    "Unauthorized",
]
