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
//! wallpapers (BENCHMARKS.md).
//!
//! At 3/8 and 1/2 scale dropping every refinement that reaches past the needed band cost the
//! lowest coefficients two bits (35 dB measured), so there only the *last* refinement pass of
//! each such band goes (the scans with Al = 0, which carry each coefficient's lowest bit and,
//! in libjpeg's script, nearly half of a progressive file's bytes): every other scan is kept,
//! and the needed coefficients lose their last bit only. Through the pipeline's resize that is
//! 47–55 dB from an every-scan decode on the benchmark's photographs (BENCHMARKS.md). From 5/8
//! up, and when nothing can be dropped, the file is left alone.

/// What an `eighths`/8 decode needs of a progressive file's scans.
#[derive(Debug, Clone, Copy)]
struct Need {
    /// Highest zig-zag position the scaled IDCT reads: the `s`×`s` lowest frequencies for an
    /// output block of `s` = `eighths` pixels.
    highest: usize,
    /// Only the last-bit refinements (Al = 0) reaching past `highest` may go; every other scan
    /// is kept.
    last_bit_only: bool,
}

/// `None`: every scan is needed.
fn need(eighths: u8) -> Option<Need> {
    let (highest, last_bit_only) = match eighths {
        1 => (0, false),
        2 => (4, false),
        3 => (12, true),
        4 => (24, true),
        _ => return None,
    };
    Some(Need {
        highest,
        last_bit_only,
    })
}

/// One AC scan seen so far: component, band, and whether it is kept.
struct AcScan {
    component: u8,
    start: u8,
    end: u8,
    kept: bool,
}

/// One marker segment of a JPEG: its marker, where it starts (its 0xFF), its body (empty for
/// EOI), and where it ends (for a scan, where its entropy-coded data begins).
pub(crate) struct Segment<'a> {
    pub marker: u8,
    pub start: usize,
    pub body: &'a [u8],
    pub end: usize,
}

/// The marker segment at `at` (fill bytes before its marker skipped); `None` when there is no
/// well-formed segment there. The file walks here and in `lowres.rs` both read with this.
///
/// A marker that carries no length where libjpeg reads segments — a stuffed zero (FF 00, which
/// libjpeg skips as garbage there), TEM, RSTn, SOI — is `None` too: a walk that read a length
/// after it would part ways with libjpeg's (a fuzzed file had another frame header "inside" a
/// segment after FF 00), so such files are left to libjpeg.
pub(crate) fn segment(d: &[u8], mut at: usize) -> Option<Segment<'_>> {
    if *d.get(at)? != 0xFF {
        return None;
    }
    while *d.get(at + 1)? == 0xFF {
        at += 1;
    }
    let marker = *d.get(at + 1)?;
    if marker == 0xD9 {
        return Some(Segment {
            marker,
            start: at,
            body: &[],
            end: at + 2,
        });
    }
    if matches!(marker, 0x00 | 0x01 | 0xD0..=0xD8) {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*d.get(at + 2)?, *d.get(at + 3)?]));
    Some(Segment {
        marker,
        start: at,
        body: d.get(at + 4..at + 2 + len)?,
        end: at + 2 + len,
    })
}

/// The file with only the scans an `eighths`/8 decode needs, or `None` when it is not a
/// progressive Huffman JPEG, nothing can be dropped, or its structure is not as expected (the
/// caller then decodes the original, which reports any damage).
pub fn for_scale(data: &[u8], eighths: u8) -> Option<Vec<u8>> {
    let need = need(eighths)?;
    let highest = need.highest;
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
        let Segment {
            marker,
            start: segment_start,
            body: header,
            end: segment_end,
        } = segment(data, at)?;
        match marker {
            0xD9 => {
                out.extend_from_slice(&[0xFF, 0xD9]);
                break;
            }
            0xC2 => progressive = true,
            // Any other frame type: baseline, lossless, arithmetic coding.
            0xC0 | 0xC1 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            _ => {}
        }
        if marker != 0xDA {
            out.extend_from_slice(&data[segment_start..segment_end]);
            at = segment_end;
            continue;
        }
        if !progressive {
            return None;
        }
        let components = usize::from(*header.first()?);
        if components == 0 || header.len() != 1 + 2 * components + 3 {
            return None;
        }
        let (start, end, refines, last_bit) = (
            header[1 + 2 * components],
            header[2 + 2 * components],
            header[3 + 2 * components] >> 4 != 0,
            header[3 + 2 * components] & 0x0F == 0,
        );
        let scan_end = entropy_end(data, segment_end)?;
        let kept = if start == 0 {
            true
        } else if need.last_bit_only {
            // Nothing refines a coefficient after its last bit, so no later scan misses it.
            !(refines && last_bit && usize::from(end) > highest)
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
            out.extend_from_slice(&data[segment_start..scan_end]);
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
        // libjpeg's own script (successive approximation), what cameras and libvips write.
        crate::jpeg::encode_rgb_scans(
            &rgb,
            width as u32,
            height as u32,
            90,
            crate::jpeg::Scans::Simple,
            &Default::default(),
        )
        .unwrap()
    }

    /// (component, Ss, Se, Ah, Al) of every scan.
    fn scans_al(data: &[u8]) -> Vec<(u8, u8, u8, u8, u8)> {
        let mut out = Vec::new();
        let mut at = 2;
        while at + 4 <= data.len() && data[at + 1] != 0xD9 {
            let len = usize::from(u16::from_be_bytes([data[at + 2], data[at + 3]]));
            if data[at + 1] == 0xDA {
                let h = &data[at + 4..at + 2 + len];
                let n = usize::from(h[0]);
                let a = h[3 + 2 * n];
                out.push((h[1], h[1 + 2 * n], h[2 + 2 * n], a >> 4, a & 0x0F));
                at = entropy_end(data, at + 2 + len).unwrap();
            } else {
                at += 2 + len;
            }
        }
        out
    }

    /// (component, Ss, Se, Ah) of every scan.
    fn scans(data: &[u8]) -> Vec<(u8, u8, u8, u8)> {
        scans_al(data)
            .into_iter()
            .map(|(c, ss, se, ah, _)| (c, ss, se, ah))
            .collect()
    }

    /// PSNR (dB) of two RGB pictures of one size.
    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let sq: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(x.abs_diff(*y)).powi(2))
            .sum();
        10.0 * (255.0f64 * 255.0 / (sq / a.len() as f64)).log10()
    }

    /// A smooth picture with some detail (gradients and a soft ripple), closer to a photograph
    /// than `progressive`'s hard pattern.
    fn photo_like(width: usize, height: usize) -> Vec<u8> {
        let mut rgb = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                let (fx, fy) = (x as f64, y as f64);
                let ripple = ((fx / 9.0).sin() * (fy / 13.0).cos() * 40.0) as i32;
                rgb.extend_from_slice(&[
                    (60 + (x * 120 / width) as i32 + ripple).clamp(0, 255) as u8,
                    (90 + (y * 100 / height) as i32 - ripple / 2).clamp(0, 255) as u8,
                    (140 + ((x + y) * 60 / (width + height)) as i32 + ripple / 3).clamp(0, 255)
                        as u8,
                ]);
            }
        }
        crate::jpeg::encode_rgb_scans(
            &rgb,
            width as u32,
            height as u32,
            92,
            crate::jpeg::Scans::Simple,
            &Default::default(),
        )
        .unwrap()
    }

    #[test]
    fn three_eighths_and_a_half_drop_only_the_last_bit_of_bands_past_the_needed_ones() {
        let file = progressive(96, 64);
        let all = scans_al(&file);
        for (eighths, highest) in [(3u8, 12u8), (4, 24)] {
            let kept = scans_al(&for_scale(&file, eighths).unwrap());
            let expected: Vec<_> = all
                .iter()
                .copied()
                .filter(|&(_, ss, se, ah, al)| !(ss > 0 && ah > 0 && al == 0 && se > highest))
                .collect();
            assert_eq!(kept, expected, "at {eighths}/8 from {all:?}");
            // libjpeg's script has a last-bit pass over 1–63 for each component.
            assert_eq!(all.len() - kept.len(), 3, "{all:?} → {kept:?}");
        }
    }

    #[test]
    fn three_eighths_and_a_half_decode_within_40_db_of_every_scan() {
        let file = photo_like(512, 320);
        for eighths in [3u8, 4] {
            let whole = crate::jpeg::decode_rgb_scans(&file, eighths, false)
                .unwrap()
                .unwrap();
            let part = crate::jpeg::decode_rgb(&file, eighths).unwrap().unwrap();
            assert_eq!((part.width, part.height), (whole.width, whole.height));
            let db = psnr(&whole.pixels, &part.pixels);
            assert!(db >= 40.0, "{eighths}/8: {db:.1} dB");
            assert!(db.is_finite(), "{eighths}/8: the scans were not dropped");
        }
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
    fn five_eighths_up_baseline_and_damaged_files_are_left_alone() {
        let file = progressive(64, 48);
        for eighths in 5..=8 {
            assert!(for_scale(&file, eighths).is_none(), "{eighths}/8");
        }
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
