-- The single-token scenario: every request is `GET /api/chains` with the same bearer token.
-- Usage: wrk -s single.lua URL -- TOKENS.lua   (TOKENS.lua returns a list of tokens; the first is used)
-- No request() function: wrk builds the request once and sends it over and over.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "report.lua")  -- done()

function init(args)
  local tokens = dofile(args[1])
  wrk.method = "GET"
  wrk.path = "/api/chains"
  wrk.headers["Authorization"] = "Bearer " .. tokens[1]
end
