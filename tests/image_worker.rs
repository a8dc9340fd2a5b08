//! `image.transform` end to end in a worker on the real RabbitMQ and Redis, with local-directory
//! storage: every EXIF orientation, alpha onto JPEG, padding, grayscale, 16-bit, CMYK, GIF and
//! WebP sources, `max_bytes`, and bad inputs (empty, truncated, HTML, SVG, a decompression
//! bomb's header, over the byte limit) that each fail with a clear message while the worker
//! keeps going. Fixtures are generated here, so nothing binary is committed.

use std::io::Cursor;
use std::time::Duration;

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use image_worker::Transform;
use mediafarm::storage::Storage;
use mediafarm::{ClientError, Registry, SendOptions, Settings, TaskError};
use mediafarm_tests::{python_env, run_python, settings, Farm};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

struct ImageFarm {
    farm: Farm,
    storage: Storage,
    dir: std::path::PathBuf,
}

impl ImageFarm {
    async fn start(label: &str, tweak: impl FnOnce(&mut Settings)) -> ImageFarm {
        let dir = std::env::temp_dir().join(format!("mf-img-{}", uuid::Uuid::new_v4().simple()));
        let mut s = settings();
        s.storage_url = format!("file://{}", dir.display());
        tweak(&mut s);
        let storage = Storage::from_settings(&s).unwrap();
        let registry = Registry::new().register(Transform::new(&s).unwrap());
        let farm = Farm::start(label, s, registry).await;
        ImageFarm { farm, storage, dir }
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

fn failed(outcome: Result<Value, ClientError>) -> TaskError {
    match outcome {
        Err(ClientError::Failed { error, .. }) => error,
        other => panic!("expected a failed job, got {other:?}"),
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
    // A PNG header claiming 100000×100000 (a decompression bomb): refused before decoding.
    let mut bomb = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    bomb.extend_from_slice(&13u32.to_be_bytes());
    bomb.extend_from_slice(&ihdr);
    bomb.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    for (kind, body) in [
        (&b"IDAT"[..], &b"\x78\x9c\x03\x00\x00\x00\x00\x01"[..]),
        (b"IEND", b""),
    ] {
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(body);
        bomb.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bomb.extend_from_slice(&chunk);
        bomb.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("empty.jpg", vec![], "InvalidImage", "empty"),
        (
            "truncated.jpg",
            good[..good.len() / 2].to_vec(),
            "InvalidImage",
            "the jpeg",
        ),
        (
            "page.jpg",
            b"<!DOCTYPE html><html><body>404</body></html>".to_vec(),
            "UnsupportedImage",
            "not a JPEG, PNG",
        ),
        (
            "logo.svg",
            b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>".to_vec(),
            "UnsupportedImage",
            "not a JPEG, PNG",
        ),
        ("bomb.png", bomb, "SourceTooLarge", "100000×100000"),
        (
            "huge.jpg",
            vec![0xFF; 70 * 1024],
            "SourceTooLarge",
            "the limit is 65536",
        ),
    ];
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

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
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
