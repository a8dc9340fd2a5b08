//! An HTTPS receiver that demands a client certificate (mutual TLS), as an authority's upload
//! endpoint does: rustls on a blocking thread per connection, the server certificate of a
//! [`TestPki`], and only client certificates signed by that PKI's CA accepted (a handshake
//! without one, or with one from another CA, fails and is counted with rustls' reason). Every
//! request on an accepted connection is answered `201 Created` and kept whole.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};

use crate::certs::TestPki;

/// One request the receiver accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// The receiver; it stops accepting when dropped (its thread ends with the test process).
pub struct MtlsReceiver {
    pub port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    refused: Arc<Mutex<Vec<String>>>,
}

impl MtlsReceiver {
    pub fn start(pki: &TestPki) -> MtlsReceiver {
        MtlsReceiver::serve(pki, TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// Starts accepting on `127.0.0.1:<port>` (a port reserved with `free_port` while the
    /// receiver was "down": connections to it were refused until now).
    pub fn at(pki: &TestPki, port: u16) -> MtlsReceiver {
        MtlsReceiver::serve(pki, TcpListener::bind(("127.0.0.1", port)).unwrap())
    }

    fn serve(pki: &TestPki, listener: TcpListener) -> MtlsReceiver {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&pki.ca).unwrap() {
            roots.add(ca.unwrap()).unwrap();
        }
        // Client authentication is mandatory with this verifier (no `allow_unauthenticated`).
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server_cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
        let config = Arc::new(
            ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap(),
        );
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (sink, bad) = (received.clone(), refused.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let (config, sink, bad) = (config.clone(), sink.clone(), bad.clone());
                std::thread::spawn(move || serve(config, tcp, &sink, &bad));
            }
        });
        MtlsReceiver {
            port,
            received,
            refused,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// rustls' reason for each handshake that failed.
    pub fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap().clone()
    }
}

/// Serves one connection: the handshake, then requests until the client closes.
fn serve(
    config: Arc<ServerConfig>,
    mut tcp: TcpStream,
    sink: &Mutex<Vec<Received>>,
    bad: &Mutex<Vec<String>>,
) {
    let mut conn = ServerConnection::new(config).unwrap();
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            // Send the alert rustls queued (CertificateRequired, UnknownCA, …) before closing.
            let _ = conn.write_tls(&mut tcp);
            bad.lock().unwrap().push(e.to_string());
            return;
        }
    }
    let mut reader = BufReader::new(StreamOwned::new(conn, tcp));
    loop {
        let mut first = String::new();
        if reader.read_line(&mut first).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = first.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        sink.lock().unwrap().push(Received {
            method,
            path,
            headers,
            body,
        });
        let stream = reader.get_mut();
        if stream
            .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            .and_then(|()| stream.flush())
            .is_err()
        {
            return;
        }
    }
}
