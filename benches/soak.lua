-- wrk script for benches/soak.rs: requests /k/0 .. /k/KEYS-1 (warmed
-- before the run), and with probability UNIQUE a URL never asked before
-- (/u/...). Counts 5xx answers by the key's kind, from the X-Path header the
-- soak's origin puts on every answer (a 5xx without it came from swr-proxy
-- itself), and prints one machine-readable RESULT line.
local keys = tonumber(os.getenv("KEYS") or "1000")
local unique = tonumber(os.getenv("UNIQUE") or "0.05")
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() * 1000 + id)
  n = 0
  answers = 0
  warm_5xx = 0
  warm_5xx_no_copy = 0
  unique_5xx = 0
  unknown_5xx = 0
end

function request()
  n = n + 1
  if math.random() < unique then
    return wrk.format("GET", "/u/" .. os.time() .. "-" .. id .. "-" .. n)
  end
  return wrk.format("GET", "/k/" .. math.random(0, keys - 1))
end

function response(status, headers, body)
  answers = answers + 1
  if status >= 500 then
    local path = headers["x-path"]
    if path == nil then
      unknown_5xx = unknown_5xx + 1
    elseif string.sub(path, 1, 3) == "/k/" then
      warm_5xx = warm_5xx + 1
      -- MISS or BYPASS (a miss whose fetch failed, then hit-for-miss):
      -- swr-proxy held no copy of the key any more (evicted).
      local cache = headers["x-cache"]
      if cache == "MISS" or cache == "BYPASS" then
        warm_5xx_no_copy = warm_5xx_no_copy + 1
      end
      if warm_5xx <= 3 then
        io.write("WARM5XX " .. path .. " " .. status .. " x-cache=" .. tostring(headers["x-cache"]) .. " cache-status=" .. tostring(headers["cache-status"]) .. "\n")
      end
    else
      unique_5xx = unique_5xx + 1
    end
  end
end

function done(summary, latency, requests)
  local totals = { answers = 0, warm_5xx = 0, warm_5xx_no_copy = 0, unique_5xx = 0, unknown_5xx = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + thread:get(name)
    end
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d socket_errors=%d timeouts=%d answers=%d warm_5xx=%d warm_5xx_no_copy=%d unique_5xx=%d unknown_5xx=%d p50_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write, e.timeout,
    totals.answers, totals.warm_5xx, totals.warm_5xx_no_copy, totals.unique_5xx, totals.unknown_5xx,
    latency:percentile(50), latency:percentile(99), latency.max))
end
