//! The Lua scripts of the Redis transport. Each runs atomically in Redis, which is why they
//! exist: kombu does these steps client-side (BRPOP, then a pipeline into `unacked`), so a
//! worker killed between the two loses the message; a script cannot be cut in half.
//! The scripts touch only the keys they are given, except [`PROMOTE`], which pushes to the
//! list named inside each delayed entry (so the Redis broker is a single Redis, not a cluster —
//! kombu's transport needs that too).

/// Takes up to `ARGV[2]` messages from the lists `KEYS[3..]` (in that order: the priority
/// lists of the queues, highest priority first, each emptied before the next is read) from
/// their consuming end, and records each in `unacked` (`KEYS[1]`, kombu's
/// `[message, exchange, routing_key]` JSON by delivery tag) and `unacked_index` (`KEYS[2]`,
/// by `ARGV[1]`, the time now) in the same step.
/// Returns `{list key, message, tag, list key, message, tag, ...}`, with an empty tag for a
/// message that is not a kombu envelope (it is then in neither: the caller dead-letters it);
/// an empty array when all are empty. A tag must be 1–255 bytes of printable ASCII (kombu's
/// and mediafarm's are UUIDs): any other (bytes that are not UTF-8, say) would be a key of
/// `unacked` that no reader of it could name.
pub const FETCH: &str = r#"
local most = tonumber(ARGV[2]) or 1
local out = {}
local taken = 0
for i = 3, #KEYS do
  while taken < most do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    taken = taken + 1
    local ok, env = pcall(cjson.decode, m)
    local tag = ''
    if ok and type(env) == 'table' and type(env['properties']) == 'table'
        and type(env['properties']['delivery_tag']) == 'string'
        and #env['properties']['delivery_tag'] <= 255
        and string.find(env['properties']['delivery_tag'], '^[!-~]+$') then
      tag = env['properties']['delivery_tag']
      local info = env['properties']['delivery_info']
      local ex, rk = '', ''
      if type(info) == 'table' then
        if type(info['exchange']) == 'string' then ex = info['exchange'] end
        if type(info['routing_key']) == 'string' then rk = info['routing_key'] end
      end
      redis.call('HSET', KEYS[1], tag, '[' .. m .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      redis.call('ZADD', KEYS[2], ARGV[1], tag)
    end
    out[#out + 1] = KEYS[i]
    out[#out + 1] = m
    out[#out + 1] = tag
  end
  if taken >= most then break end
end
return out
"#;

/// Puts message `ARGV[1]` (a tag in `unacked` `KEYS[1]`) back, if `unacked` still holds
/// exactly `ARGV[2]` for it (what the caller read: a compare-and-set, as kombu's WATCH
/// transaction): removes it from `unacked` and `unacked_index` (`KEYS[2]`) and pushes
/// `ARGV[3]` (the message marked redelivered) onto the lists `KEYS[3..]`, at the consuming
/// end when `ARGV[4]` is `front`, else at the back. Returns 1 when put back.
pub const RESTORE: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #KEYS do
  if ARGV[4] == 'front' then
    redis.call('RPUSH', KEYS[i], ARGV[3])
  else
    redis.call('LPUSH', KEYS[i], ARGV[3])
  end
end
return 1
"#;

/// Acknowledges `ARGV[1]` (removes it from `unacked` `KEYS[1]` and `unacked_index` `KEYS[2]`)
/// and, in the same step, adds `ARGV[3]` to the sorted set `KEYS[3]` with score `ARGV[2]`
/// (a delay), or pushes it onto the list `KEYS[3]` when `ARGV[2]` is `list` (a dead letter).
pub const HAND_OVER: &str = r#"
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == 'list' then
  redis.call('LPUSH', KEYS[3], ARGV[3])
else
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
end
return 1
"#;

/// Moves at most `ARGV[2]` entries of the delayed set `KEYS[1]` due at `ARGV[1]` onto their
/// lists; an entry is `<list key>\n<message>`. Returns how many moved. Two workers running
/// it at once move each entry once: the script is atomic.
pub const PROMOTE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, entry in ipairs(due) do
  redis.call('ZREM', KEYS[1], entry)
  local cut = string.find(entry, '\n', 1, true)
  if cut then
    redis.call('LPUSH', string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1))
  end
end
return #due
"#;

/// Releases the lock `KEYS[1]` if it still holds our token `ARGV[1]` (redis-py's `Lock`,
/// which kombu's `Mutex` uses, releases the same way).
pub const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Moves dead letter `ARGV[1]` out of the list `KEYS[1]` (once) and pushes `ARGV[2]` (its
/// replay) onto the list `KEYS[2]`, in one step: a replay is neither lost nor doubled by a
/// crash. Returns 1 when moved, 0 when the letter was no longer there.
pub const REPLAY: &str = r#"
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
"#;
