-- ARGV[3..]: endpoint, window_s, LOAD_RATE_BUCKET_S, LOAD_HISTORY_S.
-- Returns {sum of the buckets in the window, {cost of each request waiting for a worker}, {load of each worker},
-- open requests}.
local endpoint = ARGV[3]
local window = tonumber(ARGV[4])
local bucket = tonumber(ARGV[5])
local history = tonumber(ARGV[6])
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
-- MemoryStore._waiting_costs: requests still waiting and polled within the window; the rest are dropped (released,
-- expired or assigned since, or not polled within the window)
local waiting_costs, waiting = {}, waiting_key(endpoint)
local entries = redis.call('HGETALL', waiting)
for i = 1, #entries, 2 do
  local r = redis.call('HMGET', prefix .. 'req:' .. entries[i], 'cost', 'worker')
  if r[1] and not r[2] and tonumber(entries[i + 1]) > now - window then
    waiting_costs[#waiting_costs + 1] = r[1]
  else
    redis.call('HDEL', waiting, entries[i])
  end
end
local loads = {}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'workers:' .. endpoint)) do
  local load = redis.call('HGET', worker_key(endpoint, id), 'load')
  if load then loads[#loads + 1] = load end
end
return {fmt(total), waiting_costs, loads, count_open(endpoint, now)}
