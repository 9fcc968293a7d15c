-- Publishes a tenant's status changes (see src/statuses.rs): takes up to ARGV[2] dirty users, and for
-- each whose state (online set) differs from what the tenant room was told (told set), records it as told
-- and adds it to one PresenceDiff event, published to the tenant room: deciding what is told and
-- publishing it are one atomic step, so the told set is what the room's subscribers heard, in order.
-- The tenant's events are spaced cluster-wide: a publish records when the next may come (the spacing of
-- StatusSettings::spacing, from the users now told online), and a settle that opens a round (ARGV[12])
-- before then takes nothing and answers how long to wait; whichever node settles next takes every
-- dirty user, also those other nodes marked. Times are Redis's clock (TIME), so node clocks do not matter.
-- KEYS: 1 tenant's dirty users, 2 tenant's online users, 3 tenant's users told online, 4 tenant room
--       stream, 5 tenant room meta, 6 tenant's next settle time (ms).
-- ARGV: 1 the event without id and payload (encoded), 2 most users to take, 3 history size,
--       4 room ttl (ms), 5 epoch candidate, 6 tenant room channel, 7 sharded, 8 ttl of the told set (ms),
--       9 window (ms), 10 deliveries per second (0: none), 11 longest spacing (ms), 12 '1': gated.
-- Returns {users taken, changes published, users still dirty, users told online, ms to wait}.
local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if ARGV[12] == '1' then
  local next_at = tonumber(redis.call('GET', KEYS[6]) or '0')
  if now < next_at then
    return {0, 0, redis.call('SCARD', KEYS[1]), redis.call('SCARD', KEYS[3]), next_at - now}
  end
end
local users = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
table.sort(users)
local online, offline = {}, {}
for _, user in ipairs(users) do
  local is_online = redis.call('SISMEMBER', KEYS[2], user) == 1
  local told = redis.call('SISMEMBER', KEYS[3], user) == 1
  if is_online ~= told then
    if is_online then
      redis.call('SADD', KEYS[3], user)
      online[#online + 1] = user
    else
      redis.call('SREM', KEYS[3], user)
      offline[#offline + 1] = user
    end
  end
end
local changes = #online + #offline
if changes > 0 then
  redis.call('PEXPIRE', KEYS[3], ARGV[8])
  -- PresenceDiff { online = 2; offline = 3 }: each a string of "\n"-separated ids, left out when empty.
  local diff = ''
  if #online > 0 then
    local list = table.concat(online, '\n')
    diff = diff .. '\18' .. varint(#list) .. list
  end
  if #offline > 0 then
    local list = table.concat(offline, '\n')
    diff = diff .. '\26' .. varint(#list) .. list
  end
  -- Event field 17 (presence_diff), length-delimited: tag (17 << 3) | 2 = 138, as a varint.
  local payload = ARGV[1] .. '\138\1' .. varint(#diff) .. diff
  lamplight_emit(KEYS[4], KEYS[5], ARGV[6], payload, true, ARGV[3], ARGV[4], ARGV[5], ARGV[7] == '1')
  local told = redis.call('SCARD', KEYS[3])
  local spacing = tonumber(ARGV[9])
  local rate = tonumber(ARGV[10])
  if rate > 0 then
    spacing = math.min(math.max(spacing, math.floor(told * 1000 / rate)), tonumber(ARGV[11]))
  end
  redis.call('SET', KEYS[6], now + spacing, 'PX', spacing + 1000)
end
return {#users, changes, redis.call('SCARD', KEYS[1]), redis.call('SCARD', KEYS[3]), 0}
