-- A connection of a user is open (or recorded again: after Redis lost it, or after its node was reaped).
-- KEYS: 1 user's connections (zset), 2 user's online flag, 3 tenant's online users (set),
--       4 tenant's dirty users (set), 5 tenant's users told online (set).
-- ARGV: 1 member, 2 now (ms, its score), 3 ttl of the keys (ms), 4 user id, 5 statuses on ('1'/'0').
-- Members do not expire: a connection counts until its node removes it, or a live node reaps its node.
-- Decides ONLINE when the user was not online; then, with statuses on, records the user as online and
-- dirty (settle.lua publishes it). Returns 1 if it decided ONLINE.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local statuses = ARGV[5] == '1'
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  if statuses then
    redis.call('SADD', KEYS[3], ARGV[4])
    redis.call('SADD', KEYS[4], ARGV[4])
    redis.call('PEXPIRE', KEYS[4], ARGV[3])
    redis.call('PEXPIRE', KEYS[3], ARGV[3])
    redis.call('PEXPIRE', KEYS[5], ARGV[3])
  end
  return 1
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if statuses then
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  redis.call('PEXPIRE', KEYS[5], ARGV[3])
end
return 0
