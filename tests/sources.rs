//! Reading job sources under the rules: a real HTTP server on 127.0.0.1 (allowed hosts,
//! internal-address refusal, https-only, redirects re-checked, size caps with and without
//! Content-Length, status codes, timeouts), `file://` roots with symlink escapes, and storage
//! keys.

use std::time::Duration;

use bytes::Bytes;
use mediafarm::storage::sources::{Source, SourceError, Sources};
use mediafarm::storage::Storage;
use mediafarm::{FailureKind, Settings, TaskError};
use mediafarm_tests::settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A loopback HTTP server with fixed routes; it stops with the test's runtime.
async fn serve() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let reply = |status: &str, headers: &str, body: &[u8]| {
                    let mut r = format!(
                        "HTTP/1.1 {status}\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                };
                let response = match path.as_str() {
                    "/ok.jpg" => reply("200 OK", "Content-Type: image/jpeg\r\n", b"JPEGDATA"),
                    "/big.jpg" => reply("200 OK", "", &[b'x'; 5000]),
                    "/streamed.jpg" => {
                        // No Content-Length: the cap must hold while reading.
                        let mut r = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                        r.extend_from_slice(&[b'y'; 5000]);
                        r
                    }
                    "/missing.jpg" => reply("404 Not Found", "", b""),
                    "/broken.jpg" => reply("503 Service Unavailable", "", b""),
                    "/forbidden.jpg" => reply("403 Forbidden", "", b""),
                    "/to-ok" => reply("302 Found", "Location: /ok.jpg\r\n", b""),
                    "/to-elsewhere" => reply(
                        "302 Found",
                        "Location: http://localhost.localdomain.invalid/x\r\n",
                        b"",
                    ),
                    "/slow.jpg" => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        reply("200 OK", "", b"late")
                    }
                    _ => reply("404 Not Found", "", b""),
                };
                let _ = s.write_all(&response).await;
            });
        }
    });
    port
}

fn web_settings() -> Settings {
    let mut s = settings();
    s.source_allowed_hosts = vec!["127.0.0.1".into()];
    s.source_allow_private = true;
    s.source_allow_http = true;
    s.source_timeout = Duration::from_secs(2);
    s
}

/// Sources over the default local storage (`var/storage` under the tests' directory).
fn sources(s: &Settings) -> Sources {
    Sources::new(s, Storage::from_settings(s).unwrap())
}

async fn read(s: &Settings, source: &str, max: u64) -> Result<Bytes, SourceError> {
    sources(s).read(&Source::parse(source).unwrap(), max).await
}

fn kind(e: SourceError) -> FailureKind {
    TaskError::from(e).kind
}

#[tokio::test]
async fn web_sources_follow_the_rules() {
    let port = serve().await;
    let s = web_settings();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    assert_eq!(
        read(&s, &url("/ok.jpg"), 100).await.unwrap().as_ref(),
        b"JPEGDATA"
    );
    assert_eq!(
        read(&s, &url("/to-ok"), 100).await.unwrap().as_ref(),
        b"JPEGDATA"
    );

    // Internal addresses are refused unless allowed: the default.
    let mut strict = s.clone();
    strict.source_allow_private = false;
    let err = read(&strict, &url("/ok.jpg"), 100).await.unwrap_err();
    assert!(err.to_string().contains("internal address"), "{err}");
    assert_eq!(kind(err), FailureKind::Invalid);
    // Hosts not on the list, plain http when https is required, and redirects that leave the
    // allowed hosts are refused.
    let mut other_host = s.clone();
    other_host.source_allowed_hosts = vec!["img.example.com".into()];
    let err = read(&other_host, &url("/ok.jpg"), 100).await.unwrap_err();
    assert!(
        err.to_string().contains("not in source_allowed_hosts"),
        "{err}"
    );
    let mut https_only = s.clone();
    https_only.source_allow_http = false;
    let err = read(&https_only, &url("/ok.jpg"), 100).await.unwrap_err();
    assert!(err.to_string().contains("https only"), "{err}");
    let err = read(&s, &url("/to-elsewhere"), 100).await.unwrap_err();
    assert!(
        err.to_string().contains("not in source_allowed_hosts"),
        "{err}"
    );

    // Size caps, with and without Content-Length.
    for path in ["/big.jpg", "/streamed.jpg"] {
        let err = read(&s, &url(path), 1000).await.unwrap_err();
        assert!(
            matches!(err, SourceError::TooLarge { limit: 1000, .. }),
            "{path}: {err}"
        );
    }
    // Status codes: missing is the job's fault, a 5xx may pass, other refusals are final.
    let err = read(&s, &url("/missing.jpg"), 100).await.unwrap_err();
    assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
    let err = read(&s, &url("/broken.jpg"), 100).await.unwrap_err();
    assert!(matches!(kind(err), FailureKind::Transient { .. }));
    let err = read(&s, &url("/forbidden.jpg"), 100).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    // A server that does not answer in time.
    let err = read(&s, &url("/slow.jpg"), 100).await.unwrap_err();
    assert!(err.to_string().contains("source_timeout"), "{err}");
    assert!(matches!(kind(err), FailureKind::Transient { .. }));
}

#[tokio::test]
async fn file_sources_stay_under_their_roots() {
    let base = mediafarm_tests::temp_dir("roots");
    let root = base.join("media");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("in.png"), b"PNGDATA").unwrap();
    std::fs::write(base.join("secret.txt"), b"secret").unwrap();
    std::os::unix::fs::symlink(base.join("secret.txt"), root.join("link.png")).unwrap();
    let mut s = settings();
    s.source_allowed_roots = vec![root.display().to_string()];
    let file = |p: &std::path::Path| format!("file://{}", p.display());

    assert_eq!(
        read(&s, &file(&root.join("in.png")), 100)
            .await
            .unwrap()
            .as_ref(),
        b"PNGDATA"
    );
    for outside in [
        base.join("secret.txt"),
        root.join("link.png"),
        root.join("../secret.txt"),
    ] {
        let err = read(&s, &file(&outside), 100).await.unwrap_err();
        assert!(
            err.to_string().contains("source_allowed_roots"),
            "{outside:?}: {err}"
        );
    }
    let err = read(&s, &file(&root.join("in.png")), 3).await.unwrap_err();
    assert!(
        matches!(err, SourceError::TooLarge { bytes: 7, .. }),
        "{err}"
    );
    let err = read(&s, &file(&root.join("nope.png")), 100)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
    // No roots configured: no file:// sources at all.
    let err = read(&settings(), &file(&root.join("in.png")), 100)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Refused { .. }), "{err}");
    std::fs::remove_dir_all(&base).unwrap();
}

#[tokio::test]
async fn storage_key_sources_read_the_configured_storage() {
    let dir = mediafarm_tests::temp_dir("keys");
    let mut s = settings();
    s.storage_url = format!("file://{}", dir.display());
    let storage = Storage::from_settings(&s).unwrap();
    storage
        .put(
            "uploads/1.jpg",
            Bytes::from_static(b"ORIGINAL"),
            "image/jpeg",
        )
        .await
        .unwrap();
    let srcs = Sources::new(&s, storage);
    let got = srcs
        .read(&Source::parse("uploads/1.jpg").unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(got.as_ref(), b"ORIGINAL");
    let err = srcs
        .read(&Source::parse("uploads/none.jpg").unwrap(), 100)
        .await
        .unwrap_err();
    assert_eq!(kind(err), FailureKind::Invalid);
    assert!(matches!(
        Source::parse("../../etc/passwd"),
        Err(SourceError::Storage(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
