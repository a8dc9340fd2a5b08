//! persist-worker: write-behind into PostgreSQL and MySQL/MariaDB. `persist.write` jobs carry
//! one row each; the worker batches rows across concurrent jobs and writes each batch as
//! multi-row upserts in one transaction per table, acknowledging a job only after its row is
//! committed. Only declared tables and columns are written ([`schema`]), with bound values
//! ([`sql`]); a version column makes replays change nothing and keeps the order per key.
//! Rows buffered in Redis Streams are read by `persist.flush` jobs or, with
//! `persist_stream_continuous`, continuously ([`stream`], [`follow`]); [`watch`] keeps `/readyz`
//! honest about the databases and shows the streams' backlog on `/metrics`.

pub mod batch;
pub mod db;
pub mod follow;
pub mod schema;
pub mod settings;
pub mod sql;
pub mod stream;
pub mod watch;
pub mod write;

use std::collections::HashMap;
use std::sync::Arc;

use mediafarm::{Registry, Settings};

pub use settings::PersistSettings;
pub use write::{Write, WriteArgs, WriteResult};

/// A setting persist-worker cannot start with.
#[derive(Debug, thiserror::Error)]
#[error("setting `{name}` is not usable: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

/// The batcher's writer from the settings: one lazily connecting pool per database URL.
/// Pools are made on first use, inside the runtime.
pub fn writer(persist: &PersistSettings) -> Result<batch::Writer, ConfigError> {
    let mut targets: HashMap<String, db::Target> = HashMap::new();
    let mut by_table: HashMap<String, String> = HashMap::new();
    for (table, spec) in &persist.persist_tables.0 {
        let (name, url) = match (&spec.database_url, &persist.persist_database_url) {
            (Some(url), _) => ("persist_tables", url),
            (None, Some(url)) => ("persist_database_url", url),
            (None, None) => {
                return Err(ConfigError {
                    name: "persist_database_url",
                    reason: format!("table `{table}` has no database"),
                })
            }
        };
        if !targets.contains_key(url) {
            let target = db::Target::parse(url).map_err(|reason| ConfigError { name, reason })?;
            targets.insert(url.clone(), target);
        }
        by_table.insert(table.clone(), url.clone());
    }
    Ok(batch::Writer {
        tables: persist.persist_tables.clone(),
        targets,
        by_table,
        pool_size: persist.persist_pool_size,
        connect_timeout: persist.persist_connect_timeout,
        pools: Default::default(),
        batch_size: persist.persist_batch_size as usize,
        batch_wait: persist.persist_batch_wait,
        lanes: persist.persist_write_lanes as usize,
    })
}

/// persist-worker's tasks and background work (the database probe and backlog gauges; the
/// continuous stream readers when `persist_stream_continuous` is set), built from its settings.
pub fn registry(_settings: &Settings, persist: &PersistSettings) -> Result<Registry, ConfigError> {
    let batcher = Arc::new(batch::Batcher::new(Arc::new(writer(persist)?)));
    let streams = Arc::new(stream::Streams::new(batcher.clone(), persist));
    let registry = Registry::new()
        .register(Write::new(batcher))
        .register(stream::Flush::new(streams.clone()))
        .background("persist-database", {
            let streams = streams.clone();
            move |bg| Box::pin(watch::run(streams.clone(), bg))
        });
    Ok(if persist.persist_stream_continuous {
        registry.background("persist-streams", move |bg| {
            Box::pin(follow::run(streams.clone(), bg))
        })
    } else {
        registry
    })
}
