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
-- KEYS[3+nc..]       gauge key of each guard rule
-- ARGV: n, now_1 .. now_n (whole microseconds), call_id, marker_ttl, then
--       expire_at (period keys), period_end, bucket_ttl,
--       has_rate, per_second, burst,
--       nc, then nc x (meter, units, limit or "", enforce 0|1),
--       ng, then ng x (meter, limit),
--       nb, then nb x (meter, units)
-- Reply: {{before, ...}, decision_1, ..., decision_n}
--        `before` is each counter's count before this call and then each guard's gauge, in rule order;
--        a decision is the rate's remaining (-1 without a rate) for an admitted request, and
--        {reason, meter or "", retry_after, rate_remaining or -1} for a refused one. What a request
--        saw of a counter is `before` plus its units times the requests admitted up to it (the
--        caller works it out), so an admitted request costs one integer in the reply.
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
    for i = 1, nc do
      counters[i].used = counters[i].used + counters[i].units
    end
    if has_rate then
      tat, last_now = new_tat, now
    end
    replies[1 + j] = rate_remaining
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
end

if marker then
  redis.call('SET', marker, table.concat(flags), 'EX', marker_ttl)
end

return replies
