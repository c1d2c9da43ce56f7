-- POSTs the body of the file named by the first script argument (wrk ... -s wrk_post.lua URL -- FILE),
-- counts non-2xx answers per thread, and prints one JSON line of results in done(). A second
-- argument paces each connection: it waits that many milliseconds before each request.
local body_file = nil
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  body_file = args[1]
  local f = assert(io.open(body_file, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
  non2xx = 0
  statuses = {}
  if args[2] then
    local pause_ms = tonumber(args[2])
    delay = function() return pause_ms end
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local non = 0
  local codes = {}
  for _, t in ipairs(threads) do
    non = non + (t:get("non2xx") or 0)
    local st = t:get("statuses")
    if st then for k, v in pairs(st) do codes[#codes + 1] = string.format('"%d": %d', k, v) end end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "non2xx": %d, "statuses": {%s}, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"lat_mean_us": %.1f, "lat_max_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, non, table.concat(codes, ", "),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
