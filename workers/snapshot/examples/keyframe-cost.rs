//! Where a watch session's time goes on one file: open, demux, keyframe decode, scale+encode.
//! `cargo run --release -p snapshot-worker --example keyframe-cost -- FILE [INTERVAL_S]`; with
//! `FRESH_DECODER=1` a decoder is made per tick, as the sessions do (≈ 1 ms more per 1080p
//! keyframe, for not holding a decoder's picture buffers between ticks); `QUALITY=N` sets the
//! JPEG quality (default 80).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ffmpeg_next as ff;
use snapshot_worker::media::{Format, FrameEncoder, Input, Interrupt, KeyDecoder, Read};
use snapshot_worker::source::SourceKind;

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("a file");
    let interval: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(20.0);
    let interrupt = Interrupt::new(Arc::new(AtomicBool::new(false)));
    interrupt.arm(Duration::from_secs(60));
    let t = Instant::now();
    let mut input = Input::open(
        &file,
        &file,
        SourceKind::File,
        &interrupt,
        Duration::from_secs(60),
    )
    .unwrap();
    let open = t.elapsed();
    let mut dec = KeyDecoder::new(&input, true).unwrap();
    let quality = std::env::var("QUALITY")
        .ok()
        .and_then(|q| q.parse().ok())
        .unwrap_or(80);
    let mut enc = FrameEncoder::new(Format::Jpeg, quality, None);
    let mut pkt = ff::Packet::empty();
    let (mut demux, mut decode, mut encode) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut due = 0.0;
    let mut n = 0;
    let mut bytes = 0;
    loop {
        let t = Instant::now();
        let r = input.read(&mut pkt).unwrap();
        demux += t.elapsed();
        match r {
            Read::Eof => break,
            Read::Other => continue,
            Read::Video => {}
        }
        let s = input.seconds(&pkt).unwrap_or(0.0);
        if !pkt.is_key() || s + 0.001 < due {
            continue;
        }
        due += interval;
        let t = Instant::now();
        if std::env::var_os("FRESH_DECODER").is_some() {
            dec = KeyDecoder::new(&input, true).unwrap();
        }
        let frame = dec.keyframe(&pkt).unwrap();
        decode += t.elapsed();
        let t = Instant::now();
        bytes += enc.encode(frame).unwrap().data.len();
        encode += t.elapsed();
        n += 1;
    }
    println!(
        "{n} snapshots: open {:?}, demux {:?} ({:?}/snapshot), decode {:?}/snapshot, scale+encode {:?}/snapshot, {} KB/jpeg",
        open,
        demux,
        demux / n,
        decode / n,
        encode / n,
        bytes / n as usize / 1024
    );
}
