-- ARGV[3..]: endpoint, forget_s. Removes the endpoint's workers silent for longer than forget_s that hold no
-- request (WorkerRecord.forgettable), record, set member and url binding at once. Returns how many went.
local endpoint = ARGV[3]
local forget = tonumber(ARGV[4])
local now = clock()
sweep(now)
local members = prefix .. 'workers:' .. endpoint
local urls = prefix .. 'urls'
local gone = 0
for _, id in ipairs(redis.call('SMEMBERS', members)) do
  local key = worker_key(endpoint, id)
  local r = redis.call('HMGET', key, 'last_seen', 'open_requests', 'url')
  if not r[1] then
    redis.call('SREM', members, id)  -- a member without a record: nothing to keep (routes skip it anyway)
  elseif now - tonumber(r[1]) > forget and tonumber(r[2] or '0') == 0 then
    redis.call('DEL', key, held_key(endpoint, id))  -- held: empty, but for members an older script version left
    redis.call('SREM', members, id)
    if r[3] and redis.call('HGET', urls, r[3]) == endpoint .. '/' .. id then redis.call('HDEL', urls, r[3]) end
    gone = gone + 1
  end
end
if redis.call('SCARD', members) == 0 then redis.call('SREM', prefix .. 'endpoints', endpoint) end
return gone
