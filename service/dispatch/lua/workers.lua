-- ARGV[3]: endpoint. Returns {worker_id, FIELDS..., worker_id, ...} (RedisStore._WORKER_FIELDS).
local endpoint = ARGV[3]
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
