-- Where a room stands, and its stored events after a stream id. KEYS: 1 stream, 2 meta.
-- ARGV: 1 epoch candidate, 2 room ttl (ms), 3 read after this stream id (exclusive; '' = read none),
--       4 most entries to return, 5 stop after the entry that makes the payloads exceed this many bytes
--       ('' = no byte bound; at least one entry is returned), 6 read up to this id (inclusive; '' = '+').
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
    local upto = '+'
    if ARGV[6] and ARGV[6] ~= '' then
      upto = ARGV[6]
    end
    entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3], upto, 'COUNT', ARGV[4])
    if ARGV[5] and ARGV[5] ~= '' then
      local budget, used = tonumber(ARGV[5]), 0
      for i = 1, #entries do
        used = used + #entries[i][2][2]
        if used > budget then
          for j = #entries, i + 1, -1 do
            entries[j] = nil
          end
          break
        end
      end
    end
  end
end
return {epoch, last, trimmed, deleted, entries}
