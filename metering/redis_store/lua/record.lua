-- record.lua: what is known after the response: refunds, byte counts, reported gauges.
--
-- All keys belong to one tenant (hash tag {t:<tenant>}), so the script touches one cluster slot.
-- KEYS[1]   billing bucket hash (meter -> billable value)
-- KEYS[2]   idempotency marker (only used when marker_ttl is not 0)
-- KEYS[3..] one key per refund, add and count entry (period counter) and per gauge entry (gauge key)
-- ARGV: expire_at (period keys), bucket_ttl, marker_ttl, n_refund, n_add, n_count, n_bill, n_gauge,
--       then the entries in that order, each (meter, value):
--   refund  take units back from the period counter (never below 0) and the bucket (may go below 0)
--   add     add units to the period counter and the bucket (byte meters)
--   count   add units to the period counter only (spooled admitted checks)
--   bill    add units to the bucket only (spooled admitted checks; no key)
--   gauge   set the gauge, and the bucket field to that last value
-- Optionally, the outcome of a check call whose reply was lost decides (see check_and_count.lua): the
-- last KEY is then that call's marker and the last two ARGV are (index of the request in the call,
-- mode): mode 1 applies only if the call did not admit that request (the spooled counts of a request
-- served while Redis did not answer), mode 2 only if it did (the give-back of a request refused or
-- abandoned meanwhile). A missing marker is written as 'f' first: the call is settled as never run.
-- Reply: 1 applied, 0 already applied (marker present), 2 not applied: the check call decided so.

local expire_at = tonumber(ARGV[1])
local bucket_ttl = tonumber(ARGV[2])
local marker_ttl = tonumber(ARGV[3])

-- Scripts do not roll back: the marker is checked first but set last, after every write succeeded,
-- so a replay that failed halfway is not taken for done the next time. A negative marker_ttl is a
-- record's first send (the request path's, with an id of this process just made): it cannot have been
-- applied yet, so the marker is only set, for a replay of a spooled copy to find.
if marker_ttl > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end

local n_entries = 0
for i = 4, 8 do
  n_entries = n_entries + tonumber(ARGV[i])
end
if #ARGV > 8 + 2 * n_entries then
  local index = tonumber(ARGV[#ARGV - 2])
  local mode = tonumber(ARGV[#ARGV - 1])
  local call_ttl = tonumber(ARGV[#ARGV])
  local call = KEYS[#KEYS]
  local seen = redis.call('GET', call)
  if not seen then
    redis.call('SET', call, 'f', 'EX', call_ttl)
    seen = 'f'
  end
  local admitted = seen ~= 'f' and string.sub(seen, index, index) == '1'
  if (mode == 1 and admitted) or (mode == 2 and not admitted) then
    return 2
  end
end

local bucket = KEYS[1]
-- Expiries are set when a key or a bucket field is created, as check_and_count.lua does: only these two
-- scripts create them, each setting the expiry in the same atomic call, so a key whose value is just what
-- was added is new.
local fresh = false
local k = 3
local a = 9

local function each(count, fn)
  for _ = 1, count do
    fn(ARGV[a], ARGV[a + 1])
    a = a + 2
  end
end

each(tonumber(ARGV[4]), function(meter, value)
  local units = tonumber(value)
  local key = KEYS[k]
  k = k + 1
  local current = tonumber(redis.call('GET', key) or '0')
  local back = math.min(current, units)
  if back > 0 then
    redis.call('DECRBY', key, back)
  end
  -- The bucket is not clamped: a refund arriving after the admission's bucket closed lands in the
  -- current one and may take it below 0; the sync worker carries such a debit into the next bucket,
  -- so the tenant's billed total is right either way.
  if redis.call('HINCRBY', bucket, meter, -units) == -units then
    fresh = true
  end
end)

local function count(meter, value)
  local key = KEYS[k]
  k = k + 1
  local units = tonumber(value)
  if redis.call('INCRBY', key, units) == units then
    redis.call('EXPIREAT', key, expire_at)
  end
end

local function bill(meter, value)
  local units = tonumber(value)
  if redis.call('HINCRBY', bucket, meter, units) == units then
    fresh = true
  end
end

each(tonumber(ARGV[5]), function(meter, value)
  count(meter, value)
  bill(meter, value)
end)
each(tonumber(ARGV[6]), count)
each(tonumber(ARGV[7]), bill)
each(tonumber(ARGV[8]), function(meter, value)
  redis.call('SET', KEYS[k], value)
  k = k + 1
  if redis.call('HSET', bucket, meter, value) == 1 then
    fresh = true
  end
end)

if fresh then
  redis.call('EXPIRE', bucket, bucket_ttl)
end
if marker_ttl ~= 0 then
  redis.call('SET', KEYS[2], '1', 'EX', math.abs(marker_ttl))
end
return 1
