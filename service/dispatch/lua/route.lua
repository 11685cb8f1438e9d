-- ARGV[3..]: endpoint, cost, request_idx ('' for a new request), max_queue_time_s, heartbeat_timeout_s,
-- request_ttl_s, LOAD_RATE_BUCKET_S, LOAD_HISTORY_S, REQUEST_IDXS_PER_SECOND, Idempotency-Key ('' for none),
-- max_open_requests.
-- Returns {-1} for an unknown request, {-2} for a new one on an endpoint at max_open_requests (nothing changed),
-- {1, idx, worker_id, url, reqnum, retry (0/1)} when assigned, and {0, idx, category, count, ...} when no worker is
-- ready.
local endpoint = ARGV[3]
local cost = tonumber(ARGV[4])
local idx = ARGV[5]
local max_queue = tonumber(ARGV[6])
local heartbeat = tonumber(ARGV[7])
local ttl = tonumber(ARGV[8])
local bucket = tonumber(ARGV[9])
local history = ARGV[10]
local idxs_per_s = tonumber(ARGV[11])
local idempotency = ARGV[12]
local max_open = tonumber(ARGV[13])

local now = clock()
sweep(now)

-- A new request's Idempotency-Key names it while it is held and unexpired; the request records its key (field
-- idem), which keeps the key alive on every route of it
local idem, repeat_call = false, false
if idx == '' and idempotency ~= '' then
  idem = idempotency
  local known = redis.call('GET', idem_key(endpoint, idem))
  if known then
    local r = redis.call('HMGET', prefix .. 'req:' .. known, 'endpoint', 'idem')
    local expires = tonumber(redis.call('ZSCORE', expiries, known))
    if r[1] == endpoint and r[2] == idem and expires and expires > now then idx, repeat_call = known, true end
  end
end

local retry = idx ~= ''
if not retry and count_open(endpoint, now) >= max_open then return {-2} end
local prev_worker, prev_cost, released_by = false, 0, false
if retry then
  if expired(idx, now) then return {-1} end
  local r = redis.call('HMGET', prefix .. 'req:' .. idx, 'endpoint', 'cost', 'worker', 'idem', 'released_by')
  if r[1] ~= endpoint then return {-1} end
  prev_worker, prev_cost, idem, released_by = r[3], tonumber(r[2]), r[4], r[5]
end

local workers = {}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'workers:' .. endpoint)) do
  local r = redis.call('HMGET', worker_key(endpoint, id), 'state', 'max_perf', 'last_seen', 'load', 'url',
                       'open_requests')
  if r[1] then
    workers[#workers + 1] = {id = id, state = r[1], max_perf = tonumber(r[2]), last_seen = tonumber(r[3]),
                             load = tonumber(r[4]), url = r[5], open = tonumber(r[6] or '0')}
  end
end

if retry and prev_worker then
  -- a retry's load leaves its old worker before picking, wherever it goes next (as MemoryStore does)
  local load = unassign(endpoint, prev_worker, idx, prev_cost)
  if load then
    for _, w in ipairs(workers) do
      if w.id == prev_worker then
        w.load = load
        w.open = math.max(0, w.open - 1)
      end
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

-- selection.pick_worker: key (wait, load, open requests, worker_id), compared as a Python tuple
local function key_lt(a, b)
  if a.wait ~= b.wait then return a.wait < b.wait end
  if a.load ~= b.load then return a.load < b.load end
  if a.open ~= b.open then return a.open < b.open end
  return bytes_lt(a.id, b.id)
end

-- a retry never takes the worker it had; a repeated call keeps it while it can take work
local avoid = not repeat_call and (prev_worker or released_by)
local keep = repeat_call and prev_worker
local best, best_key = nil, nil
for _, w in ipairs(workers) do
  -- written as the negations of selection.py's `continue` tests so that NaN behaves the same
  if w.state == 'ready' and not (w.max_perf <= 0) and now - w.last_seen <= heartbeat then
    if w.id == keep then
      best = w
      break
    end
    local wait = w.load / w.max_perf
    if not (wait > max_queue) and w.id ~= avoid then
      local key = {wait = wait, load = w.load, open = w.open, id = w.id}
      if best_key == nil or key_lt(key, best_key) then best, best_key = w, key end
    end
  end
end

if not retry then
  local counter = prefix .. 'request_idx'
  local n = redis.call('INCR', counter)
  if n == 1 then  -- a new or lost counter starts at the clock: no idx issued before a restart comes back
    n = math.max(1, math.floor(now * idxs_per_s))
    redis.call('SET', counter, fmt(n))
  end
  idx = fmt(n)
  local rate_key = prefix .. 'rate:' .. endpoint .. ':' .. fmt(math.floor(now / bucket) * bucket)
  local rate = tonumber(redis.call('GET', rate_key) or '0')
  redis.call('SET', rate_key, fmt(rate + cost), 'EX', history)
end
if idem then  -- bound when the request is new; each later route of it keeps the binding as long as the request
  local key = idem_key(endpoint, idem)
  if not retry or redis.call('GET', key) == idx then
    redis.call('SET', key, idx, 'PX', string.format('%.0f', math.ceil(ttl * 1000)))  -- an integer: Lua writes 1e14 and more in exponent form
  end
end

local req_key = prefix .. 'req:' .. idx
local fields = {'endpoint', endpoint, 'cost', ARGV[4]}  -- plus worker once it has one, and its key if it came with one
if idem then
  fields[#fields + 1] = 'idem'
  fields[#fields + 1] = idem
end
redis.call('DEL', req_key)
redis.call('ZADD', expiries, fmt(now + ttl), idx)
redis.call('ZADD', open_key(endpoint), fmt(now + ttl), idx)  -- open (again, if it was released), until its expiry

if best then
  if retry then redis.call('ZREM', waiting_key(endpoint), idx) end
  local key = worker_key(endpoint, best.id)
  redis.call('HSET', key, 'load', fmt(best.load + cost))
  redis.call('HINCRBY', key, 'open_requests', 1)
  local reqnum = redis.call('HINCRBY', key, 'reqnum', 1)
  redis.call('ZADD', held_key(endpoint, best.id), fmt(reqnum), idx)
  fields[#fields + 1] = 'worker'
  fields[#fields + 1] = best.id
  redis.call('HSET', req_key, unpack(fields))
  -- records.Assigned.retry: the request had a worker (or was released by one); a poll that found one is no retry
  return {1, idx, best.id, best.url, reqnum, (prev_worker or released_by) and 1 or 0}
end

redis.call('HSET', req_key, unpack(fields))
redis.call('ZADD', waiting_key(endpoint), fmt(now), idx)
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
