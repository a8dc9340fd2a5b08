//! Flower 2.x from the project's venv, unmodified, watching a farm on either broker (AMQP or
//! Redis): [`Flower::start`] runs `celery flower` against the farm's broker and result
//! backend, [`Flower::check`] runs `tests/py/flower_check.py` (Flower's API, then its pages in
//! Debian's Chromium), and [`assert_shows`] checks what it read the same way for both brokers:
//! the worker listed (and its page rendered, broker tab included), one job `SUCCESS` with its
//! result and runtime, one `FAILURE` with its exception.

use std::time::Duration;

use mediafarm::Settings;
use serde_json::{json, Value};

use crate::process::{wait_port, Proc};
use crate::{free_port, python, python_env, run_python, workspace_root};

/// A Flower process, killed when dropped.
pub struct Flower {
    _proc: Proc,
    pub url: String,
}

impl Flower {
    /// Starts Flower on a free port of 127.0.0.1 against `s`'s broker and backend, and waits
    /// until it listens and its event receiver had a moment to subscribe.
    pub async fn start(s: &Settings) -> Flower {
        let port = free_port();
        let env = python_env(s);
        let proc = Proc::spawn(
            std::process::Command::new(python())
                .current_dir(workspace_root().join("tests/py"))
                .args(["-m", "celery", "-A", "celery_app", "flower"])
                .args(["--address=127.0.0.1", &format!("--port={port}")])
                .env("FLOWER_UNAUTHENTICATED_API", "true")
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdout(std::process::Stdio::null()),
        );
        tokio::task::spawn_blocking(move || wait_port(port))
            .await
            .expect("Flower listens");
        // Flower learns of tasks from events: give its event receiver a moment to bind.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Flower {
            _proc: proc,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// What Flower shows of `node` and the jobs `ok_id` (succeeded) and `failed_id` (failed),
    /// screenshots saved in `var/flower/<label>-*.png`.
    pub async fn check(&self, label: &str, node: &str, ok_id: &str, failed_id: &str) -> Value {
        let shots = workspace_root().join("var/flower");
        std::fs::create_dir_all(&shots).expect("var/ is writable");
        let args = [
            self.url.clone(),
            node.to_owned(),
            ok_id.to_owned(),
            failed_id.to_owned(),
            shots.display().to_string(),
            label.to_owned(),
        ];
        let out = tokio::time::timeout(
            Duration::from_secs(240),
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                run_python("flower_check.py", &args, &[])
            }),
        )
        .await
        .expect("the Flower check ends within 4 minutes")
        .expect("ran");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"))
    }
}

/// Flower saw `node` and both jobs: `ok` (whose result contains `ok_text`) and the failed
/// one (whose exception contains `failed_text`), in its API and on its pages.
pub fn assert_shows(report: &Value, node: &str, ok_text: &str, failed_text: &str) {
    assert_eq!(report["error"], Value::Null, "{report:#}");
    assert!(
        report["workers"]
            .as_array()
            .is_some_and(|w| w.contains(&json!(node))),
        "{report:#}"
    );
    let okr = &report["ok"];
    assert_eq!(okr["state"], "SUCCESS", "{report:#}");
    assert_eq!(okr["name"], "echo.echo", "{report:#}");
    assert_eq!(okr["worker"], json!(node), "{report:#}");
    assert!(
        okr["runtime"].as_f64().is_some_and(|r| r >= 0.0),
        "{report:#}"
    );
    assert!(
        okr["result"].as_str().is_some_and(|r| r.contains(ok_text)),
        "{report:#}"
    );
    let bad = &report["failed"];
    assert_eq!(bad["state"], "FAILURE", "{report:#}");
    assert!(
        bad["exception"]
            .as_str()
            .is_some_and(|e| e.contains(failed_text)),
        "{report:#}"
    );
    let browser = &report["browser"];
    assert_eq!(browser["workers_page_has_node"], true, "{report:#}");
    assert_eq!(browser["tasks_page_has_ok"], true, "{report:#}");
    assert_eq!(browser["tasks_page_has_failed"], true, "{report:#}");
    assert!(
        browser["failed_task_page"]
            .as_str()
            .is_some_and(|t| t.contains(failed_text)),
        "{report:#}"
    );
    // The worker's own page renders its inspect replies, the broker tab among them.
    assert_eq!(browser["worker_page_status"], 200, "{report:#}");
    assert!(
        browser["worker_page_broker"]
            .as_str()
            .is_some_and(|t| t.contains("Transport")),
        "{report:#}"
    );
}
