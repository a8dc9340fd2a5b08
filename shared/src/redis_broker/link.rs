//! The Redis broker's connection, and following the master after a Sentinel failover.
//!
//! A [`Link`] holds the connection every command of a process shares (a
//! `ConnectionManager`, which reconnects on its own to the address it was given) and the
//! client that opens the connections of their own (subscriptions, blocking pops). With a
//! `redis://` URL that is all. With kombu's `sentinel://` URL the address is the master the
//! sentinels named, and that can move: a failover promotes a replica, and the old master is
//! either gone or turned into a replica that refuses writes (`READONLY`).
//!
//! What it promises, as kombu's `SentinelChannel` does by asking the sentinels at each
//! reconnection: when a command fails in a way that says the master may have moved (the
//! connection failed or dropped, or the server refused a write as a replica), the sentinels
//! are asked again; when they name another master, the link moves there and every command
//! after that goes to it. A command the old server *refused* (it was not run) is sent once
//! more on the new master; one whose connection failed is not (it may have run): its error
//! goes back to the caller, whose retry then reaches the new master. Relinks are serialized
//! and counted in generations, so a burst of failing commands asks the sentinels once.
//!
//! Nothing held in Redis is lost by moving: `unacked` and the delayed set were replicated
//! with the rest, and what the old master had not yet replicated is what Redis replication
//! loses anyway (the visibility timeout puts back any message whose acknowledgement is lost).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};

use super::{sentinel, RedisBrokerError};
use crate::settings::tls::without_password;
use crate::settings::Settings;

/// The connection of the moment, and where it goes.
#[derive(Clone)]
struct Current {
    /// Bumped at each move to another master.
    generation: u64,
    /// The master's `redis://` URL (with its password: compared, never logged as is).
    url: String,
    client: redis::Client,
    conn: ConnectionManager,
}

/// Where the sentinels are asked, with a `sentinel://` broker URL.
struct Sentinels {
    url: String,
    master_name: String,
}

/// The broker connection of a process, shared by every clone of its `RedisBroker`.
pub(crate) struct Link {
    now: RwLock<Current>,
    sentinels: Option<Sentinels>,
    relinking: tokio::sync::Mutex<()>,
}

impl Link {
    /// Connects to `broker_url`, through the sentinels first for a `sentinel://` URL.
    pub(crate) async fn open(settings: &Settings) -> Result<Link, RedisBrokerError> {
        let sentinels = if crate::settings::sentinel::is_sentinel(&settings.broker_url) {
            let master_name = settings
                .broker_transport_options
                .master_name
                .clone()
                .ok_or_else(|| {
                    RedisBrokerError::Sentinel(
                        "a sentinel:// broker_url needs broker_transport_options.master_name"
                            .into(),
                    )
                })?;
            Some(Sentinels {
                url: settings.broker_url.clone(),
                master_name,
            })
        } else {
            None
        };
        let url = match &sentinels {
            Some(s) => sentinel::master_url(&s.url, &s.master_name).await?,
            None => settings.broker_url.clone(),
        };
        Ok(Link {
            now: RwLock::new(connect(url, 0).await?),
            sentinels,
            relinking: tokio::sync::Mutex::new(()),
        })
    }

    fn current(&self) -> Current {
        self.now.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The shared connection, following the master.
    pub(crate) fn conn(self: &Arc<Link>) -> Conn {
        let c = self.current();
        Conn {
            link: self.clone(),
            generation: c.generation,
            inner: c.conn,
        }
    }

    /// The client for connections of their own, to the master of the moment.
    pub(crate) fn client(&self) -> redis::Client {
        self.current().client
    }

    /// Before opening a connection of its own (a subscription): with Sentinel, asks the
    /// sentinels, as kombu does at each connection, and moves when the master did. A failure
    /// to ask is logged; the current master is used then.
    pub(crate) async fn refresh(&self) {
        if self.sentinels.is_some() {
            let seen = self.current().generation;
            self.relink(seen).await;
        }
    }

    /// Asks the sentinels for the master and moves there if it is not the one of generation
    /// `seen`; `None` when nothing moved (no Sentinel, same master, or the sentinels or the
    /// new master cannot be reached: the caller's retry asks again).
    async fn relink(&self, seen: u64) -> Option<Current> {
        let s = self.sentinels.as_ref()?;
        let _one_at_a_time = self.relinking.lock().await;
        let now = self.current();
        if now.generation != seen {
            return Some(now);
        }
        let url = match sentinel::master_url(&s.url, &s.master_name).await {
            Ok(url) => url,
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the sentinels where the Redis broker's master is now");
                return None;
            }
        };
        if url == now.url {
            return None;
        }
        match connect(url, now.generation + 1).await {
            Ok(next) => {
                tracing::warn!(
                    master_name = %s.master_name,
                    from = %without_password(&now.url),
                    to = %without_password(&next.url),
                    "the Redis broker's master moved (Sentinel failover); following it"
                );
                *self.now.write().unwrap_or_else(|e| e.into_inner()) = next.clone();
                Some(next)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the sentinels name a new Redis master, which cannot be reached yet");
                None
            }
        }
    }
}

/// Opens the client and shared connection to `url`.
async fn connect(url: String, generation: u64) -> Result<Current, RedisBrokerError> {
    let connect_err = |source| RedisBrokerError::Connect {
        url: without_password(&url),
        source,
    };
    let client = crate::tls::redis_client(&url, None).map_err(|e| match e {
        crate::tls::RedisClientError::Tls(e) => RedisBrokerError::Tls(e),
        crate::tls::RedisClientError::Redis(e) => connect_err(e),
    })?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    let conn = ConnectionManager::new_with_config(client.clone(), config)
        .await
        .map_err(connect_err)?;
    Ok(Current {
        generation,
        url,
        client,
        conn,
    })
}

/// The shared connection as a command sees it: a failure that says the master may have
/// moved makes the [`Link`] ask the sentinels (see the module doc).
pub struct Conn {
    link: Arc<Link>,
    generation: u64,
    inner: ConnectionManager,
}

impl Conn {
    /// After `failure`: moves to the master the sentinels name now, if another. Whether the
    /// command is worth sending again there (it was refused, so it did not run).
    async fn follow(&mut self, failure: Failure) -> bool {
        if failure == Failure::None || self.link.sentinels.is_none() {
            return false;
        }
        match self.link.relink(self.generation).await {
            Some(next) => {
                self.generation = next.generation;
                self.inner = next.conn;
                failure == Failure::Refused
            }
            None => false,
        }
    }
}

/// How a command failed, as far as following the master goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Not at all, or not in a way a failover explains.
    None,
    /// The connection failed: the master may be gone (the command may have run).
    Connection,
    /// The server refused a write as a replica (the command did not run).
    Refused,
}

fn of_error(e: &RedisError) -> Failure {
    if matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    ) {
        Failure::Refused
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
    {
        Failure::Connection
    } else {
        Failure::None
    }
}

/// A reply holding a replica's refusal anywhere (a pipeline's or a transaction's too).
fn of_value(v: &Value) -> Failure {
    match v {
        Value::ServerError(e) => match e.code() {
            "READONLY" | "MASTERDOWN" | "EXECABORT" => Failure::Refused,
            _ if e.details().is_some_and(|d| d.contains("READONLY")) => Failure::Refused,
            _ => Failure::None,
        },
        Value::Array(vs) | Value::Set(vs) => of_values(vs),
        _ => Failure::None,
    }
}

fn of_values(vs: &[Value]) -> Failure {
    vs.iter()
        .map(of_value)
        .find(|f| *f != Failure::None)
        .unwrap_or(Failure::None)
}

fn of_result<T>(r: &Result<T, RedisError>, of_ok: impl Fn(&T) -> Failure) -> Failure {
    match r {
        Ok(v) => of_ok(v),
        Err(e) => of_error(e),
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let got = self.inner.req_packed_command(cmd).await;
            if self.follow(of_result(&got, of_value)).await {
                return self.inner.req_packed_command(cmd).await;
            }
            got
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let got = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            if self.follow(of_result(&got, |vs| of_values(vs))).await {
                return self
                    .inner
                    .req_packed_commands(pipeline, offset, count)
                    .await;
            }
            got
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(resp: &str) -> Value {
        redis::parse_redis_value(resp.as_bytes()).expect("RESP")
    }

    #[test]
    fn a_replicas_refusal_is_told_from_other_failures() {
        let readonly = "-READONLY You can't write against a read only replica.\r\n";
        assert_eq!(of_value(&reply(readonly)), Failure::Refused);
        // A script's write refused inside EVAL, and a transaction aborted by one.
        let in_script = "-READONLY You can't write against a read only replica. script: 1\r\n";
        assert_eq!(of_value(&reply(in_script)), Failure::Refused);
        let aborted = "*2\r\n+OK\r\n-EXECABORT Transaction discarded\r\n";
        assert_eq!(of_value(&reply(aborted)), Failure::Refused);
        assert_eq!(of_value(&reply("-ERR unknown command\r\n")), Failure::None);
        assert_eq!(of_value(&reply(":1\r\n")), Failure::None);
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(of_error(&dropped), Failure::Connection);
        let typed = RedisError::from((ErrorKind::UnexpectedReturnType, "not a list"));
        assert_eq!(of_error(&typed), Failure::None);
    }
}
