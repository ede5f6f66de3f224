#!lua name=pushgate

-- pushgate's Redis functions. Every node loads this library (FUNCTION LOAD REPLACE) when it
-- connects to Redis. Backends publish into history channels with pushgate_publish.
--
-- A history channel `c` has two keys:
--   {prefix}:history:c   a Stream of the channel's messages, entry IDs `{offset}-0`
--   {prefix}:meta:c      a hash: `epoch` (a random ID) and `offset` (the last offset assigned)
-- A presence channel has a hash {prefix}:presence:c (session -> JSON entry) and a sorted set
-- {prefix}:presence-exp:c (session scored by its expiry, Unix ms by Redis's clock).

local function int(n)
  return string.format('%d', n)
end

-- The channel's epoch; a new one (and an empty stream, so that offsets restart) when the meta
-- hash is missing: never created, expired, or deleted.
local function ensure_epoch(stream, meta, ttl)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    local t = redis.call('TIME')
    epoch = string.sub(redis.sha1hex(meta .. ':' .. t[1] .. ':' .. t[2]), 1, 16)
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
    redis.call('PEXPIRE', meta, ttl)
  end
  return epoch
end

local function positive(value, name)
  local n = tonumber(value)
  if not n or n < 1 or n ~= math.floor(n) then
    error(name .. ' must be a positive integer')
  end
  return n
end

-- FCALL pushgate_publish 2 <stream key> <meta key> <pubsub channel> <envelope JSON> <size> <ttl ms>
-- Assigns the next offset, appends the message (trimmed to size), sets both keys to expire
-- after ttl ms, and publishes it, all at once. Returns {offset, epoch}.
local function publish(keys, args)
  local stream, meta = keys[1], keys[2]
  local topic, envelope = args[1], args[2]
  local size = positive(args[3], 'size')
  local ttl = positive(args[4], 'ttl')
  if not topic or not envelope then
    error('usage: FCALL pushgate_publish 2 stream meta channel envelope size ttl_ms')
  end
  local rest = string.match(envelope, '^%s*{%s*(.*)$')
  if not rest then
    error('the envelope must be a JSON object')
  end
  local epoch = ensure_epoch(stream, meta, ttl)
  local offset = redis.call('HINCRBY', meta, 'offset', 1)
  local sep = ','
  if string.sub(rest, 1, 1) == '}' then
    sep = ''
  end
  local payload = '{"offset":' .. int(offset) .. ',"epoch":"' .. epoch .. '"' .. sep .. rest
  redis.call('XADD', stream, 'MAXLEN', int(size), int(offset) .. '-0', 'm', payload)
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PUBLISH', topic, payload)
  return {offset, epoch}
end

-- FCALL pushgate_history 2 <stream key> <meta key> <after> <limit> <ttl ms>
-- Returns {epoch, top offset, {offset, payload, offset, payload, ...}}: the messages after
-- offset `after` that history still holds, oldest first, at most `limit`.
local function history(keys, args)
  local stream, meta = keys[1], keys[2]
  local after = tonumber(args[1]) or 0
  local limit = tonumber(args[2]) or 0
  local ttl = positive(args[3], 'ttl')
  local epoch = ensure_epoch(stream, meta, ttl)
  local top = tonumber(redis.call('HGET', meta, 'offset')) or 0
  local entries = {}
  if limit > 0 and after < top then
    local rows = redis.call('XRANGE', stream, int(after + 1) .. '-0', '+', 'COUNT', int(limit))
    for _, row in ipairs(rows) do
      local offset = tonumber(string.match(row[1], '^(%d+)'))
      local fields = row[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'm' then
          entries[#entries + 1] = offset
          entries[#entries + 1] = fields[i + 1]
        end
      end
    end
  end
  return {epoch, top, entries}
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Makes a key live at least ttl ms more.
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end

-- FCALL pushgate_presence_add 2 <hash> <zset> <ttl ms> <session> <entry JSON> [<session> <entry> ...]
local function presence_add(keys, args)
  local ttl = positive(args[1], 'ttl')
  local expires = now_ms() + ttl
  for i = 2, #args - 1, 2 do
    redis.call('HSET', keys[1], args[i], args[i + 1])
    redis.call('ZADD', keys[2], int(expires), args[i])
  end
  keep(keys[1], ttl)
  keep(keys[2], ttl)
  return 1
end

-- FCALL pushgate_presence_touch 2 <hash> <zset> <ttl ms> <session> [<session> ...]
-- Extends the sessions that are still present (a removed one stays removed).
local function presence_touch(keys, args)
  local ttl = positive(args[1], 'ttl')
  local expires = int(now_ms() + ttl)
  for i = 2, #args do
    redis.call('ZADD', keys[2], 'XX', expires, args[i])
  end
  keep(keys[1], ttl)
  keep(keys[2], ttl)
  return 1
end

-- FCALL pushgate_presence_remove 2 <hash> <zset> <session> [<session> ...]
local function presence_remove(keys, args)
  for i = 1, #args do
    redis.call('HDEL', keys[1], args[i])
    redis.call('ZREM', keys[2], args[i])
  end
  return 1
end

-- FCALL pushgate_presence_list 2 <hash> <zset>
-- Drops expired entries, returns the others' JSON.
local function presence_list(keys)
  local now = now_ms()
  local expired = redis.call('ZRANGEBYSCORE', keys[2], '-inf', '(' .. int(now))
  for _, session in ipairs(expired) do
    redis.call('HDEL', keys[1], session)
    redis.call('ZREM', keys[2], session)
  end
  local out = {}
  for _, session in ipairs(redis.call('ZRANGEBYSCORE', keys[2], int(now), '+inf')) do
    local entry = redis.call('HGET', keys[1], session)
    if entry then
      out[#out + 1] = entry
    end
  end
  return out
end

redis.register_function('pushgate_publish', publish)
redis.register_function('pushgate_history', history)
redis.register_function('pushgate_presence_add', presence_add)
redis.register_function('pushgate_presence_touch', presence_touch)
redis.register_function('pushgate_presence_remove', presence_remove)
redis.register_function('pushgate_presence_list', presence_list)
