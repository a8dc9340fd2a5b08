//! The Redis result backend in Celery's layout: `celery-task-meta-<id>` holds the JSON record,
//! written with its expiry and then published on the channel of the same name in one round trip,
//! which is how Celery's Redis backend wakes `AsyncResult.get()` waiters.

pub mod chord;
pub mod once;
pub mod result;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::backend::result::{ResultMeta, TaskState};
use crate::settings::tls::REDIS_KEYS;
use crate::settings::{RedisBackendSsl, Settings};
use crate::tls::RedisClientError;

pub const KEY_PREFIX: &str = "celery-task-meta-";

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// For a TLS handshake failure the message ends with what to change.
    #[error(
        "result backend {url} is unreachable: {source}{hint}",
        hint = crate::tls::explain(&.source.to_string(), &REDIS_KEYS)
    )]
    Connect {
        url: String,
        source: redis::RedisError,
    },
    #[error("cannot set up TLS to the result backend: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("result backend error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("result for {id} is not valid Celery result JSON: {source}")]
    Corrupt {
        id: String,
        source: serde_json::Error,
    },
    #[error("chord counter {key} holds {value}, which is not a whole number")]
    ChordCounter { key: String, value: String },
    #[error("no result for {id} within {waited:?}")]
    Timeout { id: String, waited: Duration },
}

/// A handle to the result backend; cheap to clone (two reference counts: every job's context
/// holds one), reconnects by itself.
#[derive(Clone)]
pub struct ResultBackend {
    conn: ConnectionManager,
    fixed: Arc<Fixed>,
}

/// What never changes after connecting.
struct Fixed {
    client: redis::Client,
    expires: Option<u64>,
    /// Chord expiries and leases (`result_chord_*`; Celery's defaults unless from settings).
    chord: chord::ChordTimes,
    /// Celery's `result_chord_ordered`: a chord's header results in a sorted set by
    /// `group_index` (true, the default) or a list in arrival order.
    chord_ordered: bool,
    url: String,
}

/// Bytes reserved for a serialised result record before writing it: a SUCCESS record of a small
/// result (status, task id, `date_done`, empty traceback and children) fits.
const RECORD_CAPACITY: usize = 256;

pub fn result_key(id: &str) -> String {
    let mut key = String::with_capacity(KEY_PREFIX.len() + id.len());
    key.push_str(KEY_PREFIX);
    key.push_str(id);
    key
}

impl ResultBackend {
    /// Connects to `result_backend` with `redis_backend_use_ssl`, keeping results for
    /// `result_expires`, and the chord timings of `result_chord_join_timeout` and
    /// `result_chord_expires`: what every program connects with.
    pub async fn from_settings(settings: &Settings) -> Result<ResultBackend, BackendError> {
        let mut backend = Self::connect_with(
            &settings.result_backend,
            settings.redis_backend_use_ssl.as_ref(),
            settings.result_expires_secs(),
        )
        .await?;
        if let Some(fixed) = Arc::get_mut(&mut backend.fixed) {
            fixed.chord = chord::ChordTimes::from_settings(settings);
            fixed.chord_ordered = settings
                .result_backend_transport_options
                .result_chord_ordered;
        }
        Ok(backend)
    }

    /// The chord expiries and leases this backend joins chords with.
    pub fn chord_times(&self) -> chord::ChordTimes {
        self.fixed.chord
    }

    /// Connects to `url` (TLS options only from a `rediss://` URL's query); `expires` is how
    /// long results are kept, in seconds (`None`: forever).
    pub async fn connect(url: &str, expires: Option<u64>) -> Result<ResultBackend, BackendError> {
        Self::connect_with(url, None, expires).await
    }

    /// Connects to `url` with the TLS options of `ssl` (for a `rediss://` URL; see
    /// [`crate::tls::redis_client`]).
    pub async fn connect_with(
        url: &str,
        ssl: Option<&RedisBackendSsl>,
        expires: Option<u64>,
    ) -> Result<ResultBackend, BackendError> {
        let connect_err = |source: redis::RedisError| BackendError::Connect {
            url: redact(url),
            source,
        };
        let client = crate::tls::redis_client(url, ssl).map_err(|e| match e {
            RedisClientError::Tls(e) => BackendError::Tls(e),
            RedisClientError::Redis(e) => connect_err(e),
        })?;
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config())
            .await
            .map_err(connect_err)?;
        Ok(ResultBackend {
            conn,
            fixed: Arc::new(Fixed {
                client,
                expires,
                chord: chord::ChordTimes::with_result_expires(expires),
                chord_ordered: true,
                url: redact(url),
            }),
        })
    }

    pub fn url(&self) -> &str {
        &self.fixed.url
    }

    /// Stores `meta` and tells waiters, atomically.
    pub async fn store(&self, meta: &ResultMeta) -> Result<(), BackendError> {
        let key = result_key(&meta.task_id);
        // Sized for a typical record up front: growing the buffer from empty was a visible part
        // of storing a small result. Serialising a struct of JSON values cannot fail.
        let mut value = Vec::with_capacity(RECORD_CAPACITY);
        let _ = serde_json::to_writer(&mut value, meta);
        // One round trip; SET before PUBLISH on the same connection, so a woken waiter always
        // finds the record. (Celery wraps the pair in MULTI/EXEC; the order alone suffices.)
        let mut pipe = redis::pipe();
        match self.fixed.expires {
            Some(secs) => pipe.set_ex(&key, &value, secs).ignore(),
            None => pipe.set(&key, &value).ignore(),
        };
        pipe.publish(&key, &value).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// The stored record, or `None` while the job is PENDING (no record yet).
    pub async fn get(&self, id: &str) -> Result<Option<ResultMeta>, BackendError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.get(result_key(id)).await?;
        raw.map(|text| parse(id, &text)).transpose()
    }

    /// The state of a job: PENDING when nothing is stored.
    pub async fn state(&self, id: &str) -> Result<TaskState, BackendError> {
        Ok(self
            .get(id)
            .await?
            .map(|m| m.status)
            .unwrap_or(TaskState::Pending))
    }

    /// Waits until the job reaches a ready state (SUCCESS, FAILURE, REVOKED).
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<ResultMeta, BackendError> {
        let key = result_key(id);
        let mut pubsub = self.fixed.client.get_async_pubsub().await?;
        // Subscribe first, then read: a result stored between the two is not missed.
        pubsub.subscribe(&key).await?;
        if let Some(meta) = self.get(id).await?.filter(|m| m.status.is_ready()) {
            return Ok(meta);
        }
        let mut messages = pubsub.on_message();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // A slow poll backs up the publish, in case a message was lost with a connection.
            let tick = tokio::time::Instant::now() + Duration::from_secs(1);
            match tokio::time::timeout_at(deadline.min(tick), messages.next()).await {
                Ok(Some(msg)) => {
                    let text: String = msg.get_payload()?;
                    let meta = parse(id, &text)?;
                    if meta.status.is_ready() {
                        return Ok(meta);
                    }
                }
                Ok(None) => return self.poll_until(id, deadline, timeout).await,
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(BackendError::Timeout {
                        id: id.to_owned(),
                        waited: timeout,
                    })
                }
                Err(_) => {
                    if let Some(meta) = self.get(id).await?.filter(|m| m.status.is_ready()) {
                        return Ok(meta);
                    }
                }
            }
        }
    }

    async fn poll_until(
        &self,
        id: &str,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<ResultMeta, BackendError> {
        while tokio::time::Instant::now() < deadline {
            if let Some(meta) = self.get(id).await?.filter(|m| m.status.is_ready()) {
                return Ok(meta);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(BackendError::Timeout {
            id: id.to_owned(),
            waited: timeout,
        })
    }

    /// Deletes a stored result.
    pub async fn forget(&self, id: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(result_key(id)).await?;
        Ok(())
    }

    /// Answers PING: used by readiness checks.
    pub async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// A connection for helpers that need Redis beyond results (leases, idempotency).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A connection of its own, for blocking commands (`XREADGROUP … BLOCK`, `BLPOP`): on the
    /// shared one they would hold up every job's result. Blocks must stay well under the
    /// response timeout (10 s).
    pub async fn dedicated_connection(&self) -> Result<ConnectionManager, BackendError> {
        ConnectionManager::new_with_config(self.fixed.client.clone(), manager_config())
            .await
            .map_err(|source| BackendError::Connect {
                url: self.fixed.url.clone(),
                source,
            })
    }
}

/// How every connection to the backend connects, waits and retries.
fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
}

fn parse(id: &str, text: &str) -> Result<ResultMeta, BackendError> {
    serde_json::from_str(text).map_err(|source| BackendError::Corrupt {
        id: id.to_owned(),
        source,
    })
}

/// A URL with its password replaced, for logs and error messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@h:5672//"),
            "amqp://guest:***@h:5672//"
        );
        assert_eq!(redact("redis://h:6379/0"), "redis://h:6379/0");
    }
}
