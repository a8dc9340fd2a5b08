//! Redis as the broker, on the wire kombu's Redis transport uses, so Python Celery producers
//! and workers share queues with mediafarm (`broker_url = "redis://…"`).
//!
//! What it owns, and what it promises:
//!
//! - **Queues** are lists: a message is `LPUSH`ed onto `<queue>` (priority 0) or
//!   `<queue><sep><step>` for the other `priority_steps` (kombu's `_q_for_pri`), and taken from
//!   the other end, the lists in step order (on Redis a lower number is consumed first, as
//!   in kombu). Each message is kombu's JSON [`Envelope`].
//! - **Late acks**: a taken message is recorded in the `unacked` hash (kombu's
//!   `[message, exchange, routing_key]` by delivery tag) and the `unacked_index` sorted set (by
//!   the time it was taken) *in the same atomic step as it is taken* (a Lua script, see
//!   [`scripts`]); kombu does it in two round trips, and a worker killed between them loses
//!   the message. Acknowledging removes both entries.
//! - **Visibility timeout**: every worker, under the `unacked_mutex` lock (kombu's
//!   `restore_visible`), puts back on its queue each message taken longer ago than
//!   `visibility_timeout`: a worker that died loses nothing. Every job's hard time limit is
//!   kept below the visibility timeout (`Settings::ack_timeout`), so a running job is never
//!   handed out twice.
//! - **Delays** (ETA, countdown, retries) do not wait in worker memory (Celery's Redis
//!   transport holds ETA jobs in the worker, and a job held past the visibility timeout is run
//!   twice). The message moves, in one atomic step with its acknowledgement, into the sorted
//!   set [`DELAYED_KEY`] scored by when it is due; every worker promotes due entries back
//!   onto their lists with one script, so each is promoted once.
//! - **Dead letters**: a message that can never run is pushed, with the reason in its
//!   `x-mediafarm-dead-*` headers, onto the list `<queue>.dead` in the same atomic step as it
//!   is acknowledged. A value in a list that is not a kombu envelope is moved there as it was.
//!
//! - **Fanout and other exchanges** ([`fanout`]): kombu's fanout exchanges by `PUBLISH` (the
//!   pidbox's requests, Celery's events), its direct exchanges through the binding sets (the
//!   pidbox's replies), and the queue commands of the `mediafarm` CLI (purge, dead letters).
//!
//! - **`global_keyprefix`**: every key above (and every fanout channel) is stored with the
//!   transport option's prefix before it, as kombu's prefixing client sends them; the names
//!   inside messages and entries (queues, routing keys) stay unprefixed, except the list key a
//!   delayed entry names, which is the stored key.
//!
//! - **Sentinel** ([`sentinel`], [`link`]): with a `sentinel://` URL, connecting asks the
//!   sentinels for the master first (kombu's `SentinelChannel`), and so does every failure
//!   that says the master may have moved: a running worker follows a failover.
//!
//! Not here yet: Redis Cluster.

pub mod doorbell;
pub mod envelope;
pub mod fanout;
pub mod link;
pub mod queues;
pub mod scripts;
pub mod sentinel;

use std::collections::HashSet;
use std::sync::Mutex;

use serde_json::Value;

pub use envelope::Envelope;

use crate::protocol::Properties;
use crate::settings::{Settings, TransportOptions};

/// The sorted set of delayed messages (`<list key>\n<message>` scored by due time, Unix s).
pub const DELAYED_KEY: &str = "mediafarm.delayed";
/// kombu's binding sets: `_kombu.binding.<exchange>` holds `<routing key><sep><pattern><sep><queue>`.
pub const BINDING_PREFIX: &str = "_kombu.binding.";
/// kombu 5.7's set of bindings that never expire, per exchange.
pub const PERMANENT_BINDING_PREFIX: &str = "_kombu.binding_permanent.";
/// Delayed messages promoted per script run at most.
const PROMOTE_BATCH: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum RedisBrokerError {
    #[error("cannot connect to the Redis broker at {url}: {source}")]
    Connect {
        url: String,
        source: redis::RedisError,
    },
    #[error("cannot set up TLS to the Redis broker: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("Redis broker error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot find the Redis broker through Sentinel: {0}")]
    Sentinel(String),
}

/// A message taken from a queue, recorded as unacknowledged.
#[derive(Debug)]
pub struct Taken {
    /// The queue it was taken from.
    pub queue: String,
    /// The envelope, or what was taken when it is not one this worker can read.
    pub message: Result<Envelope, Unreadable>,
}

/// A value taken from a queue that is not a kombu envelope this worker can read.
#[derive(Debug)]
pub struct Unreadable {
    pub raw: Vec<u8>,
    pub why: String,
    /// The delivery tag Redis's own JSON reader found in it, under which the take recorded it
    /// in `unacked` (Redis's `cjson` accepts what serde_json refuses: bytes that are not UTF-8,
    /// `NaN`, nesting past 128 levels); empty when Redis could not read it either, and then it
    /// is in neither. Dead-lettering it under this tag takes it out of `unacked` in the same
    /// step.
    pub tag: String,
}

/// A connection to the Redis broker and the transport's options. Clones share the connection.
#[derive(Clone)]
pub struct RedisBroker {
    /// The shared connection, and the client for connections of their own (subscriptions
    /// and blocking pops, [`fanout`]).
    link: std::sync::Arc<link::Link>,
    opts: TransportOptions,
    /// `unacked`, `unacked_index`, `unacked_mutex` and the delayed set as stored (prefixed).
    keys: std::sync::Arc<Keys>,
    /// Queues whose kombu binding this process has written.
    bound: std::sync::Arc<Mutex<HashSet<String>>>,
}

/// The fixed keys of the transport, with `global_keyprefix` before them.
struct Keys {
    unacked: String,
    unacked_index: String,
    unacked_mutex: String,
    delayed: String,
}

impl Keys {
    fn of(o: &TransportOptions) -> Keys {
        Keys {
            unacked: o.key(&o.unacked_key),
            unacked_index: o.key(&o.unacked_index_key),
            unacked_mutex: o.key(&o.unacked_mutex_key),
            delayed: o.key(DELAYED_KEY),
        }
    }
}

/// `EVAL` of `script` over `keys` (Redis caches the compiled script by its hash; the text is
/// a few hundred bytes per call).
fn eval<K: AsRef<str>>(script: &str, keys: &[K]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for k in keys {
        cmd.arg(k.as_ref());
    }
    cmd
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl RedisBroker {
    /// Connects to `broker_url` (a Redis URL; `rediss://` takes TLS options from its query).
    /// A `sentinel://` URL is resolved first: the sentinels name the master ([`sentinel`]),
    /// and are asked again whenever the connection fails ([`link`]).
    pub async fn connect(settings: &Settings) -> Result<RedisBroker, RedisBrokerError> {
        let link = link::Link::open(settings).await?;
        let opts = settings.broker_transport_options.clone();
        Ok(RedisBroker {
            link: std::sync::Arc::new(link),
            keys: std::sync::Arc::new(Keys::of(&opts)),
            opts,
            bound: Default::default(),
        })
    }

    /// The shared connection (following the master after a failover).
    fn conn(&self) -> link::Conn {
        self.link.conn()
    }

    pub fn options(&self) -> &TransportOptions {
        &self.opts
    }

    /// kombu's `_q_for_pri`: the list of `queue` for a message of `priority` (as stored).
    pub fn list_key(&self, queue: &str, priority: u8) -> String {
        list_key(&self.opts, queue, priority)
    }

    /// The lists to take from, in order: every queue's priority-0 list, then every queue's
    /// next step, … (kombu's BRPOP key order).
    pub fn consume_keys(&self, queues: &[String]) -> Vec<String> {
        self.opts
            .priority_steps
            .iter()
            .flat_map(|p| queues.iter().map(move |q| list_key(&self.opts, q, *p)))
            .collect()
    }

    /// Writes kombu's binding of `queue` (exchange and routing key both the queue's name), as
    /// kombu's `queue_declare` + `queue_bind` do, so a Python producer routing through the
    /// exchange of that name reaches it. Once per queue per process.
    pub async fn bind(&self, queue: &str) -> Result<(), RedisBrokerError> {
        if self.lock_bound().contains(queue) {
            return Ok(());
        }
        let sep = &self.opts.sep;
        let member = format!("{queue}{sep}{sep}{queue}");
        let mut conn = self.conn();
        // kombu 5.7 also lists the member as permanent, so its sweep of expiring bindings
        // leaves the table alone.
        redis::pipe()
            .sadd(self.binding_key(queue), &member)
            .ignore()
            .sadd(
                self.opts.key(&format!("{PERMANENT_BINDING_PREFIX}{queue}")),
                &member,
            )
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        self.lock_bound().insert(queue.to_owned());
        Ok(())
    }

    /// kombu's binding set of `exchange`, as stored.
    fn binding_key(&self, exchange: &str) -> String {
        self.opts.key(&format!("{BINDING_PREFIX}{exchange}"))
    }

    fn lock_bound(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes messages onto `queue` (each onto its priority's list) in one round trip.
    pub async fn publish(
        &self,
        queue: &str,
        messages: &[(Properties, serde_json::Map<String, Value>, Vec<u8>)],
    ) -> Result<(), RedisBrokerError> {
        self.bind(queue).await?;
        let mut pipe = redis::pipe();
        for (props, headers, body) in messages {
            let e = Envelope::new(props, headers, body, queue);
            pipe.lpush(self.list_key(queue, e.priority()), e.to_json())
                .ignore();
        }
        let mut conn = self.conn();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Takes up to `most` messages of `queues` (priority order, then queue order), recording
    /// each as unacknowledged in the same step, in one round trip. Empty when all are empty.
    pub async fn fetch(
        &self,
        queues: &[String],
        most: usize,
    ) -> Result<Vec<Taken>, RedisBrokerError> {
        let keys = self.consume_keys(queues);
        if keys.is_empty() || most == 0 {
            return Ok(Vec::new());
        }
        let mut all = vec![self.keys.unacked.clone(), self.keys.unacked_index.clone()];
        all.extend(keys);
        let mut conn = self.conn();
        let got: Vec<(String, Vec<u8>, String)> = eval(scripts::FETCH, &all)
            .arg(format!("{:.6}", now_secs()))
            .arg(most)
            .query_async(&mut conn)
            .await?;
        Ok(got
            .into_iter()
            .map(|(key, raw, tag)| {
                let queue = self.queue_of_key(&key, queues);
                let message = match Envelope::parse(&raw) {
                    Ok(envelope) if !tag.is_empty() => Ok(envelope),
                    // The script took it but did not record it (its rule, [`scripts::FETCH`]).
                    Ok(_) => Err(Unreadable {
                        raw,
                        why: "its properties.delivery_tag is not 1–255 bytes of printable ASCII, \
                              or Redis's JSON reader (cjson) cannot read it"
                            .into(),
                        tag,
                    }),
                    Err(why) => Err(Unreadable { raw, why, tag }),
                };
                Taken { queue, message }
            })
            .collect())
    }

    fn queue_of_key(&self, key: &str, queues: &[String]) -> String {
        let key = key
            .strip_prefix(self.opts.global_keyprefix.as_str())
            .unwrap_or(key);
        queues
            .iter()
            .find(|q| {
                key == q.as_str()
                    || key
                        .strip_prefix(q.as_str())
                        .is_some_and(|rest| rest.starts_with(&self.opts.sep))
            })
            .cloned()
            .unwrap_or_else(|| key.to_owned())
    }

    /// Acknowledges: the message leaves `unacked` and `unacked_index`.
    pub async fn ack(&self, tag: &str) -> Result<(), RedisBrokerError> {
        let mut conn = self.conn();
        redis::pipe()
            .atomic()
            .zrem(&self.keys.unacked_index, tag)
            .ignore()
            .hdel(&self.keys.unacked, tag)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Puts an unacknowledged message back on its queue, at the consuming end (it is taken
    /// next), marked redelivered. `false` when it was no longer unacknowledged.
    pub async fn restore(&self, tag: &str) -> Result<bool, RedisBrokerError> {
        let mut conn = self.conn();
        // Bytes, not text: a value Redis's JSON reader took may not be UTF-8.
        let held: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(&self.keys.unacked)
            .arg(tag)
            .query_async(&mut conn)
            .await?;
        let Some(held) = held else {
            return Ok(false);
        };
        let parsed = serde_json::from_slice::<(Value, String, String)>(&held)
            .map_err(|e| format!("it is not kombu's [message, exchange, routing_key] ({e})"))
            .and_then(|(message, exchange, routing_key)| {
                Envelope::parse(message.to_string().as_bytes()).map(|e| (e, exchange, routing_key))
            });
        let (mut e, exchange, routing_key) = match parsed {
            Ok(parsed) => parsed,
            Err(why) => return self.dead_unacked(tag, &held, &why).await,
        };
        e.mark_redelivered();
        let queues = self.lookup(&exchange, &routing_key).await?;
        let mut keys = vec![self.keys.unacked.clone(), self.keys.unacked_index.clone()];
        keys.extend(queues.iter().map(|q| self.list_key(q, e.priority())));
        let restored: i64 = eval(scripts::RESTORE, &keys)
            .arg(tag)
            .arg(&held)
            .arg(e.to_json())
            .arg("front")
            .query_async(&mut conn)
            .await?;
        Ok(restored == 1)
    }

    /// An `unacked` entry this worker cannot read — a value Redis's JSON reader took and
    /// serde_json refuses, whose taker stopped before dead-lettering it — moved as it is to the
    /// dead letters of the queue its routing key names (read from the entry's end, which
    /// [`scripts::FETCH`] wrote), in the same step as it leaves `unacked`. Not put back: it
    /// would only be taken and refused again.
    async fn dead_unacked(
        &self,
        tag: &str,
        held: &[u8],
        why: &str,
    ) -> Result<bool, RedisBrokerError> {
        let Some((message, exchange, routing_key)) = split_unacked(held) else {
            tracing::error!(%tag, %why, "an unacked entry is not kombu's [message, exchange, routing_key], and its routing key cannot be read; dropping it from the index");
            self.ack(tag).await?;
            return Ok(false);
        };
        let queues = self.lookup(&exchange, &routing_key).await?;
        tracing::error!(%tag, %why, ?queues, "an unacked message is not a kombu envelope this worker can read; moving it to the dead letters as it was");
        for queue in &queues {
            self.dead(tag, queue, message).await?;
        }
        Ok(false)
    }

    /// kombu's `_lookup` for a direct exchange: the queues bound to `exchange` under
    /// `routing_key`; the default exchange (or no binding) routes to the queue named by the
    /// routing key.
    async fn lookup(
        &self,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Vec<String>, RedisBrokerError> {
        if exchange.is_empty() {
            return Ok(vec![routing_key.to_owned()]);
        }
        let mut queues = self.bound_queues(exchange, routing_key).await?;
        if queues.is_empty() {
            queues.push(routing_key.to_owned());
        }
        Ok(queues)
    }

    /// The queues bound to direct exchange `exchange` under `routing_key` (kombu's binding
    /// set `_kombu.binding.<exchange>`), sorted, each once.
    pub async fn bound_queues(
        &self,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Vec<String>, RedisBrokerError> {
        let mut conn = self.conn();
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.binding_key(exchange))
            .query_async(&mut conn)
            .await?;
        let sep = self.opts.sep.as_str();
        let mut queues: Vec<String> = members
            .iter()
            .filter_map(|m| {
                let mut parts = m.split(sep);
                let (rk, _pattern, queue) = (parts.next()?, parts.next()?, parts.next()?);
                (rk == routing_key).then(|| queue.to_owned())
            })
            .collect();
        queues.sort();
        queues.dedup();
        Ok(queues)
    }

    /// Acknowledges `tag` and, in the same step, parks `message` until `due` (Unix seconds),
    /// when it goes back onto `queue`.
    pub async fn delay(
        &self,
        tag: &str,
        queue: &str,
        message: &Envelope,
        due: f64,
    ) -> Result<(), RedisBrokerError> {
        let entry = format!(
            "{}\n{}",
            self.list_key(queue, message.priority()),
            message.to_json()
        );
        self.hand_over(
            tag,
            &self.keys.delayed,
            &format!("{due:.3}"),
            entry.as_bytes(),
        )
        .await
    }

    /// Acknowledges `tag` and, in the same step, pushes `message` onto `<queue>.dead`.
    pub async fn dead(
        &self,
        tag: &str,
        queue: &str,
        message: &[u8],
    ) -> Result<(), RedisBrokerError> {
        self.hand_over(tag, &dead_list(&self.opts, queue), "list", message)
            .await
    }

    async fn hand_over(
        &self,
        tag: &str,
        key: &str,
        how: &str,
        value: &[u8],
    ) -> Result<(), RedisBrokerError> {
        let mut conn = self.conn();
        eval(
            scripts::HAND_OVER,
            &[&self.keys.unacked, &self.keys.unacked_index, key],
        )
        .arg(tag)
        .arg(how)
        .arg(value)
        .query_async::<()>(&mut conn)
        .await?;
        Ok(())
    }

    /// Moves delayed messages that are due back onto their lists; how many moved.
    pub async fn promote_due(&self) -> Result<usize, RedisBrokerError> {
        let mut conn = self.conn();
        let moved: usize = eval(scripts::PROMOTE, &[&self.keys.delayed])
            .arg(format!("{:.3}", now_secs()))
            .arg(PROMOTE_BATCH)
            .query_async(&mut conn)
            .await?;
        Ok(moved)
    }

    /// kombu's `restore_visible`: under the `unacked_mutex` lock (skipped when another worker
    /// holds it), puts back every message taken longer ago than the visibility timeout.
    /// Returns how many were put back.
    pub async fn restore_visible(&self) -> Result<usize, RedisBrokerError> {
        let mut conn = self.conn();
        let token = uuid::Uuid::new_v4().to_string();
        let expire_ms =
            u64::try_from(self.opts.unacked_mutex_expire.as_millis()).unwrap_or(u64::MAX);
        let locked: Option<String> = redis::cmd("SET")
            .arg(&self.keys.unacked_mutex)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(expire_ms.max(1))
            .query_async(&mut conn)
            .await?;
        if locked.is_none() {
            return Ok(0);
        }
        let outcome = self.restore_expired(&mut conn).await;
        let unlocked = eval(scripts::UNLOCK, &[&self.keys.unacked_mutex])
            .arg(&token)
            .query_async::<i64>(&mut conn)
            .await;
        if let Err(e) = unlocked {
            tracing::warn!(error = %e, "could not release the unacked mutex; it expires on its own");
        }
        outcome
    }

    async fn restore_expired(&self, conn: &mut link::Conn) -> Result<usize, RedisBrokerError> {
        let ceil = now_secs() - self.opts.visibility_timeout.as_secs_f64();
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(&self.keys.unacked_index)
            .arg("-inf")
            .arg(format!("{ceil:.3}"));
        if let Some(n) = self.opts.unacked_restore_limit {
            cmd.arg("LIMIT").arg(0).arg(n);
        }
        // Bytes: a tag another kombu client recorded need not be UTF-8 (this worker's take
        // records only printable ASCII), and one such must not stop the sweep.
        let tags: Vec<Vec<u8>> = cmd.query_async(conn).await?;
        let mut restored = 0;
        for tag in tags {
            let Ok(tag) = String::from_utf8(tag) else {
                tracing::warn!(
                    "an unacked entry's delivery tag is not UTF-8; it is left where it is"
                );
                continue;
            };
            // One entry that cannot be put back must not hold back the others behind it.
            match self.restore(&tag).await {
                Ok(true) => {
                    tracing::info!(%tag, visibility_timeout = ?self.opts.visibility_timeout, "a message unacknowledged past the visibility timeout is back on its queue");
                    restored += 1;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%tag, error = %e, "could not put an unacknowledged message back; it is tried again at the next sweep");
                }
            }
        }
        Ok(restored)
    }

    /// Messages waiting in each list of `queue` (all priorities), for tests and metrics.
    pub async fn len(&self, queue: &str) -> Result<u64, RedisBrokerError> {
        let mut conn = self.conn();
        let mut pipe = redis::pipe();
        for p in &self.opts.priority_steps {
            pipe.llen(list_key(&self.opts, queue, *p));
        }
        let sizes: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(sizes.iter().sum())
    }
}

/// kombu's `_q_for_pri` with `priority` (`bisect` over the steps), as stored (with the
/// `global_keyprefix`).
pub fn list_key(opts: &TransportOptions, queue: &str, priority: u8) -> String {
    let step = opts
        .priority_steps
        .iter()
        .rev()
        .find(|s| **s <= priority)
        .copied()
        .unwrap_or(0);
    if step == 0 {
        opts.key(queue)
    } else {
        opts.key(&format!("{queue}{}{step}", opts.sep))
    }
}

/// Splits an `unacked` entry as [`scripts::FETCH`] writes it — `[<message>,<exchange>,<routing
/// key>]`, the last two JSON strings from Redis's `cjson.encode` — from its end, so that a
/// message serde_json cannot read still gives its exchange and routing key.
fn split_unacked(entry: &[u8]) -> Option<(&[u8], String, String)> {
    let inner = entry.strip_prefix(b"[")?.strip_suffix(b"]")?;
    let (rest, routing_key) = last_json_string(inner)?;
    let (rest, exchange) = last_json_string(rest.strip_suffix(b",")?)?;
    Some((rest.strip_suffix(b",")?, exchange, routing_key))
}

/// The JSON string that ends `bytes`, and what comes before it (kept as bytes: the message
/// before it need not be UTF-8).
fn last_json_string(bytes: &[u8]) -> Option<(&[u8], String)> {
    if bytes.len() < 2 || bytes[bytes.len() - 1] != b'"' {
        return None;
    }
    // Its opening quote: the nearest `"` before the closing one that no backslash escapes.
    let open = (0..bytes.len() - 1).rev().find(|&i| {
        bytes[i] == b'"' && bytes[..i].iter().rev().take_while(|b| **b == b'\\').count() % 2 == 0
    })?;
    let value: String = serde_json::from_slice(&bytes[open..]).ok()?;
    Some((&bytes[..open], value))
}

/// The dead-letter list of `queue`, as stored.
pub fn dead_list(opts: &TransportOptions, queue: &str) -> String {
    opts.key(&format!("{queue}.dead"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unacked_entry_gives_its_exchange_and_routing_key_whatever_its_message() {
        let entry = br#"[{"a": NaN, "b": "x\"]"},"","images"]"#;
        assert_eq!(
            split_unacked(entry),
            Some((
                &br#"{"a": NaN, "b": "x\"]"}"#[..],
                String::new(),
                "images".into()
            ))
        );
        let entry = br#"[{"k": "\\"},"ex\"\\","r\/k \u00e9\\"]"#;
        assert_eq!(
            split_unacked(entry),
            Some((&br#"{"k": "\\"}"#[..], "ex\"\\".into(), "r/k é\\".into()))
        );
        // A message that is not UTF-8 keeps its bytes.
        let entry = b"[{\"v\": \"\xff\xfe\"},\"\",\"q\"]";
        assert_eq!(
            split_unacked(entry),
            Some((&b"{\"v\": \"\xff\xfe\"}"[..], String::new(), "q".into()))
        );
        for bad in [
            "",
            "[]",
            r#"["a","b"]"#,
            r#"[x,"a",b]"#,
            r#"[x,"a","b""#,
            r#"x,"a","b"]"#,
        ] {
            assert_eq!(split_unacked(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn priority_lists_are_kombus() {
        let o = TransportOptions::default();
        assert_eq!(list_key(&o, "q", 0), "q");
        assert_eq!(list_key(&o, "q", 2), "q");
        assert_eq!(list_key(&o, "q", 3), "q\x06\x163");
        assert_eq!(list_key(&o, "q", 8), "q\x06\x166");
        assert_eq!(list_key(&o, "q", 9), "q\x06\x169");
        let prefixed = TransportOptions {
            global_keyprefix: "app1:".into(),
            ..TransportOptions::default()
        };
        assert_eq!(list_key(&prefixed, "q", 0), "app1:q");
        assert_eq!(list_key(&prefixed, "q", 6), "app1:q\x06\x166");
        assert_eq!(dead_list(&prefixed, "q"), "app1:q.dead");
        assert_eq!(Keys::of(&prefixed).unacked_mutex, "app1:unacked_mutex");
        assert_eq!(Keys::of(&prefixed).delayed, "app1:mediafarm.delayed");
    }
}
