-- ARGV[3..]: endpoint, worker_id ('' = any worker), retry window (s), request_idx... Returns {released, unknown,
-- not_held}. MemoryStore.release: with a worker id, a request held by another worker (a retry moved it) stays with
-- that one; a released request stays known, without a worker or its Idempotency-Key, for the retry window (never
-- past its own expiry), so that a retry of it routes afresh, avoiding the worker that released it.
local endpoint, holder = ARGV[3], ARGV[4]
local now = clock()
local keep_until = now + tonumber(ARGV[5])
local released, unknown, not_held = 0, 0, 0
for i = 6, #ARGV do
  local idx = ARGV[i]
  local key = prefix .. 'req:' .. idx
  local r = redis.call('HMGET', key, 'endpoint', 'cost', 'worker', 'idem')
  if expired(idx, now) or r[1] ~= endpoint then
    unknown = unknown + 1
  elseif not r[3] or (holder ~= '' and r[3] ~= holder) then
    not_held = not_held + 1
  else
    give_back(endpoint, idx, r, keep_until)
    released = released + 1
  end
end
return {released, unknown, not_held}
