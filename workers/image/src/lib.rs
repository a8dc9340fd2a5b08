//! image-worker: the `image.transform` task (crop, resize and compress an upload into stored
//! variants). The binary in `main.rs` runs it as a Celery-compatible worker on queue `image`.

pub mod anim;
pub mod budget;
pub mod colour;
pub mod crop_box;
pub mod de265;
pub mod decode;
pub mod encode;
#[doc(hidden)]
pub mod fuzzing;
pub mod geometry;
pub mod heif;
pub mod heif_items;
pub mod jpeg;
pub mod lowres;
pub mod orient;
pub mod overlay;
pub mod scans;
pub mod settings;
pub mod shrink;
pub mod smartcrop;
pub mod spec;
pub mod streamed;
pub mod transform;
pub(crate) mod webp_meta;
pub mod yuv;

pub use settings::ImageSettings;
pub use transform::Transform;
