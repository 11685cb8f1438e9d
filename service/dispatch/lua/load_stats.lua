-- ARGV[3..]: endpoint, window_s, LOAD_RATE_BUCKET_S, LOAD_HISTORY_S.
-- Returns {sum of the buckets in the window, requests waiting for a worker, their cost, load of each worker...}.
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
local waiting_cost = 0
local waiting = redis.call('HVALS', waiting_key(endpoint))
for _, cost in ipairs(waiting) do waiting_cost = waiting_cost + tonumber(cost) end
local reply = {fmt(total), #waiting, fmt(waiting_cost)}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'workers:' .. endpoint)) do
  local load = redis.call('HGET', worker_key(endpoint, id), 'load')
  if load then reply[#reply + 1] = load end
end
return reply
