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

/// Quietens FFmpeg's own logging (errors only) once per process.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = ff::init();
        ff::util::log::set_level(ff::util::log::Level::Fatal);
    });
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
        let ctx = ff::format::input_with_interrupt_and_dictionary(url, interrupt.callback(), opts)
            .map_err(|e| open_error(e, shown, interrupt, timeout))?;
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
    /// the video's non-key packets too. Not on MP4/MOV: its demuxer then hands later keyframes
    /// the composition offset of a skipped sample (a 4.0 s keyframe read as 4.1 s), and the
    /// other demuxers (MPEG-TS, RTSP) ignore it.
    pub fn keep_only_video_keyframes(&mut self) {
        let flv = self
            .ctx
            .format()
            .name()
            .split(',')
            .any(|n| n == "flv" || n == "live_flv");
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
        match pkt.read(&mut self.ctx) {
            Ok(()) if pkt.stream() == self.video => Ok(Read::Video),
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
        let ts = ((secs + self.start_s) * f64::from(ff::ffi::AV_TIME_BASE)) as i64;
        self.ctx.seek(ts, ..ts + 1).map_err(|e| MediaError::Read {
            url: self.url.clone(),
            reason: format!("cannot seek to {secs} s: {e}"),
        })
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
