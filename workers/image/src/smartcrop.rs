//! Smart crops: where `cover` keeps its window when the gravity is `entropy` or `attention`
//! (libvips' smartcrop, done here on a small copy of the picture).
//!
//! Both work on a *map*: the decoded picture box-averaged down to at most [`MAP_SIDE`] pixels
//! a side (transparent pixels are seen as white, the JPEG background, and score nothing), so the cost is one pass over the decode and then
//! next to nothing per output. The window `cover` keeps has the output's aspect ratio and spans
//! the whole picture along one axis, so only its offset along the other axis is chosen; it is
//! returned as an anchor (fraction of the spare room, as `Gravity::anchor`) for the resize.
//!
//! - **entropy** (libvips' `VIPS_INTERESTING_ENTROPY`): starting from the whole picture, the
//!   slice at either end of the axis to trim (an eighth of the excess, or what is left of it) is
//!   compared by the Shannon entropy of its luma histogram, and the lower one is cut off, until
//!   the window has the output's ratio. Flat background has entropy 0 and goes first; when both
//!   slices tie, half a slice is cut from each end, so a featureless picture keeps its centre.
//! - **attention** (libvips' `VIPS_INTERESTING_ATTENTION`, with a window search instead of its
//!   centring on the single brightest point): each map pixel scores its edge energy (Sobel
//!   magnitude of luma, 0–1), skin tone (closeness of its normalised RGB to a skin colour, for
//!   pixels neither too dark nor too bright, 0–1) and saturation (HSV saturation above 0.4 of
//!   pixels not too dark, weighted ½). A summed-area table gives every window's total in O(1);
//!   the window with the highest total wins, and among windows within 0.1 % of it the one nearest
//!   the centre (so a subject smaller than the window is kept whole and as centred as it can be,
//!   and a flat picture keeps its centre).

use std::ops::Range;

use image::DynamicImage;

/// Longest side of the analysis map, in pixels.
pub const MAP_SIDE: u32 = 256;

/// Which smart crop to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Smart {
    Entropy,
    Attention,
}

/// The analysis map of one picture: its luma and attention score, at most [`MAP_SIDE`] a side.
pub struct Analysis {
    width: usize,
    height: usize,
    luma: Vec<u8>,
    score: Vec<f32>,
}

/// Bytes an analysis holds at most (the map's row sums, luma, score and summed-area table), for
/// the decode budget.
pub const ANALYSIS_BYTES: u64 = {
    let side = MAP_SIDE as u64;
    side * 5 * 4 + side * side * (1 + 1 + 4 + 3) + (side + 1) * (side + 1) * 8
};

impl Analysis {
    /// The map of `img` (8-bit RGB or RGBA; any other kind is converted row by row).
    pub fn of(img: &DynamicImage) -> Analysis {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let factor = w.max(h).div_ceil(MAP_SIDE as usize).max(1);
        let (mw, mh) = (w.div_ceil(factor), h.div_ceil(factor));
        let mut rgb = vec![0u8; mw * mh * 3];
        let mut alpha = vec![255u8; mw * mh];
        let mut sums = vec![0u32; mw * 4];
        let mut counts = vec![0u32; mw];
        let fallback;
        let (bytes, channels): (&[u8], usize) = match img {
            DynamicImage::ImageRgb8(i) => (i.as_raw(), 3),
            DynamicImage::ImageRgba8(i) => (i.as_raw(), 4),
            other => {
                fallback = other.to_rgba8();
                (fallback.as_raw(), 4)
            }
        };
        for my in 0..mh {
            sums.fill(0);
            counts.fill(0);
            for y in my * factor..((my + 1) * factor).min(h) {
                let row = &bytes[y * w * channels..(y + 1) * w * channels];
                for (x, px) in row.chunks_exact(channels).enumerate() {
                    let mx = x / factor;
                    let a = if channels == 4 { u32::from(px[3]) } else { 255 };
                    for c in 0..3 {
                        sums[mx * 4 + c] += (u32::from(px[c]) * a + 255 * (255 - a)) / 255;
                    }
                    sums[mx * 4 + 3] += a;
                    counts[mx] += 1;
                }
            }
            for mx in 0..mw {
                let n = counts[mx].max(1);
                for c in 0..3 {
                    rgb[(my * mw + mx) * 3 + c] = ((sums[mx * 4 + c] + n / 2) / n) as u8;
                }
                alpha[my * mw + mx] = ((sums[mx * 4 + 3] + n / 2) / n) as u8;
            }
        }
        Analysis::from_rgb(mw, mh, &rgb, &alpha)
    }

    fn from_rgb(width: usize, height: usize, rgb: &[u8], alpha: &[u8]) -> Analysis {
        let luma: Vec<u8> = rgb
            .chunks_exact(3)
            .map(|p| {
                let y = 299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2]);
                ((y + 500) / 1000) as u8
            })
            .collect();
        let at = |x: isize, y: isize| {
            let x = x.clamp(0, width as isize - 1) as usize;
            let y = y.clamp(0, height as isize - 1) as usize;
            f32::from(luma[y * width + x])
        };
        let mut score = Vec::with_capacity(width * height);
        for y in 0..height as isize {
            for x in 0..width as isize {
                let gx = at(x + 1, y - 1) + 2.0 * at(x + 1, y) + at(x + 1, y + 1)
                    - at(x - 1, y - 1)
                    - 2.0 * at(x - 1, y)
                    - at(x - 1, y + 1);
                let gy = at(x - 1, y + 1) + 2.0 * at(x, y + 1) + at(x + 1, y + 1)
                    - at(x - 1, y - 1)
                    - 2.0 * at(x, y - 1)
                    - at(x + 1, y - 1);
                // A full black-to-white step gives 4 × 255 per axis.
                let edge = ((gx * gx + gy * gy).sqrt() / 1020.0).min(1.0);
                let i = (y as usize * width + x as usize) * 3;
                let p = [rgb[i], rgb[i + 1], rgb[i + 2]];
                let opacity = f32::from(alpha[y as usize * width + x as usize]) / 255.0;
                score.push((edge + skin(p) + 0.5 * saturation(p)) * opacity);
            }
        }
        Analysis {
            width,
            height,
            luma,
            score,
        }
    }

    /// The map's size.
    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// Where `cover` keeps its window for an output of `aspect` (width, height; the stored
    /// frame's, like the map): fractions of the spare room, (0.5, 0.5) along an axis with none.
    pub fn anchor(&self, smart: Smart, aspect: (u32, u32)) -> (f64, f64) {
        let (w, h) = (self.width as f64, self.height as f64);
        let ratio = f64::from(aspect.0.max(1)) / f64::from(aspect.1.max(1));
        let window = if w / h > ratio {
            (
                ((h * ratio).round() as usize).clamp(1, self.width),
                self.height,
            )
        } else {
            (
                self.width,
                ((w / ratio).round() as usize).clamp(1, self.height),
            )
        };
        self.place_map(smart, window)
    }

    /// Where a window of `window` pixels goes in the picture of `picture` pixels this map was
    /// made from (both in the stored frame): fractions of the spare room along each axis, as
    /// [`Analysis::anchor`]. For a crop given by its size only (`crop.gravity`): the window
    /// is found along both axes at once.
    pub fn place(&self, smart: Smart, window: (u32, u32), picture: (u32, u32)) -> (f64, f64) {
        let side = |win: u32, of: u32, map: usize| {
            let scaled = f64::from(win) * map as f64 / f64::from(of.max(1));
            (scaled.round() as usize).clamp(1, map)
        };
        self.place_map(
            smart,
            (
                side(window.0, picture.0, self.width),
                side(window.1, picture.1, self.height),
            ),
        )
    }

    /// [`Analysis::place`] for a window given in map pixels (each side 1 to the map's).
    fn place_map(&self, smart: Smart, (ww, wh): (usize, usize)) -> (f64, f64) {
        let (x, y) = match smart {
            Smart::Entropy => self.entropy_window(ww, wh),
            Smart::Attention => self.attention_window(ww, wh),
        };
        (fraction(x, self.width - ww), fraction(y, self.height - wh))
    }

    /// libvips' entropy crop: from the whole map, trim the lower-entropy slice from either end
    /// of each axis still longer than the window (an eighth of that axis' excess at a time),
    /// until the window is left; its top-left corner.
    fn entropy_window(&self, ww: usize, wh: usize) -> (usize, usize) {
        let (mut xs, mut ys) = (0..self.width, 0..self.height);
        let step_x = (self.width - ww).div_ceil(8).max(1);
        let step_y = (self.height - wh).div_ceil(8).max(1);
        while xs.len() > ww || ys.len() > wh {
            if xs.len() > ww {
                let rows = ys.clone();
                xs = trim(xs, self.width, ww, step_x, |band| {
                    self.entropy(band, rows.clone())
                });
            }
            if ys.len() > wh {
                let columns = xs.clone();
                ys = trim(ys, self.height, wh, step_y, |band| {
                    self.entropy(columns.clone(), band)
                });
            }
        }
        (xs.start, ys.start)
    }

    /// Shannon entropy (bits) of the luma histogram of the map's rectangle `xs` × `ys`.
    fn entropy(&self, xs: Range<usize>, ys: Range<usize>) -> f64 {
        let mut histogram = [0u32; 256];
        for y in ys {
            for x in xs.clone() {
                histogram[usize::from(self.luma[y * self.width + x])] += 1;
            }
        }
        let total: u32 = histogram.iter().sum();
        histogram
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| {
                let p = f64::from(n) / f64::from(total);
                -p * p.log2()
            })
            .sum()
    }

    /// The window of `ww`×`wh` with the highest total score, and among windows within 0.1 % of
    /// it the one nearest the centre; its top-left corner.
    fn attention_window(&self, ww: usize, wh: usize) -> (usize, usize) {
        // The summed-area table of the score, one row and column of zeros first.
        let (w, h) = (self.width, self.height);
        let mut table = vec![0f64; (w + 1) * (h + 1)];
        for y in 0..h {
            let mut row = 0f64;
            for x in 0..w {
                row += f64::from(self.score[y * w + x]);
                table[(y + 1) * (w + 1) + x + 1] = table[y * (w + 1) + x + 1] + row;
            }
        }
        let sum = |x0: usize, y0: usize, x1: usize, y1: usize| {
            table[y1 * (w + 1) + x1] - table[y0 * (w + 1) + x1] - table[y1 * (w + 1) + x0]
                + table[y0 * (w + 1) + x0]
        };
        let (across, down) = (w - ww + 1, h - wh + 1);
        let totals: Vec<f64> = (0..across * down)
            .map(|at| {
                let (x, y) = (at % across, at / across);
                sum(x, y, x + ww, y + wh)
            })
            .collect();
        let best = totals.iter().copied().fold(0f64, f64::max);
        let centre = ((across - 1) as f64 / 2.0, (down - 1) as f64 / 2.0);
        let distance = |at: usize| {
            let (x, y) = ((at % across) as f64, (at / across) as f64);
            (x - centre.0).powi(2) + (y - centre.1).powi(2)
        };
        let at = (0..totals.len())
            .filter(|&at| totals[at] >= best * 0.999)
            .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))
            .unwrap_or(totals.len() / 2);
        (at % across, at / across)
    }
}

/// One trim of libvips' entropy crop along an axis of `len`: the window `span` (longer than
/// `window`) loses a slice (at most `step`) from the end whose band has the lower entropy —
/// half a slice from each end when they tie (nothing tells them apart: flat background on
/// both sides), the odd pixel from the end trimmed less so far.
fn trim(
    span: Range<usize>,
    len: usize,
    window: usize,
    step: usize,
    entropy: impl Fn(Range<usize>) -> f64,
) -> Range<usize> {
    let (start, end) = (span.start, span.end);
    let slice = step.min(end - start - window);
    let first = entropy(start..start + slice);
    let last = entropy(end - slice..end);
    if first == last {
        let half = if start <= len - end {
            slice - slice / 2
        } else {
            slice / 2
        };
        start + half..end - (slice - half)
    } else if first < last {
        start + slice..end
    } else {
        start..end - slice
    }
}

fn fraction(at: usize, room: usize) -> f64 {
    if room == 0 {
        0.5
    } else {
        at as f64 / room as f64
    }
}

/// 0–1: how close the colour is to skin (normalised RGB near (0.78, 0.57, 0.44), as libvips
/// uses), for pixels neither very dark nor very bright.
fn skin([r, g, b]: [u8; 3]) -> f32 {
    const SKIN: [f32; 3] = [0.78, 0.57, 0.44];
    let (r, g, b) = (f32::from(r), f32::from(g), f32::from(b));
    let norm = (r * r + g * g + b * b).sqrt();
    let luma = (0.299 * r + 0.587 * g + 0.114 * b) / 255.0;
    if norm < 1.0 || !(0.2..=0.9).contains(&luma) {
        return 0.0;
    }
    let d = [r / norm - SKIN[0], g / norm - SKIN[1], b / norm - SKIN[2]];
    let distance = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
    (1.0 - distance / 0.1).max(0.0)
}

/// 0–1: HSV saturation above 0.4, for pixels not too dark.
fn saturation([r, g, b]: [u8; 3]) -> f32 {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    if max < 50 {
        return 0.0;
    }
    let s = f32::from(max - min) / f32::from(max);
    if s > 0.4 {
        s
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use image::{Rgb, RgbImage, Rgba, RgbaImage};

    use super::*;

    /// 400×200 flat grey, with a `side`-pixel subject whose left edge is at `x`: a skin-coloured
    /// disc with a dark checkered band across it (texture and skin).
    fn subject_at(x: u32, side: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(400, 200, |px, py| {
            let (cx, cy, r) = (
                f64::from(x) + f64::from(side) / 2.0,
                100.0,
                f64::from(side) / 2.0,
            );
            let (dx, dy) = (f64::from(px) + 0.5 - cx, f64::from(py) + 0.5 - cy);
            if dx * dx + dy * dy > r * r {
                return Rgb([128, 128, 128]);
            }
            if (py as f64 - cy).abs() < r / 4.0 && ((px / 4) + (py / 4)) % 2 == 0 {
                Rgb([40, 30, 20])
            } else {
                Rgb([224, 172, 140])
            }
        }))
    }

    /// The window `cover` keeps for a square output, in source pixels.
    fn kept(img: &DynamicImage, smart: Smart) -> (u32, u32) {
        let (ax, _) = Analysis::of(img).anchor(smart, (1, 1));
        let side = img.height();
        let x = (ax * f64::from(img.width() - side)).round() as u32;
        (x, x + side)
    }

    #[test]
    fn both_keep_a_subject_near_an_edge_that_the_centre_crop_cuts() {
        for (x, name) in [(8, "left"), (312, "right")] {
            let img = subject_at(x, 80);
            // The centre square (100..300) misses most of the subject.
            let centre = (100, 300);
            assert!(x + 80 <= centre.0 + 20 || x >= centre.1 - 20, "{name}");
            for smart in [Smart::Entropy, Smart::Attention] {
                let (from, to) = kept(&img, smart);
                assert!(
                    from <= x && x + 80 <= to,
                    "{smart:?} kept {from}..{to}, the subject is at {x}..{} ({name})",
                    x + 80
                );
            }
        }
    }

    #[test]
    fn the_vertical_axis_is_searched_the_same_way() {
        // The subject near the bottom of a tall picture.
        let wide = subject_at(300, 90).to_rgb8();
        let tall = DynamicImage::ImageRgb8(image::imageops::rotate90(&wide));
        for smart in [Smart::Entropy, Smart::Attention] {
            let (ax, ay) = Analysis::of(&tall).anchor(smart, (1, 1));
            assert_eq!(ax, 0.5);
            let from = (ay * f64::from(tall.height() - tall.width())).round() as u32;
            let to = from + tall.width();
            assert!(from <= 300 && 390 <= to, "{smart:?}: {from}..{to}");
        }
    }

    #[test]
    fn a_featureless_picture_keeps_its_centre() {
        let flat = DynamicImage::ImageRgb8(RgbImage::from_pixel(300, 100, Rgb([90, 90, 90])));
        for smart in [Smart::Entropy, Smart::Attention] {
            let (ax, ay) = Analysis::of(&flat).anchor(smart, (1, 1));
            assert!((ax - 0.5).abs() < 0.02, "{smart:?}: {ax}");
            assert_eq!(ay, 0.5);
        }
        // Same ratio as the picture: nothing to choose.
        let a = Analysis::of(&flat).anchor(Smart::Attention, (3, 1));
        assert_eq!(a, (0.5, 0.5));
    }

    #[test]
    fn a_large_picture_is_analysed_on_a_small_map() {
        let big = DynamicImage::ImageRgb8(RgbImage::new(3000, 1000));
        assert_eq!(Analysis::of(&big).size(), (250, 84));
        let bytes = ANALYSIS_BYTES;
        assert!(bytes < 2 << 20, "{bytes}");
    }

    #[test]
    fn transparent_pixels_draw_no_attention() {
        // A saturated red subject on the right, hidden by alpha 0, and a visible one on the left.
        let img = DynamicImage::ImageRgba8(RgbaImage::from_fn(300, 100, |x, y| {
            let inside = |x0: u32| (x0..x0 + 60).contains(&x) && (20..80).contains(&y);
            if inside(230) {
                Rgba([255, 0, 0, 0])
            } else if inside(10) && (x / 5 + y / 5) % 2 == 0 {
                Rgba([20, 200, 40, 255])
            } else {
                Rgba([250, 250, 250, 255])
            }
        }));
        let (ax, _) = Analysis::of(&img).anchor(Smart::Attention, (1, 1));
        assert!(ax < 0.1, "{ax}");
    }
}
