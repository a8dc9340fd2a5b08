//! Shrink-on-load for sources whose decoder cannot scale (PNG, GIF): rows arrive one at a
//! time, straight from the decoder, and are averaged in `factor`×`factor` boxes into a picture
//! `factor` times smaller per side, so the full-size picture is never held. The factor is
//! chosen to leave at least twice the detail the largest output needs, and the high-quality
//! resize (Lanczos3) then goes from there, as libvips' shrink-then-reduce does.
//!
//! Alpha is averaged as a colour's weight (the mean of `colour × alpha` over the box, divided
//! by the mean alpha), so fully transparent pixels lend no colour to their neighbours — what
//! `fast_image_resize`'s premultiplied resize does after it. Every source becomes 8-bit RGB or
//! RGBA, as the rest of the pipeline expects.

use image::{DynamicImage, RgbImage, RgbaImage};

/// The largest box side: keeps every `colour × alpha` sum of a box within `u32`.
pub const MAX_FACTOR: u32 = 64;

/// Layout of the 8-bit rows given to [`BoxShrink::push_row`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Gray,
    GrayAlpha,
    Rgb,
    Rgba,
}

impl Layout {
    /// Bytes per pixel.
    pub fn channels(self) -> usize {
        match self {
            Layout::Gray => 1,
            Layout::GrayAlpha => 2,
            Layout::Rgb => 3,
            Layout::Rgba => 4,
        }
    }

    pub fn has_alpha(self) -> bool {
        matches!(self, Layout::GrayAlpha | Layout::Rgba)
    }
}

/// The box side that still leaves every output at least twice its detail: `share` is the
/// largest share (0–1, per side) of the source any output needs, as for JPEG's IDCT scale.
pub fn factor_for(share: f64) -> u32 {
    if share.is_nan() || share <= 0.0 {
        return MAX_FACTOR;
    }
    let k = (1.0 / (2.0 * share)).floor();
    if k >= f64::from(MAX_FACTOR) {
        MAX_FACTOR
    } else if k >= 1.0 {
        k as u32
    } else {
        1
    }
}

/// The size a `(width, height)` source has once shrunk by `factor` (partial boxes at the right
/// and bottom edges count as a pixel).
pub fn shrunk_size((width, height): (u32, u32), factor: u32) -> (u32, u32) {
    (width.div_ceil(factor), height.div_ceil(factor))
}

/// Bytes a [`BoxShrink`] holds for a `(width, height)` source: its output and one row of sums.
pub fn held_bytes((width, height): (u32, u32), factor: u32, alpha: bool) -> u64 {
    let (w, h) = shrunk_size((width, height), factor);
    let channels: u64 = if alpha { 4 } else { 3 };
    let sums = if factor > 1 { u64::from(w) * 4 * 4 } else { 0 };
    u64::from(w) * u64::from(h) * channels + sums
}

/// Averages incoming rows in `factor`×`factor` boxes into an 8-bit RGB (or RGBA, with
/// `alpha`) picture.
pub struct BoxShrink {
    width: u32,
    height: u32,
    factor: u32,
    alpha: bool,
    out_width: u32,
    /// Per output column: R, G, B sums (weighted by alpha when `alpha`) and the alpha sum.
    sums: Vec<u32>,
    /// Source rows summed into `sums` so far (0..factor).
    band: u32,
    rows: u32,
    pixels: Vec<u8>,
}

impl BoxShrink {
    pub fn new(width: u32, height: u32, factor: u32, alpha: bool) -> BoxShrink {
        let factor = factor.clamp(1, MAX_FACTOR);
        let (out_width, out_height) = shrunk_size((width, height), factor);
        let channels = if alpha { 4 } else { 3 };
        let sums = if factor > 1 {
            vec![0; out_width as usize * 4]
        } else {
            Vec::new()
        };
        BoxShrink {
            width,
            height,
            factor,
            alpha,
            out_width,
            sums,
            band: 0,
            rows: 0,
            pixels: Vec::with_capacity(out_width as usize * out_height as usize * channels),
        }
    }

    /// Adds the next source row (`width` pixels of `layout`; extra rows are ignored).
    pub fn push_row(&mut self, row: &[u8], layout: Layout) {
        if self.rows >= self.height {
            return;
        }
        self.rows += 1;
        let width = self.width as usize;
        let row = &row[..(width * layout.channels()).min(row.len())];
        match layout {
            Layout::Gray => self.add(row.iter().map(|&v| [v, v, v, 255])),
            Layout::GrayAlpha => self.add(row.chunks_exact(2).map(|p| [p[0], p[0], p[0], p[1]])),
            Layout::Rgb => self.add(row.chunks_exact(3).map(|p| [p[0], p[1], p[2], 255])),
            Layout::Rgba => self.add(row.chunks_exact(4).map(|p| [p[0], p[1], p[2], p[3]])),
        }
        self.band += 1;
        if self.factor > 1 && (self.band == self.factor || self.rows == self.height) {
            self.emit();
        }
    }

    fn add(&mut self, row: impl Iterator<Item = [u8; 4]>) {
        if self.factor == 1 {
            for p in row {
                let n = if self.alpha { 4 } else { 3 };
                self.pixels.extend_from_slice(&p[..n]);
            }
            return;
        }
        let k = self.factor as usize;
        for (i, [r, g, b, a]) in row.enumerate() {
            let s = &mut self.sums[(i / k) * 4..(i / k) * 4 + 4];
            if self.alpha {
                let a32 = u32::from(a);
                s[0] += u32::from(r) * a32;
                s[1] += u32::from(g) * a32;
                s[2] += u32::from(b) * a32;
                s[3] += a32;
            } else {
                s[0] += u32::from(r);
                s[1] += u32::from(g);
                s[2] += u32::from(b);
            }
        }
    }

    /// Writes one output row from the sums of the band and clears them.
    fn emit(&mut self) {
        let k = self.factor;
        for x in 0..self.out_width {
            let box_width = k.min(self.width - x * k);
            let n = box_width * self.band;
            let s = &mut self.sums[x as usize * 4..x as usize * 4 + 4];
            if self.alpha {
                let weight = s[3];
                if weight == 0 {
                    self.pixels.extend_from_slice(&[0, 0, 0, 0]);
                } else {
                    let c =
                        |v: u32| ((u64::from(v) + u64::from(weight / 2)) / u64::from(weight)) as u8;
                    self.pixels.extend_from_slice(&[
                        c(s[0]),
                        c(s[1]),
                        c(s[2]),
                        ((weight + n / 2) / n) as u8,
                    ]);
                }
            } else {
                let c = |v: u32| ((v + n / 2) / n) as u8;
                self.pixels.extend_from_slice(&[c(s[0]), c(s[1]), c(s[2])]);
            }
            s.fill(0);
        }
        self.band = 0;
    }

    /// The shrunk picture; rows never given (a short source) stay transparent black.
    pub fn finish(mut self) -> DynamicImage {
        if self.factor > 1 && self.band > 0 {
            self.emit();
        }
        let (w, h) = shrunk_size((self.width, self.height), self.factor);
        let channels = if self.alpha { 4 } else { 3 };
        self.pixels.resize(w as usize * h as usize * channels, 0);
        if self.alpha {
            RgbaImage::from_raw(w, h, self.pixels).map(DynamicImage::ImageRgba8)
        } else {
            RgbImage::from_raw(w, h, self.pixels).map(DynamicImage::ImageRgb8)
        }
        .unwrap_or_else(|| DynamicImage::new_rgb8(w, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_factor_keeps_twice_the_detail_asked_for() {
        assert_eq!(factor_for(1.0), 1);
        assert_eq!(factor_for(0.5), 1);
        assert_eq!(factor_for(0.26), 1);
        assert_eq!(factor_for(0.25), 2);
        // 9400 px wide → 1280: 3, leaving 3134 px ≥ 2 × 1280.
        let share = 1280.0 / 9400.0;
        let k = factor_for(share);
        assert_eq!(k, 3);
        assert!(shrunk_size((9400, 5300), k).0 >= 2 * 1280);
        assert_eq!(factor_for(0.0001), MAX_FACTOR);
        assert_eq!(factor_for(0.0), MAX_FACTOR);
    }

    #[test]
    fn boxes_average_and_edges_take_partial_boxes() {
        // 5×3 RGB, factor 2: 3×2 output, the last column and row from partial boxes.
        let rows: [[u8; 15]; 3] = [
            [10, 0, 0, 30, 0, 0, 50, 0, 0, 70, 0, 0, 200, 0, 0],
            [10, 0, 0, 30, 0, 0, 50, 0, 0, 70, 0, 0, 200, 0, 0],
            [0, 100, 0, 0, 100, 0, 0, 100, 0, 0, 100, 0, 0, 100, 9],
        ];
        let mut s = BoxShrink::new(5, 3, 2, false);
        for r in &rows {
            s.push_row(r, Layout::Rgb);
        }
        let img = s.finish().to_rgb8();
        assert_eq!(img.dimensions(), (3, 2));
        assert_eq!(img.get_pixel(0, 0).0, [20, 0, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [60, 0, 0]);
        assert_eq!(img.get_pixel(2, 0).0, [200, 0, 0]);
        assert_eq!(img.get_pixel(2, 1).0, [0, 100, 9]);
    }

    #[test]
    fn transparent_pixels_lend_no_colour() {
        // One opaque red pixel among transparent green ones.
        let row = [255, 0, 0, 255, 0, 255, 0, 0];
        let mut s = BoxShrink::new(2, 2, 2, true);
        s.push_row(&row, Layout::Rgba);
        s.push_row(&[0, 255, 0, 0, 0, 255, 0, 0], Layout::Rgba);
        let p = s.finish().to_rgba8().get_pixel(0, 0).0;
        assert_eq!(p, [255, 0, 0, 64]);
    }

    #[test]
    fn factor_one_keeps_the_pixels_and_gray_becomes_rgb() {
        let mut s = BoxShrink::new(2, 1, 1, false);
        s.push_row(&[7, 200], Layout::Gray);
        let img = s.finish();
        assert_eq!(img.to_rgb8().as_raw(), &[7, 7, 7, 200, 200, 200]);
    }

    #[test]
    fn what_it_holds_is_what_it_reports() {
        let (w, h, k) = (1001u32, 333u32, 3u32);
        let mut s = BoxShrink::new(w, h, k, true);
        let row = vec![9u8; w as usize * 4];
        for _ in 0..h {
            s.push_row(&row, Layout::Rgba);
        }
        let held = (s.pixels.capacity() + s.sums.capacity() * 4) as u64;
        assert!(held <= held_bytes((w, h), k, true), "{held}");
        let img = s.finish();
        assert_eq!((img.width(), img.height()), shrunk_size((w, h), k));
    }
}
