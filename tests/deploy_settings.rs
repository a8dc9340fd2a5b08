//! The deploy files' settings go through `mediafarm check-settings`, the parser every worker
//! starts with: the container and Kubernetes settings files are accepted, and a wrong value in
//! a file or in the environment is refused with exit status 2 and a message naming it. No
//! broker or backend is needed (the command connects nowhere).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mediafarm_tests::{binary, workspace_root};

/// Runs `mediafarm --config <config> check-settings` with only `env` set (no MEDIAFARM_*
/// variables of this machine leak in).
fn check_settings(config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary("mediafarm"));
    cmd.arg("--config")
        .arg(config)
        .arg("check-settings")
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.output().expect("mediafarm runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A copy of the container settings with one line replaced, in its own temporary file.
struct EditedSettings(PathBuf);

impl EditedSettings {
    fn new(key: &str, line: &str) -> EditedSettings {
        let original =
            std::fs::read_to_string(workspace_root().join("deploy/mediafarm.container.toml"))
                .expect("deploy/mediafarm.container.toml is readable");
        let mut replaced = 0;
        let text: Vec<&str> = original
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key} =")) {
                    replaced += 1;
                    line
                } else {
                    l
                }
            })
            .collect();
        assert_eq!(
            replaced, 1,
            "{key} is set once in deploy/mediafarm.container.toml"
        );
        let path = std::env::temp_dir().join(format!(
            "mf-deploy-settings-{}.toml",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, text.join("\n")).expect("temp file is writable");
        EditedSettings(path)
    }
}

impl Drop for EditedSettings {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn container_and_kubernetes_settings_files_are_accepted() {
    for file in [
        "deploy/mediafarm.example.toml",
        "deploy/mediafarm.container.toml",
        "k8s/base/mediafarm.toml",
        "k8s/overlays/example/mediafarm.toml",
    ] {
        let out = check_settings(&workspace_root().join(file), &[]);
        assert!(out.status.success(), "{file} is refused: {}", stderr(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("settings accepted"),
            "{file}: no confirmation printed"
        );
    }
}

#[test]
fn a_wrong_value_in_the_file_is_refused_naming_setting_and_value() {
    let edited = EditedSettings::new("storage_url", r#"storage_url = "s4://mediafarm""#);
    let out = check_settings(&edited.0, &[]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("`storage_url`"), "{err}");
    assert!(err.contains("s4://mediafarm"), "{err}");
}

#[test]
fn an_unknown_setting_in_the_file_is_refused_with_a_suggestion() {
    let edited = EditedSettings::new("worker_shutdown_grace", "worker_shutdown_grase = 30");
    let out = check_settings(&edited.0, &[]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("worker_shutdown_grace"),
        "no suggestion: {}",
        stderr(&out)
    );
}

#[test]
fn a_wrong_value_in_the_environment_is_refused() {
    let config = workspace_root().join("deploy/mediafarm.container.toml");
    let out = check_settings(&config, &[("MEDIAFARM_SNAPSHOT_MAX_SESSIONS", "0")]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("snapshot_max_sessions"), "{err}");
    assert!(err.contains("from the environment"), "{err}");
    // The same file with a good value from the environment passes: the variable was the cause.
    let ok = check_settings(&config, &[("MEDIAFARM_SNAPSHOT_MAX_SESSIONS", "8")]);
    assert!(ok.status.success(), "{}", stderr(&ok));
}

#[test]
fn a_missing_settings_file_given_explicitly_is_refused() {
    let missing = std::env::temp_dir().join(format!(
        "mf-deploy-missing-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    let out = check_settings(&missing, &[]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot read settings file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn list_settings_from_the_environment_are_read_as_a_json_array_or_commas_and_printed() {
    let config = workspace_root().join("deploy/mediafarm.container.toml");
    for given in [
        r#"["cdn.example.com", "img.example.org"]"#,
        "cdn.example.com,img.example.org",
    ] {
        let out = check_settings(&config, &[("MEDIAFARM_SOURCE_ALLOWED_HOSTS", given)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{given}: {}", stderr(&out));
        assert!(
            stdout
                .lines()
                .any(|l| l == r#"source_allowed_hosts = ["cdn.example.com","img.example.org"]"#),
            "{given}: {stdout}"
        );
    }
    let out = check_settings(
        &config,
        &[("MEDIAFARM_SOURCE_ALLOWED_HOSTS", r#"'cdn.example.com'"#)],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("source_allowed_hosts") && stderr(&out).contains("a JSON array"),
        "{}",
        stderr(&out)
    );
}
