-- Shared by every script (prepended). ARGV[1..2]: prefix, EXPIRY_SWEEP_LIMIT; a script's own arguments follow.
local prefix = ARGV[1]
local sweep_limit = tonumber(ARGV[2])
local expiries = prefix .. 'expiries'
local UNPACK_CHUNK = 1000

local function fmt(x) return string.format('%.17g', x) end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function worker_key(endpoint, worker_id) return prefix .. 'worker:' .. endpoint .. '/' .. worker_id end
-- MemoryStore._waiting: a zset of the request_idxs waiting for a worker, scored by when last answered "no ready
-- worker"; a member leaves when its request finds a worker or leaves, and load_stats.lua drops the stale polls.
-- (waiting:E, a hash before, is left to old replicas in a rolling deploy: a new type needs a new name.)
local function waiting_key(endpoint) return prefix .. 'waiting_polls:' .. endpoint end
-- MemoryStore._by_key: the request_idx a new request with an Idempotency-Key got (E/K: no endpoint has a '/')
local function idem_key(endpoint, key) return prefix .. 'idem:' .. endpoint .. '/' .. key end
-- MemoryStore._open: the endpoint's open requests (held or waiting, not released), as a zset of request_idx scored
-- by expiry. A set rather than a counter, so that what a script without it (an older replica in a rolling deploy)
-- released or let expire leaves by itself once its score passes (count_open), instead of counting for ever.
local function open_key(endpoint) return prefix .. 'open:' .. endpoint end
-- MemoryStore._held: the requests worker W holds, as a zset of request_idx scored by reqnum (below 2**53, exact as
-- a double), which a report's reqnum_floor gives back (report.lua)
local function held_key(endpoint, worker_id) return prefix .. 'held:' .. endpoint .. '/' .. worker_id end
local function count_open(endpoint, now)
  local key = open_key(endpoint)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))  -- expired: no longer open, swept or not
  return redis.call('ZCARD', key)
end

-- MemoryStore._unassign: request idx of `cost` leaves its worker (if the worker exists); returns the new load or nil.
-- memory_store.load_after_release: exactly 0 once the worker holds no request, never below 0 (float dust).
local function unassign(endpoint, worker_id, idx, cost)
  redis.call('ZREM', held_key(endpoint, worker_id), idx)
  local key = worker_key(endpoint, worker_id)
  local r = redis.call('HMGET', key, 'load', 'open_requests')
  if not r[1] then return nil end
  local open = math.max(0, tonumber(r[2] or '0') - 1)
  local load = 0
  if open > 0 then
    load = tonumber(r[1]) - cost
    if not (load > 0) then load = 0 end
  end
  redis.call('HSET', key, 'load', fmt(load), 'open_requests', fmt(open))
  return load
end

-- MemoryStore._drop without the expiries entry: an expired request leaves, its load goes back
local function drop(idx)
  local key = prefix .. 'req:' .. idx
  local r = redis.call('HMGET', key, 'endpoint', 'cost', 'worker')
  if r[1] and r[3] then unassign(r[1], r[3], idx, tonumber(r[2])) end
  if r[1] then
    redis.call('ZREM', open_key(r[1]), idx)
    redis.call('ZREM', waiting_key(r[1]), idx)  -- else an endpoint no longer configured keeps its entries for good
  end
  redis.call('DEL', key)
end

-- requests never released give their load back; bounded work per call, as MemoryStore._expire
local function sweep(now)
  local idxs = redis.call('ZRANGEBYSCORE', expiries, '-inf', fmt(now), 'LIMIT', 0, sweep_limit)
  for _, idx in ipairs(idxs) do drop(idx) end
  for i = 1, #idxs, UNPACK_CHUNK do  -- Lua 5.1's unpack fails past ~8000 values
    redis.call('ZREM', expiries, unpack(idxs, i, math.min(i + UNPACK_CHUNK - 1, #idxs)))
  end
end

-- MemoryStore._live: a request past its expiry that the bounded sweeps have not reached yet leaves now, so that a
-- retry or a release of it finds it unknown whatever the backlog. True when it was expired.
local function expired(idx, now)
  local expires = tonumber(redis.call('ZSCORE', expiries, idx))
  if expires and expires <= now then
    drop(idx)
    redis.call('ZREM', expiries, idx)
    return true
  end
  return false
end

-- MemoryStore._release: worker `holder` is done with request idx (r: its HMGET endpoint, cost, worker, idem): its
-- load goes back and its Idempotency-Key is unbound, but it stays known, without a worker, until keep_until (or its
-- own expiry, if sooner), so that a retry of it routes afresh, avoiding the worker that let it go.
local function give_back(endpoint, idx, r, keep_until)
  local key = prefix .. 'req:' .. idx
  redis.call('HDEL', key, 'worker', 'idem')
  redis.call('HSET', key, 'released_by', r[3])
  redis.call('ZREM', waiting_key(endpoint), idx)
  if r[4] then
    local idem = idem_key(endpoint, r[4])
    if redis.call('GET', idem) == idx then redis.call('DEL', idem) end
  end
  local expires = tonumber(redis.call('ZSCORE', expiries, idx))
  if expires and keep_until < expires then redis.call('ZADD', expiries, fmt(keep_until), idx) end
  unassign(endpoint, r[3], idx, tonumber(r[2]))
  redis.call('ZREM', open_key(endpoint), idx)
end
