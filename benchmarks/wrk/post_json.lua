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

dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")  -- response(), summary_fields()

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

function done(summary, latency, requests)
   local size = 0
   for _, t in ipairs(threads) do
      size = t:get("body_bytes") or size
   end
   io.write("WRK_JSON " .. summary_fields(summary, latency, threads) .. string.format(',"body_bytes":%.0f}\n', size))
end
