-- A connection of a user closed (or its node died). KEYS as in connect.lua.
-- ARGV: 1 member, 2 now (ms), 3 OFFLINE event payload, 4 history size, 5 room ttl (ms),
--       6 epoch candidate, 7 tenant room channel, 8 sharded.
-- Publishes OFFLINE, once, when it was the user's last live connection. Returns 1 if it did.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('DEL', KEYS[2]) == 1 then
  lamplight_emit(KEYS[3], KEYS[4], ARGV[7], ARGV[3], true, ARGV[4], ARGV[5], ARGV[6], ARGV[8] == '1')
  return 1
end
return 0
