-- check_and_count.lua: decide the requests of one tenant to one route, one after the other, each over
-- every rule at once; a request counts only when all its rules pass, a refused one counts nothing.
--
-- A call carries n requests that share everything but their time (the gateway sends the requests of
-- a batch with the same keys and rules as one call): they are decided in order exactly as n calls
-- would decide them, and the counts of the admitted ones are written once at the end.
--
-- All keys belong to one tenant (hash tag {t:<tenant>}), so the script touches one cluster slot.
-- KEYS[1]            rate key (GCRA theoretical arrival time, seconds as a decimal string)
-- KEYS[2]            billing bucket hash (meter -> billable units)
-- KEYS[3..2+nc]      period counter of each counter rule
-- KEYS[3+nc..2+nc+ng] gauge key of each guard rule
-- and only when the check has shadow rules (k = 2+nc+ng):
-- KEYS[k+1]          the shadow rate's GCRA state
-- KEYS[k+2]          the period's shadow hits: hash "<reason>:<meter>" -> admitted requests a shadow rule
--                    would have refused
-- KEYS[k+3..]        gauge key of each shadow guard
-- ARGV: n, now_1 .. now_n (whole microseconds), call_id, marker_ttl, then
--       expire_at (period keys), period_end, bucket_ttl,
--       has_rate, per_second, burst,
--       nc, then nc x (meter, units, limit or "", enforce 0|1),
--       ng, then ng x (meter, limit),
--       nb, then nb x (meter, units),
--       and only when the check has shadow rules:
--       has_shadow_rate, per_second, burst,
--       nsc, then nsc x (index of the counter rule, shadow limit),
--       nsg, then nsg x (meter, limit)
-- Reply: {{before, ...}, decision_1, ..., decision_n}
--        `before` is each counter's count before this call and then each guard's gauge, in rule order;
--        a decision is the rate's remaining (-1 without a rate) for an admitted request,
--        {rate_remaining or -1, reason, meter} for an admitted request that a shadow rule would have
--        refused (the first in the order below; the rate's meter is "rate"), and
--        {reason, meter or "", retry_after, rate_remaining or -1} for a refused one. What a request
--        saw of a counter is `before` plus its units times the requests admitted up to it (the
--        caller works it out), so an admitted request costs one integer in the reply.
--
-- Shadow rules (`enforce: shadow`) never refuse: an admitted request is held against them as if they were
-- enforced (rate, then counters, then guards), and the first it would fail is reported and counted in the
-- shadow hits hash. The shadow rate has its own GCRA state, which moves on only when it would admit. A
-- refused request is not held against them. Without shadow rules nothing here costs more than a test of
-- one flag per admitted request: the hot path of issue 12 stays the same commands.
-- Floats travel as strings: Redis truncates Lua numbers to integers in replies.
-- The times come from the caller's clock (not TIME), so tests can fix the time.
--
-- The call marker: a call whose reply the gateway never got (a lost connection, a timeout) has an
-- unknown outcome. The script records, atomically with its effects, which of its requests it admitted
-- ('1'/'0' per request) under <bucket key>:c:<call_id> for marker_ttl seconds. Whoever settles such a
-- call later (a spool replay of an admitted request, the give-back of a refused one) reads the marker,
-- or writes 'f' there first when it is missing: a call marked 'f' has been settled as never run, and
-- refuses to run if its bytes reach Redis afterwards (error FENCED). The marker key shares the tenant's
-- hash tag with KEYS[2], so it lives in the same cluster slot.

local n = tonumber(ARGV[1])
local call_id = ARGV[n + 2]
local marker_ttl = tonumber(ARGV[n + 3])
local marker
if call_id ~= '' then
  marker = KEYS[2] .. ':c:' .. call_id
  if redis.call('EXISTS', marker) == 1 then
    return redis.error_reply('FENCED this call was settled as never run')
  end
end
local o = n + 3 -- ARGV[o + k] is the k-th argument after the times and the call id and marker ttl
local expire_at = tonumber(ARGV[o + 1])
local period_end = tonumber(ARGV[o + 2])
local bucket_ttl = tonumber(ARGV[o + 3])
local has_rate = ARGV[o + 4] == '1'
local per_second = tonumber(ARGV[o + 5])
local burst = tonumber(ARGV[o + 6])

local function fmt(x)
  return string.format('%.17g', x)
end

local nc = tonumber(ARGV[o + 7])
local counters = {}
local a = o + 8
for i = 1, nc do
  local limit = ARGV[a + 2]
  counters[i] = {
    meter = ARGV[a], units = tonumber(ARGV[a + 1]),
    limit = (limit ~= '') and tonumber(limit) or nil, enforce = ARGV[a + 3] == '1',
    key = KEYS[2 + i],
    used = tonumber(redis.call('GET', KEYS[2 + i]) or '0'),
  }
  a = a + 4
end

local ng = tonumber(ARGV[a])
a = a + 1
local guards = {}
for i = 1, ng do
  guards[i] = {
    meter = ARGV[a], limit = tonumber(ARGV[a + 1]),
    value = tonumber(redis.call('GET', KEYS[2 + nc + i]) or '0') or 0,
  }
  a = a + 2
end

local nb = tonumber(ARGV[a])
a = a + 1
local bills = {}
for i = 1, nb do
  bills[i] = {meter = ARGV[a], units = tonumber(ARGV[a + 1])}
  a = a + 2
end

local shadow = ARGV[a] ~= nil -- the shadow section is sent only by checks that have shadow rules
local s_rate, s_interval, s_burst, s_tat, s_last_now, s_counters, s_guards, s_key, hits_key, s_hits, s_fields
if shadow then
  local k = 2 + nc + ng
  s_key, hits_key = KEYS[k + 1], KEYS[k + 2]
  s_rate = ARGV[a] == '1'
  if s_rate then
    s_interval = 1 / tonumber(ARGV[a + 1])
    s_burst = tonumber(ARGV[a + 2])
    s_tat = tonumber(redis.call('GET', s_key) or '0') or 0
  end
  a = a + 3
  local nsc = tonumber(ARGV[a])
  a = a + 1
  s_counters = {}
  for i = 1, nsc do
    s_counters[i] = {counter = counters[tonumber(ARGV[a])], limit = tonumber(ARGV[a + 1])}
    a = a + 2
  end
  local nsg = tonumber(ARGV[a])
  a = a + 1
  s_guards = {}
  for i = 1, nsg do
    s_guards[i] = {
      meter = ARGV[a], limit = tonumber(ARGV[a + 1]),
      value = tonumber(redis.call('GET', KEYS[k + 2 + i]) or '0') or 0,
    }
    a = a + 2
  end
  s_hits, s_fields = {}, {}
end

-- The first shadow rule an admitted request at `now` would fail, as (reason, meter), or nil; called before
-- the request's units are counted, so a counter is compared as an enforced one is. Made only when needed.
local shadow_hit
if shadow then
  shadow_hit = function(now)
    local reason, meter
    if s_rate then
      local start = s_tat
      if start < now then start = now end
      local new_tat = start + s_interval
      if new_tat - s_burst * s_interval - now > 1e-6 then
        reason, meter = 'rate', 'rate'
      else
        s_tat, s_last_now = new_tat, now
      end
    end
    if not reason then
      for i = 1, #s_counters do
        local s = s_counters[i]
        if s.counter.used + s.counter.units > s.limit then
          reason, meter = 'quota', s.counter.meter
          break
        end
      end
    end
    if not reason then
      for i = 1, #s_guards do
        local g = s_guards[i]
        if g.value >= g.limit then
          reason, meter = 'guard', g.meter
          break
        end
      end
    end
    return reason, meter
  end
end

-- GCRA: each request moves the theoretical arrival time (TAT) on by one emission interval; a request
-- is allowed while the TAT stays within `burst` intervals of now.
local interval, tat, last_now
if has_rate then
  interval = 1 / per_second
  tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
end

local admitted = 0
local before = {}
for i = 1, nc do
  before[i] = fmt(counters[i].used)
end
for i = 1, ng do
  before[nc + i] = fmt(guards[i].value)
end
local replies = {before}
local flags = {}
for j = 1, n do
  local now = tonumber(ARGV[1 + j]) / 1000000
  local reason, meter, retry_after = '', '', 0
  local rate_remaining = -1
  local new_tat

  if has_rate then
    local start = tat
    if start < now then start = now end
    new_tat = start + interval
    local allow_at = new_tat - burst * interval
    -- The TAT is stored with microsecond precision, so compare with that much slack: otherwise a TAT
    -- rounded up by a fraction of a microsecond could refuse the last request of a burst.
    if allow_at - now > 1e-6 then
      reason, retry_after = 'rate', allow_at - now
      rate_remaining = 0
    else
      rate_remaining = math.min(burst, math.max(0, math.floor((now - allow_at + 1e-6) / interval)))
    end
  end

  if reason == '' then
    for i = 1, nc do
      local c = counters[i]
      if c.enforce and c.limit and c.used + c.units > c.limit then
        reason, meter, retry_after = 'quota', c.meter, math.max(0, period_end - now)
        break
      end
    end
  end

  if reason == '' then
    for i = 1, ng do
      local g = guards[i]
      if g.value >= g.limit then
        reason, meter = 'guard', g.meter
        break
      end
    end
  end

  if reason == '' then
    admitted = admitted + 1
    replies[1 + j] = rate_remaining
    if shadow then
      local s_reason, s_meter = shadow_hit(now)
      if s_reason then
        replies[1 + j] = {rate_remaining, s_reason, s_meter}
        local field = s_reason .. ':' .. s_meter
        if not s_hits[field] then
          s_hits[field] = 0
          s_fields[#s_fields + 1] = field
        end
        s_hits[field] = s_hits[field] + 1
      end
    end
    for i = 1, nc do
      counters[i].used = counters[i].used + counters[i].units
    end
    if has_rate then
      tat, last_now = new_tat, now
    end
    flags[j] = '1'
  else
    replies[1 + j] = {reason, meter, fmt(retry_after), rate_remaining}
    flags[j] = '0'
  end
end

if admitted > 0 then
  for i = 1, nc do
    local c = counters[i]
    local units = c.units * admitted
    if units ~= 0 then
      -- Only this script and record.lua create counters, and both set the expiry in the same atomic
      -- call, so a key whose value is just these units is new: one EXPIREAT per key and period.
      if redis.call('INCRBY', c.key, units) == units then
        redis.call('EXPIREAT', c.key, expire_at)
      end
    end
  end
  if has_rate then
    -- Once the TAT is in the past the bucket is full, so the key may go then.
    local ttl_ms = math.ceil((tat - last_now) * 1000) + 1000
    redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', ttl_ms)
  end
  local fresh = false
  for i = 1, nb do
    local units = bills[i].units * admitted
    if units ~= 0 then
      -- A field equal to these units was just created: (re)set the bucket's expiry then, not every time.
      if redis.call('HINCRBY', KEYS[2], bills[i].meter, units) == units then
        fresh = true
      end
    end
  end
  if fresh then
    redis.call('EXPIRE', KEYS[2], bucket_ttl)
  end
  if shadow then
    if s_last_now then
      redis.call('SET', s_key, string.format('%.6f', s_tat), 'PX', math.ceil((s_tat - s_last_now) * 1000) + 1000)
    end
    for i = 1, #s_fields do
      local field = s_fields[i]
      -- Like the period counters: the hash expires with them, set when one of its few fields is created.
      if redis.call('HINCRBY', hits_key, field, s_hits[field]) == s_hits[field] then
        redis.call('EXPIREAT', hits_key, expire_at)
      end
    end
  end
end

if marker then
  redis.call('SET', marker, table.concat(flags), 'EX', marker_ttl)
end

return replies
