"""Dispatcher state in Redis, shared by every replica: the same contract as ``MemoryStore`` (the reference).

Every operation is one Lua script (EVALSHA), so it is atomic across replicas, and every script takes ``now`` from
``redis.call('TIME')``: replicas with skewed clocks still agree on heartbeats, expiries and load buckets.

Key layout (``P`` is the ``prefix``, ``dispatch:`` by default; ``E`` an endpoint name, ``W`` a worker id)::

    P request_idx           string  the last request_idx issued (INCR: starts at 1, never 0)
    P expiries              zset    member request_idx, score its expiry (unix seconds)
    P req:<idx>             hash    endpoint, cost, worker (absent while no worker holds it)
    P workers:E             set     the worker ids of endpoint E
    P worker:E/W            hash    url, state, max_perf, cur_load, in_flight, last_seen (the last report),
                                    load, reqnum (the dispatcher's ledger)
    P rate:E:<second>       string  cost routed as new requests to E in that second; EXPIRE LOAD_HISTORY_S

Endpoint names cannot contain ``/`` (``endpoints.ENDPOINT_NAME``), which keeps ``E/W`` unambiguous; a worker id
may contain anything. The scripts reach keys they discover (an expired request of any endpoint, an endpoint's
workers), so this needs a single Redis primary (Sentinel is fine), not Redis Cluster. Redis >= 6.

Numbers cross into Lua as strings (Python ``repr``: shortest round-trip) and come back through
``string.format('%.17g', x)``: Lua numbers are C doubles, so loads follow exactly the arithmetic ``MemoryStore``
does. (``HINCRBYFLOAT`` is not used for that reason: it sums in long double and prints 17 *decimal places*, so
0.1 + 0.2 gives ``0.3`` and 1e-20 gives ``0``.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.dispatch.memory_store import EXPIRY_SWEEP_LIMIT, LOAD_HISTORY_S, ZERO_LOAD, settle
from service.dispatch.pipelining import ScriptPipeliner
from service.dispatch.records import (
    REQNUMS_PER_SECOND,
    STATUS_KEYS,
    Assigned,
    NoReadyWorker,
    PickPolicy,
    Released,
    RouteOutcome,
    WorkerRecord,
    WorkerReport,
    WorkerState,
)
from service.dispatch.store import LOAD_RATE_BUCKET_S, LoadStats, StoreUnavailable, UnknownRequest

DEFAULT_PREFIX = "dispatch:"

# Shared by every script. ARGV[1..3]: prefix, ZERO_LOAD, EXPIRY_SWEEP_LIMIT; a script's own arguments follow.
_PRELUDE = r"""
local prefix = ARGV[1]
local zero_load = tonumber(ARGV[2])
local sweep_limit = tonumber(ARGV[3])
local expiries = prefix .. 'expiries'

local function fmt(x) return string.format('%.17g', x) end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- MemoryStore's settle(): sums of added and removed costs leave float dust; an idle worker's load is exactly 0
local function settle(x)
  if math.abs(x) < zero_load then return 0 end
  return x
end

local function worker_key(endpoint, worker_id) return prefix .. 'worker:' .. endpoint .. '/' .. worker_id end

-- adds delta to a worker's load (if the worker exists); returns the new load or nil
local function add_load(endpoint, worker_id, delta)
  local key = worker_key(endpoint, worker_id)
  local load = redis.call('HGET', key, 'load')
  if not load then return nil end
  load = settle(tonumber(load) + delta)
  redis.call('HSET', key, 'load', fmt(load))
  return load
end

-- requests never released give their load back; bounded work per call, as MemoryStore._expire
local function sweep(now)
  local idxs = redis.call('ZRANGEBYSCORE', expiries, '-inf', fmt(now), 'LIMIT', 0, sweep_limit)
  for _, idx in ipairs(idxs) do
    local key = prefix .. 'req:' .. idx
    local r = redis.call('HMGET', key, 'endpoint', 'cost', 'worker')
    if r[1] and r[3] then add_load(r[1], r[3], -tonumber(r[2])) end
    redis.call('DEL', key)
  end
  if #idxs > 0 then redis.call('ZREM', expiries, unpack(idxs)) end
end
"""

# ARGV[4..]: endpoint, cost, request_idx ('' for a new request), max_queue_time_s, heartbeat_timeout_s,
# request_ttl_s, LOAD_RATE_BUCKET_S, LOAD_HISTORY_S.
# Returns {-1} for an unknown request, {1, idx, worker_id, url, reqnum} when assigned, and
# {0, idx, category, count, ...} when no worker is ready.
_ROUTE = (
    _PRELUDE
    + r"""
local endpoint = ARGV[4]
local cost = tonumber(ARGV[5])
local idx = ARGV[6]
local max_queue = tonumber(ARGV[7])
local heartbeat = tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])
local bucket = tonumber(ARGV[10])
local history = ARGV[11]

local now = clock()
sweep(now)

local retry = idx ~= ''
local prev_worker, prev_cost = false, 0
if retry then
  local r = redis.call('HMGET', prefix .. 'req:' .. idx, 'endpoint', 'cost', 'worker')
  if r[1] ~= endpoint then return {-1} end
  prev_worker, prev_cost = r[3], tonumber(r[2])
end

local workers = {}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'workers:' .. endpoint)) do
  local r = redis.call('HMGET', worker_key(endpoint, id), 'state', 'max_perf', 'last_seen', 'load', 'url')
  if r[1] then
    workers[#workers + 1] = {id = id, state = r[1], max_perf = tonumber(r[2]), last_seen = tonumber(r[3]),
                             load = tonumber(r[4]), url = r[5]}
  end
end

if retry and prev_worker then
  -- a retry's load leaves its old worker before picking, wherever it goes next (as MemoryStore does)
  local load = add_load(endpoint, prev_worker, -prev_cost)
  if load then
    for _, w in ipairs(workers) do
      if w.id == prev_worker then w.load = load end
    end
  end
end

-- Python's str ordering (code points), not Lua's strcoll: UTF-8 bytes sort the same way
local function bytes_lt(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- selection.pick_worker: key (avoid, wait, load, worker_id), compared as a Python tuple
local function key_lt(a, b)
  if a.avoid ~= b.avoid then return b.avoid end
  if a.wait ~= b.wait then return a.wait < b.wait end
  if a.load ~= b.load then return a.load < b.load end
  return bytes_lt(a.id, b.id)
end

local best, best_key = nil, nil
for _, w in ipairs(workers) do
  -- written as the negations of selection.py's `continue` tests so that NaN behaves the same
  if w.state == 'ready' and not (w.max_perf <= 0) and now - w.last_seen <= heartbeat then
    local wait = w.load / w.max_perf
    if not (wait > max_queue) then
      local key = {avoid = (w.id == prev_worker), wait = wait, load = w.load, id = w.id}
      if best_key == nil or key_lt(key, best_key) then best, best_key = w, key end
    end
  end
end

if not retry then
  idx = fmt(redis.call('INCR', prefix .. 'request_idx'))
  local rate_key = prefix .. 'rate:' .. endpoint .. ':' .. fmt(math.floor(now / bucket) * bucket)
  local rate = tonumber(redis.call('GET', rate_key) or '0')
  redis.call('SET', rate_key, fmt(rate + cost), 'EX', history)
end

local req_key = prefix .. 'req:' .. idx
redis.call('DEL', req_key)
redis.call('ZADD', expiries, fmt(now + ttl), idx)

if best then
  local key = worker_key(endpoint, best.id)
  redis.call('HSET', key, 'load', fmt(best.load + cost))
  local reqnum = redis.call('HINCRBY', key, 'reqnum', 1)
  redis.call('HSET', req_key, 'endpoint', endpoint, 'cost', ARGV[5], 'worker', best.id)
  return {1, idx, best.id, best.url, reqnum}
end

redis.call('HSET', req_key, 'endpoint', endpoint, 'cost', ARGV[5])
-- selection.status_breakdown
local counts, order = {}, {}
for _, w in ipairs(workers) do
  local category
  if not (now - w.last_seen <= heartbeat) then
    category = 'inactive'
  elseif w.state == 'ready' and (w.max_perf <= 0 or w.load / w.max_perf > max_queue) then
    category = 'busy'
  else
    category = w.state
  end
  if counts[category] == nil then
    counts[category] = 0
    order[#order + 1] = category
  end
  counts[category] = counts[category] + 1
end
local reply = {0, idx}
for _, category in ipairs(order) do
  reply[#reply + 1] = category
  reply[#reply + 1] = counts[category]
end
return reply
"""
)

# ARGV[4..]: endpoint, worker_id, url, state, max_perf, cur_load, in_flight, reqnums_per_s.
# Returns {last_seen, load, reqnum}.
_REPORT = (
    _PRELUDE
    + r"""
local endpoint, id = ARGV[4], ARGV[5]
local t = clock()
local now = fmt(t)
local key = worker_key(endpoint, id)
redis.call('HSET', key, 'url', ARGV[6], 'state', ARGV[7], 'max_perf', ARGV[8], 'cur_load', ARGV[9],
           'in_flight', ARGV[10], 'last_seen', now)
-- the ledger is the dispatcher's own: a report never resets it
redis.call('HSETNX', key, 'load', '0')
-- a new record's reqnums start at the clock (records.reqnum_origin), above any issued before a lost counter
redis.call('HSETNX', key, 'reqnum', fmt(math.floor(t * tonumber(ARGV[11]))))
redis.call('SADD', prefix .. 'workers:' .. endpoint, id)
local r = redis.call('HMGET', key, 'load', 'reqnum')
return {now, r[1], r[2]}
"""
)

# ARGV[4..]: endpoint, request_idx... Returns {released, unknown}.
_RELEASE = (
    _PRELUDE
    + r"""
local endpoint = ARGV[4]
local released, unknown = 0, 0
for i = 5, #ARGV do
  local key = prefix .. 'req:' .. ARGV[i]
  local r = redis.call('HMGET', key, 'endpoint', 'cost', 'worker')
  if r[1] == endpoint then
    redis.call('DEL', key)
    redis.call('ZREM', expiries, ARGV[i])
    if r[3] then add_load(endpoint, r[3], -tonumber(r[2])) end
    released = released + 1
  else
    unknown = unknown + 1
  end
end
return {released, unknown}
"""
)

_WORKER_FIELDS = ("url", "state", "max_perf", "cur_load", "in_flight", "last_seen", "load", "reqnum")

# ARGV[4]: endpoint. Returns {worker_id, url, state, max_perf, cur_load, in_flight, last_seen, load, reqnum, ...}.
_WORKERS = (
    _PRELUDE
    + r"""
local endpoint = ARGV[4]
sweep(clock())
local reply = {}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'workers:' .. endpoint)) do
  local r = redis.call('HMGET', worker_key(endpoint, id), FIELDS)
  if r[1] then
    reply[#reply + 1] = id
    for _, value in ipairs(r) do reply[#reply + 1] = value end
  end
end
return reply
""".replace("FIELDS", ", ".join(f"'{name}'" for name in _WORKER_FIELDS))
)

# ARGV[4..]: endpoint, window_s, LOAD_RATE_BUCKET_S, LOAD_HISTORY_S.
# Returns {sum of the buckets in the window, load of each worker...}.
_LOAD_STATS = (
    _PRELUDE
    + r"""
local endpoint = ARGV[4]
local window = tonumber(ARGV[5])
local bucket = tonumber(ARGV[6])
local history = tonumber(ARGV[7])
local now = clock()
sweep(now)
local start = math.floor(now / bucket) * bucket
-- the window's buckets: the current one and those starting after start - window (as MemoryStore sums);
-- older than the history they have expired anyway
local back = math.min(math.floor(window / bucket) - 1, math.floor(history / bucket))
local total = 0
for k = back, 0, -1 do  -- oldest first, the order MemoryStore sums in
  local value = redis.call('GET', prefix .. 'rate:' .. endpoint .. ':' .. fmt(start - k * bucket))
  if value then total = total + tonumber(value) end
end
local reply = {fmt(total)}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'workers:' .. endpoint)) do
  local load = redis.call('HGET', worker_key(endpoint, id), 'load')
  if load then reply[#reply + 1] = load end
end
return reply
"""
)


def _num(value: float) -> str:
    """A float as Lua's tonumber reads it back exactly (repr is the shortest round-trip form)."""
    return repr(float(value))


def _check_endpoint(endpoint: str) -> str:
    if "/" in endpoint:  # keeps worker keys (worker:E/W) unambiguous; configured names never contain one
        raise ValueError(f"endpoint name {endpoint!r} contains '/'")
    return endpoint


def _redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return parts._replace(netloc=f"{user}***@{netloc}").geturl()


class RedisStore:
    """``DispatchStore`` on Redis (see the module docstring). Connects lazily; ``open`` also checks the server."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout_s: float = 1.0,
        socket_timeout_s: float = 1.0,
        max_connections: int = 64,
        pool_timeout_s: float = 1.0,
        reqnums_per_s: int = REQNUMS_PER_SECOND,
    ) -> None:
        self._where = _redacted(url)
        self._prefix = prefix
        self._reqnums_per_s = reqnums_per_s
        # No client-side retries: a lost reply to a route script may mean it ran, and running it again would
        # reserve the cost twice. The caller answers 503 and its client retries with what it was given.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = Redis.from_pool(pool)  # owns the pool: close() disconnects it
        self._common = (prefix, _num(ZERO_LOAD), str(EXPIRY_SWEEP_LIMIT))
        self._route = ScriptPipeliner(self._redis, _ROUTE)  # the hot path: concurrent routes share a round trip
        self._report = self._redis.register_script(_REPORT)
        self._release = self._redis.register_script(_RELEASE)
        self._workers = self._redis.register_script(_WORKERS)
        self._load_stats = self._redis.register_script(_LOAD_STATS)

    @classmethod
    async def open(cls, url: str, **options: Any) -> RedisStore:
        """A store whose server answered PING (``StoreUnavailable`` otherwise): for start-up checks."""
        store = cls(url, **options)
        try:
            await store.ping()
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def prefix(self) -> str:
        return self._prefix

    async def route(self, endpoint: str, cost: float, request_idx: int | None, policy: PickPolicy) -> RouteOutcome:
        args = (
            *self._common,
            _check_endpoint(endpoint),
            _num(cost),
            "" if request_idx is None else str(int(request_idx)),
            _num(policy.max_queue_time_s),
            _num(policy.heartbeat_timeout_s),
            _num(policy.request_ttl_s),
            str(LOAD_RATE_BUCKET_S),
            str(LOAD_HISTORY_S),
        )
        with self._unavailable("route"):
            reply = await self._route.call(args)
        code = int(reply[0])
        if code < 0:
            raise UnknownRequest(request_idx)
        idx = int(reply[1])
        if code == 1:
            return Assigned(request_idx=idx, worker_id=reply[2], url=reply[3], reqnum=int(reply[4]))
        status = dict.fromkeys(STATUS_KEYS, 0)
        for category, count in zip(reply[2::2], reply[3::2], strict=True):
            status[category] = int(count)
        return NoReadyWorker(request_idx=idx, status=status)

    async def report(self, endpoint: str, report: WorkerReport) -> WorkerRecord:
        args = (
            *self._common,
            _check_endpoint(endpoint),
            report.worker_id,
            report.url,
            report.state.value,
            _num(report.max_perf),
            _num(report.cur_load),
            str(int(report.in_flight)),
            str(self._reqnums_per_s),
        )
        with self._unavailable("report"):
            last_seen, load, reqnum = await self._report(args=args)
        return WorkerRecord(
            worker_id=report.worker_id,
            url=report.url,
            state=report.state,
            max_perf=report.max_perf,
            cur_load=report.cur_load,
            in_flight=report.in_flight,
            last_seen=float(last_seen),
            load=float(load),
            reqnum=int(reqnum),
        )

    async def release(self, endpoint: str, request_idxs: Sequence[int]) -> Released:
        if not request_idxs:
            return Released(released=0, unknown=0)
        args = (*self._common, _check_endpoint(endpoint), *(str(int(idx)) for idx in request_idxs))
        with self._unavailable("release"):
            released, unknown = await self._release(args=args)
        return Released(released=int(released), unknown=int(unknown))

    async def workers(self, endpoint: str) -> list[WorkerRecord]:
        with self._unavailable("workers"):
            reply = await self._workers(args=(*self._common, _check_endpoint(endpoint)))
        width = 1 + len(_WORKER_FIELDS)
        records = []
        for i in range(0, len(reply), width):
            worker_id, url, state, max_perf, cur_load, in_flight, last_seen, load, reqnum = reply[i : i + width]
            records.append(
                WorkerRecord(
                    worker_id=worker_id,
                    url=url,
                    state=WorkerState(state),
                    max_perf=float(max_perf),
                    cur_load=float(cur_load),
                    in_flight=int(in_flight),
                    last_seen=float(last_seen),
                    load=float(load),
                    reqnum=int(reqnum),
                )
            )
        return sorted(records, key=lambda w: w.worker_id)

    async def load_stats(self, endpoint: str, window_s: float) -> LoadStats:
        args = (*self._common, _check_endpoint(endpoint), _num(window_s), str(LOAD_RATE_BUCKET_S), str(LOAD_HISTORY_S))
        with self._unavailable("load_stats"):
            reply = await self._load_stats(args=args)
        outstanding = sum(float(load) for load in reply[1:])
        return LoadStats(load_rate=float(reply[0]) / window_s, outstanding=settle(outstanding))

    async def now(self) -> float:
        with self._unavailable("TIME"):
            seconds, micros = await self._redis.time()
        return seconds + micros / 1_000_000  # the same double the scripts compute

    async def ping(self) -> None:
        with self._unavailable("PING"):
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    @contextlib.contextmanager
    def _unavailable(self, what: str) -> Iterator[None]:
        """Any Redis failure (unreachable, timed out, loading, read-only, OOM, script error) as ``StoreUnavailable``.
        NOSCRIPT never gets here: the registered scripts load themselves again."""
        try:
            yield
        except (RedisError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise StoreUnavailable(f"redis at {self._where}: {what} failed: {detail}") from exc
