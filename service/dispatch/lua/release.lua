-- ARGV[3..]: endpoint, request_idx... Returns {released, unknown}.
local endpoint = ARGV[3]
local released, unknown = 0, 0
for i = 4, #ARGV do
  local key = prefix .. 'req:' .. ARGV[i]
  local r = redis.call('HMGET', key, 'endpoint', 'cost', 'worker')
  if r[1] == endpoint then
    redis.call('DEL', key)
    redis.call('ZREM', expiries, ARGV[i])
    if r[3] then unassign(endpoint, r[3], tonumber(r[2])) end
    released = released + 1
  else
    unknown = unknown + 1
  end
end
return {released, unknown}
