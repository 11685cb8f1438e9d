-- ARGV[3..]: endpoint, worker_id, url, state, max_perf, cur_load, in_flight, reqnums_per_s, max_workers.
-- Returns {last_seen, load, reqnum, open_requests}, or {0} when the id is new and the endpoint holds max_workers.
local endpoint, id = ARGV[3], ARGV[4]
local members = prefix .. 'workers:' .. endpoint
if redis.call('SISMEMBER', members, id) == 0 and redis.call('SCARD', members) >= tonumber(ARGV[11]) then
  return {0}
end
local t = clock()
local now = fmt(t)
local key = worker_key(endpoint, id)
redis.call('HSET', key, 'url', ARGV[5], 'state', ARGV[6], 'max_perf', ARGV[7], 'cur_load', ARGV[8],
           'in_flight', ARGV[9], 'last_seen', now)
-- the ledger is the dispatcher's own: a report never resets it
redis.call('HSETNX', key, 'load', '0')
redis.call('HSETNX', key, 'open_requests', '0')
-- a new record's reqnums start at the clock (records.reqnum_origin), above any issued before a lost counter
redis.call('HSETNX', key, 'reqnum', fmt(math.floor(t * tonumber(ARGV[10]))))
redis.call('SADD', members, id)
local r = redis.call('HMGET', key, 'load', 'reqnum', 'open_requests')
return {now, r[1], r[2], r[3]}
