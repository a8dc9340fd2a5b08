//! image-worker's settings, declared once (see `mediafarm::settings::declare`): read beside the
//! core settings from the shared settings file; names start with `image_`.

use mediafarm::settings::kinds::*;

mediafarm::settings_group! {
    /// The settings image-worker reads beside the core ones.
    pub struct ImageSettings {
        owner = "image-worker";
        prefixes = ["image_"];
        /// Largest source image accepted, in bytes (checked before it is read).
        image_max_src_bytes: u64 = 50 << 20, Int(1024, 1 << 32);
        /// Largest source image accepted, in pixels (checked from its header, before decoding).
        image_max_src_pixels: u64 = 50_000_000, Int(1, 1 << 32);
        /// Bytes of decoded watermark overlays a worker keeps (LRU; 4 bytes a pixel), counted
        /// in its decode budget; also the largest overlay accepted (at least 4 MiB). 0: none
        /// kept, each job decodes its overlay.
        image_watermark_cache_bytes: u64 = 16 << 20, Int(0, 40 << 20);
        /// Most frames an animated GIF or WebP source may have when an output asks for
        /// `animated` (counted from its container, before any frame is decoded).
        image_max_anim_frames: u64 = 500, Int(1, 100_000);
        /// Most pixels an animation may carry, all frames together (frames × canvas width ×
        /// height), for the source and for each animated output; checked before decoding.
        image_max_anim_pixels: u64 = 100_000_000, Int(1, 1 << 36);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mediafarm::settings::Sources;

    #[test]
    fn every_name_has_an_owned_prefix() {
        mediafarm::settings::sources::assert_prefixes_owned::<ImageSettings>();
    }

    #[test]
    fn the_example_settings_file_has_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/mediafarm.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (_, image) = Sources::from_text(&path, &text, [])
            .unwrap()
            .read::<ImageSettings>()
            .unwrap();
        assert_eq!(image, ImageSettings::default());
    }

    #[test]
    fn wrong_values_name_the_setting() {
        let path = std::path::Path::new("t.toml");
        let err = Sources::from_text(path, "image_max_src_bytes = 10", [])
            .unwrap()
            .read::<ImageSettings>()
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "setting `image_max_src_bytes` = 10 is not accepted: a whole number from 1024 to 4294967296"
        );
    }
}
