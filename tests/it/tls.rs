//! HTTPS: the handshake, and a certificate swapped by SIGHUP while an open
//! connection keeps serving.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::harness::{Process, ProcessOptions};

/// A CA of its own and a `localhost` certificate it signed: clients that
/// trust one CA reject the other's certificate, which tells the test which
/// certificate a server presented.
struct Authority {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn authority(name: &str) -> Authority {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("test CA {name}"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Authority {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn install(dir: &Path, authority: &Authority) {
    std::fs::write(dir.join("cert.pem"), &authority.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &authority.key_pem).unwrap();
}

fn connector(trusted: &Authority) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trusted.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn connect(daemon: &Process, trusted: &Authority) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(daemon.addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    connector(trusted).connect(name, tcp).await
}

/// One HTTP/1.1 request on an open (keep-alive) connection; returns the
/// status and body. Enough HTTP for `/livez` and `/readyz`, which answer
/// with a Content-Length.
async fn get(stream: &mut TlsStream<TcpStream>, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await.unwrap();
        assert!(read > 0, "the server closed the connection");
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    while buffer.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await.unwrap();
        assert!(read > 0, "the server closed the connection mid-body");
        buffer.extend_from_slice(&chunk[..read]);
    }
    let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).to_string();
    (status, body)
}

async fn wait_ready(daemon: &Process, trusted: &Authority) {
    for _ in 0..600 {
        if let Ok(mut stream) = connect(daemon, trusted).await
            && get(&mut stream, "/readyz").await.0 == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cqrsd never became ready over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_and_a_reload_swaps_the_certificate_without_dropping_connections() {
    let first = authority("first");
    let second = authority("second");
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), &first);
    let daemon = Process::start_in(
        dir,
        ProcessOptions {
            // Keep-alive connections wait for their next request head this
            // long; the reload in between must not race it.
            config: "[http]\nheader_read_timeout_ms = 120000\n\
                     [tls]\ncert_path = \"cert.pem\"\nkey_path = \"key.pem\"\n"
                .to_owned(),
            ..ProcessOptions::default()
        },
    );
    wait_ready(&daemon, &first).await;

    // Plain HTTP to the TLS listener gets no HTTP answer.
    let plain = crate::harness::client()
        .get(daemon.url("/livez"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    let mut open = connect(&daemon, &first).await.unwrap();
    let (status, body) = get(&mut open, "/livez").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    install(daemon.dir.path(), &second);
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(30));

    // The connection opened before the reload keeps its session.
    assert_eq!(get(&mut open, "/livez").await.0, 200);
    // New handshakes present the new certificate: a client that trusts only
    // the old CA refuses it, one that trusts the new CA is served.
    let refused = connect(&daemon, &first).await;
    assert!(refused.is_err(), "the old certificate is still presented");
    let mut fresh = connect(&daemon, &second).await.unwrap();
    assert_eq!(get(&mut fresh, "/livez").await.0, 200);

    // A broken key is refused by the reload; the working certificate stays.
    std::fs::write(daemon.dir.path().join("key.pem"), "not a key").unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration not reloaded", Duration::from_secs(30));
    let mut after = connect(&daemon, &second).await.unwrap();
    assert_eq!(get(&mut after, "/livez").await.0, 200);
    assert_eq!(get(&mut open, "/livez").await.0, 200);
}

#[test]
fn check_reports_unreadable_certificates_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let authority = authority("check");
    install(dir.path(), &authority);
    std::fs::write(dir.path().join("key.pem"), "garbage").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[tls]\ncert_path = \"cert.pem\"\nkey_path = \"key.pem\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = crate::harness::run_cli(
        &["check", "--config", crate::harness::path_str(&config)],
        dir.path(),
    );
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("tls.key_path"), "{stderr}");

    std::fs::write(&config, "[tls]\ncert_path = \"cert.pem\"\n").unwrap();
    let (code, _, stderr) = crate::harness::run_cli(
        &["check", "--config", crate::harness::path_str(&config)],
        dir.path(),
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("tls.key_path: must be set"), "{stderr}");
}
