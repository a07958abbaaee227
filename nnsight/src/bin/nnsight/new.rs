//! `nnsight new PATH`: a crate of the user's own that depends on nnsight, with a short experiment on the default
//! model, a test with one `intervene!` block, and the `build.rs` that puts libtorch on its binaries' run path.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where the new crate takes nnsight from.
pub enum Source {
    /// A folder holding nnsight's `Cargo.toml` (the `nnsight/` folder of a clone).
    Path(PathBuf),
    /// A git repository, optionally at a branch or revision.
    Git { url: String, branch: Option<String>, rev: Option<String> },
}

/// The nnsight crate this binary was built from, when its folder is still there.
pub fn built_from() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.join("Cargo.toml").is_file().then_some(dir)
}

/// Writes the crate at `dest` (which must not exist, or be an empty folder) and returns what to tell the user.
pub fn create(dest: &Path, source: &Source) -> Result<String, String> {
    if dest.exists()
        && std::fs::read_dir(dest).map_err(|e| format!("cannot read {}: {e}", dest.display()))?.next().is_some()
    {
        return Err(format!("{} exists and is not empty: choose a new folder", dest.display()));
    }
    let name = crate_name(dest)?;
    let dependency = match source {
        Source::Path(dir) => {
            let dir = dir.canonicalize().map_err(|e| format!("--path {}: {e}", dir.display()))?;
            let manifest = std::fs::read_to_string(dir.join("Cargo.toml"))
                .map_err(|e| format!("--path {}: no Cargo.toml there ({e})", dir.display()))?;
            if !manifest.lines().any(|l| l.trim() == "name = \"nnsight\"") {
                return Err(format!("--path {}: its Cargo.toml is not the nnsight crate's", dir.display()));
            }
            format!("nnsight = {{ path = {} }}", toml_string(&dir.display().to_string()))
        }
        Source::Git { url, branch, rev } => {
            let mut d = format!("nnsight = {{ git = {}", toml_string(url));
            if let Some(b) = branch {
                let _ = write!(d, ", branch = {}", toml_string(b));
            }
            if let Some(r) = rev {
                let _ = write!(d, ", rev = {}", toml_string(r));
            }
            d.push_str(" }");
            d
        }
    };
    let files: [(&str, String); 5] = [
        (
            "Cargo.toml",
            include_str!("template/Cargo.toml.in").replace("{name}", &name).replace("{dependency}", &dependency),
        ),
        ("build.rs", include_str!("template/build.rs").to_string()),
        ("src/main.rs", include_str!("template/main.rs").to_string()),
        ("tests/experiment.rs", include_str!("template/experiment.rs").to_string()),
        (".gitignore", include_str!("template/gitignore").to_string()),
    ];
    for (rel, text) in &files {
        let path = dest.join(rel);
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    // The workspace's lock file, so that the new crate builds the same versions (and can share its target folder).
    if let Source::Path(dir) = source {
        let lock = dir.join("../Cargo.lock");
        if lock.is_file() {
            std::fs::copy(&lock, dest.join("Cargo.lock"))
                .map_err(|e| format!("cannot copy {}: {e}", lock.display()))?;
        }
    }
    Ok(format!(
        "created crate `{name}` at {}\n\n  cd {}\n  cargo run --release   # top next tokens, a logit lens, an ablation\n  cargo test            # tests/experiment.rs\n",
        dest.display(),
        dest.display()
    ))
}

/// A package name from the folder's name: lowercase ASCII letters, digits, `-` and `_`, starting with a letter.
fn crate_name(dest: &Path) -> Result<String, String> {
    let base = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{} has no folder name to name the crate after", dest.display()))?;
    let name: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    match name.chars().next() {
        Some(c) if c.is_ascii_alphabetic() => Ok(name),
        _ => Err(format!("cannot name a crate after the folder `{base}`: its name must start with a letter")),
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
