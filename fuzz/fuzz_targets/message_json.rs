//! See `mediafarm::fuzzing::message_json`: every input must decode or be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mediafarm::fuzzing::message_json(data);
});
