-- A live node claims a dead node in the registry to reap it, or renews its claim while it reaps.
-- KEYS: 1 the registry (see node_beat.lua).
-- ARGV: 1 the dead node, 2 now (ms), 3 claim lease (ms), 4 the claim being renewed (its score), or ''
--       to claim anew: only an expired entry (0 <= score <= now) or a stale claim (renewed a lease ago
--       or more) can be claimed, so one reaper at a time wins each node.
-- Returns 1 if the caller holds the claim, now scored -now; 0 if not (the node refreshed its entry,
-- said goodbye, or another reaper has it).
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return 0
end
score = tonumber(score)
local now = tonumber(ARGV[2])
local ok
if ARGV[4] == '' then
  ok = (score >= 0 and score <= now) or (score < 0 and now + score >= tonumber(ARGV[3]))
else
  ok = score == tonumber(ARGV[4])
end
if not ok then
  return 0
end
redis.call('ZADD', KEYS[1], '-' .. ARGV[2], ARGV[1])
return 1
