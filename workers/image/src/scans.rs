//! Scan selection for progressive JPEGs decoded at a reduced scale. A progressive file holds
//! its coefficients in several scans (bands of zig-zag positions, first passes and refinement
//! passes), and libjpeg entropy-decodes every scan whatever the output scale: for a 1/4-scale
//! decode of a 5120×2880 file that is most of the time. An IDCT at 1/4 scale keeps the 2×2
//! lowest frequencies of each 8×8 block (zig-zag positions 0–4), at 1/8 only the DC; so this
//! module rewrites the file without the scans that hold nothing below that, and without the
//! AC refinement scans that reach past it (mostly bits for coefficients the IDCT never reads;
//! for the lowest ones only their last bit or two), and libjpeg decodes the rest as it would a
//! file whose later scans have not arrived yet. DC scans are always kept, so a 1/8 decode is
//! exact; at 1/4 the picture is within 41–53 dB PSNR of an every-scan decode on the benchmark's
//! wallpapers (BENCHMARKS.md). At 1/2 scale the low bits matter more (35 dB measured), so the
//! file is left alone, as it is when nothing can be dropped.

/// Highest zig-zag position a scaled IDCT needs: the `s`×`s` lowest frequencies for an output
/// block of `s` = `eighths` pixels. `None`: every scan is needed.
fn highest_needed(eighths: u8) -> Option<usize> {
    match eighths {
        1 => Some(0),
        2 => Some(4),
        _ => None,
    }
}

/// One AC scan seen so far: component, band, and whether it is kept.
struct AcScan {
    component: u8,
    start: u8,
    end: u8,
    kept: bool,
}

/// The file with only the scans an `eighths`/8 decode needs, or `None` when it is not a
/// progressive Huffman JPEG, nothing can be dropped, or its structure is not as expected (the
/// caller then decodes the original, which reports any damage).
pub fn for_scale(data: &[u8], eighths: u8) -> Option<Vec<u8>> {
    let highest = highest_needed(eighths)?;
    if data.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / 2);
    out.extend_from_slice(&data[..2]);
    let mut at = 2;
    let mut progressive = false;
    let mut seen: Vec<AcScan> = Vec::new();
    let mut dropped = false;
    loop {
        if *data.get(at)? != 0xFF {
            return None;
        }
        let marker = *data.get(at + 1)?;
        match marker {
            0xFF => {
                at += 1;
                continue;
            }
            0xD9 => {
                out.extend_from_slice(&[0xFF, 0xD9]);
                break;
            }
            0xC2 => progressive = true,
            // Any other frame type: baseline, lossless, arithmetic coding.
            0xC0 | 0xC1 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([*data.get(at + 2)?, *data.get(at + 3)?]));
        let segment_end = at + 2 + len;
        if len < 2 || segment_end > data.len() {
            return None;
        }
        if marker != 0xDA {
            out.extend_from_slice(&data[at..segment_end]);
            at = segment_end;
            continue;
        }
        if !progressive {
            return None;
        }
        let header = &data[at + 4..segment_end];
        let components = usize::from(*header.first()?);
        if components == 0 || header.len() != 1 + 2 * components + 3 {
            return None;
        }
        let (start, end, refines) = (
            header[1 + 2 * components],
            header[2 + 2 * components],
            header[3 + 2 * components] >> 4 != 0,
        );
        let scan_end = entropy_end(data, segment_end)?;
        let kept = if start == 0 {
            true
        } else {
            let component = header[1];
            let kept = if refines {
                // A refinement reads the history of every coefficient in its band, and one
                // that reaches past the needed band is mostly bits for coefficients the IDCT
                // never reads: it only sharpens the lowest ones by their last bit.
                usize::from(end) <= highest
                    && seen
                        .iter()
                        .filter(|s| s.component == component && s.start <= end && start <= s.end)
                        .all(|s| s.kept)
            } else {
                usize::from(start) <= highest
            };
            seen.push(AcScan {
                component,
                start,
                end,
                kept,
            });
            kept
        };
        if kept {
            out.extend_from_slice(&data[at..scan_end]);
        } else {
            dropped = true;
        }
        at = scan_end;
    }
    dropped.then_some(out)
}

/// Where a scan's entropy-coded data that begins at `from` ends: at the next marker other
/// than a stuffed 0xFF00 or a restart marker.
pub(crate) fn entropy_end(data: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        at += memchr::memchr(0xFF, data.get(at..)?)?;
        match *data.get(at + 1)? {
            0x00 | 0xD0..=0xD7 => at += 2,
            0xFF => at += 1,
            _ => return Some(at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progressive(width: usize, height: usize) -> Vec<u8> {
        let mut rgb = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&[
                    (x * 7 % 256) as u8,
                    (y * 5 % 256) as u8,
                    ((x ^ y) % 256) as u8,
                ]);
            }
        }
        crate::jpeg::encode_rgb(
            &rgb,
            width as u32,
            height as u32,
            90,
            true,
            &Default::default(),
        )
        .unwrap()
    }

    /// (component, Ss, Se, Ah) of every scan.
    fn scans(data: &[u8]) -> Vec<(u8, u8, u8, u8)> {
        let mut out = Vec::new();
        let mut at = 2;
        while at + 4 <= data.len() && data[at + 1] != 0xD9 {
            let len = usize::from(u16::from_be_bytes([data[at + 2], data[at + 3]]));
            if data[at + 1] == 0xDA {
                let h = &data[at + 4..at + 2 + len];
                let n = usize::from(h[0]);
                out.push((h[1], h[1 + 2 * n], h[2 + 2 * n], h[3 + 2 * n] >> 4));
                at = entropy_end(data, at + 2 + len).unwrap();
            } else {
                at += 2 + len;
            }
        }
        out
    }

    #[test]
    fn a_quarter_scale_keeps_dc_the_low_band_and_chroma() {
        let file = progressive(96, 64);
        let all = scans(&file);
        assert!(all.len() >= 8, "{all:?}");
        let kept = scans(&for_scale(&file, 2).unwrap());
        assert!(kept.iter().any(|s| s.1 == 0), "DC kept: {kept:?}");
        for s in &kept {
            if s.1 > 0 && s.3 == 0 {
                assert!(s.1 <= 4, "no first scan above position 4: {kept:?}");
            }
        }
        // libjpeg's script: luma 6–63 goes, and with it every refinement of 1–63; the
        // first passes of 1–5 (luma) and 1–63 (chroma) stay.
        assert!(kept.len() < all.len(), "{all:?} → {kept:?}");
        assert!(kept.iter().all(|s| !(s.1 > 0 && s.3 > 0)), "{kept:?}");
        assert_eq!(
            kept.iter().filter(|s| s.1 == 1 && s.3 == 0).count(),
            3,
            "{kept:?}"
        );
    }

    #[test]
    fn an_eighth_keeps_the_dc_scans_only() {
        let file = progressive(64, 48);
        let kept = scans(&for_scale(&file, 1).unwrap());
        assert!(
            !kept.is_empty() && kept.iter().all(|s| s.1 == 0),
            "{kept:?}"
        );
    }

    #[test]
    fn the_rewritten_file_decodes_close_to_the_whole_one() {
        let file = progressive(256, 128);
        let whole = crate::jpeg::decode_rgb(&file, 2).unwrap().unwrap();
        let part = crate::jpeg::decode_rgb(&for_scale(&file, 2).unwrap(), 2)
            .unwrap()
            .unwrap();
        assert_eq!((part.width, part.height), (whole.width, whole.height));
        let diff: f64 = whole
            .pixels
            .iter()
            .zip(&part.pixels)
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / whole.pixels.len() as f64;
        assert!(diff < 6.0, "mean abs difference {diff}");
    }

    #[test]
    fn half_scale_baseline_and_damaged_files_are_left_alone() {
        let file = progressive(64, 48);
        assert!(for_scale(&file, 4).is_none());
        assert!(for_scale(&file, 8).is_none());
        assert!(for_scale(&file[..file.len() / 2], 2).is_none());
        assert!(for_scale(b"not a jpeg", 2).is_none());
        let mut baseline = Vec::new();
        image::DynamicImage::new_rgb8(16, 16)
            .write_to(
                &mut std::io::Cursor::new(&mut baseline),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        assert!(for_scale(&baseline, 2).is_none());
    }
}
