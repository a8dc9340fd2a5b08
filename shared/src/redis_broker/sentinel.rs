//! kombu's `sentinel://` broker URL: the Redis broker found through Redis Sentinel.
//!
//! `broker_url = "sentinel://[:password@]host:port[/db];sentinel://host2:port2;…"` names the
//! sentinels (port 26379 when left out, kombu's default), and the transport option
//! `master_name` the group they monitor. As kombu's `SentinelChannel` does, the password and
//! database of the first URL are the master's (the sentinels are asked without a password),
//! and the sentinels are asked in order: the first one that names the master wins.
//!
//! What it promises: every connection to the broker ([`super::RedisBroker::connect`]: a worker
//! starting, each `mediafarm` command, each control call) asks the sentinels first, so it
//! reaches the master of that moment; a running process asks again whenever its connection
//! fails or the server refuses a write as a replica, and follows the master there
//! ([`super::link`]).

use std::time::Duration;

use super::RedisBrokerError;
use crate::settings::sentinel::parse;

/// Asks the sentinels, in order, for `master_name`'s address; the `redis://` URL of the
/// master with the first URL's credentials and database.
pub async fn master_url(url: &str, master_name: &str) -> Result<String, RedisBrokerError> {
    let parsed = parse(url).map_err(RedisBrokerError::Sentinel)?;
    let mut tried = Vec::new();
    for (host, port) in &parsed.sentinels {
        match ask(host, *port, master_name).await {
            Ok(Some((master_host, master_port))) => {
                let mut m = url::Url::parse("redis://localhost")
                    .map_err(|e| RedisBrokerError::Sentinel(e.to_string()))?;
                let bad = |_| RedisBrokerError::Sentinel(format!("bad master host {master_host}"));
                m.set_host(Some(&master_host)).map_err(bad)?;
                let _ = m.set_port(Some(master_port));
                if let Some(user) = &parsed.username {
                    let _ = m.set_username(user);
                }
                if let Some(pw) = &parsed.password {
                    let _ = m.set_password(Some(pw));
                }
                m.set_path(&format!("/{}", parsed.db));
                tracing::debug!(sentinel = %format!("{host}:{port}"), master = %format!("{master_host}:{master_port}"), %master_name, "Redis master found through Sentinel");
                return Ok(m.to_string());
            }
            Ok(None) => tried.push(format!("{host}:{port}: does not know {master_name:?}")),
            Err(e) => tried.push(format!("{host}:{port}: {e}")),
        }
    }
    Err(RedisBrokerError::Sentinel(format!(
        "no sentinel named the master {master_name:?} ({})",
        tried.join("; ")
    )))
}

/// `SENTINEL get-master-addr-by-name` on one sentinel.
async fn ask(
    host: &str,
    port: u16,
    master_name: &str,
) -> Result<Option<(String, u16)>, redis::RedisError> {
    let client = redis::Client::open(redis::ConnectionAddr::Tcp(host.to_owned(), port))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(master_name)
        .query_async(&mut conn)
        .await?;
    Ok(addr.and_then(|(h, p)| Some((h, p.parse().ok()?))))
}
