-- lamplight: helpers shared by the scripts below (prepended to each one by scripts.rs).
-- A room's keys all carry the hash tag {room}: one script can touch them together, also in a cluster.
-- Room meta hash: epoch, last (last stream id), stored ('1' once an event was stored in this epoch),
-- eph (ephemeral events since the last stored one), trimmed (newest entry dropped by trimming).

-- The room's epoch. A new one (`candidate`) is created when there is none, or when the stream it
-- described is gone (expired, flushed, deleted): ids of the old epoch can then never claim recovery.
local function lamplight_epoch(stream, meta, candidate, ttl)
  local m = redis.call('HMGET', meta, 'epoch', 'stored')
  if m[1] and not (m[2] == '1' and redis.call('EXISTS', stream) == 0) then
    return m[1]
  end
  redis.call('DEL', meta)
  redis.call('HSET', meta, 'epoch', candidate, 'stored', '0', 'last', '0-0', 'eph', '0')
  redis.call('PEXPIRE', meta, ttl)
  return candidate
end

-- Assigns the event id, stores the event (unless ephemeral) and publishes it, in one atomic step, so
-- the id in history and the id delivered live are the same. Returns the event id.
local function lamplight_emit(stream, meta, channel, payload, ephemeral, maxlen, ttl, candidate, sharded)
  local epoch = lamplight_epoch(stream, meta, candidate, ttl)
  local id
  if ephemeral then
    local n = redis.call('HINCRBY', meta, 'eph', 1)
    id = redis.call('HGET', meta, 'last') .. '.' .. string.format('%d', n)
  else
    -- Remember the newest entry trimming drops (XADD's trimming does not record it): a `since`
    -- before it cannot be recovered.
    local len = redis.call('XLEN', stream)
    local keep = tonumber(maxlen)
    if len >= keep then
      local dropped = redis.call('XRANGE', stream, '-', '+', 'COUNT', len - keep + 1)
      redis.call('HSET', meta, 'trimmed', dropped[#dropped][1])
    end
    id = redis.call('XADD', stream, 'MAXLEN', maxlen, '*', 'e', payload)
    redis.call('HSET', meta, 'last', id, 'stored', '1', 'eph', '0')
    redis.call('PEXPIRE', stream, ttl)
  end
  redis.call('PEXPIRE', meta, ttl)
  local full = epoch .. ':' .. id
  if sharded then
    redis.call('SPUBLISH', channel, full .. '\n' .. payload)
  else
    redis.call('PUBLISH', channel, full .. '\n' .. payload)
  end
  return full
end

