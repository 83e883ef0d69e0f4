-- wrk script of bench/residency.py (owns the load of the many-models cell): each request
-- POSTs the same one-row body to the model the next line of a Zipf sample names, and
-- done() prints the run's numbers as one JSON line, prefixed "BENCH_JSON ".
--
--   wrk -t2 -c16 -d10s -s bench/zipf.lua URL -- paths=FILE body=JSON
--
-- paths=FILE: one request path per line (/v1/models/m07:predict). Each thread goes through
-- the lines in order from its own place, so the threads do not send the same sequence.

local paths = {}
local body = nil
local position = 1
local non200 = 0
local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
  table.insert(threads, thread)
end

function init(args)
  for _, arg in ipairs(args) do
    local key, value = arg:match("^(%w+)=(.*)$")
    if key == "paths" then
      for line in io.lines(value) do
        table.insert(paths, line)
      end
    elseif key == "body" then
      body = value
    end
  end
  assert(#paths > 0, "paths=FILE names no paths")
  position = ((thread_id - 1) * 7919) % #paths + 1
end

function request()
  local path = paths[position]
  position = position % #paths + 1
  return wrk.format("POST", path, { ["Content-Type"] = "application/json" }, body)
end

function response(status, headers, response_body)
  if status ~= 200 then
    non200 = non200 + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("non200") or 0)
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "non200": %d, "socket_errors": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, bad,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max
  ))
end
