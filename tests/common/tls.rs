//! Certificates for the TLS tests, made as QEMU's documentation makes
//! them (GnuTLS's certtool, package gnutls-bin; .ci/run installs it), so
//! QEMU's tools accept them.

use std::path::Path;
use std::process::Command;

fn certtool(dir: &Path, args: &[&str]) {
    super::require_tool("certtool");
    let out = Command::new("certtool")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run certtool");
    assert!(
        out.status.success(),
        "certtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `ca`, a server certificate (CN and DNS name `localhost`,
/// IP 127.0.0.1) and a client certificate signed by it, in QEMU's file
/// names (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
/// `client-cert.pem`, `client-key.pem`).
pub fn make_pki(dir: &Path, ca: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let w = |f: &str, s: &str| std::fs::write(dir.join(f), s).unwrap();
    w(
        "ca.info",
        &format!("cn = {ca}\nca\ncert_signing_key\nexpiration_days = 3650\n"),
    );
    w(
        "server.info",
        "organization = test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n\
         tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 3650\n",
    );
    w(
        "client.info",
        "organization = test\ncn = client\ntls_www_client\nencryption_key\nsigning_key\n\
         expiration_days = 3650\n",
    );
    for k in ["ca-key.pem", "server-key.pem", "client-key.pem"] {
        certtool(
            dir,
            &[
                "--generate-privkey",
                "--key-type=rsa",
                "--bits=2048",
                "--outfile",
                k,
            ],
        );
    }
    certtool(
        dir,
        &[
            "--generate-self-signed",
            "--load-privkey=ca-key.pem",
            "--template=ca.info",
            "--outfile=ca-cert.pem",
        ],
    );
    for who in ["server", "client"] {
        certtool(
            dir,
            &[
                "--generate-certificate",
                "--load-ca-certificate=ca-cert.pem",
                "--load-ca-privkey=ca-key.pem",
                &format!("--load-privkey={who}-key.pem"),
                &format!("--template={who}.info"),
                &format!("--outfile={who}-cert.pem"),
            ],
        );
    }
}

/// A directory with only some files of `from` (the rest missing).
pub fn subset(from: &Path, to: &Path, files: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for f in files {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}
