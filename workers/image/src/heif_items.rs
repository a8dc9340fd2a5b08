//! The HEIF boxes that say where an HEVC-coded primary image is and how it is shown, read
//! without libheif so that `heif.rs` can hand its coded data to libde265 itself (`de265.rs`)
//! and convert libde265's own picture a row at a time: libheif 1.15 always converts the
//! picture to RGB planes while still holding its YCbCr copy (BENCHMARKS.md, "HEIC at `-c 2`:
//! where libheif's peak is").
//!
//! Read here: `meta`'s `pitm`, `iinf`/`infe` (versions 2 and 3), `iloc` (versions 0–2, from the
//! file or from `idat`), `iref` (`dimg`, `auxl`), `iprp`'s `ipco` and `ipma`, and the properties
//! `hvcC`, `ispe`, `colr` (`nclx`), `irot`, `imir` and `clap`. A primary image that is one `hvc1`
//! item or a `grid` of `hvc1` tiles gets a [`Plan`]; anything else (alpha, another codec, an
//! essential property not listed here, a grid whose tiles differ, a `clap` libheif would clamp
//! or round differently) is [`Unhandled`], and libheif decodes it as before. Nothing here
//! panics on bad input: every length and offset is checked against the box it is in (the
//! `heif_items` fuzz target).
//!
//! `clap`, `irot` and `imir` apply in their `ipma` order, as libheif 1.15 applies them to its
//! RGB picture. A plan keeps them as one crop in coded (unturned) coordinates, taken while the
//! rows are converted, then one turn: cropping commutes with turning once the crop is turned
//! back by the turns listed before it. libheif converts the whole coded picture to RGB before
//! it crops (even at an odd offset), so converting only the cropped samples gives its picture.

use std::ops::Range;

/// Why a file is left to libheif (a short reason, logged at debug level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unhandled(pub &'static str);

type Res<T> = Result<T, Unhandled>;

/// `ipma`: per item id, its properties' 1-based `ipco` indexes and whether each is essential.
type Associations = Vec<(u32, Vec<(u16, bool)>)>;

/// How the primary image is decoded and shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Its size as coded (`ispe` of the primary item), before `clap`, `irot` and `imir`.
    pub width: u32,
    pub height: u32,
    pub layout: Layout,
    /// The part of the coded picture that is shown: the `clap` crops turned back into coded
    /// coordinates, or the whole picture.
    pub crop: Rect,
    /// `irot` and `imir`, in their order, as one turn to apply after cropping.
    pub turn: Turn,
}

impl Plan {
    /// The size as shown: the crop, turned.
    pub fn shown(&self) -> (u32, u32) {
        self.turn.size((self.crop.width, self.crop.height))
    }
}

/// A rectangle of a picture, in pixels from its top-left corner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub fn columns(&self) -> Range<usize> {
        self.x as usize..self.x as usize + self.width as usize
    }

    pub fn rows(&self) -> Range<usize> {
        self.y as usize..self.y as usize + self.height as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One `hvc1` item the size of the image.
    Single(Coded),
    /// A `grid`: `rows` × `cols` tiles of `tile` size each, row by row, cropped to the image's
    /// size at the right and bottom edges.
    Grid {
        rows: u32,
        cols: u32,
        tile: (u32, u32),
        tiles: Vec<Coded>,
    },
}

/// One HEVC-coded item: its decoder configuration and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coded {
    /// Parameter-set NAL units from `hvcC` (byte ranges of the file).
    pub config_nals: Vec<Range<usize>>,
    /// Bytes of the length before each NAL unit of the data (1, 2 or 4).
    pub length_size: usize,
    /// The item's extents, in order (byte ranges of the file).
    pub extents: Vec<Range<usize>>,
    /// `ispe`.
    pub width: u32,
    pub height: u32,
    /// The coded picture size from the sequence parameter set (before its conformance crop).
    pub coded: (u32, u32),
    /// Bits per luma sample and `chroma_format_idc` (0 mono, 1 4:2:0, 2 4:2:2, 3 4:4:4).
    pub bits: u32,
    pub chroma: u32,
    /// A `colr` `nclx` box: (matrix coefficients, full range).
    pub nclx: Option<(u32, bool)>,
}

impl Coded {
    /// The item's data, its extents joined.
    pub fn data(&self, file: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.extents.iter().map(|e| e.len()).sum());
        for e in &self.extents {
            out.extend_from_slice(&file[e.clone()]);
        }
        out
    }
}

/// A turn of the picture: `quarter` clockwise quarter turns, then a left–right flip when
/// `flip` (so every mix of `irot` and `imir` is one of the eight EXIF orientations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Turn {
    pub quarter: u8,
    pub flip: bool,
}

impl Turn {
    /// Then turned `quarter` clockwise quarter turns.
    fn rotate(self, quarter: u8) -> Turn {
        let quarter = if self.flip {
            (self.quarter + 4 - quarter % 4) % 4
        } else {
            (self.quarter + quarter) % 4
        };
        Turn { quarter, ..self }
    }

    /// Then flipped left–right.
    fn flip(self) -> Turn {
        Turn {
            flip: !self.flip,
            ..self
        }
    }

    /// Whether width and height swap.
    pub fn swaps(self) -> bool {
        self.quarter % 2 == 1
    }

    /// A picture of `size`, turned.
    pub fn size(self, (w, h): (u32, u32)) -> (u32, u32) {
        if self.swaps() {
            (h, w)
        } else {
            (w, h)
        }
    }

    /// The rectangle of a `size` picture that turns into `shown`, a rectangle of the turned
    /// picture (which must lie within it).
    fn unturn(self, size: (u32, u32), shown: Rect) -> Rect {
        let (tw, _) = self.size(size);
        // Undo the flip, in the turned picture.
        let mut r = if self.flip {
            Rect {
                x: tw - shown.x - shown.width,
                ..shown
            }
        } else {
            shown
        };
        // Undo each clockwise quarter turn: one takes a `w`×`h` picture's (x, y, cw, ch) to
        // (h - y - ch, x, ch, cw) of the `h`×`w` one.
        for i in (0..self.quarter % 4).rev() {
            // The picture's height before the quarter turn being undone.
            let (_, h) = Turn {
                quarter: i,
                flip: false,
            }
            .size(size);
            r = Rect {
                x: r.y,
                y: h - r.x - r.width,
                width: r.height,
                height: r.width,
            };
        }
        r
    }
}

/// Most items, properties, extents and tiles read; a file claiming more is left to libheif.
const MAX_ENTRIES: usize = 4096;

/// Reads the primary image's plan from a whole HEIF file.
pub fn plan(file: &[u8]) -> Res<Plan> {
    let (items, refs, primary) = read_meta(file)?;
    if refs
        .iter()
        .any(|r| &r.kind == b"auxl" && r.to.contains(&primary))
    {
        return Err(Unhandled("an auxiliary image (alpha or depth)"));
    }
    let kind = items.kind(primary)?;
    let geometry = items.geometry(primary)?;
    let (width, height) = geometry.ispe;
    let (crop, turn) = geometry.resolve()?;
    // What is decoded stays bounded by the size checked against the limits (the cropped one).
    if !within_twice(width, height, crop.width, crop.height) {
        return Err(Unhandled("a clean aperture much smaller than the picture"));
    }
    let layout = match &kind {
        b"hvc1" => {
            let coded = items.coded(primary, false)?;
            if (coded.width, coded.height) != (width, height) {
                return Err(Unhandled("ispe disagrees"));
            }
            Layout::Single(coded)
        }
        b"grid" => items.grid(primary, &refs, (width, height))?,
        _ => return Err(Unhandled("not an HEVC image")),
    };
    Ok(Plan {
        width,
        height,
        layout,
        crop,
        turn,
    })
}

/// The primary image's size as shown: its `ispe` cropped by its `clap` and turned by its
/// `irot` (whatever their order in `ipma`), for any coding, alpha or not. libheif 1.15 reports
/// the unturned size for a file that lists `irot` before `ispe` (Canon's HIF files do), and
/// the uncropped one for a `clap` listed before `ispe`, while it decodes the cropped, turned
/// picture; this is what its decode gives.
pub fn shown_size(file: &[u8]) -> Res<(u32, u32)> {
    sizes(file).map(|s| s.shown)
}

/// The primary image's sizes, read from its boxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// As shown ([`shown_size`]).
    pub shown: (u32, u32),
    /// As coded (`ispe`), before any crop or turn: what a decoder holds.
    pub coded: (u32, u32),
}

pub fn sizes(file: &[u8]) -> Res<Sizes> {
    let (items, _, primary) = read_meta(file)?;
    let geometry = items.geometry(primary)?;
    let (crop, turn) = geometry.resolve()?;
    Ok(Sizes {
        shown: turn.size((crop.width, crop.height)),
        coded: geometry.ispe,
    })
}

/// What turns and crops the coded picture: its `ispe` and its transformative properties, in
/// their `ipma` order.
struct Geometry {
    ispe: (u32, u32),
    steps: Vec<Step>,
}

enum Step {
    /// `irot` or `imir`, as a turn.
    Turn(Turn),
    Clap(Clap),
}

impl Geometry {
    /// The steps as one crop of the coded picture (in its coordinates) and one turn after it.
    fn resolve(&self) -> Res<(Rect, Turn)> {
        let (width, height) = self.ispe;
        let mut crop = Rect {
            x: 0,
            y: 0,
            width,
            height,
        };
        let mut turn = Turn::default();
        for step in &self.steps {
            match step {
                Step::Turn(t) => {
                    turn = if t.flip {
                        turn.rotate(t.quarter).flip()
                    } else {
                        turn.rotate(t.quarter)
                    }
                }
                Step::Clap(clap) => {
                    // The clean aperture of the picture as it is at this step (cropped and
                    // turned by the steps before), turned back into the crop so far.
                    let size = (crop.width, crop.height);
                    let shown = clap.rect(turn.size(size))?;
                    let inner = turn.unturn(size, shown);
                    crop = Rect {
                        x: crop.x + inner.x,
                        y: crop.y + inner.y,
                        ..inner
                    };
                }
            }
        }
        Ok((crop, turn))
    }
}

/// A `clap` box (ISO/IEC 14496-12 CleanApertureBox): the clean aperture's width and height and
/// its centre's offset from the picture's, as fractions.
#[derive(Debug, Clone, Copy)]
struct Clap {
    width: Fraction,
    height: Fraction,
    horizontal: Fraction,
    vertical: Fraction,
}

impl Clap {
    fn read(file: &[u8], b: &BoxRef) -> Res<Clap> {
        let mut r = Reader::plain(file, b);
        let mut part = |signed: bool| -> Res<i64> {
            let v = r.u32()?;
            // Sizes and denominators above 2^31 are refused by libheif.
            match (signed, i32::try_from(v)) {
                (true, _) => Ok(i64::from(v as i32)),
                (false, Ok(v)) => Ok(i64::from(v)),
                (false, Err(_)) => Err(Unhandled("a clap value out of range")),
            }
        };
        let mut fraction = |signed: bool| -> Res<Fraction> {
            let num = part(signed)?;
            let den = part(false)?;
            if den == 0 {
                return Err(Unhandled("a clap fraction over zero"));
            }
            Fraction::new(num, den)
        };
        Ok(Clap {
            width: fraction(false)?,
            height: fraction(false)?,
            horizontal: fraction(true)?,
            vertical: fraction(true)?,
        })
    }

    /// The clean aperture of a picture of `size`, rounded as libheif 1.15 rounds it (its
    /// `Box_clap::left_rounded` and kin): the left edge rounded towards zero, the top to the
    /// nearest, the right and bottom edges to the nearest after the width less one; then its
    /// size is what its header gives (the width and height rounded). `Unhandled` when libheif
    /// would clamp the rectangle to the picture or its header would not give the decoded
    /// size (it then fails on its own decode's size).
    fn rect(&self, (w, h): (u32, u32)) -> Res<Rect> {
        let edge = |offset: Fraction, size: Fraction, picture: u32, round_down: bool| {
            let picture = i64::from(picture);
            // left = offset + (picture - 1) / 2 - (size - 1) / 2
            let start = offset
                .add(Fraction::new(picture - 1, 2)?)?
                .sub(size.add_int(-1)?.div_int(2)?)?;
            let start = if round_down {
                start.round_down()?
            } else {
                start.round()?
            };
            let end = size.add_int(-1)?.add_int(start)?.round()?;
            let length = size.round()?;
            if start < 0 || end >= picture || end - start + 1 != length || length < 1 {
                return Err(Unhandled("a clean aperture outside the picture"));
            }
            // Within 0..picture, so within u32.
            Ok((start as u32, length as u32))
        };
        let (x, width) = edge(self.horizontal, self.width, w, true)?;
        let (y, height) = edge(self.vertical, self.height, h, false)?;
        Ok(Rect {
            x,
            y,
            width,
            height,
        })
    }
}

/// A fraction as libheif 1.15 keeps one (its `Fraction`): both parts halved, rounding towards
/// zero, while the denominator is beyond ±2^16 or, the denominator above 1, the numerator is
/// (Debian's 1.15.1-1+deb12u1 carries upstream's fix that stops at a denominator of 1; 1.15.1
/// itself halved it to zero and divided by it), and added and subtracted in 32 bits. Matching
/// its arithmetic gives its rounding exactly; where it would overflow 32 bits, the file is
/// left to it.
#[derive(Debug, Clone, Copy)]
struct Fraction {
    num: i64,
    den: i64,
}

impl Fraction {
    const MAX: i64 = 1 << 16;

    /// Sums and products of two 32-bit parts are formed in 128 bits, so only libheif
    /// overflows, never this.
    fn new(num: impl Into<i128>, den: impl Into<i128>) -> Res<Fraction> {
        let part = |v: i128| {
            i32::try_from(v)
                .map(i64::from)
                .map_err(|_| Unhandled("a clap fraction libheif overflows"))
        };
        let (mut num, mut den) = (part(num.into())?, part(den.into())?);
        while den.abs() > Self::MAX {
            num /= 2;
            den /= 2;
        }
        while den > 1 && num.abs() > Self::MAX {
            num /= 2;
            den /= 2;
        }
        Ok(Fraction { num, den })
    }

    fn add(self, b: Fraction) -> Res<Fraction> {
        let (n, d, bn, bd) = (
            i128::from(self.num),
            i128::from(self.den),
            i128::from(b.num),
            i128::from(b.den),
        );
        if d == bd {
            Fraction::new(n + bn, d)
        } else {
            Fraction::new(n * bd + bn * d, d * bd)
        }
    }

    fn sub(self, b: Fraction) -> Res<Fraction> {
        self.add(Fraction {
            num: -b.num,
            den: b.den,
        })
    }

    fn add_int(self, v: i64) -> Res<Fraction> {
        Fraction::new(
            i128::from(self.num) + i128::from(v) * i128::from(self.den),
            self.den,
        )
    }

    fn div_int(self, v: i64) -> Res<Fraction> {
        Fraction::new(self.num, i128::from(self.den) * i128::from(v))
    }

    fn divisor(self) -> Res<i64> {
        match self.den {
            0 => Err(Unhandled("a clap fraction over zero")),
            d => Ok(d),
        }
    }

    /// Towards zero, as C divides.
    fn round_down(self) -> Res<i64> {
        Ok(self.num / self.divisor()?)
    }

    /// libheif's `round`: half the denominator added, then divided towards zero.
    fn round(self) -> Res<i64> {
        let den = self.divisor()?;
        Ok((self.num + den / 2) / den)
    }
}

/// The `meta` box's items, references and primary item id.
fn read_meta(file: &[u8]) -> Res<(Items<'_>, Vec<Reference>, u32)> {
    let meta = children(file, 0..file.len())
        .find_map(|b| match b {
            Ok(b) if &b.kind == b"meta" => Some(Ok(b)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .ok_or(Unhandled("no meta box"))??;
    // `meta` is a full box: version and flags first.
    let meta_body = full_body(file, &meta)?;
    let mut primary = None;
    let mut infos: Vec<(u32, [u8; 4])> = Vec::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut refs: Vec<Reference> = Vec::new();
    let mut props: Vec<BoxRef> = Vec::new();
    let mut assoc: Associations = Vec::new();
    let mut idat = None;
    for b in children(file, meta_body) {
        let b = b?;
        match &b.kind {
            b"pitm" => {
                let mut r = Reader::full(file, &b)?;
                primary = Some(if r.version == 0 {
                    r.u16()? as u32
                } else {
                    r.u32()?
                });
            }
            b"iinf" => infos = read_iinf(file, &b)?,
            b"iloc" => locations = read_iloc(file, &b)?,
            b"iref" => refs = read_iref(file, &b)?,
            b"idat" => idat = Some(b.body.clone()),
            b"iprp" => {
                for c in children(file, b.body.clone()) {
                    let c = c?;
                    match &c.kind {
                        b"ipco" => {
                            props = children(file, c.body.clone()).collect::<Res<Vec<_>>>()?;
                        }
                        b"ipma" => assoc.extend(read_ipma(file, &c)?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if infos.len() > MAX_ENTRIES || props.len() > MAX_ENTRIES {
            return Err(Unhandled("too many items or properties"));
        }
    }
    let primary = primary.ok_or(Unhandled("no pitm box"))?;
    let items = Items {
        file,
        infos,
        locations,
        props,
        assoc,
        idat,
    };
    Ok((items, refs, primary))
}

struct Items<'a> {
    file: &'a [u8],
    infos: Vec<(u32, [u8; 4])>,
    locations: Vec<Location>,
    props: Vec<BoxRef>,
    assoc: Associations,
    idat: Option<Range<usize>>,
}

struct Location {
    id: u32,
    method: u8,
    base: u64,
    extents: Vec<(u64, u64)>,
}

struct Reference {
    kind: [u8; 4],
    from: u32,
    to: Vec<u32>,
}

impl Items<'_> {
    /// The item's `ispe` (its size as coded) and its `irot`, `imir` and `clap`, in their
    /// `ipma` order.
    fn geometry(&self, id: u32) -> Res<Geometry> {
        let mut steps = Vec::new();
        let mut ispe = None;
        for p in self.properties(id)? {
            match &p.kind {
                b"ispe" => ispe = Some(read_ispe(self.file, &p)?),
                b"irot" => {
                    let angle = body(self.file, &p).first().ok_or(Unhandled("short irot"))? & 3;
                    // Anticlockwise quarter turns.
                    steps.push(Step::Turn(Turn::default().rotate((4 - angle) % 4)));
                }
                b"imir" => {
                    let mode = body(self.file, &p).first().ok_or(Unhandled("short imir"))? & 1;
                    // HEIF's amendment 2 reads the bit as a `mode`: 0 exchanges top and
                    // bottom, 1 left and right — as iPhones write it and libheif applies it
                    // (the 2017 text's "vertical axis" for 0 was read both ways).
                    let turn = Turn::default();
                    steps.push(Step::Turn(if mode == 1 {
                        turn.flip()
                    } else {
                        turn.rotate(2).flip()
                    }));
                }
                b"clap" => steps.push(Step::Clap(Clap::read(self.file, &p)?)),
                _ => {}
            }
        }
        let ispe = ispe.ok_or(Unhandled("no ispe on the primary image"))?;
        Ok(Geometry { ispe, steps })
    }

    fn kind(&self, id: u32) -> Res<[u8; 4]> {
        let mut found = self.infos.iter().filter(|(i, _)| *i == id);
        match (found.next(), found.next()) {
            (Some((_, kind)), None) => Ok(*kind),
            (None, _) => Err(Unhandled("an item without infe")),
            _ => Err(Unhandled("an item listed twice")),
        }
    }

    /// The item's properties in `ipma` order; an essential one this module does not know
    /// leaves the file to libheif.
    fn properties(&self, id: u32) -> Res<Vec<BoxRef>> {
        let Some((_, list)) = self.assoc.iter().find(|(i, _)| *i == id) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(list.len());
        for &(index, essential) in list {
            if index == 0 {
                continue;
            }
            let p = self
                .props
                .get(usize::from(index) - 1)
                .ok_or(Unhandled("ipma names a missing property"))?;
            let known = matches!(
                &p.kind,
                b"hvcC" | b"ispe" | b"colr" | b"pixi" | b"irot" | b"imir" | b"clap"
            );
            if essential && !known {
                return Err(Unhandled("an essential property it does not know"));
            }
            out.push(p.clone());
        }
        Ok(out)
    }

    /// The item's bytes, as byte ranges of the file.
    fn extents(&self, id: u32) -> Res<Vec<Range<usize>>> {
        let loc = self
            .locations
            .iter()
            .find(|l| l.id == id)
            .ok_or(Unhandled("an item without iloc entry"))?;
        let within = match loc.method {
            0 => 0..self.file.len(),
            1 => self.idat.clone().ok_or(Unhandled("no idat"))?,
            _ => return Err(Unhandled("an item located by reference")),
        };
        let mut out = Vec::with_capacity(loc.extents.len());
        for &(offset, length) in &loc.extents {
            let start = loc
                .base
                .checked_add(offset)
                .and_then(|s| usize::try_from(s).ok())
                .and_then(|s| s.checked_add(within.start))
                .filter(|s| *s <= within.end)
                .ok_or(Unhandled("an extent outside the file"))?;
            // A length of 0 means "to the end".
            let end = if length == 0 {
                within.end
            } else {
                usize::try_from(length)
                    .ok()
                    .and_then(|l| start.checked_add(l))
                    .filter(|e| *e <= within.end)
                    .ok_or(Unhandled("an extent outside the file"))?
            };
            out.push(start..end);
        }
        if out.is_empty() {
            return Err(Unhandled("an item without data"));
        }
        Ok(out)
    }

    /// An `hvc1` item; a `tile` may not be turned (the image's own turn is read by [`plan`]).
    fn coded(&self, id: u32, tile: bool) -> Res<Coded> {
        if &self.kind(id)? != b"hvc1" {
            return Err(Unhandled("a tile that is not HEVC"));
        }
        let mut hvcc = None;
        let mut ispe = None;
        let mut nclx = None;
        for p in self.properties(id)? {
            match &p.kind {
                b"hvcC" => hvcc = Some(read_hvcc(self.file, &p)?),
                b"ispe" => ispe = Some(read_ispe(self.file, &p)?),
                b"colr" => nclx = nclx.or(read_nclx(self.file, &p)?),
                b"irot" | b"imir" | b"clap" if tile => {
                    return Err(Unhandled("a transformed tile"));
                }
                _ => {}
            }
        }
        let (config_nals, length_size, sps) = hvcc.ok_or(Unhandled("no hvcC"))?;
        let (width, height) = ispe.ok_or(Unhandled("no ispe on an HEVC item"))?;
        // The decoder allocates for the sequence parameter set's size, so it must be the
        // checked one (`ispe`) but for the conformance crop (less than a 64-pixel CTB).
        let near = |coded: u32, shown: u32| coded >= shown && coded - shown < 64;
        if !near(sps.width, width) || !near(sps.height, height) {
            return Err(Unhandled("the HEVC picture size disagrees with ispe"));
        }
        // …and not a thin picture whose coded rows (a multiple of 8) far outnumber its own.
        if !within_twice(sps.width, sps.height, width, height) {
            return Err(Unhandled("an HEVC picture much larger than its ispe"));
        }
        Ok(Coded {
            config_nals,
            length_size,
            extents: self.extents(id)?,
            width,
            height,
            coded: (sps.width, sps.height),
            bits: sps.bits,
            chroma: sps.chroma,
            nclx,
        })
    }

    fn grid(&self, id: u32, refs: &[Reference], size: (u32, u32)) -> Res<Layout> {
        let desc: Vec<u8> = {
            let mut d = Vec::new();
            for e in self.extents(id)? {
                d.extend_from_slice(&self.file[e]);
                if d.len() > 64 {
                    return Err(Unhandled("a grid descriptor too long"));
                }
            }
            d
        };
        // ImageGrid: version, flags (bit 0: 32-bit sizes), rows - 1, columns - 1, size.
        let (&flags, rest) = desc
            .get(1..)
            .and_then(|d| d.split_first())
            .ok_or(Unhandled("short grid"))?;
        if desc[0] != 0 {
            return Err(Unhandled("a grid version it does not know"));
        }
        let (rows, cols, w, h) = match (flags & 1, rest) {
            (0, [r, c, w0, w1, h0, h1, ..]) => (
                u32::from(*r) + 1,
                u32::from(*c) + 1,
                u32::from(u16::from_be_bytes([*w0, *w1])),
                u32::from(u16::from_be_bytes([*h0, *h1])),
            ),
            (1, [r, c, w0, w1, w2, w3, h0, h1, h2, h3, ..]) => (
                u32::from(*r) + 1,
                u32::from(*c) + 1,
                u32::from_be_bytes([*w0, *w1, *w2, *w3]),
                u32::from_be_bytes([*h0, *h1, *h2, *h3]),
            ),
            _ => return Err(Unhandled("short grid")),
        };
        if (w, h) != size {
            return Err(Unhandled("the grid's size disagrees with its ispe"));
        }
        let mut ids = refs
            .iter()
            .filter(|r| &r.kind == b"dimg" && r.from == id)
            .flat_map(|r| r.to.iter().copied());
        let tiles = (0..rows * cols)
            .map(|_| {
                ids.next()
                    .ok_or(Unhandled("fewer tiles than the grid has"))
                    .and_then(|t| self.coded(t, true))
            })
            .collect::<Res<Vec<_>>>()?;
        if ids.next().is_some() {
            return Err(Unhandled("more tiles than the grid has"));
        }
        let first = &tiles[0];
        let same = |t: &Coded| {
            (t.width, t.height, t.bits, t.chroma, t.nclx)
                == (
                    first.width,
                    first.height,
                    first.bits,
                    first.chroma,
                    first.nclx,
                )
        };
        if !tiles.iter().all(same) {
            return Err(Unhandled("tiles that differ"));
        }
        let tile = (first.width, first.height);
        // The tiles cover the image, and no whole row or column of them lies outside it (so
        // what is decoded is bounded by the checked size, plus one tile row and column).
        let covers = |n: u32, t: u32, s: u32| {
            let all = u64::from(n) * u64::from(t);
            all >= u64::from(s) && all - u64::from(s) < u64::from(t)
        };
        if !covers(cols, tile.0, w) || !covers(rows, tile.1, h) {
            return Err(Unhandled("tiles that do not fit the grid"));
        }
        let all = |n: u32, t: u32| u32::try_from(u64::from(n) * u64::from(t)).unwrap_or(u32::MAX);
        if !within_twice(all(cols, tile.0), all(rows, tile.1), w, h) {
            return Err(Unhandled("tiles much larger than the grid"));
        }
        Ok(Layout::Grid {
            rows,
            cols,
            tile,
            tiles,
        })
    }
}

/// Whether a coded `cw`×`ch` area is at most twice the shown `w`×`h` one plus 1 MP: what is
/// decoded stays bounded by the size checked against the limits.
fn within_twice(cw: u32, ch: u32, w: u32, h: u32) -> bool {
    // In u128: twice a u32 × u32 area passes u64 (an overflow panic with overflow checks; in
    // release the wrapped bound refused what it should have admitted).
    u128::from(cw) * u128::from(ch) <= 2 * u128::from(w) * u128::from(h) + (1 << 20)
}

/// A box: its type and the byte range of its body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BoxRef {
    kind: [u8; 4],
    body: Range<usize>,
}

/// The boxes inside `range` of `file`, in order; the first malformed one ends it with an error.
fn children(file: &[u8], range: Range<usize>) -> impl Iterator<Item = Res<BoxRef>> + '_ {
    let mut at = range.start;
    let end = range.end.min(file.len());
    let mut failed = false;
    let mut count = 0;
    std::iter::from_fn(move || {
        if failed || at >= end {
            return None;
        }
        count += 1;
        let next = read_box(file, at, end, count);
        match &next {
            Ok((b, after)) => {
                at = *after;
                Some(Ok(b.clone()))
            }
            Err(e) => {
                failed = true;
                Some(Err(e.clone()))
            }
        }
    })
}

fn read_box(file: &[u8], at: usize, end: usize, count: usize) -> Res<(BoxRef, usize)> {
    if count > MAX_ENTRIES {
        return Err(Unhandled("too many boxes"));
    }
    let short = Unhandled("a box cut short");
    let head = file
        .get(at..at + 8)
        .filter(|_| at + 8 <= end)
        .ok_or(short.clone())?;
    let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as u64;
    let kind = [head[4], head[5], head[6], head[7]];
    let (size, mut header) = match size {
        0 => ((end - at) as u64, 8usize),
        1 => {
            let large = file
                .get(at + 8..at + 16)
                .filter(|_| at + 16 <= end)
                .ok_or(short.clone())?;
            (
                u64::from_be_bytes(large.try_into().map_err(|_| short.clone())?),
                16,
            )
        }
        s => (s, 8),
    };
    if &kind == b"uuid" {
        header += 16;
    }
    let after = usize::try_from(size)
        .ok()
        .filter(|s| *s >= header)
        .and_then(|s| at.checked_add(s))
        .filter(|a| *a <= end)
        .ok_or(short)?;
    Ok((
        BoxRef {
            kind,
            body: at + header..after,
        },
        after,
    ))
}

fn body<'a>(file: &'a [u8], b: &BoxRef) -> &'a [u8] {
    &file[b.body.clone()]
}

/// A full box's body after its version and flags.
fn full_body(file: &[u8], b: &BoxRef) -> Res<Range<usize>> {
    Reader::full(file, b).map(|r| r.at..r.end)
}

/// Big-endian reads within one box.
struct Reader<'a> {
    file: &'a [u8],
    at: usize,
    end: usize,
    version: u8,
    flags: u32,
}

impl<'a> Reader<'a> {
    fn plain(file: &'a [u8], b: &BoxRef) -> Reader<'a> {
        Reader {
            file,
            at: b.body.start,
            end: b.body.end,
            version: 0,
            flags: 0,
        }
    }

    fn full(file: &'a [u8], b: &BoxRef) -> Res<Reader<'a>> {
        let mut r = Reader::plain(file, b);
        let vf = r.u32()?;
        r.version = (vf >> 24) as u8;
        r.flags = vf & 0x00ff_ffff;
        Ok(r)
    }

    fn bytes(&mut self, n: usize) -> Res<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.end)
            .ok_or(Unhandled("a box cut short"))?;
        let out = &self.file[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn uint(&mut self, n: usize) -> Res<u64> {
        Ok(self
            .bytes(n)?
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b)))
    }

    fn u8(&mut self) -> Res<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Res<u16> {
        Ok(self.uint(2)? as u16)
    }

    fn u32(&mut self) -> Res<u32> {
        Ok(self.uint(4)? as u32)
    }

    fn fourcc(&mut self) -> Res<[u8; 4]> {
        let b = self.bytes(4)?;
        Ok([b[0], b[1], b[2], b[3]])
    }

    fn count(&mut self, wide: bool) -> Res<usize> {
        let n = if wide {
            self.u32()? as usize
        } else {
            usize::from(self.u16()?)
        };
        if n > MAX_ENTRIES {
            return Err(Unhandled("too many entries"));
        }
        Ok(n)
    }
}

fn read_iinf(file: &[u8], b: &BoxRef) -> Res<Vec<(u32, [u8; 4])>> {
    let mut r = Reader::full(file, b)?;
    let _count = r.count(r.version != 0)?;
    let mut out = Vec::new();
    for infe in children(file, r.at..r.end) {
        let infe = infe?;
        if &infe.kind != b"infe" {
            continue;
        }
        let mut e = Reader::full(file, &infe)?;
        if e.version < 2 {
            return Err(Unhandled("an infe version before 2"));
        }
        let id = if e.version == 2 {
            u32::from(e.u16()?)
        } else {
            e.u32()?
        };
        if e.u16()? != 0 {
            return Err(Unhandled("a protected item"));
        }
        out.push((id, e.fourcc()?));
        if out.len() > MAX_ENTRIES {
            return Err(Unhandled("too many items"));
        }
    }
    Ok(out)
}

fn read_iloc(file: &[u8], b: &BoxRef) -> Res<Vec<Location>> {
    let mut r = Reader::full(file, b)?;
    if r.version > 2 {
        return Err(Unhandled("an iloc version it does not know"));
    }
    let sizes = r.u16()?;
    let field = |shift: u16| -> Res<usize> {
        match (sizes >> shift) & 0xf {
            n @ (0 | 4 | 8) => Ok(usize::from(n)),
            _ => Err(Unhandled("an iloc field size it does not know")),
        }
    };
    let (offset_size, length_size, base_size) = (field(12)?, field(8)?, field(4)?);
    let index_size = if r.version >= 1 { field(0)? } else { 0 };
    let count = r.count(r.version == 2)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let id = if r.version == 2 {
            r.u32()?
        } else {
            u32::from(r.u16()?)
        };
        let method = if r.version >= 1 {
            (r.u16()? & 0xf) as u8
        } else {
            0
        };
        if r.u16()? != 0 {
            return Err(Unhandled("an item in another file"));
        }
        let base = r.uint(base_size)?;
        let extent_count = r.count(false)?;
        let mut extents = Vec::with_capacity(extent_count);
        for _ in 0..extent_count {
            let _index = r.uint(index_size)?;
            extents.push((r.uint(offset_size)?, r.uint(length_size)?));
        }
        out.push(Location {
            id,
            method,
            base,
            extents,
        });
    }
    Ok(out)
}

fn read_iref(file: &[u8], b: &BoxRef) -> Res<Vec<Reference>> {
    let r = Reader::full(file, b)?;
    let wide = r.version != 0;
    let mut out = Vec::new();
    for c in children(file, r.at..r.end) {
        let c = c?;
        let mut e = Reader::plain(file, &c);
        let id = |e: &mut Reader| -> Res<u32> {
            if wide {
                e.u32()
            } else {
                e.u16().map(u32::from)
            }
        };
        let from = id(&mut e)?;
        let n = e.count(false)?;
        let to = (0..n).map(|_| id(&mut e)).collect::<Res<Vec<_>>>()?;
        out.push(Reference {
            kind: c.kind,
            from,
            to,
        });
        if out.len() > MAX_ENTRIES {
            return Err(Unhandled("too many references"));
        }
    }
    Ok(out)
}

fn read_ipma(file: &[u8], b: &BoxRef) -> Res<Associations> {
    let mut r = Reader::full(file, b)?;
    let count = r.count(true)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let id = if r.version < 1 {
            u32::from(r.u16()?)
        } else {
            r.u32()?
        };
        let n = r.u8()?;
        let mut list = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let (essential, index) = if r.flags & 1 != 0 {
                let v = r.u16()?;
                (v & 0x8000 != 0, v & 0x7fff)
            } else {
                let v = r.u8()?;
                (v & 0x80 != 0, u16::from(v & 0x7f))
            };
            list.push((index, essential));
        }
        out.push((id, list));
    }
    Ok(out)
}

fn read_ispe(file: &[u8], b: &BoxRef) -> Res<(u32, u32)> {
    let mut r = Reader::full(file, b)?;
    let size = (r.u32()?, r.u32()?);
    if size.0 == 0 || size.1 == 0 {
        return Err(Unhandled("an empty ispe"));
    }
    Ok(size)
}

/// `colr`: the `nclx` matrix and range, `None` for an ICC profile.
fn read_nclx(file: &[u8], b: &BoxRef) -> Res<Option<(u32, bool)>> {
    let mut r = Reader::plain(file, b);
    if &r.fourcc()? != b"nclx" {
        return Ok(None);
    }
    let (_primaries, _transfer, matrix) = (r.u16()?, r.u16()?, r.u16()?);
    let full = r.u8()? & 0x80 != 0;
    Ok(Some((u32::from(matrix), full)))
}

/// What the sequence parameter set says.
struct Sps {
    width: u32,
    height: u32,
    bits: u32,
    chroma: u32,
}

/// `hvcC`: its parameter-set NAL units, the NAL length size, and the SPS read from them.
fn read_hvcc(file: &[u8], b: &BoxRef) -> Res<(Vec<Range<usize>>, usize, Sps)> {
    let mut r = Reader::plain(file, b);
    let head = r.bytes(22)?;
    let length_size = usize::from(head[21] & 3) + 1;
    if length_size == 3 {
        return Err(Unhandled("a 3-byte NAL length"));
    }
    let arrays = r.u8()?;
    let mut nals = Vec::new();
    let mut sps = None;
    for _ in 0..arrays {
        let kind = r.u8()? & 0x3f;
        for _ in 0..r.count(false)? {
            let len = usize::from(r.u16()?);
            let start = r.at;
            let nal = r.bytes(len)?;
            if kind == 33 && sps.is_none() {
                sps = Some(read_sps(nal)?);
            }
            nals.push(start..start + len);
        }
    }
    Ok((nals, length_size, sps.ok_or(Unhandled("no SPS in hvcC"))?))
}

/// The fields of an HEVC sequence parameter set NAL unit up to its bit depths (H.265 7.3.2.2).
fn read_sps(nal: &[u8]) -> Res<Sps> {
    // The NAL header (2 bytes), then the payload without its emulation-prevention bytes.
    let mut rbsp = Vec::with_capacity(nal.len().min(256));
    let mut zeros = 0;
    for &byte in nal.iter().skip(2).take(256) {
        if zeros >= 2 && byte == 3 {
            zeros = 0;
            continue;
        }
        zeros = if byte == 0 { zeros + 1 } else { 0 };
        rbsp.push(byte);
    }
    let mut bits = Bits { data: &rbsp, at: 0 };
    let bad = || Unhandled("an SPS it cannot read");
    bits.skip(4).ok_or_else(bad)?; // sps_video_parameter_set_id
    let sub_layers = bits.read(3).ok_or_else(bad)?; // sps_max_sub_layers_minus1
    bits.skip(1).ok_or_else(bad)?; // sps_temporal_id_nesting_flag
                                   // profile_tier_level(1, sub_layers)
    bits.skip(88 + 8).ok_or_else(bad)?;
    let mut present = Vec::new();
    for _ in 0..sub_layers {
        present.push((bits.read(1).ok_or_else(bad)?, bits.read(1).ok_or_else(bad)?));
    }
    if sub_layers > 0 {
        bits.skip(2 * (8 - sub_layers as usize)).ok_or_else(bad)?;
    }
    for (profile, level) in present {
        bits.skip(88 * profile as usize + 8 * level as usize)
            .ok_or_else(bad)?;
    }
    let _id = bits.ue().ok_or_else(bad)?;
    let chroma = bits.ue().ok_or_else(bad)?;
    if chroma > 3 {
        return Err(bad());
    }
    if chroma == 3 && bits.read(1).ok_or_else(bad)? == 1 {
        return Err(Unhandled("separate colour planes"));
    }
    let width = bits.ue().ok_or_else(bad)?;
    let height = bits.ue().ok_or_else(bad)?;
    if bits.read(1).ok_or_else(bad)? == 1 {
        for _ in 0..4 {
            bits.ue().ok_or_else(bad)?;
        }
    }
    // Depths are coded minus 8; a code near 2^32 must be refused, not wrapped to a small depth.
    let depth = |bits: &mut Bits| bits.ue().and_then(|minus8| minus8.checked_add(8));
    let luma = depth(&mut bits).ok_or_else(bad)?;
    let chroma_bits = depth(&mut bits).ok_or_else(bad)?;
    if luma > 16 || (chroma != 0 && chroma_bits != luma) {
        return Err(Unhandled("luma and chroma of different depths"));
    }
    Ok(Sps {
        width,
        height,
        bits: luma,
        chroma,
    })
}

/// Reads bits most significant first.
struct Bits<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bits<'_> {
    fn read(&mut self, n: u32) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = self.data.get(self.at / 8)?;
            v = (v << 1) | u32::from((byte >> (7 - self.at % 8)) & 1);
            self.at += 1;
        }
        Some(v)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.at = self.at.checked_add(n)?;
        (self.at <= self.data.len() * 8).then_some(())
    }

    /// An unsigned Exp-Golomb code (at most 31 leading zeros).
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.read(1)? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let rest = self.read(zeros)?;
        Some(((1u64 << zeros) - 1 + u64::from(rest)).min(u64::from(u32::MAX)) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HEVC SPS NAL unit (no sub-layers) with the given Exp-Golomb coded depths minus 8.
    fn sps(luma_minus8: u64, chroma_minus8: u64) -> Vec<u8> {
        let mut bits: Vec<bool> = Vec::new();
        let mut put = |v: u64, n: u32| (0..n).rev().for_each(|i| bits.push(v >> i & 1 == 1));
        let ue = |put: &mut dyn FnMut(u64, u32), v: u64| {
            let len = 64 - (v + 1).leading_zeros();
            put(0, len - 1);
            put(v + 1, len);
        };
        put(0, 4); // vps id
        put(0, 3); // no sub-layers
        put(1, 1); // temporal id nesting
        put(0x0101_0101_0101_0101, 64); // profile_tier_level: 96 bits, no zero bytes
        put(0x0101_0101, 32);
        ue(&mut put, 0); // sps id
        ue(&mut put, 1); // 4:2:0
        ue(&mut put, 64); // width
        ue(&mut put, 48); // height
        put(0, 1); // no conformance window
        ue(&mut put, luma_minus8);
        ue(&mut put, chroma_minus8);
        put(0xff, 8);
        let mut nal = vec![0x42, 0x01];
        nal.extend(bits.chunks(8).map(|b| {
            b.iter()
                .enumerate()
                .fold(0u8, |byte, (i, bit)| byte | (u8::from(*bit) << (7 - i)))
        }));
        nal
    }

    #[test]
    fn an_sps_depth_code_near_2_to_the_32_is_refused_not_wrapped() {
        let ok = read_sps(&sps(2, 2)).expect("a 10-bit SPS");
        assert_eq!((ok.width, ok.height, ok.bits, ok.chroma), (64, 48, 10, 1));
        // 2^32 − 2, the largest code `ue` reads: plus 8 overflowed (a panic in a debug build,
        // a 6-bit depth in a release one).
        for (luma, chroma) in [(4_294_967_294, 2), (2, 4_294_967_294)] {
            assert!(read_sps(&sps(luma, chroma)).is_err(), "{luma} {chroma}");
        }
    }

    #[test]
    fn what_is_decoded_stays_near_the_checked_size() {
        // A phone's 4032×3024 as 8×6 tiles of 512: 4096×3072 coded.
        assert!(within_twice(4096, 3072, 4032, 3024));
        // 50 MP shown as 50 000 000 × 1 over coded rows of 8 (or a 64-high tile row).
        assert!(!within_twice(50_000_000, 8, 50_000_000, 1));
        // Small pictures always pass (1 MP of slack).
        assert!(within_twice(1024, 1024, 1, 1));
        assert!(!within_twice(1025, 1024, 1, 1));
        // Sizes near 2^32 (fuzz/artifacts' 70 crashes of 2026-12-02: 2·w·h overflowed u64).
        assert!(within_twice(u32::MAX, u32::MAX, u32::MAX, u32::MAX));
        assert!(!within_twice(
            u32::MAX,
            u32::MAX,
            u32::MAX / 4,
            u32::MAX / 4
        ));
    }

    /// A picture of numbered pixels, turned as [`Turn`] says: clockwise quarter turns, then a
    /// left–right flip.
    fn turned(picture: &[Vec<u32>], turn: Turn) -> Vec<Vec<u32>> {
        let mut p = picture.to_vec();
        for _ in 0..turn.quarter {
            let (w, h) = (p[0].len(), p.len());
            // Clockwise: the new row y is the old column y, read bottom to top.
            p = (0..w)
                .map(|y| (0..h).map(|x| p[h - 1 - x][y]).collect())
                .collect();
        }
        if turn.flip {
            for row in &mut p {
                row.reverse();
            }
        }
        p
    }

    fn cropped(picture: &[Vec<u32>], r: Rect) -> Vec<Vec<u32>> {
        picture[r.rows()]
            .iter()
            .map(|row| row[r.columns()].to_vec())
            .collect()
    }

    #[test]
    fn a_crop_turned_back_then_turned_is_the_crop_of_the_turned_picture() {
        let (w, h) = (5u32, 3u32);
        let picture: Vec<Vec<u32>> = (0..h)
            .map(|y| (0..w).map(|x| y * w + x).collect())
            .collect();
        for quarter in 0..4 {
            for flip in [false, true] {
                let turn = Turn { quarter, flip };
                let shown = turned(&picture, turn);
                let (tw, th) = turn.size((w, h));
                assert_eq!((shown[0].len(), shown.len()), (tw as usize, th as usize));
                for (x, y, cw, ch) in [(0, 0, 1, 1), (1, 0, 2, 3), (0, 1, tw, th - 1), (2, 1, 1, 2)]
                {
                    let r = Rect {
                        x,
                        y,
                        width: cw.min(tw - x),
                        height: ch.min(th - y),
                    };
                    let back = turn.unturn((w, h), r);
                    assert_eq!(
                        turned(&cropped(&picture, back), turn),
                        cropped(&shown, r),
                        "{turn:?} {r:?}"
                    );
                }
            }
        }
    }

    fn clap(w: (i64, i64), h: (i64, i64), x: (i64, i64), y: (i64, i64)) -> Clap {
        let f = |(n, d)| Fraction::new(n, d).unwrap();
        Clap {
            width: f(w),
            height: f(h),
            horizontal: f(x),
            vertical: f(y),
        }
    }

    #[test]
    fn clean_apertures_round_as_libheif_rounds_them() {
        let rect = |x, y, width, height| Rect {
            x,
            y,
            width,
            height,
        };
        // Centred: 4000×3000 of 4032×3024.
        let c = clap((4000, 1), (3000, 1), (0, 1), (0, 1));
        assert_eq!(c.rect((4032, 3024)), Ok(rect(16, 12, 4000, 3000)));
        // An odd margin: the left edge rounds towards zero, the top to the nearest (both 1.5).
        let c = clap((61, 1), (45, 1), (0, 1), (0, 1));
        assert_eq!(c.rect((64, 48)), Ok(rect(1, 2, 61, 45)));
        // heif-enc's own: the odd size's offset is -(W - w)/2, cropping at the right.
        let c = clap((63, 1), (47, 1), (-1, 2), (-1, 2));
        assert_eq!(c.rect((64, 48)), Ok(rect(0, 0, 63, 47)));
        // Offsets move the centre; fractional sizes round to the nearest, and the left edge
        // (-5 + 63/2 - 39.5/2 = 6.75) down.
        let c = clap((81, 2), (30, 1), (-5, 1), (3, 1));
        assert_eq!(c.rect((64, 48)), Ok(rect(6, 12, 41, 30)));
        // A top edge of -1 exactly: libheif's rounding (dividing towards zero) makes it 0.
        let c = clap((40, 1), (30, 1), (0, 1), (-10, 1));
        assert_eq!(c.rect((64, 48)), Ok(rect(12, 0, 40, 30)));
        // Outside the picture, or too large: left to libheif (it clamps, then fails).
        for c in [
            clap((40, 1), (30, 1), (20, 1), (0, 1)),
            clap((40, 1), (30, 1), (0, 1), (-12, 1)),
            clap((65, 1), (48, 1), (0, 1), (0, 1)),
            clap((0, 1), (48, 1), (0, 1), (0, 1)),
        ] {
            assert!(c.rect((64, 48)).is_err(), "{c:?}");
        }
        // Large parts are halved as libheif halves them (65 567 / 1 is left unhalved: far
        // right of the picture); what overflows its 32 bits is refused, never panics.
        let c = clap((64, 1), (48, 1), (65_536, 1), (0, 1));
        assert!(c.rect((64, 48)).is_err());
        let big = Fraction::new(200_001, 4).unwrap();
        assert_eq!((big.num, big.den), (50_000, 1));
        let wide = Fraction::new(70_000, 1).unwrap();
        assert_eq!((wide.num, wide.den), (70_000, 1));
        assert!(Fraction::new(1i64 << 40, 1).is_err());
        let c = clap((i32::MAX as i64, 1), (48, 1), (i32::MAX as i64, 1), (0, 1));
        assert!(c.rect((u32::MAX, 48)).is_err());
    }

    #[test]
    fn exp_golomb_and_sps_fields_read_as_written() {
        // ue(v) of 0, 1, 2, 3: 1, 010, 011, 00100.
        let mut b = Bits {
            data: &[0b1010_0110, 0b0100_0000],
            at: 0,
        };
        assert_eq!(
            (b.ue(), b.ue(), b.ue(), b.ue()),
            (Some(0), Some(1), Some(2), Some(3))
        );
        // 32 leading zeros: refused, not overflowed.
        let mut b = Bits {
            data: &[0, 0, 0, 0, 0x80],
            at: 0,
        };
        assert_eq!(b.ue(), None);
        assert!(read_sps(&[0x42, 0x01]).is_err());
    }
}
