-- A connection of a user is open (or still open: heartbeats run this too).
-- KEYS: 1 user's connections (zset), 2 user's online flag, 3 tenant room stream, 4 tenant room meta.
-- ARGV: 1 member, 2 its expiry (ms), 3 now (ms), 4 ttl of the flag and the set (ms), 5 ONLINE payload,
--       6 history size, 7 room ttl (ms), 8 epoch candidate, 9 tenant room channel, 10 sharded.
-- Publishes ONLINE when the user was not online. Returns 1 if it did.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[4]) then
  lamplight_emit(KEYS[3], KEYS[4], ARGV[9], ARGV[5], true, ARGV[6], ARGV[7], ARGV[8], ARGV[10] == '1')
  return 1
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 0
