// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The repository's own conventions: every source file, script and manifest names its license
//! (SPDX) in its first lines, as Cargo.toml's `license` field does for the packages.

use std::{
    fs,
    path::{Path, PathBuf},
};

const TAG: &str = "SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause";

/// Files that must carry the tag: Rust, C, shell scripts and TOML manifests, outside build
/// output and fuzzing corpora.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !matches!(
                name.as_str(),
                "target" | "corpus" | "artifacts" | "coverage" | ".git"
            ) {
                sources(&path, out);
            }
        } else if name.ends_with(".rs")
            || name.ends_with(".c")
            || name.ends_with(".sh")
            || name.ends_with(".toml") && name != "Cargo.lock"
            || path.ends_with("scripts/test")
            || path.ends_with(".ci/run")
            || path.ends_with("tests/e2e/guest/init")
        {
            out.push(path);
        }
    }
}

#[test]
fn every_source_file_names_its_license() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(root, &mut files);
    assert!(files.len() > 50, "only {} files found", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|f| {
            let text = fs::read_to_string(f).unwrap_or_default();
            !text.lines().take(3).any(|l| l.contains(TAG))
        })
        .map(|f| f.strip_prefix(root).unwrap_or(f).display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "no `{TAG}` in the first lines of: {missing:?}"
    );
}
