//! The upstreams' settings: `INTENTGATE_UPSTREAM_URL`, `INTENTGATE_UPSTREAMS` (`NAME=URL`
//! pairs, or one JSON document) and `INTENTGATE_UPSTREAMS_FILE` (the same JSON document in a
//! file), resolved into one [`NamedUpstream`] per upstream: its URL, the MCP revision spoken to
//! it, its timeouts, its response limit and its TLS settings. A setting an entry leaves out is
//! the global one (`INTENTGATE_UPSTREAM_TIMEOUT_MS`, `_MAX_RESPONSE_BYTES`, `_CA_FILE`, …).
//!
//! The document:
//!
//! ```json
//! {"separator": "__",
//!  "upstreams": [
//!    {"name": "github", "url": "https://gh-mcp.internal/mcp", "revision": "auto",
//!     "timeout_ms": 30000, "connect_timeout_ms": 2000, "max_response_bytes": 16777216,
//!     "tls": {"ca_file": "ca.pem", "client_cert_file": "gw.pem", "client_key_file": "gw.key",
//!             "server_name": "gh-mcp.internal"}},
//!    {"name": "db", "url": "http://db-mcp:8080/mcp", "revision": "2025-11-25"}]}
//! ```
//!
//! (or only the `upstreams` array). Relative TLS paths are read from the file's folder.
//!
//! Combining: the file and `INTENTGATE_UPSTREAMS` are one list each; both at once is an error.
//! `INTENTGATE_UPSTREAM_URL` stays the first upstream (named `INTENTGATE_UPSTREAM_NAME`, with
//! the global settings) before either. The document's `separator` and
//! `INTENTGATE_UPSTREAM_SEPARATOR` must agree when both are set.
//!
//! This module must never echo a URL (it may carry credentials: errors name the entry, not
//! its URL) and never accept a document it does not wholly understand: an unknown key is an
//! error naming the file, the entry and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::{ConfigError, UpstreamTls, invalid, redact_url};

/// Which MCP revision the gateway speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamRevision {
    /// Learned: `server/discover` is probed at the newest stateless revision, and the
    /// handshake era is used when the upstream does not offer it (see [`crate::upstream`]).
    #[default]
    Auto,
    /// Pinned to the handshake era (`initialize`, `Mcp-Session-Id`) at
    /// [`crate::upstream::HANDSHAKE_VERSION`]; never probed.
    Handshake,
    /// Pinned to this stateless revision; never probed.
    Stateless(&'static str),
}

impl UpstreamRevision {
    /// `auto`, the handshake revision the gateway asks for (`2025-11-25`), or a stateless
    /// revision it speaks (`2026-07-28`).
    pub fn parse(s: &str) -> Option<Self> {
        if s == "auto" {
            return Some(Self::Auto);
        }
        if s == crate::upstream::HANDSHAKE_VERSION {
            return Some(Self::Handshake);
        }
        crate::mcp::era::MODERN_VERSIONS
            .iter()
            .find(|v| **v == s)
            .map(|v| Self::Stateless(v))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Handshake => crate::upstream::HANDSHAKE_VERSION,
            Self::Stateless(v) => v,
        }
    }

    /// What the parser accepts, for error messages.
    fn expected() -> String {
        let mut all = vec!["auto", crate::upstream::HANDSHAKE_VERSION];
        all.extend(crate::mcp::era::MODERN_VERSIONS);
        all.join(", ")
    }
}

/// One configured upstream: its name (what `mcp_allow`/`callee_allow` match and what its tools
/// are namespaced by), its URL (never shown unredacted) and how the gateway talks to it.
#[derive(Clone, PartialEq, Eq)]
pub struct NamedUpstream {
    pub name: String,
    pub uri: hyper::Uri,
    pub revision: UpstreamRevision,
    /// Bound on one exchange (and on reading the answer).
    pub timeout: Duration,
    /// Bound on opening a connection (TCP; TLS is within `timeout`).
    pub connect_timeout: Duration,
    pub max_response_bytes: usize,
    /// Used when the URL is https (then always filled from the entry or the globals).
    pub tls: UpstreamTls,
}

impl NamedUpstream {
    /// An upstream with the global settings (`INTENTGATE_UPSTREAM_URL`, a `NAME=URL` entry,
    /// the demo upstream).
    pub fn with_globals(name: impl Into<String>, uri: hyper::Uri, globals: &Globals) -> Self {
        let https = uri.scheme_str() == Some("https");
        Self {
            name: name.into(),
            uri,
            revision: UpstreamRevision::Auto,
            timeout: globals.timeout,
            connect_timeout: globals.timeout,
            max_response_bytes: globals.max_response_bytes,
            tls: if https {
                globals.tls.clone()
            } else {
                UpstreamTls::default()
            },
        }
    }
}

impl std::fmt::Debug for NamedUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}={} {{ revision: {}, timeout: {:?}, connect_timeout: {:?}, max_response_bytes: {}",
            self.name,
            redact_url(&self.uri),
            self.revision.as_str(),
            self.timeout,
            self.connect_timeout,
            self.max_response_bytes
        )?;
        if self.uri.scheme_str() == Some("https") {
            write!(f, ", tls: {:?}", self.tls)?;
        }
        f.write_str(" }")
    }
}

/// The settings an upstream has unless its entry says otherwise.
#[derive(Debug, Clone)]
pub struct Globals {
    pub timeout: Duration,
    pub max_response_bytes: usize,
    pub tls: UpstreamTls,
}

/// An upstream's name: a lowercase letter, then up to 31 of `a-z 0-9 -`. So it is also a
/// valid URI scheme prefix (resource URIs are namespaced as `NAME+URI`), never contains a
/// separator made of `_` or `.`, and reads the same in any case.
pub fn valid_upstream_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// An upstream URL, checked: absolute http(s) with a host. `setting` names it in the error.
pub(super) fn upstream_uri(setting: &'static str, raw: &str) -> Result<hyper::Uri, ConfigError> {
    // Never echo the URL: it may carry credentials.
    let uri: hyper::Uri = raw
        .parse()
        .map_err(|e| invalid(setting, format!("not a URL: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid(
            setting,
            "must be an absolute http:// or https:// URL",
        ));
    }
    if uri.host().is_none() {
        return Err(invalid(setting, "has no host"));
    }
    Ok(uri)
}

const LIST: &str = "INTENTGATE_UPSTREAMS";
const FILE: &str = "INTENTGATE_UPSTREAMS_FILE";

/// The TLS settings an entry gives (paths already resolved against the file's folder).
#[derive(Debug, Clone, Default)]
struct TlsOverrides {
    ca_file: Option<PathBuf>,
    client_identity: Option<(PathBuf, PathBuf)>,
    server_name: Option<String>,
}

/// One upstream as configured, before the global settings fill what it leaves out.
pub(super) struct Spec {
    name: String,
    uri: hyper::Uri,
    revision: UpstreamRevision,
    timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    max_response_bytes: Option<usize>,
    tls: Option<TlsOverrides>,
}

impl Spec {
    fn plain(name: &str, uri: hyper::Uri) -> Self {
        Self {
            name: name.to_owned(),
            uri,
            revision: UpstreamRevision::Auto,
            timeout: None,
            connect_timeout: None,
            max_response_bytes: None,
            tls: None,
        }
    }

    pub(super) fn https(&self) -> bool {
        self.uri.scheme_str() == Some("https")
    }

    /// The upstream with what the entry leaves out taken from `globals`.
    pub(super) fn resolve(self, globals: &Globals) -> NamedUpstream {
        let timeout = self.timeout.unwrap_or(globals.timeout);
        let tls = match (self.https(), self.tls) {
            (false, _) => UpstreamTls::default(),
            (true, None) => globals.tls.clone(),
            (true, Some(o)) => UpstreamTls {
                ca_file: o.ca_file.or_else(|| globals.tls.ca_file.clone()),
                client_identity: o
                    .client_identity
                    .or_else(|| globals.tls.client_identity.clone()),
                server_name: o.server_name,
            },
        };
        NamedUpstream {
            name: self.name,
            uri: self.uri,
            revision: self.revision,
            timeout,
            connect_timeout: self.connect_timeout.unwrap_or(timeout),
            max_response_bytes: self
                .max_response_bytes
                .unwrap_or(globals.max_response_bytes),
            tls,
        }
    }
}

/// The upstream list as configured: every upstream in order, and the document's separator.
pub(super) struct Parsed {
    pub specs: Vec<Spec>,
    pub separator: Option<String>,
}

/// `INTENTGATE_UPSTREAM_URL` (named `legacy_name`) first, then `INTENTGATE_UPSTREAMS`
/// (`NAME=URL` entries, or one JSON document) or `INTENTGATE_UPSTREAMS_FILE`; names valid and
/// unique.
pub(super) fn parse(
    legacy: Option<(&str, &hyper::Uri)>,
    list: &[String],
    file: Option<&Path>,
) -> Result<Parsed, ConfigError> {
    let mut specs: Vec<Spec> = legacy
        .map(|(name, uri)| Spec::plain(name, uri.clone()))
        .into_iter()
        .collect();
    let list: Vec<&str> = list
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .collect();
    let is_document = |e: &&str| e.starts_with('[') || e.starts_with('{');
    let mut separator = None;
    match (file, list.as_slice()) {
        (Some(_), [_, ..]) => {
            return Err(invalid(
                FILE,
                "set together with INTENTGATE_UPSTREAMS (--upstream): use one of them",
            ));
        }
        (Some(path), []) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(FILE, format!("{}: cannot read: {e}", path.display())))?;
            let base = path.parent().unwrap_or(Path::new(""));
            let at = path.display().to_string();
            separator = document(&text, FILE, &format!("{at}: "), base, &mut specs)?;
        }
        (None, [doc]) if is_document(doc) => {
            separator = document(doc, LIST, "", Path::new(""), &mut specs)?;
        }
        (None, entries) => {
            if entries.iter().any(is_document) {
                return Err(invalid(
                    LIST,
                    "a JSON document must be the whole value (not beside NAME=URL entries)",
                ));
            }
            let mut i = 0;
            for entry in entries.iter().flat_map(|e| e.split(',')) {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                i += 1;
                let Some((name, url)) = entry.split_once('=') else {
                    return Err(invalid(LIST, format!("entry {i} is not NAME=URL")));
                };
                let name = name.trim();
                check_name(LIST, &format!("entry {i}: "), name, &specs)?;
                let uri = upstream_uri(LIST, url.trim()).map_err(|e| match e {
                    ConfigError::Invalid { reason, .. } => {
                        invalid(LIST, format!("entry {i} ({name}): {reason}"))
                    }
                })?;
                specs.push(Spec::plain(name, uri));
            }
        }
    }
    Ok(Parsed { specs, separator })
}

fn check_name(
    setting: &'static str,
    at: &str,
    name: &str,
    specs: &[Spec],
) -> Result<(), ConfigError> {
    if !valid_upstream_name(name) {
        return Err(invalid(
            setting,
            format!(
                "{at}upstream name {name:?}: use a lowercase letter, then up to 31 of a-z 0-9 -"
            ),
        ));
    }
    if specs.iter().any(|u| u.name == name) {
        return Err(invalid(
            setting,
            format!(
                "{at}upstream name {name:?} is configured twice (INTENTGATE_UPSTREAM_NAME counts)"
            ),
        ));
    }
    Ok(())
}

/// The document's top level: the object form (the array form is its `upstreams` alone).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    separator: Option<String>,
    upstreams: Vec<Value>,
}

/// One entry; `tls` is read on its own so an error in it is named as such.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    url: String,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    max_response_bytes: Option<u64>,
    #[serde(default)]
    tls: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsEntry {
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    client_cert_file: Option<PathBuf>,
    #[serde(default)]
    client_key_file: Option<PathBuf>,
    #[serde(default)]
    server_name: Option<String>,
}

/// Reads a JSON document's upstreams into `specs`; returns its separator. `at` prefixes every
/// error (the file's path); relative TLS paths are joined to `base`.
fn document(
    text: &str,
    setting: &'static str,
    at: &str,
    base: &Path,
    specs: &mut Vec<Spec>,
) -> Result<Option<String>, ConfigError> {
    let fail = |reason: String| invalid(setting, format!("{at}{reason}"));
    let value: Value =
        serde_json::from_str(text).map_err(|e| fail(format!("not a JSON document: {e}")))?;
    let doc = match value {
        Value::Array(upstreams) => Document {
            separator: None,
            upstreams,
        },
        v @ Value::Object(_) => Document::deserialize(v).map_err(|e| fail(e.to_string()))?,
        _ => {
            return Err(fail(
                "expected an object {\"upstreams\": [...]} or an array of upstreams".into(),
            ));
        }
    };
    if doc.upstreams.is_empty() {
        return Err(fail("lists no upstream".into()));
    }
    for (i, raw) in doc.upstreams.into_iter().enumerate() {
        let name = raw.get("name").and_then(Value::as_str).unwrap_or("");
        let here = if name.is_empty() {
            format!("{at}upstream {}: ", i + 1)
        } else {
            format!("{at}upstream {} ({name}): ", i + 1)
        };
        // A value serde quotes back (a wrong type) could be the URL: never show it.
        let url_text = raw.get("url").and_then(Value::as_str).map(str::to_owned);
        let scrub = |e: String| match url_text.as_deref().filter(|u| !u.is_empty()) {
            Some(u) => e.replace(u, "<url>"),
            None => e,
        };
        let err = |reason: String| invalid(setting, format!("{here}{}", scrub(reason)));
        let entry = typed::<Entry>(raw, &["name", "url"]).map_err(err)?;
        check_name(setting, &here, &entry.name, specs)?;
        let uri = upstream_uri(setting, entry.url.trim()).map_err(|e| match e {
            ConfigError::Invalid { reason, .. } => err(format!("url: {reason}")),
        })?;
        let revision = match entry.revision.as_deref() {
            None => UpstreamRevision::Auto,
            Some(r) => UpstreamRevision::parse(r).ok_or_else(|| {
                err(format!(
                    "revision {r:?}: expected one of {}",
                    UpstreamRevision::expected()
                ))
            })?,
        };
        let ranged = |key: &str, v: Option<u64>, lo: u64, hi: u64| match v {
            Some(v) if !(lo..=hi).contains(&v) => {
                Err(err(format!("{key}: {v} is outside {lo}..={hi}")))
            }
            v => Ok(v),
        };
        let timeout = ranged("timeout_ms", entry.timeout_ms, 1, 600_000)?;
        let connect_timeout = ranged("connect_timeout_ms", entry.connect_timeout_ms, 1, 600_000)?;
        let max_response_bytes = ranged(
            "max_response_bytes",
            entry.max_response_bytes,
            1024,
            256 << 20,
        )?;
        let tls = match entry.tls {
            None => None,
            Some(_) if uri.scheme_str() != Some("https") => {
                return Err(err("tls: set, but the url is not https://".into()));
            }
            Some(raw) => {
                let t = typed::<TlsEntry>(raw, &[]).map_err(|e| err(format!("tls: {e}")))?;
                Some(tls_overrides(t, base).map_err(|r| err(format!("tls.{r}")))?)
            }
        };
        specs.push(Spec {
            name: entry.name,
            uri,
            revision,
            timeout: timeout.map(Duration::from_millis),
            connect_timeout: connect_timeout.map(Duration::from_millis),
            max_response_bytes: max_response_bytes.map(|v| v as usize),
            tls,
        });
    }
    Ok(doc.separator)
}

/// `raw` read as `T`; a value of the wrong type is named by its key (serde names unknown and
/// missing keys itself). `required` are the keys `T` cannot do without.
fn typed<T: serde::de::DeserializeOwned>(raw: Value, required: &[&str]) -> Result<T, String> {
    let e = match T::deserialize(&raw) {
        Ok(t) => return Ok(t),
        Err(e) => e.to_string(),
    };
    // Each key alone (beside placeholders for the required ones): the first that fails.
    let at_fault = raw.as_object().and_then(|m| {
        m.iter().find_map(|(k, v)| {
            let mut one: serde_json::Map<String, Value> = required
                .iter()
                .map(|r| ((*r).to_owned(), Value::from("")))
                .collect();
            one.insert(k.clone(), v.clone());
            T::deserialize(Value::Object(one)).is_err().then_some(k)
        })
    });
    Err(match at_fault {
        Some(k) if !e.starts_with("unknown field") => format!("{k}: {e}"),
        _ => e,
    })
}

/// An entry's TLS files, resolved against `base` and each read and checked; the error starts
/// with the key at fault.
fn tls_overrides(t: TlsEntry, base: &Path) -> Result<TlsOverrides, String> {
    let path = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let ca_file = t.ca_file.map(path);
    if let Some(ca) = &ca_file {
        crate::tls::read_certs(ca).map_err(|e| format!("ca_file: {e}"))?;
    }
    let client_identity = match (t.client_cert_file.map(path), t.client_key_file.map(path)) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            crate::tls::load_certified_key(&cert, &key)
                .map_err(|e| format!("client_cert_file/client_key_file: {e}"))?;
            Some((cert, key))
        }
        (Some(_), None) => return Err("client_key_file: required with client_cert_file".into()),
        (None, Some(_)) => return Err("client_cert_file: required with client_key_file".into()),
    };
    if let Some(name) = &t.server_name {
        crate::tls::server_name(name).map_err(|e| format!("server_name: {e}"))?;
    }
    Ok(TlsOverrides {
        ca_file,
        client_identity,
        server_name: t.server_name,
    })
}

/// With several upstreams their names prefix tool names and resource URIs: each must be one
/// that cannot run into the separator or a URI scheme.
pub(super) fn check_prefixes(specs: &[Spec], separator: &str) -> Result<(), ConfigError> {
    if specs.len() > 1
        && let Some(bad) = specs
            .iter()
            .find(|u| !valid_upstream_name(&u.name) || u.name.contains(separator))
    {
        return Err(invalid(
            "INTENTGATE_UPSTREAM_NAME",
            format!(
                "{:?} cannot prefix tool names beside other upstreams: use a lowercase letter, then up to 31 of a-z 0-9 -",
                bad.name
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ServeArgs};
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::try_parse_from(v).expect("clap parse").a.validate()
    }

    /// A CA certificate, and a client certificate with its key, as PEM.
    fn pems() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["gw.test".to_owned()])
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("leaf");
        (ca.pem(), leaf.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.to_str().expect("utf-8").to_owned()
    }

    fn by_name<'c>(c: &'c Config, name: &str) -> &'c NamedUpstream {
        c.upstreams.iter().find(|u| u.name == name).expect(name)
    }

    #[test]
    fn the_file_gives_each_upstream_its_settings_and_the_rest_are_global() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, cert, key) = pems();
        write(dir.path(), "ca.pem", &ca);
        write(dir.path(), "gw.pem", &cert);
        write(dir.path(), "gw.key", &key);
        let global_ca = write(dir.path(), "global-ca.pem", &ca);
        let file = write(
            dir.path(),
            "upstreams.json",
            &json_text(serde_json::json!({
                "separator": "..",
                "upstreams": [
                    {"name": "github", "url": "https://bot:hunter2pass@gh.internal/mcp?k=sekrit-key",
                     "revision": "2026-07-28", "timeout_ms": 30000, "connect_timeout_ms": 2000,
                     "max_response_bytes": 16777216,
                     "tls": {"ca_file": "ca.pem", "client_cert_file": "gw.pem",
                             "client_key_file": "gw.key", "server_name": "gh.test"}},
                    {"name": "db", "url": "http://db.internal:8080/mcp", "revision": "2025-11-25"},
                    {"name": "jira", "url": "https://jira.internal/mcp", "timeout_ms": 900}
                ]
            })),
        );
        let c = parse(&[
            "--upstream-url",
            "http://127.0.0.1:9/mcp",
            "--upstreams-file",
            &file,
            "--upstream-timeout-ms",
            "7000",
            "--upstream-ca-file",
            &global_ca,
        ])
        .expect("valid");
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["default", "github", "db", "jira"]);
        assert_eq!(c.upstream_separator, "..");
        let gh = by_name(&c, "github");
        assert_eq!(gh.revision, UpstreamRevision::Stateless("2026-07-28"));
        assert_eq!(gh.timeout, Duration::from_millis(30_000));
        assert_eq!(gh.connect_timeout, Duration::from_millis(2000));
        assert_eq!(gh.max_response_bytes, 16 << 20);
        assert_eq!(gh.tls.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(
            gh.tls.client_identity,
            Some((dir.path().join("gw.pem"), dir.path().join("gw.key")))
        );
        assert_eq!(gh.tls.server_name.as_deref(), Some("gh.test"));
        let db = by_name(&c, "db");
        assert_eq!(db.revision, UpstreamRevision::Handshake);
        assert_eq!(db.timeout, Duration::from_millis(7000));
        assert_eq!(db.connect_timeout, db.timeout);
        assert_eq!(db.max_response_bytes, 8 << 20);
        assert_eq!(db.tls, UpstreamTls::default(), "http: no TLS");
        let jira = by_name(&c, "jira");
        assert_eq!(jira.revision, UpstreamRevision::Auto);
        assert_eq!(jira.timeout, Duration::from_millis(900));
        assert_eq!(jira.connect_timeout, Duration::from_millis(900));
        assert_eq!(jira.tls.ca_file.as_deref(), Some(Path::new(&global_ca)));
        let first = by_name(&c, "default");
        assert_eq!(first.timeout, Duration::from_millis(7000));
        // Shown without the URL's secrets, with the settings.
        let dbg = format!("{c:#?}");
        for secret in ["hunter2pass", "sekrit-key", "bot:"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
        assert!(
            dbg.contains("github=https://***@gh.internal/mcp?***"),
            "{dbg}"
        );
        assert!(dbg.contains("revision: 2025-11-25"), "{dbg}");
    }

    fn json_text(v: serde_json::Value) -> String {
        serde_json::to_string_pretty(&v).expect("json")
    }

    #[test]
    fn the_variable_takes_the_same_document() {
        let doc = r#"[{"name": "a", "url": "http://h/1", "timeout_ms": 100},
                      {"name": "b-2", "url": "http://h/2", "revision": "auto"}]"#;
        let c = parse(&["--upstream", doc]).expect("valid");
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.upstreams[0].timeout, Duration::from_millis(100));
        assert_eq!(c.upstream_separator, "__");
        let c = parse(&[
            "--upstream",
            r#"{"separator": "_", "upstreams": [{"name": "a", "url": "http://h/1"}]}"#,
            "--upstream-separator",
            "_",
        ])
        .expect("the same separator twice");
        assert_eq!(c.upstream_separator, "_");
        // NAME=URL entries still split at commas.
        let c = parse(&[
            "--upstream",
            "a=http://h/1,b=http://h/2",
            "--upstream",
            "c=http://h/3",
        ])
        .expect("valid");
        assert_eq!(c.upstreams.len(), 3);
    }

    #[test]
    fn bad_documents_name_the_file_the_entry_and_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, cert, _) = pems();
        write(dir.path(), "ca.pem", &ca);
        write(dir.path(), "gw.pem", &cert);
        write(dir.path(), "not-a-cert.pem", "hello");
        let mut n = 0;
        let mut refused = |doc: serde_json::Value, says: &[&str]| {
            n += 1;
            let file = write(dir.path(), &format!("u{n}.json"), &json_text(doc));
            let e = parse(&["--upstreams-file", &file])
                .expect_err("refused")
                .to_string();
            assert!(
                e.starts_with(&format!("INTENTGATE_UPSTREAMS_FILE: {file}: ")),
                "{e}"
            );
            for s in says {
                assert!(e.contains(s), "{s:?} not in {e}");
            }
            assert!(!e.contains("hunter2pass"), "{e}");
        };
        let ok = serde_json::json!({"name": "a", "url": "http://h/1"});
        refused(
            serde_json::json!({"upstreams": [ok, {"name": "db", "url": "http://h/2", "timeout": 5}]}),
            &["upstream 2 (db)", "unknown field `timeout`"],
        );
        refused(
            serde_json::json!({"upstream": [ok]}),
            &["unknown field `upstream`"],
        );
        refused(
            serde_json::json!([{"name": "gh", "url": "https://h/1", "tls": {"ca": "ca.pem"}}]),
            &["upstream 1 (gh)", "tls: unknown field `ca`"],
        );
        refused(
            serde_json::json!([{"name": "gh", "url": "https://h/1", "tls": {"ca_file": 7}}]),
            &["upstream 1 (gh)", "tls: ca_file: invalid type"],
        );
        refused(
            serde_json::json!([{"url": "https://h/1"}]),
            &["upstream 1: ", "missing field `name`"],
        );
        refused(
            serde_json::json!([{"name": "gh", "url": "ftp://bot:hunter2pass@h/1"}]),
            &[
                "upstream 1 (gh)",
                "url: must be an absolute http:// or https:// URL",
            ],
        );
        refused(
            serde_json::json!([{"name": "gh", "url": "https://bot:hunter2pass@h/1", "timeout_ms": "https://bot:hunter2pass@h/1"}]),
            &["upstream 1 (gh)", "timeout_ms: invalid type"],
        );
        refused(
            serde_json::json!([ok, {"name": "a", "url": "http://h/2"}]),
            &["upstream 2 (a)", "configured twice"],
        );
        refused(
            serde_json::json!([{"name": "Git", "url": "http://h/2"}]),
            &["upstream 1 (Git)", "upstream name"],
        );
        refused(
            serde_json::json!([{"name": "a", "url": "http://h/2", "revision": "2024-01-01"}]),
            &["revision \"2024-01-01\"", "auto, 2025-11-25, 2026-07-28"],
        );
        refused(
            serde_json::json!([{"name": "a", "url": "http://h/2", "timeout_ms": 0}]),
            &["timeout_ms: 0 is outside"],
        );
        refused(
            serde_json::json!([{"name": "a", "url": "http://h/2", "tls": {"ca_file": "ca.pem"}}]),
            &["tls: set, but the url is not https://"],
        );
        refused(
            serde_json::json!([{"name": "a", "url": "https://h/2", "tls": {"ca_file": "not-a-cert.pem"}}]),
            &["upstream 1 (a)", "tls.ca_file", "not-a-cert.pem"],
        );
        refused(
            serde_json::json!([{"name": "a", "url": "https://h/2", "tls": {"ca_file": "missing.pem"}}]),
            &["tls.ca_file", "missing.pem"],
        );
        refused(
            serde_json::json!([{"name": "a", "url": "https://h/2", "tls": {"client_cert_file": "gw.pem"}}]),
            &["tls.client_key_file: required with client_cert_file"],
        );
        refused(
            serde_json::json!([{"name": "a", "url": "https://h/2", "tls": {"server_name": "not a name"}}]),
            &["tls.server_name"],
        );
        refused(serde_json::json!({"upstreams": []}), &["lists no upstream"]);
        refused(serde_json::json!("x"), &["expected an object"]);
        // Not JSON at all, and no file.
        let file = write(dir.path(), "broken.json", "{\"upstreams\": [");
        let e = parse(&["--upstreams-file", &file])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("broken.json: not a JSON document"), "{e}");
        let missing = dir.path().join("nope.json");
        let e = parse(&["--upstreams-file", missing.to_str().expect("utf-8")])
            .expect_err("refused")
            .to_string();
        assert!(
            e.starts_with("INTENTGATE_UPSTREAMS_FILE") && e.contains("nope.json: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn the_file_and_other_lists_combine_by_clear_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write(
            dir.path(),
            "u.json",
            r#"{"separator": "..", "upstreams": [{"name": "db", "url": "http://h/2"}]}"#,
        );
        // The file and INTENTGATE_UPSTREAMS: one of them.
        let e = parse(&["--upstreams-file", &file, "--upstream", "gh=http://h/1"])
            .expect_err("refused")
            .to_string();
        assert!(
            e.starts_with("INTENTGATE_UPSTREAMS_FILE") && e.contains("use one"),
            "{e}"
        );
        // A document beside NAME=URL entries.
        let e = parse(&["--upstream", "gh=http://h/1", "--upstream", "[]"])
            .expect_err("refused")
            .to_string();
        assert!(
            e.starts_with("INTENTGATE_UPSTREAMS") && e.contains("whole value"),
            "{e}"
        );
        // INTENTGATE_UPSTREAM_URL comes first, its name counts.
        let c = parse(&["--upstream-url", "http://h/0", "--upstreams-file", &file]).expect("valid");
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["default", "db"]);
        let e = parse(&[
            "--upstream-url",
            "http://h/0",
            "--upstream-name",
            "db",
            "--upstreams-file",
            &file,
        ])
        .expect_err("refused")
        .to_string();
        assert!(e.contains("upstream 1 (db)") && e.contains("twice"), "{e}");
        // Two separators that disagree.
        let e = parse(&["--upstreams-file", &file, "--upstream-separator", "__"])
            .expect_err("refused")
            .to_string();
        assert!(e.starts_with("INTENTGATE_UPSTREAM_SEPARATOR"), "{e}");
        // --demo starts its own upstream.
        let e = parse(&["--demo", "--upstreams-file", &file])
            .expect_err("refused")
            .to_string();
        assert!(
            e.starts_with("--demo") && e.contains("INTENTGATE_UPSTREAMS_FILE"),
            "{e}"
        );
    }
}
