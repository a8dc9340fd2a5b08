//! See `notify_worker::fuzzing::notify_kwargs`: kwargs are accepted or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = notify_worker::fuzzing::notify_kwargs(data);
});
