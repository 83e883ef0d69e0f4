-- wrk script of bench/run.py (owns the load one wrk run sends): POSTs one body per request
-- and prints the run's numbers as one JSON line, prefixed "BENCH_JSON ", from done().
--
--   wrk -t2 -c16 -d10s -s bench/post.lua URL -- bodies=FILE seed=N [repeat=0.5 pool=32]
--   wrk -t2 -c8 -d10s -s bench/post.lua URL -- body=FILE ctype=TYPE [header=NAME:VALUE]
--   key=KEY (any form) sends "Authorization: Bearer KEY"
--
-- bodies=FILE: one template per line, "prefix<TAB>number<TAB>suffix". A request sends
-- prefix .. (number + a random value below 0.001) .. suffix, so no two requests carry the
-- same input and an inference cache never answers one. With repeat=P, a request is instead,
-- with probability P, one of the first `pool` templates sent exactly as written: half the
-- load repeating a few inputs, for the cache cell.
-- body=FILE: the whole file, bytes as they are, is every request's body (binary tensors).
-- lines=FILE: one whole body per line; requests go through the lines in order, each
-- thread from its own place (texts, where the order is the workload: a Zipf sample).

local templates = {}
local lines = {}
local fixed_body = nil
local repeat_share = 0
local pool_size = 32

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
end

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  local options = {}
  for _, arg in ipairs(args) do
    local key, value = arg:match("^([%w_]+)=(.*)$")
    assert(key, "arguments are key=value, got " .. arg)
    options[key] = value
  end
  if options.ctype then
    wrk.headers["Content-Type"] = options.ctype
  end
  if options.header then
    local name, value = options.header:match("^([^:]+):%s*(.*)$")
    wrk.headers[name] = value
  end
  if options.key then
    wrk.headers["Authorization"] = "Bearer " .. options.key
  end
  if options.body then
    fixed_body = read_file(options.body)
  elseif options.lines then
    for line in io.lines(options.lines) do
      lines[#lines + 1] = line
    end
    assert(#lines > 0, "no lines in " .. options.lines)
  else
    for line in io.lines(options.bodies) do
      local prefix, number, suffix = line:match("^(.-)\t(.-)\t(.*)$")
      assert(prefix, "a template line needs two tabs")
      templates[#templates + 1] = { prefix, tonumber(number), suffix, prefix .. number .. suffix }
    end
    assert(#templates > 0, "no templates in " .. options.bodies)
  end
  repeat_share = tonumber(options["repeat"] or "0")
  pool_size = math.min(tonumber(options.pool or "32"), #templates)
  math.randomseed(tonumber(options.seed or "1") + 7919 * (thread_id or 0))
  if #lines > 0 then
    next_line = math.random(#lines) - 1
  end
end

local next_index = 0
next_line = 0

function request()
  if fixed_body then
    return wrk.format(nil, nil, nil, fixed_body)
  end
  if #lines > 0 then
    next_line = next_line % #lines + 1
    return wrk.format(nil, nil, nil, lines[next_line])
  end
  if repeat_share > 0 and math.random() < repeat_share then
    return wrk.format(nil, nil, nil, templates[math.random(pool_size)][4])
  end
  next_index = next_index % #templates + 1
  local t = templates[next_index]
  local value = string.format("%.9g", t[2] + math.random() * 0.001)
  return wrk.format(nil, nil, nil, t[1] .. value .. t[3])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect_errors": %d, '
      .. '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, '
      .. '"p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean
  ))
end
