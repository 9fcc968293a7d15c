-- Publish one event. KEYS: 1 stream, 2 meta, 3 idempotency key (all in the room's slot).
-- ARGV: 1 payload, 2 ephemeral ('1'/'0'), 3 history size, 4 room ttl (ms), 5 epoch candidate,
--       6 channel, 7 sharded ('1'/'0'), 8 idempotency ttl (ms; '0' = no key).
-- Returns {event id, 1 if it is the id of an earlier publish with the same key else 0}.
local keep = tonumber(ARGV[8])
if keep > 0 then
  local first = redis.call('GET', KEYS[3])
  if first then
    return {first, 1}
  end
end
local id = lamplight_emit(KEYS[1], KEYS[2], ARGV[6], ARGV[1], ARGV[2] == '1', ARGV[3], ARGV[4],
  ARGV[5], ARGV[7] == '1')
if keep > 0 then
  redis.call('SET', KEYS[3], id, 'PX', keep)
end
return {id, 0}
