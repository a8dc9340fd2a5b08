//! A small RTMP player, enough to take keyframes from live streams at scale: the chunk
//! stream ([`chunk`], sans I/O), AMF0 commands ([`amf0`]), FLV video tag headers ([`flv`]) and
//! a Tokio client ([`client`]) that plays one stream. It is the subset a snapshot needs —
//! handshake, `connect`, `createStream`, `play`, acknowledgements and pings — not a general
//! RTMP library: no publishing, no RTMPS/RTMPE, no digest handshake (nginx-rtmp, SRS and
//! the common media servers accept the plain one, as FFmpeg's client uses it too).
//!
//! Why not a crate: `rml_rtmp` (the maintained sans-I/O one on crates.io) gathers every
//! message into an owned buffer before the caller sees it, so every skipped inter frame would
//! still be copied; here a message is judged at its first chunk and a skipped one is never
//! copied or allocated, which is the point of the engine (see `watch::engine`).

pub mod amf0;
pub mod chunk;
pub mod client;
pub mod flv;

pub use client::{Player, RtmpError, Target};
