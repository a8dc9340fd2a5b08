//! FFmpeg plumbing shared by both tasks: open a source under an interrupt callback (a deadline
//! and a stop flag that FFmpeg polls inside every blocking call), read its video packets, decode
//! one keyframe with a single-threaded decoder, and scale plus encode the frame. JPEG goes
//! from the decoder's 4:2:0 planes straight to libjpeg-turbo ([`crate::jpeg`]), through
//! swscale only when the picture is resized or in another pixel format; only PNG needs RGB.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use ff::codec::threading;
use ff::format::Pixel;
use ff::software::scaling;
use ffmpeg_next as ff;

use crate::jpeg::{Plane, Range, Yuv420Jpeg};
use crate::source::SourceKind;

/// Why a source could not give a frame.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("cannot open {url}: {reason}")]
    Open { url: String, reason: String },
    #[error("{url} returned 404 Not Found")]
    NotFound { url: String },
    #[error("{url} has no video stream")]
    NoVideo { url: String },
    #[error("{url} gave no frame within {secs} s")]
    TimedOut { url: String, secs: f64 },
    #[error("stopped")]
    Stopped,
    #[error("cannot read {url}: {reason}")]
    Read { url: String, reason: String },
    #[error("cannot decode a frame of {url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("cannot encode the frame: {0}")]
    Encode(String),
    #[error("at_s {at} s is past the end of {url} ({duration:.3} s long)")]
    PastEnd { url: String, at: f64, duration: f64 },
    #[error("{url} ended before it gave a video frame")]
    Ended { url: String },
    #[error("{url} carries {codec} video; snapshot.watch decodes H.264 from RTMP sources")]
    Codec { url: String, codec: &'static str },
}

impl From<MediaError> for mediafarm::TaskError {
    /// Source faults are permanent: a capture is about now, and a retry minutes later would
    /// answer a different question; a session reconnects by itself.
    fn from(e: MediaError) -> mediafarm::TaskError {
        use mediafarm::TaskError;
        let kind = match &e {
            MediaError::Open { .. } => "SourceUnreachable",
            MediaError::NotFound { .. } => "SourceNotFound",
            MediaError::NoVideo { .. } => "NoVideoStream",
            MediaError::TimedOut { .. } => "SourceTimeout",
            MediaError::Stopped => "Stopped",
            MediaError::Read { .. } => "SourceUnreadable",
            MediaError::Decode { .. } => "DecodeError",
            MediaError::Encode(_) => "EncodeError",
            MediaError::PastEnd { .. } => "AtPastEnd",
            MediaError::Ended { .. } => "StreamEnded",
            MediaError::Codec { .. } => "UnsupportedCodec",
        };
        match e {
            MediaError::NoVideo { .. } | MediaError::PastEnd { .. } | MediaError::Codec { .. } => {
                TaskError::invalid(kind, e.to_string())
            }
            _ => TaskError::permanent(kind, e.to_string()),
        }
    }
}

/// Quietens FFmpeg's own logging (errors only) and keeps freed decoder memory for the next
/// decode, once per process.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = ff::init();
        ff::util::log::set_level(ff::util::log::Level::Fatal);
        keep_decoder_memory();
    });
}

/// A decoder lives for one tick (so idle sessions hold no picture buffers), and each new one
/// allocates its picture pool and tables again: megabytes that glibc otherwise hands back to
/// the kernel on free (mmap'd blocks, or a trimmed heap top), so the next decoder page-faults
/// them in again, zeroed by the kernel: about 870 page faults and 4–5 ms of CPU per 1080p
/// keyframe, a quarter of the decode (BENCHMARKS.md). Blocks under 8 MB (a 1080p picture is
/// 3 MB) now come from the heap and up to 32 MB of free space stays at each heap's top, so
/// each glibc malloc arena that ran a decode keeps about one decoder's working set (≈ 10 MB
/// at 1080p) instead. Rust's own allocations do not go through glibc (see the shared crate's
/// global allocator); FFmpeg's do.
fn keep_decoder_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's thresholds; valid parameters and values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// What FFmpeg's interrupt callback checks: a deadline (moved forward as work progresses) and
/// a stop flag. Either ends any blocking open or read at once.
#[derive(Clone)]
pub struct Interrupt {
    deadline_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Interrupt {
    pub fn new(stop: Arc<AtomicBool>) -> Interrupt {
        Interrupt {
            deadline_ms: Arc::new(AtomicU64::new(u64::MAX)),
            stop,
        }
    }

    /// Any blocking call still running `after` from now is abandoned.
    pub fn arm(&self, after: Duration) {
        let at = epoch().elapsed() + after;
        self.deadline_ms.store(
            at.as_millis().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn arm_at(&self, at: Instant) {
        self.arm(at.saturating_duration_since(Instant::now()));
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn expired(&self) -> bool {
        epoch().elapsed().as_millis() as u64 >= self.deadline_ms.load(Ordering::Relaxed)
    }

    fn fired(&self) -> bool {
        self.stopped() || self.expired()
    }

    fn callback(&self) -> impl FnMut() -> bool + Send + 'static {
        let me = self.clone();
        move || me.fired()
    }
}

/// An open source and its video stream.
pub struct Input {
    ctx: ff::format::context::Input,
    video: usize,
    time_base: f64,
    start_s: f64,
    url: String,
    interrupt: Interrupt,
    timeout_s: f64,
    /// MP4/MOV read keyframes only ([`Input::keep_only_video_keyframes`]).
    mov_keys: bool,
    key_seek: KeySeek,
}

/// Keyframe-only reading of an MP4/MOV file by seeking from one keyframe to the next, so the
/// demuxer neither reads nor copies the pictures in between (at 6 Mbit/s, 15 MB per 20 s).
#[derive(Clone, Copy, Debug, PartialEq)]
enum KeySeek {
    Off,
    /// On; no keyframe read yet since the open or the last seek.
    Start,
    /// On; the presentation time (stream time base) of the keyframe read last.
    After(i64),
}

/// Whether the URL names an MP4/MOV file by its extension.
fn mp4_named(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    matches!(ext.as_deref(), Some("mp4" | "m4v" | "mov"))
}

/// Whether FFmpeg's MOV/MP4 demuxer reads this input.
fn is_mov(ctx: &ff::format::context::Input) -> bool {
    ctx.format()
        .name()
        .split(',')
        .any(|n| n == "mov" || n == "mp4")
}

/// What one read gave.
pub enum Read {
    Video,
    Other,
    Eof,
}

impl Input {
    /// Opens `url` (shown as `shown` in errors) and finds its video stream; the interrupt must
    /// be armed by the caller.
    pub fn open(
        url: &str,
        shown: &str,
        kind: SourceKind,
        interrupt: &Interrupt,
        timeout: Duration,
    ) -> Result<Input, MediaError> {
        init();
        if kind == SourceKind::File && mp4_named(url) {
            let ctx = open_header_only(url, shown, interrupt, timeout)?;
            let sized = ctx
                .streams()
                .best(ff::media::Type::Video)
                // SAFETY: the stream's codec parameters, alive with the context.
                .is_some_and(|s| unsafe { (*s.parameters().as_ptr()).width } > 0);
            if is_mov(&ctx) && sized {
                return Input::from_context(ctx, shown, interrupt, timeout);
            }
            // Named .mp4 but another container, or no picture size in its header: open it
            // again with FFmpeg's full probe.
        }
        let ctx = open_context(url, shown, kind, interrupt, timeout)?;
        Input::from_context(ctx, shown, interrupt, timeout)
    }

    fn from_context(
        ctx: ff::format::context::Input,
        shown: &str,
        interrupt: &Interrupt,
        timeout: Duration,
    ) -> Result<Input, MediaError> {
        let stream =
            ctx.streams()
                .best(ff::media::Type::Video)
                .ok_or_else(|| MediaError::NoVideo {
                    url: shown.to_owned(),
                })?;
        let tb = stream.time_base();
        let time_base = f64::from(tb.numerator()) / f64::from(tb.denominator().max(1));
        let start = stream.start_time();
        let start_s = if start == ff::ffi::AV_NOPTS_VALUE {
            0.0
        } else {
            start as f64 * time_base
        };
        let video = stream.index();
        Ok(Input {
            ctx,
            video,
            time_base,
            start_s,
            url: shown.to_owned(),
            interrupt: interrupt.clone(),
            timeout_s: timeout.as_secs_f64(),
            mov_keys: false,
            key_seek: KeySeek::Off,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn parameters(&self) -> Option<ff::codec::Parameters> {
        self.ctx.stream(self.video).map(|s| s.parameters())
    }

    /// Where the stream's clock starts, in seconds.
    pub fn start_s(&self) -> f64 {
        self.start_s
    }

    /// The whole duration of a file, when its container says.
    pub fn duration_s(&self) -> Option<f64> {
        let d = self.ctx.duration();
        (d > 0).then(|| d as f64 / f64::from(ff::ffi::AV_TIME_BASE))
    }

    /// A packet's presentation time in stream seconds.
    pub fn seconds(&self, pkt: &ff::Packet) -> Option<f64> {
        pkt.pts().or(pkt.dts()).map(|t| t as f64 * self.time_base)
    }

    pub fn frame_seconds(&self, frame: &ff::frame::Video) -> Option<f64> {
        frame
            .timestamp()
            .or(frame.pts())
            .map(|t| t as f64 * self.time_base)
    }

    /// Asks the demuxer to drop what a keyframe-only reader never uses before it copies it
    /// out: every other stream (all containers honour that), and on FLV — RTMP's container —
    /// the video's non-key packets too. On MP4/MOV, reads then seek from each keyframe to the
    /// next instead (its index says where they are): the demuxer's own non-key discard would
    /// hand later keyframes the composition offset of a skipped sample (a 4.0 s keyframe read
    /// as 4.1 s), while a seek sets that offset right. The other demuxers (MPEG-TS, RTSP)
    /// ignore the discard.
    pub fn keep_only_video_keyframes(&mut self) {
        let flv = self
            .ctx
            .format()
            .name()
            .split(',')
            .any(|n| n == "flv" || n == "live_flv");
        if is_mov(&self.ctx) {
            self.mov_keys = true;
            self.key_seek = KeySeek::Start;
        }
        for mut stream in self.ctx.streams_mut() {
            let discard = if stream.index() != self.video {
                ff::ffi::AVDiscard::AVDISCARD_ALL
            } else if flv {
                ff::ffi::AVDiscard::AVDISCARD_NONKEY
            } else {
                continue;
            };
            // SAFETY: a live stream of the open input; demuxers read `discard` per packet.
            unsafe { (*stream.as_mut_ptr()).discard = discard };
        }
    }

    /// Reads the next packet into `pkt`.
    pub fn read(&mut self, pkt: &mut ff::Packet) -> Result<Read, MediaError> {
        // `Packet::read` hands the packet to av_read_frame as it is, and av_read_frame does not
        // free what a reused packet still holds: without this every packet's buffer leaked.
        // SAFETY: the packet is ours and not borrowed; unref leaves it blank and reusable.
        unsafe { ff::ffi::av_packet_unref(ff::packet::Mut::as_mut_ptr(pkt)) };
        if let KeySeek::After(pts) = self.key_seek {
            // Forward to the first keyframe presented after the last one. MOV takes the seek
            // time as a presentation time and fails when no keyframe follows in its index (the
            // file's end, or a fragmented file whose later fragments are not indexed yet):
            // then plain reading goes on from where it is until the next seek, which is right
            // in both cases (and at the end gives the last pictures' times, which a looped
            // file's clock goes on from).
            // SAFETY: the open context we own; the stream index is the video stream's.
            let r = unsafe {
                ff::ffi::av_seek_frame(self.ctx.as_mut_ptr(), self.video as i32, pts + 1, 0)
            };
            if r < 0 {
                self.key_seek = KeySeek::Off;
            }
        }
        match pkt.read(&mut self.ctx) {
            Ok(()) if pkt.stream() == self.video => {
                if self.key_seek != KeySeek::Off && pkt.is_key() {
                    let pts = pkt.pts().or(pkt.dts());
                    self.key_seek = match (self.key_seek, pts) {
                        // A seek that did not move forward: read plainly from here on.
                        (KeySeek::After(last), Some(p)) if p <= last => KeySeek::Off,
                        (_, Some(p)) => KeySeek::After(p),
                        (_, None) => KeySeek::Off,
                    };
                }
                Ok(Read::Video)
            }
            Ok(()) => Ok(Read::Other),
            Err(ff::Error::Eof) => Ok(Read::Eof),
            Err(_) if self.interrupt.stopped() => Err(MediaError::Stopped),
            Err(_) if self.interrupt.expired() => Err(MediaError::TimedOut {
                url: self.url.clone(),
                secs: self.timeout_s,
            }),
            Err(e) => Err(MediaError::Read {
                url: self.url.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Seeks to the keyframe at or before `secs` (from the file's start).
    pub fn seek(&mut self, secs: f64) -> Result<(), MediaError> {
        if self.mov_keys {
            self.key_seek = KeySeek::Start;
        }
        let ts = ((secs + self.start_s) * f64::from(ff::ffi::AV_TIME_BASE)) as i64;
        self.ctx.seek(ts, ..ts + 1).map_err(|e| MediaError::Read {
            url: self.url.clone(),
            reason: format!("cannot seek to {secs} s: {e}"),
        })
    }
}

/// Opens `url` and probes its streams (avformat_find_stream_info: for most containers the
/// probe reads packets and decodes a first picture to learn what the header does not say).
fn open_context(
    url: &str,
    shown: &str,
    kind: SourceKind,
    interrupt: &Interrupt,
    timeout: Duration,
) -> Result<ff::format::context::Input, MediaError> {
    let mut opts = ff::Dictionary::new();
    match kind {
        SourceKind::Rtsp => opts.set("rtsp_transport", "tcp"),
        SourceKind::Rtmp => opts.set("rtmp_live", "live"),
        SourceKind::Hls | SourceKind::File => {}
    }
    if kind != SourceKind::File {
        // Live sources: start on the first frames instead of probing for seconds.
        opts.set("analyzeduration", "1000000");
        opts.set("fflags", "nobuffer");
    }
    ff::format::input_with_interrupt_and_dictionary(url, interrupt.callback(), opts)
        .map_err(|e| open_error(e, shown, interrupt, timeout))
}

/// Opens a file by its container's header alone, without FFmpeg's probe. An MP4/MOV header
/// has everything the sessions use — picture size, codec configuration, time base, start,
/// duration, reordering delay (the same values as after the probe; checked in a unit test)
/// — while the probe decoded the first picture only to learn its pixel format (36–39 ms per
/// 1080p open), and without that decode still read ≈ 5 MB of packets to learn nothing more
/// (≈ 1 ms per open). Our decoders are separate codec contexts, made from these parameters.
fn open_header_only(
    url: &str,
    shown: &str,
    interrupt: &Interrupt,
    timeout: Duration,
) -> Result<ff::format::context::Input, MediaError> {
    let failed = |reason: &str| MediaError::Open {
        url: shown.to_owned(),
        reason: reason.to_owned(),
    };
    let path = std::ffi::CString::new(url).map_err(|_| failed("the URL holds a NUL byte"))?;
    // SAFETY: what ffmpeg-next's input_with_interrupt_and_dictionary does, less the probe: a
    // fresh context gets the interrupt callback (whose closure the guard keeps alive as long
    // as the wrapped context); avformat_open_input frees the context itself when it fails.
    unsafe {
        let mut ctx = ff::ffi::avformat_alloc_context();
        if ctx.is_null() {
            return Err(failed("out of memory"));
        }
        let callback = ff::util::interrupt::new(Box::new(interrupt.callback()));
        (*ctx).interrupt_callback = callback.interrupt;
        let r = ff::ffi::avformat_open_input(
            &mut ctx,
            path.as_ptr(),
            std::ptr::null(),
            std::ptr::null_mut(),
        );
        if r < 0 {
            return Err(open_error(ff::Error::from(r), shown, interrupt, timeout));
        }
        Ok(ff::format::context::Input::wrap_with_interrupt(
            ctx,
            callback.guard,
        ))
    }
}

fn open_error(e: ff::Error, url: &str, interrupt: &Interrupt, timeout: Duration) -> MediaError {
    // Some demuxers (RTSP) turn an interrupted read into "invalid data": the interrupt's
    // own state says what really happened.
    if interrupt.stopped() {
        return MediaError::Stopped;
    }
    if interrupt.expired() {
        return MediaError::TimedOut {
            url: url.to_owned(),
            secs: timeout.as_secs_f64(),
        };
    }
    match e {
        ff::Error::Exit => MediaError::TimedOut {
            url: url.to_owned(),
            secs: timeout.as_secs_f64(),
        },
        ff::Error::HttpNotFound => MediaError::NotFound {
            url: url.to_owned(),
        },
        ff::Error::StreamNotFound => MediaError::NoVideo {
            url: url.to_owned(),
        },
        other => MediaError::Open {
            url: url.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// A single-threaded decoder fed one keyframe at a time.
pub struct KeyDecoder {
    dec: ff::decoder::Video,
    frame: ff::frame::Video,
    url: String,
}

impl KeyDecoder {
    /// `keyframes_only`: the decoder will only ever see keyframes, so it may hand each picture
    /// out at once (no reordering delay) and keep its state between them.
    pub fn new(input: &Input, keyframes_only: bool) -> Result<KeyDecoder, MediaError> {
        let err = |reason: String| MediaError::Decode {
            url: input.url.clone(),
            reason,
        };
        let params = input
            .parameters()
            .ok_or_else(|| err("the video stream went away".into()))?;
        let mut ctx =
            ff::codec::context::Context::from_parameters(params).map_err(|e| err(e.to_string()))?;
        // One thread per stream: many streams share the cores, and frame threading would
        // hold back the one frame we feed.
        ctx.set_threading(threading::Config {
            kind: threading::Type::Slice,
            count: 1,
            ..Default::default()
        });
        if keyframes_only {
            ctx.set_flags(ff::codec::Flags::LOW_DELAY);
        }
        let dec = ctx.decoder().video().map_err(|e| err(e.to_string()))?;
        Ok(KeyDecoder {
            dec,
            frame: ff::frame::Video::empty(),
            url: input.url.clone(),
        })
    }

    /// A keyframe decoder for `codec` built from its configuration record (`extradata`: an
    /// H.264 `avcC` as FLV's sequence header carries it) instead of an open demuxer: what the
    /// RTMP engine uses, so no session holds an FFmpeg format context.
    pub fn from_config(
        codec: ff::codec::Id,
        extradata: &[u8],
        url: &str,
    ) -> Result<KeyDecoder, MediaError> {
        init();
        let err = |reason: String| MediaError::Decode {
            url: url.to_owned(),
            reason,
        };
        let found = ff::decoder::find(codec)
            .ok_or_else(|| err(format!("this FFmpeg has no {codec:?} decoder")))?;
        let mut ctx = ff::codec::context::Context::new_with_codec(found);
        if !extradata.is_empty() {
            let len = i32::try_from(extradata.len())
                .map_err(|_| err("the codec configuration is too large".into()))?;
            // SAFETY: the context is ours and not open; FFmpeg wants extradata from av_malloc
            // with zeroed padding after it, and frees it with the context.
            unsafe {
                let padding = ff::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
                let p = ff::ffi::av_mallocz(extradata.len() + padding) as *mut u8;
                if p.is_null() {
                    return Err(err("out of memory".into()));
                }
                std::ptr::copy_nonoverlapping(extradata.as_ptr(), p, extradata.len());
                let raw = ctx.as_mut_ptr();
                (*raw).extradata = p;
                (*raw).extradata_size = len;
            }
        }
        ctx.set_threading(threading::Config {
            kind: threading::Type::Slice,
            count: 1,
            ..Default::default()
        });
        ctx.set_flags(ff::codec::Flags::LOW_DELAY);
        let dec = ctx.decoder().video().map_err(|e| err(e.to_string()))?;
        Ok(KeyDecoder {
            dec,
            frame: ff::frame::Video::empty(),
            url: url.to_owned(),
        })
    }

    /// Skips the in-loop deblocking (and HEVC's SAO) filter on the pictures decoded from now
    /// on. A keyframe decoded on its own is the only picture made from it, so the filter only
    /// smooths block edges of the snapshot: it predicts nothing that is kept.
    pub fn skip_loop_filter(&mut self, skip: bool) {
        let discard = if skip {
            ff::ffi::AVDiscard::AVDISCARD_ALL
        } else {
            ff::ffi::AVDiscard::AVDISCARD_DEFAULT
        };
        // SAFETY: the decoder's live codec context, owned by `self.dec`; the field is read by
        // the decoder per picture, so setting it between packets is what it is for.
        unsafe { (*self.dec.as_mut_ptr()).skip_loop_filter = discard };
    }

    fn err(&self, reason: impl Into<String>) -> MediaError {
        MediaError::Decode {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    /// Decodes one keyframe packet on its own. A low-delay decoder gives the picture at once;
    /// otherwise the decoder is drained and reset (which frees and rebuilds its tables, so it
    /// is the slow path).
    pub fn keyframe(&mut self, pkt: &ff::Packet) -> Result<&ff::frame::Video, MediaError> {
        if let Err(e) = self.dec.send_packet(pkt) {
            self.dec.flush();
            return Err(self.err(e.to_string()));
        }
        if self.dec.receive_frame(&mut self.frame).is_ok() {
            return Ok(&self.frame);
        }
        let _ = self.dec.send_eof();
        let got = self.dec.receive_frame(&mut self.frame);
        self.dec.flush();
        got.map_err(|e| self.err(format!("the keyframe gave no picture ({e})")))?;
        Ok(&self.frame)
    }

    /// Feeds a packet of a continuous decode; returns a decoded frame if one is ready.
    pub fn feed(&mut self, pkt: &ff::Packet) -> Result<Option<&ff::frame::Video>, MediaError> {
        match self.dec.send_packet(pkt) {
            Ok(())
            | Err(ff::Error::Other {
                errno: ff::util::error::EAGAIN,
            }) => {}
            Err(e) => return Err(self.err(e.to_string())),
        }
        Ok(self
            .dec
            .receive_frame(&mut self.frame)
            .ok()
            .map(|_| &self.frame))
    }

    /// Ends a continuous decode; returns the next held-back frame, if any.
    pub fn drain(&mut self) -> Option<&ff::frame::Video> {
        let _ = self.dec.send_eof();
        self.dec
            .receive_frame(&mut self.frame)
            .ok()
            .map(|_| &self.frame)
    }
}

/// Output image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Jpeg,
    Png,
    Webp,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Webp => "image/webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Jpeg => "jpg",
            Format::Png => "png",
            Format::Webp => "webp",
        }
    }

    fn pixel(self) -> Pixel {
        match self {
            Format::Jpeg => Pixel::YUVJ420P,
            Format::Png => Pixel::RGB24,
            Format::Webp => Pixel::YUV420P,
        }
    }
}

/// An encoded picture.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub data: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Scales and encodes frames; keeps its scaler and encoder while the size stays the same.
pub struct FrameEncoder {
    format: Format,
    quality: u8,
    max_width: Option<u32>,
    scaler: Option<(ScaleKey, scaling::Context)>,
    scaled: ff::frame::Video,
    encoder: Option<((u32, u32), ff::encoder::Video)>,
    jpeg: Yuv420Jpeg,
    packet: ff::Packet,
    /// Encoders want rising timestamps.
    next_pts: i64,
}

type ScaleKey = (Pixel, u32, u32, u32, u32);

impl FrameEncoder {
    pub fn new(format: Format, quality: u8, max_width: Option<u32>) -> FrameEncoder {
        init();
        FrameEncoder {
            format,
            quality: quality.clamp(1, 100),
            max_width,
            scaler: None,
            scaled: ff::frame::Video::empty(),
            encoder: None,
            jpeg: Yuv420Jpeg::default(),
            packet: ff::Packet::empty(),
            next_pts: 0,
        }
    }

    /// The output size for a `w`×`h` source: no wider than `max_width`, even sides (4:2:0).
    pub fn target_size(&self, w: u32, h: u32) -> (u32, u32) {
        let (mut tw, mut th) = (w, h);
        if let Some(max) = self.max_width.filter(|m| *m < w) {
            tw = max;
            th = ((u64::from(h) * u64::from(max) + u64::from(w) / 2) / u64::from(w.max(1))) as u32;
        }
        ((tw & !1).max(2), (th & !1).max(2))
    }

    pub fn encode(&mut self, frame: &ff::frame::Video) -> Result<Encoded, MediaError> {
        let (w, h) = (frame.width(), frame.height());
        if w == 0 || h == 0 {
            return Err(MediaError::Encode("the decoded frame is empty".into()));
        }
        let (tw, th) = self.target_size(w, h);
        if self.format == Format::Jpeg {
            return self.encode_jpeg(frame, tw, th);
        }
        self.scale(frame, tw, th)?;
        if self.encoder.as_ref().map(|(size, _)| *size) != Some((tw, th)) {
            self.encoder = Some(((tw, th), self.open_encoder(tw, th)?));
        }
        self.scaled.set_pts(Some(self.next_pts));
        self.next_pts += 1;
        let Some((_, enc)) = self.encoder.as_mut() else {
            return Err(MediaError::Encode("no encoder".into()));
        };
        enc.send_frame(&self.scaled)
            .map_err(|e| MediaError::Encode(format!("the encoder took no frame: {e}")))?;
        let got = enc.receive_packet(&mut self.packet);
        if got.is_err() {
            // Encoders that hold frames back give them up on EOF; then they must be rebuilt.
            let _ = enc.send_eof();
            let again = enc.receive_packet(&mut self.packet);
            self.encoder = None;
            again.map_err(|e| MediaError::Encode(format!("the encoder gave no picture: {e}")))?;
        }
        let data = self.packet.data().map(<[u8]>::to_vec).unwrap_or_default();
        if data.is_empty() {
            return Err(MediaError::Encode(
                "the encoder gave an empty picture".into(),
            ));
        }
        Ok(Encoded {
            data,
            width: tw,
            height: th,
        })
    }

    /// `frame` resized to `tw`×`th` in the format's pixel layout, into `self.scaled`.
    fn scale(&mut self, frame: &ff::frame::Video, tw: u32, th: u32) -> Result<(), MediaError> {
        let (w, h) = (frame.width(), frame.height());
        let dst = self.format.pixel();
        let key: ScaleKey = (frame.format(), w, h, tw, th);
        if self.scaler.as_ref().map(|(k, _)| *k) != Some(key) {
            let flags = if tw < w {
                scaling::Flags::AREA
            } else {
                scaling::Flags::BILINEAR
            };
            let ctx = scaling::Context::get(frame.format(), w, h, dst, tw, th, flags)
                .map_err(|e| MediaError::Encode(format!("no scaler for this frame: {e}")))?;
            self.scaler = Some((key, ctx));
            self.scaled = ff::frame::Video::new(dst, tw, th);
        }
        if let Some((_, scaler)) = self.scaler.as_mut() {
            scaler
                .run(frame, &mut self.scaled)
                .map_err(|e| MediaError::Encode(format!("scaling failed: {e}")))?;
        }
        Ok(())
    }

    /// JPEG straight from an 8-bit 4:2:0 frame of the right size (its range expanded on the
    /// way), else from swscale's full-range 4:2:0 copy.
    fn encode_jpeg(
        &mut self,
        frame: &ff::frame::Video,
        tw: u32,
        th: u32,
    ) -> Result<Encoded, MediaError> {
        let as_is = (frame.width(), frame.height()) == (tw, th)
            && matches!(frame.format(), Pixel::YUV420P | Pixel::YUVJ420P);
        let (picture, range) = if as_is {
            let full =
                frame.format() == Pixel::YUVJ420P || frame.color_range() == ff::color::Range::JPEG;
            (frame, if full { Range::Full } else { Range::Limited })
        } else {
            self.scale(frame, tw, th)?;
            (&self.scaled, Range::Full)
        };
        let planes = [0, 1, 2].map(|i| Plane {
            data: picture.data(i),
            stride: picture.stride(i),
            width: picture.plane_width(i) as usize,
            height: picture.plane_height(i) as usize,
        });
        let data = self
            .jpeg
            .encode(planes, range, tw as usize, th as usize, self.quality)
            .map_err(MediaError::Encode)?;
        Ok(Encoded {
            data,
            width: tw,
            height: th,
        })
    }

    fn open_encoder(&self, w: u32, h: u32) -> Result<ff::encoder::Video, MediaError> {
        let e = |what: &str, err: ff::Error| MediaError::Encode(format!("{what}: {err}"));
        let codec = match self.format {
            Format::Jpeg => None,
            Format::Png => ff::encoder::find(ff::codec::Id::PNG),
            Format::Webp => ff::encoder::find_by_name("libwebp"),
        }
        .ok_or_else(|| {
            MediaError::Encode(format!("this FFmpeg has no {:?} encoder", self.format))
        })?;
        let mut ctx = ff::codec::context::Context::new_with_codec(codec);
        ctx.set_threading(threading::Config {
            kind: threading::Type::Slice,
            count: 1,
            ..Default::default()
        });
        let mut enc = ctx.encoder().video().map_err(|err| e("encoder", err))?;
        enc.set_width(w);
        enc.set_height(h);
        enc.set_format(self.format.pixel());
        enc.set_time_base((1, 25));
        let mut opts = ff::Dictionary::new();
        match self.format {
            Format::Webp => {
                opts.set("quality", &self.quality.to_string());
                opts.set("lossless", "0");
            }
            Format::Png | Format::Jpeg => {}
        }
        enc.open_as_with(codec, opts)
            .map_err(|err| e("cannot open the encoder", err))
    }
}

/// What an output picture should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeSpec {
    pub format: Format,
    pub quality: u8,
    pub max_width: Option<u32>,
}

// SAFETY: FFmpeg's scaler and codec contexts may be used from any thread, one at a time; the
// pool below hands each encoder to one user at a time.
unsafe impl Send for FrameEncoder {}

/// Scalers and encoders shared by every session and capture of the process. Encoding runs
/// inside a CPU gate slot, so about one encoder per core is in use at once: memory for them
/// no longer grows with the number of sessions (the padded planes of a 1080p JPEG encode, or
/// a PNG or WebP encoder, hold megabytes each).
pub struct EncoderPool {
    free: Mutex<Vec<(EncodeSpec, FrameEncoder)>>,
    keep: usize,
}

impl EncoderPool {
    pub fn global() -> &'static EncoderPool {
        static POOL: OnceLock<EncoderPool> = OnceLock::new();
        POOL.get_or_init(|| EncoderPool {
            free: Mutex::new(Vec::new()),
            keep: 2 * std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }

    pub fn encode(
        &self,
        spec: EncodeSpec,
        frame: &ff::frame::Video,
    ) -> Result<Encoded, MediaError> {
        let found = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.iter()
                .position(|(s, _)| *s == spec)
                .map(|i| free.swap_remove(i).1)
        };
        let mut enc =
            found.unwrap_or_else(|| FrameEncoder::new(spec.format, spec.quality, spec.max_width));
        let out = enc.encode(frame);
        if out.is_ok() {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() >= self.keep {
                free.remove(0);
            }
            free.push((spec, enc));
        }
        out
    }
}

/// The URL with any password hidden, for messages.
pub fn shown(url: &str) -> String {
    mediafarm::backend::redact(url)
}

/// Whether a kind of source is live (no seeking, ticks follow the stream as it comes).
pub fn is_live(kind: SourceKind) -> bool {
    kind != SourceKind::File
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// An H.264 MP4 with B-frames (so its keyframes carry a composition offset), a keyframe
    /// every second, and an audio track, made with the ffmpeg CLI.
    fn mp4_with_b_frames(dir: &Path) -> PathBuf {
        let path = dir.join("b-frames.mp4");
        let status = std::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30"])
            .args(["-f", "lavfi", "-i", "sine", "-t", "6"])
            .args([
                "-c:v", "libx264", "-preset", "veryfast", "-bf", "3", "-g", "30",
            ])
            .args([
                "-keyint_min",
                "30",
                "-sc_threshold",
                "0",
                "-pix_fmt",
                "yuv420p",
            ])
            .args(["-c:a", "aac"])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .status()
            .expect("ffmpeg runs (scripts/setup.d/snapshot.sh installs it)");
        assert!(status.success());
        path
    }

    /// `url` opened with FFmpeg's full probe (it decodes a picture).
    fn open_probed(url: &str) -> Input {
        let interrupt = Interrupt::new(Arc::new(AtomicBool::new(false)));
        interrupt.arm(Duration::from_secs(30));
        let timeout = Duration::from_secs(30);
        init();
        let ctx = open_context(url, url, SourceKind::File, &interrupt, timeout).unwrap();
        Input::from_context(ctx, url, &interrupt, timeout).unwrap()
    }

    /// (keyframe pts, video packets read) to the end of the file.
    fn keyframes(input: &mut Input) -> (Vec<i64>, usize) {
        let mut pkt = ff::Packet::empty();
        let (mut keys, mut read) = (Vec::new(), 0);
        loop {
            match input.read(&mut pkt).unwrap() {
                Read::Video => {
                    read += 1;
                    if pkt.is_key() {
                        keys.push(pkt.pts().unwrap());
                    }
                }
                Read::Other => {}
                Read::Eof => return (keys, read),
            }
        }
    }

    #[test]
    fn mp4_keyframes_read_by_seeking_keep_their_presentation_times() {
        let dir = std::env::temp_dir().join(format!("snapshot-media-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = mp4_with_b_frames(&dir).display().to_string();

        // The full probe (it decodes a picture) and every packet read: the reference.
        let mut plain = open_probed(&url);
        let (want, all) = keyframes(&mut plain);
        assert_eq!(want.len(), 6, "{want:?}");

        // What a watch session does: the header alone (no probe), keyframes only.
        let mut input = Input::open(
            &url,
            &url,
            SourceKind::File,
            &plain.interrupt,
            Duration::from_secs(30),
        )
        .unwrap();
        // SAFETY: the open inputs' own codec parameters.
        let format = |i: &Input| unsafe { (*i.parameters().unwrap().as_ptr()).format };
        assert_eq!(format(&input), -1, "opened without the probe's decode");
        assert_ne!(format(&plain), -1);
        assert_eq!(input.start_s(), plain.start_s());
        assert_eq!(input.duration_s(), plain.duration_s());
        assert_eq!(input.time_base, plain.time_base);
        // What the decoders are made from: the same as after the probe.
        // SAFETY: as above.
        let decoding = |i: &Input| unsafe {
            let p = &*i.parameters().unwrap().as_ptr();
            let extra = std::slice::from_raw_parts(p.extradata, p.extradata_size as usize);
            (p.codec_id, p.width, p.height, p.video_delay, extra.to_vec())
        };
        assert_eq!(decoding(&input), decoding(&plain));
        input.keep_only_video_keyframes();
        let (got, read) = keyframes(&mut input);
        assert_eq!(got, want, "keyframes at their true times");
        // Only the keyframes, plus the pictures after the last one (the end of the index).
        assert!(read < 6 + 30, "{read} of {all} packets read");
        assert!(all > 170, "{all}");

        // A looped file starts over with keyframes only again.
        input.seek(0.0).unwrap();
        let (again, read_again) = keyframes(&mut input);
        assert_eq!((again, read_again), (want, read));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_files_named_mp4_skip_the_probe_decode() {
        assert!(mp4_named("file:///srv/a/room.MP4"));
        assert!(mp4_named("/srv/a/room.mov?x=1"));
        assert!(!mp4_named("file:///srv/a/room.ts"));
        assert!(!mp4_named("file:///srv/a.mp4/room"));
    }
}
