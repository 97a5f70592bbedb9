"""The job state machine's transitions as Redis Lua scripts: each one atomic, timed by the Redis clock.

Every script that changes a shard takes the same seven keys (``KEYS_OF``) and the job id, shard id and
retention as its first arguments. Times are the server's (``TIME``), so workers' clocks never matter.
"""

from __future__ import annotations

PRELUDE = """
local K_JOB, K_SHARDS, K_JLEASES, K_FAILED, K_LEASES, K_DELAYED, K_ACTIVE =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local JOB, SHARD, RETENTION = ARGV[1], ARGV[2], tonumber(ARGV[3])
local MEMBER = JOB .. '/' .. SHARD
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local T = now()
local function get_rec()
  local raw = redis.call('HGET', K_SHARDS, SHARD)
  if not raw then return nil end
  return cjson.decode(raw)
end
local function put_rec(rec)
  rec.updated = T
  redis.call('HSET', K_SHARDS, SHARD, cjson.encode(rec))
end
local function get_lease()
  local raw = redis.call('HGET', K_JLEASES, SHARD)
  if not raw then return nil end
  return cjson.decode(raw)
end
local function drop_lease()
  if redis.call('HDEL', K_JLEASES, SHARD) == 1 then
    redis.call('HINCRBY', K_JOB, 'n_running', -1)
  end
  redis.call('ZREM', K_LEASES, MEMBER)
end
local function to_failed(rec, reason)
  rec.state = 'failed'
  rec.reason = reason
  rec.failed_at = T
  redis.call('ZADD', K_FAILED, T, SHARD)
  redis.call('HINCRBY', K_JOB, 'n_failed', 1)
end
local function requeue(rec, at)
  rec.state = 'pending'
  if not redis.call('HGET', K_JOB, 'cancelled') then
    redis.call('ZADD', K_DELAYED, at, MEMBER)
  end
end
local function lost_reason(lease, why)
  return 'worker ' .. tostring(lease.worker) .. ' (pid ' .. tostring(lease.pid) .. ') ' .. why ..
    ' during attempt ' .. tostring(lease.attempt)
end
local function maybe_finish()
  local j = redis.call('HMGET', K_JOB, 'finished', 'n_running', 'submitted', 'submit_error', 'n_shards',
                       'n_done', 'n_failed', 'cancelled')
  if j[1] or tonumber(j[2] or '0') > 0 then return false end
  local complete = (j[3] == '1' or j[4]) and
    (tonumber(j[6] or '0') + tonumber(j[7] or '0') >= tonumber(j[5] or '0'))
  if complete or j[8] then
    redis.call('HSET', K_JOB, 'finished', T)
    redis.call('SREM', K_ACTIVE, JOB)
    if RETENTION and RETENTION > 0 then
      for i = 1, 4 do redis.call('EXPIRE', KEYS[i], RETENTION) end
      redis.call('EXPIRE', KEYS[8], RETENTION)
    end
    return true
  end
  return false
end
"""

BEGIN = PRELUDE + """
-- ARGV[4] lease JSON (holder), ARGV[5] lease seconds, ARGV[6] max attempts, ARGV[7] takeover token or ''
if redis.call('EXISTS', K_JOB) == 0 then return {'unknown'} end
if redis.call('HGET', K_JOB, 'cancelled') then return {'cancelled'} end
local rec = get_rec()
if not rec then return {'unknown'} end
if rec.state == 'done' or rec.state == 'failed' then return {rec.state} end
if rec.state == 'running' then
  local lease = get_lease()
  if lease and redis.call('ZSCORE', K_LEASES, MEMBER) and
     tonumber(redis.call('ZSCORE', K_LEASES, MEMBER)) > T and lease.token ~= ARGV[7] then
    return {'running', 0, 0, cjson.encode(lease)}
  end
  if lease then
    rec.reason = lost_reason(lease, 'died')
    rec.lost = (rec.lost or 0) + 1
    redis.call('HINCRBY', K_JOB, 'n_lost', 1)
    redis.call('HSET', K_JOB, 'last_lost', cjson.encode({shard = tonumber(SHARD), worker = lease.worker, at = T}))
  end
  drop_lease()
end
redis.call('ZREM', K_DELAYED, MEMBER)
local max_attempts = tonumber(ARGV[6])
if (rec.attempts or 0) >= max_attempts then  -- this delivery finds the attempts spent
  local reason = 'gave up after ' .. max_attempts .. ' attempts: ' .. (rec.reason or 'unknown')
  to_failed(rec, reason)
  put_rec(rec)
  maybe_finish()
  return {'dead', rec.attempts, rec.runs or 0, '', reason}
end
rec.attempts = (rec.attempts or 0) + 1
local lease = cjson.decode(ARGV[4])
lease.attempt = rec.attempts
lease.started = T
lease.heartbeat = T
rec.state = 'running'
rec.runs = (rec.runs or 0) + 1
rec.started = T
rec.worker = lease.worker
rec.retry_at = nil
put_rec(rec)
redis.call('HSET', K_JLEASES, SHARD, cjson.encode(lease))
redis.call('ZADD', K_LEASES, T + tonumber(ARGV[5]), MEMBER)
redis.call('HINCRBY', K_JOB, 'n_running', 1)
redis.call('HSETNX', K_JOB, 'first_started', T)
return {'run', rec.attempts, rec.runs}
"""

HEARTBEAT = PRELUDE + """
-- ARGV[4] token, ARGV[5] lease seconds
local lease = get_lease()
if not lease or lease.token ~= ARGV[4] then return 'lost' end
lease.heartbeat = T
redis.call('HSET', K_JLEASES, SHARD, cjson.encode(lease))
redis.call('ZADD', K_LEASES, T + tonumber(ARGV[5]), MEMBER)
if redis.call('HGET', K_JOB, 'cancelled') then return 'cancelled' end
return 'ok'
"""

FINISH = PRELUDE + """
-- ARGV[4] token (unused: done is final whoever holds the lease), ARGV[5] result JSON
local rec = get_rec()
if not rec then return 'unknown' end
if rec.state == 'done' then return 'done' end
if rec.state == 'running' then drop_lease() end
if rec.state == 'failed' then
  redis.call('ZREM', K_FAILED, SHARD)
  redis.call('HINCRBY', K_JOB, 'n_failed', -1)
end
redis.call('ZREM', K_DELAYED, MEMBER)
local result = cjson.decode(ARGV[5])
for k, v in pairs(result) do rec[k] = v end
rec.state = 'done'
rec.finished = T
rec.reason = nil
rec.retry_at = nil
put_rec(rec)
redis.call('HINCRBY', K_JOB, 'n_done', 1)
redis.call('HINCRBY', K_JOB, 'images_done', tonumber(result.images or 0))
redis.call('HINCRBY', K_JOB, 'errors_done', tonumber(result.errors or 0))
redis.call('HSET', K_JOB, 'last_finished', T)
if maybe_finish() then return 'finished' end
return 'ok'
"""

FAIL = PRELUDE + """
-- ARGV[4] token, ARGV[5] reason, ARGV[6] seconds until the retry ('' = final)
local lease = get_lease()
local rec = get_rec()
if not rec or rec.state ~= 'running' or not lease or lease.token ~= ARGV[4] then return 'lost' end
drop_lease()
rec.reason = ARGV[5]
if ARGV[6] == '' and not redis.call('HGET', K_JOB, 'cancelled') then
  to_failed(rec, ARGV[5])
else
  local at = T + (tonumber(ARGV[6]) or 0)
  if ARGV[6] ~= '' then rec.retry_at = at end
  requeue(rec, at)
end
put_rec(rec)
maybe_finish()
return rec.state
"""

RELEASE = PRELUDE + """
-- ARGV[4] token, ARGV[5] reason: hand the shard back (a stopping worker); the attempt is not counted
local lease = get_lease()
local rec = get_rec()
if not rec or rec.state ~= 'running' or not lease or lease.token ~= ARGV[4] then return 'lost' end
drop_lease()
rec.attempts = math.max((rec.attempts or 1) - 1, 0)
rec.reason = ARGV[5]
requeue(rec, T)
put_rec(rec)
maybe_finish()
return 'pending'
"""

REAP = PRELUDE + """
-- ARGV[4] max attempts. A lease past its deadline: its worker is gone; requeue or dead-letter the shard.
local score = redis.call('ZSCORE', K_LEASES, MEMBER)
if score and tonumber(score) > T then return {'alive'} end
local lease = get_lease()
local rec = get_rec()
if not lease or not rec or rec.state ~= 'running' then
  redis.call('ZREM', K_LEASES, MEMBER)
  if lease then drop_lease() end
  return {'gone'}
end
drop_lease()
local age = math.floor(T - (lease.heartbeat or T))
rec.reason = lost_reason(lease, 'lost (no heartbeat for ' .. age .. 's)')
rec.lost = (rec.lost or 0) + 1
redis.call('HINCRBY', K_JOB, 'n_lost', 1)
redis.call('HSET', K_JOB, 'last_lost', cjson.encode({shard = tonumber(SHARD), worker = lease.worker, at = T}))
local max_attempts = tonumber(ARGV[4])
if (rec.attempts or 0) >= max_attempts and not redis.call('HGET', K_JOB, 'cancelled') then
  to_failed(rec, 'gave up after ' .. max_attempts .. ' attempts: ' .. rec.reason)
else
  requeue(rec, T)
end
put_rec(rec)
maybe_finish()
return {rec.state, cjson.encode(lease)}
"""

RETRY = PRELUDE + """
-- ARGV[4..]: shard ids to run again ('*' alone: every failed shard). Returns the shards requeued.
if redis.call('EXISTS', K_JOB) == 0 then return {} end
local ids = {}
if ARGV[4] == '*' then
  ids = redis.call('ZRANGE', K_FAILED, 0, -1)
else
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local out = {}
for _, id in ipairs(ids) do
  SHARD = id
  MEMBER = JOB .. '/' .. id
  local rec = get_rec()
  if rec and rec.state ~= 'running' then
    if rec.state == 'failed' then
      redis.call('ZREM', K_FAILED, id)
      redis.call('HINCRBY', K_JOB, 'n_failed', -1)
    elseif rec.state == 'done' then
      redis.call('HINCRBY', K_JOB, 'n_done', -1)
      redis.call('HINCRBY', K_JOB, 'images_done', -tonumber(rec.images or 0))
      redis.call('HINCRBY', K_JOB, 'errors_done', -tonumber(rec.errors or 0))
    end
    rec.state = 'pending'
    rec.attempts = 0
    rec.retry_at = nil
    redis.call('ZADD', K_DELAYED, T, MEMBER)
    put_rec(rec)
    out[#out + 1] = id
  end
end
if #out > 0 then
  redis.call('HDEL', K_JOB, 'finished')
  redis.call('SADD', K_ACTIVE, JOB)
  for i = 1, 4 do redis.call('PERSIST', KEYS[i]) end
  redis.call('PERSIST', KEYS[8])
end
return out
"""

CANCEL = PRELUDE + """
if redis.call('EXISTS', K_JOB) == 0 then return 0 end
redis.call('HSETNX', K_JOB, 'cancelled', T)
maybe_finish()
return 1
"""

SUBMIT_DONE = PRELUDE + """
-- ARGV[4] shards, ARGV[5] images ('' for a failed submit), ARGV[6] submit error ('' when it succeeded)
if ARGV[6] == '' then
  redis.call('HSET', K_JOB, 'submitted', 1, 'shards_total', ARGV[4], 'images_total', ARGV[5])
  redis.call('HDEL', K_JOB, 'submit_error')
else
  redis.call('HSET', K_JOB, 'submit_error', ARGV[6])
end
maybe_finish()
return 1
"""

RESUME = PRELUDE + """
-- a resumed submit: the job is not finished any more
redis.call('HDEL', K_JOB, 'finished', 'submit_error')
redis.call('SADD', K_ACTIVE, JOB)
for i = 1, 4 do redis.call('PERSIST', KEYS[i]) end
redis.call('PERSIST', KEYS[8])
return 1
"""

ADD_SHARD = """
-- KEYS job, shards, uris; ARGV shard, images in, uris blob ('' when the job spools its URIs)
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({state = 'pending', images_in = tonumber(ARGV[2]),
                                                    attempts = 0, runs = 0}))
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
redis.call('HINCRBY', KEYS[1], 'n_shards', 1)
return 1
"""

CREATE = """
-- KEYS job, jobs, active; ARGV job id, spec, created (client time, for display only), queue
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'created', now, 'submitted', 0, 'queue', ARGV[3], 'n_shards', 0,
           'n_done', 0, 'n_failed', 0, 'n_running', 0, 'images_done', 0, 'errors_done', 0, 'n_lost', 0)
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

CLAIM_DUE = """
-- KEYS delayed; ARGV limit, visibility: take due entries for ``visibility`` seconds (a crash between
-- claiming and publishing only delays them). Returns member, claimed score pairs.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
local until_ = now + tonumber(ARGV[2])
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], until_, m)
  out[#out + 1] = m
  out[#out + 1] = tostring(until_)
end
return out
"""

DROP_CLAIMED = """
-- KEYS delayed; ARGV member, claimed score: remove the entry only if nobody re-scheduled it meanwhile
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and math.abs(tonumber(s) - tonumber(ARGV[2])) < 0.001 then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""
