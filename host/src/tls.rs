//! TLS in both directions, with rustls (ring provider):
//! - toward an https upstream, the client configuration — the system's roots or a CA file, an
//!   optional client certificate (mTLS) — built once at start-up;
//! - on the listener, the server certificate, reloaded when its files change.
//!
//! This module must never fall back to an unverified or plaintext connection, never replace a
//! working listener certificate with one that fails to load (it keeps the old one and logs
//! why), and never log key material.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{ListenerTls, UpstreamTls};

/// How long the certificate files must be quiet before a reload (a renewal writes the chain
/// and the key one after the other).
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);
/// The longest a reload waits for its folders to be quiet.
const RELOAD_MAX_WAIT: Duration = Duration::from_secs(2);

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("no system root certificates found; set INTENTGATE_UPSTREAM_CA_FILE")]
    NoRoots,
    #[error("server name {0:?} is not a DNS name or an IP address")]
    ServerName(String),
    #[error("{0}")]
    Config(#[from] rustls::Error),
    #[error("watching the certificate files: {0}")]
    Watch(#[from] notify::Error),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The one crypto provider of the process (explicit, so no feature unification can change it).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// A certificate chain and its key, checked to belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(cert)?;
    let signing = provider()
        .key_provider
        .load_private_key(read_key(key)?)
        .map_err(|e| file_error(key, e))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| file_error(key, format!("does not match {}: {e}", cert.display())))?;
    Ok(certified)
}

/// The client configuration for an https upstream: the CA file's certificates or the system's
/// roots, and the client certificate when configured. Built once, at start-up.
pub fn client_config(tls: &UpstreamTls) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(ca) => {
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, e))?;
            }
        }
        None => {
            // Unreadable entries of the system store are skipped; an empty store is an error.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(TlsError::NoRoots);
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match &tls.client_identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| file_error(key, e))?,
        None => builder.with_no_client_auth(),
    };
    // ALPN is left to the connector, which sets it from the protocols it enables (http/1.1).
    Ok(Arc::new(config))
}

/// The name an upstream's certificate is checked against (and sent as SNI) when it is not the
/// URL's host: a DNS name or an IP address.
pub fn server_name(name: &str) -> Result<rustls::pki_types::ServerName<'static>, TlsError> {
    rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|_| TlsError::ServerName(name.to_owned()))
}

/// The client configuration of an http upstream's connector: it trusts no root, so it could
/// never complete a handshake (the URI is http and fixed, so none is attempted).
pub fn plaintext_only() -> Result<Arc<ClientConfig>, TlsError> {
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    ))
}

/// The listener's current certificate, swapped by the file watcher.
#[derive(Debug)]
struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The TLS side of the listener: one server configuration whose certificate follows the files.
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Dropping it stops watching.
    _watcher: RecommendedWatcher,
}

impl ServerTls {
    /// Loads the certificate (an error stops the start) and watches its files: a change is
    /// loaded after the files are quiet; a change that does not load is logged and the running
    /// certificate stays.
    pub fn start(files: &ListenerTls) -> Result<Self, TlsError> {
        let resolver = Arc::new(ReloadingCert {
            current: ArcSwap::from_pointee(load_certified_key(&files.cert_file, &files.key_file)?),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];

        let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
        let mut watcher = notify::recommended_watcher(tx)?;
        // Watch the folders, not the files: a renewal often replaces a file by renaming.
        let mut dirs: Vec<PathBuf> = [&files.cert_file, &files.key_file]
            .iter()
            .map(|f| parent_dir(f))
            .collect();
        dirs.dedup();
        for dir in &dirs {
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
        let files = files.clone();
        std::thread::Builder::new()
            .name("intentgate-tls-reload".into())
            .spawn(move || reload_loop(&rx, &files, &resolver))
            .map_err(|e| file_error(&PathBuf::from("<tls reload thread>"), e))?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            _watcher: watcher,
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor.clone()
    }
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Ends when the watcher (and so the sender) is dropped.
fn reload_loop(
    rx: &mpsc::Receiver<notify::Result<notify::Event>>,
    files: &ListenerTls,
    resolver: &ReloadingCert,
) {
    // Any change in the folders may be a renewal: a Kubernetes Secret volume (and so
    // cert-manager) swaps a `..data` symlink and never touches `tls.crt` itself, which is a
    // link through it. So every quiet moment after a change reads the files again and serves
    // them if the certificate differs. Busy folders (a data directory beside) are waited out
    // at most RELOAD_MAX_WAIT, so a steady stream of unrelated events cannot hold a renewal.
    let mut failed: Option<String> = None;
    while rx.recv().is_ok() {
        let started = std::time::Instant::now();
        while started.elapsed() < RELOAD_MAX_WAIT {
            match rx.recv_timeout(RELOAD_DEBOUNCE) {
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        match load_certified_key(&files.cert_file, &files.key_file) {
            Ok(fresh) => {
                failed = None;
                if fresh.cert != resolver.current.load().cert {
                    resolver.current.store(Arc::new(fresh));
                    tracing::info!(cert = %files.cert_file.display(), "TLS certificate reloaded");
                }
            }
            // Said once per distinct failure, not at every change in the folders.
            Err(e) if failed.as_deref() != Some(e.to_string().as_str()) => {
                tracing::warn!(
                    cert = %files.cert_file.display(),
                    "TLS certificate not reloaded, keeping the running one: {e}"
                );
                failed = Some(e.to_string());
            }
            Err(_) => {}
        }
    }
}
