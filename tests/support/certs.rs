//! Test TLS certificates made with the openssl CLI: a throw-away CA, a `localhost` server
//! certificate and a client certificate it signed, for servers the tests start or open with
//! TLS (STARTTLS and implicit TLS SMTP, RabbitMQ's runtime listener, a TLS Redis).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A throw-away CA with a server certificate for `localhost` and `127.0.0.1` and a client
/// certificate (`clientAuth`), all PEM files in one directory readable by every user (the
/// machine's RabbitMQ runs as its own user and reads the server's files).
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Makes a [`TestPki`] in `dir` (created) with the openssl CLI.
pub fn test_pki(dir: &Path) -> TestPki {
    std::fs::create_dir_all(dir).unwrap();
    let run = |args: &[&str]| openssl(dir, args);
    let ec = "ec_paramgen_curve:prime256v1";
    // A name of its own, so a second test CA is an unknown issuer, not a namesake.
    let ca_subject = format!(
        "/CN=mediafarm TLS test CA {}",
        uuid::Uuid::new_v4().simple()
    );
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        ec,
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        &ca_subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    for (name, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "mediafarm test client",
            "extendedKeyUsage=clientAuth\n",
        ),
    ] {
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            ec,
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ]);
        std::fs::write(
            dir.join(&extfile),
            format!("basicConstraints=CA:FALSE\n{ext}"),
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ]);
    }
    use std::os::unix::fs::PermissionsExt;
    let open = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(dir, open).unwrap();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    TestPki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

/// Runs the openssl CLI in `dir`; panics with its stderr when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/setup.d/notify.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
