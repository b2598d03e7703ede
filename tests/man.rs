// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The man pages in docs/man are generated from the CLI definition (clap_mangen): this test
//! fails when they are out of date, and rewrites them with
//! `VHOST_IOMMU_UPDATE_MAN=1 cargo test --test man`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use clap::CommandFactory;
use vhost_device_iommu::config::Cli;

const UPDATE: &str = "VHOST_IOMMU_UPDATE_MAN";

fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/man")
}

/// Every page: the program's and one per subcommand (`vhost-device-iommu-ctl.1`, ...), as
/// clap_mangen writes them.
fn generated() -> BTreeMap<String, Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    clap_mangen::generate_to(Cli::command(), dir.path()).unwrap();
    read_pages(dir.path())
}

fn read_pages(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn committed_man_pages_match_the_cli() {
    let pages = generated();
    assert!(
        pages.contains_key("vhost-device-iommu.1"),
        "{:?}",
        pages.keys()
    );
    assert!(pages.contains_key("vhost-device-iommu-ctl.1"));
    let dir = man_dir();
    if std::env::var_os(UPDATE).is_some() {
        for stale in read_pages(&dir).keys().filter(|k| !pages.contains_key(*k)) {
            std::fs::remove_file(dir.join(stale)).unwrap();
        }
        for (name, page) in &pages {
            std::fs::write(dir.join(name), page).unwrap();
        }
        return;
    }
    let committed = read_pages(&dir);
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&committed),
        names(&pages),
        "docs/man has other pages than the CLI defines: run `{UPDATE}=1 cargo test --test man`"
    );
    for (name, page) in &pages {
        assert!(
            committed[name] == *page,
            "docs/man/{name} is out of date with the CLI: run `{UPDATE}=1 cargo test --test man`"
        );
    }
}
