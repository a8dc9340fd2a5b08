//! See `image_worker::fuzzing::progressive_jpeg`: the compact progressive JPEG decoder decodes
//! or declines every file, never panics, and gives a picture of the scaled size.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = image_worker::fuzzing::progressive_jpeg(data);
});
