//! The job's arguments and result (the `image.transform` contract), and the checks that can be
//! made before the source is read.

use mediafarm::TaskError;
use serde::{Deserialize, Serialize};

use crate::smartcrop::Smart;

/// Most outputs one job may ask for.
pub const MAX_OUTPUTS: usize = 16;
/// Largest output side.
pub const MAX_SIDE: u32 = 16_384;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformArgs {
    /// Storage key, `s3://`, `file://` (allowed roots) or `https://` (allowed hosts).
    pub source: String,
    #[serde(default)]
    pub crop: Option<CropArg>,
    #[serde(default = "yes")]
    pub auto_orient: bool,
    /// `true` (the default): outputs carry no metadata and colours are converted to sRGB.
    /// `false`: outputs keep the source's ICC profile (pixels left in its colour space) and
    /// EXIF (orientation reset when the picture was turned), in JPEG, PNG and WebP.
    #[serde(default = "yes")]
    pub strip_metadata: bool,
    /// An image drawn over every output (unless the output says `watermark: false`).
    #[serde(default)]
    pub watermark: Option<Watermark>,
    pub outputs: Vec<OutputSpec>,
}

/// An overlay image from storage drawn onto each output before it is encoded (as imgproxy's
/// `watermark` option: position, offset from the edges, opacity, scale to the output).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watermark {
    /// Storage key of the overlay (JPEG, PNG, GIF or WebP; its alpha is kept).
    pub key: String,
    /// The side or corner it sits against (`centre` by default; not `entropy`/`attention`).
    #[serde(default)]
    pub position: Gravity,
    /// Pixels between the overlay and the edges it sits against.
    #[serde(default)]
    pub margin: u32,
    /// 0 (invisible) to 1 (as drawn, the default); multiplies the overlay's own alpha.
    #[serde(default = "one")]
    pub opacity: f64,
    /// The overlay's width as a share of the output's width (0 < scale ≤ 1), its height
    /// following its aspect ratio. Without it the overlay keeps its own size. Either way it is
    /// shrunk to fit inside the margins.
    pub scale: Option<f64>,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// A rectangle of the (oriented) source, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The job's `crop`, in the (oriented) source's pixels, cut before any resize: a rectangle
/// `{x, y, width, height}`, or `{width, height, gravity?}` placed by its gravity — a side or
/// corner, `centre` (the default), or `entropy`/`attention` by the picture's content — as
/// imgproxy's `crop:%width:%height:%gravity` (`crop_box.rs` places it).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "CropFields")]
pub enum CropArg {
    At(Crop),
    Placed {
        width: u32,
        height: u32,
        gravity: Gravity,
    },
}

/// `crop` as JSON, before it is known which form it takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CropFields {
    x: Option<u32>,
    y: Option<u32>,
    width: u32,
    height: u32,
    gravity: Option<Gravity>,
}

impl TryFrom<CropFields> for CropArg {
    type Error = String;

    fn try_from(f: CropFields) -> Result<CropArg, String> {
        let (width, height) = (f.width, f.height);
        match (f.x, f.y, f.gravity) {
            (Some(x), Some(y), None) => Ok(CropArg::At(Crop {
                x,
                y,
                width,
                height,
            })),
            (None, None, gravity) => Ok(CropArg::Placed {
                width,
                height,
                gravity: gravity.unwrap_or_default(),
            }),
            (Some(_), Some(_), Some(g)) => Err(format!(
                "crop has x and y and gravity {}: give x and y, or a gravity to place it, \
                 not both",
                format!("{g:?}").to_lowercase()
            )),
            _ => Err(
                "crop has only one of x and y: give both, or neither and a gravity to \
                      place it (centre when none is given)"
                    .into(),
            ),
        }
    }
}

impl From<Crop> for CropArg {
    fn from(c: Crop) -> CropArg {
        CropArg::At(c)
    }
}

impl CropArg {
    /// The crop's size (as shown): what the outputs are sized from.
    pub fn size(&self) -> (u32, u32) {
        match *self {
            CropArg::At(c) => (c.width, c.height),
            CropArg::Placed { width, height, .. } => (width, height),
        }
    }

    /// The smart crop that places it, if it is placed by one.
    pub fn smart(&self) -> Option<Smart> {
        match self {
            CropArg::Placed { gravity, .. } => gravity.smart(),
            CropArg::At(_) => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub key: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    #[serde(default)]
    pub fit: Fit,
    /// Which part is kept by `cover` and where the picture sits in `contain`'s box.
    #[serde(default)]
    pub gravity: Gravity,
    pub format: Format,
    /// JPEG, lossy WebP and AVIF quality, 1–100.
    pub quality: Option<u8>,
    /// WebP only: lossless instead of lossy.
    #[serde(default)]
    pub lossless: bool,
    /// JPEG only: progressive (the default) or baseline.
    pub progressive: Option<bool>,
    /// AVIF only: encoder speed, 1 (smallest file) to 10 (fastest).
    pub speed: Option<u8>,
    /// What transparent pixels become in a JPEG, and `contain`'s padding there:
    /// `#rrggbb` or `#rgb` (default white).
    pub background: Option<String>,
    pub max_bytes: Option<u64>,
    /// `false`: this output gets no watermark even when the job has one.
    #[serde(default = "yes")]
    pub watermark: bool,
    /// WebP only: an animated GIF or WebP source gives an animated WebP (every frame, with its
    /// duration and the loop count), within `image_max_anim_frames` and
    /// `image_max_anim_pixels` (`anim/`). A still source gives a still. Without it, an animated
    /// source gives its first frame.
    #[serde(default)]
    pub animated: bool,
}

impl TransformArgs {
    /// The job for `source` and `outputs` with every other field at its JSON default (no crop,
    /// EXIF orientation applied, metadata stripped, no watermark).
    pub fn new(source: impl Into<String>, outputs: Vec<OutputSpec>) -> TransformArgs {
        TransformArgs {
            source: source.into(),
            crop: None,
            auto_orient: yes(),
            strip_metadata: yes(),
            watermark: None,
            outputs,
        }
    }
}

impl OutputSpec {
    /// The output a job gets when it names only `key` and `format`: every other field at the
    /// default its JSON has (no size, `inside`, centre gravity, the watermark applied).
    pub fn new(key: impl Into<String>, format: Format) -> OutputSpec {
        OutputSpec {
            key: key.into(),
            width: None,
            height: None,
            fit: Fit::default(),
            gravity: Gravity::default(),
            format,
            quality: None,
            lossless: false,
            progressive: None,
            speed: None,
            background: None,
            max_bytes: None,
            watermark: yes(),
            animated: false,
        }
    }
}

/// How the source fills the output box (as in sharp and imgproxy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Fill the box, cropping the overflow away from the gravity side.
    Cover,
    /// Fit inside the box and pad the rest (transparent, or the background for JPEG).
    Contain,
    /// Stretch to the box, ignoring the aspect ratio.
    Fill,
    /// Fit inside the box, never enlarging; the output may be smaller than the box.
    #[default]
    Inside,
}

/// The side or corner of the picture that `cover` keeps and `contain` aligns to; `entropy`
/// and `attention` (for `cover` only) choose the window by its content (`smartcrop.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gravity {
    #[default]
    #[serde(alias = "center")]
    Centre,
    North,
    South,
    East,
    West,
    Northeast,
    Northwest,
    Southeast,
    Southwest,
    /// The window whose edges carry the most information (libvips' `entropy`).
    Entropy,
    /// The window with the most edges, skin tones and saturated colour (libvips' `attention`).
    Attention,
}

impl Gravity {
    /// The smart crop this gravity asks for, if it is one.
    pub fn smart(self) -> Option<Smart> {
        match self {
            Gravity::Entropy => Some(Smart::Entropy),
            Gravity::Attention => Some(Smart::Attention),
            _ => None,
        }
    }

    /// Where the kept window sits, as fractions of the spare room (0 = left/top, 1 = right/bottom).
    /// The smart gravities' window depends on the picture (`smartcrop.rs`): centre here.
    pub fn anchor(self) -> (f64, f64) {
        match self {
            Gravity::Centre | Gravity::Entropy | Gravity::Attention => (0.5, 0.5),
            Gravity::North => (0.5, 0.0),
            Gravity::South => (0.5, 1.0),
            Gravity::East => (1.0, 0.5),
            Gravity::West => (0.0, 0.5),
            Gravity::Northeast => (1.0, 0.0),
            Gravity::Northwest => (0.0, 0.0),
            Gravity::Southeast => (1.0, 1.0),
            Gravity::Southwest => (0.0, 1.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jpeg,
    Png,
    Webp,
    Avif,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::Webp => "WebP",
            Format::Avif => "AVIF",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Webp => "image/webp",
            Format::Avif => "image/avif",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceInfo {
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputInfo {
    pub key: String,
    pub url: String,
    pub width: u32,
    pub height: u32,
    pub format: Format,
    pub bytes: u64,
    /// Frames of an animated output (absent for a still).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransformResult {
    pub source: SourceInfo,
    pub outputs: Vec<OutputInfo>,
}

pub fn invalid(kind: &'static str, message: impl Into<String>) -> TaskError {
    TaskError::invalid(kind, message)
}

/// `#rrggbb` or `#rgb`.
pub fn parse_colour(text: &str) -> Option<[u8; 3]> {
    let hex = text.strip_prefix('#')?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let digit = |i: usize| u8::from_str_radix(&hex[i..=i], 16).ok();
    match hex.len() {
        6 => {
            let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).ok();
            Some([byte(0)?, byte(2)?, byte(4)?])
        }
        3 => Some([digit(0)? * 17, digit(1)? * 17, digit(2)? * 17]),
        _ => None,
    }
}

/// Checks what can be checked before reading the source.
pub fn check_args(args: &TransformArgs) -> Result<(), TaskError> {
    if args.outputs.is_empty() {
        return Err(invalid(
            "InvalidArguments",
            "outputs is empty: ask for at least one variant",
        ));
    }
    if args.outputs.len() > MAX_OUTPUTS {
        return Err(invalid(
            "InvalidArguments",
            format!(
                "{} outputs asked; at most {MAX_OUTPUTS} per job",
                args.outputs.len()
            ),
        ));
    }
    for (i, o) in args.outputs.iter().enumerate() {
        let bad = |message: String| Err(invalid("InvalidArguments", message));
        for (name, value) in [("width", o.width), ("height", o.height)] {
            match value {
                Some(0) => return bad(format!("outputs[{i}].{name} is 0")),
                Some(v) if v > MAX_SIDE => {
                    return bad(format!("outputs[{i}].{name} is {v}; at most {MAX_SIDE}"))
                }
                _ => {}
            }
        }
        if o.fit != Fit::Inside && (o.width.is_none() || o.height.is_none()) {
            return bad(
                format!("outputs[{i}]: fit {:?} needs both width and height", o.fit).to_lowercase(),
            );
        }
        if let Some(q) = o.quality.filter(|q| !(1..=100).contains(q)) {
            return bad(format!("outputs[{i}].quality is {q}; use 1 to 100"));
        }
        if let Some(speed) = o.speed {
            if o.format != Format::Avif {
                return bad(format!("outputs[{i}].speed is for AVIF output only"));
            }
            if !(1..=10).contains(&speed) {
                return bad(format!("outputs[{i}].speed is {speed}; use 1 to 10"));
            }
        }
        if o.progressive.is_some() && o.format != Format::Jpeg {
            return bad(format!("outputs[{i}].progressive is for JPEG output only"));
        }
        if o.lossless && o.format != Format::Webp {
            return bad(format!(
                "outputs[{i}].lossless is for WebP output only (PNG is always lossless)"
            ));
        }
        if o.animated && o.format != Format::Webp {
            return bad(format!(
                "outputs[{i}].animated is for WebP output only ({} cannot animate here); \
                 without it an animated source gives its first frame",
                o.format.name()
            ));
        }
        if o.gravity.smart().is_some() && o.fit != Fit::Cover {
            return bad(format!(
                "outputs[{i}].gravity {:?} chooses what `cover` keeps; use it with fit cover",
                o.gravity
            )
            .to_lowercase());
        }
        if let Some(bg) = &o.background {
            if parse_colour(bg).is_none() {
                return bad(format!(
                    "outputs[{i}].background is {bg:?}; use a colour like \"#ffffff\" or \"#fff\""
                ));
            }
        }
    }
    if let Some(w) = &args.watermark {
        check_watermark(w)?;
    }
    Ok(())
}

fn check_watermark(w: &Watermark) -> Result<(), TaskError> {
    let bad = |message: String| Err(invalid("InvalidWatermark", message));
    if w.position.smart().is_some() {
        return bad(format!(
            "watermark.position {:?} is a crop gravity; use centre, north, south, east, west, \
             northeast, northwest, southeast or southwest",
            w.position
        )
        .to_lowercase());
    }
    if !(0.0..=1.0).contains(&w.opacity) {
        return bad(format!("watermark.opacity is {}; use 0 to 1", w.opacity));
    }
    if let Some(scale) = w.scale.filter(|s| !(*s > 0.0 && *s <= 1.0)) {
        return bad(format!(
            "watermark.scale is {scale}; use more than 0 and at most 1 (a share of the output's \
             width)"
        ));
    }
    if w.margin > MAX_SIDE {
        return bad(format!(
            "watermark.margin is {}; at most {MAX_SIDE}",
            w.margin
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_parse_in_both_forms() {
        assert_eq!(parse_colour("#ffffff"), Some([255, 255, 255]));
        assert_eq!(parse_colour("#1a2B3c"), Some([0x1a, 0x2b, 0x3c]));
        assert_eq!(parse_colour("#f00"), Some([255, 0, 0]));
        assert_eq!(parse_colour("ffffff"), None);
        assert_eq!(parse_colour("#ffff"), None);
        assert_eq!(parse_colour("#gggggg"), None);
        assert_eq!(parse_colour("#ééé"), None);
    }

    fn args(json: serde_json::Value) -> Result<(), String> {
        let args: TransformArgs = serde_json::from_value(json).map_err(|e| e.to_string())?;
        check_args(&args).map_err(|e| format!("{}: {}", e.exc_type, e.message))
    }

    #[test]
    fn smart_gravities_are_for_cover() {
        let out = |fit: &str, gravity: &str| {
            args(
                serde_json::json!({"source": "s", "outputs": [{"key": "o", "width": 10,
                "height": 10, "fit": fit, "gravity": gravity, "format": "png"}]}),
            )
        };
        assert_eq!(out("cover", "attention"), Ok(()));
        assert_eq!(out("cover", "entropy"), Ok(()));
        let err = out("contain", "entropy").unwrap_err();
        assert_eq!(
            err,
            "InvalidArguments: outputs[0].gravity entropy chooses what `cover` keeps; use it \
             with fit cover"
        );
        assert!(out("cover", "interesting")
            .unwrap_err()
            .contains("unknown variant"));
    }

    #[test]
    fn animated_is_for_webp_outputs() {
        let out = |format: &str| {
            args(
                serde_json::json!({"source": "s", "outputs": [{"key": "o", "format": format,
                "animated": true}]}),
            )
        };
        assert_eq!(out("webp"), Ok(()));
        for format in ["jpeg", "png", "avif"] {
            let err = out(format).unwrap_err();
            assert!(
                err.starts_with("InvalidArguments: outputs[0].animated is for WebP output only"),
                "{err}"
            );
        }
    }

    #[test]
    fn watermark_values_out_of_range_are_named() {
        let mark = |w: serde_json::Value| {
            args(serde_json::json!({"source": "s", "watermark": w,
                "outputs": [{"key": "o", "format": "png"}]}))
        };
        assert_eq!(
            mark(
                serde_json::json!({"key": "m.png", "position": "southeast", "margin": 8,
                "opacity": 0.5, "scale": 0.25})
            ),
            Ok(())
        );
        assert_eq!(mark(serde_json::json!({"key": "m.png"})), Ok(()));
        for (w, says) in [
            (
                serde_json::json!({"key": "m", "opacity": 1.5}),
                "watermark.opacity is 1.5; use 0 to 1",
            ),
            (
                serde_json::json!({"key": "m", "opacity": -0.1}),
                "watermark.opacity is -0.1",
            ),
            (
                serde_json::json!({"key": "m", "scale": 0.0}),
                "watermark.scale is 0;",
            ),
            (
                serde_json::json!({"key": "m", "scale": 2}),
                "watermark.scale is 2;",
            ),
            (
                serde_json::json!({"key": "m", "margin": 20000}),
                "watermark.margin is 20000",
            ),
            (
                serde_json::json!({"key": "m", "position": "attention"}),
                "is a crop gravity",
            ),
        ] {
            let err = mark(w.clone()).unwrap_err();
            assert!(err.starts_with("InvalidWatermark: "), "{w}: {err}");
            assert!(err.contains(says), "{w}: {err}");
        }
        assert!(mark(serde_json::json!({"key": "m", "size": 3}))
            .unwrap_err()
            .contains("unknown field `size`"));
    }
}
