"""Dispatcher state in Redis, shared by every replica: the same contract as ``MemoryStore`` (the reference).

Every operation is one Lua script (EVALSHA), so it is atomic across replicas, and every script takes ``now`` from
``redis.call('TIME')``: replicas with skewed clocks still agree on heartbeats, expiries and load buckets.

Key layout (``P`` is the ``prefix``, ``dispatch:`` by default; ``E`` an endpoint name, ``W`` a worker id)::

    P request_idx           string  the last request_idx issued (INCR; a missing counter restarts at the clock)
    P expiries              zset    member request_idx, score its expiry (unix seconds)
    P req:<idx>             hash    endpoint, cost, worker (absent while no worker holds it: waiting, or released
                                    and kept for a retry until it expires), idem (its Idempotency-Key),
                                    released_by (the worker that released it, which its retry avoids)
    P endpoints             set     the endpoints E with a workers:E set (report adds, forget removes when empty)
    P workers:E             set     the worker ids of endpoint E
    P worker:E/W            hash    url, state, max_perf, cur_load, in_flight, last_seen (the last report),
                                    load, reqnum, open_requests (the dispatcher's ledger)
    P rate:E:<second>       string  cost routed as new requests to E in that second; EXPIRE LOAD_HISTORY_S
    P waiting_polls:E       zset    member request_idx waiting for a worker, score when last answered "no ready
                                    worker" (demand); it leaves when its request finds a worker or leaves, or
                                    once its poll is older than the load window (load_stats)
    P urls                  hash    url -> "E/W", the record reporting it (MemoryStore._url_owner); removed with
                                    the record, or replaced when a report takes the url over
    P idem:E/K              string  the request_idx a new request with Idempotency-Key K got; read only while that
                                    request is held (req:<idx> names E); PX the request ttl
    P open:E                zset    member request_idx, score its expiry: E's open requests (req:<idx> without
                                    released_by), what max_open_requests caps (MemoryStore._open); expired
                                    members leave when counted
    P held:E/W              zset    member request_idx, score its reqnum: the requests worker W holds
                                    (MemoryStore._held), which a report's reqnum_floor gives back; a member
                                    leaves when its request leaves W

A worker's hash, its held set, its set member and its url binding are removed together (``forget_workers``) once it
has been silent for ``forget_s`` holding no request.

Endpoint names cannot contain ``/`` (``endpoints.ENDPOINT_NAME``), which keeps ``E/W`` and ``E/K`` unambiguous; a
worker id or key may contain anything. The scripts reach keys they discover (an expired request of any endpoint,
an endpoint's workers), so this needs a single Redis primary (Sentinel is fine), not Redis Cluster. Redis >= 7
(route's script declares flags).

Numbers cross into Lua as strings (Python ``repr``: shortest round-trip) and come back through
``string.format('%.17g', x)``: Lua numbers are C doubles, so loads follow exactly the arithmetic ``MemoryStore``
does. (``HINCRBYFLOAT`` is not used for that reason: it sums in long double and prints 17 *decimal places*, so
0.1 + 0.2 gives ``0.3`` and 1e-20 gives ``0``.) The scripts live in ``lua/`` beside this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.dispatch.memory_store import BACKGROUND_SWEEP_LIMIT, EXPIRY_SWEEP_LIMIT, LOAD_HISTORY_S
from service.dispatch.pipelining import ScriptPipeliner
from service.dispatch.records import (
    REQNUMS_PER_SECOND,
    REQUEST_IDXS_PER_SECOND,
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
from service.dispatch.store import (
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    DEFAULT_MAX_OPEN_REQUESTS,
    DEFAULT_MAX_WORKERS_PER_ENDPOINT,
    DEFAULT_RELEASED_RETRY_S,
    LOAD_RATE_BUCKET_S,
    WAITING_SAMPLE,
    LoadStats,
    StoreUnavailable,
    UnknownRequest,
    too_many_open_requests,
    too_many_workers,
    url_taken,
    waiting_load,
)

DEFAULT_PREFIX = "dispatch:"
_LUA = resources.files("service.dispatch") / "lua"


def _script(name: str) -> str:
    """``lua/NAME.lua`` after the shared prelude (ARGV[1..2]: prefix, EXPIRY_SWEEP_LIMIT)."""
    return (_LUA / "prelude.lua").read_text(encoding="utf-8") + (_LUA / f"{name}.lua").read_text(encoding="utf-8")


# Redis refuses a script over maxmemory only at its first write that may use memory, and route's first writes (the
# expiry sweep) free memory: over the limit, routes went on adding requests while reports were refused, so clients got
# "no ready worker" from a full store. A shebang without allow-oom (Redis 7) has a route refused before it runs, a 503;
# the other scripts run on, so releases and the autoscale loop's sweeps still free memory.
_ROUTE = "#!lua\n" + _script("route")
MIN_REDIS_MAJOR = 7  # script shebangs
_REPORT = _script("report")
_RELEASE = _script("release")
_FORGET = _script("forget")

_WORKER_FIELDS = ("url", "state", "max_perf", "cur_load", "in_flight", "last_seen", "load", "reqnum", "open_requests")

_WORKERS = _script("workers").replace("FIELDS", ", ".join(f"'{name}'" for name in _WORKER_FIELDS))

_LOAD_STATS = _script("load_stats")


def _num(value: float) -> str:
    """A float as Lua's tonumber reads it back exactly (repr is the shortest round-trip form)."""
    return repr(float(value))


def _check_endpoint(endpoint: str) -> str:
    if "/" in endpoint:  # keeps worker keys (worker:E/W) unambiguous; configured names never contain one
        raise ValueError(f"endpoint name {endpoint!r} contains '/'")
    return endpoint


def _redacted(url: str) -> str:
    """The URL without its secrets (``user:password@``, and query arguments such as ``?password=`` or
    ``?ssl_password=``, which redis-py passes through), for messages that unauthenticated callers can read
    (``/health``). A parse is trusted only where it is unambiguous: a password with an unencoded '#', '/' or '?' ends
    the authority early, and one with '[' makes the parser raise; then everything up to the '@' goes (a host masked
    with it is safe, a password shown is not)."""
    masked = _QUERY_SECRET.sub(r"\1***", url)  # a value runs to the next '&', whatever it holds ('#', '@')
    scheme, sep, rest = masked.partition("://")
    if not sep or rest.startswith("/") or "@" not in rest:  # no authority (unix:///path), or no user in it
        return masked
    before_query = rest.split("?", 1)[0]
    try:
        netloc: str | None = urlsplit(masked).netloc
    except ValueError:  # '[' in a password: the parse cannot be trusted
        netloc = None
    if netloc is not None and not before_query.startswith(netloc):
        netloc = None  # the parser dropped characters (tabs, newlines): its authority is not the text's
    query = rest.partition("?")[2]
    if netloc is not None and "@" in netloc and "@" not in before_query[len(netloc) :] and _in_values(query):
        userinfo, _, host = netloc.rpartition("@")
        if _HOST_ANY_PORT.match(host):  # a port that is no number is the user's error to see (h:notaport)
            return masked.replace(netloc, f"{userinfo.partition(':')[0]}:***@{host}", 1)
    elif netloc is not None and "@" not in before_query and _HOST_PORT.match(netloc) and _in_values(query):
        return masked  # an '@' only in a query value (?client_name=ops@team): no user, the host stays shown
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _in_values(query: str) -> bool:
    """Whether every '@' of ``query`` is inside an argument's value (``name=...@...``), not text a '?' in a password
    cut off from its authority."""
    return all("=" in part.partition("@")[0] for part in query.split("&") if "@" in part)


_QUERY_SECRET = re.compile(r"(?i)([?&][^=&]*password[^=&]*=)[^&]*")
# host[:port] or [IPv6][:port]: an authority a '?' in a password did not cut short ('user:p' of 'user:p?w@host')
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.%a-z]+\]|[A-Za-z0-9._%-]+)(:\d+)?$")
_HOST_ANY_PORT = re.compile(r"^(\[[0-9A-Fa-f:.%a-z]+\]|[A-Za-z0-9._%-]+)(:[A-Za-z0-9._%-]*)?$")
# what an error message quotes, from its first quote to its last: a quote inside the quoted text (a password's) is
# escaped by repr, so matching pairs would stop there
_QUOTED = re.compile(r"""(['"]).*\1""", re.DOTALL)


def _has_secret(url: str) -> bool:
    return "@" in url.partition("://")[2] or _QUERY_SECRET.search(url) is not None


def check_url(url: str) -> None:
    """``ValueError`` (without the password) for a URL redis-py cannot use: for start-up checks. A connection is
    built (no I/O): a query argument redis-py does not know (a typo, ``ssl_password`` on ``redis://``) passes the
    URL parser and fails only there, which made every call a 500."""
    try:
        parse_url(url)
        BlockingConnectionPool.from_url(url).make_connection()
    except Exception as exc:  # not only ValueError: ?retry=x raised AttributeError, a traceback at start
        # a parser quotes what it could not read ("cast to integer value as 'Us3r'"): with a secret in the URL, a
        # quoted literal is shown only if the redacted URL shows its text anyway ('notaport', a misspelt argument)
        shown = _redacted(url)
        detail = str(exc)
        if _has_secret(url):
            detail = _QUOTED.sub(lambda m: m.group() if m.group()[1:-1] in shown else "'***'", detail)
        hint = ""
        if shown.partition("://")[2].startswith("***@"):  # the user info could not be told apart
            hint = "; percent-encode the characters # / ? @ : in the user name and password"
        raise ValueError(f"--redis-url {shown}: {detail or type(exc).__name__}{hint}") from None


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
        request_idxs_per_s: int = REQUEST_IDXS_PER_SECOND,
        max_workers_per_endpoint: int = DEFAULT_MAX_WORKERS_PER_ENDPOINT,
        max_open_requests: int = DEFAULT_MAX_OPEN_REQUESTS,
    ) -> None:
        self._where = _redacted(url)
        self._max_workers = max_workers_per_endpoint
        self._max_open = max_open_requests
        self._prefix = prefix
        self._reqnums_per_s = reqnums_per_s
        self._request_idxs_per_s = request_idxs_per_s
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
        self._common = (prefix, str(EXPIRY_SWEEP_LIMIT))
        self._route = ScriptPipeliner(self._redis, _ROUTE)  # the hot path: concurrent routes share a round trip
        self._report = self._redis.register_script(_REPORT)
        self._release = self._redis.register_script(_RELEASE)
        self._forget = self._redis.register_script(_FORGET)
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

    async def route(
        self,
        endpoint: str,
        cost: float,
        request_idx: int | None,
        policy: PickPolicy,
        idempotency_key: str | None = None,
    ) -> RouteOutcome:
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
            str(self._request_idxs_per_s),
            idempotency_key or "",
            str(self._max_open),
        )
        with self._unavailable("route"):
            reply = await self._route.call(args)
        code = int(reply[0])
        if code == -2:
            raise too_many_open_requests(endpoint, self._max_open)
        if code < 0:
            raise UnknownRequest(request_idx)
        idx = int(reply[1])
        if code == 1:
            return Assigned(
                request_idx=idx, worker_id=reply[2], url=reply[3], reqnum=int(reply[4]), retry=int(reply[5]) == 1
            )
        status = dict.fromkeys(STATUS_KEYS, 0)
        for category, count in zip(reply[2::2], reply[3::2], strict=True):
            status[category] = int(count)
        return NoReadyWorker(request_idx=idx, status=status)

    async def report(
        self, endpoint: str, report: WorkerReport, heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    ) -> WorkerRecord:
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
            str(self._max_workers),
            _num(heartbeat_timeout_s),
            "" if report.reqnum_floor is None else str(int(report.reqnum_floor)),
        )
        with self._unavailable("report"):
            reply = await self._report(args=args)
        if len(reply) == 1:  # 0: the endpoint is full and this id is new; -1: another endpoint's worker has the url
            if int(reply[0]) == -1:
                raise url_taken(report.url, heartbeat_timeout_s)
            raise too_many_workers(endpoint, self._max_workers)
        last_seen, load, reqnum, open_requests, given_back = reply
        return WorkerRecord.from_report(
            report,
            last_seen=float(last_seen),
            load=float(load),
            reqnum=int(reqnum),
            open_requests=int(open_requests),
            given_back=int(given_back),
        )

    async def release(
        self,
        endpoint: str,
        request_idxs: Sequence[int],
        worker_id: str | None = None,
        retry_window_s: float = DEFAULT_RELEASED_RETRY_S,
    ) -> Released:
        if not request_idxs:
            return Released(released=0, unknown=0)
        holder = "" if worker_id is None else worker_id  # worker ids are never empty (schemas)
        args = (*self._common, _check_endpoint(endpoint), holder, _num(retry_window_s),
                *(str(int(idx)) for idx in request_idxs))  # fmt: skip
        with self._unavailable("release"):
            released, unknown, not_held = await self._release(args=args)
        return Released(released=int(released), unknown=int(unknown), not_held=int(not_held))

    async def forget_workers(self, endpoint: str, forget_s: float) -> int:
        with self._unavailable("forget_workers"):
            gone = await self._forget(args=(*self._common, _check_endpoint(endpoint), _num(forget_s)))
        return int(gone)

    async def endpoints(self) -> list[str]:
        with self._unavailable("endpoints"):
            names = await self._redis.smembers(self._prefix + "endpoints")
        return sorted(str(name) for name in names)  # str already (decode_responses); the cast is for the types

    async def workers(self, endpoint: str) -> list[WorkerRecord]:
        with self._unavailable("workers"):
            reply = await self._workers(args=(*self._common, _check_endpoint(endpoint)))
        width = 1 + len(_WORKER_FIELDS)
        records = []
        for i in range(0, len(reply), width):
            worker_id, url, state, max_perf, cur_load, in_flight, last_seen, load, reqnum, open_requests = reply[
                i : i + width
            ]
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
                    # absent in a record written before the count existed: Redis HMGET answers None
                    open_requests=int(open_requests or 0),
                )
            )
        return sorted(records, key=lambda w: w.worker_id)

    async def load_stats(self, endpoint: str, window_s: float) -> LoadStats:
        args = (self._prefix, str(BACKGROUND_SWEEP_LIMIT), _check_endpoint(endpoint), _num(window_s),
                str(LOAD_RATE_BUCKET_S), str(LOAD_HISTORY_S), str(WAITING_SAMPLE))  # fmt: skip
        with self._unavailable("load_stats"):
            reply = await self._load_stats(args=args)
        total, waiting_count, sample, loads, open_requests = reply
        return LoadStats(
            load_rate=float(total) / window_s,
            outstanding=math.fsum(float(load) for load in loads),  # exact: SMEMBERS order is arbitrary
            waiting_requests=int(waiting_count),
            waiting=waiting_load([float(cost) for cost in sample], int(waiting_count)),
            open_requests=int(open_requests),
        )

    async def now(self) -> float:
        with self._unavailable("TIME"):
            seconds, micros = await self._redis.time()
        return seconds + micros / 1_000_000  # the same double the scripts compute

    async def ping(self) -> None:
        with self._unavailable("PING"):
            await self._redis.ping()

    async def server_problems(self) -> list[str]:
        """A Redis before 7 (route's script has a shebang: every route would fail), and one that may evict keys: an
        evicted request took its load with it, for good (its worker looked busy until restarted). Managed services
        that refuse CONFIG are not judged on their policy."""
        problems = []
        with self._unavailable("INFO"):
            version = str((await self._redis.info("server")).get("redis_version", "0"))
        major = re.match(r"\d+", version)
        if major is None or int(major.group()) < MIN_REDIS_MAJOR:
            problems.append(f"Redis {version}: the dispatcher's scripts need Redis {MIN_REDIS_MAJOR} or later")
        try:
            policy = (await self._redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except RedisError:  # CONFIG renamed or refused (managed Redis, ACLs)
            return problems
        if policy is not None and policy != "noeviction":
            problems.append(
                f"maxmemory-policy is {policy}: Redis may evict the dispatcher's keys, and an evicted request keeps"
                " its load on its worker for good; set maxmemory-policy noeviction"
            )
        return problems

    async def close(self) -> None:
        await self._redis.aclose()

    @contextlib.contextmanager
    def _unavailable(self, what: str) -> Iterator[None]:
        """Any Redis failure (unreachable, timed out, loading, read-only, OOM, script error) as ``StoreUnavailable``.
        NOSCRIPT never gets here: the registered scripts load themselves again.

        Also a cancellation that redis-py lost is raised again: on Python 3.11 its send (an ``asyncio.wait_for``)
        returns instead of raising when the cancel lands as the send finishes (CPython gh-86296), and the cancelled
        task ran on (the refresh loop did, and the dispatcher's shutdown waited for it)."""
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            yield
        except (RedisError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise StoreUnavailable(
                f"dispatcher state is unavailable: redis at {self._where}: {what} failed: {detail}"
            ) from exc
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError
