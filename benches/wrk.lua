-- wrk script for benches/load.rs: spreads requests over KEYS keys
-- (/k/0 .. /k/KEYS-1), uniformly or, with ZIPF=s, by a Zipf law of
-- exponent s (key /k/i has weight 1/(i+1)^s); a NEW share of them (0 to 1)
-- on URLs never asked before (/n/<thread>-<n>); prints one
-- machine-readable RESULT line. HOST, when set, is every request's Host.
-- With TOP=n, answers for the keys /k/0 .. /k/(n-1) are counted, and those
-- served stale (X-Cache: STALE) among them (the origin names each answer's
-- key in X-Key); the RESULT line gains top_answers= and top_stale=.
local keys = tonumber(os.getenv("KEYS") or "1")
local new_share = tonumber(os.getenv("NEW") or "0")
local zipf = tonumber(os.getenv("ZIPF") or "0")
-- HOST: every request's Host (the fleet scenario: one name for every
-- instance, as behind a load balancer); default, the address wrk targets.
local host = os.getenv("HOST") or ""
local top = tonumber(os.getenv("TOP") or "0")
local new_urls = 0
local threads = {}
top_answers = 0
top_stale = 0
-- With ZIPF: cdf[i] is the probability that a draw is one of the keys
-- /k/0 .. /k/(i-1) (the table is 1-based, the keys 0-based).
local cdf = nil

function setup(thread)
  thread:set("seed", math.random(1, 1000000))
  table.insert(threads, thread)
end

-- Only with TOP: wrk reads every answer's headers into Lua only when a
-- response function exists, which costs it throughput.
if top > 0 then
  function response(status, headers, body)
    local key = tonumber(headers["x-key"] or headers["X-Key"] or "")
    if key and key < top then
      top_answers = top_answers + 1
      local cache = headers["x-cache"] or headers["X-Cache"]
      if cache == "STALE" then
        top_stale = top_stale + 1
      end
    end
  end
end

function init(args)
  math.randomseed(seed or os.time())
  if host ~= "" then
    wrk.headers["Host"] = host
  end
  if zipf > 0 then
    cdf = {}
    local total = 0
    for i = 1, keys do
      total = total + 1 / (i ^ zipf)
      cdf[i] = total
    end
    for i = 1, keys do
      cdf[i] = cdf[i] / total
    end
  end
end

-- The key a Zipf draw gives: the first whose cumulative share reaches u.
local function zipf_key()
  local u = math.random()
  local lo, hi = 1, keys
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo - 1
end

function request()
  if new_share > 0 and math.random() < new_share then
    new_urls = new_urls + 1
    return wrk.format("GET", "/n/" .. seed .. "-" .. new_urls)
  end
  if cdf then
    return wrk.format("GET", "/k/" .. zipf_key())
  end
  return wrk.format("GET", "/k/" .. math.random(0, keys - 1))
end

-- The share of answers at or above `us` microseconds, by bisecting the
-- percentile function (wrk's Lua API has no direct rank lookup).
local function share_at_or_above(latency, us)
  if latency.max < us then return 0 end
  local lo, hi = 0.0, 100.0
  for _ = 1, 50 do
    local mid = (lo + hi) / 2
    if latency:percentile(mid) >= us then hi = mid else lo = mid end
  end
  return (100.0 - hi) / 100.0
end

function done(summary, latency, requests)
  local e = summary.errors
  local answers, stale = 0, 0
  for _, thread in ipairs(threads) do
    answers = answers + (thread:get("top_answers") or 0)
    stale = stale + (thread:get("top_stale") or 0)
  end
  io.write(string.format(
    "RESULT requests=%d duration_us=%d errors=%d p50_us=%d p99_us=%d max_us=%d slow100_share=%.8f top_answers=%d top_stale=%d\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max,
    share_at_or_above(latency, 100000), answers, stale))
end
