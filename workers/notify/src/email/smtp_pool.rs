//! A pool of open SMTP connections, reused across jobs. lettre's own pool opens its sockets
//! without TCP_NODELAY, and lettre writes a message's body and its closing `CRLF.CRLF` as two
//! writes: Nagle's algorithm then holds the terminator until the server's delayed ACK (40 ms on
//! Linux), capping a connection at ~25 emails/s. This pool connects the socket itself with
//! TCP_NODELAY (and does the TLS handshake of `smtps://` itself) and hands it to lettre's SMTP
//! client (EHLO, STARTTLS, AUTH, MAIL/RCPT/DATA).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::Error as SmtpError;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use url::Url;

/// How long an idle connection is kept before it is closed.
const IDLE: Duration = Duration::from_secs(60);

/// Why a send did not happen: the server's or lettre's error, or a socket/timeout problem
/// before lettre was involved (always passing).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Smtp(#[from] SmtpError),
    #[error("{0}")]
    Network(String),
}

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Security {
    /// `smtp://host` — no TLS.
    Plain,
    /// `smtp://host?tls=opportunistic` — STARTTLS when offered.
    Opportunistic,
    /// `smtp://host?tls=required` — STARTTLS or fail.
    StartTls,
    /// `smtps://host` — TLS from the first byte.
    Implicit,
}

/// Where and how to reach the SMTP server, from `smtp_url` and the login settings.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub credentials: Option<(String, String)>,
    pub timeout: Duration,
}

impl Target {
    /// Parses `smtp://[user:pass@]host[:port][?tls=required|opportunistic]` or `smtps://...`.
    pub fn parse(
        text: &str,
        username: Option<&str>,
        password: Option<&str>,
        timeout: Duration,
    ) -> Result<Target, String> {
        let url = Url::parse(text).map_err(|e| e.to_string())?;
        let tls = url
            .query_pairs()
            .find(|(k, _)| k == "tls")
            .map(|(_, v)| v.into_owned());
        let (security, default_port) = match (url.scheme(), tls.as_deref()) {
            ("smtp", None | Some("none")) => (Security::Plain, 25),
            ("smtp", Some("opportunistic")) => (Security::Opportunistic, 587),
            ("smtp", Some("required")) => (Security::StartTls, 587),
            ("smtps", None) => (Security::Implicit, 465),
            (scheme, tls) => {
                return Err(format!(
                    "scheme {scheme}:// with tls={} is not understood",
                    tls.unwrap_or("(none)")
                ))
            }
        };
        let host = url
            .host_str()
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let from_url = (!url.username().is_empty())
            .then(|| (decode(url.username()), decode(url.password().unwrap_or(""))));
        let credentials = match (username, password) {
            (Some(u), Some(p)) => Some((u.to_owned(), p.to_owned())),
            (None, None) => from_url,
            _ => return Err("smtp_username and smtp_password go together".into()),
        };
        Ok(Target {
            port: url.port().unwrap_or(default_port),
            host,
            security,
            credentials,
            timeout,
        })
    }
}

/// Up to `size` connections, each used by one send at a time and parked between sends.
pub struct SmtpPool {
    target: Target,
    hello: ClientId,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    slots: Semaphore,
}

impl SmtpPool {
    pub fn new(target: Target, size: u32) -> SmtpPool {
        SmtpPool {
            target,
            hello: ClientId::default(),
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(size.max(1) as usize),
        }
    }

    /// Sends one message on a pooled connection (opening one when none is idle). A connection
    /// that failed is dropped; the next send opens a fresh one.
    pub async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<Response, SendError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| SendError::Network("the SMTP pool is closed".into()))?;
        let parked = self.take_idle();
        let mut conn = match parked {
            Some(conn) => conn,
            None => self.open().await?,
        };
        // Each command has its own read timeout only for sockets lettre opened itself.
        let limit = self.target.timeout * 4;
        let sent = match tokio::time::timeout(limit, conn.send(envelope, message)).await {
            Ok(sent) => sent,
            Err(_) => {
                return Err(SendError::Network(format!(
                    "the SMTP server did not answer within {} s",
                    limit.as_secs_f64()
                )))
            }
        };
        if !conn.has_broken() {
            if let Ok(mut idle) = self.idle.lock() {
                idle.push((conn, Instant::now()));
            }
        }
        Ok(sent?)
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        let mut idle = self.idle.lock().ok()?;
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < IDLE && !conn.has_broken() {
                return Some(conn);
            }
        }
        None
    }

    async fn open(&self) -> Result<AsyncSmtpConnection, SendError> {
        let t = &self.target;
        let work = async {
            let tcp = TcpStream::connect((t.host.as_str(), t.port))
                .await
                .map_err(|e| {
                    SendError::Network(format!("cannot connect to {}:{}: {e}", t.host, t.port))
                })?;
            tcp.set_nodelay(true)
                .map_err(|e| SendError::Network(e.to_string()))?;
            let mut conn = if t.security == Security::Implicit {
                let tls = super::implicit_tls::connect(tcp, &t.host)
                    .await
                    .map_err(SendError::Network)?;
                AsyncSmtpConnection::connect_with_transport(Box::new(tls), &self.hello).await?
            } else {
                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await?
            };
            let starttls = match t.security {
                Security::StartTls => true,
                Security::Opportunistic => conn.can_starttls(),
                Security::Plain | Security::Implicit => false,
            };
            if starttls {
                conn.starttls(TlsParameters::new(t.host.clone())?, &self.hello)
                    .await?;
            }
            if let Some((user, password)) = &t.credentials {
                conn.auth(
                    &[Mechanism::Plain, Mechanism::Login],
                    &Credentials::new(user.clone(), password.clone()),
                )
                .await?;
            }
            Ok::<_, SendError>(conn)
        };
        match tokio::time::timeout(t.timeout * 3, work).await {
            Ok(conn) => {
                tracing::debug!(host = %t.host, port = t.port, "SMTP connection opened");
                conn
            }
            Err(_) => Err(SendError::Network(format!(
                "cannot connect to {}:{} within {} s",
                t.host,
                t.port,
                (t.timeout * 3).as_secs_f64()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Target, String> {
        Target::parse(url, None, None, Duration::from_secs(1))
    }

    #[test]
    fn urls_choose_security_port_and_login() {
        let t = parse("smtp://mail.example.com").unwrap();
        assert_eq!((t.security, t.port), (Security::Plain, 25));
        let t = parse("smtp://mail.example.com?tls=required").unwrap();
        assert_eq!((t.security, t.port), (Security::StartTls, 587));
        let t = parse("smtp://u%40x:p%2Fw@mail.example.com:2525?tls=opportunistic").unwrap();
        assert_eq!((t.security, t.port), (Security::Opportunistic, 2525));
        assert_eq!(t.credentials, Some(("u@x".into(), "p/w".into())));
        let t = parse("smtps://mail.example.com").unwrap();
        assert_eq!((t.security, t.port), (Security::Implicit, 465));
        assert!(parse("smtps://mail.example.com?tls=required").is_err());
        assert!(parse("smtp://mail.example.com?tls=maybe").is_err());
        let t = Target::parse("smtp://a:b@h", Some("c"), Some("d"), Duration::ZERO).unwrap();
        assert_eq!(t.credentials, Some(("c".into(), "d".into())));
    }
}
