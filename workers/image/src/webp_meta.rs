//! ICC profile and EXIF in a WebP file: libwebp's simple and animation encoders and `image`'s
//! lossless one write no metadata, so the RIFF container is rebuilt in the extended (VP8X)
//! layout around the encoded picture's chunks (an animation's `ANIM` and `ANMF` frames
//! included, its flag kept), as the WebP container specification lays it out.

use mediafarm::TaskError;

use crate::encode::Metadata;

const ICC_FLAG: u8 = 0x20;
const ALPHA_FLAG: u8 = 0x10;
const EXIF_FLAG: u8 = 0x08;
const ANIMATION_FLAG: u8 = 0x02;

fn broken() -> TaskError {
    TaskError::permanent(
        "EncodeError",
        "the WebP encoder wrote an unexpected container",
    )
}

/// `data` (a complete WebP file of `(width, height)`, with `alpha` or not) with `meta` added;
/// unchanged when there is none to add.
pub fn with_metadata(
    data: Vec<u8>,
    (width, height): (u32, u32),
    alpha: bool,
    meta: Metadata<'_>,
) -> Result<Vec<u8>, TaskError> {
    if meta.icc.is_none() && meta.exif.is_none() {
        return Ok(data);
    }
    if data.len() < 12 || &data[..4] != b"RIFF" || &data[8..12] != b"WEBP" {
        return Err(broken());
    }
    // The picture's own chunks (ALPH, VP8, VP8L), without any VP8X the encoder wrote.
    let mut picture = Vec::new();
    let mut kept = 0u8;
    let mut rest = &data[12..];
    while rest.len() >= 8 {
        let size = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let padded = 8 + size + (size & 1);
        if rest.len() < 8 + size {
            return Err(broken());
        }
        if &rest[..4] == b"VP8X" {
            kept = rest.get(8).copied().unwrap_or(0) & (ANIMATION_FLAG | ALPHA_FLAG);
        } else {
            picture.extend_from_slice(&rest[..padded.min(rest.len())]);
            if padded > rest.len() {
                picture.push(0);
            }
        }
        rest = &rest[padded.min(rest.len())..];
    }
    let mut flags = kept;
    if alpha {
        flags |= ALPHA_FLAG;
    }
    if meta.icc.is_some() {
        flags |= ICC_FLAG;
    }
    if meta.exif.is_some() {
        flags |= EXIF_FLAG;
    }
    let mut vp8x = vec![flags, 0, 0, 0];
    vp8x.extend_from_slice(&(width.max(1) - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(height.max(1) - 1).to_le_bytes()[..3]);

    let mut body = b"WEBP".to_vec();
    push_chunk(&mut body, b"VP8X", &vp8x);
    if let Some(icc) = meta.icc {
        push_chunk(&mut body, b"ICCP", icc);
    }
    body.extend_from_slice(&picture);
    if let Some(exif) = meta.exif {
        push_chunk(&mut body, b"EXIF", exif);
    }
    let size = u32::try_from(body.len()).map_err(|_| broken())?;
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn push_chunk(out: &mut Vec<u8>, tag: &[u8; 4], payload: &[u8]) {
    out.extend_from_slice(tag);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    if payload.len() % 2 == 1 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, ImageDecoder, RgbImage};

    #[test]
    fn profile_and_exif_are_readable_back() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(3, 5, image::Rgb([9, 99, 199])));
        let plain = webp::Encoder::from_rgb(img.as_bytes(), 3, 5)
            .encode_simple(false, 80.0)
            .unwrap()
            .to_vec();
        let icc = b"not really a profile, odd length".to_vec();
        let exif = b"MM\0\x2a\0\0\0\x08\0\0".to_vec();
        let meta = Metadata {
            icc: Some(&icc),
            exif: Some(&exif),
        };
        let out = with_metadata(plain, (3, 5), false, meta).unwrap();
        let mut decoder =
            image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(&out)).unwrap();
        assert_eq!(decoder.dimensions(), (3, 5));
        assert_eq!(decoder.icc_profile().unwrap(), Some(icc));
        assert_eq!(decoder.exif_metadata().unwrap(), Some(exif));
        let back = DynamicImage::from_decoder(decoder).unwrap().to_rgb8();
        assert!(back.get_pixel(1, 1)[2] > 150);
    }
}
