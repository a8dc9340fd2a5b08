//! TLS to RabbitMQ (`amqps://`, `broker_use_ssl`) and to the Redis result backend
//! (`rediss://`, `redis_backend_use_ssl`), through rustls with ring: the CA and client
//! certificate files read with errors naming the setting, the key and the file; verification
//! as `cert_reqs` asks, with a warning every time it is off; and a plain-words hint for the
//! handshake failures people meet (unknown CA, wrong host name, client certificate missing or
//! refused). Workers build the rustls configuration of their own TLS endpoints here too (with
//! their own [`TlsKeys`] naming their settings), and find a TLS failure inside an HTTP client's
//! error with [`tls_failure`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// rustls' client configuration, as [`client_config`] builds it (for `OutboundPolicy::tls` in
/// `net`, which depends on this module, not the other way round).
pub use rustls::ClientConfig;

use crate::settings::tls::{redis_tls_options, TlsKeys, TlsOptions, BROKER_KEYS, REDIS_KEYS};
use crate::settings::RedisBackendSsl;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{setting} {key}: cannot read {path}: {source}")]
    Read {
        setting: &'static str,
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{setting} {key}: {path} is not a usable PEM file: {reason}")]
    Pem {
        setting: &'static str,
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{setting}: the client certificate and key cannot be used together: {reason}")]
    Identity {
        setting: &'static str,
        reason: String,
    },
    #[error(
        "{setting}: no CA file is set and the system's CA certificates cannot be loaded \
         ({reason}); set a CA file or install ca-certificates"
    )]
    SystemRoots {
        setting: &'static str,
        reason: String,
    },
    #[error("result_backend: {0}")]
    Url(String),
}

/// The crypto provider of every TLS connection mediafarm makes itself (ring: builds without
/// cmake or NASM, see shared/Cargo.toml).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Logs, loudly, that a connection's server certificate is not verified.
fn warn_unverified(setting: &str, what: &str) {
    tracing::warn!(
        setting,
        "TLS to {what} does NOT verify the server's certificate (cert_reqs = CERT_NONE): anyone \
         on the network path can impersonate the server and read or change every message. Use \
         CERT_REQUIRED with the server's CA file outside a throw-away test"
    );
}

fn read_file(keys: &TlsKeys, key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting: keys.setting,
        key,
        path: path.to_owned(),
        source,
    })
}

/// The certificates of a PEM file; at least one.
fn read_certs(
    keys: &TlsKeys,
    key: &'static str,
    path: &Path,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), TlsError> {
    let bytes = read_file(keys, key, path)?;
    let pem_err = |reason: String| TlsError::Pem {
        setting: keys.setting,
        key,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err(
            "it holds no \"-----BEGIN CERTIFICATE-----\" block".into(),
        ));
    }
    Ok((bytes, certs))
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(keys: &TlsKeys, path: &Path) -> Result<(Vec<u8>, PrivateKeyDer<'static>), TlsError> {
    let bytes = read_file(keys, keys.keyfile, path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        setting: keys.setting,
        key: keys.keyfile,
        path: path.to_owned(),
        reason: match e {
            pem::Error::NoItemsFound => "it holds no unencrypted private key (a \"BEGIN PRIVATE \
                                         KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE \
                                         KEY\" block)"
                .into(),
            other => other.to_string(),
        },
    })?;
    Ok((bytes, key))
}

/// The CAs to trust: the CA file's, or the system's.
fn roots(keys: &TlsKeys, options: &TlsOptions) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match &options.ca_certs {
        Some(path) => {
            let (_, certs) = read_certs(keys, keys.ca_certs, path)?;
            for cert in certs {
                store.add(cert).map_err(|e| TlsError::Pem {
                    setting: keys.setting,
                    key: keys.ca_certs,
                    path: path.clone(),
                    reason: format!("a certificate in it is not a usable CA: {e}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let reason = found
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "none found".into());
                return Err(TlsError::SystemRoots {
                    setting: keys.setting,
                    reason,
                });
            }
        }
    }
    Ok(store)
}

/// The rustls client configuration `options` describe; `keys` names the setting in errors.
pub fn client_config(keys: &TlsKeys, options: &TlsOptions) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Identity {
            setting: keys.setting,
            reason: e.to_string(),
        })?;
    let builder = if options.cert_reqs.verifies() {
        builder.with_root_certificates(roots(keys, options)?)
    } else {
        // The CA file is still read, so a wrong path is found before verification is turned on.
        if options.ca_certs.is_some() {
            roots(keys, options)?;
        }
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(
                provider.signature_verification_algorithms,
            )))
    };
    match (&options.certfile, &options.keyfile) {
        (Some(cert), Some(key)) => {
            let (_, chain) = read_certs(keys, keys.certfile, cert)?;
            let (_, key) = read_key(keys, key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Identity {
                    setting: keys.setting,
                    reason: e.to_string(),
                })
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// The broker's TLS options: `broker_use_ssl`, or its defaults for an `amqps://` URL; `None`
/// for plain AMQP.
pub fn broker_options(settings: &crate::settings::Settings) -> Option<TlsOptions> {
    match &settings.broker_use_ssl {
        Some(ssl) => Some(ssl.0.clone()),
        None => settings
            .broker_url
            .starts_with("amqps://")
            .then(TlsOptions::default),
    }
}

/// The rustls configuration of the broker connection, `None` for plain AMQP.
pub fn broker_config(
    settings: &crate::settings::Settings,
) -> Result<Option<ClientConfig>, TlsError> {
    let Some(options) = broker_options(settings) else {
        return Ok(None);
    };
    if !options.cert_reqs.verifies() {
        warn_unverified(BROKER_KEYS.setting, "RabbitMQ");
    }
    client_config(&BROKER_KEYS, &options).map(Some)
}

/// A Redis client for result backend `url`, with TLS when it is `rediss://` (the options of
/// `setting` and the URL's `ssl_*` query keys; see [`redis_tls_options`]).
pub fn redis_client(
    url: &str,
    setting: Option<&RedisBackendSsl>,
) -> Result<redis::Client, RedisClientError> {
    let Some(options) = redis_tls_options(url, setting).map_err(TlsError::Url)? else {
        return Ok(redis::Client::open(url)?);
    };
    let keys = &REDIS_KEYS;
    // Check everything here, with errors naming the files, before redis parses it again.
    client_config(keys, &options)?;
    let mut plain = url::Url::parse(url).map_err(|e| TlsError::Url(e.to_string()))?;
    let rest: Vec<(String, String)> = plain
        .query_pairs()
        .filter(|(k, _)| !k.starts_with("ssl_"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    plain.set_query(None);
    if !rest.is_empty() {
        plain.query_pairs_mut().extend_pairs(rest);
    }
    if !options.cert_reqs.verifies() {
        warn_unverified(keys.setting, "the Redis result backend");
        plain.set_fragment(Some("insecure"));
    }
    let root_cert = match &options.ca_certs {
        Some(path) => Some(read_file(keys, keys.ca_certs, path)?),
        None => None,
    };
    let client_tls = match (&options.certfile, &options.keyfile) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read_file(keys, keys.certfile, cert)?,
            client_key: read_key(keys, key)?.0,
        }),
        _ => None,
    };
    Ok(redis::Client::build_with_tls(
        plain.as_str(),
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )?)
}

/// Why a Redis client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// A hint for a TLS handshake failure, from the error's text (rustls names the cause):
/// what to change, naming `keys`' setting. Empty when the text is no known TLS failure.
pub fn explain(error: &str, keys: &TlsKeys) -> String {
    let (setting, ca, cert) = (keys.setting, keys.ca_certs, keys.certfile);
    let hint = if error.contains("UnknownIssuer")
        || error.contains("unknown issuer")
        || error.contains("BadSignature")
    {
        format!(
            "the server's certificate is not signed by a CA this client trusts: set {setting} \
             {ca} to the PEM file of the CA that signed it (without it the system's CAs are used)"
        )
    } else if error.contains("NotValidForName") || error.contains("not valid for name") {
        "the server's certificate does not name the host in the URL: connect by a name (or \
         address) the certificate was issued for"
            .into()
    } else if error.contains("Expired") || error.contains("NotValidYet") {
        "the server's certificate is outside its validity period (or this machine's clock is \
         wrong)"
            .into()
    } else if error.contains("UnknownCA")
        || error.contains("BadCertificate")
        || error.contains("CertificateUnknown")
        || error.contains("AccessDenied")
    {
        format!(
            "the server did not accept the client certificate: {setting} {cert} must be signed \
             by a CA the server trusts (and {} must be its key)",
            keys.keyfile
        )
    } else if error.contains("CertificateRequired")
        || error.contains("HandshakeFailure")
        || error.contains("certificate required")
    {
        format!(
            "the server refused the handshake; if it asks for a client certificate, set \
             {setting} {cert} and {}",
            keys.keyfile
        )
    } else if error.contains("InvalidContentType")
        || error.contains("corrupt message")
        || error.contains("InvalidMessage")
    {
        "the server did not answer in TLS: is this the server's TLS port (RabbitMQ: 5671), not \
         its plain one?"
            .into()
    } else {
        return String::new();
    };
    format!(" ({hint})")
}

/// The TLS failure inside `error`'s chain of sources, as rustls words it (`received fatal alert:
/// CertificateRequired`, `invalid peer certificate: UnknownIssuer`), also when an I/O error
/// wraps it; `None` when the chain holds no rustls error (a refused connection, a timeout).
/// A handshake refused or a certificate not accepted does not change by trying again.
pub fn tls_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // An I/O error's `source()` skips the error it wraps: look at that one too.
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        next = e.source();
    }
    None
}

/// `cert_reqs = CERT_NONE`: any certificate is taken; the handshake's signatures are still
/// checked, so the session is encrypted, just not to a known server.
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::CertReqs;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mf-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn missing_files_and_bad_pem_are_named_with_their_setting_and_key() {
        let dir = scratch("files");
        let missing = dir.join("nope.pem");
        let options = TlsOptions {
            ca_certs: Some(missing.clone()),
            ..Default::default()
        };
        let err = client_config(&BROKER_KEYS, &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("broker_use_ssl ca_certs: cannot read")
                && err.contains(&missing.display().to_string()),
            "{err}"
        );
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let options = TlsOptions {
            ca_certs: Some(garbage.clone()),
            ..Default::default()
        };
        let err = client_config(&REDIS_KEYS, &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("redis_backend_use_ssl ssl_ca_certs") && err.contains("BEGIN CERTIFICATE"),
            "{err}"
        );
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let options = TlsOptions {
            ca_certs: Some(broken),
            ..Default::default()
        };
        let err = client_config(&BROKER_KEYS, &options)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a usable PEM file"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn cert_none_builds_without_any_ca_and_plain_urls_stay_plain() {
        let options = TlsOptions {
            cert_reqs: CertReqs::None,
            ..Default::default()
        };
        assert!(client_config(&BROKER_KEYS, &options).is_ok());
        assert!(redis_client("redis://127.0.0.1:6379/0", None).is_ok());
        let client = redis_client("rediss://127.0.0.1:6380/0?ssl_cert_reqs=CERT_NONE", None)
            .expect("an insecure TLS client builds");
        let shown = format!("{:?}", client.get_connection_info());
        assert!(shown.contains("insecure: true"), "{shown}");
    }

    #[test]
    fn handshake_failures_get_a_hint_naming_the_setting() {
        let hint = explain(
            "IO error: invalid peer certificate: UnknownIssuer",
            &BROKER_KEYS,
        );
        assert!(hint.contains("broker_use_ssl ca_certs"), "{hint}");
        let hint = explain("received fatal alert: CertificateRequired", &REDIS_KEYS);
        assert!(hint.contains("ssl_certfile and ssl_keyfile"), "{hint}");
        let hint = explain("received fatal alert: UnknownCA", &BROKER_KEYS);
        assert!(
            hint.contains("did not accept the client certificate"),
            "{hint}"
        );
        assert!(hint.contains("broker_use_ssl certfile"), "{hint}");
        assert_eq!(explain("Connection refused", &BROKER_KEYS), "");
    }
}
