-- Where a room stands, and its stored events after a stream id. KEYS: 1 stream, 2 meta.
-- ARGV: 1 epoch candidate, 2 room ttl (ms), 3 read after this stream id (exclusive; '' = read none),
--       4 most entries to return.
-- Returns {epoch, last stream id, newest id dropped by trimming, max-deleted-entry-id (XDEL), entries}.
local epoch = lamplight_epoch(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
local m = redis.call('HMGET', KEYS[2], 'last', 'trimmed')
local last, trimmed = m[1], m[2] or '0-0'
local deleted = '0-0'
local entries = {}
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' then
      deleted = info[i + 1]
    end
  end
  if ARGV[3] ~= '' then
    entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3], '+', 'COUNT', ARGV[4])
  end
end
return {epoch, last, trimmed, deleted, entries}
