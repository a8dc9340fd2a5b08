//! What the pipeline benchmark examples share: their command line (`--rounds`, `--widths`,
//! `--quality`, `--baseline`, `--png`, then files) and the job they time (each width as a JPEG,
//! or with `--png` as a PNG: the resized pixels before any lossy encode, for quality checks).

use image_worker::spec::{Crop, CropArg, Format, OutputSpec, TransformArgs};

pub struct BenchArgs {
    pub rounds: usize,
    pub widths: Vec<u32>,
    pub quality: u8,
    pub progressive: bool,
    /// Lossless PNG outputs instead of JPEG ones.
    pub png: bool,
    pub files: Vec<String>,
}

impl BenchArgs {
    /// Reads the command line; a flag this does not know is offered to `extra` with a way to
    /// take its value, and `extra` says whether it was one of its own.
    pub fn parse(
        mut extra: impl FnMut(&str, &mut dyn FnMut() -> Result<String, String>) -> Result<bool, String>,
    ) -> Result<BenchArgs, String> {
        let mut parsed = BenchArgs {
            rounds: 3,
            widths: vec![1280, 640, 160],
            quality: 80,
            progressive: true,
            png: false,
            files: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = || args.next().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--rounds" => {
                    parsed.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?
                }
                "--quality" => {
                    parsed.quality = value()?.parse().map_err(|e| format!("--quality: {e}"))?
                }
                "--baseline" => parsed.progressive = false,
                "--png" => parsed.png = true,
                "--widths" => {
                    parsed.widths = value()?
                        .split(',')
                        .map(|w| w.parse().map_err(|e| format!("--widths: {e}")))
                        .collect::<Result<_, _>>()?
                }
                flag if flag.starts_with("--") => {
                    if !extra(flag, &mut value)? {
                        return Err(format!("unknown option {flag}"));
                    }
                }
                _ => parsed.files.push(a),
            }
        }
        if parsed.files.is_empty() {
            return Err("no files given".into());
        }
        Ok(parsed)
    }

    /// The job: every width as a JPEG at the quality and scan mode asked for (or as a PNG).
    pub fn job(&self, crop: Option<Crop>) -> TransformArgs {
        let outputs = self
            .widths
            .iter()
            .map(|w| match self.png {
                true => OutputSpec {
                    width: Some(*w),
                    ..OutputSpec::new(format!("w{w}.png"), Format::Png)
                },
                false => OutputSpec {
                    width: Some(*w),
                    quality: Some(self.quality),
                    progressive: Some(self.progressive),
                    ..OutputSpec::new(format!("w{w}.jpg"), Format::Jpeg)
                },
            })
            .collect();
        TransformArgs {
            crop: crop.map(CropArg::from),
            ..TransformArgs::new("", outputs)
        }
    }
}
