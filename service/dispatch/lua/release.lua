-- ARGV[3..]: endpoint, worker_id ('' = any worker), request_idx... Returns {released, unknown, not_held}.
-- MemoryStore.release: with a worker id, a request held by another worker (a retry moved it) stays with that one.
local endpoint, holder = ARGV[3], ARGV[4]
local released, unknown, not_held = 0, 0, 0
for i = 5, #ARGV do
  local key = prefix .. 'req:' .. ARGV[i]
  local r = redis.call('HMGET', key, 'endpoint', 'cost', 'worker')
  if r[1] ~= endpoint then
    unknown = unknown + 1
  elseif holder ~= '' and r[3] ~= holder then
    not_held = not_held + 1
  else
    redis.call('DEL', key)
    redis.call('ZREM', expiries, ARGV[i])
    if r[3] then unassign(endpoint, r[3], tonumber(r[2])) end
    released = released + 1
  end
end
return {released, unknown, not_held}
