-- A connection of a user closed (or its node died). KEYS as in connect.lua.
-- ARGV: 1 member, 2 now (ms), 3 user id, 4 statuses on ('1'/'0'), 5 ttl of the dirty set (ms).
-- Decides OFFLINE, once, when it was the user's last live connection; then, with statuses on, records
-- the user as offline and dirty (settle.lua publishes it). Returns 1 if it decided OFFLINE.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('DEL', KEYS[2]) == 1 then
  if ARGV[4] == '1' then
    redis.call('SREM', KEYS[3], ARGV[3])
    redis.call('SADD', KEYS[4], ARGV[3])
    redis.call('PEXPIRE', KEYS[4], ARGV[5])
  end
  return 1
end
return 0
