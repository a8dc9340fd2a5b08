//! Colour planes as a decoder leaves them — YCbCr 4:2:0, 4:2:2 or 4:4:4, monochrome, or planar
//! RGB (the identity matrix; what libheif 1.15 hands back), 8 to 16 bits a sample, full or
//! limited range — turned into 8-bit RGB(A) one row at a time, so a caller that shrinks rows as
//! they come never holds an interleaved copy of the whole picture (`heif.rs`: 144 MB saved for
//! a 48 MP HEIC).
//!
//! The rules are libheif's (its `Op_YCbCr*_to_RGB*`), so both give the same picture: chroma taken from the nearest
//! sample (no interpolation — the rows are box-shrunk next, which averages far more), the
//! matrix from the `nclx` matrix coefficients, limited-range samples stretched to full range,
//! and high-bit-depth results rounded to 8 bits. Matrices other than identity, BT.709, BT.601
//! and BT.2020 non-constant are not handled here: [`Matrix::from_nclx`] says so and the caller
//! asks libheif to convert instead.

use std::ops::Range;

/// How Y, Cb and Cr map to R, G and B, as fixed-point factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matrix {
    /// `matrix_coefficients` 0: the planes hold G, B, R as they are.
    identity: bool,
    full_range: bool,
    cr_r: i32,
    cb_g: i32,
    cr_g: i32,
    cb_b: i32,
}

/// Fractional bits of the fixed-point factors.
const SHIFT: u32 = 14;

impl Matrix {
    /// The matrix for ITU-T H.273 `matrix_coefficients` (`nclx`), or `None` for one this
    /// module does not convert (constant-luminance and chromaticity-derived matrices, ICtCp).
    /// 2 ("unspecified") is read as BT.601, libheif's default.
    pub fn from_nclx(matrix_coefficients: u32, full_range: bool) -> Option<Matrix> {
        let (kr, kb) = match matrix_coefficients {
            0 => {
                return Some(Matrix {
                    identity: true,
                    full_range,
                    cr_r: 0,
                    cb_g: 0,
                    cr_g: 0,
                    cb_b: 0,
                })
            }
            1 => (0.2126, 0.0722),
            2 | 5 | 6 => (0.299, 0.114),
            4 => (0.30, 0.11),
            7 => (0.212, 0.087),
            9 => (0.2627, 0.0593),
            _ => return None,
        };
        let kg = 1.0 - kr - kb;
        let fixed = |v: f64| (v * f64::from(1u32 << SHIFT)).round() as i32;
        Some(Matrix {
            identity: false,
            full_range,
            cr_r: fixed(2.0 * (1.0 - kr)),
            cb_g: fixed(2.0 * kb * (1.0 - kb) / kg),
            cr_g: fixed(2.0 * kr * (1.0 - kr) / kg),
            cb_b: fixed(2.0 * (1.0 - kb)),
        })
    }
}

/// One plane: `height` rows of `stride` bytes, samples of one byte (8 bits) or two (native
/// endian, more bits).
#[derive(Debug, Clone, Copy)]
pub struct Plane<'a> {
    pub data: &'a [u8],
    pub stride: usize,
    pub width: usize,
    pub height: usize,
}

impl<'a> Plane<'a> {
    /// A plane a C decoder handed out (`data`, sizes and `stride` in bytes as it reports them),
    /// or `None` when it reported none.
    ///
    /// # Safety
    /// When `data` is not null it must point at `stride × height` readable bytes that stay
    /// valid and unchanged for `'a`.
    pub unsafe fn from_c(
        data: *const u8,
        width: std::ffi::c_int,
        height: std::ffi::c_int,
        stride: std::ffi::c_int,
    ) -> Option<Plane<'a>> {
        if data.is_null() || width <= 0 || height <= 0 || stride <= 0 {
            return None;
        }
        let (width, height, stride) = (width as usize, height as usize, stride as usize);
        Some(Plane {
            // SAFETY: the caller's promise above.
            data: unsafe { std::slice::from_raw_parts(data, stride * height) },
            stride,
            width,
            height,
        })
    }

    /// Whether `height` rows of `width` samples of `bytes` each lie within `data`.
    fn covers(&self, bytes: usize) -> bool {
        self.height > 0
            && self.width > 0
            && self.stride >= self.width * bytes
            && self
                .stride
                .checked_mul(self.height - 1)
                .and_then(|s| s.checked_add(self.width * bytes))
                .is_some_and(|end| end <= self.data.len())
    }

    fn row(&self, y: usize) -> &'a [u8] {
        let y = y.min(self.height - 1);
        &self.data[y * self.stride..]
    }
}

/// How much smaller the chroma planes are than the luma plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsampling {
    /// Luma only.
    Monochrome,
    /// Half width, half height.
    S420,
    /// Half width.
    S422,
    S444,
}

/// A picture's planes, checked to be complete for its size, and the window of them that is
/// converted (all of them unless [`Planes::window`] says otherwise).
#[derive(Debug)]
pub struct Planes<'a> {
    /// The window's top-left corner, in luma samples.
    x0: usize,
    y0: usize,
    width: usize,
    height: usize,
    bits: u32,
    subsampling: Subsampling,
    matrix: Matrix,
    y: Plane<'a>,
    chroma: Option<(Plane<'a>, Plane<'a>)>,
    alpha: Option<Plane<'a>>,
}

impl<'a> Planes<'a> {
    /// `chroma` is (Cb, Cr), absent only for monochrome; every plane must hold the samples its
    /// subsampling says, else `None`.
    pub fn new(
        bits: u32,
        subsampling: Subsampling,
        matrix: Matrix,
        y: Plane<'a>,
        chroma: Option<(Plane<'a>, Plane<'a>)>,
        alpha: Option<Plane<'a>>,
    ) -> Option<Planes<'a>> {
        if !(8..=16).contains(&bits) {
            return None;
        }
        let bytes = if bits > 8 { 2 } else { 1 };
        let (width, height) = (y.width, y.height);
        let (cw, ch) = match subsampling {
            Subsampling::Monochrome => (0, 0),
            Subsampling::S420 => (width.div_ceil(2), height.div_ceil(2)),
            Subsampling::S422 => (width.div_ceil(2), height),
            Subsampling::S444 => (width, height),
        };
        let chroma_ok = match (&chroma, subsampling) {
            (None, Subsampling::Monochrome) => true,
            (Some((cb, cr)), s) if s != Subsampling::Monochrome => [cb, cr]
                .iter()
                .all(|p| p.covers(bytes) && p.width >= cw && p.height >= ch),
            _ => false,
        };
        let alpha_ok =
            alpha.is_none_or(|a| a.covers(bytes) && a.width >= width && a.height >= height);
        (y.covers(bytes) && chroma_ok && alpha_ok).then_some(Planes {
            x0: 0,
            y0: 0,
            width,
            height,
            bits,
            subsampling,
            matrix,
            y,
            chroma,
            alpha,
        })
    }

    /// The same planes, converting only `columns` of `rows` (of the window so far): a crop
    /// that copies nothing. Each sample reads the chroma its place in the whole picture
    /// reads, as when the whole picture is converted and then cropped. `None` for an empty
    /// window or one that does not lie within.
    pub fn window(&self, columns: Range<usize>, rows: Range<usize>) -> Option<Planes<'a>> {
        let within = |r: &Range<usize>, size: usize| r.start < r.end && r.end <= size;
        if !within(&columns, self.width) || !within(&rows, self.height) {
            return None;
        }
        Some(Planes {
            x0: self.x0 + columns.start,
            y0: self.y0 + rows.start,
            width: columns.len(),
            height: rows.len(),
            ..*self
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn has_alpha(&self) -> bool {
        self.alpha.is_some()
    }

    /// Bytes a row of [`Planes::row`] takes: 3 a pixel, 4 with alpha.
    pub fn row_bytes(&self) -> usize {
        self.width * if self.has_alpha() { 4 } else { 3 }
    }

    /// Writes row `y` as 8-bit RGB (RGBA with alpha) into `out` (`row_bytes` long).
    pub fn row(&self, y: usize, out: &mut [u8]) {
        let bytes = if self.bits > 8 { 2 } else { 1 };
        let sample = |row: &[u8], x: usize| -> i32 {
            if bytes == 1 {
                i32::from(row[x])
            } else {
                i32::from(u16::from_ne_bytes([row[2 * x], row[2 * x + 1]]))
            }
        };
        let extra = self.bits - 8;
        let max = (1i32 << self.bits) - 1;
        // Limited range: luma 16..235 and chroma 16..240 (at 8 bits) stretched to 0..255.
        let (y_offset, y_scale, c_scale) = if self.matrix.full_range {
            (0, 1 << SHIFT, 1 << SHIFT)
        } else {
            (16 << extra, (255 << SHIFT) / 219, (255 << SHIFT) / 224)
        };
        let half = 128 << extra;
        // Fixed point to 8 bits: the factors' SHIFT and the depth's extra bits, rounded.
        let down = SHIFT + extra;
        let round = 1i64 << (down - 1);
        let to8 = |v: i64| ((v + round) >> down).clamp(0, 255) as u8;
        let channels = if self.has_alpha() { 4 } else { 3 };
        let y = self.y0 + y;
        let luma = self.y.row(y);
        let alpha = self.alpha.map(|a| a.row(y));
        let chroma_y = match self.subsampling {
            Subsampling::S420 => y / 2,
            _ => y,
        };
        let chroma = self
            .chroma
            .map(|(cb, cr)| (cb.row(chroma_y), cr.row(chroma_y)));
        let chroma_x = |x: usize| match self.subsampling {
            Subsampling::S420 | Subsampling::S422 => x / 2,
            _ => x,
        };
        let m = self.matrix;
        for (x, px) in out.chunks_exact_mut(channels).take(self.width).enumerate() {
            let x = self.x0 + x;
            let luma_value =
                i64::from((sample(luma, x) - y_offset).clamp(0, max)) * i64::from(y_scale);
            let (r, g, b) = match chroma {
                None => (luma_value, luma_value, luma_value),
                Some((cb, cr)) => {
                    let cx = chroma_x(x);
                    if m.identity {
                        // G, B and R planes: each scaled as luma is.
                        let c =
                            |v: i32| i64::from((v - y_offset).clamp(0, max)) * i64::from(y_scale);
                        (c(sample(cr, cx)), luma_value, c(sample(cb, cx)))
                    } else {
                        // Both factors carry SHIFT fractional bits; one SHIFT is dropped.
                        let u = i64::from(sample(cb, cx) - half) * i64::from(c_scale);
                        let v = i64::from(sample(cr, cx) - half) * i64::from(c_scale);
                        let f = |k: i32, c: i64| (i64::from(k) * c) >> SHIFT;
                        (
                            luma_value + f(m.cr_r, v),
                            luma_value - f(m.cb_g, u) - f(m.cr_g, v),
                            luma_value + f(m.cb_b, u),
                        )
                    }
                }
            };
            px[0] = to8(r);
            px[1] = to8(g);
            px[2] = to8(b);
            if let Some(a) = alpha {
                px[3] = to8(i64::from(sample(a, x)) << SHIFT);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(data: &[u8], width: usize, height: usize) -> Plane<'_> {
        Plane {
            data,
            stride: width,
            width,
            height,
        }
    }

    /// Y, Cb, Cr of a colour by BT.601 full range, the textbook way.
    fn ycbcr(r: f64, g: f64, b: f64) -> (u8, u8, u8) {
        let y = 0.299 * r + 0.587 * g + 0.114 * b;
        let cb = 128.0 + (b - y) / (2.0 * (1.0 - 0.114));
        let cr = 128.0 + (r - y) / (2.0 * (1.0 - 0.299));
        (y.round() as u8, cb.round() as u8, cr.round() as u8)
    }

    #[test]
    fn full_range_bt601_returns_the_colours() {
        let matrix = Matrix::from_nclx(6, true).expect("BT.601");
        for (r, g, b) in [
            (200.0, 30.0, 90.0),
            (10.0, 240.0, 20.0),
            (128.0, 128.0, 128.0),
        ] {
            let (y, cb, cr) = ycbcr(r, g, b);
            let luma = [y; 4];
            let (cbp, crp) = ([cb], [cr]);
            let planes = Planes::new(
                8,
                Subsampling::S420,
                matrix,
                plane(&luma, 2, 2),
                Some((plane(&cbp, 1, 1), plane(&crp, 1, 1))),
                None,
            )
            .expect("complete planes");
            let mut out = [0u8; 6];
            planes.row(1, &mut out);
            for (got, want) in out.iter().zip([r, g, b, r, g, b]) {
                assert!(
                    (f64::from(*got) - want).abs() <= 2.0,
                    "{out:?} for {r},{g},{b}"
                );
            }
        }
    }

    #[test]
    fn limited_range_ten_bit_black_and_white_reach_the_ends() {
        let matrix = Matrix::from_nclx(1, false).expect("BT.709");
        // 10-bit limited range: black Y 64, white Y 940, chroma 512.
        let luma: Vec<u8> = [64u16, 940].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let chroma: Vec<u8> = [512u16, 512].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let alpha: Vec<u8> = [1023u16, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
        fn p(d: &[u8]) -> Plane<'_> {
            Plane {
                data: d,
                stride: 4,
                width: 2,
                height: 1,
            }
        }
        let cb = p(&chroma);
        let planes = Planes::new(
            10,
            Subsampling::S444,
            matrix,
            p(&luma),
            Some((cb, cb)),
            Some(p(&alpha)),
        )
        .expect("complete planes");
        let mut out = [7u8; 8];
        planes.row(0, &mut out);
        assert_eq!(out, [0, 0, 0, 255, 255, 255, 255, 0]);
    }

    #[test]
    fn a_window_converts_the_samples_the_whole_picture_would() {
        let matrix = Matrix::from_nclx(6, true).expect("BT.601");
        // 6×4 4:2:0, every sample different: luma, then 3×2 chroma.
        let luma: Vec<u8> = (0..24).map(|v| 40 + v * 7).collect();
        let (cb, cr) = ([60u8, 200, 90, 150, 30, 240], [220u8, 50, 130, 80, 250, 10]);
        let planes = Planes::new(
            8,
            Subsampling::S420,
            matrix,
            plane(&luma, 6, 4),
            Some((plane(&cb, 3, 2), plane(&cr, 3, 2))),
            None,
        )
        .expect("complete planes");
        let whole: Vec<Vec<u8>> = (0..4)
            .map(|y| {
                let mut row = vec![0u8; 18];
                planes.row(y, &mut row);
                row
            })
            .collect();
        // Odd columns and rows: the chroma read is the whole picture's, not re-phased.
        let window = planes.window(1..4, 1..4).expect("within");
        assert_eq!(
            (window.width(), window.height(), window.row_bytes()),
            (3, 3, 9)
        );
        for y in 0..3 {
            let mut row = vec![0u8; 9];
            window.row(y, &mut row);
            assert_eq!(row, whole[y + 1][3..12], "row {y}");
        }
        // A window of a window is taken from the first.
        let inner = window.window(1..3, 2..3).expect("within");
        let mut row = vec![0u8; 6];
        inner.row(0, &mut row);
        assert_eq!(row, whole[3][6..12]);
        assert!(planes.window(4..7, 0..1).is_none(), "past the right edge");
        assert!(planes.window(2..2, 0..1).is_none(), "empty");
        assert!(
            window.window(0..3, 0..4).is_none(),
            "past the window's bottom"
        );
    }

    #[test]
    fn short_planes_are_refused() {
        let matrix = Matrix::from_nclx(1, true).expect("BT.709");
        let luma = [0u8; 16];
        let small = [0u8; 3];
        let y = plane(&luma, 4, 4);
        // 4:2:0 of 4×4 needs 2×2 chroma.
        assert!(Planes::new(
            8,
            Subsampling::S420,
            matrix,
            y,
            Some((plane(&small, 1, 3), plane(&small, 1, 3))),
            None
        )
        .is_none());
        assert!(Planes::new(8, Subsampling::S444, matrix, y, None, None).is_none());
        let liar = Plane {
            data: &small,
            stride: 4,
            width: 4,
            height: 4,
        };
        assert!(Planes::new(8, Subsampling::Monochrome, matrix, liar, None, None).is_none());
        assert!(
            Matrix::from_nclx(10, true).is_none(),
            "constant luminance is libheif's to convert"
        );
    }
}
