//! A low-memory decoder for progressive JPEGs at 1/4 or 1/8 scale. libjpeg keeps all 64
//! coefficients of every block of a progressive file until its last scan (300 MB for a 50 MP
//! 4:4:4 picture). After [`crate::scans`] has dropped what such a scale does not read, the
//! scans left are DC passes and first AC passes, which need no coefficient history; so this
//! decoder keeps only the coefficients the scaled picture is made of — the 2×2 lowest
//! frequencies of each block at 1/4 (8 bytes a block), DC at 1/8 — and turns each block into
//! the exact average of its 4×4 (or 8×8) pixel areas.
//!
//! It handles 8-bit Huffman-coded progressive files with one (grey) or three (YCbCr)
//! components, any sampling factors and restart intervals. Anything else — an AC refinement
//! that would still be needed, Adobe RGB/CMYK, 12-bit, damaged data — returns `None`, and the
//! caller decodes with libjpeg, which reports damage precisely.

use crate::jpeg::Rgb;

/// Zig-zag position → slot of the coefficients kept at 1/4 scale: (0,0), (0,1), (1,0), (1,1).
const QUARTER_SLOTS: [Option<usize>; 5] = [Some(0), Some(1), Some(2), None, Some(3)];

struct Component {
    id: u8,
    h: usize,
    v: usize,
    quant: usize,
    /// Blocks that hold picture (non-interleaved scans cover these).
    blocks_w: usize,
    blocks_h: usize,
    /// Blocks allocated: whole MCUs (interleaved scans cover these).
    stride: usize,
    rows: usize,
    /// `slots` coefficients per block, row-major over stride × rows blocks.
    coefs: Vec<i16>,
    dc_pred: i32,
}

#[derive(Default, Clone)]
struct Huffman {
    /// (code length, symbol) for each 9-bit prefix; length 0: longer code.
    fast: Vec<(u8, u8)>,
    /// Canonical decoding: for lengths 1..=16, the largest code, the first code and its index.
    max_code: [i32; 18],
    val_ptr: [i32; 17],
    min_code: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: &[u8]) -> Option<Huffman> {
        let mut t = Huffman {
            fast: vec![(0, 0); 512],
            max_code: [-1; 18],
            values: values.to_vec(),
            ..Default::default()
        };
        let mut code = 0i32;
        let mut k = 0usize;
        for len in 1..=16usize {
            let n = usize::from(counts[len - 1]);
            t.val_ptr[len] = k as i32;
            t.min_code[len] = code;
            for _ in 0..n {
                let symbol = *values.get(k)?;
                if len <= 9 {
                    let shift = 9 - len;
                    let first = (code as usize) << shift;
                    for e in t.fast.get_mut(first..first + (1 << shift))? {
                        *e = (len as u8, symbol);
                    }
                }
                code += 1;
                k += 1;
            }
            if n > 0 {
                t.max_code[len] = code - 1;
            }
            if code > (1 << len) {
                return None;
            }
            code <<= 1;
        }
        t.max_code[17] = i32::MAX;
        Some(t)
    }
}

/// Reads the entropy-coded bits of a scan: 0xFF00 is a literal 0xFF, a marker ends the data
/// (zeros are read past it, as libjpeg does, and counted as an error at the end).
struct Bits<'a> {
    data: &'a [u8],
    at: usize,
    acc: u64,
    count: u32,
    hit_marker: bool,
    /// Zero bytes fed in after the data ended.
    phantom: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], at: usize) -> Bits<'a> {
        Bits {
            data,
            at,
            acc: 0,
            count: 0,
            hit_marker: false,
            phantom: 0,
        }
    }

    /// Whether bits past the end of the data were used (the data is damaged or cut short).
    fn overran(&self) -> bool {
        self.phantom * 8 > self.count
    }

    fn fill(&mut self) {
        while self.count <= 56 {
            let mut byte = 0u8;
            if self.hit_marker {
                self.phantom += 1;
            } else {
                match self.data.get(self.at) {
                    Some(0xFF) => match self.data.get(self.at + 1) {
                        Some(0x00) => {
                            byte = 0xFF;
                            self.at += 2;
                        }
                        _ => self.hit_marker = true,
                    },
                    Some(&b) => {
                        byte = b;
                        self.at += 1;
                    }
                    None => self.hit_marker = true,
                }
                if self.hit_marker {
                    self.phantom += 1;
                }
            }
            self.acc |= u64::from(byte) << (56 - self.count);
            self.count += 8;
        }
    }

    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        self.fill();
        let v = (self.acc >> (64 - n)) as u32;
        self.acc <<= n;
        self.count -= n;
        v
    }

    fn bit(&mut self) -> u32 {
        self.bits(1)
    }

    fn decode(&mut self, t: &Huffman) -> Option<u8> {
        self.fill();
        let (len, symbol) = t.fast[(self.acc >> 55) as usize];
        if len > 0 {
            self.acc <<= len;
            self.count -= u32::from(len);
            return Some(symbol);
        }
        let mut code = 0i32;
        for len in 1..=16usize {
            code = (code << 1) | self.bit() as i32;
            if code <= t.max_code[len] {
                let i = t.val_ptr[len] + code - t.min_code[len];
                return t.values.get(usize::try_from(i).ok()?).copied();
            }
        }
        None
    }

    /// A `size`-bit magnitude, sign-extended as JPEG codes it.
    fn receive_extend(&mut self, size: u8) -> i32 {
        if size == 0 {
            return 0;
        }
        let v = self.bits(u32::from(size)) as i32;
        if v < (1 << (size - 1)) {
            v - (1 << size) + 1
        } else {
            v
        }
    }

    /// After a restart interval: drop the partial byte and step over the RSTn marker.
    fn restart(&mut self) -> Option<()> {
        if self.overran() {
            return None;
        }
        self.phantom = 0;
        self.acc = 0;
        self.count = 0;
        self.hit_marker = false;
        while self.data.get(self.at) == Some(&0xFF) && self.data.get(self.at + 1) == Some(&0xFF) {
            self.at += 1;
        }
        match (self.data.get(self.at), self.data.get(self.at + 1)) {
            (Some(0xFF), Some(0xD0..=0xD7)) => {
                self.at += 2;
                Some(())
            }
            _ => None,
        }
    }
}

/// Decodes `data` (a progressive JPEG) at `eighths`/8 (1 or 2) with little memory, or `None`
/// when this decoder does not cover the file; see the module doc.
pub fn decode(data: &[u8], eighths: u8) -> Option<Rgb> {
    let slots = match eighths {
        1 => 1,
        2 => 4,
        _ => return None,
    };
    // Without the scans the scale does not read (when there are any to drop); an AC
    // refinement still left makes `scan` give up.
    let selected = crate::scans::for_scale(data, eighths);
    Decoder::new(slots).run(selected.as_deref().unwrap_or(data))
}

struct Decoder {
    slots: usize,
    quant: [[u16; 64]; 4],
    dc_tables: [Option<Huffman>; 4],
    ac_tables: [Option<Huffman>; 4],
    components: Vec<Component>,
    width: usize,
    height: usize,
    hmax: usize,
    vmax: usize,
    restart_interval: usize,
    adobe_transform: Option<u8>,
}

fn be16(d: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([
        *d.get(at)?,
        *d.get(at + 1)?,
    ])))
}

impl Decoder {
    fn new(slots: usize) -> Decoder {
        Decoder {
            slots,
            quant: [[0; 64]; 4],
            dc_tables: Default::default(),
            ac_tables: Default::default(),
            components: Vec::new(),
            width: 0,
            height: 0,
            hmax: 1,
            vmax: 1,
            restart_interval: 0,
            adobe_transform: None,
        }
    }

    fn run(mut self, d: &[u8]) -> Option<Rgb> {
        let mut at = 2;
        loop {
            if *d.get(at)? != 0xFF {
                return None;
            }
            let marker = *d.get(at + 1)?;
            if marker == 0xFF {
                at += 1;
                continue;
            }
            if marker == 0xD9 {
                break;
            }
            let len = be16(d, at + 2)?;
            let body = d.get(at + 4..at + 2 + len)?;
            match marker {
                0xDB => self.quant_tables(body)?,
                0xC4 => self.huffman_tables(body)?,
                0xC2 => self.frame(body)?,
                0xDD => self.restart_interval = be16(body, 0)?,
                0xEE if body.starts_with(b"Adobe") => self.adobe_transform = body.get(11).copied(),
                0xDA => {
                    at = self.scan(d, body, at + 2 + len)?;
                    continue;
                }
                0xC0 | 0xC1 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
                _ => {}
            }
            at += 2 + len;
        }
        self.picture()
    }

    fn quant_tables(&mut self, mut body: &[u8]) -> Option<()> {
        while let Some(&pq_tq) = body.first() {
            let (precision, id) = (pq_tq >> 4, usize::from(pq_tq & 15));
            let table = self.quant.get_mut(id)?;
            let size = if precision == 0 { 64 } else { 128 };
            let values = body.get(1..1 + size)?;
            for (k, q) in table.iter_mut().enumerate() {
                *q = if precision == 0 {
                    u16::from(values[k])
                } else {
                    u16::from_be_bytes([values[2 * k], values[2 * k + 1]])
                };
            }
            body = &body[1 + size..];
        }
        Some(())
    }

    fn huffman_tables(&mut self, mut body: &[u8]) -> Option<()> {
        while let Some(&tc_th) = body.first() {
            let counts: [u8; 16] = body.get(1..17)?.try_into().ok()?;
            let n: usize = counts.iter().map(|&c| usize::from(c)).sum();
            let table = Huffman::new(&counts, body.get(17..17 + n)?)?;
            let id = usize::from(tc_th & 15);
            match tc_th >> 4 {
                0 => *self.dc_tables.get_mut(id)? = Some(table),
                1 => *self.ac_tables.get_mut(id)? = Some(table),
                _ => return None,
            }
            body = &body[17 + n..];
        }
        Some(())
    }

    fn frame(&mut self, body: &[u8]) -> Option<()> {
        if *body.first()? != 8 || !self.components.is_empty() {
            return None;
        }
        self.height = be16(body, 1)?;
        self.width = be16(body, 3)?;
        let n = usize::from(*body.get(5)?);
        if self.width == 0 || self.height == 0 || !(n == 1 || n == 3) {
            return None;
        }
        let mut comps = Vec::new();
        for i in 0..n {
            let c = body.get(6 + 3 * i..9 + 3 * i)?;
            let (h, v) = (usize::from(c[1] >> 4), usize::from(c[1] & 15));
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) || c[2] > 3 {
                return None;
            }
            comps.push((c[0], h, v, usize::from(c[2])));
        }
        self.hmax = comps.iter().map(|c| c.1).max()?;
        self.vmax = comps.iter().map(|c| c.2).max()?;
        let mcus_x = self.width.div_ceil(8 * self.hmax);
        let mcus_y = self.height.div_ceil(8 * self.vmax);
        for (id, h, v, quant) in comps {
            let (stride, rows) = (mcus_x * h, mcus_y * v);
            self.components.push(Component {
                id,
                h,
                v,
                quant,
                blocks_w: (self.width * h).div_ceil(self.hmax).div_ceil(8),
                blocks_h: (self.height * v).div_ceil(self.vmax).div_ceil(8),
                stride,
                rows,
                coefs: vec![0; stride.checked_mul(rows)?.checked_mul(self.slots)?],
                dc_pred: 0,
            });
        }
        Some(())
    }

    /// Decodes one scan whose header is `header` and data begins at `from`; returns where the
    /// next marker is.
    fn scan(&mut self, d: &[u8], header: &[u8], from: usize) -> Option<usize> {
        let n = usize::from(*header.first()?);
        if !(1..=4).contains(&n) {
            return None;
        }
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let id = *header.get(1 + 2 * i)?;
            let tables = *header.get(2 + 2 * i)?;
            let c = self.components.iter().position(|c| c.id == id)?;
            members.push((c, usize::from(tables >> 4), usize::from(tables & 15)));
        }
        let start = *header.get(1 + 2 * n)?;
        let end = *header.get(2 + 2 * n)?;
        let (ah, al) = (header.get(3 + 2 * n)? >> 4, header.get(3 + 2 * n)? & 15);
        if start > end || end > 63 || al > 13 {
            return None;
        }
        if start > 0 && (n != 1 || ah != 0) {
            // Interleaved AC scans are not JPEG; AC refinements need the history we dropped.
            return None;
        }
        let mut bits = Bits::new(d, from);
        for c in &mut self.components {
            c.dc_pred = 0;
        }
        let mut eob_run = 0u32;
        // Non-interleaved: one block per unit, the component's own blocks row by row.
        let own_blocks_w = self.components[members[0].0].blocks_w;
        let mcus = if n == 1 {
            own_blocks_w * self.components[members[0].0].blocks_h
        } else {
            self.width.div_ceil(8 * self.hmax) * self.height.div_ceil(8 * self.vmax)
        };
        let mcus_x = self.width.div_ceil(8 * self.hmax);
        for mcu in 0..mcus {
            if self.restart_interval > 0 && mcu > 0 && mcu % self.restart_interval == 0 {
                bits.restart()?;
                for c in &mut self.components {
                    c.dc_pred = 0;
                }
                eob_run = 0;
            }
            if n == 1 {
                let (x, y) = (mcu % own_blocks_w, mcu / own_blocks_w);
                self.unit(
                    &mut bits,
                    members[0],
                    x,
                    y,
                    start,
                    end,
                    ah,
                    al,
                    &mut eob_run,
                )?;
            } else {
                let (mx, my) = (mcu % mcus_x, mcu / mcus_x);
                for &member in &members {
                    let (h, v) = (self.components[member.0].h, self.components[member.0].v);
                    for by in 0..v {
                        for bx in 0..h {
                            self.unit(
                                &mut bits,
                                member,
                                mx * h + bx,
                                my * v + by,
                                start,
                                end,
                                ah,
                                al,
                                &mut eob_run,
                            )?;
                        }
                    }
                }
            }
        }
        if bits.overran() {
            return None;
        }
        crate::scans::entropy_end(d, from)
    }

    /// One block of one scan.
    #[allow(clippy::too_many_arguments)]
    fn unit(
        &mut self,
        bits: &mut Bits<'_>,
        (c, dc_table, ac_table): (usize, usize, usize),
        x: usize,
        y: usize,
        start: u8,
        end: u8,
        ah: u8,
        al: u8,
        eob_run: &mut u32,
    ) -> Option<()> {
        let slots = self.slots;
        let comp = &mut self.components[c];
        let base = (y * comp.stride + x) * slots;
        let block = comp.coefs.get_mut(base..base + slots)?;
        if start == 0 {
            if ah == 0 {
                let t = self.dc_tables.get(dc_table)?.as_ref()?;
                let size = bits.decode(t)?;
                if size > 11 {
                    return None;
                }
                comp.dc_pred = comp.dc_pred.wrapping_add(bits.receive_extend(size));
                block[0] = (comp.dc_pred << al) as i16;
            } else if bits.bit() == 1 {
                block[0] |= 1 << al;
            }
            return Some(());
        }
        if *eob_run > 0 {
            *eob_run -= 1;
            return Some(());
        }
        let t = self.ac_tables.get(ac_table)?.as_ref()?;
        let mut k = usize::from(start);
        while k <= usize::from(end) {
            let rs = bits.decode(t)?;
            let (run, size) = (usize::from(rs >> 4), rs & 15);
            if size == 0 {
                if run < 15 {
                    *eob_run = (1u32 << run) + bits.bits(u32::from(run as u8)) - 1;
                    break;
                }
                k += 16;
                continue;
            }
            k += run;
            let value = bits.receive_extend(size) << al;
            if slots == 4 {
                if let Some(Some(slot)) = QUARTER_SLOTS.get(k) {
                    block[*slot] = value as i16;
                }
            }
            k += 1;
        }
        Some(())
    }

    fn picture(self) -> Option<Rgb> {
        let ids: Vec<u8> = self.components.iter().map(|c| c.id).collect();
        // Adobe's "no transform", or libjpeg's guess from component ids 'R', 'G', 'B': the
        // samples are RGB, not YCbCr.
        if self.components.len() == 3 && (self.adobe_transform == Some(0) || ids == b"RGB") {
            return None;
        }
        let scale = if self.slots == 4 { 4 } else { 8 };
        let (w, h) = (self.width.div_ceil(scale), self.height.div_ceil(scale));
        let per_block = 8 / scale;
        // Each component at its own reduced resolution.
        let planes: Vec<(Vec<u8>, usize)> = self
            .components
            .iter()
            .map(|c| {
                let q = &self.quant[c.quant];
                let pw = c.stride * per_block;
                let mut plane = vec![0u8; pw * c.rows * per_block];
                for by in 0..c.rows {
                    for bx in 0..c.stride {
                        let f = &c.coefs[(by * c.stride + bx) * self.slots..][..self.slots];
                        let dc = f32::from(f[0]) * f32::from(q[0]);
                        if per_block == 1 {
                            plane[by * pw + bx] =
                                (dc / 8.0 + 128.0).round().clamp(0.0, 255.0) as u8;
                            continue;
                        }
                        // Averages of the four 4×4 quarters of the block's inverse DCT, from the
                        // frequencies (0,0), (0,1), (1,0), (1,1): c0 = 1/(2√2), c1 = ½·mean of
                        // cos((2x+1)π/16) over x = 0..3.
                        const C0: f32 = 0.353_553_4;
                        const C1: f32 = 0.320_364_2;
                        let f01 = f32::from(f[1]) * f32::from(q[1]);
                        let f10 = f32::from(f[2]) * f32::from(q[2]);
                        let f11 = f32::from(f[3]) * f32::from(q[4]);
                        for (dy, sy) in [(0, 1.0f32), (1, -1.0)] {
                            for (dx, sx) in [(0, 1.0f32), (1, -1.0)] {
                                let v = C0 * C0 * dc
                                    + C0 * C1 * sx * f01
                                    + C1 * C0 * sy * f10
                                    + C1 * C1 * sx * sy * f11
                                    + 128.0;
                                plane[(by * 2 + dy) * pw + bx * 2 + dx] =
                                    v.round().clamp(0.0, 255.0) as u8;
                            }
                        }
                    }
                }
                (plane, pw)
            })
            .collect();
        let mut pixels = vec![0u8; w.checked_mul(h)?.checked_mul(3)?];
        // A sample of a subsampled component covers hmax/h × vmax/v output pixels; between
        // sample centres it is interpolated linearly (libjpeg's "fancy" upsampling is the
        // same triangle filter for 2×).
        let at = |i: usize, x: usize, y: usize| -> f32 {
            let c = &self.components[i];
            let (plane, pw) = &planes[i];
            let (plane_w, plane_h) = (c.blocks_w * per_block, c.blocks_h * per_block);
            if c.h == self.hmax && c.v == self.vmax {
                return f32::from(plane[y * pw + x]);
            }
            let position = |p: usize, s: usize, max: usize, len: usize| {
                let f = ((p as f32 + 0.5) * s as f32 / max as f32 - 0.5).max(0.0);
                let i = (f as usize).min(len.saturating_sub(1));
                (i, (i + 1).min(len.saturating_sub(1)), f - i as f32)
            };
            let (x0, x1, fx) = position(x, c.h, self.hmax, plane_w.max(1));
            let (y0, y1, fy) = position(y, c.v, self.vmax, plane_h.max(1));
            let s = |yy: usize, xx: usize| f32::from(plane[yy * pw + xx]);
            let top = s(y0, x0) + (s(y0, x1) - s(y0, x0)) * fx;
            let bottom = s(y1, x0) + (s(y1, x1) - s(y1, x0)) * fx;
            top + (bottom - top) * fy
        };
        for y in 0..h {
            for x in 0..w {
                let luma = at(0, x, y);
                let px = &mut pixels[(y * w + x) * 3..][..3];
                if self.components.len() == 1 {
                    px.fill(luma as u8);
                    continue;
                }
                let (cb, cr) = (at(1, x, y) - 128.0, at(2, x, y) - 128.0);
                let rgb = [
                    luma + 1.402 * cr,
                    luma - 0.344_136 * cb - 0.714_136 * cr,
                    luma + 1.772 * cb,
                ];
                for (p, v) in px.iter_mut().zip(rgb) {
                    *p = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        Some(Rgb {
            pixels,
            width: u32::try_from(w).ok()?,
            height: u32::try_from(h).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(width: u32, height: u32) -> Vec<u8> {
        let mut rgb = Vec::new();
        for y in 0..height {
            for x in 0..width {
                let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
                rgb.extend_from_slice(&[
                    (255.0 * fx) as u8,
                    (128.0 + 100.0 * (fx * 9.0 + fy * 5.0).sin()) as u8,
                    (255.0 * fy) as u8,
                ]);
            }
        }
        rgb
    }

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse = a
            .iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
    }

    fn progressive(rgb: &[u8], w: u32, h: u32, sampling: (u8, u8)) -> Vec<u8> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_fastest_defaults();
        c.set_size(w as usize, h as usize);
        c.set_quality(90.0);
        c.set_progressive_mode();
        c.set_chroma_sampling_pixel_sizes(sampling, sampling);
        let mut s = c.start_compress(Vec::new()).unwrap();
        s.write_scanlines(rgb).unwrap();
        s.finish().unwrap()
    }

    /// This decoder covers `file` at `eighths`/8 and comes within 30 dB of libjpeg decoding
    /// every scan at that scale.
    fn assert_close_to_libjpeg(file: &[u8], eighths: u8, label: &str) {
        let ours = decode(file, eighths).expect("covered");
        let theirs = crate::jpeg::decode_rgb_scans(file, eighths, false)
            .unwrap()
            .unwrap();
        assert_eq!((ours.width, ours.height), (theirs.width, theirs.height));
        let p = psnr(&ours.pixels, &theirs.pixels);
        assert!(p > 30.0, "{label} 1/{}: {p:.1} dB", 8 / eighths);
    }

    #[test]
    fn matches_libjpeg_at_a_quarter_and_an_eighth() {
        let (w, h) = (203u32, 141u32);
        let rgb = photo(w, h);
        for sampling in [(1, 1), (2, 2), (2, 1)] {
            let file = progressive(&rgb, w, h, sampling);
            for eighths in [1u8, 2] {
                assert_close_to_libjpeg(&file, eighths, &format!("{sampling:?}"));
            }
        }
    }

    /// mozjpeg's own progressive script (its default profile) with a restart marker every 7
    /// MCUs: libjpeg's C API, as the crate exposes no restart setting.
    fn progressive_with_restarts(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
        use mozjpeg_sys::*;
        // SAFETY: the libjpeg compress sequence on zeroed structs, as its manual gives it; the
        // rows point into `rgb`, which outlives the calls; the output buffer is freed once.
        unsafe {
            let mut err: jpeg_error_mgr = std::mem::zeroed();
            let mut cinfo: jpeg_compress_struct = std::mem::zeroed();
            cinfo.common.err = jpeg_std_error(&mut err);
            jpeg_create_compress(&mut cinfo);
            let mut buffer: *mut u8 = std::ptr::null_mut();
            let mut size: std::ffi::c_ulong = 0;
            jpeg_mem_dest(&mut cinfo, &mut buffer, &mut size);
            cinfo.image_width = w;
            cinfo.image_height = h;
            cinfo.input_components = 3;
            cinfo.in_color_space = J_COLOR_SPACE::JCS_RGB;
            jpeg_set_defaults(&mut cinfo);
            jpeg_set_quality(&mut cinfo, 88, 1);
            jpeg_simple_progression(&mut cinfo);
            // In MCUs for every scan (`restart_in_rows` would differ per scan, and mozjpeg's
            // optimised scans then keep the first scan's DRI).
            cinfo.restart_interval = 7;
            jpeg_start_compress(&mut cinfo, 1);
            while cinfo.next_scanline < h {
                let row = rgb
                    .as_ptr()
                    .add(cinfo.next_scanline as usize * w as usize * 3);
                jpeg_write_scanlines(&mut cinfo, &row, 1);
            }
            jpeg_finish_compress(&mut cinfo);
            let out = std::slice::from_raw_parts(buffer, size as usize).to_vec();
            jpeg_destroy_compress(&mut cinfo);
            libc::free(buffer.cast());
            out
        }
    }

    #[test]
    fn restart_markers_and_another_scan_script_decode() {
        let (w, h) = (150u32, 90u32);
        let rgb = photo(w, h);
        let file = progressive_with_restarts(&rgb, w, h);
        assert!(
            file.windows(2)
                .any(|p| p[0] == 0xFF && (0xD0..=0xD7).contains(&p[1])),
            "the file has restart markers"
        );
        for eighths in [1u8, 2] {
            assert_close_to_libjpeg(&file, eighths, "restarts");
        }
    }

    /// Uploads are untrusted: damaged copies of progressive files (bytes changed, cut, repeated,
    /// in the headers and the entropy-coded data alike, 4:2:0, 4:4:4 and restart markers) are
    /// decoded or refused, never a panic, an overflow (checked in test builds) or a hang.
    #[test]
    fn damaged_files_are_decoded_or_refused_never_a_panic() {
        let rgb = photo(96, 72);
        let seeds = [
            progressive(&rgb, 96, 72, (2, 2)),
            progressive(&rgb, 96, 72, (1, 1)),
            progressive_with_restarts(&rgb, 96, 72),
        ];
        // xorshift64*: the same damaged files on every run.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |bound: usize| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % bound.max(1)
        };
        let mut decoded = 0;
        for round in 0..3000 {
            let mut file = seeds[round % seeds.len()].clone();
            // Most damage where the headers are: the first few hundred bytes.
            for _ in 0..1 + next(4) {
                let at = if next(2) == 0 {
                    next(400.min(file.len()))
                } else {
                    next(file.len())
                };
                match next(5) {
                    0 => file[at] ^= 1 << next(8),
                    1 => file[at] = [0x00, 0xFF, 0x7F, 0x80, 0x01][next(5)],
                    2 => file.truncate(at.max(2)),
                    3 => {
                        let len = next(16).min(file.len() - at);
                        let copy = file[at..at + len].to_vec();
                        let to = next(file.len());
                        file.splice(to..to, copy);
                    }
                    _ => {
                        let end = (at + 1 + next(8)).min(file.len());
                        file.drain(at..end);
                    }
                }
                if file.len() < 4 {
                    break;
                }
            }
            for eighths in [1u8, 2] {
                if decode(&file, eighths).is_some() {
                    decoded += 1;
                }
            }
        }
        // Many survive a flipped bit in the entropy-coded data: the loop reached the decoding.
        assert!(decoded > 100, "only {decoded} damaged files decoded");
    }

    #[test]
    fn grey_files_decode_and_others_are_left_to_libjpeg() {
        let (w, h) = (64u32, 40u32);
        let grey: Vec<u8> = (0..w * h).map(|i| (i % 200) as u8).collect();
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_GRAYSCALE);
        c.set_fastest_defaults();
        c.set_size(w as usize, h as usize);
        c.set_progressive_mode();
        let mut s = c.start_compress(Vec::new()).unwrap();
        s.write_scanlines(&grey).unwrap();
        let file = s.finish().unwrap();
        let ours = decode(&file, 2).expect("covered");
        assert_eq!((ours.width, ours.height), (16, 10));
        // Half scale, baseline and damaged files are not this decoder's.
        assert!(decode(&file, 4).is_none());
        let rgb = photo(32, 32);
        let base = crate::jpeg::encode_rgb(&rgb, 32, 32, 80, false, &Default::default()).unwrap();
        assert!(decode(&base, 2).is_none());
        let prog = progressive(&rgb, 32, 32, (2, 2));
        assert!(decode(&prog[..prog.len() / 3], 2).is_none());
    }
}
