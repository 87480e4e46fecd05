-- Deposits into accounts acc-<thread>-<1..N> that open.lua created.
local thread_id = 0
local threads = {}
local n = tonumber(os.getenv("ACCOUNTS") or "1000")
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  thread_id = tid
  math.randomseed(thread_id + 7)
end
function request()
  local path = string.format("/commands/account/acc-%d-%d/deposit", thread_id, math.random(1, n))
  return wrk.format("POST", path, {["content-type"] = "application/json"}, '{"amount":1}')
end
