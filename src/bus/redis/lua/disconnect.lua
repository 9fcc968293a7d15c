-- A connection of a user closed (or its node died). KEYS as in connect.lua.
-- ARGV: 1 member, 2 user id, 3 statuses on ('1'/'0'), 4 ttl of the dirty set (ms).
-- Decides OFFLINE, once, when it was the user's last connection (those of a dead node count until a live
-- node reaps it); then, with statuses on, records the user as offline and dirty (settle.lua publishes
-- it). Returns 1 if it decided OFFLINE.
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('DEL', KEYS[2]) == 1 then
  if ARGV[3] == '1' then
    redis.call('SREM', KEYS[3], ARGV[2])
    redis.call('SADD', KEYS[4], ARGV[2])
    redis.call('PEXPIRE', KEYS[4], ARGV[4])
  end
  return 1
end
return 0
