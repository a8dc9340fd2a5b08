//! Exchanges other than a queue's own on the Redis broker, as kombu's Redis transport has them:
//!
//! - A **fanout** exchange is Redis `PUBLISH`: a message goes to the channel
//!   `<fanout_prefix><exchange>[/<routing key>]` (kombu's `_get_publish_topic`: the prefix is
//!   `/{db}.` with the broker's database number, the routing key is appended while
//!   `fanout_patterns` is on) and reaches whoever is subscribed at that moment — nothing is
//!   stored, as in kombu. Celery's pidbox (`celery.pidbox`) is a fanout, and Celery turns
//!   `celeryev` into one on Redis (`celery.events.event.get_exchange`). A subscriber uses
//!   `PSUBSCRIBE`, with `#` in its binding's routing key turned into `*` (kombu's
//!   `_queue_bind`).
//! - A **direct** exchange routes through kombu's binding set `_kombu.binding.<exchange>`: a
//!   message is pushed onto every queue bound under its routing key, and dropped when none is
//!   (kombu's `InconsistencyError`, which its pidbox ignores). The pidbox's replies
//!   (`reply.celery.pidbox`) reach the requester's reply queue this way.
//!
//! Subscriptions and blocking pops run on connections of their own, never on the shared one
//! the worker takes jobs through.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use redis::aio::MultiplexedConnection;

use super::{list_key, Envelope, RedisBroker, RedisBrokerError};

/// kombu's `_get_publish_topic` with its options read: the `PUBLISH` channel of `exchange`
/// for `routing_key` on database `db`, with the `global_keyprefix` before it (kombu's
/// prefixing client prefixes `PUBLISH` and `PSUBSCRIBE` channels too).
pub fn topic(
    opts: &crate::settings::TransportOptions,
    db: i64,
    exchange: &str,
    routing_key: &str,
) -> String {
    let prefix = opts.key(&opts.fanout_prefix.replace("{db}", &db.to_string()));
    if !routing_key.is_empty() && opts.fanout_patterns {
        format!("{prefix}{exchange}/{routing_key}")
    } else {
        format!("{prefix}{exchange}")
    }
}

impl RedisBroker {
    /// The database number of `broker_url` (the `{db}` of fanout channels).
    pub fn db(&self) -> i64 {
        self.link
            .client()
            .get_connection_info()
            .redis_settings()
            .db()
    }

    /// The channel a fanout message on `exchange` under `routing_key` is published to.
    pub fn fanout_topic(&self, exchange: &str, routing_key: &str) -> String {
        topic(&self.opts, self.db(), exchange, routing_key)
    }

    /// Publishes messages on fanout `exchange`, each under its routing key, in one round
    /// trip; how many subscribers received them in all.
    pub async fn publish_fanout(
        &self,
        exchange: &str,
        messages: &[(String, Envelope)],
    ) -> Result<u64, RedisBrokerError> {
        let mut pipe = redis::pipe();
        for (routing_key, envelope) in messages {
            pipe.publish(self.fanout_topic(exchange, routing_key), envelope.to_json());
        }
        let mut conn = self.conn();
        let received: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(received.iter().sum())
    }

    /// Subscribes, on a connection of its own, to fanout `exchange` as a queue bound under
    /// `routing_key` would be (`#` matching any key); yields each message's payload until the
    /// connection is lost (the stream then ends).
    pub async fn subscribe(
        &self,
        exchange: &str,
        routing_key: &str,
    ) -> Result<impl Stream<Item = Vec<u8>> + Send + 'static, RedisBrokerError> {
        // kombu asks the sentinels at each connection: a subscription lost to a failover
        // comes back on the new master.
        self.link.refresh().await;
        let mut pubsub = self.link.client().get_async_pubsub().await?;
        pubsub
            .psubscribe(self.fanout_topic(exchange, &routing_key.replace('#', "*")))
            .await?;
        Ok(pubsub
            .into_on_message()
            .map(|msg| msg.get_payload_bytes().to_vec()))
    }

    /// Binds `queue` to direct `exchange` under `routing_key` (kombu's `_queue_bind`).
    pub async fn bind_queue(
        &self,
        exchange: &str,
        routing_key: &str,
        queue: &str,
    ) -> Result<(), RedisBrokerError> {
        let mut conn = self.conn();
        redis::cmd("SADD")
            .arg(self.binding_key(exchange))
            .arg(self.binding(routing_key, queue))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Removes that binding and deletes the queue's lists (kombu's `_delete`, what an
    /// auto-deleted reply queue gets when its consumer goes).
    pub async fn delete_queue(
        &self,
        exchange: &str,
        routing_key: &str,
        queue: &str,
    ) -> Result<(), RedisBrokerError> {
        let mut pipe = redis::pipe();
        pipe.srem(self.binding_key(exchange), self.binding(routing_key, queue))
            .ignore();
        for p in &self.opts.priority_steps {
            pipe.del(list_key(&self.opts, queue, *p)).ignore();
        }
        let mut conn = self.conn();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    fn binding(&self, routing_key: &str, queue: &str) -> String {
        let sep = &self.opts.sep;
        format!("{routing_key}{sep}{sep}{queue}")
    }

    /// Pushes `message` onto every queue bound to direct `exchange` under `routing_key`; with
    /// `expire`, each list then expires that long after the push unless read (kombu's
    /// `x-expires` on a reply queue). Returns how many queues it reached (0: nobody waits).
    pub async fn push_direct(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Envelope,
        expire: Option<Duration>,
    ) -> Result<usize, RedisBrokerError> {
        let queues = self.bound_queues(exchange, routing_key).await?;
        if queues.is_empty() {
            return Ok(0);
        }
        let json = message.to_json();
        let mut pipe = redis::pipe();
        for q in &queues {
            let key = self.list_key(q, message.priority());
            pipe.lpush(&key, &json).ignore();
            if let Some(ttl) = expire {
                let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                pipe.cmd("PEXPIRE").arg(&key).arg(ms).ignore();
            }
        }
        let mut conn = self.conn();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(queues.len())
    }

    /// A connection of its own for blocking pops, whose replies may take up to `longest`.
    pub async fn blocking_connection(
        &self,
        longest: Duration,
    ) -> Result<MultiplexedConnection, RedisBrokerError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(longest + Duration::from_secs(5)));
        Ok(self
            .link
            .client()
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// Takes the next message of `queue` (priority lists in order) without recording it as
    /// unacknowledged (kombu's `no_ack` consumers: the pidbox's), waiting up to `wait`.
    pub async fn pop_wait(
        &self,
        conn: &mut MultiplexedConnection,
        queue: &str,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, RedisBrokerError> {
        let mut cmd = redis::cmd("BRPOP");
        for key in self.consume_keys(&[queue.to_owned()]) {
            cmd.arg(key);
        }
        // BRPOP's 0 waits forever: at least a millisecond.
        cmd.arg(format!("{:.3}", wait.as_secs_f64().max(0.001)));
        let got: Option<(String, Vec<u8>)> = cmd.query_async(conn).await?;
        Ok(got.map(|(_, raw)| raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::TransportOptions;

    #[test]
    fn channels_are_kombus() {
        let o = TransportOptions::default();
        assert_eq!(topic(&o, 9, "celery.pidbox", ""), "/9.celery.pidbox");
        assert_eq!(
            topic(&o, 0, "celeryev", "task.multi"),
            "/0.celeryev/task.multi"
        );
        assert_eq!(topic(&o, 3, "celeryev", "*"), "/3.celeryev/*");
        let plain = TransportOptions {
            fanout_prefix: String::new(),
            fanout_patterns: false,
            ..TransportOptions::default()
        };
        assert_eq!(topic(&plain, 9, "celeryev", "worker.heartbeat"), "celeryev");
        let prefixed = TransportOptions {
            global_keyprefix: "app1:".into(),
            ..TransportOptions::default()
        };
        assert_eq!(topic(&prefixed, 3, "celeryev", "*"), "app1:/3.celeryev/*");
    }
}
