//! The prefetch window: how many messages a worker holds unacknowledged at once. It is
//! `prefetch_count` (concurrency × multiplier) for messages that are waiting to run or running,
//! widened by one for each job that has only its *finishing* left — the publisher confirm of
//! what it sends on, its result store, its chord join — up to `worker_finishing_limit` more
//! (by default `prefetch_count`).
//!
//! Why: a job keeps its message unacknowledged until its result is stored (late ack), but its
//! concurrency slot is free as soon as its task returns. With a fixed window, jobs waiting on
//! network round trips fill it, and the next message is not delivered although a slot is
//! free: a chain step at the defaults (`-c 2`, prefetch 8) was bound by that. Celery widens its
//! QoS the same way for messages that wait for their ETA (`QoS.increment_eventually`).
//!
//! What it promises:
//! - at most `prefetch_count` messages waiting to run or running, as without the widening: a
//!   finishing job gives its lent place back *before* its message is acknowledged (or
//!   returned), and on RabbitMQ the narrower `basic.qos` goes out on the channel ahead of the
//!   ack ([`Seat::vacate`]), and RabbitMQ applies it before it reads the ack, so an ack never
//!   lets one more message in;
//! - at most `prefetch_count + worker_finishing_limit` unacknowledged in all (memory stays
//!   bounded by the settings);
//! - nothing is acknowledged earlier than before: a lent place only lets the *next* message in.
//!
//! A finishing job that finds every place lent waits in line; a job that ends while it holds a
//! lent place hands it to the first in line instead of giving it back, so under load (every
//! place lent, finishing jobs in line) the window keeps its size: no `basic.qos` goes out and
//! no ack waits for one. The count is the same as if the place had been given back and lent
//! again, so the promises above hold unchanged.
//!
//! On RabbitMQ the window is applied with `basic.qos` on the consuming channel, by one task per
//! channel (`worker::follow_window`) that queues the latest size on the channel as it changes,
//! without waiting for the previous `qos-ok`; an ack waits only until the narrower size is
//! queued ahead of it, not for RabbitMQ's reply (a round trip per narrowing ack before). With
//! quorum queues, whose QoS is per
//! consumer and fixed once the consumer starts, it does not widen (Celery's is static then too).
//! On the Redis broker the worker takes a message only when the window has room
//! ([`Window::take`]), and narrowing is immediate.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;

/// The window of one consuming connection.
#[derive(Debug)]
pub(crate) struct Window {
    base: usize,
    most_lent: usize,
    state: watch::Sender<Count>,
    /// On RabbitMQ: the last [`Count::changes`] whose size is queued on the consuming channel
    /// (anything queued after it reaches RabbitMQ after it); `None` where the window is
    /// enforced here (the Redis broker).
    applied: Option<watch::Sender<u64>>,
    /// Finishing seats that found every place lent, oldest first: a lent place that a leaving
    /// seat would give back goes to one of them instead. Entries of seats that left meanwhile
    /// are skipped (and pruned when the line grows).
    line: Mutex<VecDeque<Weak<Mutex<Part>>>>,
}

/// What the window counts now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Count {
    /// Places lent to jobs that are finishing.
    pub lent: usize,
    /// Messages taken and not yet ended (counted only where the worker takes them itself:
    /// the Redis broker).
    pub held: usize,
    /// How many times `lent` changed: what [`Window::applied`] is compared with.
    pub changes: u64,
}

/// How long a job waits for its narrower window to reach RabbitMQ before acknowledging
/// anyway (the channel is failing then: the ack fails too, or lets one more message in).
const APPLY_WAIT: Duration = Duration::from_secs(5);

impl Window {
    /// A window of `base` messages that widens by at most `most_lent` for finishing jobs.
    /// `remote`: the broker enforces it (RabbitMQ's `basic.qos`), and whoever applies it
    /// reports through [`Window::applied`].
    pub fn new(base: usize, most_lent: usize, remote: bool) -> Arc<Window> {
        Arc::new(Window {
            base: base.max(1),
            most_lent,
            state: watch::Sender::new(Count::default()),
            applied: remote.then(|| watch::Sender::new(0)),
            line: Mutex::new(VecDeque::new()),
        })
    }

    /// The window for `settings`: `prefetch_count`, widening by `worker_finishing_limit` unless
    /// `fixed`.
    pub fn for_settings(
        settings: &crate::settings::Settings,
        fixed: bool,
        remote: bool,
    ) -> Arc<Window> {
        let base = usize::from(settings.prefetch_count().max(1));
        let most_lent = if fixed { 0 } else { settings.finishing_limit() };
        Window::new(base, most_lent, remote)
    }

    /// How many messages may be unacknowledged now.
    #[cfg(test)]
    pub fn size(&self) -> usize {
        self.base + self.state.borrow().lent
    }

    /// A size as RabbitMQ's `basic.qos` takes it.
    pub fn qos_of(&self, count: Count) -> u16 {
        u16::try_from(self.base + count.lent).unwrap_or(u16::MAX)
    }

    pub fn count(&self) -> Count {
        *self.state.borrow()
    }

    /// Sees every change of the count.
    pub fn watch(&self) -> watch::Receiver<Count> {
        self.state.subscribe()
    }

    /// Makes this window what `node`'s `inspect stats` reports as `prefetch_count`, read when
    /// asked (nothing is done per change), for as long as the window lives.
    pub fn report_to(self: &Arc<Self>, node: &crate::amqp::pidbox::Node) {
        let weak = Arc::downgrade(self);
        node.set_prefetch_source(Box::new(move || {
            weak.upgrade().map(|w| w.qos_of(w.count()))
        }));
    }

    /// The size of the window as it was after `changes` changes is queued on the channel, ahead
    /// of any ack queued from now on.
    pub fn applied(&self, changes: u64) {
        if let Some(a) = &self.applied {
            a.send_if_modified(|v| {
                let newer = changes > *v;
                *v = (*v).max(changes);
                newer
            });
        }
    }

    /// Whoever applied the window stopped (its channel failed): nobody waits for it any more.
    pub fn not_applied_any_more(&self) {
        self.applied(u64::MAX);
    }

    /// Widens by one if fewer than the most are lent.
    fn lend(self: &Arc<Self>) -> Option<Lent> {
        let most = self.most_lent;
        let lent = self.state.send_if_modified(|c| {
            if c.lent < most {
                c.lent += 1;
                c.changes += 1;
                true
            } else {
                false
            }
        });
        lent.then(|| Lent {
            window: self.clone(),
        })
    }

    /// Waits until the window has room for one more message and counts it as held until the
    /// returned place is dropped (the Redis broker, where the worker itself takes messages).
    pub async fn take(self: &Arc<Self>) -> Place {
        let mut seen = self.state.subscribe();
        loop {
            if let Some(place) = self.try_take() {
                return place;
            }
            let base = self.base;
            // The sender lives in `self`, so this cannot fail while we hold it.
            let _ = seen.wait_for(|c| c.held < base + c.lent).await;
        }
    }

    /// A place when the window has room for one more message now, as [`Window::take`].
    pub fn try_take(self: &Arc<Self>) -> Option<Place> {
        let base = self.base;
        self.state
            .send_if_modified(|c| {
                if c.held < base + c.lent {
                    c.held += 1;
                    true
                } else {
                    false
                }
            })
            .then(|| Place {
                window: self.clone(),
            })
    }
}

/// A place lent to a finishing job; the window narrows again when it is dropped.
#[derive(Debug)]
struct Lent {
    window: Arc<Window>,
}

impl Drop for Lent {
    /// Returns the place; the number of changes after it, for [`Seat::vacate`] to wait on.
    fn drop(&mut self) {
        self.window.state.send_modify(|c| {
            c.lent = c.lent.saturating_sub(1);
            c.changes += 1;
        });
    }
}

/// Where a seat stands in its window.
#[derive(Debug, Default)]
enum Part {
    /// Waiting to run or running.
    #[default]
    Seated,
    /// Finishing, in line for a lent place (every one was lent when it asked).
    InLine,
    /// Finishing on a lent place.
    Lent(Lent),
    /// Acknowledged or returned.
    Left,
}

/// One delivered message's seat in its window: the job lends it out while it finishes
/// ([`Seat::finishing`]) and takes it back before its message leaves ([`Seat::vacate`]).
/// Dropped with the message, it gives back anything still lent.
#[derive(Debug)]
pub(crate) struct Seat {
    window: Arc<Window>,
    part: Arc<Mutex<Part>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The line is pruned of seats that left when it grows past this many entries.
const LINE_PRUNE: usize = 64;

impl Seat {
    pub fn new(window: &Arc<Window>) -> Seat {
        Seat {
            window: window.clone(),
            part: Arc::new(Mutex::new(Part::Seated)),
        }
    }

    /// The job's run ended and only its finishing is left: the window widens by one (up to
    /// its most) until [`Seat::vacate`]; when every place is lent, the seat waits in line for
    /// one that a leaving seat hands on. `true` when it holds a lent place now.
    pub fn finishing(&self) -> bool {
        // Always the line, then a seat: the order every path takes both locks in.
        let mut line = lock(&self.window.line);
        let mut part = lock(&self.part);
        match &*part {
            Part::Lent(_) => return true,
            Part::InLine | Part::Left => return false,
            Part::Seated => {}
        }
        if let Some(lent) = self.window.lend() {
            *part = Part::Lent(lent);
            return true;
        }
        *part = Part::InLine;
        drop(part);
        if line.len() >= LINE_PRUNE.max(2 * self.window.most_lent) {
            line.retain(|w| {
                w.upgrade()
                    .is_some_and(|p| matches!(*lock(&p), Part::InLine))
            });
        }
        line.push_back(Arc::downgrade(&self.part));
        false
    }

    /// The message is about to be acknowledged or returned: a lent place (if any) goes to the
    /// first finishing seat in line, else comes back to the window; on RabbitMQ the latter
    /// waits until the narrower `basic.qos` is queued ahead of the ack, so the ack does not let one more
    /// message in than `prefetch_count` allows. Handing the place on changes nothing the
    /// broker enforces, so that ack waits for nothing.
    pub async fn vacate(&self) {
        let lent = match std::mem::replace(&mut *lock(&self.part), Part::Left) {
            Part::Lent(lent) => lent,
            _ => return,
        };
        let Some(lent) = self.window.hand_on(lent) else {
            return;
        };
        drop(lent);
        let Some(applied) = &self.window.applied else {
            return;
        };
        let changes = self.window.count().changes;
        let mut seen = applied.subscribe();
        let wait = seen.wait_for(|v| *v >= changes);
        if tokio::time::timeout(APPLY_WAIT, wait).await.is_err() {
            tracing::warn!(
                "the narrower prefetch window did not reach the broker in time; acknowledging anyway"
            );
        }
    }
}

impl Window {
    /// Gives `lent` to the first seat in line that still finishes; returns it when none does.
    fn hand_on(&self, lent: Lent) -> Option<Lent> {
        let mut line = lock(&self.line);
        while let Some(next) = line.pop_front() {
            let Some(next) = next.upgrade() else {
                continue;
            };
            let mut part = lock(&next);
            if matches!(*part, Part::InLine) {
                *part = Part::Lent(lent);
                return None;
            }
        }
        Some(lent)
    }

    /// Seats in line now (tests).
    #[cfg(test)]
    fn in_line(&self) -> usize {
        lock(&self.line)
            .iter()
            .filter(|w| {
                w.upgrade()
                    .is_some_and(|p| matches!(*lock(&p), Part::InLine))
            })
            .count()
    }
}

/// A message held from the Redis broker; its place frees when this is dropped.
#[derive(Debug)]
pub(crate) struct Place {
    window: Arc<Window>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.window
            .state
            .send_modify(|c| c.held = c.held.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn finishing_jobs_widen_the_window_up_to_the_most_and_it_narrows_as_they_end() {
        let w = Window::new(8, 2, false);
        assert_eq!(w.size(), 8);
        let seats: Vec<Seat> = (0..3).map(|_| Seat::new(&w)).collect();
        let widened: Vec<bool> = seats.iter().map(Seat::finishing).collect();
        assert_eq!(widened, [true, true, false]);
        assert!(seats[0].finishing(), "finishing twice lends once");
        assert_eq!(w.size(), 10, "widened by two at most");
        seats[2].vacate().await;
        assert_eq!(
            w.size(),
            10,
            "a job that was not lent a place gives none back"
        );
        seats[0].vacate().await;
        assert_eq!(w.size(), 9);
        let late = Seat::new(&w);
        assert!(late.finishing());
        drop(late);
        assert_eq!(w.size(), 9, "a dropped seat gives its lent place back");
        drop(seats);
        assert_eq!(w.size(), 8);
        assert!(
            !Seat::new(&Window::new(8, 0, false)).finishing(),
            "a fixed window never widens"
        );
    }

    #[tokio::test]
    async fn inspect_stats_reports_the_window_in_effect() {
        use crate::amqp::pidbox::Node;
        let settings = crate::settings::Settings {
            worker_concurrency: 1,
            worker_prefetch_multiplier: 2,
            ..Default::default()
        };
        let backend = crate::backend::ResultBackend::connect("redis://127.0.0.1:6379/0", None)
            .await
            .expect("Redis on 127.0.0.1:6379");
        let node = Arc::new(Node::new(
            "stats@test".into(),
            settings.clone(),
            backend,
            Arc::default(),
            Vec::new(),
            Vec::new(),
            tokio_util::sync::CancellationToken::new(),
        ));
        assert_eq!(
            node.prefetch_in_effect(),
            2,
            "the setting before any consumer"
        );
        let w = Window::for_settings(&settings, false, true);
        w.report_to(&node);
        let reported = |want: u16| {
            let node = node.clone();
            tokio::time::timeout(Duration::from_secs(5), async move {
                while node.prefetch_in_effect() != want {
                    tokio::task::yield_now().await;
                }
            })
        };
        let seat = Seat::new(&w);
        assert!(seat.finishing());
        reported(3).await.expect("the widened window is reported");
        drop(seat);
        reported(2).await.expect("and the narrowed one");
    }

    #[test]
    fn a_huge_window_is_capped_for_basic_qos() {
        let w = Window::new(usize::from(u16::MAX), 5, true);
        let seat = Seat::new(&w);
        assert!(seat.finishing());
        assert_eq!(w.qos_of(w.count()), u16::MAX);
    }

    #[tokio::test]
    async fn on_rabbitmq_a_job_acknowledges_only_once_the_narrower_window_is_applied() {
        let w = Window::new(2, 2, true);
        let seat = Seat::new(&w);
        assert!(seat.finishing());
        w.applied(w.count().changes);
        let mut vacating = Box::pin(seat.vacate());
        assert!(
            (&mut vacating).now_or_never().is_none(),
            "the narrower size is not confirmed yet"
        );
        assert_eq!(w.size(), 2, "but already asked for");
        w.applied(w.count().changes);
        vacating.await;
        // A window whose channel failed does not hold acks up.
        let seat = Seat::new(&w);
        assert!(seat.finishing());
        w.not_applied_any_more();
        assert!(seat.vacate().now_or_never().is_some());
    }

    #[tokio::test]
    async fn taking_waits_for_room_which_a_finishing_job_makes() {
        let w = Window::new(2, 2, false);
        let first = (w.take().await, Seat::new(&w));
        let _second = w.take().await;
        let mut third = Box::pin(w.take());
        assert!(
            (&mut third).now_or_never().is_none(),
            "two held fill a window of two"
        );
        // The first job's run ends: its place is lent, and the third message may be taken
        // while the first still waits for its result store.
        assert!(first.1.finishing());
        let third = third.await;
        assert_eq!(w.count().held, 3);
        let mut fourth = Box::pin(w.take());
        assert!((&mut fourth).now_or_never().is_none());
        // The first job ends: the lent place comes back before its own, so the window never
        // has room in between.
        first.1.vacate().await;
        assert!((&mut fourth).now_or_never().is_none());
        drop(first);
        assert_eq!(w.count().held, 2);
        assert!((&mut fourth).now_or_never().is_none());
        drop(third);
        let _fourth = fourth.await;
        assert_eq!(w.count().held, 2);
    }

    #[tokio::test]
    async fn a_leaving_seat_hands_its_lent_place_to_the_first_finishing_seat_in_line() {
        let w = Window::new(2, 1, true);
        let (a, b, c) = (Seat::new(&w), Seat::new(&w), Seat::new(&w));
        assert!(a.finishing());
        assert!(!b.finishing(), "the only lendable place is lent");
        assert!(!c.finishing());
        assert_eq!(w.in_line(), 2);
        let changes = w.count().changes;
        // a leaves: its place goes to b, the window keeps its size, and a's ack waits for no
        // basic.qos (none was applied at all here).
        assert!(
            a.vacate().now_or_never().is_some(),
            "handing a place on waits for nothing"
        );
        assert_eq!((w.size(), w.count().changes), (3, changes));
        assert!(b.finishing(), "b holds the place now");
        assert_eq!(w.in_line(), 1);
        // c leaves while in line: it held nothing and takes nothing any more.
        assert!(c.vacate().now_or_never().is_some());
        assert_eq!(w.in_line(), 0);
        // b leaves with nobody in line: the window narrows, and b waits until that is applied.
        let mut vacating = Box::pin(b.vacate());
        assert!((&mut vacating).now_or_never().is_none());
        assert_eq!(w.size(), 2);
        w.applied(w.count().changes);
        vacating.await;
    }

    #[tokio::test]
    async fn the_line_forgets_seats_that_left() {
        let w = Window::new(1, 1, false);
        let holder = Seat::new(&w);
        assert!(holder.finishing());
        for _ in 0..1000 {
            let s = Seat::new(&w);
            assert!(!s.finishing());
            s.vacate().await;
        }
        assert!(lock(&w.line).len() <= LINE_PRUNE + 1, "pruned as it grows");
        holder.vacate().await;
        assert_eq!(w.size(), 1, "nobody was in line: the place came back");
    }
}
