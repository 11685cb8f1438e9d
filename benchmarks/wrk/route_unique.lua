-- wrk script: POST a JSON body with a different prompt on every request.
--
-- Usage: wrk -t2 -c64 -d20s -s route_unique.lua http://127.0.0.1:PORT/v1/route -- PROMPTS_FILE [THREADS [EXTRA [FIELD]]]
--   PROMPTS_FILE  one prompt per line (plain text; this script JSON-escapes it). Env WRK_PROMPTS if omitted.
--   THREADS       the -t value, so each thread takes its own slice of the file (default 1).
--   EXTRA         optional JSON object whose fields are added to every body, e.g. '{"cost_weight":0.5}'.
--   FIELD         the body field that carries the prompt (default "prompt").
--
-- Thread k of T walks prompts [k*N/T, (k+1)*N/T) in order; its connections share that cursor, so no prompt is
-- sent twice in a run unless a slice runs out (then it wraps, and done() reports prompt_wraps > 0).
-- Request bodies are built once in init(), so request() costs a table lookup.
-- done() prints one machine-readable line: "WRK_JSON {...}" (times in microseconds).

dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")  -- response(), summary_fields()

local threads = {}

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
end

local function json_escape(s)
   s = s:gsub('[%c"\\]', function(c)
      if c == '"' then return '\\"' end
      if c == "\\" then return "\\\\" end
      if c == "\n" then return "\\n" end
      if c == "\r" then return "\\r" end
      if c == "\t" then return "\\t" end
      return string.format("\\u%04x", c:byte())
   end)
   return s
end

-- Globals of the thread's Lua state (read back from done() via thread:get).
requests_built = 0
prompts_issued = 0
prompt_wraps = 0
prompts_total = 0

local bodies = {}
local cursor = 1

function init(args)
   local path = args[1] or os.getenv("WRK_PROMPTS")
   if path == nil or path == "" then
      error("route_unique.lua: pass the prompts file after '--' (or set WRK_PROMPTS)")
   end
   local nthreads = tonumber(args[2]) or 1
   local extra = args[3] or ""
   local field = args[4] or "prompt"

   local prompts = {}
   local f = assert(io.open(path, "r"))
   for line in f:lines() do
      line = line:gsub("\r$", "")
      if line ~= "" then
         prompts[#prompts + 1] = line
      end
   end
   f:close()
   prompts_total = #prompts

   -- The object's inner fields (without braces), appended after the prompt field.
   local extra_fields = extra:match("^%s*{(.*)}%s*$") or ""
   if extra_fields:match("%S") then
      extra_fields = "," .. extra_fields
   else
      extra_fields = ""
   end

   local index = thread_index or 0
   local lo = math.floor(index * #prompts / nthreads) + 1
   local hi = math.floor((index + 1) * #prompts / nthreads)
   if hi < lo then
      error(string.format("route_unique.lua: thread %d has no prompts (%d prompts, %d threads)",
         index, #prompts, nthreads))
   end

   local headers = { ["Content-Type"] = "application/json" }
   for i = lo, hi do
      local body = '{"' .. field .. '":"' .. json_escape(prompts[i]) .. '"' .. extra_fields .. "}"
      bodies[#bodies + 1] = wrk.format("POST", nil, headers, body)
   end
   requests_built = #bodies
end

function request()
   local req = bodies[cursor]
   cursor = cursor + 1
   prompts_issued = prompts_issued + 1
   if cursor > #bodies then
      cursor = 1
      prompt_wraps = prompt_wraps + 1
   end
   return req
end

function done(summary, latency, requests)
   local issued, wraps, built, total = 0, 0, 0, 0
   for _, t in ipairs(threads) do
      issued = issued + (t:get("prompts_issued") or 0)
      wraps = wraps + (t:get("prompt_wraps") or 0)
      built = built + (t:get("requests_built") or 0)
      total = t:get("prompts_total") or total
   end
   io.write("WRK_JSON " .. summary_fields(summary, latency, threads) .. string.format(
      ',"prompts_total":%.0f,"prompts_in_slices":%.0f,"prompts_issued":%.0f,"prompt_wraps":%.0f}\n',
      total, built, issued, wraps))
end
