//! `object-add` / `object-del` with `tls-creds-x509` through our QMP
//! dispatcher and through a live qemu-storage-daemon: the same replies
//! for a script of successes and failures (QAPI argument checks, QEMU's
//! defaults, missing and unparsable credential files, duplicate and
//! unknown ids, deleting credentials that are in use elsewhere).

mod common;

use common::oracle::{Ours, Side};
use common::qmp::Daemon;
use common::tls::{make_pki, subset};
use serde_json::{Value, json};

fn script(d: &std::path::Path) -> Vec<(&'static str, Value)> {
    let pki = d.join("pki");
    make_pki(&pki, "Oracle CA");
    let only_ca = d.join("only-ca");
    subset(&pki, &only_ca, &["ca-cert.pem"]);
    let bad_ca = d.join("bad-ca");
    subset(&pki, &bad_ca, &["server-cert.pem", "server-key.pem"]);
    std::fs::write(bad_ca.join("ca-cert.pem"), "garbage\n").unwrap();
    let bad_key = d.join("bad-key");
    subset(&pki, &bad_key, &["ca-cert.pem", "server-cert.pem"]);
    std::fs::write(bad_key.join("server-key.pem"), "junk\n").unwrap();
    let other = d.join("other");
    make_pki(&other, "Other CA");
    // Our client certificate, another CA: fails QEMU's sanity check.
    let mixed = d.join("mixed");
    subset(&other, &mixed, &["ca-cert.pem"]);
    subset(&pki, &mixed, &["client-cert.pem", "client-key.pem"]);
    let nope = d.join("nope");
    let x509 = |id: &str, dir: &std::path::Path, extra: Value| {
        let mut v = json!({"qom-type": "tls-creds-x509", "id": id, "dir": dir});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    vec![
        (
            "object-add",
            x509("tls0", &pki, json!({"endpoint": "server"})),
        ),
        (
            "object-add",
            x509("tls0", &pki, json!({"endpoint": "server"})),
        ),
        // The id is claimed before the files are read.
        ("object-add", x509("tls0", &nope, json!({}))),
        (
            "object-add",
            x509("tls1", &nope, json!({"endpoint": "server"})),
        ),
        (
            "object-add",
            x509("tls1", &nope, json!({"endpoint": "client"})),
        ),
        (
            "object-add",
            x509("tls1", &only_ca, json!({"endpoint": "server"})),
        ),
        // A client needs only the CA; the default endpoint is client.
        ("object-add", x509("tls1", &only_ca, json!({}))),
        (
            "object-add",
            x509("tls2", &pki, json!({"endpoint": "bogus"})),
        ),
        ("object-add", x509("tls2", &pki, json!({"endpoint": 5}))),
        (
            "object-add",
            x509("tls2", &pki, json!({"verify-peer": "yes"})),
        ),
        ("object-add", x509("tls2", &pki, json!({"bogus": 1}))),
        ("object-add", x509("tls2", &pki, json!({"loaded": true}))),
        (
            "object-add",
            x509("tls2", &pki, json!({"passwordid": "sec0"})),
        ),
        (
            "object-add",
            x509("tls2", &bad_ca, json!({"endpoint": "server"})),
        ),
        (
            "object-add",
            x509("tls2", &bad_key, json!({"endpoint": "server"})),
        ),
        (
            "object-add",
            x509("tls2", &mixed, json!({"endpoint": "client"})),
        ),
        (
            "object-add",
            x509(
                "tls2",
                &pki,
                json!({"endpoint": "client", "verify-peer": false, "sanity-check": true,
                       "priority": "NORMAL"}),
            ),
        ),
        (
            "object-add",
            x509(
                "tls3",
                &pki,
                json!({"verify-peer": false, "endpoint": "server"}),
            ),
        ),
        (
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls4"}),
        ),
        (
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls4", "dir": 7}),
        ),
        ("object-add", json!({"qom-type": "tls-creds-x509"})),
        ("object-add", json!({"id": "x"})),
        ("object-add", json!({"qom-type": "nope", "id": "x"})),
        ("object-add", x509("1bad", &pki, json!({}))),
        ("object-add", x509("", &pki, json!({}))),
        ("object-del", json!({"id": "tls3"})),
        ("object-del", json!({"id": "tls3"})),
        ("object-del", json!({"id": "nope"})),
        ("object-del", json!({})),
        ("object-del", json!({"id": "tls2", "x": 1})),
        ("object-del", json!({"id": "tls2"})),
        // The id is free again.
        (
            "object-add",
            x509("tls2", &pki, json!({"endpoint": "server"})),
        ),
        ("object-del", json!({"id": "tls0"})),
        ("object-del", json!({"id": "tls1"})),
        ("object-del", json!({"id": "tls2"})),
    ]
}

#[test]
fn object_add_and_del_reply_as_qemu_storage_daemon() {
    let d = tempfile::tempdir().unwrap();
    let steps = script(d.path());
    let mut qsd = Daemon::start();
    let mut ours = Ours::new();
    let mut diffs = Vec::new();
    let mut refused = 0;
    for (cmd, args) in &steps {
        let want = qsd.cmd(cmd, args.clone());
        let got = ours.cmd(cmd, args.clone());
        refused += usize::from(want.is_err());
        if want != got {
            diffs.push(format!("{cmd} {args}\n  qemu: {want:?}\n  ours: {got:?}"));
        }
    }
    assert!(diffs.is_empty(), "replies differ:\n{}", diffs.join("\n"));
    // The script is mostly refusals, and its successes are real.
    assert_eq!((refused, steps.len() - refused), (25, 10));
    assert!(ours.ctx.objects().ids().is_empty());
}

#[test]
fn credentials_in_use_survive_object_del() {
    // QEMU's object-del of credentials an NBD server uses succeeds (no
    // can-be-deleted hook; the server holds a reference). Ours: the Arc.
    let d = tempfile::tempdir().unwrap();
    make_pki(d.path(), "Use CA");
    let mut ours = Ours::new();
    ours.cmd(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "t", "dir": d.path(), "endpoint": "server"}),
    )
    .unwrap();
    let held = ours
        .ctx
        .objects()
        .tls_creds("t", blockjob::nbd::tls_creds::Endpoint::Server)
        .unwrap();
    assert_eq!(
        ours.ctx
            .objects()
            .tls_creds("t", blockjob::nbd::tls_creds::Endpoint::Client)
            .unwrap_err()
            .to_string(),
        "Expected TLS credentials for a client endpoint"
    );
    assert_eq!(ours.cmd("object-del", json!({"id": "t"})), Ok(json!({})));
    assert_eq!(held.id(), "t");
    assert_eq!(
        ours.ctx
            .objects()
            .tls_creds("t", blockjob::nbd::tls_creds::Endpoint::Server)
            .unwrap_err()
            .to_string(),
        "No TLS credentials with id 't'"
    );
}
