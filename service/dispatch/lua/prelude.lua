-- Shared by every script (prepended). ARGV[1..3]: prefix, ZERO_LOAD, EXPIRY_SWEEP_LIMIT; a script's own arguments follow.
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
