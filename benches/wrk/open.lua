-- Opens accounts acc-<thread>-<n>, each exactly once.
local counter = 0
local thread_id = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  thread_id = tid
end
function request()
  counter = counter + 1
  local path = string.format("/commands/account/acc-%d-%d/open", thread_id, counter)
  return wrk.format("POST", path, {["content-type"] = "application/json"}, '{"owner":"bench"}')
end
