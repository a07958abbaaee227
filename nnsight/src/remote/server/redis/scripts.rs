//! The Lua scripts that make each step of a job atomic in Redis (each names its KEYS and ARGV).

use ::redis::Script;
use std::sync::LazyLock;

/// Queues a job unless the model has `capacity` jobs waiting. KEYS: stream, job, events. ARGV: id, model,
/// request, now, queued event, pending ttl (s), capacity, group, key id. Returns the jobs waiting before it, or -1-N when
/// full with N waiting.
pub(super) static SUBMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local len = redis.call('XLEN', KEYS[1])
local pending = 0
local p = redis.pcall('XPENDING', KEYS[1], ARGV[8])
if type(p) == 'table' and p.err == nil then pending = p[1] end
local waiting = len - pending
if waiting >= tonumber(ARGV[7]) then return -1 - waiting end
redis.call('HSET', KEYS[2], 'state', 'queued', 'model', ARGV[2], 'submitted', ARGV[4], 'starts', 0, 'key', ARGV[9])
redis.call('RPUSH', KEYS[3], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'request', ARGV[3], 'key', ARGV[9])
return waiting
"#,
    )
});

/// Marks a job running on this worker. KEYS: job, events. ARGV: consumer, now, running event, most starts.
/// Returns the start's number, or -1 (no such job: expired), 0 (it has ended already), -2 (too many starts).
pub(super) static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
if state == false then return -1 end
if state == 'completed' or state == 'error' then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'starts', 1)
if n > tonumber(ARGV[4]) then return -2 end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'started', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
return n
"#,
    )
});

/// Stores a job's end once, and acknowledges (and deletes) its entry. KEYS: job, events, result, stream. ARGV:
/// state, error, result, result ttl (s), now, consumer, status event, end event, state ttl (s), group, entry.
/// Returns 1 (stored), 0 (it had ended already: nothing stored), -1 (no such job).
pub(super) static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('XACK', KEYS[4], ARGV[10], ARGV[11])
redis.call('XDEL', KEYS[4], ARGV[11])
if state == false then return -1 end
if state == 'completed' or state == 'error' then return 0 end
if ARGV[1] == 'completed' then redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4]) end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'error', ARGV[2], 'ended', ARGV[5], 'finished_by', ARGV[6])
redis.call('RPUSH', KEYS[2], ARGV[7], ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[9])
return 1
"#,
    )
});

/// Renews this consumer's claim on an entry it holds (resetting its idle time). KEYS: stream. ARGV: group,
/// consumer, entry. Returns 0 when the entry is no longer this consumer's (taken over, or acknowledged).
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"#,
    )
});
