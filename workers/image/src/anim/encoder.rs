//! libwebp's `WebPAnimEncoder` behind a safe wrapper: frames go in one at a time (8-bit RGB
//! or RGBA, each the animation's size) with their durations, one animated WebP comes out.
//!
//! The encoder holds three canvases of the output's size (the frame as given, the previous
//! one and the previous one disposed), the candidates it encodes for each frame (sub-rectangle
//! or whole, dispose none or background) and the encoded frames so far — never the source's
//! frames. Identical consecutive frames are merged into one, their durations added (libwebp's
//! choice: the file plays the same).

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::ptr::{self, NonNull};

use image::DynamicImage;
use libwebp_sys as sys;
use mediafarm::TaskError;

fn failed(message: impl std::fmt::Display) -> TaskError {
    TaskError::permanent("EncodeError", format!("animated WebP: {message}"))
}

/// WebP's largest side.
pub const MAX_SIDE: u32 = 16_383;

/// Bytes the encoder holds besides the encoded frames, for an output of `(w, h)`: its three
/// ARGB canvases, the frame's ARGB copy handed to it, and each frame's encode (the lossy
/// encoder's YUV picture and per-macroblock state, or the lossless encoder's transform and
/// hash buffers, a few times the ARGB picture), for the two candidates it tries.
pub fn held_bytes((w, h): (u32, u32), lossless: bool) -> u64 {
    let argb = u64::from(w) * u64::from(h) * 4;
    let per_encode = if lossless { 4 * argb } else { argb };
    4 * argb + 2 * per_encode
}

/// One animated WebP being encoded.
pub struct AnimEncoder {
    enc: NonNull<sys::WebPAnimEncoder>,
    config: sys::WebPConfig,
    size: (u32, u32),
    /// Where the next frame starts, in milliseconds.
    timestamp: i32,
}

impl AnimEncoder {
    /// An encoder for frames of `size`, played `loop_count` times (0: for ever), at `quality`
    /// (1–100), lossy or lossless.
    pub fn new(
        size: (u32, u32),
        loop_count: u32,
        quality: u8,
        lossless: bool,
    ) -> Result<AnimEncoder, TaskError> {
        if size.0 == 0 || size.1 == 0 || size.0 > MAX_SIDE || size.1 > MAX_SIDE {
            return Err(TaskError::invalid(
                "OutputTooLarge",
                format!(
                    "an animated WebP of {}×{} cannot be made: its sides are 1 to {MAX_SIDE} \
                     pixels",
                    size.0, size.1
                ),
            ));
        }
        let mut options = MaybeUninit::<sys::WebPAnimEncoderOptions>::zeroed();
        // SAFETY: libwebp writes the defaults into `options` (zeroed, so initialised either way).
        let ok = unsafe {
            sys::WebPAnimEncoderOptionsInitInternal(
                options.as_mut_ptr(),
                sys::WEBP_MUX_ABI_VERSION as i32,
            )
        };
        if ok == 0 {
            return Err(failed("libwebp's mux library does not match its headers"));
        }
        // SAFETY: zeroed, then filled by the successful call.
        let mut options = unsafe { options.assume_init() };
        // WebP stores the count in 16 bits; more is for ever in practice.
        options.anim_params.loop_count = loop_count.min(65_535) as i32;
        // Transparent, as the source frames are composed (players ignore it anyway).
        options.anim_params.bgcolor = 0;
        // SAFETY: `options` is valid for the call; the encoder copies it.
        let enc = unsafe {
            sys::WebPAnimEncoderNewInternal(
                size.0 as i32,
                size.1 as i32,
                &options,
                sys::WEBP_MUX_ABI_VERSION as i32,
            )
        };
        let enc = NonNull::new(enc)
            .ok_or_else(|| failed("libwebp could not start an encoder (out of memory)"))?;
        let mut config = MaybeUninit::<sys::WebPConfig>::zeroed();
        // SAFETY: libwebp writes its defaults into `config`.
        let ok = unsafe {
            sys::WebPConfigInitInternal(
                config.as_mut_ptr(),
                sys::WebPPreset::WEBP_PRESET_DEFAULT,
                f32::from(quality),
                sys::WEBP_ENCODER_ABI_VERSION as i32,
            )
        };
        // Built before the check so that `enc` is deleted on the way out.
        let mut this = AnimEncoder {
            enc,
            // SAFETY: zeroed, and filled when `ok`; not used otherwise.
            config: unsafe { config.assume_init() },
            size,
            timestamp: 0,
        };
        if ok == 0 {
            return Err(failed("libwebp's encoder does not match its headers"));
        }
        this.config.lossless = i32::from(lossless);
        this.config.quality = f32::from(quality);
        Ok(this)
    }

    fn error(&self, what: &str) -> TaskError {
        // SAFETY: the encoder is alive; the text it returns lives as long as it does and is
        // copied here.
        let text = unsafe {
            let p = sys::WebPAnimEncoderGetError(self.enc.as_ptr());
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        failed(format!("{what}: {text}"))
    }

    /// Adds `frame` (8-bit RGB or RGBA, the encoder's size), shown for `duration_ms`.
    pub fn add(&mut self, frame: &DynamicImage, duration_ms: u32) -> Result<(), TaskError> {
        if (frame.width(), frame.height()) != self.size {
            return Err(failed(format!(
                "a {}×{} frame for a {}×{} animation",
                frame.width(),
                frame.height(),
                self.size.0,
                self.size.1
            )));
        }
        let mut pic = MaybeUninit::<sys::WebPPicture>::zeroed();
        // SAFETY: libwebp initialises `pic` (zeroed before).
        if unsafe {
            sys::WebPPictureInitInternal(pic.as_mut_ptr(), sys::WEBP_ENCODER_ABI_VERSION as i32)
        } == 0
        {
            return Err(failed("libwebp's encoder does not match its headers"));
        }
        // SAFETY: initialised by the call above.
        let mut pic = unsafe { pic.assume_init() };
        pic.use_argb = 1;
        pic.width = self.size.0 as i32;
        pic.height = self.size.1 as i32;
        // SAFETY: the pixels are read within `stride × height` bytes, which the image holds;
        // the import allocates the picture's own ARGB copy, freed below whatever happens.
        let ok = unsafe {
            match frame {
                DynamicImage::ImageRgba8(rgba) => sys::WebPPictureImportRGBA(
                    &mut pic,
                    rgba.as_raw().as_ptr(),
                    self.size.0 as i32 * 4,
                ),
                DynamicImage::ImageRgb8(rgb) => sys::WebPPictureImportRGB(
                    &mut pic,
                    rgb.as_raw().as_ptr(),
                    self.size.0 as i32 * 3,
                ),
                _ => 0,
            }
        };
        if ok == 0 {
            // SAFETY: frees what the import allocated, if anything.
            unsafe { sys::WebPPictureFree(&mut pic) };
            return Err(failed(
                "frames must be 8-bit RGB or RGBA (or memory ran out)",
            ));
        }
        // SAFETY: the encoder and the picture are alive; the encoder copies the picture.
        let ok = unsafe {
            let ok =
                sys::WebPAnimEncoderAdd(self.enc.as_ptr(), &mut pic, self.timestamp, &self.config);
            sys::WebPPictureFree(&mut pic);
            ok
        };
        if ok == 0 {
            return Err(self.error("adding a frame"));
        }
        self.timestamp = i32::try_from(duration_ms)
            .ok()
            .and_then(|d| self.timestamp.checked_add(d))
            .ok_or_else(|| {
                TaskError::invalid(
                    "InvalidImage",
                    "the animation plays for more than 24 days; WebP timestamps cannot hold it",
                )
            })?;
        Ok(())
    }

    /// The animated WebP file, the last frame lasting until the time given by its duration.
    pub fn finish(self) -> Result<Vec<u8>, TaskError> {
        let mut data = sys::WebPData::default();
        // SAFETY: the encoder is alive; `data` receives a buffer libwebp allocated, copied
        // here and freed with `WebPDataClear`.
        unsafe {
            if sys::WebPAnimEncoderAdd(
                self.enc.as_ptr(),
                ptr::null_mut(),
                self.timestamp,
                ptr::null(),
            ) == 0
            {
                return Err(self.error("ending the animation"));
            }
            if sys::WebPAnimEncoderAssemble(self.enc.as_ptr(), &mut data) == 0 {
                return Err(self.error("assembling the file"));
            }
            // The file no longer needs the encoder nor its copy of the encoded frames: freed
            // (by `Drop`) before the file is copied out, so at most two copies exist at once.
            drop(self);
            // glibc keeps freed heap pages resident; the encoded frames were many of them.
            libc::malloc_trim(0);
            let out = std::slice::from_raw_parts(data.bytes, data.size).to_vec();
            sys::WebPDataClear(&mut data);
            Ok(out)
        }
    }
}

impl Drop for AnimEncoder {
    fn drop(&mut self) {
        // SAFETY: created by `WebPAnimEncoderNewInternal`, deleted once.
        unsafe { sys::WebPAnimEncoderDelete(self.enc.as_ptr()) };
    }
}
