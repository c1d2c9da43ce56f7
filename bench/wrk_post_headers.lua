-- wrk_post.lua with extra request headers, for bodies that are not JSON (KServe V2 binary tensors):
--   wrk ... -s wrk_post_headers.lua URL -- BODY_FILE "Name: value" ...
-- Each "Name: value" argument after the body file sets (or replaces) one header.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "wrk_post.lua")

local post_init = init

function init(args)
  post_init(args)
  for i = 2, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    wrk.headers[name] = value
  end
end
