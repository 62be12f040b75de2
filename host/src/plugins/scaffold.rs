//! `intentgate plugin new NAME` (a plugin crate from the template, which builds with one cargo
//! command and tests natively with `cargo test`) and `intentgate plugin check FILE.wasm`
//! (validate a component against the worlds).
//!
//! Without `--sdk`, the SDK (and the WIT package it binds) is written into the new crate's
//! `vendor/` from copies compiled into this binary, so the crate builds anywhere, outside the
//! repository too, against exactly the interface this gateway speaks.
//!
//! It only writes inside the new crate's directory and never overwrites an existing one.

use super::PluginError;
use super::runtime::{Runtime, World};
use std::path::{Path, PathBuf};

/// The template's `src/lib.rs` (also built as the `test-custom` plugin, so it is known to build).
pub const TEMPLATE_LIB_RS: &str = include_str!("template/lib.rs");
/// The formatter template's `src/lib.rs` (also built as the `test-custom-formatter` plugin).
pub const TEMPLATE_FORMATTER_RS: &str = include_str!("template/formatter.rs");
const TEMPLATE_CARGO_TOML: &str = include_str!("template/Cargo.toml.tmpl");
const TEMPLATE_README: &str = include_str!("template/README.md.tmpl");

/// The SDK path compiled into this binary (the repository's `sdk/`).
pub fn default_sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("sdk")
}

/// The SDK crate and the WIT package as compiled into this binary: `(path under vendor/, text)`.
/// The SDK binds `../wit`, so the two sit side by side as in the repository.
const VENDORED_SDK: &[(&str, &str)] = &[
    (
        "intentgate-plugin-sdk/Cargo.toml",
        include_str!("../../../sdk/Cargo.toml"),
    ),
    (
        "intentgate-plugin-sdk/README.md",
        include_str!("../../../sdk/README.md"),
    ),
    (
        "intentgate-plugin-sdk/src/lib.rs",
        include_str!("../../../sdk/src/lib.rs"),
    ),
    (
        "intentgate-plugin-sdk/src/bindings.rs",
        include_str!("../../../sdk/src/bindings.rs"),
    ),
    (
        "intentgate-plugin-sdk/src/host.rs",
        include_str!("../../../sdk/src/host.rs"),
    ),
    (
        "intentgate-plugin-sdk/src/testing.rs",
        include_str!("../../../sdk/src/testing.rs"),
    ),
    ("wit/types.wit", include_str!("../../../wit/types.wit")),
];

/// Where the new crate's SDK comes from.
#[derive(Debug, Clone)]
pub enum SdkSource {
    /// An SDK crate on disk (`--sdk PATH`).
    Path(PathBuf),
    /// The copy compiled into this binary, written into the crate's `vendor/`.
    Vendored,
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

/// Create `parent/NAME/` from the template with the SDK vendored into it (builds anywhere).
pub fn new_plugin_vendored(parent: &Path, name: &str) -> Result<PathBuf, ScaffoldError> {
    create(parent, name, &SdkSource::Vendored, World::CheckPlugin)
}

/// Create `parent/NAME/` from the template against the SDK at `sdk_path`. Returns the crate
/// directory.
pub fn new_plugin(parent: &Path, name: &str, sdk_path: &Path) -> Result<PathBuf, ScaffoldError> {
    create(
        parent,
        name,
        &SdkSource::Path(sdk_path.to_path_buf()),
        World::CheckPlugin,
    )
}

/// Create `parent/NAME/` from the template of `world` (a check plugin, or a formatter of the
/// world `intentgate:plugin/formatter`).
pub fn new_plugin_of(
    parent: &Path,
    name: &str,
    source: &SdkSource,
    world: World,
) -> Result<PathBuf, ScaffoldError> {
    create(parent, name, source, world)
}

fn create(
    parent: &Path,
    name: &str,
    source: &SdkSource,
    world: World,
) -> Result<PathBuf, ScaffoldError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.len() <= 64;
    if !valid {
        return Err(ScaffoldError::InvalidName(name.to_string()));
    }
    let sdk_text = match source {
        SdkSource::Path(sdk_path) => {
            if !sdk_path.join("Cargo.toml").is_file() {
                return Err(ScaffoldError::NoSdk(sdk_path.to_path_buf()));
            }
            let sdk = sdk_path
                .canonicalize()
                .map_err(|source| ScaffoldError::Io {
                    path: sdk_path.into(),
                    source,
                })?;
            sdk.display()
                .to_string()
                .replace('\\', "/")
                .replace('"', "\\\"")
        }
        SdkSource::Vendored => "vendor/intentgate-plugin-sdk".to_owned(),
    };
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
    if let SdkSource::Vendored = source {
        for (rel, text) in VENDORED_SDK {
            let path = dir.join("vendor").join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&path, text).map_err(io(&path))?;
        }
    }
    let file = name.replace('-', "_");
    let (lib, features, what) = match world {
        World::CheckPlugin => (TEMPLATE_LIB_RS, "", "check plugin"),
        World::SiemFormatter => (
            TEMPLATE_FORMATTER_RS,
            ", features = [\"siem\"]",
            "formatter",
        ),
    };
    let files = [
        (
            dir.join("Cargo.toml"),
            TEMPLATE_CARGO_TOML
                .replace("{{name}}", name)
                .replace("{{sdk_path}}", &sdk_text)
                .replace("{{features}}", features),
        ),
        (
            dir.join("README.md"),
            TEMPLATE_README
                .replace("{{name}}", name)
                .replace("{{file}}", &file)
                .replace("{{what}}", what)
                .replace("{{world}}", world.name()),
        ),
        (dir.join(".gitignore"), "/target\n".to_string()),
        (src.join("lib.rs"), lib.to_string()),
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
    fn formatter_template_is_the_built_test_formatter() {
        let built = include_str!("../../../plugins/test-custom-formatter/src/lib.rs");
        assert_eq!(
            TEMPLATE_FORMATTER_RS, built,
            "plugins/test-custom-formatter/src/lib.rs must equal the formatter template"
        );
    }

    #[test]
    fn formatter_crate_enables_the_sdk_feature() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = new_plugin_of(
            tmp.path(),
            "my-siem",
            &SdkSource::Path(default_sdk_path()),
            World::SiemFormatter,
        )
        .expect("new");
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
        assert!(cargo.contains("features = [\"siem\"]"), "{cargo}");
        let readme = std::fs::read_to_string(dir.join("README.md")).expect("README");
        assert!(
            readme.contains("intentgate:plugin/formatter@0.2.0"),
            "{readme}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("src/lib.rs")).expect("lib.rs"),
            TEMPLATE_FORMATTER_RS
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

    #[test]
    fn vendored_sdk_makes_a_self_contained_crate() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = new_plugin_vendored(tmp.path(), "anywhere").expect("new");
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
        assert!(
            cargo.contains("path = \"vendor/intentgate-plugin-sdk\""),
            "{cargo}"
        );
        let sdk = dir.join("vendor/intentgate-plugin-sdk");
        assert_eq!(
            std::fs::read_to_string(sdk.join("src/bindings.rs")).expect("bindings"),
            include_str!("../../../sdk/src/bindings.rs")
        );
        // The SDK binds `../wit`: the WIT package sits beside it, as this gateway speaks it.
        assert_eq!(
            std::fs::read_to_string(sdk.join("../wit/types.wit")).expect("wit"),
            include_str!("../../../wit/types.wit")
        );
        for entry in std::fs::read_dir(default_sdk_path().join("src")).expect("sdk src") {
            let name = entry.expect("entry").file_name();
            assert!(
                sdk.join("src").join(&name).is_file(),
                "sdk/src/{name:?} is not vendored: add it to VENDORED_SDK"
            );
        }
    }
}
