//! HEIF sources — HEIC (iPhone photos, HEVC inside) and AVIF (AV1 inside) — through Debian's
//! libheif (HEVC by libde265, AV1 by dav1d or libaom). The few calls needed are declared here
//! against libheif 1.15's C API, Debian 12's version: the maintained Rust binding
//! (`libheif-rs`) needs 1.17 or newer, which Debian 12 does not ship.
//!
//! The file's boxes are parsed first (no pixel decoded) to check the size as shown — after the
//! clean-aperture crop, rotation and mirroring boxes, which libheif applies itself and the
//! direct decode crops while converting and turns per output — against
//! `image_max_src_pixels`; only then is the primary image decoded, in the codec's own planes
//! (YCbCr as coded), which `yuv.rs` turns into 8-bit RGB(A) a row at a time as the rows are
//! shrunk. The ICC profile is kept; the EXIF block is kept with its orientation reset, since
//! in HEIF the `irot`/`imir` boxes, already applied, are what turns the picture.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;

use image::metadata::Orientation;
use image::DynamicImage;

use crate::heif_items::{self, Plan};
use crate::shrink::{BoxShrink, Layout};
use crate::{de265, yuv};

/// The brands of the `ftyp` box that name a HEIF image file, and the format each is.
const BRANDS: [(&[u8; 4], Kind); 8] = [
    (b"heic", Kind::Heic),
    (b"heix", Kind::Heic),
    (b"heim", Kind::Heic),
    (b"heis", Kind::Heic),
    (b"avif", Kind::Avif),
    (b"avis", Kind::Avif),
    (b"mif1", Kind::Heif),
    (b"msf1", Kind::Heif),
];

/// Which HEIF flavour a file says it is (the name in job results and errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Heic,
    Avif,
    /// A HEIF file whose brands name neither codec (`mif1` only).
    Heif,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Heic => "heic",
            Kind::Avif => "avif",
            Kind::Heif => "heif",
        }
    }
}

/// The HEIF flavour of `data` from its `ftyp` box (major brand first, then the compatible
/// ones), or `None` when it is not a HEIF file.
pub fn sniff(data: &[u8]) -> Option<Kind> {
    if data.len() < 16 || &data[4..8] != b"ftyp" {
        return None;
    }
    let size = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let end = size.clamp(16, data.len().min(256));
    let brands = || std::iter::once(&data[8..12]).chain(data[16..end].chunks_exact(4));
    // A codec's brand wins over the generic `mif1` wherever it is listed.
    let kinds = brands().filter_map(|b| BRANDS.iter().find(|(brand, _)| b == *brand));
    kinds
        .map(|(_, kind)| *kind)
        .min_by_key(|kind| *kind == Kind::Heif)
}

/// A HEIF file opened and its primary image's header read; nothing decoded yet.
pub struct Heif<'a> {
    ctx: *mut ffi::Context,
    handle: *const ffi::Handle,
    /// The file; the context reads it in place.
    data: &'a [u8],
    /// Where libde265 decodes the primary image without libheif (`heif_items.rs`), or `None`
    /// when libheif decodes it.
    plan: Option<Plan>,
    /// The sizes as shown and as coded, read from the boxes when they give them.
    sizes: Option<heif_items::Sizes>,
}

/// What the header says, before decoding.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// The size as shown (rotation applied).
    pub width: u32,
    pub height: u32,
    pub alpha: bool,
    /// Bits per luma sample (8, 10, 12).
    pub bits: u32,
}

impl<'a> Heif<'a> {
    /// Parses the file's boxes and finds its primary image.
    pub fn open(data: &'a [u8]) -> Result<Heif<'a>, String> {
        // SAFETY: `heif_context_alloc` has no preconditions; a null return is handled.
        let ctx = unsafe { ffi::heif_context_alloc() };
        if ctx.is_null() {
            return Err("libheif could not allocate a context".into());
        }
        let mut heif = Heif {
            ctx,
            handle: ptr::null(),
            data,
            plan: None,
            sizes: heif_items::sizes(data).ok(),
        };
        // SAFETY: `ctx` is a live context; `data` outlives it (the lifetime on `Heif`), as
        // the "without copy" read requires; null options mean libheif's defaults.
        unsafe {
            // Tiles decode on the calling thread: the worker's bounded CPU pool decides how
            // many decodes run at once, not libheif.
            ffi::heif_context_set_max_decoding_threads(ctx, 0);
            check(ffi::heif_context_read_from_memory_without_copy(
                ctx,
                data.as_ptr().cast(),
                data.len(),
                ptr::null(),
            ))?;
            let mut handle = ptr::null_mut();
            check(ffi::heif_context_get_primary_image_handle(ctx, &mut handle))?;
            heif.handle = handle;
        }
        heif.plan = heif.direct_plan();
        Ok(heif)
    }

    /// The plan for decoding with libde265 directly, when the file's boxes give one that
    /// agrees with what libheif read (size as shown, no alpha, bit depth).
    fn direct_plan(&self) -> Option<Plan> {
        let header = self.header();
        let plan = match heif_items::plan(self.data) {
            Ok(plan) => plan,
            Err(why) => {
                tracing::debug!(reason = why.0, "HEIF image left to libheif");
                return None;
            }
        };
        let shown = plan.shown();
        let bits = match &plan.layout {
            heif_items::Layout::Single(c) => c.bits,
            heif_items::Layout::Grid { tiles, .. } => tiles[0].bits,
        };
        // libheif's own header gives the size shown, or that turned (`irot` listed before
        // `ispe`), or the coded one (`clap` and `irot` listed before `ispe`).
        let (w, h) = self.libheif_size();
        let coded = (plan.width, plan.height);
        let libheif_agrees = [shown, coded].iter().any(|&s| s == (w, h) || s == (h, w));
        let agrees = libheif_agrees
            && shown == (header.width, header.height)
            && !header.alpha
            && bits == header.bits;
        if !agrees {
            tracing::debug!("HEIF boxes disagree with libheif's header; left to libheif");
        }
        agrees.then_some(plan)
    }

    /// The turn still to apply to the decoded picture (`irot`/`imir`), when libde265 decodes
    /// it: libheif applies them itself, the direct decode leaves them to each output
    /// (`orient.rs`), as a JPEG's EXIF orientation is.
    pub fn orientation(&self) -> Option<Orientation> {
        let turn = self.plan.as_ref()?.turn;
        let o = match (turn.quarter, turn.flip) {
            (0, false) => return None,
            (1, false) => Orientation::Rotate90,
            (2, false) => Orientation::Rotate180,
            (3, false) => Orientation::Rotate270,
            (0, true) => Orientation::FlipHorizontal,
            (1, true) => Orientation::Rotate90FlipH,
            (2, true) => Orientation::FlipVertical,
            _ => Orientation::Rotate270FlipH,
        };
        Some(o)
    }

    /// Whether libde265 decodes the primary image directly (else libheif does).
    pub fn is_direct(&self) -> bool {
        self.plan.is_some()
    }

    /// Bytes the decode holds besides the box shrink's output: libde265's picture and
    /// metadata, whole even when a `clap` shows part of it (one tile's, plus a band of RGB
    /// rows a tile high and as wide as what is shown, for a grid), or what libheif holds
    /// ([`decode_bytes`], for the picture as coded when a `clap` crops it).
    pub fn decode_bytes(&self) -> u64 {
        match self.plan.as_ref().map(|p| (p, &p.layout)) {
            Some((_, heif_items::Layout::Single(c))) => {
                de265::decode_bytes(c.coded.0, c.coded.1, c.bits, c.chroma)
            }
            Some((plan, heif_items::Layout::Grid { tiles, tile, .. })) => {
                let t = &tiles[0];
                de265::decode_bytes(t.coded.0, t.coded.1, t.bits, t.chroma)
                    + u64::from(tile.1) * u64::from(plan.crop.width) * 3
            }
            None => {
                // libheif decodes and converts the whole coded picture before it crops it.
                let mut header = self.header();
                if let Some(heif_items::Sizes { coded: (w, h), .. }) = self.sizes {
                    let pixels = |w: u32, h: u32| u64::from(w) * u64::from(h);
                    if pixels(w, h) > pixels(header.width, header.height) {
                        (header.width, header.height) = (w, h);
                    }
                }
                decode_bytes(&header)
            }
        }
    }

    /// The primary image's header. Its size is the one the boxes give (`clap` crops and
    /// `irot` turns applied in their order) when they give one: libheif 1.15 reports the
    /// unturned size for files that list `irot` before `ispe` (Canon's HIF) and ignores a
    /// `clap` listed before `ispe`, yet decodes the cropped, turned picture.
    pub fn header(&self) -> Header {
        let (width, height) = self.libheif_size();
        // SAFETY: `handle` is the live primary image handle of a live context.
        let mut header = unsafe {
            Header {
                width,
                height,
                alpha: ffi::heif_image_handle_has_alpha_channel(self.handle) != 0,
                bits: ffi::heif_image_handle_get_luma_bits_per_pixel(self.handle).max(0) as u32,
            }
        };
        if let Some(sizes) = self.sizes {
            (header.width, header.height) = sizes.shown;
        }
        header
    }

    /// The size libheif's header gives.
    fn libheif_size(&self) -> (u32, u32) {
        // SAFETY: `handle` is the live primary image handle of a live context.
        unsafe {
            (
                ffi::heif_image_handle_get_width(self.handle).max(0) as u32,
                ffi::heif_image_handle_get_height(self.handle).max(0) as u32,
            )
        }
    }

    /// The embedded ICC profile, if the colour is given as one (not as `nclx` code points).
    pub fn icc(&self) -> Option<Vec<u8>> {
        // SAFETY: a live handle; the buffer has the size libheif reported for the profile.
        unsafe {
            let kind = ffi::heif_image_handle_get_color_profile_type(self.handle);
            if kind != fourcc(b"prof") && kind != fourcc(b"rICC") {
                return None;
            }
            let size = ffi::heif_image_handle_get_raw_color_profile_size(self.handle);
            if size == 0 || size > MAX_METADATA {
                return None;
            }
            let mut icc = vec![0u8; size];
            check(ffi::heif_image_handle_get_raw_color_profile(
                self.handle,
                icc.as_mut_ptr().cast(),
            ))
            .ok()?;
            Some(icc)
        }
    }

    /// The first EXIF block from its TIFF header on (HEIF prefixes it with the offset to that
    /// header), with its orientation reset: libheif has already turned the picture.
    pub fn exif(&self) -> Option<Vec<u8>> {
        let filter = c"Exif";
        // SAFETY: a live handle; `ids` holds as many ids as asked for; the metadata buffer has
        // the size libheif reported for that id.
        let mut block = unsafe {
            let count =
                ffi::heif_image_handle_get_number_of_metadata_blocks(self.handle, filter.as_ptr());
            if count <= 0 {
                return None;
            }
            let mut id = 0u32;
            let got = ffi::heif_image_handle_get_list_of_metadata_block_IDs(
                self.handle,
                filter.as_ptr(),
                &mut id,
                1,
            );
            if got != 1 {
                return None;
            }
            let size = ffi::heif_image_handle_get_metadata_size(self.handle, id);
            if !(4..=MAX_METADATA).contains(&size) {
                return None;
            }
            let mut block = vec![0u8; size];
            check(ffi::heif_image_handle_get_metadata(
                self.handle,
                id,
                block.as_mut_ptr().cast(),
            ))
            .ok()?;
            block
        };
        let offset = u32::from_be_bytes([block[0], block[1], block[2], block[3]]) as usize;
        let start = 4usize.checked_add(offset).filter(|s| *s < block.len())?;
        let mut tiff = block.split_off(start);
        if !(tiff.starts_with(b"II*\0") || tiff.starts_with(b"MM\0*")) {
            return None;
        }
        let _applied: Option<Orientation> = Orientation::remove_from_exif_chunk(&mut tiff);
        Some(tiff)
    }

    /// Decodes the primary image to 8-bit RGB (RGBA when it has alpha), turned as shown and
    /// box-shrunk by `factor` (1: full size; see `shrink.rs`). The picture is taken in the
    /// decoder's own planes (YCbCr as coded, usually 4:2:0) and converted a row at a time as
    /// it is shrunk (`yuv.rs`), so no interleaved copy of the whole picture is made; a matrix or
    /// layout `yuv.rs` does not convert is left to libheif's conversion instead.
    pub fn decode(&self, factor: u32) -> Result<DynamicImage, String> {
        if let Some(plan) = &self.plan {
            return self.decode_direct(plan, factor);
        }
        let img = self.decode_as(ffi::COLORSPACE_UNDEFINED, ffi::CHROMA_UNDEFINED)?;
        if let Some(planes) = native_planes(&img) {
            let mut shrink = BoxShrink::new(
                planes.width() as u32,
                planes.height() as u32,
                factor,
                planes.has_alpha(),
            );
            let layout = if planes.has_alpha() {
                Layout::Rgba
            } else {
                Layout::Rgb
            };
            let mut row = vec![0u8; planes.row_bytes()];
            for y in 0..planes.height() {
                planes.row(y, &mut row);
                shrink.push_row(&row, layout);
            }
            return Ok(shrink.finish());
        }
        drop(img);
        self.decode_interleaved(factor)
    }

    /// The primary image through libde265 directly, not turned (see [`Heif::orientation`]):
    /// its picture's rows converted (`yuv.rs`) and box-shrunk as they are read; a grid's tiles
    /// decoded one at a time, a row of tiles converted into a band of RGB rows a tile high.
    fn decode_direct(&self, plan: &Plan, factor: u32) -> Result<DynamicImage, String> {
        self.decode_tiles(plan, factor).map_err(|e| {
            if e.contains("libde265") {
                e
            } else {
                format!("{e} (decoding with libde265)")
            }
        })
    }

    /// Only the samples within the plan's crop are converted: a `clap` costs no copy.
    fn decode_tiles(&self, plan: &Plan, factor: u32) -> Result<DynamicImage, String> {
        let _mapped = MappedPlanes::new();
        let crop = plan.crop;
        let mut shrink = BoxShrink::new(crop.width, crop.height, factor, false);
        match &plan.layout {
            heif_items::Layout::Single(item) => {
                de265::decode(self.data, item, |planes| {
                    let planes = cut(planes, crop.columns(), crop.rows())?;
                    let mut row = vec![0u8; planes.row_bytes()];
                    for y in 0..planes.height() {
                        planes.row(y, &mut row);
                        shrink.push_row(&row, Layout::Rgb);
                    }
                    Ok::<_, String>(())
                })??;
            }
            heif_items::Layout::Grid {
                rows,
                cols,
                tile,
                tiles,
            } => {
                let (columns, shown_rows) = (crop.columns(), crop.rows());
                let width = columns.len();
                let (tile_w, tile_h) = (tile.0 as usize, tile.1 as usize);
                let mut band = vec![0u8; tile_h * width * 3];
                let overlap = |a: &std::ops::Range<usize>, start: usize, len: usize| {
                    a.start.max(start)..a.end.min(start + len)
                };
                for r in 0..*rows as usize {
                    // The tile row's rows that are shown, in the tiles' own coordinates.
                    let ys = overlap(&shown_rows, r * tile_h, tile_h);
                    if ys.is_empty() {
                        continue;
                    }
                    let ys = ys.start - r * tile_h..ys.end - r * tile_h;
                    for c in 0..*cols as usize {
                        let xs = overlap(&columns, c * tile_w, tile_w);
                        if xs.is_empty() {
                            continue;
                        }
                        // Where the tile's shown columns go in the band.
                        let at = (xs.start - columns.start) * 3;
                        let xs = xs.start - c * tile_w..xs.end - c * tile_w;
                        let item = &tiles[r * *cols as usize + c];
                        de265::decode(self.data, item, |planes| {
                            let planes = cut(planes, xs, ys.clone())?;
                            let n = planes.row_bytes();
                            for y in 0..planes.height() {
                                let start = y * width * 3 + at;
                                planes.row(y, &mut band[start..start + n]);
                            }
                            Ok::<_, String>(())
                        })??;
                    }
                    for y in 0..ys.len() {
                        shrink.push_row(&band[y * width * 3..(y + 1) * width * 3], Layout::Rgb);
                    }
                }
            }
        }
        Ok(shrink.finish())
    }

    /// libheif's own conversion to interleaved 8-bit RGB(A), shrunk as it is copied out.
    fn decode_interleaved(&self, factor: u32) -> Result<DynamicImage, String> {
        let alpha = self.header().alpha;
        let (chroma, channels) = if alpha {
            (ffi::CHROMA_INTERLEAVED_RGBA, 4usize)
        } else {
            (ffi::CHROMA_INTERLEAVED_RGB, 3usize)
        };
        let img = self.decode_as(ffi::COLORSPACE_RGB, chroma)?;
        let (width, height, stride, rows) = match plane(&img, ffi::CHANNEL_INTERLEAVED) {
            Some(p) if p.width * channels <= p.stride => (p.width, p.height, p.stride, p.data),
            _ => return Err("libheif returned no picture".into()),
        };
        // Copied out row by row, box-shrunk on the way when the outputs allow: libheif's
        // picture is already full size, so a second full-size copy is never made.
        let layout = if alpha { Layout::Rgba } else { Layout::Rgb };
        let mut shrink = BoxShrink::new(width as u32, height as u32, factor, alpha);
        for row in rows.chunks(stride).take(height) {
            shrink.push_row(&row[..width * channels], layout);
        }
        Ok(shrink.finish())
    }

    fn decode_as(&self, colorspace: c_int, chroma: c_int) -> Result<Image, String> {
        let mut img = ptr::null_mut();
        let _mapped = MappedPlanes::new();
        // SAFETY: a live handle; null options mean libheif's defaults (transformations
        // applied). On success `img` is a live image released by `Image`'s drop.
        unsafe {
            check(ffi::heif_decode_image(
                self.handle,
                &mut img,
                colorspace,
                chroma,
                ptr::null(),
            ))?;
        }
        if img.is_null() {
            return Err("libheif returned no picture".into());
        }
        let img = Image(img);
        // The outputs are laid out from the header's size: a picture of another size would
        // come out stretched, so it is an error instead.
        // SAFETY: a live decoded image.
        let size = unsafe {
            (
                ffi::heif_image_get_primary_width(img.0),
                ffi::heif_image_get_primary_height(img.0),
            )
        };
        let header = self.header();
        if (i64::from(size.0), i64::from(size.1))
            != (i64::from(header.width), i64::from(header.height))
        {
            return Err(format!(
                "libheif decoded a {}x{} picture where the header gives {}x{}",
                size.0, size.1, header.width, header.height
            ));
        }
        Ok(img)
    }
}

/// The part of a decoded picture within a plan's crop.
fn cut<'a>(
    planes: &yuv::Planes<'a>,
    columns: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
) -> Result<yuv::Planes<'a>, String> {
    planes
        .window(columns, rows)
        .ok_or_else(|| "the clean aperture lies outside the HEVC picture".to_string())
}

/// One channel of a decoded image, or `None` when it has no such plane.
fn plane(img: &Image, channel: c_int) -> Option<yuv::Plane<'_>> {
    let mut stride: c_int = 0;
    // SAFETY: a live decoded image; the plane pointer stays valid while `img` lives (the
    // returned slice borrows it), and libheif allocates `stride * height` bytes for it.
    unsafe {
        let width = ffi::heif_image_get_width(img.0, channel);
        let height = ffi::heif_image_get_height(img.0, channel);
        let data = ffi::heif_image_get_plane_readonly(img.0, channel, &mut stride);
        yuv::Plane::from_c(data, width, height, stride)
    }
}

/// The decoded image's planes, when `yuv.rs` converts their kind: planar RGB (what libheif
/// 1.15 hands back when asked for no particular colour space: it converts the codec's YCbCr to
/// RGB planes itself), or YCbCr and monochrome planes with the matrix they were coded with
/// (libheif's default when no `nclx` is given: BT.601, full range).
fn native_planes(img: &Image) -> Option<yuv::Planes<'_>> {
    // SAFETY: a live decoded image.
    let (colorspace, chroma) = unsafe {
        (
            ffi::heif_image_get_colorspace(img.0),
            ffi::heif_image_get_chroma_format(img.0),
        )
    };
    let alpha = plane(img, ffi::CHANNEL_ALPHA);
    if (colorspace, chroma) == (ffi::COLORSPACE_RGB, ffi::CHROMA_444) {
        // The identity matrix reads G from the luma plane, B and R from the chroma ones.
        return yuv::Planes::new(
            bits(img, ffi::CHANNEL_G)?,
            yuv::Subsampling::S444,
            yuv::Matrix::from_nclx(0, true)?,
            plane(img, ffi::CHANNEL_G)?,
            Some((plane(img, ffi::CHANNEL_B)?, plane(img, ffi::CHANNEL_R)?)),
            alpha,
        );
    }
    let subsampling = match (colorspace, chroma) {
        (ffi::COLORSPACE_MONOCHROME | ffi::COLORSPACE_YCBCR, ffi::CHROMA_MONOCHROME) => {
            yuv::Subsampling::Monochrome
        }
        (ffi::COLORSPACE_YCBCR, ffi::CHROMA_420) => yuv::Subsampling::S420,
        (ffi::COLORSPACE_YCBCR, ffi::CHROMA_422) => yuv::Subsampling::S422,
        (ffi::COLORSPACE_YCBCR, ffi::CHROMA_444) => yuv::Subsampling::S444,
        _ => return None,
    };
    // SAFETY: a live decoded image; the profile, when returned, is read and freed here.
    let nclx = unsafe {
        let mut profile = ptr::null_mut();
        let found = ffi::heif_image_get_nclx_color_profile(img.0, &mut profile);
        if found.code == 0 && !profile.is_null() {
            let p = &*profile;
            let read = (p.matrix_coefficients as u32, p.full_range_flag != 0);
            ffi::heif_nclx_color_profile_free(profile);
            Some(read)
        } else {
            None
        }
    };
    let (matrix_coefficients, full_range) = nclx.unwrap_or((6, true));
    let chroma_planes = match subsampling {
        yuv::Subsampling::Monochrome => None,
        _ => Some((plane(img, ffi::CHANNEL_CB)?, plane(img, ffi::CHANNEL_CR)?)),
    };
    yuv::Planes::new(
        bits(img, ffi::CHANNEL_Y)?,
        subsampling,
        yuv::Matrix::from_nclx(matrix_coefficients, full_range)?,
        plane(img, ffi::CHANNEL_Y)?,
        chroma_planes,
        alpha,
    )
}

/// Bits a sample of `channel` uses, when it has the plane.
fn bits(img: &Image, channel: c_int) -> Option<u32> {
    // SAFETY: a live decoded image; a channel it lacks gives a negative or odd value.
    let bits = unsafe { ffi::heif_image_get_bits_per_pixel_range(img.0, channel) };
    u32::try_from(bits).ok().filter(|b| (8..=16).contains(b))
}

impl Drop for Heif<'_> {
    fn drop(&mut self) {
        // SAFETY: each pointer is either null or owned by this value and released once.
        unsafe {
            if !self.handle.is_null() {
                ffi::heif_image_handle_release(self.handle);
            }
            ffi::heif_context_free(self.ctx);
        }
    }
}

/// A decoded libheif image, released when dropped.
struct Image(*mut ffi::Image);

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: a live image from `heif_decode_image`, released once.
        unsafe { ffi::heif_image_release(self.0) }
    }
}

/// glibc's mmap threshold while libheif decodes: its default, so every plane (4–48 MiB) is
/// mapped on its own and unmapped when freed.
const DECODE_MMAP_THRESHOLD: c_int = 128 << 10;
/// … and after: the highest that glibc's dynamic threshold reaches by itself (32 MiB on 64-bit),
/// so the other decoders' buffers below it stay in the heap for the next job, as they would
/// once the threshold had risen.
const AFTER_MMAP_THRESHOLD: c_int = 32 << 20;

/// Held while libheif decodes. libheif and libde265 allocate with glibc's malloc (not the
/// worker's allocator), and glibc raises its mmap threshold to the size of a mapped block once
/// it is freed, so from a worker's second HEIF decode on, its 4–32 MiB planes came from the
/// heap and stayed resident when freed while the next, larger ones were mapped anew: a second
/// 48 MP HEIC decode peaked 60 MB above the first, and held 80 MB more while its picture was
/// converted (BENCHMARKS.md, "Peak memory per source format"). Setting the threshold turns
/// glibc's dynamic one off for good, so it is set back to that one's ceiling, not lowered.
/// The free pages left in the heap are given back before and after (`malloc_trim`).
struct MappedPlanes;

impl MappedPlanes {
    fn new() -> MappedPlanes {
        // SAFETY: `mallopt` and `malloc_trim` only change or walk glibc's allocator state,
        // under its own locks.
        unsafe {
            libc::malloc_trim(0);
            libc::mallopt(libc::M_MMAP_THRESHOLD, DECODE_MMAP_THRESHOLD);
        }
        MappedPlanes
    }
}

impl Drop for MappedPlanes {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD);
            libc::malloc_trim(0);
        }
    }
}

/// Bytes libheif holds while decoding a picture of `header`'s size: the codec's decoded
/// picture and the image libheif copies it into (both exist until the decode returns), each
/// counted as 4:4:4 at the worst, two bytes a sample above 8 bits, plus alpha.
pub fn decode_bytes(header: &Header) -> u64 {
    let pixels = u64::from(header.width) * u64::from(header.height);
    let sample = if header.bits > 8 { 2 } else { 1 };
    let planes = pixels * sample * if header.alpha { 4 } else { 3 };
    2 * planes
}

/// ICC profiles and EXIF blocks larger than this are dropped rather than copied.
const MAX_METADATA: usize = 4 << 20;

const fn fourcc(code: &[u8; 4]) -> u32 {
    u32::from_be_bytes(*code)
}

fn check(e: ffi::Error) -> Result<(), String> {
    if e.code == 0 {
        return Ok(());
    }
    let message = if e.message.is_null() {
        String::new()
    } else {
        // SAFETY: libheif's messages are static NUL-terminated strings (never null, says
        // heif.h; checked anyway).
        unsafe { CStr::from_ptr(e.message) }
            .to_string_lossy()
            .into_owned()
    };
    Err(format!(
        "{message} (libheif error {}.{})",
        e.code, e.subcode
    ))
}

/// libheif 1.15's C API, the calls this module makes (heif.h).
#[allow(non_camel_case_types)]
mod ffi {
    use super::*;

    #[repr(C)]
    pub struct Context {
        _opaque: [u8; 0],
    }
    #[repr(C)]
    pub struct Handle {
        _opaque: [u8; 0],
    }
    #[repr(C)]
    pub struct Image {
        _opaque: [u8; 0],
    }

    /// `struct heif_error`, returned by value.
    #[repr(C)]
    pub struct Error {
        pub code: c_int,
        pub subcode: c_int,
        pub message: *const c_char,
    }

    pub const COLORSPACE_YCBCR: c_int = 0;
    pub const COLORSPACE_RGB: c_int = 1;
    pub const COLORSPACE_MONOCHROME: c_int = 2;
    pub const COLORSPACE_UNDEFINED: c_int = 99;
    pub const CHROMA_MONOCHROME: c_int = 0;
    pub const CHROMA_420: c_int = 1;
    pub const CHROMA_422: c_int = 2;
    pub const CHROMA_444: c_int = 3;
    pub const CHROMA_INTERLEAVED_RGB: c_int = 10;
    pub const CHROMA_INTERLEAVED_RGBA: c_int = 11;
    pub const CHROMA_UNDEFINED: c_int = 99;
    pub const CHANNEL_Y: c_int = 0;
    pub const CHANNEL_CB: c_int = 1;
    pub const CHANNEL_CR: c_int = 2;
    pub const CHANNEL_R: c_int = 3;
    pub const CHANNEL_G: c_int = 4;
    pub const CHANNEL_B: c_int = 5;
    pub const CHANNEL_ALPHA: c_int = 6;
    pub const CHANNEL_INTERLEAVED: c_int = 10;

    /// `struct heif_color_profile_nclx`, version 1 (the fields read here come first).
    #[repr(C)]
    pub struct Nclx {
        pub version: u8,
        pub color_primaries: c_int,
        pub transfer_characteristics: c_int,
        pub matrix_coefficients: c_int,
        pub full_range_flag: u8,
    }

    #[link(name = "heif")]
    extern "C" {
        pub fn heif_context_alloc() -> *mut Context;
        pub fn heif_context_free(ctx: *mut Context);
        pub fn heif_context_set_max_decoding_threads(ctx: *mut Context, max_threads: c_int);
        pub fn heif_context_read_from_memory_without_copy(
            ctx: *mut Context,
            mem: *const c_void,
            size: usize,
            options: *const c_void,
        ) -> Error;
        pub fn heif_context_get_primary_image_handle(
            ctx: *mut Context,
            handle: *mut *mut Handle,
        ) -> Error;
        pub fn heif_image_handle_release(handle: *const Handle);
        pub fn heif_image_handle_get_width(handle: *const Handle) -> c_int;
        pub fn heif_image_handle_get_height(handle: *const Handle) -> c_int;
        pub fn heif_image_handle_has_alpha_channel(handle: *const Handle) -> c_int;
        pub fn heif_image_handle_get_luma_bits_per_pixel(handle: *const Handle) -> c_int;
        pub fn heif_image_handle_get_color_profile_type(handle: *const Handle) -> u32;
        pub fn heif_image_handle_get_raw_color_profile_size(handle: *const Handle) -> usize;
        pub fn heif_image_handle_get_raw_color_profile(
            handle: *const Handle,
            out: *mut c_void,
        ) -> Error;
        pub fn heif_image_handle_get_number_of_metadata_blocks(
            handle: *const Handle,
            type_filter: *const c_char,
        ) -> c_int;
        pub fn heif_image_handle_get_list_of_metadata_block_IDs(
            handle: *const Handle,
            type_filter: *const c_char,
            ids: *mut u32,
            count: c_int,
        ) -> c_int;
        pub fn heif_image_handle_get_metadata_size(handle: *const Handle, id: u32) -> usize;
        pub fn heif_image_handle_get_metadata(
            handle: *const Handle,
            id: u32,
            out: *mut c_void,
        ) -> Error;
        pub fn heif_decode_image(
            handle: *const Handle,
            out: *mut *mut Image,
            colorspace: c_int,
            chroma: c_int,
            options: *const c_void,
        ) -> Error;
        pub fn heif_image_get_width(img: *const Image, channel: c_int) -> c_int;
        pub fn heif_image_get_primary_width(img: *const Image) -> c_int;
        pub fn heif_image_get_primary_height(img: *const Image) -> c_int;
        pub fn heif_image_get_height(img: *const Image, channel: c_int) -> c_int;
        pub fn heif_image_get_plane_readonly(
            img: *const Image,
            channel: c_int,
            stride: *mut c_int,
        ) -> *const u8;
        pub fn heif_image_release(img: *const Image);
        pub fn heif_image_get_colorspace(img: *const Image) -> c_int;
        pub fn heif_image_get_chroma_format(img: *const Image) -> c_int;
        pub fn heif_image_get_bits_per_pixel_range(img: *const Image, channel: c_int) -> c_int;
        pub fn heif_image_get_nclx_color_profile(img: *const Image, out: *mut *mut Nclx) -> Error;
        pub fn heif_nclx_color_profile_free(profile: *mut Nclx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture(path: &str) -> Vec<u8> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/heif");
        std::fs::read(dir.join(path)).unwrap()
    }

    /// Decodes `data` the way the worker does, a quarter of its size.
    fn decode_all(data: &[u8]) -> Result<DynamicImage, String> {
        let file = Heif::open(data)?;
        file.icc();
        file.exif();
        file.decode(2)
    }

    #[test]
    fn the_seeds_decode_to_their_colours() {
        let halves = ["seeds/halves-64x48.heic", "seeds/halves-64x48.avif"];
        for name in halves {
            let data = fixture(name);
            let file = Heif::open(&data).unwrap();
            let h = file.header();
            assert_eq!((h.width, h.height, h.alpha), (64, 48, false), "{name}");
            let img = file.decode(2).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (32, 24), "{name}");
            let (left, right) = (img.get_pixel(4, 12).0, img.get_pixel(28, 12).0);
            assert!(left[0] > 150 && left[2] < 90, "{name}: {left:?}");
            assert!(right[2] > 150 && right[0] < 90, "{name}: {right:?}");
        }
        let alpha = fixture("seeds/alpha-96x64.avif");
        let img = Heif::open(&alpha).unwrap().decode(1).unwrap();
        assert!(img.color().has_alpha());
        let a = img.to_rgba8().get_pixel(10, 10).0[3];
        assert!((100..160).contains(&a), "half-transparent green: alpha {a}");
    }

    /// The worker's own conversion of the decoder's planes against libheif's, at full size:
    /// 4:2:0, 4:2:2, 4:4:4, 10 bits, limited range, BT.709, lossless RGB and alpha all agree
    /// within rounding (libheif 1.15 hands its RGB planes over; `yuv.rs`'s own tests cover
    /// YCbCr planes).
    #[test]
    fn planes_convert_as_libheif_converts_them() {
        let seeds = std::fs::read_dir(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/heif/seeds"),
        )
        .unwrap();
        let mut checked = 0;
        for entry in seeds {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let file = Heif::open(&data).unwrap();
            let native = file
                .decode_as(ffi::COLORSPACE_UNDEFINED, ffi::CHROMA_UNDEFINED)
                .unwrap();
            assert!(
                native_planes(&native).is_some(),
                "{path:?}: the worker converts it"
            );
            drop(native);
            let heic = path.extension().is_some_and(|e| e == "heic");
            assert_eq!(
                file.is_direct(),
                heic,
                "{path:?}: libde265 decodes HEIC directly"
            );
            let mut ours = file.decode(1).unwrap();
            if let Some(o) = file.orientation() {
                ours = crate::orient::turn(ours, o);
            }
            let theirs = file.decode_interleaved(1).unwrap();
            assert_eq!(ours.color(), theirs.color(), "{path:?}");
            let (a, b) = (ours.as_bytes(), theirs.as_bytes());
            assert_eq!(a.len(), b.len(), "{path:?}");
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap_or(0);
            let mse = a
                .iter()
                .zip(b)
                .map(|(x, y)| f64::from(x.abs_diff(*y)).powi(2))
                .sum::<f64>()
                / a.len() as f64;
            let psnr = 10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10();
            assert!(
                psnr >= 45.0 && worst <= 4,
                "{path:?}: {psnr:.1} dB, worst {worst}"
            );
            checked += 1;
        }
        assert!(checked >= 3);
    }

    /// Damaged copies of the seeds (a fixed pseudo-random walk, so each run is the same) end
    /// in a picture or an error, never a crash. `heif-convert` 1.15 crashes on the one in
    /// `crashes/` (an unknown nclx matrix, in its own printing of it); this module reads the
    /// profile through libheif's copy and leaves matrices it does not know to libheif.
    #[test]
    fn damaged_files_fail_or_decode_but_never_crash() {
        let crash = fixture("crashes/bad-nclx-matrix.avif");
        let _ = decode_all(&crash);
        let seeds = [
            fixture("seeds/halves-64x48.heic"),
            fixture("seeds/halves-64x48.avif"),
            fixture("seeds/alpha-96x64.avif"),
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut ok, mut failed) = (0, 0);
        for round in 0..300 {
            let mut data = seeds[round % seeds.len()].clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() % data.len() as u64) as usize;
                data[at] = next() as u8;
            }
            match decode_all(&data) {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(
                        e.contains("libheif") || e.contains("libde265"),
                        "an error that names the decoder: {e}"
                    );
                    failed += 1;
                }
            }
        }
        assert_eq!(ok + failed, 300);
        assert!(failed > 0, "some damage must be refused");
    }

    /// Boxes for building HEIF files in tests (`mux`).
    pub(crate) mod build {
        pub fn bx(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
            let mut b = ((8 + body.len()) as u32).to_be_bytes().to_vec();
            b.extend_from_slice(kind);
            b.extend_from_slice(body);
            b
        }

        pub fn full(kind: &[u8; 4], version: u8, body: &[u8]) -> Vec<u8> {
            let mut b = vec![version, 0, 0, 0];
            b.extend_from_slice(body);
            bx(kind, &b)
        }

        pub fn ispe(w: u32, h: u32) -> Vec<u8> {
            let mut b = w.to_be_bytes().to_vec();
            b.extend_from_slice(&h.to_be_bytes());
            full(b"ispe", 0, &b)
        }

        /// A `clap` box: width, height, horizontal and vertical offset, each (numerator,
        /// denominator).
        pub fn clap(w: (u32, u32), h: (u32, u32), x: (i32, u32), y: (i32, u32)) -> Vec<u8> {
            let mut b = Vec::new();
            for (n, d) in [w, h, (x.0 as u32, x.1), (y.0 as u32, y.1)] {
                b.extend_from_slice(&n.to_be_bytes());
                b.extend_from_slice(&d.to_be_bytes());
            }
            bx(b"clap", &b)
        }

        pub fn nclx(matrix: u16, full_range: bool) -> Vec<u8> {
            let mut b = b"nclx".to_vec();
            for v in [1u16, 13, matrix] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b.push(if full_range { 0x80 } else { 0 });
            bx(b"colr", &b)
        }

        pub struct Item {
            pub id: u16,
            pub kind: [u8; 4],
            pub props: Vec<Vec<u8>>,
            pub data: Vec<u8>,
        }

        /// A HEIF file of `items` (data in `mdat`), `primary` first, `dimg` references.
        pub fn mux(items: &[Item], primary: u16, dimg: &[(u16, Vec<u16>)]) -> Vec<u8> {
            let meta = |mdat_at: u32| {
                let mut hdlr = vec![0; 4];
                hdlr.extend_from_slice(b"pict");
                hdlr.extend_from_slice(&[0; 13]);
                let mut m = full(b"hdlr", 0, &hdlr);
                m.extend(full(b"pitm", 0, &primary.to_be_bytes()));
                let mut iinf = (items.len() as u16).to_be_bytes().to_vec();
                for it in items {
                    let mut e = it.id.to_be_bytes().to_vec();
                    e.extend_from_slice(&[0, 0]);
                    e.extend_from_slice(&it.kind);
                    e.push(0);
                    iinf.extend(full(b"infe", 2, &e));
                }
                m.extend(full(b"iinf", 0, &iinf));
                if !dimg.is_empty() {
                    let mut refs = Vec::new();
                    for (from, to) in dimg {
                        let mut r = from.to_be_bytes().to_vec();
                        r.extend_from_slice(&(to.len() as u16).to_be_bytes());
                        for t in to {
                            r.extend_from_slice(&t.to_be_bytes());
                        }
                        refs.extend(bx(b"dimg", &r));
                    }
                    m.extend(full(b"iref", 0, &refs));
                }
                let mut ipco = Vec::new();
                let mut ipma = (items.len() as u32).to_be_bytes().to_vec();
                let mut index = 0u8;
                for it in items {
                    ipma.extend_from_slice(&it.id.to_be_bytes());
                    ipma.push(it.props.len() as u8);
                    for p in &it.props {
                        ipco.extend_from_slice(p);
                        index += 1;
                        ipma.push(index);
                    }
                }
                let mut iprp = bx(b"ipco", &ipco);
                iprp.extend(full(b"ipma", 0, &ipma));
                m.extend(bx(b"iprp", &iprp));
                let mut iloc = vec![0x44, 0x00];
                iloc.extend_from_slice(&(items.len() as u16).to_be_bytes());
                let mut at = mdat_at + 8;
                for it in items {
                    iloc.extend_from_slice(&it.id.to_be_bytes());
                    iloc.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
                    iloc.extend_from_slice(&at.to_be_bytes());
                    iloc.extend_from_slice(&(it.data.len() as u32).to_be_bytes());
                    at += it.data.len() as u32;
                }
                m.extend(full(b"iloc", 1, &iloc));
                full(b"meta", 0, &m)
            };
            let mut file = bx(b"ftyp", b"heic\0\0\0\0mif1heic");
            let size = file.len() + meta(0).len();
            file.extend(meta(size as u32));
            let data: Vec<u8> = items.iter().flat_map(|it| it.data.clone()).collect();
            file.extend(bx(b"mdat", &data));
            file
        }
    }

    /// A 2×2 grid shown as 120×90 with `props`, its four tiles the seed's coded picture
    /// (`seed_parts`).
    fn two_by_two_grid(
        props: Vec<Vec<u8>>,
        hvcc: &[u8],
        data: &[u8],
        (w, h): (u32, u32),
    ) -> Vec<u8> {
        use build::*;
        let mut items = vec![Item {
            id: 1,
            kind: *b"grid",
            props,
            data: vec![0, 0, 1, 1, 0, 120, 0, 90],
        }];
        for id in 2..6 {
            items.push(Item {
                id,
                kind: *b"hvc1",
                props: vec![hvcc.to_vec(), ispe(w, h)],
                data: data.to_vec(),
            });
        }
        mux(&items, 1, &[(1, vec![2, 3, 4, 5])])
    }

    /// A seed's `hvcC` box, coded data and size.
    fn seed_parts(name: &str) -> (Vec<u8>, Vec<u8>, (u32, u32)) {
        let seed = fixture(name);
        let at = seed.windows(4).position(|w| w == b"hvcC").unwrap() - 4;
        let size = u32::from_be_bytes(seed[at..at + 4].try_into().unwrap()) as usize;
        let hvcc = seed[at..at + size].to_vec();
        let plan = heif_items::plan(&seed).unwrap();
        // heif-enc 1.15 writes even one picture as a grid of one tile.
        let c = match plan.layout {
            heif_items::Layout::Single(c) => c,
            heif_items::Layout::Grid { mut tiles, .. } => tiles.remove(0),
        };
        (hvcc, c.data(&seed), (c.width, c.height))
    }

    /// The direct decode, turned, against libheif's, at full size.
    fn assert_matches_libheif(data: &[u8], what: &str) {
        use image::GenericImageView;
        let file = Heif::open(data).unwrap();
        assert!(
            file.is_direct(),
            "{what}: decoded by libde265 directly ({:?}, {:?})",
            heif_items::plan(data),
            file.header()
        );
        let h = file.header();
        let mut ours = file.decode(1).unwrap();
        if let Some(o) = file.orientation() {
            ours = crate::orient::turn(ours, o);
        }
        let theirs = file.decode_interleaved(1).unwrap();
        assert_eq!(ours.dimensions(), (h.width, h.height), "{what}");
        assert_eq!(ours.dimensions(), theirs.dimensions(), "{what}");
        let (a, b) = (ours.to_rgb8(), theirs.to_rgb8());
        let worst = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0);
        assert!(worst <= 2, "{what}: worst difference {worst}");
    }

    #[test]
    fn turned_and_tiled_pictures_decode_as_libheif_decodes_them() {
        use build::*;
        let (hvcc, data, (w, h)) = seed_parts("seeds/halves-64x48.heic");
        let single = |extra: Vec<Vec<u8>>| {
            let mut props = vec![hvcc.clone(), ispe(w, h)];
            props.extend(extra);
            mux(
                &[Item {
                    id: 1,
                    kind: *b"hvc1",
                    props,
                    data: data.clone(),
                }],
                1,
                &[],
            )
        };
        let irot = |a: u8| bx(b"irot", &[a]);
        let imir = |a: u8| bx(b"imir", &[a]);
        assert_matches_libheif(&single(vec![]), "plain");
        for (name, extra) in [
            ("irot 1", vec![irot(1)]),
            ("irot 2", vec![irot(2)]),
            ("irot 3", vec![irot(3)]),
            ("imir 0", vec![imir(0)]),
            ("imir 1", vec![imir(1)]),
            ("irot 1, imir 0", vec![irot(1), imir(0)]),
            ("irot 3, imir 1", vec![irot(3), imir(1)]),
            ("nclx BT.709 limited", vec![nclx(1, false)]),
        ] {
            assert_matches_libheif(&single(extra), name);
        }
        // A 2×2 grid of the seed, cropped to 120×90 at the right and bottom.
        let grid = |extra: Vec<Vec<u8>>| {
            let mut props = vec![ispe(120, 90)];
            props.extend(extra);
            two_by_two_grid(props, &hvcc, &data, (w, h))
        };
        assert_matches_libheif(&grid(vec![]), "grid");
        assert_matches_libheif(&grid(vec![irot(1), imir(0)]), "turned grid");

        // Canon's HIF files list `irot` before `ispe`; libheif 1.15's header then gives the
        // unturned size while its decode is turned (outputs came out stretched).
        let mut canon = grid(vec![irot(1)]);
        // The grid's `ipma` entry (id 1, two properties: `ispe` 1, `irot` 2) names `irot` first.
        let ipma = canon.windows(4).position(|w| w == b"ipma").unwrap();
        let grid_entry = ipma + 4 + 4 + 4;
        assert_eq!(&canon[grid_entry..grid_entry + 5], &[0, 1, 2, 1, 2]);
        canon[grid_entry + 3..grid_entry + 5].copy_from_slice(&[2, 1]);
        let file = Heif::open(&canon).unwrap();
        let h = file.header();
        assert_eq!((h.width, h.height), (90, 120), "the shown size");
        assert_matches_libheif(&canon, "irot listed before ispe");
    }

    /// `clap` crops, alone and mixed with turns in every order, on single pictures and grids:
    /// decoded directly, cropped and turned as libheif crops and turns them, with the header
    /// giving the size as shown.
    #[test]
    fn clean_apertures_decode_as_libheif_decodes_them() {
        use build::*;
        let irot = |a: u8| bx(b"irot", &[a]);
        let imir = |a: u8| bx(b"imir", &[a]);
        // `props` in this order (the item's `hvcC` first).
        let single = |seed: &str, props: Vec<Vec<u8>>| {
            let (hvcc, data, _) = seed_parts(seed);
            let mut all = vec![hvcc];
            all.extend(props);
            mux(
                &[Item {
                    id: 1,
                    kind: *b"hvc1",
                    props: all,
                    data,
                }],
                1,
                &[],
            )
        };
        let shown = |data: &[u8]| {
            let h = Heif::open(data).unwrap().header();
            (h.width, h.height)
        };
        // R grows to the right, G downwards: every turn and crop shows.
        let grad = "seeds/grad-422-64x48.heic";
        // A sharp red–blue edge at x = 32 in 4:2:0: a crop at an odd column shows whether
        // chroma is read where libheif reads it.
        let halves = "seeds/halves-64x48.heic";
        // The seeds' pictures are coded 64×64 (heif-enc shows them as 64×48 grids of one).
        let centred = clap((40, 1), (30, 1), (0, 1), (0, 1));
        // Off centre, at an odd column and row: left -2.5 + 31.5 - 20 = 9, top
        // 5 + 31.5 - 14 = 22.5, rounded to 23.
        let odd = clap((41, 1), (29, 1), (-5, 2), (5, 1));
        let cases = [
            (
                "clap alone",
                grad,
                vec![ispe(64, 64), centred.clone()],
                (40, 30),
            ),
            (
                "heif-enc's: the top 48 rows",
                grad,
                vec![ispe(64, 64), clap((64, 1), (48, 1), (0, 1), (-8, 1))],
                (64, 48),
            ),
            (
                "odd offsets",
                grad,
                vec![ispe(64, 64), odd.clone()],
                (41, 29),
            ),
            (
                "odd offsets, 4:2:0",
                halves,
                vec![ispe(64, 64), odd.clone()],
                (41, 29),
            ),
            (
                "odd size at odd columns, 4:2:0",
                halves,
                vec![ispe(64, 64), clap((33, 1), (47, 1), (2, 1), (0, 1))],
                (33, 47),
            ),
            (
                "clap before irot",
                grad,
                vec![ispe(64, 64), odd.clone(), irot(1)],
                (29, 41),
            ),
            (
                "irot before clap",
                grad,
                vec![ispe(64, 64), irot(1), odd.clone()],
                (41, 29),
            ),
            (
                "irot 3 before clap",
                grad,
                vec![
                    ispe(64, 64),
                    irot(3),
                    clap((29, 1), (41, 1), (3, 1), (-5, 1)),
                ],
                (29, 41),
            ),
            (
                "clap with imir",
                grad,
                vec![ispe(64, 64), imir(0), odd.clone(), imir(1)],
                (41, 29),
            ),
            (
                "irot, imir, clap, irot",
                grad,
                vec![ispe(64, 64), irot(1), imir(1), odd.clone(), irot(2)],
                (41, 29),
            ),
            (
                "two claps",
                grad,
                vec![
                    ispe(64, 64),
                    clap((50, 1), (40, 1), (3, 1), (1, 1)),
                    irot(1),
                    clap((31, 1), (21, 1), (-3, 1), (2, 1)),
                ],
                (31, 21),
            ),
            (
                "10 bits, irot before clap",
                "seeds/grad-10bit-64x48.heic",
                vec![ispe(64, 64), irot(3), odd.clone()],
                (41, 29),
            ),
        ];
        for (what, seed, props, size) in cases {
            let file = single(seed, props);
            assert_eq!(shown(&file), size, "{what}: the header's size");
            assert_matches_libheif(&file, what);
            // libde265 holds the whole coded picture, whatever the crop.
            let heif = Heif::open(&file).unwrap();
            let Some(heif_items::Layout::Single(c)) = heif.plan.as_ref().map(|p| &p.layout) else {
                panic!("{what}: one picture");
            };
            assert_eq!(
                heif.decode_bytes(),
                de265::decode_bytes(64, 64, c.bits, c.chroma),
                "{what}"
            );
        }

        // libheif 1.15 reads neither an `irot` nor a `clap` listed before `ispe` into its
        // header (Canon's HIF lists `irot` first), yet decodes the cropped, turned picture.
        let canon = single(grad, vec![odd.clone(), irot(1), ispe(64, 64)]);
        assert_eq!(shown(&canon), (29, 41), "clap and irot before ispe");
        assert_matches_libheif(&canon, "clap and irot before ispe");
        let canon = single(grad, vec![irot(1), ispe(64, 64), odd.clone()]);
        assert_eq!(shown(&canon), (41, 29), "irot before ispe, then clap");
        assert_matches_libheif(&canon, "irot before ispe, then clap");

        // A 2×2 grid of 64×48 tiles shown as 120×90, cropped across the tiles' edges; tiles
        // wholly outside the crop are not decoded.
        let (hvcc, data, (w, h)) = seed_parts(grad);
        let grid = |props: Vec<Vec<u8>>| two_by_two_grid(props, &hvcc, &data, (w, h));
        for (what, props, size) in [
            (
                "grid, clap",
                vec![ispe(120, 90), clap((101, 1), (77, 1), (-5, 1), (3, 1))],
                (101, 77),
            ),
            (
                "grid, clap within the first tile column",
                vec![ispe(120, 90), clap((41, 1), (31, 1), (-36, 1), (-21, 1))],
                (41, 31),
            ),
            (
                "grid, irot before clap",
                vec![
                    ispe(120, 90),
                    irot(1),
                    imir(0),
                    clap((77, 1), (101, 1), (3, 1), (-5, 1)),
                ],
                (77, 101),
            ),
            (
                "grid, clap before irot",
                vec![
                    ispe(120, 90),
                    clap((101, 1), (77, 1), (-5, 1), (3, 1)),
                    irot(3),
                ],
                (77, 101),
            ),
        ] {
            let file = grid(props);
            assert_eq!(shown(&file), size, "{what}: the header's size");
            assert_matches_libheif(&file, what);
            // A tile's picture, and a band a tile high as wide as the crop.
            let heif = Heif::open(&file).unwrap();
            let crop = heif.plan.as_ref().unwrap().crop;
            assert_eq!(
                heif.decode_bytes(),
                de265::decode_bytes(64, 64, 8, 2) + 64 * u64::from(crop.width) * 3,
                "{what}"
            );
        }
    }

    /// Files the box reader leaves to libheif, and ones libde265 refuses with a clear error.
    #[test]
    fn damaged_boxes_are_left_to_libheif_or_refused() {
        use build::*;
        let (hvcc, data, (w, h)) = seed_parts("seeds/halves-64x48.heic");
        let item_with = |id: u16, props: Vec<Vec<u8>>| Item {
            id,
            kind: *b"hvc1",
            props,
            data: data.clone(),
        };
        let item = |props: Vec<Vec<u8>>| item_with(1, props);
        // No hvcC: left to libheif, which cannot decode it either.
        let no_hvcc = mux(&[item(vec![ispe(w, h)])], 1, &[]);
        assert_eq!(
            heif_items::plan(&no_hvcc),
            Err(heif_items::Unhandled("no hvcC"))
        );
        // An ispe far from the stream's own size: not handed to libde265.
        let huge = mux(&[item(vec![hvcc.clone(), ispe(20000, 20000)])], 1, &[]);
        assert!(heif_items::plan(&huge).is_err());
        // A 1×1 grid cut to 64×1 from a 64×64 tile: within twice its size plus 1 MP
        // (`heif_items::tests` for the bound), so planned.
        let thin = |n: u8| {
            let mut items = vec![Item {
                id: 1,
                kind: *b"grid",
                props: vec![ispe(64 * (u32::from(n) + 1), 1)],
                data: [
                    [0, 0, 0, n].as_slice(),
                    &(64 * (u16::from(n) + 1)).to_be_bytes(),
                    &[0, 1],
                ]
                .concat(),
            }];
            items.extend(
                (2..2 + u16::from(n) + 1).map(|id| item_with(id, vec![hvcc.clone(), ispe(w, h)])),
            );
            mux(&items, 1, &[(1, (2..2 + u16::from(n) + 1).collect())])
        };
        assert!(heif_items::plan(&thin(0)).is_ok());
        assert!(heif_items::plan(&thin(3)).is_ok());
        // Every cut of a good file: an error or a plan, never a panic, and a plan only while
        // every box it needs is whole.
        let good = mux(&[item(vec![hvcc.clone(), ispe(w, h)])], 1, &[]);
        assert!(heif_items::plan(&good).is_ok());
        for cut in 0..good.len() {
            if let Ok(plan) = heif_items::plan(&good[..cut]) {
                let heif_items::Layout::Single(c) = plan.layout else {
                    panic!()
                };
                assert!(c.extents.iter().all(|e| e.end <= cut));
            }
        }
        // Bytes of the data cut off after the boxes: libde265 fails or decodes, never crashes.
        let mut short = mux(&[item(vec![hvcc.clone(), ispe(w, h)])], 1, &[]);
        let n = short.len();
        short[n - data.len() / 2..].fill(0);
        let decoded = Heif::open(&short).map(|file| file.decode(1).is_ok());
        assert!(decoded.is_ok(), "the boxes are whole");
    }

    /// Writes the HEIF files of `fixtures/fuzz/heif_items/seeds/` and the bad HEICs of
    /// `fixtures/images/` (run by hand: `cargo test -p image-worker --lib write_heif_fixtures
    /// -- --ignored`).
    #[test]
    #[ignore]
    fn write_heif_fixtures() {
        use build::*;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
        let (hvcc, data, (w, h)) = seed_parts("seeds/halves-64x48.heic");
        let item = |id, props: Vec<Vec<u8>>| Item {
            id,
            kind: *b"hvc1",
            props,
            data: data.clone(),
        };
        let mut grid = vec![Item {
            id: 1,
            kind: *b"grid",
            props: vec![ispe(120, 90), bx(b"irot", &[1]), bx(b"imir", &[0])],
            data: vec![0, 0, 1, 1, 0, 120, 0, 90],
        }];
        grid.extend((2..6).map(|id| item(id, vec![hvcc.clone(), ispe(w, h)])));
        let no_hvcc = mux(&[item(1, vec![ispe(w, h)])], 1, &[]);
        // A clean aperture at odd offsets between two turns, and one outside the picture.
        let clapped = |c: Vec<u8>| {
            let props = vec![
                hvcc.clone(),
                ispe(w, h),
                bx(b"irot", &[1]),
                c,
                bx(b"imir", &[0]),
            ];
            mux(&[item(1, props)], 1, &[])
        };
        let clap_turned = clapped(clap((41, 1), (29, 1), (-5, 2), (5, 1)));
        let clap_outside = clapped(clap((41, 1), (29, 1), (20, 1), (5, 1)));
        // libheif 1.15 decodes this one (its 64×64 picture): not a bad input for the worker.
        let huge = mux(&[item(1, vec![hvcc.clone(), ispe(8000, 6000)])], 1, &[]);
        let good = mux(&[item(1, vec![hvcc.clone(), ispe(w, h)])], 1, &[]);
        let meta_end = good.windows(4).position(|w| w == b"mdat").unwrap() - 20;
        let seeds = root.join("fuzz/heif_items/seeds");
        std::fs::create_dir_all(&seeds).unwrap();
        for name in [
            "halves-64x48.heic",
            "grad-10bit-64x48.heic",
            "alpha-96x64.avif",
            "halves-64x48.avif",
        ] {
            std::fs::copy(root.join("fuzz/heif/seeds").join(name), seeds.join(name)).unwrap();
        }
        let files = [
            (
                seeds.join("grid-2x2-turned.heic"),
                mux(&grid, 1, &[(1, vec![2, 3, 4, 5])]),
            ),
            (seeds.join("no-hvcc.heic"), no_hvcc.clone()),
            (seeds.join("clap-turned.heic"), clap_turned),
            (seeds.join("clap-outside.heic"), clap_outside),
            (seeds.join("huge-ispe.heic"), huge.clone()),
            (seeds.join("truncated-meta.heic"), good[..meta_end].to_vec()),
            (root.join("images/no-hvcc.heic"), no_hvcc),
            (
                root.join("images/grid-missing-tile.heic"),
                mux(&grid[..4], 1, &[(1, vec![2, 3, 4])]),
            ),
        ];
        for (path, bytes) in files {
            std::fs::write(path, bytes).unwrap();
        }
    }

    /// The direct decode against libheif's on the files in `HEIC_COMPARE` (comma-separated;
    /// run by hand on large sources: `HEIC_COMPARE=var/bench/image-formats/big.heic cargo test
    /// -p image-worker --lib heic_compare -- --ignored --nocapture`): PSNR over the whole
    /// picture at full size, and each decode's thread CPU time.
    #[test]
    #[ignore]
    fn heic_compare() {
        let cpu = || {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid timespec to write to.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
            t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
        };
        let paths = std::env::var("HEIC_COMPARE").unwrap_or_default();
        for path in paths.split(',').filter(|p| !p.is_empty()) {
            let data = std::fs::read(path).unwrap();
            let file = Heif::open(&data).unwrap();
            assert!(file.is_direct(), "{path}");
            let t0 = cpu();
            let mut ours = file.decode(1).unwrap();
            let t1 = cpu();
            if let Some(o) = file.orientation() {
                ours = crate::orient::turn(ours, o);
            }
            let ours = ours.into_rgb8();
            let t2 = cpu();
            let theirs = file.decode_interleaved(1).unwrap().into_rgb8();
            let t3 = cpu();
            assert_eq!(ours.dimensions(), theirs.dimensions(), "{path}");
            let (mut sum, mut worst) = (0f64, 0u8);
            for (a, b) in ours.as_raw().iter().zip(theirs.as_raw()) {
                let d = a.abs_diff(*b);
                worst = worst.max(d);
                sum += f64::from(d) * f64::from(d);
            }
            let mse = sum / ours.as_raw().len() as f64;
            let psnr = 10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10();
            eprintln!(
                "{path}: PSNR {psnr:.1} dB (worst {worst}); CPU: libde265 directly {:.2} s, \
                 libheif {:.2} s",
                t1 - t0,
                t3 - t2
            );
        }
    }

    #[test]
    fn brands_name_the_flavour() {
        let ftyp = |major: &[u8; 4], compat: &[&[u8; 4]]| {
            let mut b = Vec::new();
            let size = 16 + 4 * compat.len() as u32;
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(b"ftyp");
            b.extend_from_slice(major);
            b.extend_from_slice(&0u32.to_be_bytes());
            for c in compat {
                b.extend_from_slice(*c);
            }
            b.extend_from_slice(&[0; 8]);
            b
        };
        assert_eq!(sniff(&ftyp(b"heic", &[b"mif1"])), Some(Kind::Heic));
        assert_eq!(sniff(&ftyp(b"mif1", &[b"avif"])), Some(Kind::Avif));
        assert_eq!(sniff(&ftyp(b"avif", &[])), Some(Kind::Avif));
        assert_eq!(sniff(&ftyp(b"mif1", &[b"miaf"])), Some(Kind::Heif));
        // An MP4 video is an ISO BMFF file too, but not a HEIF image.
        assert_eq!(sniff(&ftyp(b"isom", &[b"mp41"])), None);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), None);
    }
}
