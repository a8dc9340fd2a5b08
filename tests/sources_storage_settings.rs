//! One test binary for three small suites that need no process of their own (one link
//! instead of three); each stays its own file and module, so its tests are named
//! `sources::…`, `storage::…` and `deploy_settings::…`.

#[path = "deploy_settings.rs"]
mod deploy_settings;
#[path = "sources.rs"]
mod sources;
#[path = "storage.rs"]
mod storage;
