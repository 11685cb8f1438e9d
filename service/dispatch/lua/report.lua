-- ARGV[4..]: endpoint, worker_id, url, state, max_perf, cur_load, in_flight, reqnums_per_s.
-- Returns {last_seen, load, reqnum}.
local endpoint, id = ARGV[4], ARGV[5]
local t = clock()
local now = fmt(t)
local key = worker_key(endpoint, id)
redis.call('HSET', key, 'url', ARGV[6], 'state', ARGV[7], 'max_perf', ARGV[8], 'cur_load', ARGV[9],
           'in_flight', ARGV[10], 'last_seen', now)
-- the ledger is the dispatcher's own: a report never resets it
redis.call('HSETNX', key, 'load', '0')
-- a new record's reqnums start at the clock (records.reqnum_origin), above any issued before a lost counter
redis.call('HSETNX', key, 'reqnum', fmt(math.floor(t * tonumber(ARGV[11]))))
redis.call('SADD', prefix .. 'workers:' .. endpoint, id)
local r = redis.call('HMGET', key, 'load', 'reqnum')
return {now, r[1], r[2]}
