//! See `mediafarm::fuzzing::redis_envelope`: every value taken from a Redis queue must decode
//! or be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mediafarm::fuzzing::redis_envelope(data);
});
