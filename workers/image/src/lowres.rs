//! A compact decoder for progressive JPEGs at 1/8 to 1/2 scale. libjpeg keeps all 64
//! coefficients of every block of a progressive file until its last scan (300 MB for a 50 MP
//! 4:4:4 picture, zeroed and faulted in for every job) and turns them into pixels after the
//! last scan. An IDCT at `n`/8 reads only the `n`×`n` lowest frequencies of each block, so this
//! decoder keeps only those (2·n² bytes a block) and one bit per coefficient saying it is
//! already non-zero (8 bytes a block: a refinement pass sends a correction bit for exactly
//! those, so the bitstream cannot be followed without them). [`crate::scans`] first drops the
//! scans such a scale does not need.
//!
//! Each output sample is the exact average of the area of the full-size block it covers (the
//! basis functions' means over it), chroma is upsampled as libjpeg's "fancy" upsampling does
//! for 2×1 and 2×2 sampling, and YCbCr becomes RGB by JFIF's equations in libjpeg's fixed
//! point. It handles 8-bit Huffman-coded progressive files with one (grey) or three (YCbCr)
//! components and restart intervals. Anything else — other sampling, Adobe RGB/CMYK, 12-bit,
//! damaged data — returns `None`, and the caller decodes with libjpeg, which reports damage
//! precisely.

use crate::jpeg::Rgb;
use crate::scans::{segment, Segment};

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
    /// `n`×`n` coefficients per block, row-major over stride × rows blocks.
    coefs: Vec<i16>,
    /// Per block, which zig-zag positions are already non-zero (what AC refinement scans
    /// need; kept for every file, as finding out whether it has such scans would read the
    /// whole file once more).
    nonzero: Vec<u64>,
    dc_pred: i32,
}

#[derive(Default, Clone)]
struct Huffman {
    /// (code length, symbol) for each `FAST_BITS`-bit prefix; length 0: longer code.
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
            fast: vec![(0, 0); 1 << FAST_BITS],
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
                if len <= FAST_BITS as usize {
                    let shift = FAST_BITS as usize - len;
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

    /// A code longer than `FAST_BITS` at the start of the next 16 bits: its length and symbol.
    #[inline(always)]
    fn long_code(&self, next16: u32) -> Option<(u32, u8)> {
        for len in FAST_BITS as usize + 1..=16 {
            let code = (next16 >> (16 - len)) as i32;
            if code <= self.max_code[len] {
                let i = self.val_ptr[len] + code - self.min_code[len];
                return Some((len as u32, *self.values.get(usize::try_from(i).ok()?)?));
            }
        }
        None
    }
}

/// Bits of a Huffman code looked up at once; longer codes are decoded by their length from the
/// next 16 bits, not bit by bit.
const FAST_BITS: u32 = 11;

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
        // Most of the time the next 8 bytes hold no 0xFF (no stuffing, no marker): take as
        // many of them as fit at once.
        if !self.hit_marker && self.count <= 56 {
            if let Some(chunk) = self.data.get(self.at..self.at + 8) {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                let word = u64::from_be_bytes(word);
                let inverted = !word;
                let has_ff = inverted.wrapping_sub(0x0101_0101_0101_0101)
                    & !inverted
                    & 0x8080_8080_8080_8080
                    != 0;
                if !has_ff {
                    let bytes = (64 - self.count) / 8;
                    let fresh = if bytes == 8 {
                        word
                    } else {
                        word >> (64 - 8 * bytes)
                    };
                    self.acc |= fresh << (64 - self.count - 8 * bytes);
                    self.count += 8 * bytes;
                    self.at += bytes as usize;
                    return;
                }
            }
        }
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

    #[inline(always)]
    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.count < n {
            self.fill();
        }
        let v = (self.acc >> (64 - n)) as u32;
        self.acc <<= n;
        self.count -= n;
        v
    }

    #[inline(always)]
    fn bit(&mut self) -> u32 {
        self.bits(1)
    }

    #[inline(always)]
    fn decode(&mut self, t: &Huffman) -> Option<u8> {
        if self.count < 16 {
            self.fill();
        }
        let (len, symbol) = t.fast[(self.acc >> (64 - FAST_BITS)) as usize];
        if len > 0 {
            self.acc <<= len;
            self.count -= u32::from(len);
            return Some(symbol);
        }
        let (len, symbol) = t.long_code((self.acc >> 48) as u32)?;
        self.acc <<= len;
        self.count -= len;
        Some(symbol)
    }

    /// A `size`-bit magnitude, sign-extended as JPEG codes it.
    #[inline(always)]
    fn receive_extend(&mut self, size: u8) -> i32 {
        if size == 0 {
            return 0;
        }
        // Without a branch: the sign of a coefficient is a coin toss to a branch predictor.
        let v = self.bits(u32::from(size)) as i32;
        let negative = ((v >> (size - 1)) & 1) ^ 1;
        v - (negative << size) + negative
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

/// The largest scale, in eighths, this decoder covers.
pub const MOST_EIGHTHS: u8 = 4;

/// Decodes `data` (a progressive JPEG) at `eighths`/8 (1 to 4) with little memory, or `None`
/// when this decoder does not cover the file; see the module doc.
pub fn decode(data: &[u8], eighths: u8) -> Option<Rgb> {
    if !(1..=4).contains(&eighths) {
        return None;
    }
    // Without the scans the scale does not read (when there are any to drop).
    let selected = crate::scans::for_scale(data, eighths);
    let data = selected.as_deref().unwrap_or(data);
    Decoder::new(usize::from(eighths)).run(data)
}

/// Most bytes this decoder holds besides the RGB picture it returns, for a `file_bytes` file
/// whose libjpeg coefficient buffer is `coefficient_bytes` (128 bytes a block), decoded at
/// `eighths`/8 to a picture of `rgb_bytes`: its copy of the file without the scans the scale
/// does not read, and the larger of its kept coefficients (with a bit of history for each
/// coefficient) plus one plane being made, or its planes (luma and two upsampled chroma planes,
/// one more while it is being made: 4 bytes a pixel) once the coefficients are dropped.
pub fn held_bytes(coefficient_bytes: u64, eighths: u8, file_bytes: u64, rgb_bytes: u64) -> u64 {
    let n = u64::from(eighths.clamp(1, 4));
    let coefficients = coefficient_bytes / 128 * (2 * n * n + 8);
    let planes = rgb_bytes / 3 * 4;
    file_bytes + (coefficients + planes).max(planes + rgb_bytes) - rgb_bytes
}

/// For an `n`×`n` output block: zig-zag position → slot of the coefficient kept, the `n`×`n`
/// lowest frequencies row by row (`u8::MAX`: not kept).
fn kept_slots(n: usize) -> [u8; 64] {
    let mut slots = [u8::MAX; 64];
    for (k, &natural) in ZIGZAG.iter().enumerate() {
        let (row, col) = (natural / 8, natural % 8);
        if row < n && col < n {
            slots[k] = (row * n + col) as u8;
        }
    }
    slots
}

/// Zig-zag position → natural (row-major) position in an 8×8 block.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// `w[y][u]`: the mean of the 8-point inverse DCT's basis function `u` (JPEG's scaling,
/// `C(u)/2 · cos((2x+1)uπ/16)` taken as continuous in x) over output pixel `y` of `n`, so an
/// output sample is the exact average of the full-size block's area it covers (from the kept
/// frequencies).
fn area_weights(n: usize) -> [[f32; 4]; 4] {
    let mut w = [[0f32; 4]; 4];
    for (y, row) in w.iter_mut().enumerate().take(n) {
        let (a, b) = (8.0 * y as f64 / n as f64, 8.0 * (y + 1) as f64 / n as f64);
        for (u, cell) in row.iter_mut().enumerate().take(n) {
            let c = if u == 0 { 0.5f64.sqrt() } else { 1.0 } / 2.0;
            let mean = if u == 0 {
                1.0
            } else {
                let f = u as f64 * std::f64::consts::PI / 8.0;
                ((f * b).sin() - (f * a).sin()) / (f * (b - a))
            };
            *cell = (c * mean) as f32;
        }
    }
    w
}

struct Decoder {
    /// Output pixels per block side (the scale in eighths).
    n: usize,
    slots: [u8; 64],
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
    fn new(n: usize) -> Decoder {
        Decoder {
            n,
            slots: kept_slots(n),
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
            let Segment {
                marker, body, end, ..
            } = segment(d, at)?;
            match marker {
                0xD9 => break,
                0xDB => self.quant_tables(body)?,
                0xC4 => self.huffman_tables(body)?,
                0xC2 => self.frame(body)?,
                0xDD => self.restart_interval = be16(body, 0)?,
                0xEE if body.starts_with(b"Adobe") => self.adobe_transform = body.get(11).copied(),
                0xDA => {
                    at = self.scan(d, body, end)?;
                    continue;
                }
                0xC0 | 0xC1 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
                _ => {}
            }
            at = end;
        }
        self.picture()
    }

    fn quant_tables(&mut self, mut body: &[u8]) -> Option<()> {
        while let Some(&pq_tq) = body.first() {
            let (precision, id) = (pq_tq >> 4, usize::from(pq_tq & 15));
            let table = self.quant.get_mut(id)?;
            let size = if precision == 0 { 64 } else { 128 };
            let values = body.get(1..1 + size)?;
            // Stored in zig-zag order, kept in natural order.
            for (k, &natural) in ZIGZAG.iter().enumerate() {
                table[natural] = if precision == 0 {
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
        let per_block = self.n * self.n;
        for (id, h, v, quant) in comps {
            let (stride, rows) = (mcus_x * h, mcus_y * v);
            let blocks = stride.checked_mul(rows)?;
            self.components.push(Component {
                id,
                h,
                v,
                quant,
                blocks_w: (self.width * h).div_ceil(self.hmax).div_ceil(8),
                blocks_h: (self.height * v).div_ceil(self.vmax).div_ceil(8),
                stride,
                rows,
                coefs: vec![0; blocks.checked_mul(per_block)?],
                nonzero: vec![0; blocks],
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
        if start > 0 && n != 1 {
            // Interleaved AC scans are not JPEG.
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
        let row_len = if n == 1 { own_blocks_w } else { mcus_x };
        let (mut column, mut row, mut to_restart) = (0, 0, self.restart_interval);
        for mcu in 0..mcus {
            if mcu > 0 {
                column += 1;
                if column == row_len {
                    (column, row) = (0, row + 1);
                }
            }
            if self.restart_interval > 0 {
                if to_restart == 0 {
                    bits.restart()?;
                    for c in &mut self.components {
                        c.dc_pred = 0;
                    }
                    eob_run = 0;
                    to_restart = self.restart_interval;
                }
                to_restart -= 1;
            }
            if n == 1 {
                // A block inside an end-of-band run of a first AC pass holds nothing new.
                if start > 0 && ah == 0 && eob_run > 0 {
                    eob_run -= 1;
                    continue;
                }
                let (x, y) = (column, row);
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
                let (mx, my) = (column, row);
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
        let per_block = self.n * self.n;
        let comp = &mut self.components[c];
        let index = y * comp.stride + x;
        let base = index * per_block;
        let block = comp.coefs.get_mut(base..base + per_block)?;
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
        let mut nonzero = comp.nonzero.get(index).copied().unwrap_or(0);
        let slots = &self.slots;
        if ah == 0 {
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
                if k > 63 {
                    return None;
                }
                let value = bits.receive_extend(size) << al;
                nonzero |= 1 << k;
                if let Some(v) = block.get_mut(usize::from(slots[k])) {
                    *v = value as i16;
                }
                k += 1;
            }
        } else {
            // libjpeg's `decode_mcu_AC_refine`: a correction bit for every coefficient of the
            // band already non-zero, and new coefficients (±1 at this bit) placed among the
            // zero ones.
            let (p1, m1) = (1i16 << al, (-1i16) << al);
            let refine = |k: usize, bits: &mut Bits<'_>, block: &mut [i16]| {
                if bits.bit() == 1 {
                    if let Some(v) = block.get_mut(usize::from(slots[k])) {
                        if *v & p1 == 0 {
                            *v = v.wrapping_add(if *v >= 0 { p1 } else { m1 });
                        }
                    }
                }
            };
            let mut k = usize::from(start);
            let end = usize::from(end);
            if *eob_run == 0 {
                let t = self.ac_tables.get(ac_table)?.as_ref()?;
                while k <= end {
                    let rs = bits.decode(t)?;
                    let (mut run, size) = (i32::from(rs >> 4), rs & 15);
                    let mut new = 0i16;
                    if size != 0 {
                        if size != 1 {
                            return None;
                        }
                        new = if bits.bit() == 1 { p1 } else { m1 };
                    } else if run != 15 {
                        *eob_run = 1u32 << run;
                        if run > 0 {
                            *eob_run += bits.bits(run as u32);
                        }
                        break;
                    }
                    // Past `run` zero-history coefficients, correcting the non-zero ones.
                    while k <= end {
                        if nonzero & (1 << k) != 0 {
                            refine(k, bits, block);
                        } else {
                            if run == 0 {
                                break;
                            }
                            run -= 1;
                        }
                        k += 1;
                    }
                    if new != 0 {
                        if k > end {
                            return None;
                        }
                        nonzero |= 1 << k;
                        if let Some(v) = block.get_mut(usize::from(slots[k])) {
                            *v = new;
                        }
                    }
                    k += 1;
                }
            }
            if *eob_run > 0 {
                // A correction bit for each non-zero coefficient left in the band, in order.
                if k <= end {
                    let band = (u64::MAX >> (63 - end)) & (u64::MAX << k);
                    let mut left = nonzero & band;
                    while left != 0 {
                        refine(left.trailing_zeros() as usize, bits, block);
                        left &= left - 1;
                    }
                }
                *eob_run -= 1;
            }
        }
        if let Some(h) = comp.nonzero.get_mut(index) {
            *h = nonzero;
        }
        Some(())
    }

    /// Each component's plane at its reduced size (block-padded: `stride × n` wide), from the
    /// kept coefficients.
    fn plane(&self, c: &Component) -> Vec<u8> {
        match self.n {
            1 => self.plane_n::<1>(c),
            2 => self.plane_n::<2>(c),
            3 => self.plane_n::<3>(c),
            _ => self.plane_n::<4>(c),
        }
    }

    fn plane_n<const N: usize>(&self, c: &Component) -> Vec<u8> {
        let (w, nn) = (area_weights(N), N * N);
        let table = &self.quant[c.quant];
        // For each kept frequency, the N×N block it adds (its basis function's area averages
        // times its quantiser): a block costs one pass over its samples per non-zero frequency,
        // and most blocks have few.
        let mut basis = [[0f32; 16]; 16];
        for (s, block) in basis.iter_mut().enumerate().take(nn) {
            let (v, u) = (s / N, s % N);
            let q = f32::from(table[v * 8 + u]);
            for (p, sample) in block.iter_mut().enumerate().take(nn) {
                *sample = w[p / N][v] * w[p % N][u] * q;
            }
        }
        let pw = c.stride * N;
        let mut plane = vec![0u8; pw * c.rows * N];
        // Rounded by the float unit itself: 2²³ added to a value of 0–255 leaves its nearest
        // integer in the low bits, with no conversion instruction (which Rust would saturate).
        let to_u8 = |v: f32| ((v + 128.0).clamp(0.0, 255.0) + 8_388_608.0).to_bits() as u8;
        for (by, blocks) in c.coefs.chunks_exact(c.stride * nn).enumerate() {
            let band = &mut plane[by * N * pw..][..N * pw];
            for (bx, f) in blocks.chunks_exact(nn).enumerate() {
                let dc = f32::from(f[0]) * basis[0][0];
                // The non-zero AC frequencies, found without a branch each: a test per
                // coefficient would be mispredicted about as often as taken.
                let mut ac = 0u32;
                for (i, &v) in f.iter().enumerate().skip(1) {
                    ac |= u32::from(v != 0) << i;
                }
                if ac == 0 {
                    let v = to_u8(dc);
                    for y in 0..N {
                        band[y * pw + bx * N..][..N].fill(v);
                    }
                    continue;
                }
                let mut sum = [dc; 16];
                while ac != 0 {
                    let i = ac.trailing_zeros() as usize;
                    ac &= ac - 1;
                    let v = f32::from(f[i]);
                    for (acc, &b) in sum[..nn].iter_mut().zip(&basis[i]) {
                        *acc += b * v;
                    }
                }
                for y in 0..N {
                    let out = &mut band[y * pw + bx * N..][..N];
                    for (o, &v) in out.iter_mut().zip(&sum[y * N..]) {
                        *o = to_u8(v);
                    }
                }
            }
        }
        plane
    }

    /// The RGB picture. The coefficients are dropped once the planes are made, before the
    /// picture is allocated, so the two are never held together.
    fn picture(mut self) -> Option<Rgb> {
        let ids: Vec<u8> = self.components.iter().map(|c| c.id).collect();
        // Adobe's "no transform", or libjpeg's guess from component ids 'R', 'G', 'B': the
        // samples are RGB, not YCbCr.
        if self.components.len() == 3 && (self.adobe_transform == Some(0) || ids == b"RGB") {
            return None;
        }
        let n = self.n;
        let (w, h) = ((self.width * n).div_ceil(8), (self.height * n).div_ceil(8));
        let luma = self.components.first()?;
        if luma.h != self.hmax || luma.v != self.vmax {
            return None;
        }
        let luma_plane = self.plane(luma);
        let luma_stride = luma.stride * n;
        let chroma: Vec<Vec<u8>> = self.components[1..]
            .iter()
            .map(|c| self.upsampled(c, w, h))
            .collect::<Option<_>>()?;
        self.components.clear();
        let mut pixels = vec![0u8; w.checked_mul(h)?.checked_mul(3)?];
        if chroma.is_empty() {
            for y in 0..h {
                let row = &luma_plane[y * luma_stride..][..w];
                for (px, &l) in pixels[y * w * 3..][..w * 3].chunks_exact_mut(3).zip(row) {
                    px.fill(l);
                }
            }
        } else {
            for y in 0..h {
                let yr = &luma_plane[y * luma_stride..][..w];
                let (cb, cr) = (&chroma[0][y * w..][..w], &chroma[1][y * w..][..w]);
                let out = &mut pixels[y * w * 3..][..w * 3];
                for (((px, &l), &b), &r) in out.chunks_exact_mut(3).zip(yr).zip(cb).zip(cr) {
                    let (l, b, r) = (i32::from(l), i32::from(b) - 128, i32::from(r) - 128);
                    px[0] = (l + ((CR_R * r + HALF) >> 16)).clamp(0, 255) as u8;
                    px[1] = (l + ((HALF - CB_G * b - CR_G * r) >> 16)).clamp(0, 255) as u8;
                    px[2] = (l + ((CB_B * b + HALF) >> 16)).clamp(0, 255) as u8;
                }
            }
        }
        Some(Rgb {
            pixels,
            width: u32::try_from(w).ok()?,
            height: u32::try_from(h).ok()?,
        })
    }

    /// A chroma component's plane at the output's size (`w` × `h`, tightly packed): as it is
    /// when it is not subsampled, else by libjpeg's "fancy" upsampling (the triangle filter)
    /// for 2×1 and 2×2; `None` for other sampling.
    fn upsampled(&self, c: &Component, w: usize, h: usize) -> Option<Vec<u8>> {
        let (fx, fy) = (self.hmax / c.h, self.vmax / c.v);
        if fx * c.h != self.hmax || fy * c.v != self.vmax || fx > 2 || fy > 2 {
            return None;
        }
        let n = self.n;
        let plane = self.plane(c);
        let stride = c.stride * n;
        // The component's own scaled size: its samples that hold picture.
        let cw = (self.width * c.h).div_ceil(self.hmax);
        let ch = (self.height * c.v).div_ceil(self.vmax);
        let (pw, ph) = ((cw * n).div_ceil(8).max(1), (ch * n).div_ceil(8).max(1));
        let row = |y: usize| &plane[y.min(ph - 1) * stride..][..pw];
        let mut out = vec![0u8; w * h];
        let mut sums = vec![0u16; pw];
        for y in 0..h {
            let dst = &mut out[y * w..][..w];
            if fy == 1 {
                let src = row(y);
                if fx == 1 {
                    dst.copy_from_slice(&src[..w]);
                } else {
                    for (s, &v) in sums.iter_mut().zip(src) {
                        *s = u16::from(v) * 4;
                    }
                    widen(&sums, dst, 4, 8);
                }
                continue;
            }
            // Vertically: 3/4 of the nearer row, 1/4 of the farther one.
            let near = y / 2;
            let far = if y % 2 == 0 {
                near.saturating_sub(1)
            } else {
                (near + 1).min(ph - 1)
            };
            for ((s, &a), &b) in sums.iter_mut().zip(row(near)).zip(row(far)) {
                *s = 3 * u16::from(a) + u16::from(b);
            }
            if fx == 1 {
                for (d, &s) in dst.iter_mut().zip(&sums) {
                    *d = ((s + 2) >> 2) as u8;
                }
            } else {
                widen(&sums, dst, 8, 7);
            }
        }
        Some(out)
    }
}

/// Doubles a row of sums (each 4× a sample: 4·s, or 3·near + far) horizontally with weights
/// 3/4 and 1/4, as libjpeg's fancy upsampling, into `out` (as much of it as the doubled row
/// covers), adding `even` and `odd` before the final shift (libjpeg rounds the two halves
/// differently so that errors do not pile up one way).
fn widen(sums: &[u16], out: &mut [u8], even: u16, odd: u16) {
    let Some(&last) = sums.last() else {
        return;
    };
    let at = |i: usize, out: &mut [u8]| {
        let this = 3 * sums[i];
        let left = if i == 0 { sums[0] } else { sums[i - 1] };
        if let Some(first) = out.get_mut(2 * i) {
            *first = ((this + left + even) >> 4) as u8;
        }
        if let Some(second) = out.get_mut(2 * i + 1) {
            let right = sums.get(i + 1).copied().unwrap_or(last);
            *second = ((this + right + odd) >> 4) as u8;
        }
    };
    // Samples with both neighbours and both outputs inside `out`, in a loop without edge cases
    // (one the compiler vectorises); then the edges.
    let whole = (out.len() / 2).min(sums.len());
    let mut edge_from = 1;
    if whole >= 3 {
        let middle = out[2..2 * (whole - 1)].chunks_exact_mut(2);
        for (o, w) in middle.zip(sums.windows(3)) {
            let this = 3 * w[1];
            o[0] = ((this + w[0] + even) >> 4) as u8;
            o[1] = ((this + w[2] + odd) >> 4) as u8;
        }
        edge_from = whole - 1;
    }
    for i in std::iter::once(0).chain(edge_from..sums.len().min(out.len().div_ceil(2))) {
        at(i, out);
    }
}

/// JFIF's YCbCr → RGB factors in 16-bit fixed point, as libjpeg's `FIX`: computed per pixel
/// from these, the results are those of libjpeg's tables (made by the same formulas), and the
/// loop is one the compiler vectorises.
const fn fix(x: f64) -> i32 {
    (x * 65536.0 + 0.5) as i32
}

const CR_R: i32 = fix(1.40200);
const CB_B: i32 = fix(1.77200);
const CR_G: i32 = fix(0.71414);
const CB_G: i32 = fix(0.34414);
const HALF: i32 = 1 << 15;

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
        eprintln!("{label} {eighths}/8: {p:.1} dB");
        assert!(p > 30.0, "{label} {eighths}/8: {p:.1} dB");
    }

    #[test]
    fn matches_libjpeg_at_every_scale_it_covers() {
        let (w, h) = (203u32, 141u32);
        let rgb = photo(w, h);
        for sampling in [(1, 1), (2, 2), (2, 1), (1, 2)] {
            let file = progressive(&rgb, w, h, sampling);
            for eighths in 1..=4u8 {
                assert_close_to_libjpeg(&file, eighths, &format!("{sampling:?}"));
            }
        }
    }

    /// mozjpeg's own progressive script (its default profile) with a restart marker every 7
    /// MCUs: libjpeg's C API, as the crate exposes no restart setting.
    fn progressive_with_restarts(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
        scripted(rgb, w, h, None)
    }

    /// A scan: the components it holds, its band (Ss, Se) and bit positions (Ah, Al).
    type Scan = (&'static [i32], i32, i32, i32, i32);

    /// Scan scripts other encoders write (Photoshop's, jpegtran's `-scans`, mozjpeg's): the
    /// DC in one scan per component, spectral bands without successive approximation, and
    /// the DC and AC each refined two or three times.
    const SCRIPTS: [&[Scan]; 3] = [
        &[
            (&[0], 0, 0, 0, 0),
            (&[1], 0, 0, 0, 0),
            (&[2], 0, 0, 0, 0),
            (&[0], 1, 2, 0, 0),
            (&[0], 3, 9, 0, 0),
            (&[1], 1, 63, 0, 0),
            (&[0], 10, 63, 0, 0),
            (&[2], 1, 63, 0, 0),
        ],
        &[
            (&[0], 0, 0, 0, 0),
            (&[1, 2], 0, 0, 0, 0),
            (&[0], 1, 8, 0, 2),
            (&[1], 1, 63, 0, 0),
            (&[2], 1, 63, 0, 0),
            (&[0], 9, 63, 0, 2),
            (&[0], 1, 63, 2, 1),
            (&[0], 1, 63, 1, 0),
        ],
        &[
            (&[0, 1, 2], 0, 0, 0, 2),
            (&[0], 1, 5, 0, 3),
            (&[1], 1, 63, 0, 2),
            (&[2], 1, 63, 0, 2),
            (&[0], 6, 63, 0, 3),
            (&[0, 1, 2], 0, 0, 2, 1),
            (&[0], 1, 63, 3, 2),
            (&[0], 1, 63, 2, 1),
            (&[1], 1, 63, 2, 1),
            (&[2], 1, 63, 2, 1),
            (&[0, 1, 2], 0, 0, 1, 0),
            (&[0], 1, 63, 1, 0),
            (&[1], 1, 63, 1, 0),
            (&[2], 1, 63, 1, 0),
        ],
    ];

    /// A 4:2:0 progressive file with a restart marker every 7 MCUs, by `script` or else by
    /// mozjpeg's own.
    fn scripted(rgb: &[u8], w: u32, h: u32, script: Option<&[Scan]>) -> Vec<u8> {
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
            if script.is_some() {
                // libjpeg's defaults: mozjpeg's would rewrite the scan script.
                jpeg_c_set_int_param(
                    &mut cinfo,
                    J_INT_PARAM::JINT_COMPRESS_PROFILE,
                    JCP_FASTEST as i32,
                );
            }
            jpeg_set_defaults(&mut cinfo);
            jpeg_set_quality(&mut cinfo, 88, 1);
            let scans: Vec<jpeg_scan_info> = script
                .unwrap_or_default()
                .iter()
                .map(|&(comps, ss, se, ah, al)| {
                    let mut component_index = [0; 4];
                    component_index[..comps.len()].copy_from_slice(comps);
                    jpeg_scan_info {
                        comps_in_scan: comps.len() as i32,
                        component_index,
                        Ss: ss,
                        Se: se,
                        Ah: ah,
                        Al: al,
                    }
                })
                .collect();
            if scans.is_empty() {
                jpeg_simple_progression(&mut cinfo);
            } else {
                cinfo.scan_info = scans.as_ptr();
                cinfo.num_scans = scans.len() as i32;
            }
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

    /// Files as other encoders lay out their scans decode as libjpeg decodes them, at every
    /// scale, with the scans a scale does not need dropped first (`scans.rs`).
    #[test]
    fn other_encoders_scan_scripts_decode() {
        let (w, h) = (150u32, 90u32);
        let rgb = photo(w, h);
        for (i, script) in SCRIPTS.into_iter().enumerate() {
            let file = scripted(&rgb, w, h, Some(script));
            let sos = file.windows(2).filter(|p| p == &[0xFF, 0xDA]).count();
            assert_eq!(sos, script.len(), "script {i}: every scan written");
            for eighths in 1..=4u8 {
                assert_close_to_libjpeg(&file, eighths, &format!("script {i}"));
            }
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
        for eighths in 1..=4u8 {
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
            for eighths in 1..=4u8 {
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
        // Over half scale, baseline and damaged files are not this decoder's.
        assert!(decode(&file, 5).is_none());
        let rgb = photo(32, 32);
        let base = crate::jpeg::encode_rgb(&rgb, 32, 32, 80, false, &Default::default()).unwrap();
        assert!(decode(&base, 2).is_none());
        let prog = progressive(&rgb, 32, 32, (2, 2));
        assert!(decode(&prog[..prog.len() / 3], 2).is_none());
    }
}
