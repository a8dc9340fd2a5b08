//! snapshot-worker: snapshot.capture and snapshot.watch (being built; see the open issue).
