-- ARGV[3..]: endpoint, window_s, LOAD_RATE_BUCKET_S, LOAD_HISTORY_S, WAITING_SAMPLE.
-- Returns {sum of the buckets in the window, requests waiting for a worker, {cost of the WAITING_SAMPLE most
-- recently polled of them}, {load of each worker}, open requests}.
local endpoint = ARGV[3]
local window = tonumber(ARGV[4])
local bucket = tonumber(ARGV[5])
local history = tonumber(ARGV[6])
local sample_size = tonumber(ARGV[7])
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
-- MemoryStore._waiting_polled_since: polls older than the window leave (a bounded number per call; those left over
-- are not counted), the rest are counted and the most recent sampled for their cost
redis.call('UNLINK', prefix .. 'waiting:' .. endpoint)  -- the hash that held this before (freed in the background)
local waiting, since = waiting_key(endpoint), fmt(now - window)
local stale = redis.call('ZRANGEBYSCORE', waiting, '-inf', since, 'LIMIT', 0, sweep_limit)
for i = 1, #stale, UNPACK_CHUNK do
  redis.call('ZREM', waiting, unpack(stale, i, math.min(i + UNPACK_CHUNK - 1, #stale)))
end
local waiting_count = redis.call('ZCOUNT', waiting, '(' .. since, '+inf')
local waiting_costs = {}
for _, idx in ipairs(redis.call('ZREVRANGEBYSCORE', waiting, '+inf', '(' .. since, 'LIMIT', 0, sample_size)) do
  waiting_costs[#waiting_costs + 1] = redis.call('HGET', prefix .. 'req:' .. idx, 'cost') or '0'
end
local loads = {}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'workers:' .. endpoint)) do
  local load = redis.call('HGET', worker_key(endpoint, id), 'load')
  if load then loads[#loads + 1] = load end
end
return {fmt(total), waiting_count, waiting_costs, loads, count_open(endpoint, now)}
