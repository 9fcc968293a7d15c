-- A reaper lets go of its claim on a dead node (see node_claim.lua).
-- KEYS: 1 the registry. ARGV: 1 the node, 2 the claim (its score), 3 'done' (its connections are
-- removed: the entry goes) or 'retry' (the reap failed half-way: the claim is left stale, so that any
-- live node takes it over at once, and the node itself, if it was alive after all, records its
-- connections again). Returns 1 if the claim was still the caller's.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] == 'done' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], -1, ARGV[1])
end
return 1
