#!lua name=pushgate

-- pushgate's Redis functions. Every node loads this library (FUNCTION LOAD REPLACE) when it
-- connects to Redis. Backends publish into history channels with pushgate_publish.
--
-- A history channel `c` has two keys:
--   {prefix}:history:c   a Stream of the channel's messages, entry IDs `{offset}-0`
--   {prefix}:meta:c      a hash: `epoch` (a random ID) and `offset` (the last offset assigned)
-- A presence channel has a hash {prefix}:presence:c (session -> JSON entry), a sorted set
-- {prefix}:presence-exp:c (session scored by its expiry, Unix ms by Redis's clock) and a hash
-- {prefix}:presence-users:c (user -> how many of the user's sessions have an entry). On a
-- presence-events channel the functions that change the entries also publish a join when a
-- user's count goes from 0 to 1 and a leave when it drops to 0, on the channel's topic.
-- On Redis Cluster every key of `c` is named after its topic instead, as a hash tag
-- ({prefix:ch:c}:history, {prefix:ch:c}:meta, ...), so that it lives in the topic's slot.

local function int(n)
  return string.format('%d', n)
end

-- The run ID of this Redis process: a new one at every start, so a promoted replica's differs
-- from its old primary's. Read once per process (INFO costs more than a publish) and kept with
-- the loaded library, which every process loads for itself.
local this_run_id
local function run_id()
  if not this_run_id then
    this_run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  end
  return this_run_id
end

-- On Redis Cluster, this server's node ID; false elsewhere. Read once per process.
local this_node_id
local function node_id()
  if this_node_id == nil then
    local cluster = string.find(redis.call('INFO', 'cluster'), 'cluster_enabled:1', 1, true)
    this_node_id = cluster and redis.call('CLUSTER', 'MYID') or false
  end
  return this_node_id
end

-- Publishes on a node topic: with PUBLISH, or on Redis Cluster with SPUBLISH, since nodes there
-- subscribe to shard channels.
local function publish_to(topic, payload)
  redis.call(node_id() and 'SPUBLISH' or 'PUBLISH', topic, payload)
end

-- Whether the cluster node `id` is a primary in good standing now (not failed, not a replica).
local function live_primary(id)
  for line in string.gmatch(redis.call('CLUSTER', 'NODES'), '[^\n]+') do
    local node, flags = string.match(line, '^(%x+) %S+ (%S+)')
    if node == id then
      return string.find(flags, 'master', 1, true) ~= nil
        and not string.find(flags, 'fail', 1, true)
    end
  end
  return false
end

-- The channel's epoch; a new one (and an empty stream, so that offsets restart) when the meta
-- hash is missing (never created, expired, or deleted), or was written by another Redis process
-- that may have handed out offsets this one lacks. Replication and AOF fsync are asynchronous: a
-- promoted replica, or a Redis restarted from an AOF, may lack the last offsets handed out, and
-- must not hand them out again in the same epoch. Keys that a reshard moved here from another
-- primary (MIGRATE moves them whole) keep their epoch, as long as that primary is still up.
local function ensure_epoch(stream, meta, ttl)
  local epoch, server, node = unpack(redis.call('HMGET', meta, 'epoch', 'server', 'node'))
  local me, my_node = run_id(), node_id() or ''
  if epoch and server ~= me then
    if my_node ~= '' and node and node ~= my_node and live_primary(node) then
      redis.call('HSET', meta, 'server', me, 'node', my_node)
    else
      epoch = nil
    end
  end
  if not epoch then
    local t = redis.call('TIME')
    epoch = string.sub(redis.sha1hex(meta .. ':' .. me .. ':' .. t[1] .. ':' .. t[2]), 1, 16)
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0, 'server', me, 'node', my_node)
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
  publish_to(topic, payload)
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

-- The JSON of the entries still live at `now` (hash keys[1], expiries in zset keys[2]).
local function live_entries(keys, now)
  local out = {}
  for _, session in ipairs(redis.call('ZRANGEBYSCORE', keys[2], int(now), '+inf')) do
    local entry = redis.call('HGET', keys[1], session)
    if entry then
      out[#out + 1] = entry
    end
  end
  return out
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
  return live_entries(keys, now)
end

-- The functions above (presence_add, _touch, _remove, _list) are what nodes of earlier
-- versions call; they neither count users nor send events. Nodes now call the ones below, which
-- take the users hash as a third key.

-- Publishes a join or leave on `topic` (none when it is empty):
-- {"presence":"join","user":"bob","session":"n2.0301..."}
local function presence_event(topic, kind, user, session)
  if topic and topic ~= '' then
    publish_to(topic, '{"presence":"' .. kind .. '","user":' .. cjson.encode(user)
      .. ',"session":' .. cjson.encode(session) .. '}')
  end
end

local function user_of(entry)
  local ok, decoded = pcall(cjson.decode, entry)
  if ok and type(decoded) == 'table' and type(decoded.user) == 'string' then
    return decoded.user
  end
  return nil
end

-- Removes a session's entry; when it was its user's last, publishes a leave.
local function remove_entry(keys, topic, session)
  redis.call('ZREM', keys[2], session)
  local entry = redis.call('HGET', keys[1], session)
  if not entry then
    return 0
  end
  redis.call('HDEL', keys[1], session)
  local user = user_of(entry)
  if user then
    -- An entry an earlier node added was not counted: at or below 0 is the last one too.
    if redis.call('HINCRBY', keys[3], user, -1) <= 0 then
      redis.call('HDEL', keys[3], user)
      presence_event(topic, 'leave', user, session)
    end
  end
  return 1
end

local function keep_all(keys, ttl)
  for _, key in ipairs(keys) do
    keep(key, ttl)
  end
end

-- FCALL pushgate_presence_join 3 <hash> <zset> <users> <ttl ms> <topic|""> <session> <user> <entry JSON> [...]
-- Adds (or extends) entries. A new entry counts its user; the user's first publishes a join.
local function presence_join(keys, args)
  local ttl = positive(args[1], 'ttl')
  local topic = args[2]
  local expires = int(now_ms() + ttl)
  for i = 3, #args - 2, 3 do
    local session, user, entry = args[i], args[i + 1], args[i + 2]
    if redis.call('HSET', keys[1], session, entry) == 1 then
      if redis.call('HINCRBY', keys[3], user, 1) == 1 then
        presence_event(topic, 'join', user, session)
      end
    end
    redis.call('ZADD', keys[2], expires, session)
  end
  keep_all(keys, ttl)
  return 1
end

-- FCALL pushgate_presence_leave 3 <hash> <zset> <users> <topic|""> <session> [<session> ...]
-- Removes entries; a user's last publishes a leave. Returns how many were there.
local function presence_leave(keys, args)
  local removed = 0
  for i = 2, #args do
    removed = removed + remove_entry(keys, args[1], args[i])
  end
  return removed
end

-- FCALL pushgate_presence_refresh 3 <hash> <zset> <users> <ttl ms> <session> [<session> ...]
-- Extends the entries of these sessions (every heartbeat of the node holding them). Returns
-- the sessions that have no entry (removed as expired while their node was slow, or lost): the
-- node adds them again.
local function presence_refresh(keys, args)
  local ttl = positive(args[1], 'ttl')
  local expires = int(now_ms() + ttl)
  local missing = {}
  for i = 2, #args do
    if redis.call('HEXISTS', keys[1], args[i]) == 1 then
      redis.call('ZADD', keys[2], expires, args[i])
    else
      missing[#missing + 1] = args[i]
    end
  end
  keep_all(keys, ttl)
  return missing
end

-- FCALL pushgate_presence_expire 3 <hash> <zset> <users> <topic|""> <limit>
-- Removes at most `limit` entries whose expiry has passed (their node stopped refreshing them),
-- with their leaves. Returns how many. Atomic: of nodes sweeping at once, one removes each.
local function presence_expire(keys, args)
  local limit = positive(args[2], 'limit')
  local expired = redis.call('ZRANGEBYSCORE', keys[2], '-inf', '(' .. int(now_ms()),
    'LIMIT', 0, int(limit))
  for _, session in ipairs(expired) do
    remove_entry(keys, args[1], session)
  end
  return #expired
end

-- FCALL pushgate_presence_members 3 <hash> <zset> <users> <topic|"">
-- Removes expired entries (with their leaves), returns the others' JSON.
local function presence_members(keys, args)
  local now = now_ms()
  for _, session in ipairs(redis.call('ZRANGEBYSCORE', keys[2], '-inf', '(' .. int(now))) do
    remove_entry(keys, args[1], session)
  end
  return live_entries(keys, now)
end

redis.register_function('pushgate_publish', publish)
redis.register_function('pushgate_history', history)
redis.register_function('pushgate_presence_add', presence_add)
redis.register_function('pushgate_presence_touch', presence_touch)
redis.register_function('pushgate_presence_remove', presence_remove)
redis.register_function('pushgate_presence_list', presence_list)
redis.register_function('pushgate_presence_join', presence_join)
redis.register_function('pushgate_presence_leave', presence_leave)
redis.register_function('pushgate_presence_refresh', presence_refresh)
redis.register_function('pushgate_presence_expire', presence_expire)
redis.register_function('pushgate_presence_members', presence_members)
