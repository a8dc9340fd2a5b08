//! See `image_worker::fuzzing::heif_items`: a HEIF file's boxes give a decode plan or are left
//! to libheif, never a panic, and a plan never points outside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = image_worker::fuzzing::heif_items(data);
});
