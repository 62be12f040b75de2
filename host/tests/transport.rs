//! The transport edge: authentication before the body is read, the connection cap, URL
//! credentials kept out of everything the gateway shows, TLS toward the upstream (system or
//! configured roots, mTLS) and on the listener (certificate reloaded when its files change).
//! Certificates are generated at test time; every server is real and on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};

fn err_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

/// Sends `head` on a fresh connection (never the body it announces) and returns what the
/// server answers within `wait`, or None.
async fn answer_without_body(addr: SocketAddr, head: &str, wait: Duration) -> Option<String> {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    conn.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(wait, conn.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

// --- item 7: authenticate before reading the body ------------------------------------------

#[tokio::test]
async fn a_bogus_token_is_refused_before_its_body_is_read() {
    let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    for path in ["/v1/mcp", "/v1/tool-call"] {
        // Half a megabyte announced under a bearer that is no token, none of it sent: refused
        // at once (before this, the body was awaited until the body deadline).
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer x\r\n\
             Content-Type: application/json\r\nContent-Length: 500000\r\n\r\n"
        );
        let answer = answer_without_body(tg.addr, &head, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("{path}: a bogus token waited for its body"));
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        assert!(answer.contains("-32010"), "{path}: {answer}");
    }
    // A revoked token is just as unauthenticated.
    let (token, jti) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"]}))
        .await;
    let (s, _) = crate::support::http::post_json(
        &format!("{}/v1/admin/revoke", tg.url),
        Some(ADMIN_TOKEN),
        &json!({"jti": jti, "reason": "test"}),
    )
    .await;
    assert!(s == 200 || s == 204, "revoke: {s}");
    // The revocation feed polls: wait until a small call sees the revocation.
    for _ in 0..50 {
        let v = tg.tool_call(&token, "echo", json!({})).await;
        if v["error"]["code"] == -32010 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let head = format!(
        "POST /v1/mcp HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 500000\r\n\r\n"
    );
    let refused = answer_without_body(tg.addr, &head, Duration::from_secs(3)).await;
    let refused = refused.expect("a revoked token is refused before its body");
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(refused.contains("revoked"), "{refused}");

    // The admin API checks its token before the body too.
    let head = "POST /v1/admin/mint HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer not-the-admin\r\n\
                Content-Type: application/json\r\nContent-Length: 500000\r\n\r\n";
    let answer = answer_without_body(tg.addr, head, Duration::from_secs(3))
        .await
        .expect("admin: a bogus token waited for its body");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    tg.shutdown().await;
}

#[tokio::test]
async fn an_authenticated_call_still_gets_the_full_body_limit() {
    let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"]}))
        .await;
    // 100 KiB, beyond the unauthenticated prefix, within the body limit.
    let text = "x".repeat(100 << 10);
    let v = tg.tool_call(&token, "echo", json!({"text": text})).await;
    assert_eq!(v["result"]["content"][0]["text"], Value::from(text), "{v}");
    // A bogus token with a small body: the refusal still echoes the request's id.
    let (status, v) = crate::support::http::post_json(
        &format!("{}/v1/mcp", tg.url),
        Some("x"),
        &json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}),
    )
    .await;
    assert_eq!(
        (status, err_code(&v), v["id"].clone()),
        (200, -32010, json!(7)),
        "{v}"
    );
    tg.shutdown().await;
}

// --- item 7: the connection cap ----------------------------------------------------------------

/// One GET /healthz on an open connection; returns the status line and the whole head.
async fn healthz_on(conn: &mut TcpStream) -> String {
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn the_connection_cap_refuses_clearly_and_recovers() {
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &["--max-connections", "2", "--header-timeout-ms", "60000"],
    )
    .await;
    let mut first = TcpStream::connect(tg.addr).await.expect("connect");
    let mut second = TcpStream::connect(tg.addr).await.expect("connect");
    assert!(healthz_on(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(healthz_on(&mut second).await.starts_with("HTTP/1.1 200"));

    // Connection N+1: an immediate 503 with a JSON body and Retry-After, then closed.
    let mut third = TcpStream::connect(tg.addr).await.expect("connect");
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut answer))
        .await
        .expect("closed after the refusal")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: "),
        "{answer}"
    );
    let body = answer.split("\r\n\r\n").nth(1).expect("a body");
    let v: Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(v["error"], "too many connections", "{v}");
    assert_eq!(v["max_connections"], 2, "{v}");
    // The open connections keep being served.
    assert!(healthz_on(&mut second).await.starts_with("HTTP/1.1 200"));

    // One closes: a new connection is accepted again (once the server has seen the close).
    drop(first);
    let mut accepted = false;
    for _ in 0..50 {
        let mut conn = TcpStream::connect(tg.addr).await.expect("connect");
        if healthz_on(&mut conn).await.starts_with("HTTP/1.1 200") {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        accepted,
        "a slot freed by a closed connection is never reused"
    );
    drop(second);
    tg.shutdown().await;
}

// --- item 13: URL credentials are shown nowhere -----------------------------------------------

const USER_SECRET: &str = "hunter2pass";
const QUERY_SECRET: &str = "sekrit-token-42";

#[tokio::test]
async fn check_config_never_prints_url_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_intentgate"))
        .arg("check-config")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--upstream-url")
        .arg(format!(
            "http://svc:{USER_SECRET}@127.0.0.1:9/mcp?token={QUERY_SECRET}"
        ))
        .env_remove("INTENTGATE_UPSTREAM_URL")
        .output()
        .expect("run check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    for secret in [USER_SECRET, QUERY_SECRET] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stdout}{stderr}"
        );
    }
    assert!(stdout.contains("127.0.0.1:9/mcp"), "{stdout}");
}

/// An upstream whose every answer is a JSON-RPC error that echoes the URL it was called at,
/// as many real servers' error pages do.
fn echo_the_url(_body: &[u8], uri: &str) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "error":
        {"code": -32000, "message": format!("bad credentials at {uri}")}})
    .to_string()
}

#[tokio::test]
async fn upstream_errors_never_show_url_credentials() {
    let upstream = crate::support::http::json_upstream(echo_the_url).await;
    let url = format!("http://svc:{USER_SECRET}@{upstream}/mcp?token={QUERY_SECRET}");
    let tg = gateway::start(Backend::Sqlite, Some(&url), &[]).await;
    let dbg = format!("{:?}", tg.gw.config);
    for secret in [USER_SECRET, QUERY_SECRET] {
        assert!(!dbg.contains(secret), "{dbg}");
    }
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"]}))
        .await;
    let v = tg.tool_call(&token, "echo", json!({"text": "hi"})).await;
    let text = v.to_string();
    assert!(v.get("error").is_some(), "{v}");
    // The upstream's message does reach the caller, without the secrets it echoed.
    assert!(text.contains("bad credentials"), "{text}");
    for secret in [USER_SECRET, QUERY_SECRET] {
        assert!(!text.contains(secret), "{text}");
    }
    tg.shutdown().await;
}

// --- item 14: TLS -------------------------------------------------------------------------------

/// A certificate authority generated for one test.
pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A certificate and its key, as PEM and DER.
pub(crate) struct Leaf {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed");
        Self { cert, key }
    }

    pub(crate) fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `localhost`/127.0.0.1 with this common name and serial.
    pub(crate) fn leaf(&self, cn: &str, serial: u64, client: bool) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("root");
        roots
    }
}

impl Leaf {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The demo upstream behind a TLS front (rustls), optionally requiring client certificates
/// from `client_ca`; returns its address and the client certificates it was shown.
pub(crate) async fn tls_upstream(
    server: &Leaf,
    client_ca: Option<&Ca>,
) -> (SocketAddr, Arc<Mutex<Vec<CertificateDer<'static>>>>) {
    let (demo_uri, _task) = intentgate::demo::spawn("127.0.0.1:0")
        .await
        .expect("demo upstream");
    let demo: SocketAddr = demo_uri
        .authority()
        .expect("authority")
        .as_str()
        .parse()
        .expect("addr");
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()),
                provider(),
            )
            .build()
            .expect("client verifier"),
        ),
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(vec![server.der.clone()], server.key())
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shown = Arc::clone(&seen);
    tokio::spawn(async move {
        let _demo = _task;
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let shown = Arc::clone(&shown);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Some(certs) = tls.get_ref().1.peer_certificates() {
                    shown
                        .lock()
                        .expect("lock")
                        .extend(certs.iter().map(|c| c.clone().into_owned()));
                }
                let Ok(mut plain) = TcpStream::connect(demo).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn an_https_upstream_answers_through_the_gateway() {
    let ca = Ca::new("upstream test CA");
    let server = ca.leaf("tools.test", 1, false);
    let (addr, _) = tls_upstream(&server, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let url = format!("https://localhost:{}/mcp", addr.port());
    let tg = gateway::start(
        Backend::Sqlite,
        Some(&url),
        &["--upstream-ca-file", ca_file.to_str().expect("utf-8")],
    )
    .await;
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"]}))
        .await;
    let v = tg
        .tool_call(&token, "echo", json!({"text": "over TLS"}))
        .await;
    assert_eq!(v["result"]["content"][0]["text"], "over TLS", "{v}");
    tg.shutdown().await;
}

#[tokio::test]
async fn an_https_upstream_with_the_wrong_ca_is_a_clear_upstream_error() {
    let ca = Ca::new("upstream test CA");
    let other = Ca::new("some other CA");
    let server = ca.leaf("tools.test", 1, false);
    let (addr, _) = tls_upstream(&server, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = write(dir.path(), "wrong-ca.pem", &other.pem());
    let url = format!("https://127.0.0.1:{}/mcp", addr.port());
    let tg = gateway::start(
        Backend::Sqlite,
        Some(&url),
        &["--upstream-ca-file", wrong.to_str().expect("utf-8")],
    )
    .await;
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"]}))
        .await;
    let v = tg.tool_call(&token, "echo", json!({"text": "x"})).await;
    assert_eq!(err_code(&v), -32018, "{v}");
    let detail = v["error"]["data"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("certificate") && detail.contains("UnknownIssuer"),
        "the detail must name the TLS failure: {v}"
    );
    tg.shutdown().await;
}

#[tokio::test]
async fn mtls_toward_the_upstream_presents_the_client_certificate() {
    let ca = Ca::new("upstream test CA");
    let client_ca = Ca::new("client test CA");
    let server = ca.leaf("tools.test", 1, false);
    let client = client_ca.leaf("intentgate-gateway", 7, true);
    let (addr, seen) = tls_upstream(&server, Some(&client_ca)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let cert_file = write(dir.path(), "client.pem", &client.cert_pem);
    let key_file = write(dir.path(), "client.key", &client.key_pem);
    let url = format!("https://localhost:{}/mcp", addr.port());
    let ca_arg = ca_file.to_str().expect("utf-8");

    // Without a client certificate the upstream refuses the handshake.
    let tg = gateway::start(Backend::Sqlite, Some(&url), &["--upstream-ca-file", ca_arg]).await;
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"]}))
        .await;
    let v = tg.tool_call(&token, "echo", json!({"text": "x"})).await;
    assert_eq!(err_code(&v), -32018, "{v}");
    tg.shutdown().await;
    assert!(seen.lock().expect("lock").is_empty());

    // With it, the call goes through and the upstream saw the gateway's certificate.
    let tg = gateway::start(
        Backend::Sqlite,
        Some(&url),
        &[
            "--upstream-ca-file",
            ca_arg,
            "--upstream-client-cert-file",
            cert_file.to_str().expect("utf-8"),
            "--upstream-client-key-file",
            key_file.to_str().expect("utf-8"),
        ],
    )
    .await;
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"]}))
        .await;
    let v = tg
        .tool_call(&token, "echo", json!({"text": "mutual"}))
        .await;
    assert_eq!(v["result"]["content"][0]["text"], "mutual", "{v}");
    assert!(
        seen.lock().expect("lock").contains(&client.der),
        "the upstream was not shown the client certificate"
    );
    tg.shutdown().await;
}

/// Connects to the gateway's TLS listener trusting `ca`; returns the certificate it served and
/// the status line of a GET /healthz on that connection.
async fn served_certificate(tg: &TestGateway, ca: &Ca) -> (CertificateDer<'static>, String) {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(tg.addr).await.expect("connect");
    let mut tls = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake with the gateway");
    let served = tls.get_ref().1.peer_certificates().expect("a certificate")[0]
        .clone()
        .into_owned();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    (served, answer.lines().next().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn the_tls_listener_serves_and_reloads_its_certificate() {
    let ca = Ca::new("listener test CA");
    let first = ca.leaf("gateway-one", 101, false);
    let dir = tempfile::tempdir().expect("tempdir");
    let cert_file = write(dir.path(), "tls.pem", &first.cert_pem);
    let key_file = write(dir.path(), "tls.key", &first.key_pem);
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &[
            "--tls-cert-file",
            cert_file.to_str().expect("utf-8"),
            "--tls-key-file",
            key_file.to_str().expect("utf-8"),
        ],
    )
    .await;
    let (served, status) = served_certificate(&tg, &ca).await;
    assert_eq!(served, first.der, "the configured certificate is served");
    assert_eq!(status, "HTTP/1.1 200 OK");

    // A renewal rewrites both files: new connections get the new certificate.
    let second = ca.leaf("gateway-two", 202, false);
    write(dir.path(), "tls.pem", &second.cert_pem);
    write(dir.path(), "tls.key", &second.key_pem);
    let mut reloaded = false;
    for _ in 0..100 {
        if served_certificate(&tg, &ca).await.0 == second.der {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the rewritten certificate was never served");

    // A broken rewrite is refused and the running certificate stays.
    write(dir.path(), "tls.pem", "not a certificate");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (served, status) = served_certificate(&tg, &ca).await;
    assert_eq!(served, second.der);
    assert_eq!(status, "HTTP/1.1 200 OK");
    tg.shutdown().await;
}

/// A certificate in a Kubernetes Secret volume: `tls.crt` is a link through `..data`, and a
/// renewal swaps `..data` to a new folder by renaming a link; the file names never change.
/// The renewed certificate is served.
#[tokio::test]
async fn the_tls_listener_follows_a_kubernetes_secret_volume() {
    let ca = Ca::new("volume test CA");
    let first = ca.leaf("gateway-one", 301, false);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let version = |name: &str, leaf: &Leaf| {
        let v = d.join(name);
        std::fs::create_dir(&v).expect("version dir");
        write(&v, "tls.crt", &leaf.cert_pem);
        write(&v, "tls.key", &leaf.key_pem);
    };
    version("..2026_12_07_a", &first);
    std::os::unix::fs::symlink("..2026_12_07_a", d.join("..data")).expect("..data");
    for f in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), d.join(f)).expect("link");
    }
    let (cert, key) = (d.join("tls.crt"), d.join("tls.key"));
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &[
            "--tls-cert-file",
            cert.to_str().expect("utf-8"),
            "--tls-key-file",
            key.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert_eq!(served_certificate(&tg, &ca).await.0, first.der);
    // The kubelet's swap: a new version folder, a `..data_tmp` link to it, renamed over `..data`.
    let second = ca.leaf("gateway-two", 302, false);
    version("..2026_12_07_b", &second);
    std::os::unix::fs::symlink("..2026_12_07_b", d.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).expect("swap");
    let mut reloaded = false;
    for _ in 0..100 {
        if served_certificate(&tg, &ca).await.0 == second.der {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the renewed certificate was never served");
    tg.shutdown().await;
}

#[tokio::test]
async fn tls_settings_are_checked_before_start() {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        serve: intentgate::config::ServeArgs,
    }
    let parse = |args: &[&str]| {
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv).expect("flags").serve.validate()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = write(dir.path(), "junk.pem", "not PEM");
    let junk = junk.to_str().expect("utf-8");
    let e = parse(&[
        "--upstream-url",
        "https://x/mcp",
        "--upstream-ca-file",
        junk,
    ])
    .expect_err("junk CA")
    .to_string();
    assert!(e.starts_with("INTENTGATE_UPSTREAM_CA_FILE"), "{e}");
    let e = parse(&["--upstream-url", "http://x/mcp", "--upstream-ca-file", junk])
        .expect_err("CA for plain http")
        .to_string();
    assert!(e.contains("https"), "{e}");
    let e = parse(&["--tls-cert-file", junk])
        .expect_err("cert without key")
        .to_string();
    assert!(e.starts_with("INTENTGATE_TLS_KEY_FILE"), "{e}");
    let e = parse(&["--tls-cert-file", junk, "--tls-key-file", junk])
        .expect_err("junk listener files")
        .to_string();
    assert!(e.starts_with("INTENTGATE_TLS_CERT_FILE"), "{e}");
    let e = parse(&["--max-connections", "0"])
        .expect_err("no connection at all")
        .to_string();
    assert!(e.starts_with("INTENTGATE_MAX_CONNECTIONS"), "{e}");
}
