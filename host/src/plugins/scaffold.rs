//! `intentgate plugin new NAME` (a plugin crate from the template, which builds with one cargo
//! command and tests natively with `cargo test`) and `intentgate plugin check FILE.wasm`
//! (validate a component against the worlds).
//!
//! It only writes inside the new crate's directory and never overwrites an existing one.

use super::PluginError;
use super::runtime::{Runtime, World};
use std::path::{Path, PathBuf};

/// The template's `src/lib.rs` (also built as the `test-custom` plugin, so it is known to build).
pub const TEMPLATE_LIB_RS: &str = include_str!("template/lib.rs");
const TEMPLATE_CARGO_TOML: &str = include_str!("template/Cargo.toml.tmpl");
const TEMPLATE_README: &str = include_str!("template/README.md.tmpl");

/// The SDK path compiled into this binary (the repository's `sdk/`).
pub fn default_sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("sdk")
}

/// Errors of `plugin new`.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name is not a valid crate name.
    #[error(
        "invalid plugin name {0:?}: use lowercase letters, digits, '-' or '_', starting with a letter"
    )]
    InvalidName(String),
    /// The target exists.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// The SDK path does not hold the SDK.
    #[error("no plugin SDK at {0} (pass --sdk-path)")]
    NoSdk(PathBuf),
    /// I/O.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
}

/// Create `parent/NAME/` from the template. Returns the crate directory.
pub fn new_plugin(parent: &Path, name: &str, sdk_path: &Path) -> Result<PathBuf, ScaffoldError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.len() <= 64;
    if !valid {
        return Err(ScaffoldError::InvalidName(name.to_string()));
    }
    if !sdk_path.join("Cargo.toml").is_file() {
        return Err(ScaffoldError::NoSdk(sdk_path.to_path_buf()));
    }
    let sdk = sdk_path
        .canonicalize()
        .map_err(|source| ScaffoldError::Io {
            path: sdk_path.into(),
            source,
        })?;
    let dir = parent.join(name);
    if dir.exists() {
        return Err(ScaffoldError::Exists(dir));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScaffoldError::Io { path, source }
    };
    let src = dir.join("src");
    std::fs::create_dir_all(&src).map_err(io(&src))?;
    let sdk_text = sdk
        .display()
        .to_string()
        .replace('\\', "/")
        .replace('"', "\\\"");
    let file = name.replace('-', "_");
    let files = [
        (
            dir.join("Cargo.toml"),
            TEMPLATE_CARGO_TOML
                .replace("{{name}}", name)
                .replace("{{sdk_path}}", &sdk_text),
        ),
        (
            dir.join("README.md"),
            TEMPLATE_README
                .replace("{{name}}", name)
                .replace("{{file}}", &file),
        ),
        (dir.join(".gitignore"), "/target\n".to_string()),
        (src.join("lib.rs"), TEMPLATE_LIB_RS.to_string()),
    ];
    for (path, text) in files {
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(dir)
}

/// Validate a component file: which world it implements, or why none.
pub fn check_file(runtime: &Runtime, path: &Path) -> Result<World, PluginError> {
    let wasm = std::fs::read(path)
        .map_err(|e| PluginError::InvalidComponent(format!("{}: {e}", path.display())))?;
    runtime.validate(&wasm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_the_built_test_plugin() {
        let built = include_str!("../../../plugins/test-custom/src/lib.rs");
        assert_eq!(
            TEMPLATE_LIB_RS, built,
            "plugins/test-custom/src/lib.rs must equal the template"
        );
    }

    #[test]
    fn new_plugin_writes_a_crate_and_refuses_bad_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = new_plugin(tmp.path(), "no-deletes", &default_sdk_path()).expect("new");
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
        assert!(cargo.contains("name = \"no-deletes\""));
        assert!(cargo.contains("intentgate-plugin-sdk = { path = \"/"));
        assert!(dir.join("src/lib.rs").is_file());
        assert!(matches!(
            new_plugin(tmp.path(), "no-deletes", &default_sdk_path()),
            Err(ScaffoldError::Exists(_))
        ));
        assert!(matches!(
            new_plugin(tmp.path(), "Bad Name", &default_sdk_path()),
            Err(ScaffoldError::InvalidName(_))
        ));
        assert!(matches!(
            new_plugin(tmp.path(), "x", tmp.path()),
            Err(ScaffoldError::NoSdk(_))
        ));
    }
}
