//! What an FLV video tag is, told from its first five bytes (RTMP video messages carry FLV
//! video tag bodies): an H.264 sequence header (the `avcC` record a decoder is built from), an
//! H.264 keyframe or inter frame with its composition offset, or a codec the RTMP engine does
//! not decode — named, so a session can fail saying which. Nothing here copies the body.

/// FLV frame type 1: a keyframe (what FFmpeg's FLV demuxer marks as key; 4, "generated
/// keyframe", is a server-side seek artefact and not taken).
const FRAME_KEY: u8 = 1;
/// Frame type 5: a video info/command frame, no picture.
const FRAME_COMMAND: u8 = 5;
const CODEC_AVC: u8 = 7;

/// What a video message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Video {
    /// An H.264 decoder configuration record follows the five header bytes.
    AvcConfig,
    /// H.264 NAL units (4-byte lengths) follow the five header bytes.
    AvcFrame {
        key: bool,
        /// Composition time offset, ms: presentation = message timestamp + this.
        cts_ms: i32,
    },
    /// Nothing to decode (end of sequence, command frames, empty messages).
    Ignore,
    /// A codec this engine does not decode.
    Unsupported(&'static str),
}

/// Bytes before the H.264 payload of an AVC video tag.
pub const AVC_HEADER: usize = 5;

/// Classifies a video message from its first bytes (at least five for H.264 frames).
pub fn classify(first: &[u8]) -> Video {
    let Some(&b0) = first.first() else {
        return Video::Ignore;
    };
    // Enhanced RTMP (the 2023 extension): a FourCC names the codec.
    if b0 & 0x80 != 0 {
        if (b0 >> 4) & 0x07 == FRAME_COMMAND {
            return Video::Ignore;
        }
        return Video::Unsupported(match first.get(1..5) {
            Some(b"hvc1") => "HEVC (enhanced RTMP)",
            Some(b"av01") => "AV1 (enhanced RTMP)",
            Some(b"vp09") => "VP9 (enhanced RTMP)",
            Some(b"avc1") => "H.264 in enhanced RTMP framing",
            _ => "an enhanced-RTMP codec",
        });
    }
    let frame = b0 >> 4;
    let codec = b0 & 0x0f;
    if frame == FRAME_COMMAND {
        return Video::Ignore;
    }
    if codec != CODEC_AVC {
        return Video::Unsupported(match codec {
            2 => "Sorenson H.263",
            3 => "Screen video",
            4 => "On2 VP6",
            5 => "On2 VP6 with alpha",
            6 => "Screen video v2",
            12 => "HEVC (FLV codec id 12)",
            13 => "AV1 (FLV codec id 13)",
            _ => "an unknown FLV video codec",
        });
    }
    if first.len() < AVC_HEADER {
        return Video::Ignore;
    }
    match first[1] {
        0 => Video::AvcConfig,
        1 => {
            // Signed 24-bit, big-endian.
            let raw =
                (i32::from(first[2]) << 16) | (i32::from(first[3]) << 8) | i32::from(first[4]);
            let cts_ms = (raw << 8) >> 8;
            Video::AvcFrame {
                key: frame == FRAME_KEY,
                cts_ms,
            }
        }
        _ => Video::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avc_tags_and_other_codecs_are_told_apart() {
        assert_eq!(classify(&[0x17, 0, 0, 0, 0, 1]), Video::AvcConfig);
        assert_eq!(
            classify(&[0x17, 1, 0, 0, 66]),
            Video::AvcFrame {
                key: true,
                cts_ms: 66
            }
        );
        assert_eq!(
            classify(&[0x27, 1, 0xff, 0xff, 0xdf]),
            Video::AvcFrame {
                key: false,
                cts_ms: -33
            }
        );
        assert_eq!(classify(&[0x17, 2, 0, 0, 0]), Video::Ignore);
        assert_eq!(classify(&[0x57, 0]), Video::Ignore);
        assert_eq!(classify(&[]), Video::Ignore);
        assert_eq!(
            classify(&[0x1c, 1, 0, 0, 0]),
            Video::Unsupported("HEVC (FLV codec id 12)")
        );
        assert_eq!(classify(&[0x22, 0]), Video::Unsupported("Sorenson H.263"));
        assert_eq!(
            classify(&[0x90, b'h', b'v', b'c', b'1']),
            Video::Unsupported("HEVC (enhanced RTMP)")
        );
    }
}
