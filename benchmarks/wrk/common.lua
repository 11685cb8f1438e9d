-- Shared by the wrk scripts here, each of which loads it with dofile from its own folder (wrk loads a script into
-- every thread's Lua state and the main one, so this runs in each).

-- wrk's own summary.errors.status counts only statuses above 399: a 1xx or 3xx (a redirect) would pass as served
non_2xx = 0

function response(status, headers, body)
   if status < 200 or status > 299 then
      non_2xx = non_2xx + 1
   end
end

-- The fields every script's "WRK_JSON {...}" line starts with (times in microseconds), without its closing brace:
-- the script appends its own fields.
function summary_fields(summary, latency, threads)
   local failed = 0
   for _, t in ipairs(threads) do
      failed = failed + (t:get("non_2xx") or 0)
   end
   local e = summary.errors
   return string.format(
      '{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"non_2xx":%.0f,'
         .. '"socket_errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"timeout":%.0f},'
         .. '"latency_us":{"min":%.1f,"mean":%.1f,"max":%.1f,"stdev":%.1f,'
         .. '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p99.9":%.1f}',
      summary.requests, summary.duration, summary.bytes, failed,
      e.connect, e.read, e.write, e.timeout,
      latency.min, latency.mean, latency.max, latency.stdev,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9))
end
