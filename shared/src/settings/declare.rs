//! One declaration per settings group: [`settings_group!`](crate::settings_group) turns a list
//! of `name: type = default, kind;` lines (each with its doc comment) into the struct, its
//! `Default`, the names with their docs and shown defaults, and the parser. Nothing about a
//! setting is written twice, so adding one is one line in the group that owns it.
//!
//! ```ignore
//! mediafarm::settings_group! {
//!     /// image-worker's settings.
//!     pub struct ImageSettings {
//!         owner = "image-worker";
//!         prefixes = ["image_"];
//!         /// Largest source image accepted, in bytes.
//!         image_max_src_bytes: u64 = 50 << 20, Int(1024, 1 << 32);
//!     }
//! }
//! ```
//!
//! A group may name a function for rules across its settings (`pub struct Settings checked_by
//! check_core { ... }`, `fn(&Self) -> Result<(), SettingsError>`); it runs after every value
//! is parsed.

use super::reader::Reader;
use super::SettingsError;

/// One setting as declared: what `--setting-names` and the docs show.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingInfo {
    pub name: &'static str,
    /// The doc comment, lines joined by spaces.
    pub doc: String,
    /// The default as it would be written in the settings file (`(unset)` when there is none).
    pub default: String,
}

/// A group of settings declared with [`settings_group!`](crate::settings_group).
pub trait Group: Sized + Default + Clone + std::fmt::Debug {
    /// The program that reads this group (for messages and the prefix table).
    const OWNER: &'static str;
    /// Name prefixes of this group's settings; empty for the core group, which has none.
    const PREFIXES: &'static [&'static str];
    /// Every name, in declaration order.
    const NAMES: &'static [&'static str];
    /// Every setting with its doc and default.
    fn describe() -> Vec<SettingInfo>;
    /// Parses the group from the values given (names not given keep their defaults).
    fn read(reader: &Reader) -> Result<Self, SettingsError>;
    /// The list-valued settings by name, as parsed.
    fn lists(&self) -> Vec<(&'static str, &[String])>;
    /// Every setting's value as the settings file would write it (`(unset)` when none), in
    /// declaration order: what `inspect conf` reports.
    fn shown_values(&self) -> Vec<(&'static str, String)>;
}

/// What a program loads beside the core settings: one group, a tuple of groups, or `()`.
pub trait Groups: Sized {
    /// Names and prefixes of every group in it.
    fn declared() -> Vec<Declared>;
    fn read(reader: &Reader) -> Result<Self, SettingsError>;
    fn lists(&self) -> Vec<(&'static str, &[String])>;
}

/// A group's names and prefixes, for the unknown-name rule.
#[derive(Debug, Clone, Copy)]
pub struct Declared {
    pub owner: &'static str,
    pub prefixes: &'static [&'static str],
    pub names: &'static [&'static str],
}

impl Declared {
    pub fn of<G: Group>() -> Declared {
        Declared {
            owner: G::OWNER,
            prefixes: G::PREFIXES,
            names: G::NAMES,
        }
    }
}

impl Groups for () {
    fn declared() -> Vec<Declared> {
        Vec::new()
    }
    fn read(_: &Reader) -> Result<Self, SettingsError> {
        Ok(())
    }
    fn lists(&self) -> Vec<(&'static str, &[String])> {
        Vec::new()
    }
}

impl<A: Groups, B: Groups> Groups for (A, B) {
    fn declared() -> Vec<Declared> {
        let mut all = A::declared();
        all.extend(B::declared());
        all
    }
    fn read(reader: &Reader) -> Result<Self, SettingsError> {
        Ok((A::read(reader)?, B::read(reader)?))
    }
    fn lists(&self) -> Vec<(&'static str, &[String])> {
        let mut all = self.0.lists();
        all.extend(self.1.lists());
        all
    }
}

/// Joins a doc comment's lines (each `///` line arrives as one literal).
pub fn join_doc(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Declares a settings group once; see [`crate::settings::declare`].
#[macro_export]
macro_rules! settings_group {
    (
        $(#[$meta:meta])*
        pub struct $group:ident $(checked_by $check:path)? {
            owner = $owner:literal;
            prefixes = [$($prefix:literal),* $(,)?];
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $default:expr, $kind:expr;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $group {
            $(
                $(#[doc = $doc])*
                pub $field: $ty,
            )*
        }

        impl ::std::default::Default for $group {
            fn default() -> Self {
                $group {
                    $($field: $default,)*
                }
            }
        }

        impl $crate::settings::Group for $group {
            const OWNER: &'static str = $owner;
            const PREFIXES: &'static [&'static str] = &[$($prefix),*];
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            fn describe() -> ::std::vec::Vec<$crate::settings::SettingInfo> {
                let d = <Self as ::std::default::Default>::default();
                ::std::vec![$(
                    $crate::settings::SettingInfo {
                        name: stringify!($field),
                        doc: $crate::settings::declare::join_doc(&[$($doc),*]),
                        default: $crate::settings::Value::shown(&d.$field),
                    }
                ),*]
            }

            fn read(
                reader: &$crate::settings::Reader,
            ) -> ::std::result::Result<Self, $crate::settings::SettingsError> {
                let d = <Self as ::std::default::Default>::default();
                let group = $group {
                    $($field: $crate::settings::Kind::<$ty>::read(
                        &$kind,
                        reader,
                        stringify!($field),
                        d.$field,
                    )?,)*
                };
                $($check(&group)?;)?
                Ok(group)
            }

            fn lists(&self) -> ::std::vec::Vec<(&'static str, &[::std::string::String])> {
                let mut all = ::std::vec::Vec::new();
                $(
                    if let Some(items) = $crate::settings::Value::as_list(&self.$field) {
                        all.push((stringify!($field), items));
                    }
                )*
                all
            }

            fn shown_values(&self) -> ::std::vec::Vec<(&'static str, ::std::string::String)> {
                ::std::vec![$(
                    (stringify!($field), $crate::settings::Value::shown(&self.$field)),
                )*]
            }
        }

        impl $crate::settings::Groups for $group {
            fn declared() -> ::std::vec::Vec<$crate::settings::Declared> {
                ::std::vec![$crate::settings::Declared::of::<$group>()]
            }
            fn read(
                reader: &$crate::settings::Reader,
            ) -> ::std::result::Result<Self, $crate::settings::SettingsError> {
                <Self as $crate::settings::Group>::read(reader)
            }
            fn lists(&self) -> ::std::vec::Vec<(&'static str, &[::std::string::String])> {
                <Self as $crate::settings::Group>::lists(self)
            }
        }
    };
}
