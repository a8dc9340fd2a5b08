//! notify-worker: notify.email, notify.sms and notify.webhook (being built; see the open issue).
