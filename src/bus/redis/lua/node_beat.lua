-- A node refreshes its entry in the node registry (see src/bus/redis/presence/).
-- KEYS: 1 the registry (zset: node -> expiry of its entry in ms; or, while a reaper removes the node's
--       connections, minus the time the reaper last renewed its claim).
-- ARGV: 1 node, 2 now (ms), 3 the entry's new expiry (ms), 4 claim lease (ms), 5 ttl of the registry (ms).
-- Returns 0: refreshed. 1: registered anew (there was no entry: the node just started, Redis lost its
-- data, or a reaper took the node for dead and removed its connections; or the reaper's claim went
-- stale): the node must record its connections again. 2: not refreshed, a reaper is removing the node's
-- connections: the node waits until it is done (it would undo the node's writes).
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local result = 0
if not score then
  result = 1
elseif tonumber(score) < 0 then
  if tonumber(ARGV[2]) + tonumber(score) < tonumber(ARGV[4]) then
    return 2
  end
  result = 1
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return result
