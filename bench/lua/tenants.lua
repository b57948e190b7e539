-- The multi-tenant scenario: one bearer token per tenant; per request a tenant at random, then
-- 90 % GET /api/chains/<id> (one of the tenant's chains), 5 % POST /api/chains/<id>/deployments,
-- 5 % GET /api/chains.
-- Usage: wrk -s tenants.lua URL -- TOKENS.lua [SEED]   (TOKENS.lua returns a list of tokens, one per tenant)
-- Every request is built in init(), so request() only draws numbers; the draws are seeded, so a run
-- sends the same sequence every time.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "report.lua")  -- done()

local CHAINS = 8  -- chains per tenant
local DEPLOYMENT = '{"version":"1.4.2","region":"eu-west-1"}'
local tenants = {}
local count = 0

local function auth(token, extra)
  local headers = {Authorization = "Bearer " .. token}
  for k, v in pairs(extra or {}) do headers[k] = v end
  return headers
end

function init(args)
  math.randomseed(tonumber(args[2] or "1"))
  for i, token in ipairs(dofile(args[1])) do
    local chains = {}
    for k = 1, CHAINS do
      chains[k] = wrk.format("GET", string.format("/api/chains/chain-%d-%d", i, k), auth(token))
    end
    tenants[i] = {
      chains = chains,
      deploy = wrk.format("POST", string.format("/api/chains/chain-%d-1/deployments", i),
                          auth(token, {["Content-Type"] = "application/json"}), DEPLOYMENT),
      list = wrk.format("GET", "/api/chains", auth(token)),
    }
    count = i
  end
end

function request()
  local tenant = tenants[math.random(count)]
  local draw = math.random(100)
  if draw <= 90 then
    return tenant.chains[math.random(CHAINS)]
  elseif draw <= 95 then
    return tenant.deploy
  end
  return tenant.list
end
