-- A connection of a user is open (or still open: heartbeats run this too).
-- KEYS: 1 user's connections (zset), 2 user's online flag, 3 tenant's online users (set),
--       4 tenant's dirty users (set), 5 tenant's users told online (set).
-- ARGV: 1 member, 2 its expiry (ms), 3 now (ms), 4 ttl of the flag and the sets (ms), 5 user id,
--       6 statuses on ('1'/'0').
-- Decides ONLINE when the user was not online; then, with statuses on, records the user as online and
-- dirty (settle.lua publishes it). Returns 1 if it decided ONLINE.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local statuses = ARGV[6] == '1'
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[4]) then
  if statuses then
    redis.call('SADD', KEYS[3], ARGV[5])
    redis.call('SADD', KEYS[4], ARGV[5])
    redis.call('PEXPIRE', KEYS[4], ARGV[4])
    redis.call('PEXPIRE', KEYS[3], ARGV[4])
    redis.call('PEXPIRE', KEYS[5], ARGV[4])
  end
  return 1
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
-- The tenant's sets live as long as any of its users heartbeats.
if statuses then
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[5], ARGV[4])
end
return 0
