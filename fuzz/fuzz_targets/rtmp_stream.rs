//! See `snapshot_worker::fuzzing::rtmp_stream`: a server's chunk stream is read or refused,
//! never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = snapshot_worker::fuzzing::rtmp_stream(data);
});
