//! See `snapshot_worker::fuzzing::snapshot_kwargs`: kwargs are accepted or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = snapshot_worker::fuzzing::snapshot_kwargs(data);
});
