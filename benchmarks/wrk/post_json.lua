-- wrk script: POST one fixed JSON body on every request.
--
-- Usage: wrk -t1 -c32 -d10s -s post_json.lua http://127.0.0.1:PORT/route/ -- BODY
--   BODY  the JSON text itself, e.g. '{"endpoint":"e","api_key":"k","cost":100.0}', or @PATH to read it from the
--         file PATH (keeps secrets off the command line; one trailing newline is dropped). Env WRK_BODY if omitted.
--
-- Every request carries the same bytes with "Content-Type: application/json"; the request is built once in
-- init(), so request() only returns it. response() counts every answer outside 2xx (wrk's own count of failed
-- statuses starts at 400).
-- done() prints one machine-readable line, "WRK_JSON {...}" (times in microseconds), with the same fields as
-- route_unique.lua minus the prompt bookkeeping, plus body_bytes.

-- Globals of the thread's Lua state.
body_bytes = 0

local threads = {}
local req = nil

function setup(thread)
   table.insert(threads, thread)
end

local function read_body(spec)
   if spec:sub(1, 1) ~= "@" then
      return spec
   end
   local path = spec:sub(2)
   local f = assert(io.open(path, "rb"), "post_json.lua: cannot open body file " .. path)
   local text = f:read("*a")
   f:close()
   return (text:gsub("\r?\n$", ""))
end

function init(args)
   local spec = args[1] or os.getenv("WRK_BODY")
   if spec == nil or spec == "" then
      error("post_json.lua: pass the JSON body (or @FILE) after '--' (or set WRK_BODY)")
   end
   local body = read_body(spec)
   if not body:match("^%s*[{%[]") then
      error("post_json.lua: the body does not look like JSON: " .. body:sub(1, 80))
   end
   body_bytes = #body
   req = wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body)
end

function request()
   return req
end

-- wrk's own summary.errors.status counts only statuses above 399: a 1xx or 3xx (a redirect) would pass as served
non_2xx = 0

function response(status, headers, body)
   if status < 200 or status > 299 then
      non_2xx = non_2xx + 1
   end
end

function done(summary, latency, requests)
   local size = 0
   for _, t in ipairs(threads) do
      size = t:get("body_bytes") or size
   end
   local e = summary.errors
   local failed = 0
   for _, t in ipairs(threads) do
      failed = failed + (t:get("non_2xx") or 0)
   end
   io.write(string.format(
      'WRK_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"non_2xx":%.0f,'
         .. '"socket_errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"timeout":%.0f},'
         .. '"latency_us":{"min":%.1f,"mean":%.1f,"max":%.1f,"stdev":%.1f,'
         .. '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p99.9":%.1f},'
         .. '"body_bytes":%.0f}\n',
      summary.requests, summary.duration, summary.bytes, failed,
      e.connect, e.read, e.write, e.timeout,
      latency.min, latency.mean, latency.max, latency.stdev,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
      size))
end
