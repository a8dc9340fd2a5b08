//! The seam between one message's life ([`super::message`]) and the broker it came from:
//! acknowledge, return, drop, delay and dead-letter it, on RabbitMQ (the delivery's channel
//! and the [`Rerouter`]) or on Redis (the [`RedisBroker`]'s `unacked` bookkeeping). What a
//! message's handling decides is the same on both; only these steps differ.
//!
//! On Redis a delay or a dead letter *is* the acknowledgement (one atomic script moves the
//! message out of `unacked`), so the acknowledgement that follows it in `message` finds
//! nothing left to do.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use serde_json::Map;

use crate::amqp::broker::BrokerError;
use crate::amqp::reroute::{DeadReason, Rerouter};
use crate::amqp::table::value_to_json;
use crate::redis_broker::{Envelope, RedisBroker};
use crate::runtime::message::Incoming;

/// Where a delivery goes back to.
pub(crate) enum Via {
    Amqp(Arc<Rerouter>),
    Redis(Box<FromRedis>),
}

/// A message taken from the Redis broker.
pub(crate) struct FromRedis {
    pub broker: RedisBroker,
    /// kombu's delivery tag: the message's key in `unacked`.
    pub tag: String,
    pub envelope: Envelope,
}

fn json_headers(headers: &[(&str, AMQPValue)]) -> Map<String, serde_json::Value> {
    headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), value_to_json(v)))
        .collect()
}

impl Incoming {
    /// Acknowledges: the broker forgets the message. Its lent place in the prefetch window
    /// comes back first ([`super::window::Seat::vacate`]).
    pub(crate) async fn ack(&self) -> Result<(), BrokerError> {
        self.seat.vacate().await;
        match &self.via {
            Via::Amqp(_) => {
                self.delivery.acker.ack(BasicAckOptions::default()).await?;
                Ok(())
            }
            Via::Redis(r) => Ok(r.broker.ack(&r.tag).await?),
        }
    }

    /// Returns the message to its queue, to be taken again (AMQP `nack(requeue)`; on Redis
    /// kombu's restore, at the consuming end, marked redelivered).
    pub(crate) async fn requeue(&self) {
        self.seat.vacate().await;
        let outcome = match &self.via {
            Via::Amqp(_) => self
                .delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
                .map(drop)
                .map_err(BrokerError::from),
            Via::Redis(r) => r.broker.restore(&r.tag).await.map(drop).map_err(Into::into),
        };
        if let Err(e) = outcome {
            tracing::warn!(queue = %self.queue, error = %e, "could not return the message; the broker hands it out again on its own (connection loss or visibility timeout)");
        }
    }

    /// Drops the message without returning it (the last resort after a panic).
    pub(crate) async fn reject_without_requeue(&self) {
        self.seat.vacate().await;
        let _ = match &self.via {
            Via::Amqp(_) => self
                .delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await
                .map(drop)
                .map_err(BrokerError::from),
            Via::Redis(r) => r.broker.ack(&r.tag).await.map_err(Into::into),
        };
    }

    /// Sends the message, with `headers` changed, to wait `remaining` before it comes back to
    /// its queue; returns how long it waits in the broker.
    pub(crate) async fn delay(
        &self,
        remaining: Duration,
        headers: &[(&str, AMQPValue)],
    ) -> Result<Duration, BrokerError> {
        match &self.via {
            Via::Amqp(rerouter) => {
                rerouter
                    .delay(
                        &self.queue,
                        &self.delivery.properties,
                        &self.delivery.data,
                        remaining,
                        headers,
                    )
                    .await
            }
            Via::Redis(r) => {
                let later = r
                    .envelope
                    .republished(&json_headers(headers), &[], &self.queue);
                let due = std::time::SystemTime::now()
                    .checked_add(remaining)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(f64::MAX);
                r.broker.delay(&r.tag, &self.queue, &later, due).await?;
                Ok(remaining)
            }
        }
    }

    /// Sends the message to its queue's dead letters with `why`.
    pub(crate) async fn dead_letter(&self, why: &DeadReason) -> Result<(), BrokerError> {
        match &self.via {
            Via::Amqp(rerouter) => {
                rerouter
                    .dead(&self.delivery.properties, &self.delivery.data, why)
                    .await
            }
            Via::Redis(r) => {
                let dead = r
                    .envelope
                    .republished(&json_headers(&why.headers()), &[], &why.queue);
                Ok(r.broker
                    .dead(&r.tag, &why.queue, dead.to_json().as_bytes())
                    .await?)
            }
        }
    }
}
