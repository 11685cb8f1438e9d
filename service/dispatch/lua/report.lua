-- ARGV[3..]: endpoint, worker_id, url, state, max_perf, cur_load, in_flight, reqnums_per_s, max_workers,
-- heartbeat_timeout_s, reqnum_floor ('' for none). Returns {last_seen, load, reqnum, open_requests, given_back}, {0}
-- when the id is new and the endpoint holds max_workers, or {-1} when an active worker of another endpoint reports
-- the url (MemoryStore.report).
local endpoint, id, url = ARGV[3], ARGV[4], ARGV[5]
local me = endpoint .. '/' .. id
local urls = prefix .. 'urls'
local t = clock()
-- the record that reports url, when it is another one (endpoint names hold no '/': the first one splits)
local holder = nil
local owner = redis.call('HGET', urls, url)
if owner and owner ~= me then
  local cut = string.find(owner, '/', 1, true)
  local holder_endpoint = string.sub(owner, 1, cut - 1)
  local holder_key = worker_key(holder_endpoint, string.sub(owner, cut + 1))
  local r = redis.call('HMGET', holder_key, 'url', 'state', 'last_seen')
  if r[1] == url then
    -- WorkerRecord.holds_url
    if holder_endpoint ~= endpoint and r[2] ~= 'stopped' and t - tonumber(r[3]) <= tonumber(ARGV[12]) then
      return {-1}
    end
    holder = holder_key
  end
end
local members = prefix .. 'workers:' .. endpoint
if redis.call('SISMEMBER', members, id) == 0 and redis.call('SCARD', members) >= tonumber(ARGV[11]) then
  return {0}
end
if holder then redis.call('HSET', holder, 'state', 'stopped') end
local given_back = 0
if ARGV[13] ~= '' then
  -- MemoryStore._give_back_issued_up_to: the process there refuses these reqnums, so the requests it holds with one
  -- died with the process before it; each stays known until its own expiry, for a retry
  local held = held_key(endpoint, id)
  for _, idx in ipairs(redis.call('ZRANGEBYSCORE', held, '-inf', ARGV[13])) do
    -- a member an older script version left (it moved the request on) goes too. Left as is: during a rolling deploy
    -- a replica without the index may move a request off W and back under a new reqnum, and its stale entry below
    -- the floor then gives the request back early (load undercounted until W releases it, answered not_held).
    redis.call('ZREM', held, idx)
    if not expired(idx, t) then
      local r = redis.call('HMGET', prefix .. 'req:' .. idx, 'endpoint', 'cost', 'worker', 'idem')
      if r[1] == endpoint and r[3] == id then
        give_back(endpoint, idx, r, math.huge)
        given_back = given_back + 1
      end
    end
  end
end
local now = fmt(t)
local key = worker_key(endpoint, id)
local old_url = redis.call('HGET', key, 'url')
if old_url and old_url ~= url and redis.call('HGET', urls, old_url) == me then redis.call('HDEL', urls, old_url) end
local binding = owner ~= me  -- a URL this record did not hold: its reqnums go on from the clock (MemoryStore.report)
redis.call('HSET', urls, url, me)
redis.call('HSET', key, 'url', url, 'state', ARGV[6], 'max_perf', ARGV[7], 'cur_load', ARGV[8],
           'in_flight', ARGV[9], 'last_seen', now)
-- the ledger is the dispatcher's own: a report never resets it
redis.call('HSETNX', key, 'load', '0')
redis.call('HSETNX', key, 'open_requests', '0')
-- a new record's reqnums start at the clock (records.reqnum_origin), above any issued before a lost counter
local origin = math.floor(t * tonumber(ARGV[10]))
if redis.call('HSETNX', key, 'reqnum', fmt(origin)) == 0 and binding
   and tonumber(redis.call('HGET', key, 'reqnum')) < origin then
  redis.call('HSET', key, 'reqnum', fmt(origin))
end
redis.call('SADD', members, id)
redis.call('SADD', prefix .. 'endpoints', endpoint)
local r = redis.call('HMGET', key, 'load', 'reqnum', 'open_requests')
return {now, r[1], r[2], r[3], given_back}
