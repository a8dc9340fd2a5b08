//! The deploy files' settings go through each program's own check (`mediafarm check-settings`
//! for the core and beat settings, `<worker> --check-settings` for a worker's), the parser each
//! starts with: the container and Kubernetes settings files are accepted, and a wrong value in
//! a file or in the environment is refused with exit status 2 and a message naming it. No
//! broker or backend is needed (the checks connect nowhere).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mediafarm_tests::{binary, worker_binary, workspace_root};

const WORKERS: [&str; 4] = [
    "image-worker",
    "snapshot-worker",
    "notify-worker",
    "persist-worker",
];

/// Runs `mediafarm --config <config> check-settings` with only `env` set (no MEDIAFARM_*
/// variables of this machine leak in).
fn check_settings(config: &Path, env: &[(&str, &str)]) -> Output {
    run_check(
        Command::new(binary("mediafarm")),
        config,
        "check-settings",
        env,
    )
}

/// Runs `<worker> --config <config> --check-settings` the same way.
fn check_worker_settings(worker: &'static str, config: &Path, env: &[(&str, &str)]) -> Output {
    run_check(
        Command::new(worker_binary(worker)),
        config,
        "--check-settings",
        env,
    )
}

fn run_check(mut cmd: Command, config: &Path, check: &str, env: &[(&str, &str)]) -> Output {
    cmd.arg("--config")
        .arg(config)
        .arg(check)
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.output().expect("the program runs")
}

fn names(cmd: &mut Command) -> Vec<String> {
    let out = cmd.output().expect("the program runs");
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
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
        let path = workspace_root().join(file);
        let mut outs = vec![("mediafarm", check_settings(&path, &[]))];
        for worker in WORKERS {
            outs.push((worker, check_worker_settings(worker, &path, &[])));
        }
        for (program, out) in outs {
            assert!(
                out.status.success(),
                "{file} is refused by {program}: {}",
                stderr(&out)
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("settings accepted"),
                "{file}: no confirmation printed by {program}"
            );
        }
    }
}

#[test]
fn each_program_names_the_settings_it_reads_and_checks_only_those() {
    let cli = names(Command::new(binary("mediafarm")).arg("setting-names"));
    assert!(cli.iter().any(|n| n == "broker_url") && cli.iter().any(|n| n == "beat_schedule"));
    assert!(!cli.iter().any(|n| n.starts_with("smtp_")), "{cli:?}");
    let notify = names(Command::new(worker_binary("notify-worker")).arg("--setting-names"));
    for name in ["broker_url", "smtp_url", "sms_provider", "webhook_secret"] {
        assert!(notify.iter().any(|n| n == name), "{name}: {notify:?}");
    }
    assert!(!notify
        .iter()
        .any(|n| n.starts_with("beat_") || n.starts_with("image_")));
    let snapshot = names(Command::new(worker_binary("snapshot-worker")).arg("--setting-names"));
    for name in ["snapshot_max_sessions", "webhook_allowed_hosts"] {
        assert!(snapshot.iter().any(|n| n == name), "{name}: {snapshot:?}");
    }
    let image = names(Command::new(worker_binary("image-worker")).arg("--setting-names"));
    assert!(
        image.iter().any(|n| n == "image_max_src_pixels"),
        "{image:?}"
    );

    // A notify setting is notify-worker's to check: the CLI and image-worker leave it alone.
    let edited = EditedSettings::new("email_from", r#"email_from = 5"#);
    assert!(check_settings(&edited.0, &[]).status.success());
    assert!(check_worker_settings("image-worker", &edited.0, &[])
        .status
        .success());
    let out = check_worker_settings("notify-worker", &edited.0, &[]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("`email_from` = 5"),
        "{}",
        stderr(&out)
    );
    // A misspelt notify name, likewise, with a suggestion from notify-worker.
    let edited = EditedSettings::new("email_from", r#"email_frm = "x@example.com""#);
    assert!(check_settings(&edited.0, &[]).status.success());
    let out = check_worker_settings("notify-worker", &edited.0, &[]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("did you mean `email_from`"),
        "{}",
        stderr(&out)
    );
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
    let out = check_settings(&config, &[("MEDIAFARM_WORKER_PREFETCH_MULTIPLIER", "0")]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("worker_prefetch_multiplier"), "{err}");
    assert!(err.contains("from the environment"), "{err}");
    // A worker's own setting is checked by that worker.
    let check = |env: &[(&str, &str)]| check_worker_settings("snapshot-worker", &config, env);
    let out = check(&[("MEDIAFARM_SNAPSHOT_MAX_SESSIONS", "0")]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("snapshot_max_sessions"), "{err}");
    assert!(err.contains("from the environment"), "{err}");
    // The same file with a good value from the environment passes: the variable was the cause.
    let ok = check(&[("MEDIAFARM_SNAPSHOT_MAX_SESSIONS", "8")]);
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
