//! The one rule for calling a URL that a job named: which URLs may be reached, and a client that
//! reaches only what was checked. [`OutboundPolicy`] checks the scheme (`https://`; `http://`
//! only when allowed), refuses credentials in the URL if asked to, matches the host against an
//! allow-list (exact names or `*.example.com`), resolves it, and refuses loopback, private,
//! link-local and other internal addresses ([`is_internal`]) unless allowed. The client it builds
//! connects to the checked addresses only, so a second DNS answer cannot swap them (DNS
//! rebinding), uses no proxy unless asked, and follows no redirect by itself: [`OutboundPolicy::send`]
//! follows them, when the policy says so, checking every hop as it checked the first URL.
//!
//! The callers differ where their settings differ, and the policy's fields carry that:
//!
//! | caller | empty host list | credentials | redirects | client timeout | proxy |
//! | --- | --- | --- | --- | --- | --- |
//! | job sources (`storage::sources`) | refuses all | allowed | followed, 5 | none (the caller bounds the whole read) | none |
//! | `notify.webhook` | allows any | refused | returned as the answer | `webhook_timeout` | none |
//! | snapshot frame deliveries | allows any | allowed | returned as the answer | `webhook_timeout` | the environment's |
//! | snapshot stream URLs | refuses all | allowed | FFmpeg's | FFmpeg's | FFmpeg's (only [`OutboundPolicy::vet`]) |
//! | snapshot authority uploads | allows any (the URL is the operator's) | refused | returned as the answer | the authority's `timeout_s` | none |
//!
//! A caller whose endpoint wants a client certificate (mutual TLS) sets [`OutboundPolicy::tls`]
//! to a rustls configuration built by [`crate::tls::client_config`]; the client then uses it
//! instead of reqwest's own (the same rustls, so still one TLS stack).
//!
//! Errors are [`OutboundError`]s whose text is the reason alone ("host x is not in
//! source_allowed_hosts"); each caller wraps it in its own error kind and says which URL it was.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use url::Url;

/// The settings a refusal points the reader to, so the message names what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingNames {
    pub allow_http: &'static str,
    pub allowed_hosts: &'static str,
    pub allow_private: &'static str,
}

/// What [`OutboundPolicy::send`] does with a 3xx answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirects {
    /// Nothing is followed: the 3xx answer is the caller's to judge.
    Return,
    /// Up to `max` redirects are followed, each hop checked and pinned like the first URL.
    Follow { max: usize },
}

/// Which URLs may be reached, and how. Start from [`OutboundPolicy::new`] (the strictest
/// rules) and loosen fields from the caller's settings.
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    /// `http://` as well as `https://`.
    pub allow_http: bool,
    /// Further schemes checked like `https://` (e.g. `rtmp`, `rtsp` for streams).
    pub other_schemes: &'static [&'static str],
    /// Exact host names, or `*.example.com` for any subdomain of example.com.
    pub allowed_hosts: Vec<String>,
    /// With `allowed_hosts` empty: `true` allows any host, `false` none.
    pub any_host_when_empty: bool,
    /// Loopback, private, link-local and other internal addresses may be reached.
    pub allow_private: bool,
    /// Refuse `user:password@` in the URL.
    pub refuse_credentials: bool,
    /// Per-request timeout of the built client; `None` leaves it to the caller.
    pub timeout: Option<Duration>,
    pub redirects: Redirects,
    /// Use the proxy from the environment (`HTTPS_PROXY`, …). The proxy, not this policy, then
    /// chooses the address connected to.
    pub system_proxy: bool,
    /// The TLS configuration of the built client (CA, client certificate); `None`: reqwest's
    /// own (the system's CAs, no client certificate).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub names: SettingNames,
}

/// A URL that passed the policy, and the addresses it may be reached at.
#[derive(Debug, Clone)]
pub struct Checked {
    pub url: Url,
    /// The host as matched: lower case, without a trailing dot (`[…]` around IPv6).
    pub host: String,
    pub addrs: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("{scheme}:// is not allowed (https only; see {setting})")]
    Scheme {
        scheme: String,
        setting: &'static str,
    },
    #[error("credentials in the URL")]
    Credentials,
    #[error("no host")]
    NoHost,
    #[error("host {host} is not in {setting}")]
    HostNotAllowed { host: String, setting: &'static str },
    #[error("cannot resolve {host}: {error}")]
    Unresolvable { host: String, error: std::io::Error },
    #[error("{host} has no addresses")]
    NoAddresses { host: String },
    #[error(
        "{host} resolves to {ip}, an internal address (loopback, private, link-local or \
         reserved); see {setting}"
    )]
    Internal {
        host: String,
        ip: IpAddr,
        setting: &'static str,
    },
    #[error("{status} without a Location")]
    RedirectWithoutLocation { status: reqwest::StatusCode },
    #[error("bad redirect: {0}")]
    BadRedirect(url::ParseError),
    #[error("more than {max} redirects")]
    TooManyRedirects { max: usize },
    /// The HTTP client could not be built (TLS roots, …).
    #[error("{0}")]
    Client(reqwest::Error),
    /// The request failed on the way (connect, TLS, timeout, …).
    #[error("{0}")]
    Request(reqwest::Error),
}

impl OutboundError {
    /// The URL (or a redirect hop) is against the rules: trying again will not help. The rest
    /// are network faults (DNS, connect, timeouts) that may pass.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            OutboundError::Unresolvable { .. }
                | OutboundError::NoAddresses { .. }
                | OutboundError::Client(_)
                | OutboundError::Request(_)
        )
    }
}

impl OutboundPolicy {
    /// The strictest rules: `https://` only, no host allowed, no internal address, no
    /// credentials check, no timeout, no redirects followed, no proxy.
    pub fn new(names: SettingNames) -> OutboundPolicy {
        OutboundPolicy {
            allow_http: false,
            other_schemes: &[],
            allowed_hosts: Vec::new(),
            any_host_when_empty: false,
            allow_private: false,
            refuse_credentials: false,
            timeout: None,
            redirects: Redirects::Return,
            system_proxy: false,
            tls: None,
            names,
        }
    }

    /// The checks that need no lookup — scheme, credentials, host list — in that order.
    /// Returns the host as matched.
    pub fn check_url(&self, url: &Url) -> Result<String, OutboundError> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            s if self.other_schemes.contains(&s) => {}
            other => {
                return Err(OutboundError::Scheme {
                    scheme: other.to_owned(),
                    setting: self.names.allow_http,
                })
            }
        }
        if self.refuse_credentials && (!url.username().is_empty() || url.password().is_some()) {
            return Err(OutboundError::Credentials);
        }
        let host = url
            .host_str()
            .ok_or(OutboundError::NoHost)?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let open = self.any_host_when_empty && self.allowed_hosts.is_empty();
        if !open && !host_allowed(&host, &self.allowed_hosts) {
            return Err(OutboundError::HostNotAllowed {
                host,
                setting: self.names.allowed_hosts,
            });
        }
        Ok(host)
    }

    /// [`check_url`](Self::check_url), then the host's addresses, every one of them checked.
    pub async fn resolve(&self, url: &Url) -> Result<Checked, OutboundError> {
        let host = self.check_url(url)?;
        let port = url.port_or_known_default().unwrap_or(match url.scheme() {
            "rtmp" => 1935,
            "rtsp" => 554,
            _ => 443,
        });
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|error| OutboundError::Unresolvable {
                host: host.clone(),
                error,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(OutboundError::NoAddresses { host });
        }
        if !self.allow_private {
            if let Some(bad) = addrs.iter().find(|a| is_internal(a.ip())) {
                return Err(OutboundError::Internal {
                    ip: bad.ip(),
                    host,
                    setting: self.names.allow_private,
                });
            }
        }
        Ok(Checked {
            url: url.clone(),
            host,
            addrs,
        })
    }

    /// For a URL another program will open (FFmpeg), where the address cannot be pinned: the
    /// same checks, but the host is looked up only to refuse internal addresses — with
    /// `allow_private` no lookup is made.
    pub async fn vet(&self, url: &Url) -> Result<(), OutboundError> {
        if self.allow_private {
            self.check_url(url).map(drop)
        } else {
            self.resolve(url).await.map(drop)
        }
    }

    /// A client that connects to `checked`'s addresses only and follows no redirect.
    pub fn client(&self, checked: &Checked) -> Result<reqwest::Client, OutboundError> {
        let mut builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        if !self.system_proxy {
            builder = builder.no_proxy();
        }
        if let Some(timeout) = self.timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(tls) = &self.tls {
            builder = builder.use_preconfigured_tls(rustls::ClientConfig::clone(tls));
        }
        // The name the connector looks up is the URL's host exactly as written (a trailing dot
        // included), so that is the name pinned.
        let name = checked.url.host_str().unwrap_or_default();
        builder
            .resolve_to_addrs(name, &checked.addrs)
            .build()
            .map_err(OutboundError::Client)
    }

    /// Sends the request `build` makes for `url` (given a pinned client and the hop's URL),
    /// each hop checked and pinned; a 3xx is followed or returned as [`redirects`](Self::redirects)
    /// says. The answer is the last hop's.
    pub async fn send(
        &self,
        url: &Url,
        build: impl Fn(&reqwest::Client, Url) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, OutboundError> {
        let max = match self.redirects {
            Redirects::Return => 0,
            Redirects::Follow { max } => max,
        };
        let mut url = url.clone();
        for _ in 0..=max {
            let checked = self.resolve(&url).await?;
            let client = self.client(&checked)?;
            let response = crate::observe::trace::inject_http(build(&client, url.clone()))
                .send()
                .await
                .map_err(OutboundError::Request)?;
            let status = response.status();
            if !status.is_redirection() || self.redirects == Redirects::Return {
                return Ok(response);
            }
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or(OutboundError::RedirectWithoutLocation { status })?;
            url = url.join(location).map_err(OutboundError::BadRedirect)?;
        }
        Err(OutboundError::TooManyRedirects { max })
    }
}

/// Exact names, or `*.example.com` for any subdomain of example.com (not example.com itself).
/// `host` is expected in lower case without a trailing dot, as [`OutboundPolicy::check_url`]
/// passes it.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|pattern| {
        let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
        match pattern.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => host == pattern,
        }
    })
}

/// Addresses a job must not make a worker reach: loopback, private, link-local, shared
/// (CGNAT), unspecified, multicast, broadcast and reserved ranges, in IPv4 and IPv6 (including
/// IPv4 addresses embedded in IPv6).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
                || (seg[0] == 0x64 && seg[1] == 0xff9b) // NAT64: the IPv4 inside decides; refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: SettingNames = SettingNames {
        allow_http: "x_allow_http",
        allowed_hosts: "x_allowed_hosts",
        allow_private: "x_allow_private",
    };

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::808:808",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "100.128.0.1",
            "172.32.0.1",
            "2606:2800:220:1::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn host_patterns_match_exactly_or_subdomains() {
        let allowed = vec!["img.example.com".to_owned(), "*.cdn.example.net".to_owned()];
        assert!(host_allowed("img.example.com", &allowed));
        assert!(host_allowed("a.cdn.example.net", &allowed));
        assert!(host_allowed("a.b.cdn.example.net", &allowed));
        assert!(!host_allowed("cdn.example.net", &allowed));
        assert!(!host_allowed("evilcdn.example.net", &allowed));
        assert!(!host_allowed("img.example.com.evil.org", &allowed));
        assert!(!host_allowed("example.com", &allowed));
        assert!(host_allowed(
            "img.example.com",
            &["IMG.Example.com.".to_owned()]
        ));
    }

    #[test]
    fn urls_are_checked_for_scheme_credentials_and_host() {
        let mut p = OutboundPolicy::new(NAMES);
        p.allowed_hosts = vec!["*.example.com".into()];
        assert_eq!(
            p.check_url(&url("https://A.Example.com./x")).unwrap(),
            "a.example.com"
        );
        let e = p.check_url(&url("http://a.example.com/")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "http:// is not allowed (https only; see x_allow_http)"
        );
        assert!(p.check_url(&url("ftp://a.example.com/")).is_err());
        assert!(p.check_url(&url("rtmp://a.example.com/")).is_err());
        let e = p.check_url(&url("https://example.org/")).unwrap_err();
        assert_eq!(e.to_string(), "host example.org is not in x_allowed_hosts");
        assert!(p.check_url(&url("https://u:p@a.example.com/")).is_ok());

        p.allow_http = true;
        p.other_schemes = &["rtmp"];
        p.refuse_credentials = true;
        assert!(p.check_url(&url("http://a.example.com/")).is_ok());
        assert!(p.check_url(&url("rtmp://a.example.com/live")).is_ok());
        assert!(matches!(
            p.check_url(&url("https://u:p@a.example.com/")),
            Err(OutboundError::Credentials)
        ));

        // An empty list refuses every host, unless the policy opens it.
        let mut p = OutboundPolicy::new(NAMES);
        assert!(p.check_url(&url("https://example.org/")).is_err());
        p.any_host_when_empty = true;
        assert!(p.check_url(&url("https://example.org/")).is_ok());
        p.allowed_hosts = vec!["example.com".into()];
        assert!(p.check_url(&url("https://example.org/")).is_err());
    }

    #[tokio::test]
    async fn internal_addresses_are_refused_unless_allowed() {
        let mut p = OutboundPolicy::new(NAMES);
        p.any_host_when_empty = true;
        for target in [
            "https://127.0.0.1/",
            "https://10.0.0.1:8443/",
            "https://[::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:169.254.169.254]/",
            "https://[fd00::1]/",
        ] {
            let e = p.resolve(&url(target)).await.unwrap_err();
            assert!(matches!(e, OutboundError::Internal { .. }), "{target}: {e}");
            assert!(e.is_refusal());
            assert!(e.to_string().contains("see x_allow_private"), "{e}");
        }
        p.allow_private = true;
        let checked = p
            .resolve(&url("https://[::ffff:127.0.0.1]:8443/"))
            .await
            .unwrap();
        assert_eq!(checked.addrs.len(), 1);
        assert!(is_internal(checked.addrs[0].ip()));
    }

    #[tokio::test]
    async fn vet_looks_up_nothing_when_private_addresses_are_allowed() {
        let mut p = OutboundPolicy::new(NAMES);
        p.other_schemes = &["rtmp"];
        p.allowed_hosts = vec!["no-such-host.invalid".into()];
        p.allow_private = true;
        p.vet(&url("rtmp://no-such-host.invalid/live"))
            .await
            .unwrap();
        p.allow_private = false;
        p.allowed_hosts = vec!["10.0.0.1".into()];
        let e = p.vet(&url("rtmp://10.0.0.1/live")).await.unwrap_err();
        assert!(matches!(e, OutboundError::Internal { .. }), "{e}");
    }

    /// A server on 127.0.0.1 that answers `/to/<location>` with a 302 to `<location>`
    /// (percent-decoded) and anything else with 200 "ok".
    async fn redirector() -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let answer = match path.strip_prefix("/to/") {
                        Some(to) => {
                            let to = to.replace("%3A", ":").replace("%2F", "/");
                            format!(
                                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\
                                 Connection: close\r\n\r\n"
                            )
                        }
                        None => {
                            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                                .to_owned()
                        }
                    };
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn every_redirect_hop_is_checked_again() {
        let port = redirector().await;
        let mut p = OutboundPolicy::new(NAMES);
        p.allow_http = true;
        p.allow_private = true;
        p.allowed_hosts = vec!["127.0.0.1".into()];
        p.timeout = Some(Duration::from_secs(10));
        p.redirects = Redirects::Follow { max: 2 };
        let get = |c: &reqwest::Client, u: Url| c.get(u);
        let base = format!("http://127.0.0.1:{port}");

        // A hop on the list is followed.
        let ok = p
            .send(&url(&format!("{base}/to/%2Fdone")), get)
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);

        // A hop to a host off the list or with a scheme not allowed is refused before it is
        // requested.
        let off_list = format!("{base}/to/http%3A%2F%2Flocalhost%3A{port}%2Fdone");
        let e = p.send(&url(&off_list), get).await.unwrap_err();
        assert!(matches!(e, OutboundError::HostNotAllowed { .. }), "{e}");
        let ftp = format!("{base}/to/ftp%3A%2F%2F127.0.0.1%2Fx");
        let e = p.send(&url(&ftp), get).await.unwrap_err();
        assert!(matches!(e, OutboundError::Scheme { .. }), "{e}");
        p.allowed_hosts.push("localhost".into());
        assert!(p.send(&url(&off_list), get).await.is_ok());

        // Too many hops.
        let loop3 = format!("{base}/to/%2Fto%2F%2Fto%2F%2Fdone");
        let e = p.send(&url(&loop3), get).await.unwrap_err();
        assert_eq!(e.to_string(), "more than 2 redirects");

        // Returned, not followed.
        p.redirects = Redirects::Return;
        let answer = p.send(&url(&off_list), get).await.unwrap();
        assert_eq!(answer.status(), 302);
    }
}
