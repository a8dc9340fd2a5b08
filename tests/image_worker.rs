//! `image.transform` end to end in a worker on the real RabbitMQ and Redis, with local-directory
//! storage: every EXIF orientation, alpha onto JPEG (white or a named background), padding,
//! gravity, grayscale, 16-bit, CMYK, GIF, WebP, HEIC and AVIF sources, lossy WebP and AVIF outputs (AVIF
//! decoded by Pillow), Display P3 / Adobe RGB profiles converted to sRGB or kept with
//! `strip_metadata: false`, `max_bytes`, and bad inputs (empty, truncated, HTML, SVG, a decompression
//! bomb's header, over the byte limit) that each fail with a clear message while the worker
//! keeps going; smart crops (`entropy`, `attention`) keeping a subject the centre crop cuts, and
//! a watermark read from a real S3-compatible server (moto), drawn where asked and cached. Good
//! sources are generated here (HEIC and AVIF by libheif's `heif-enc`); the bad ones are
//! `fixtures/images/`. Animated GIFs become animated WebPs (frames, sizes and durations read
//! back), within the frame budget.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use image_worker::overlay::OverlayCache;
use image_worker::{ImageSettings, Transform};
use mediafarm::storage::Storage;
use mediafarm::{ClientError, Registry, SendOptions, Settings};
use mediafarm_tests::s3::{http, s3_settings, Moto};
use mediafarm_tests::{failed, python_env, run_python, settings, Farm};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

struct ImageFarm {
    farm: Farm,
    storage: Storage,
    dir: std::path::PathBuf,
    overlays: Arc<OverlayCache>,
}

impl ImageFarm {
    async fn start(label: &str, tweak: impl FnOnce(&mut ImageSettings)) -> ImageFarm {
        let dir = mediafarm_tests::temp_dir("img");
        let mut s = settings();
        s.storage_url = format!("file://{}", dir.display());
        let mut image = ImageSettings::default();
        tweak(&mut image);
        ImageFarm::start_on(label, s, image, dir).await
    }

    /// A farm whose storage is `s`'s (`dir` removed at the end).
    async fn start_on(
        label: &str,
        s: Settings,
        image: ImageSettings,
        dir: std::path::PathBuf,
    ) -> ImageFarm {
        let storage = Storage::from_settings(&s).unwrap();
        let transform = Transform::new(&s, &image).unwrap();
        let overlays = transform.overlays();
        let registry = Registry::new().register(transform);
        let farm = Farm::start(label, s, registry).await;
        ImageFarm {
            farm,
            storage,
            dir,
            overlays,
        }
    }

    async fn upload(&self, key: &str, data: Vec<u8>) {
        self.storage
            .put(key, Bytes::from(data), "application/octet-stream")
            .await
            .unwrap();
    }

    async fn transform(&self, kwargs: Value) -> Result<Value, ClientError> {
        let opts = SendOptions {
            queue: Some(self.farm.queue.clone()),
            ..Default::default()
        };
        let r = self
            .farm
            .client
            .send_task(
                "image.transform",
                kwargs.as_object().cloned().unwrap(),
                &opts,
            )
            .await
            .unwrap();
        r.get(WAIT).await
    }

    async fn output(&self, key: &str) -> DynamicImage {
        let data = self.storage.get(key, 1 << 30).await.unwrap();
        image::load_from_memory(&data).unwrap()
    }

    async fn stop(self) {
        self.farm.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// 40×20: left half red, right half blue.
fn red_left() -> RgbImage {
    RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    })
}

/// A JPEG carrying an EXIF APP1 segment with `orientation`.
fn jpeg_with_orientation(orientation: u16) -> Vec<u8> {
    let jpeg = encode(&DynamicImage::ImageRgb8(red_left()), ImageFormat::Jpeg);
    with_orientation(jpeg, orientation)
}

/// `jpeg` with an EXIF APP1 segment carrying `orientation` spliced in after SOI.
fn with_orientation(jpeg: Vec<u8>, orientation: u16) -> Vec<u8> {
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
    exif.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1]);
    exif.extend_from_slice(&orientation.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&exif);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn is_red(p: Rgba<u8>) -> bool {
    p[0] > 180 && p[2] < 80
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exif_orientation_is_applied() {
    let f = ImageFarm::start("orient", |_| {}).await;
    // Where the red half ends up after each orientation.
    let expect = [
        (1, "left"),
        (2, "right"),
        (3, "right"),
        (4, "left"),
        (5, "top"),
        (6, "top"),
        (7, "bottom"),
        (8, "bottom"),
    ];
    for (o, side) in expect {
        f.upload(&format!("src/o{o}.jpg"), jpeg_with_orientation(o))
            .await;
        let out = f
            .transform(json!({
                "source": format!("src/o{o}.jpg"),
                "outputs": [{"key": format!("out/o{o}.png"), "format": "png"}],
            }))
            .await
            .unwrap();
        let img = f.output(&format!("out/o{o}.png")).await.to_rgba8();
        let (w, h) = img.dimensions();
        assert_eq!(
            (w, h),
            if o >= 5 { (20, 40) } else { (40, 20) },
            "orientation {o}"
        );
        assert_eq!(out["source"]["width"], w, "orientation {o}");
        let (a, b) = match side {
            "left" | "right" => (img.get_pixel(w / 4, h / 2), img.get_pixel(3 * w / 4, h / 2)),
            _ => (img.get_pixel(w / 2, h / 4), img.get_pixel(w / 2, 3 * h / 4)),
        };
        let red_first = side == "left" || side == "top";
        assert_eq!(
            (is_red(*a), is_red(*b)),
            (red_first, !red_first),
            "orientation {o}: red should be {side}"
        );
        // A quarter-size output takes the shrink-on-load path (a JPEG decoded at 1/4 scale):
        // the same orientation, the full size reported for the source.
        let quarter = f
            .transform(json!({
                "source": format!("src/o{o}.jpg"),
                "outputs": [{"key": format!("out/o{o}-q.png"), "width": w / 4, "format": "png"}],
            }))
            .await
            .unwrap();
        assert_eq!(quarter["source"]["width"], w, "orientation {o}");
        let small = f.output(&format!("out/o{o}-q.png")).await.to_rgba8();
        let (sw, sh) = small.dimensions();
        assert_eq!((sw, sh), (w / 4, h / 4), "orientation {o}");
        let (a, b) = match side {
            "left" | "right" => (small.get_pixel(0, sh / 2), small.get_pixel(sw - 1, sh / 2)),
            _ => (small.get_pixel(sw / 2, 0), small.get_pixel(sw / 2, sh - 1)),
        };
        assert_eq!(
            (is_red(*a), is_red(*b)),
            (red_first, !red_first),
            "orientation {o} after shrink-on-load: red should be {side}"
        );
    }
    // auto_orient = false keeps the stored pixel layout.
    f.transform(json!({
        "source": "src/o6.jpg", "auto_orient": false,
        "outputs": [{"key": "out/raw.png", "format": "png"}],
    }))
    .await
    .unwrap();
    assert_eq!(f.output("out/raw.png").await.width(), 40);
    f.stop().await;
}

/// A 192×128 picture whose every part is told apart: red grows to the right, green downwards,
/// and blue rings around an off-centre point, so a wrong turn, flip or window shows.
fn landmarks() -> RgbImage {
    RgbImage::from_fn(192, 128, |x, y| {
        let (dx, dy) = (x as f64 - 60.0, y as f64 - 40.0);
        let ring = ((dx * dx + dy * dy).sqrt() / 6.0).sin();
        Rgb([
            (x * 255 / 191) as u8,
            (y * 255 / 127) as u8,
            (128.0 + 100.0 * ring) as u8,
        ])
    })
}

/// PSNR over every RGBA channel of two equal-size pictures, in dB.
fn psnr(a: &DynamicImage, b: &DynamicImage) -> f64 {
    let (a, b) = (a.to_rgba8(), b.to_rgba8());
    assert_eq!(a.dimensions(), b.dimensions());
    let n = a.as_raw().len() as f64;
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2))
        .sum::<f64>()
        / n;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

fn jpeg_q95(img: &DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
        &mut out, 95,
    ))
    .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oriented_sources_give_the_same_outputs_as_upright_ones() {
    // The worker crops and resizes in the stored frame and turns only the finished output:
    // every orientation must still give what the same picture stored upright gives, with and
    // without a crop, for every fit (cover with a corner gravity, both ways of cutting),
    // and at a 1/4-scale decode.
    let f = ImageFarm::start("orient-same", |_| {}).await;
    let shown = DynamicImage::ImageRgb8(landmarks());
    let outputs = |tag: &str| {
        json!([
            {"key": format!("{tag}/cover-wide.png"), "format": "png", "fit": "cover",
             "width": 60, "height": 30, "gravity": "northeast"},
            {"key": format!("{tag}/cover-tall.png"), "format": "png", "fit": "cover",
             "width": 30, "height": 60, "gravity": "southwest"},
            {"key": format!("{tag}/contain.png"), "format": "png", "fit": "contain",
             "width": 80, "height": 80, "gravity": "south"},
            {"key": format!("{tag}/fill.png"), "format": "png", "fit": "fill",
             "width": 50, "height": 70},
            {"key": format!("{tag}/inside.png"), "format": "png", "fit": "inside",
             "width": 90},
        ])
    };
    let names = [
        "cover-wide",
        "cover-tall",
        "contain",
        "fill",
        "inside",
        "quarter",
    ];
    let crop = json!({"x": 20, "y": 10, "width": 150, "height": 100});
    let run = |o: u16, data: Vec<u8>| {
        let f = &f;
        let outputs = &outputs;
        let crop = crop.clone();
        async move {
            let src = format!("src/same{o}.jpg");
            f.upload(&src, data).await;
            for (tag, crop) in [(format!("o{o}"), None), (format!("o{o}c"), Some(crop))] {
                let mut kwargs = json!({"source": src, "outputs": outputs(&tag)});
                if let Some(c) = crop {
                    kwargs["crop"] = c;
                }
                let out = f.transform(kwargs).await.unwrap();
                assert_eq!(out["source"]["width"], 192, "orientation {o}");
                assert_eq!(out["source"]["height"], 128, "orientation {o}");
            }
            // Small enough for a 1/4-scale decode (shrink-on-load).
            f.transform(json!({"source": src, "outputs": [
                {"key": format!("o{o}/quarter.png"), "format": "png", "width": 40}
            ]}))
            .await
            .unwrap();
        }
    };
    run(1, jpeg_q95(&shown)).await;
    for o in 2..=8u16 {
        // Stored so that orientation `o` shows `shown`: turned by the inverse (6 and 8 undo
        // each other; every other orientation undoes itself).
        let inverse = match o {
            6 => 8,
            8 => 6,
            o => o,
        };
        let mut stored = shown.clone();
        stored.apply_orientation(image::metadata::Orientation::from_exif(inverse as u8).unwrap());
        run(o, with_orientation(jpeg_q95(&stored), o)).await;
        for suffix in ["", "c"] {
            for name in names {
                if name == "quarter" && suffix == "c" {
                    continue;
                }
                let want = f.output(&format!("o1{suffix}/{name}.png")).await;
                let got = f.output(&format!("o{o}{suffix}/{name}.png")).await;
                assert_eq!(
                    (got.width(), got.height()),
                    (want.width(), want.height()),
                    "orientation {o}{suffix} {name}"
                );
                let db = psnr(&got, &want);
                assert!(db >= 35.0, "orientation {o}{suffix} {name}: {db:.1} dB");
            }
        }
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpha_sources_become_every_format_and_fit() {
    let f = ImageFarm::start("alpha", |_| {}).await;
    // 64×32: left half opaque green, right half fully transparent.
    let src = RgbaImage::from_fn(64, 32, |x, _| {
        if x < 32 {
            Rgba([0, 200, 0, 255])
        } else {
            Rgba([0, 0, 0, 0])
        }
    });
    f.upload(
        "src/alpha.png",
        encode(&DynamicImage::ImageRgba8(src), ImageFormat::Png),
    )
    .await;
    let out = f
        .transform(json!({
            "source": "src/alpha.png",
            "outputs": [
                {"key": "v/cover.jpg", "width": 16, "height": 16, "fit": "cover", "format": "jpeg", "quality": 90},
                {"key": "v/contain.png", "width": 32, "height": 32, "fit": "contain", "format": "png"},
                {"key": "v/fill.webp", "width": 10, "height": 30, "fit": "fill", "format": "webp"},
                {"key": "v/inside.png", "width": 32, "format": "png"},
                {"key": "v/crop.png", "format": "png"},
            ],
            "crop": null,
        }))
        .await
        .unwrap();
    let outputs = out["outputs"].as_array().unwrap();
    let dims: Vec<(u64, u64)> = outputs
        .iter()
        .map(|o| (o["width"].as_u64().unwrap(), o["height"].as_u64().unwrap()))
        .collect();
    assert_eq!(dims, [(16, 16), (32, 32), (10, 30), (32, 16), (64, 32)]);
    assert_eq!(
        out["source"],
        json!({"width": 64, "height": 32, "format": "png", "bytes": out["source"]["bytes"]})
    );
    for o in outputs {
        assert!(o["url"].as_str().unwrap().starts_with("file://"), "{o}");
        assert!(o["bytes"].as_u64().unwrap() > 0);
    }
    // JPEG: transparent pixels flattened onto white; no alpha channel.
    let jpeg = f.output("v/cover.jpg").await;
    assert!(!jpeg.color().has_alpha());
    let corner = jpeg.to_rgb8().get_pixel(15, 8).0;
    assert!(
        corner.iter().all(|c| *c > 230),
        "right edge should be white: {corner:?}"
    );
    // Contain: the 32×16 picture centred on a transparent 32×32 canvas.
    let contain = f.output("v/contain.png").await.to_rgba8();
    assert_eq!(contain.get_pixel(4, 2)[3], 0, "padding is transparent");
    assert!(
        contain.get_pixel(4, 16)[1] > 150,
        "the picture is in the middle"
    );
    let webp = f.output("v/fill.webp").await;
    assert_eq!((webp.width(), webp.height()), (10, 30));
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grayscale_sixteen_bit_cmyk_gif_and_webp_sources_decode() {
    let f = ImageFarm::start("kinds", |_| {}).await;
    let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(30, 20, image::Luma([128])));
    f.upload("s/gray.png", encode(&gray, ImageFormat::Png))
        .await;
    let deep = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
        30,
        20,
        Rgb([65535u16, 0, 0]),
    ));
    f.upload("s/deep.png", encode(&deep, ImageFormat::Png))
        .await;
    let webp = DynamicImage::ImageRgb8(RgbImage::from_pixel(30, 20, Rgb([255, 0, 0])));
    f.upload("s/in.webp", encode(&webp, ImageFormat::WebP))
        .await;
    // CMYK JPEG (as print workflows and some cameras write them): pure red.
    let mut cmyk = Vec::new();
    let pixels: Vec<u8> = std::iter::repeat_n([0u8, 255, 255, 0], 30 * 20)
        .flatten()
        .collect();
    jpeg_encoder::Encoder::new(&mut cmyk, 95)
        .encode(&pixels, 30, 20, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    f.upload("s/cmyk.jpg", cmyk).await;
    // Two-frame GIF: red then green; the first frame is used.
    let mut gif = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut gif);
        for color in [[255, 0, 0, 255], [0, 255, 0, 255]] {
            let frame = image::Frame::new(RgbaImage::from_pixel(30, 20, Rgba(color)));
            enc.encode_frame(frame).unwrap();
        }
    }
    f.upload("s/anim.gif", gif).await;

    for (src, want_red) in [
        ("s/gray.png", false),
        ("s/deep.png", true),
        ("s/in.webp", true),
        ("s/cmyk.jpg", true),
        ("s/anim.gif", true),
    ] {
        let key = format!("o/{}.jpg", src.replace('/', "_"));
        let out = f
            .transform(
                json!({"source": src, "outputs": [{"key": key, "width": 15, "format": "jpeg"}]}),
            )
            .await
            .unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(out["outputs"][0]["width"], 15, "{src}");
        let p = f.output(&key).await.to_rgba8();
        let px = *p.get_pixel(7, 5);
        if want_red {
            assert!(is_red(px), "{src}: {px:?}");
        } else {
            assert!(
                (100..160).contains(&px[0]) && px[0].abs_diff(px[2]) < 10,
                "{src}: {px:?}"
            );
        }
    }
    f.stop().await;
}

/// `png` encoded by libheif's own `heif-enc` (HEVC by x265; `-A`: AV1 by libaom), as a phone or
/// an AVIF export would write it.
fn heif_enc(png: &[u8], avif: bool) -> Vec<u8> {
    let dir = mediafarm_tests::temp_dir("heif-enc");
    let (src, out) = (dir.join("in.png"), dir.join("out.heif"));
    std::fs::write(&src, png).unwrap();
    let mut cmd = std::process::Command::new("heif-enc");
    if avif {
        cmd.arg("-A");
    }
    let status = cmd
        .args(["-q", "90", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("heif-enc (libheif-examples, installed by scripts/setup.d/image.sh)");
    assert!(status.success(), "heif-enc failed");
    let data = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heic_and_avif_sources_decode_with_their_alpha() {
    let f = ImageFarm::start("heif", |_| {}).await;
    // 160×80, left half red, right half blue: odd chroma subsampling would blur the edge only.
    let halves = DynamicImage::ImageRgb8(RgbImage::from_fn(160, 80, |x, _| {
        if x < 80 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    }));
    let png = encode(&halves, ImageFormat::Png);
    f.upload("h/in.heic", heif_enc(&png, false)).await;
    f.upload("h/in.avif", heif_enc(&png, true)).await;
    // Opaque red on the left, fully transparent on the right: the alpha plane must survive.
    let cut = DynamicImage::ImageRgba8(RgbaImage::from_fn(160, 80, |x, _| {
        if x < 80 {
            Rgba([255, 0, 0, 255])
        } else {
            Rgba([0, 0, 0, 0])
        }
    }));
    f.upload(
        "h/alpha.avif",
        heif_enc(&encode(&cut, ImageFormat::Png), true),
    )
    .await;

    for (src, format) in [("h/in.heic", "heic"), ("h/in.avif", "avif")] {
        // 40 px wide: a quarter, so the source is box-shrunk by 2 on its way out of libheif.
        let key = format!("o/{format}.jpg");
        let out = f
            .transform(
                json!({"source": src, "outputs": [{"key": key, "width": 40, "format": "jpeg"}]}),
            )
            .await
            .unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(out["source"]["format"], format, "{out}");
        assert_eq!(
            (
                out["source"]["width"].as_u64(),
                out["source"]["height"].as_u64()
            ),
            (Some(160), Some(80))
        );
        assert_eq!(
            (
                out["outputs"][0]["width"].as_u64(),
                out["outputs"][0]["height"].as_u64()
            ),
            (Some(40), Some(20))
        );
        let p = f.output(&key).await.to_rgba8();
        assert!(
            is_red(*p.get_pixel(8, 10)),
            "{src}: {:?}",
            p.get_pixel(8, 10)
        );
        let right = *p.get_pixel(32, 10);
        assert!(right[2] > 180 && right[0] < 80, "{src}: {right:?}");
    }
    f.transform(json!({"source": "h/alpha.avif", "outputs": [{"key": "o/alpha.png", "width": 80, "format": "png"}]}))
        .await
        .unwrap();
    let p = f.output("o/alpha.png").await.to_rgba8();
    let (left, right) = (*p.get_pixel(10, 20), *p.get_pixel(70, 20));
    assert!(is_red(left) && left[3] > 240, "{left:?}");
    assert!(right[3] < 16, "{right:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_lowers_jpeg_quality_until_it_fits() {
    let f = ImageFarm::start("maxbytes", |_| {}).await;
    // Noise compresses badly, so quality matters.
    let mut seed = 7u32;
    let noisy = RgbImage::from_fn(256, 256, |_, _| {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let v = seed.to_be_bytes();
        Rgb([v[0], v[1], v[2]])
    });
    f.upload(
        "n.png",
        encode(&DynamicImage::ImageRgb8(noisy), ImageFormat::Png),
    )
    .await;
    let big = f
        .transform(json!({"source": "n.png", "outputs": [{"key": "q95.jpg", "format": "jpeg", "quality": 95}]}))
        .await
        .unwrap()["outputs"][0]["bytes"]
        .as_u64()
        .unwrap();
    let limit = big * 6 / 10;
    let fitted = f
        .transform(json!({"source": "n.png", "outputs": [{"key": "fit.jpg", "format": "jpeg", "quality": 95, "max_bytes": limit}]}))
        .await
        .unwrap()["outputs"][0]["bytes"]
        .as_u64()
        .unwrap();
    assert!(fitted <= limit, "{fitted} > {limit}");
    let err = failed(
        f.transform(json!({"source": "n.png", "outputs": [{"key": "tiny.jpg", "format": "jpeg", "max_bytes": 500}]}))
            .await,
    );
    assert_eq!(err.exc_type, "OutputTooLarge");
    assert!(
        err.message.contains("tiny.jpg") && err.message.contains("max_bytes 500"),
        "{}",
        err.message
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_fail_clearly_and_the_worker_goes_on() {
    let f = ImageFarm::start("badimg", |s| s.image_max_src_bytes = 64 * 1024).await;
    let good = encode(&DynamicImage::ImageRgb8(red_left()), ImageFormat::Jpeg);
    // Every file of fixtures/images/ fails as fixtures/README.md says (`animated-` ones asked
    // for an animated WebP, the others for a JPEG).
    for case in mediafarm_tests::fixtures::cases("images") {
        let key = case.file_name();
        let data = std::fs::read(&case.path).unwrap();
        f.upload(&format!("bad/{key}"), data).await;
        let output = if key.starts_with("animated-") {
            json!({"key": "x.webp", "format": "webp", "animated": true})
        } else {
            json!({"key": "x.jpg", "format": "jpeg"})
        };
        let err = failed(
            f.transform(json!({"source": format!("bad/{key}"), "outputs": [output]}))
                .await,
        );
        assert_eq!(
            Some(&*err.exc_type),
            case.exc_type.as_deref(),
            "{key}: {}",
            err.message
        );
        case.assert_words(&err.message);
    }
    // Over the 64 KiB limit this farm sets: too big a file to keep in fixtures/ for it.
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![(
        "huge.jpg",
        vec![0xFF; 70 * 1024],
        "SourceTooLarge",
        "the limit is 65536",
    )];
    for (key, data, exc, text) in cases {
        f.upload(&format!("bad/{key}"), data).await;
        let err = failed(
            f.transform(json!({"source": format!("bad/{key}"), "outputs": [{"key": "x.jpg", "format": "jpeg"}]}))
                .await,
        );
        assert_eq!(err.exc_type, exc, "{key}: {}", err.message);
        assert!(err.message.contains(text), "{key}: {}", err.message);
    }
    // Arguments checked before anything is read.
    for (kwargs, text) in [
        (
            json!({"source": "bad/none.jpg", "outputs": [{"key": "x.jpg", "format": "jpeg"}]}),
            "no object",
        ),
        (
            json!({"source": "http://10.0.0.1/x.jpg", "outputs": [{"key": "x.jpg", "format": "jpeg"}]}),
            "refused",
        ),
        (
            json!({"source": "a.jpg", "outputs": []}),
            "outputs is empty",
        ),
        (
            json!({"source": "a.jpg", "outputs": [{"key": "../x.jpg", "format": "jpeg"}]}),
            "`..`",
        ),
        (
            json!({"source": "a.jpg", "outputs": [{"key": "x", "format": "gif"}]}),
            "outputs[0].format",
        ),
        (
            json!({"source": "a.jpg", "outputs": [{"key": "x", "format": "jpeg", "fit": "cover", "width": 10}]}),
            "needs both",
        ),
        (
            json!({"source": "a.gif", "outputs": [{"key": "x", "format": "png", "animated": true}]}),
            "outputs[0].animated is for WebP output only",
        ),
    ] {
        let err = failed(f.transform(kwargs).await);
        assert!(err.message.contains(text), "{text}: {}", err.message);
    }
    // Still working.
    f.upload("ok.jpg", good).await;
    f.transform(json!({"source": "ok.jpg", "outputs": [{"key": "ok.png", "format": "png"}]}))
        .await
        .unwrap();
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_celery_client_runs_the_avatar_pipeline() {
    let f = ImageFarm::start("avatar", |_| {}).await;
    let photo = RgbImage::from_fn(1024, 768, |x, y| Rgb([(x / 4) as u8, (y / 3) as u8, 90]));
    f.upload(
        "uploads/7/original.jpg",
        encode(&DynamicImage::ImageRgb8(photo), ImageFormat::Jpeg),
    )
    .await;
    let mut env = python_env(&f.farm.settings);
    env.push(("AVATAR_USER", "7".into()));
    env.push(("AVATAR_SOURCE", "uploads/7/original.jpg".into()));
    let out = run_python("producer.py", &[&f.farm.queue, "avatar"], &env);
    let out: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(out["state"], "SUCCESS", "{out}");
    let result = &out["ok"];
    assert_eq!(result["source"]["width"], 1024);
    for (variant, size) in result["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .zip([512u32, 128, 64])
    {
        assert_eq!(variant["width"], size);
        assert_eq!(variant["height"], size);
        let url = url::Url::parse(variant["url"].as_str().unwrap()).unwrap();
        let img = image::open(url.to_file_path().unwrap()).unwrap();
        assert_eq!((img.width(), img.height()), (size, size));
    }
    f.stop().await;
}

/// Pixels of `img` at `(x, y)` as RGB.
fn rgb_at(img: &DynamicImage, x: u32, y: u32) -> [u8; 3] {
    img.to_rgb8().get_pixel(x, y).0
}

fn close(a: [u8; 3], b: [u8; 3], tolerance: u8) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= tolerance)
}

/// Decodes `data` with Pillow (its own libavif/libwebp), an independent decoder: `(width,
/// height, [r, g, b] at the centre)`.
fn pillow_decode(data: &[u8]) -> (u32, u32, [u8; 3]) {
    let path = std::env::temp_dir().join(format!("mf-img-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, data).unwrap();
    let out = std::process::Command::new(mediafarm_tests::python())
        .args([
            "-c",
            "import sys; from PIL import Image\n\
             im = Image.open(sys.argv[1]); im.load(); rgb = im.convert('RGB')\n\
             print(im.format, im.width, im.height, *rgb.getpixel((im.width // 2, im.height // 2)))",
        ])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Vec<&str> = text.split_whitespace().collect();
    let n = |i: usize| v[i].parse::<u32>().unwrap();
    (n(1), n(2), [n(3) as u8, n(4) as u8, n(5) as u8])
}

/// A photo-like 300×200 picture: smooth gradients, mid-grey-blue at the centre.
fn gradient() -> RgbImage {
    RgbImage::from_fn(300, 200, |x, y| {
        Rgb([(x * 255 / 299) as u8, (y * 255 / 199) as u8, 128])
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_webp_and_avif_outputs_decode_at_their_size() {
    let f = ImageFarm::start("codecs", |_| {}).await;
    f.upload(
        "g.jpg",
        encode(&DynamicImage::ImageRgb8(gradient()), ImageFormat::Png),
    )
    .await;
    let out = f
        .transform(json!({"source": "g.jpg", "outputs": [
            {"key": "g/lossy.webp", "width": 150, "format": "webp", "quality": 70},
            {"key": "g/lossless.webp", "width": 150, "format": "webp", "lossless": true},
            {"key": "g/fast.avif", "width": 120, "height": 120, "fit": "cover", "format": "avif", "speed": 10, "quality": 60},
            {"key": "g/default.avif", "width": 100, "format": "avif"},
            {"key": "g/progressive.jpg", "width": 150, "format": "jpeg"},
            {"key": "g/baseline.jpg", "width": 150, "format": "jpeg", "progressive": false},
        ]}))
        .await
        .unwrap();
    let dims: Vec<(u64, u64)> = out["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["width"].as_u64().unwrap(), o["height"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        dims,
        [
            (150, 100),
            (150, 100),
            (120, 120),
            (100, 67),
            (150, 100),
            (150, 100)
        ]
    );
    let centre = gradient().get_pixel(150, 100).0;
    // Lossy WebP is a VP8 bitstream, lossless a VP8L one; both decode to the picture.
    for (key, chunk) in [("g/lossy.webp", b"VP8 "), ("g/lossless.webp", b"VP8L")] {
        let data = f.storage.get(key, 1 << 20).await.unwrap();
        assert_eq!(&data[12..16], chunk, "{key}");
        let img = image::load_from_memory(&data).unwrap();
        assert_eq!((img.width(), img.height()), (150, 100), "{key}");
        let px = rgb_at(&img, 75, 50);
        assert!(close(px, centre, 12), "{key}: {px:?} vs {centre:?}");
    }
    for (key, size) in [("g/fast.avif", (120, 120)), ("g/default.avif", (100, 67))] {
        let data = f.storage.get(key, 1 << 20).await.unwrap();
        assert_eq!(&data[4..12], b"ftypavif", "{key}");
        let (w, h, px) = pillow_decode(&data);
        assert_eq!((w, h), size, "{key}");
        assert!(close(px, centre, 16), "{key}: {px:?} vs {centre:?}");
    }
    // JPEG is progressive (SOF2) unless asked for baseline (SOF0).
    for (key, sof) in [("g/progressive.jpg", 0xC2u8), ("g/baseline.jpg", 0xC0)] {
        let data = f.storage.get(key, 1 << 20).await.unwrap();
        let frames: Vec<u8> = data
            .windows(2)
            .filter(|w| w[0] == 0xFF && matches!(w[1], 0xC0 | 0xC2))
            .map(|w| w[1])
            .collect();
        assert_eq!(frames.first(), Some(&sof), "{key}");
        let img = image::load_from_memory(&data).unwrap();
        assert!(close(rgb_at(&img, 75, 50), centre, 12), "{key}");
    }
    // Options that only make sense for another format are refused.
    for (output, text) in [
        (
            json!({"key": "x.png", "format": "png", "progressive": true}),
            "progressive is for JPEG",
        ),
        (
            json!({"key": "x.jpg", "format": "jpeg", "speed": 5}),
            "speed is for AVIF",
        ),
        (
            json!({"key": "x.avif", "format": "avif", "speed": 11}),
            "use 1 to 10",
        ),
        (
            json!({"key": "x.png", "format": "png", "lossless": true}),
            "lossless is for WebP",
        ),
    ] {
        let err = failed(
            f.transform(json!({"source": "g.jpg", "outputs": [output]}))
                .await,
        );
        assert_eq!(err.exc_type, "InvalidArguments");
        assert!(err.message.contains(text), "{text}: {}", err.message);
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gravity_chooses_what_cover_keeps_and_where_contain_places() {
    let f = ImageFarm::start("gravity", |_| {}).await;
    let (red, green, blue) = ([255, 0, 0], [0, 255, 0], [0, 0, 255]);
    // Wide: red | green | blue columns; tall: red / green / blue rows. 30 px bands.
    let band = |i: u32| match i / 30 {
        0 => red,
        1 => green,
        _ => blue,
    };
    let wide = RgbImage::from_fn(90, 30, |x, _| Rgb(band(x)));
    let tall = RgbImage::from_fn(30, 90, |_, y| Rgb(band(y)));
    f.upload(
        "wide.png",
        encode(&DynamicImage::ImageRgb8(wide), ImageFormat::Png),
    )
    .await;
    f.upload(
        "tall.png",
        encode(&DynamicImage::ImageRgb8(tall), ImageFormat::Png),
    )
    .await;
    for (src, gravity, want) in [
        ("wide.png", "west", red),
        ("wide.png", "centre", green),
        ("wide.png", "center", green),
        ("wide.png", "east", blue),
        ("wide.png", "northwest", red),
        ("wide.png", "southeast", blue),
        ("wide.png", "northeast", blue),
        ("tall.png", "north", red),
        ("tall.png", "south", blue),
        ("tall.png", "southwest", blue),
        ("tall.png", "northeast", red),
    ] {
        let key = format!("cover/{src}-{gravity}.png");
        f.transform(json!({"source": src, "outputs": [
            {"key": key, "width": 10, "height": 10, "fit": "cover", "gravity": gravity, "format": "png"},
        ]}))
        .await
        .unwrap();
        let img = f.output(&key).await;
        for (x, y) in [(1, 1), (5, 5), (8, 8)] {
            assert_eq!(rgb_at(&img, x, y), want, "{src} {gravity} at ({x}, {y})");
        }
    }
    // Contain: the 90×30 picture in a 90×90 box, at the top, middle or bottom.
    for (gravity, picture_rows) in [("north", 0..30), ("centre", 30..60), ("south", 60..90)] {
        let key = format!("contain/{gravity}.png");
        f.transform(json!({"source": "wide.png", "outputs": [
            {"key": key, "width": 90, "height": 90, "fit": "contain", "gravity": gravity, "format": "png"},
        ]}))
        .await
        .unwrap();
        let img = f.output(&key).await.to_rgba8();
        for y in [5u32, 45, 85] {
            let opaque = img.get_pixel(45, y)[3] == 255;
            assert_eq!(opaque, picture_rows.contains(&y), "{gravity}: row {y}");
        }
    }
    let err = failed(
        f.transform(json!({"source": "wide.png", "outputs": [
            {"key": "x.png", "width": 9, "height": 9, "fit": "cover", "gravity": "up", "format": "png"},
        ]}))
        .await,
    );
    assert!(
        err.message.contains("gravity") || err.message.contains("up"),
        "{}",
        err.message
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_pixels_take_the_background_asked_for() {
    let f = ImageFarm::start("background", |_| {}).await;
    // 40×20: left half opaque green, right half fully transparent.
    let src = RgbaImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgba([0, 200, 0, 255])
        } else {
            Rgba([0, 0, 0, 0])
        }
    });
    f.upload(
        "a.png",
        encode(&DynamicImage::ImageRgba8(src), ImageFormat::Png),
    )
    .await;
    f.transform(json!({"source": "a.png", "outputs": [
        {"key": "flat.jpg", "format": "jpeg", "quality": 95, "background": "#ff0000"},
        {"key": "white.jpg", "format": "jpeg", "quality": 95},
        {"key": "box.jpg", "width": 40, "height": 40, "fit": "contain", "format": "jpeg", "quality": 95, "background": "#00f"},
        {"key": "flat.png", "format": "png", "background": "#ffff00"},
    ]}))
    .await
    .unwrap();
    let flat = f.output("flat.jpg").await;
    assert!(close(rgb_at(&flat, 5, 10), [0, 200, 0], 12));
    assert!(
        close(rgb_at(&flat, 35, 10), [255, 0, 0], 12),
        "{:?}",
        rgb_at(&flat, 35, 10)
    );
    let white = f.output("white.jpg").await;
    assert!(close(rgb_at(&white, 35, 10), [255, 255, 255], 8));
    // Contain's padding (rows 0–9 and 30–39) and the transparent half both take the colour.
    let boxed = f.output("box.jpg").await;
    assert!(
        close(rgb_at(&boxed, 5, 3), [0, 0, 255], 12),
        "{:?}",
        rgb_at(&boxed, 5, 3)
    );
    assert!(close(rgb_at(&boxed, 35, 20), [0, 0, 255], 12));
    assert!(close(rgb_at(&boxed, 5, 20), [0, 200, 0], 12));
    // Other formats keep alpha unless a background is named.
    let png = f.output("flat.png").await;
    assert!(!png.color().has_alpha());
    assert_eq!(rgb_at(&png, 35, 10), [255, 255, 0]);
    let err = failed(
        f.transform(json!({"source": "a.png", "outputs": [{"key": "x.jpg", "format": "jpeg", "background": "white"}]}))
            .await,
    );
    assert_eq!(err.exc_type, "InvalidArguments");
    assert!(err.message.contains("#ffffff"), "{}", err.message);
    f.stop().await;
}

fn icc(profile: moxcms::ColorProfile) -> Vec<u8> {
    profile.encode().unwrap()
}

fn png_with_profile(pixel: [u8; 3], profile: Option<&[u8]>) -> Vec<u8> {
    use image::ImageEncoder;
    let img = RgbImage::from_pixel(16, 16, Rgb(pixel));
    let mut out = Vec::new();
    let mut encoder = image::codecs::png::PngEncoder::new(&mut out);
    if let Some(p) = profile {
        encoder.set_icc_profile(p.to_vec()).unwrap();
    }
    encoder
        .write_image(img.as_raw(), 16, 16, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

/// A 16×8 JPEG carrying `profile` in APP2 and an EXIF orientation of 6 (turn 90° clockwise).
fn jpeg_with_profile(pixel: [u8; 3], profile: &[u8]) -> Vec<u8> {
    use image::ImageEncoder;
    let img = RgbImage::from_pixel(16, 8, Rgb(pixel));
    let mut plain = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut plain, 100);
    encoder.set_icc_profile(profile.to_vec()).unwrap();
    encoder
        .write_image(img.as_raw(), 16, 8, image::ExtendedColorType::Rgb8)
        .unwrap();
    let oriented = jpeg_with_orientation(6);
    // Splice the EXIF segment of `jpeg_with_orientation` in after SOI.
    let exif_len = u16::from_be_bytes([oriented[4], oriented[5]]) as usize + 2;
    let mut out = plain[..2].to_vec();
    out.extend_from_slice(&oriented[2..2 + exif_len]);
    out.extend_from_slice(&plain[2..]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_colour_profiles_are_converted_to_srgb() {
    let f = ImageFarm::start("icc", |_| {}).await;
    let p3 = icc(moxcms::ColorProfile::new_display_p3());
    let adobe = icc(moxcms::ColorProfile::new_adobe_rgb());
    // sRGB's pure red written in each space (CSS Color 4: color(display-p3 0.9175 0.2003
    // 0.1386); Adobe RGB shares sRGB's red primary at a higher luminance: (0.858, 0, 0)).
    let p3_red = [234, 51, 35];
    let adobe_red = [219, 0, 0];
    f.upload("p3.png", png_with_profile(p3_red, Some(&p3)))
        .await;
    f.upload("untagged.png", png_with_profile(p3_red, None))
        .await;
    f.upload("adobe.jpg", jpeg_with_profile(adobe_red, &adobe))
        .await;
    f.upload("p3.jpg", jpeg_with_profile(p3_red, &p3)).await;
    for (src, format, want) in [
        ("p3.png", "png", [255, 0, 0]),
        ("untagged.png", "png", p3_red),
        ("adobe.jpg", "png", [255, 0, 0]),
        ("p3.jpg", "jpeg", [255, 0, 0]),
        ("p3.png", "webp", [255, 0, 0]),
    ] {
        let key = format!("c/{src}.{format}");
        let mut output = json!({"key": key, "format": format});
        if format == "webp" {
            output["lossless"] = json!(true);
        }
        f.transform(json!({"source": src, "outputs": [output]}))
            .await
            .unwrap();
        let img = f.output(&key).await;
        let px = rgb_at(&img, img.width() / 2, img.height() / 2);
        assert!(
            close(px, want, 6),
            "{src} → {format}: {px:?}, want {want:?}"
        );
    }
    // A quarter-size output takes the scaled JPEG decode: converted all the same.
    f.transform(json!({"source": "p3.jpg", "outputs": [{"key": "c/small.png", "width": 2, "format": "png"}]}))
        .await
        .unwrap();
    let small = f.output("c/small.png").await;
    assert!(
        close(rgb_at(&small, 1, 1), [255, 0, 0], 8),
        "{:?}",
        rgb_at(&small, 1, 1)
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_metadata_false_keeps_the_profile_and_exif() {
    use image::metadata::Orientation;
    use image::ImageDecoder;
    let f = ImageFarm::start("keepmeta", |_| {}).await;
    let p3 = icc(moxcms::ColorProfile::new_display_p3());
    let p3_red = [234, 51, 35];
    f.upload("p3.jpg", jpeg_with_profile(p3_red, &p3)).await;
    let out = f
        .transform(
            json!({"source": "p3.jpg", "strip_metadata": false, "outputs": [
                {"key": "k/keep.jpg", "format": "jpeg", "quality": 100},
                {"key": "k/keep.png", "format": "png"},
                {"key": "k/keep.webp", "format": "webp", "quality": 100},
                {"key": "k/small.jpg", "width": 4, "format": "jpeg", "quality": 100},
                {"key": "k/keep.avif", "format": "avif", "quality": 100, "speed": 10},
            ]}),
        )
        .await
        .unwrap();
    assert_eq!(out["outputs"][0]["width"], 8, "turned upright: 8×16");
    for key in ["k/keep.jpg", "k/keep.png", "k/keep.webp", "k/small.jpg"] {
        let data = f.storage.get(key, 1 << 20).await.unwrap();
        let reader = image::ImageReader::new(Cursor::new(&data))
            .with_guessed_format()
            .unwrap();
        let mut decoder = reader.into_decoder().unwrap();
        assert_eq!(
            decoder.icc_profile().unwrap().as_deref(),
            Some(&p3[..]),
            "{key}"
        );
        let exif = decoder
            .exif_metadata()
            .unwrap()
            .unwrap_or_else(|| panic!("{key}: no EXIF"));
        // Already turned, so the kept EXIF says "as stored".
        assert_eq!(
            Orientation::from_exif_chunk(&exif),
            Some(Orientation::NoTransforms),
            "{key}"
        );
        let img = DynamicImage::from_decoder(decoder).unwrap();
        let px = rgb_at(&img, img.width() / 2, img.height() / 2);
        // Pixels stay in the profile's space; the profile travels with them.
        assert!(close(px, p3_red, 8), "{key}: {px:?}");
    }
    // AVIF output carries no ICC profile here, so its pixels are converted to sRGB.
    let avif = f.storage.get("k/keep.avif", 1 << 20).await.unwrap();
    let (_, _, px) = pillow_decode(&avif);
    assert!(close(px, [255, 0, 0], 12), "k/keep.avif: {px:?}");
    // Stripped (the default): no profile, no EXIF, sRGB pixels.
    f.transform(json!({"source": "p3.jpg", "outputs": [{"key": "k/strip.jpg", "format": "jpeg"}]}))
        .await
        .unwrap();
    let data = f.storage.get("k/strip.jpg", 1 << 20).await.unwrap();
    let mut decoder = image::codecs::jpeg::JpegDecoder::new(Cursor::new(&data)).unwrap();
    assert_eq!(decoder.icc_profile().unwrap(), None);
    assert_eq!(decoder.exif_metadata().unwrap(), None);
    f.stop().await;
}

/// A colour that changes slowly across the picture, so any output pixel says where it came from.
fn ramp(x: u32, y: u32, (w, h): (u32, u32)) -> [u8; 3] {
    [
        (u64::from(x) * 255 / u64::from(w)) as u8,
        (u64::from(y) * 255 / u64::from(h)) as u8,
        90,
    ]
}

/// A PNG of [`ramp`] written a row at a time, `depth` bits deep (16-bit samples c·257); with
/// `alpha`, the right half half-transparent.
fn ramp_png((w, h): (u32, u32), alpha: bool, depth: png::BitDepth) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    let color = if alpha {
        png::ColorType::Rgba
    } else {
        png::ColorType::Rgb
    };
    enc.set_color(color);
    enc.set_depth(depth);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header().unwrap();
    let samples = color.samples();
    let bytes = if depth == png::BitDepth::Sixteen {
        2
    } else {
        1
    };
    let mut stream = writer.stream_writer().unwrap();
    let mut row = vec![0u8; w as usize * samples * bytes];
    for y in 0..h {
        for x in 0..w {
            let [r, g, b] = ramp(x, y, (w, h));
            let a = if x < w / 2 { 255 } else { 128 };
            let px = [r, g, b, a];
            let at = x as usize * samples * bytes;
            for (c, &v) in px[..samples].iter().enumerate() {
                row[at + c * bytes..at + (c + 1) * bytes].fill(v);
            }
        }
        std::io::Write::write_all(&mut stream, &row).unwrap();
    }
    stream.finish().unwrap();
    drop(writer);
    out
}

fn ramp_rgb((w, h): (u32, u32)) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h {
        for x in 0..w {
            rgb.extend_from_slice(&ramp(x, y, (w, h)));
        }
    }
    rgb
}

/// The worst case of each accepted source format within the default limits (50 MP): 8-bit and
/// 16-bit RGBA PNG, progressive 4:4:4 JPEG, lossy and lossless WebP at WebP's largest side,
/// and GIF, each made into the benchmark's outputs (1280, 640, 160 px JPEG) with the right
/// size and colours. (Their peak memory, which streaming keeps down, is in BENCHMARKS.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_source_of_every_format_succeeds() {
    let f = ImageFarm::start("worst", |_| {}).await;
    let big = (9400u32, 5300u32);
    let wide = (16_383u32, 3050u32);
    let mut sources: Vec<(&str, (u32, u32), bool)> = Vec::new();
    f.upload("w/rgba.png", ramp_png(big, true, png::BitDepth::Eight))
        .await;
    sources.push(("w/rgba.png", big, true));
    f.upload(
        "w/rgba16.png",
        ramp_png((8000, 6000), true, png::BitDepth::Sixteen),
    )
    .await;
    sources.push(("w/rgba16.png", (8000, 6000), true));
    let rgb = ramp_rgb(big);
    let mut jpeg = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut jpeg, 90);
    enc.set_progressive(true);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_4_4);
    enc.encode(&rgb, 9400, 5300, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    drop(rgb);
    f.upload("w/prog444.jpg", jpeg).await;
    sources.push(("w/prog444.jpg", big, false));
    let rgb = ramp_rgb(wide);
    let lossy = webp::Encoder::from_rgb(&rgb, wide.0, wide.1)
        .encode(80.0)
        .to_vec();
    f.upload("w/lossy.webp", lossy).await;
    sources.push(("w/lossy.webp", wide, false));
    let mut lossless = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut lossless)
        .encode(&rgb, wide.0, wide.1, image::ExtendedColorType::Rgb8)
        .unwrap();
    drop(rgb);
    f.upload("w/lossless.webp", lossless).await;
    sources.push(("w/lossless.webp", wide, false));
    // GIF: 256 reds (the ramp's red across, fixed green and blue), so no colour is lost to
    // the palette.
    let palette: Vec<u8> = (0..=255u8).flat_map(|i| [i, 128, 90]).collect();
    let mut gif_data = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut gif_data, 9400, 5300, &palette).unwrap();
        let mut indexes = Vec::with_capacity(9400 * 5300);
        for _ in 0..big.1 {
            indexes.extend((0..big.0).map(|x| ramp(x, 0, big)[0]));
        }
        enc.write_frame(&gif::Frame::from_indexed_pixels(9400, 5300, indexes, None))
            .unwrap();
    }
    f.upload("w/big.gif", gif_data).await;
    sources.push(("w/big.gif", big, false));

    for (src, (w, h), alpha) in sources {
        let name = src.trim_start_matches("w/");
        let outputs: Vec<Value> = [1280, 640, 160]
            .iter()
            .map(|width| json!({"key": format!("o/{name}/{width}.jpg"), "width": width, "format": "jpeg", "quality": 90}))
            .collect();
        let out = f
            .transform(json!({"source": src, "outputs": outputs}))
            .await
            .unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(out["source"]["width"], w, "{src}");
        assert_eq!(out["source"]["height"], h, "{src}");
        let img = f.output(&format!("o/{name}/1280.jpg")).await;
        let want_h = (f64::from(h) * 1280.0 / f64::from(w)).round() as u32;
        assert_eq!((img.width(), img.height()), (1280, want_h), "{src}");
        // Landmarks in the opaque left half (the right half of the alpha sources is blended
        // onto white): the ramp's colour there, within JPEG's error.
        for (fx, fy) in [(0.1, 0.1), (0.3, 0.5), (0.45, 0.9)] {
            let (x, y) = ((fx * 1280.0) as u32, (fy * f64::from(want_h)) as u32);
            let mut want = ramp(
                (fx * f64::from(w)) as u32,
                (fy * f64::from(h)) as u32,
                (w, h),
            );
            if src.ends_with(".gif") {
                want[1] = 128;
            }
            let got = rgb_at(&img, x, y);
            assert!(
                close(got, want, 10),
                "{src} at ({x}, {y}): {got:?}, want {want:?}"
            );
        }
        if alpha {
            // Alpha 128 over white: half-way to white.
            let got = rgb_at(&img, 1200, want_h / 2);
            let [r, g, b] = ramp(w * 1200 / 1280, h / 2, (w, h));
            let mix = |c: u8| ((u32::from(c) + 255) / 2) as u8;
            let want = [mix(r), mix(g), mix(b)];
            assert!(close(got, want, 10), "{src}: {got:?}, want {want:?}");
        }
    }
    f.stop().await;
}

const SKIN: [u8; 3] = [224, 172, 140];
const GREY: [u8; 3] = [128, 128, 128];

/// 600×300 flat grey with a subject near the left edge: a skin-coloured disc 120 px across,
/// centred at (90, 150), with a dark checkered band through it (skin tone and texture).
fn subject_left() -> RgbImage {
    RgbImage::from_fn(600, 300, |x, y| {
        let (dx, dy) = (f64::from(x) + 0.5 - 90.0, f64::from(y) + 0.5 - 150.0);
        if dx * dx + dy * dy > 60.0 * 60.0 {
            Rgb(GREY)
        } else if dy.abs() < 12.0 && (x / 4 + y / 4) % 2 == 0 {
            Rgb([40, 30, 20])
        } else {
            Rgb(SKIN)
        }
    })
}

fn skin_pixels(img: &DynamicImage) -> usize {
    let rgb = img.to_rgb8();
    rgb.pixels().filter(|p| close(p.0, SKIN, 24)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_gravity_keeps_the_subject_the_centre_crop_cuts() {
    let f = ImageFarm::start("smart", |_| {}).await;
    let shown = subject_left();
    f.upload(
        "src/subject.png",
        encode(&DynamicImage::ImageRgb8(shown.clone()), ImageFormat::Png),
    )
    .await;
    // The same picture stored turned, shown upright by EXIF orientation 6 (the window is chosen
    // in the stored frame and must land on the same subject).
    let stored = DynamicImage::ImageRgb8(image::imageops::rotate270(&shown));
    f.upload("src/subject-o6.jpg", with_orientation(jpeg_q95(&stored), 6))
        .await;
    // The subject's skin at output scale (cover 150×150 of a 300 px high source: ½ a side);
    // about a tenth of it blends with the background or the dark band when resized, so a
    // window holding the whole subject keeps at least 85 % of this, the centre crop nothing.
    let whole = skin_pixels(&DynamicImage::ImageRgb8(shown)) / 4;
    for (source, name) in [("src/subject.png", "png"), ("src/subject-o6.jpg", "o6")] {
        let outputs: Vec<Value> = ["centre", "entropy", "attention"]
            .iter()
            .map(|g| {
                json!({"key": format!("smart/{name}-{g}.png"), "width": 150, "height": 150,
                       "fit": "cover", "gravity": g, "format": "png"})
            })
            .collect();
        let r = f
            .transform(json!({"source": source, "outputs": outputs}))
            .await
            .unwrap();
        assert_eq!(r["outputs"][1]["width"], 150, "{r}");
        let centre = skin_pixels(&f.output(&format!("smart/{name}-centre.png")).await);
        assert!(
            centre < whole / 100,
            "{name}: the centre crop cut it: {centre} of {whole}"
        );
        for g in ["entropy", "attention"] {
            let out = f.output(&format!("smart/{name}-{g}.png")).await;
            assert_eq!((out.width(), out.height()), (150, 150));
            let kept = skin_pixels(&out);
            assert!(
                kept * 100 >= whole * 85,
                "{name} {g}: {kept} skin pixels of the subject's {whole}"
            );
        }
    }
    // Only `cover` takes them.
    let err = failed(
        f.transform(json!({"source": "src/subject.png", "outputs": [{"key": "x.png",
            "width": 10, "height": 10, "fit": "contain", "gravity": "attention", "format": "png"}]}))
            .await,
    );
    assert!(
        err.message.contains("use it with fit cover"),
        "{}",
        err.message
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermark_from_s3_is_drawn_where_asked_and_cached() {
    let moto = Moto::start().await;
    let bucket = format!("wm-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let (status, _) = http(moto.port, "PUT", &format!("/{bucket}")).await.unwrap();
    assert_eq!(status, 200, "bucket created");
    let f = ImageFarm::start_on(
        "wm",
        s3_settings(&moto, &bucket),
        ImageSettings::default(),
        mediafarm_tests::temp_dir("img-wm"),
    )
    .await;
    const BLUE: [u8; 3] = [40, 90, 200];
    let source = DynamicImage::ImageRgb8(RgbImage::from_pixel(800, 400, Rgb(BLUE)));
    f.upload("src/blue.png", encode(&source, ImageFormat::Png))
        .await;
    // 80×40: opaque red, its right quarter fully transparent.
    let mark = DynamicImage::ImageRgba8(RgbaImage::from_fn(80, 40, |x, _| {
        Rgba([255, 0, 0, if x < 60 { 255 } else { 0 }])
    }));
    f.upload("marks/logo.png", encode(&mark, ImageFormat::Png))
        .await;
    let job = |position: &str, opacity: f64| {
        json!({"source": "src/blue.png",
               "watermark": {"key": "marks/logo.png", "position": position, "margin": 10,
                             "opacity": opacity, "scale": 0.25},
               "outputs": [
                   {"key": format!("wm/{position}-200.png"), "width": 200, "format": "png"},
                   {"key": format!("wm/{position}-100.jpg"), "width": 100, "format": "jpeg",
                    "quality": 95},
                   {"key": format!("wm/{position}-plain.png"), "width": 200, "format": "png",
                    "watermark": false}]})
    };
    f.transform(job("southeast", 1.0)).await.unwrap();
    assert_eq!((f.overlays.misses(), f.overlays.hits()), (1, 0));
    // 200×100: the mark 50×25 at (200-10-50, 100-10-25) = (140, 65); its opaque part is the
    // left 37 px or so.
    let big = f.output("wm/southeast-200.png").await;
    for (x, y) in [(141, 66), (160, 77), (170, 88)] {
        assert!(close(rgb_at(&big, x, y), [255, 0, 0], 2), "({x}, {y})");
    }
    // Its transparent quarter, the margin and the rest of the picture are untouched.
    for (x, y) in [
        (185, 77),
        (195, 95),
        (139, 77),
        (160, 63),
        (100, 50),
        (20, 20),
    ] {
        assert!(close(rgb_at(&big, x, y), BLUE, 1), "({x}, {y})");
    }
    // 100×50 JPEG: the mark 25×13 at (65, 27).
    let small = f.output("wm/southeast-100.jpg").await;
    assert!(
        close(rgb_at(&small, 72, 33), [255, 0, 0], 40),
        "{:?}",
        rgb_at(&small, 72, 33)
    );
    assert!(close(rgb_at(&small, 30, 20), BLUE, 12));
    // The output that opted out has none.
    let plain = f.output("wm/southeast-plain.png").await;
    assert!(plain.to_rgb8().pixels().all(|p| close(p.0, BLUE, 1)));

    // Half opacity at the top left: the second job takes the overlay from the cache.
    f.transform(job("northwest", 0.5)).await.unwrap();
    assert_eq!((f.overlays.misses(), f.overlays.hits()), (1, 1));
    let big = f.output("wm/northwest-200.png").await;
    let half = [148, 45, 100]; // (red + blue) / 2
    assert!(
        close(rgb_at(&big, 20, 20), half, 2),
        "{:?}",
        rgb_at(&big, 20, 20)
    );
    assert!(close(rgb_at(&big, 5, 5), BLUE, 1));
    assert!(close(rgb_at(&big, 150, 80), BLUE, 1));

    // Clear errors: a missing key, an object that is not an image, values out of range.
    f.upload("marks/readme.txt", b"not a picture".to_vec())
        .await;
    for (watermark, text) in [
        (
            json!({"key": "marks/none.png"}),
            "no object at storage key \"marks/none.png\"",
        ),
        (
            json!({"key": "marks/readme.txt"}),
            "\"marks/readme.txt\" is not a JPEG, PNG, GIF or WebP",
        ),
        (
            json!({"key": "marks/logo.png", "opacity": 2}),
            "watermark.opacity is 2",
        ),
        (
            json!({"key": "marks/logo.png", "scale": 0}),
            "watermark.scale is 0",
        ),
        (json!({"key": "../logo.png"}), "watermark.key"),
    ] {
        let err = failed(
            f.transform(json!({"source": "src/blue.png", "watermark": watermark,
                "outputs": [{"key": "x.png", "format": "png"}]}))
                .await,
        );
        assert_eq!(err.exc_type, "InvalidWatermark", "{}", err.message);
        assert!(err.message.contains(text), "{text}: {}", err.message);
    }
    f.stop().await;
}

/// An animated GIF of `frames` frames of 60×40, each a different colour with a white bar that
/// moves, frame `i` shown for `(i + 1) × 10` centiseconds; looped for ever.
fn animated_gif(frames: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut out);
        enc.set_repeat(image::codecs::gif::Repeat::Infinite)
            .unwrap();
        for i in 0..frames {
            let img = RgbaImage::from_fn(60, 40, |x, _| {
                if x / 10 == i % 6 {
                    Rgba([255, 255, 255, 255])
                } else {
                    Rgba([(i * 40) as u8, 255 - (i * 40) as u8, 90, 255])
                }
            });
            let delay = image::Delay::from_numer_denom_ms((i + 1) * 100, 1);
            enc.encode_frame(image::Frame::from_parts(img, 0, 0, delay))
                .unwrap();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn animated_gif_becomes_an_animated_webp_within_the_frame_budget() {
    use image::AnimationDecoder;
    let f = ImageFarm::start("animwebp", |s| s.image_max_anim_frames = 4).await;
    f.upload("anim/ok.gif", animated_gif(3)).await;
    let result = f
        .transform(json!({"source": "anim/ok.gif", "outputs": [
            {"key": "anim/small.webp", "format": "webp", "width": 30, "animated": true},
            {"key": "anim/box.webp", "format": "webp", "width": 40, "height": 40, "fit": "cover", "animated": true},
            {"key": "anim/poster.jpg", "format": "jpeg", "width": 30}
        ]}))
        .await
        .unwrap();
    let outputs = &result["outputs"];
    assert_eq!(result["source"]["format"], "gif");
    assert_eq!(outputs[0]["frames"], 3, "{result}");
    assert_eq!(outputs[1]["frames"], 3, "{result}");
    assert!(outputs[2].get("frames").is_none(), "{result}");
    for (key, size) in [("anim/small.webp", (30, 20)), ("anim/box.webp", (40, 40))] {
        let data = f.storage.get(key, 1 << 20).await.unwrap();
        let decoder = image::codecs::webp::WebPDecoder::new(Cursor::new(&data[..])).unwrap();
        assert!(decoder.has_animation(), "{key}");
        let frames: Vec<image::Frame> = decoder.into_frames().map(|f| f.unwrap()).collect();
        assert_eq!(frames.len(), 3, "{key}");
        let durations: Vec<u32> = frames
            .iter()
            .map(|f| {
                let (n, d) = f.delay().numer_denom_ms();
                n / d
            })
            .collect();
        assert_eq!(durations, [100, 200, 300], "{key}");
        for (i, frame) in frames.iter().enumerate() {
            assert_eq!(frame.buffer().dimensions(), size, "{key} frame {i}");
        }
        // Each frame's colour is its source frame's.
        let px = frames[2].buffer().get_pixel(size.0 - 2, size.1 / 2).0;
        assert!(
            close([px[0], px[1], px[2]], [80, 175, 90], 24),
            "{key}: {px:?}"
        );
    }
    // The still output is the first frame.
    let poster = f.output("anim/poster.jpg").await;
    assert_eq!((poster.width(), poster.height()), (30, 20));
    assert!(close(rgb_at(&poster, 28, 10), [0, 255, 90], 24));
    // Over the frame budget: refused from the container.
    f.upload("anim/long.gif", animated_gif(6)).await;
    let err = failed(
        f.transform(json!({"source": "anim/long.gif", "outputs": [
            {"key": "anim/long.webp", "format": "webp", "animated": true}
        ]}))
        .await,
    );
    assert_eq!(err.exc_type, "SourceTooLarge");
    assert_eq!(
        err.message,
        "the animated gif has 6 frames; the limit is 4 (image_max_anim_frames)"
    );
    // Without `animated`, the same source gives its first frame.
    let still = f
        .transform(json!({"source": "anim/long.gif", "outputs": [
            {"key": "anim/first.webp", "format": "webp"}
        ]}))
        .await
        .unwrap();
    assert!(still["outputs"][0].get("frames").is_none());
    f.stop().await;
}
