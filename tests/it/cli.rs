//! `cqrsd check`, `cqrsd init`, `--version` and completions.

use crate::harness::{path_str, repo_file, run_cli};

#[test]
fn check_accepts_the_example_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let example = repo_file("config.toml.example");
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&example)], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("OK"), "{stdout}");
}

#[test]
fn check_names_every_mistyped_key_and_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[http]\nlisten = \"127.0.0.1:8080\"\nlsten = \"x\"\n[command]\nthreads = 0\n[projectons]\nworkers = 2\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_ne!(code, 0, "{stdout}");
    assert!(stderr.contains("http.lsten: unknown key"), "{stderr}");
    assert!(stderr.contains("projectons: unknown key"), "{stderr}");
    assert!(
        stderr.contains("command.threads: must be at least 1"),
        "{stderr}"
    );
}

#[test]
fn check_reports_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_cli(&["check", "--config", "nope.toml"], dir.path());
    assert_ne!(code, 0);
    assert!(stderr.contains("nope.toml"), "{stderr}");
}

#[test]
fn init_writes_a_working_config_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("site");
    let (code, stdout, stderr) = run_cli(&["init", path_str(&target)], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(target.join("config.toml").is_file());
    assert!(target.join("domain.toml").is_file());

    let config = target.join("config.toml");
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");

    std::fs::write(target.join("domain.toml"), "# edited").unwrap();
    let (code, _, stderr) = run_cli(&["init", path_str(&target)], dir.path());
    assert_ne!(code, 0);
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(target.join("domain.toml")).unwrap(),
        "# edited"
    );
}

#[test]
fn version_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = run_cli(&["--version"], dir.path());
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        format!("cqrsd {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, stdout, _) = run_cli(&["completions", "bash"], dir.path());
    assert_eq!(code, 0);
    assert!(stdout.contains("_cqrsd()"), "{stdout}");
}

#[test]
fn check_lists_every_mistake_of_a_domain_file_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("domain.toml"),
        r#"
[aggregates.account]
state = { balance = 0 }
[aggregates.account.commands.open]
schema = { type = "object", properties = { owner = { type = "strin" } } }
rules = [ { require = "state.balance >=", message = "broken" } ]
emit = [ { event = "NoSuchEvent", data = {} }, { event = "Opened", data = { owner = "command.owner" } } ]
[aggregates.account.events.Opened]
set = { owner = "event.owner" }
[projections.accounts]
kind = "view"
source = ["acount"]
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[domain]\npath = \"domain.toml\"\n",
    )
    .unwrap();
    let config = dir.path().join("config.toml");
    let (code, stdout, stderr) = run_cli(&["check", "--config", path_str(&config)], dir.path());
    assert_ne!(code, 0, "{stdout}");
    for place in [
        "aggregates.account.commands.open.schema",
        "aggregates.account.commands.open.rules[0]",
        "aggregates.account.commands.open.emit[0]",
        "aggregates.account.events.Opened.set.owner",
        "projections.accounts.source",
    ] {
        assert!(
            stderr.contains(place),
            "`{place}` not reported in:\n{stderr}"
        );
    }
}
