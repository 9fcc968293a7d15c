-- Stores one user's revocation, keeping the later cutoff and expiry, and drops expired ones.
-- KEYS[1]: hash field -> "issued_before expires_at"; KEYS[2]: sorted set field -> expires_at.
-- ARGV: field, issued_before, expires_at, now (Unix seconds), max entries.
local field = ARGV[1]
local issued_before = tonumber(ARGV[2])
local expires_at = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local old = redis.call('HGET', KEYS[1], field)
if old then
  local ib, ex = string.match(old, '^(%d+) (%d+)$')
  if ib then
    issued_before = math.max(issued_before, tonumber(ib))
    expires_at = math.max(expires_at, tonumber(ex))
  end
elseif redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) then
  return 0
end
redis.call('HSET', KEYS[1], field, string.format('%d %d', issued_before, expires_at))
redis.call('ZADD', KEYS[2], expires_at, field)
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
local ttl = tonumber(last[2]) - now + 1
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return 1
