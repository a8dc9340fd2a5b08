//! One Redis look for all of a worker's sessions: every [`POLL`] the [`Poller`] asks, in one
//! round trip per [`CHUNK`] sessions, for each session's stop request and the revokes of its
//! jobs ([`mediafarm::runtime::stop::signals_batch`]), and every [`CLAIM_RENEW`] renews all
//! their claims on their streams in one pipeline. A session registers when it starts
//! ([`Poller::register`]) and waits on its [`Registration`] for a reason to end; dropping the
//! registration takes it out of the next look.
//!
//! Why: a session that polled for itself cost two round trips a second plus a claim renewal
//! every 5 s, about 4,400 round trips a second at 2,000 sessions, each a wake-up, a command
//! encoded and a reply parsed on the core the sessions' decodes need. The semantics are the
//! per-session poll's: a stop request made after the session began ends it as `stopped`, a
//! revoke of its job or of the session's first job as `revoked`, a claim another session
//! holds as `superseded`; a failed look is tried again at the next poll.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mediafarm::runtime::stop::{self, Asked};
use mediafarm::ResultBackend;
use tokio::sync::watch;

use super::{state, Ended, STOP_SCOPE};

/// How often stop requests and revokes are looked for: how long a stop may take to be seen.
pub const POLL: Duration = Duration::from_millis(500);
/// Sessions asked about per round trip (a bound on one command's size).
const CHUNK: usize = 500;
/// A running session's claim on its stream is renewed this often and lapses after
/// `CLAIM_TTL` not renewed (its worker died, its job was terminated).
pub const CLAIM_RENEW: Duration = Duration::from_secs(5);
pub const CLAIM_TTL: Duration = Duration::from_secs(30);

/// What the poller knows of a session.
struct Entry {
    stream_id: String,
    session_id: String,
    /// Job ids whose revoke ends the session: this job's and the session's first job's.
    ids: Vec<String>,
    /// Unix seconds the session began: older stop requests are not for it.
    started_at: f64,
    verdict: watch::Sender<Option<Ended>>,
}

impl Entry {
    /// Records why the session should end, once (the first reason stands).
    fn end(&self, why: Ended) {
        self.verdict.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(why);
                true
            } else {
                false
            }
        });
    }

    fn ended(&self) -> bool {
        self.verdict.borrow().is_some()
    }
}

#[derive(Default)]
struct Inner {
    sessions: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
    /// Held while claims are renewed: a session leaving waits for it, so a renewal that took
    /// it in before it left cannot take its stream's claim again after it gave the claim up.
    renewing: tokio::sync::Mutex<()>,
}

/// The worker's poller (one per `snapshot.watch` task, started with its first session).
pub struct Poller {
    inner: Arc<Inner>,
}

/// A session's place in the poller's look; leaves it when dropped.
pub struct Registration {
    id: u64,
    inner: Arc<Inner>,
    rx: watch::Receiver<Option<Ended>>,
}

impl Registration {
    /// Waits until the poller finds a reason for the session to end. Cancel-safe.
    pub async fn verdict(&mut self) -> Ended {
        loop {
            if let Some(why) = *self.rx.borrow_and_update() {
                return why;
            }
            if self.rx.changed().await.is_err() {
                // The poller is gone (the worker is shutting down): no verdict will come.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Registration {
    /// Leaves the look and waits out a claim renewal under way: call before giving the
    /// stream's claim up (a renewal takes a free claim, as after a lapse).
    pub async fn leave(self) {
        let inner = self.inner.clone();
        drop(self);
        let _turn = inner.renewing.lock().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut sessions) = self.inner.sessions.lock() {
            sessions.remove(&self.id);
        }
    }
}

impl Poller {
    /// Starts the poller's task on the current runtime; it ends when the poller is dropped.
    pub fn start(backend: ResultBackend) -> Poller {
        let inner = Arc::new(Inner::default());
        tokio::spawn(run(Arc::downgrade(&inner), backend));
        Poller { inner }
    }

    /// Adds a session to the look.
    pub fn register(
        &self,
        stream_id: &str,
        session_id: &str,
        job_id: &str,
        started_at: f64,
    ) -> Registration {
        let (tx, rx) = watch::channel(None);
        let mut ids = vec![job_id.to_owned()];
        if session_id != job_id {
            ids.push(session_id.to_owned());
        }
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            stream_id: stream_id.to_owned(),
            session_id: session_id.to_owned(),
            ids,
            started_at,
            verdict: tx,
        };
        if let Ok(mut sessions) = self.inner.sessions.lock() {
            sessions.insert(id, entry);
        }
        Registration {
            id,
            inner: self.inner.clone(),
            rx,
        }
    }
}

/// What one look asks about a session (copied out so the lock is not held across Redis).
struct Ask {
    id: u64,
    stream_id: String,
    session_id: String,
    ids: Vec<String>,
    started_at: f64,
}

fn snapshot(inner: &Inner) -> Vec<Ask> {
    let Ok(sessions) = inner.sessions.lock() else {
        return Vec::new();
    };
    sessions
        .iter()
        .filter(|(_, e)| !e.ended())
        .map(|(id, e)| Ask {
            id: *id,
            stream_id: e.stream_id.clone(),
            session_id: e.session_id.clone(),
            ids: e.ids.clone(),
            started_at: e.started_at,
        })
        .collect()
}

/// Hands each session its verdict, if it still runs.
fn deliver(inner: &Inner, verdicts: impl IntoIterator<Item = (u64, Ended)>) {
    let Ok(sessions) = inner.sessions.lock() else {
        return;
    };
    for (id, why) in verdicts {
        if let Some(e) = sessions.get(&id) {
            e.end(why);
        }
    }
}

async fn run(inner: Weak<Inner>, backend: ResultBackend) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renew_at = tokio::time::Instant::now() + CLAIM_RENEW;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let asks = snapshot(&inner);
        if asks.is_empty() {
            continue;
        }
        look(&inner, &backend, &asks).await;
        if tokio::time::Instant::now() >= renew_at {
            renew_at = tokio::time::Instant::now() + CLAIM_RENEW;
            renew(&inner, &backend).await;
        }
    }
}

/// Stop requests and revokes, one round trip per chunk.
async fn look(inner: &Inner, backend: &ResultBackend, asks: &[Ask]) {
    for chunk in asks.chunks(CHUNK) {
        let ids: Vec<Vec<&str>> = chunk
            .iter()
            .map(|a| a.ids.iter().map(String::as_str).collect())
            .collect();
        let asked: Vec<Asked<'_>> = chunk
            .iter()
            .zip(&ids)
            .map(|(a, ids)| Asked {
                subject: &a.stream_id,
                ids,
            })
            .collect();
        let signals = match stop::signals_batch(backend, STOP_SCOPE, &asked).await {
            Ok(s) => s,
            Err(e) => {
                // As a session's own failed poll: looked at again at the next one.
                tracing::warn!(sessions = chunk.len(), error = %e, "cannot look for stop requests and revokes");
                continue;
            }
        };
        deliver(
            inner,
            chunk.iter().zip(signals).filter_map(|(a, s)| {
                if s.stop_requested_since(a.started_at) {
                    Some((a.id, Ended::Stopped))
                } else {
                    s.revoked.then_some((a.id, Ended::Revoked))
                }
            }),
        );
    }
}

/// Renews every session's claim, one pipeline per chunk. The sessions are taken under the
/// `renewing` lock (see [`Registration::leave`]).
async fn renew(inner: &Inner, backend: &ResultBackend) {
    let _turn = inner.renewing.lock().await;
    let asks = snapshot(inner);
    for chunk in asks.chunks(CHUNK) {
        let claims: Vec<(&str, &str)> = chunk
            .iter()
            .map(|a| (a.stream_id.as_str(), a.session_id.as_str()))
            .collect();
        let holders = match state::claim_many(backend, &claims, CLAIM_TTL).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(sessions = chunk.len(), error = %e, "cannot renew the streams' claims");
                continue;
            }
        };
        deliver(
            inner,
            chunk.iter().zip(holders).filter_map(|(a, holder)| {
                let holder = holder?;
                tracing::warn!(stream_id = %a.stream_id, %holder, "the stream's claim went to another session; ending this one");
                Some((a.id, Ended::Superseded))
            }),
        );
    }
}
