//! Celery's canvas from the real Python celery client to Rust workers: a chain of three
//! (mixed immutable and not) with `.get()`, `.parent`, `.children` and `.collect()` working in
//! Python, `link`, `link_error` with a Rust errback reading the typed failure, a chain step
//! with a countdown, a chain whose middle step is retried, a chain across Rust and Python
//! workers, a Python errback of a Rust task, a step that cannot take its parent's result, a
//! group of 100 with `GroupResult` save/restore, chords of 100 joined in Redis with the body on
//! Rust and on Python, a chord whose header mixes Rust and Python workers, a chord with a failing
//! header (the body's `ChordError` and errback, and a chain step after such a chord failed with
//! it, as Celery 5.7's `_fail_chain`), nested canvases (`chain(a, group(b, c), d, e)`
//! run through a chord step with its body on Rust and on Python, a chain ending in a group, a
//! chain and a group as `link=` callbacks, a chord whose body is a chain, on Rust and ending on
//! Python, one whose body chain has options of its own, and chords whose body is a group or a
//! chord), late copies of a header ignored once Python or Rust sent the body (Celery 5.7's
//! `.c` done mark), and canvas features mediafarm does not carry out failing clearly instead
//! of being dropped.
//! Then the same from the Rust producer API: a chain (also one with a group in the middle, and
//! one ending in a group) and a group on Rust workers, a chain on a Python worker and across
//! both, chains ending in a group and chords whose body is a chain on Rust and on Python
//! workers, a chord whose body is a group (a member on Python) and, sent as JSON, one whose
//! body is a chord, a chord joined by Python Celery from the size key the producer set, and
//! `mediafarm submit --workflow`. Last, kill -9 of a worker during a chord of 1,000 headers: no
//! header lost, the body sent once.

use std::time::Duration;

use mediafarm::client::{chain, chord, group, Signature, Step as ChainStep};
use mediafarm::{Client, Registry, Settings, Task, TaskContext, TaskError, TaskState};
use mediafarm_tests::{
    dead_letters, delete_queue, new_id, python_env, ready_count, run_python, settings,
    unique_queue, Echo, Farm, PythonWorker,
};
use serde_json::{json, Map, Value};

/// `canvas.step`: returns its kwargs; a parent's result arrives under `parent`. `fail` fails
/// permanently with that message; `fail_times: n` fails transiently while `retries < n`
/// (retrying after `retry_after_s`) and then reports `retries`; `sleep_ms: n` waits that long
/// first; `tally: key` counts the run under `key` (see [`runs`]).
struct Step;

/// How many times `canvas.step` ran with each `tally` (the workers run in this process).
static TALLY: std::sync::Mutex<std::collections::BTreeMap<String, u32>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// How many times `canvas.step` ran with `tally: key`.
fn runs(key: &str) -> u32 {
    TALLY
        .lock()
        .map(|t| t.get(key).copied().unwrap_or(0))
        .unwrap_or(0)
}

impl Task for Step {
    const NAME: &'static str = "canvas.step";
    const PARENT_RESULT: Option<&'static str> = Some("parent");
    type Args = Map<String, Value>;
    type Output = Map<String, Value>;

    async fn run(
        &self,
        ctx: TaskContext,
        mut kwargs: Self::Args,
    ) -> Result<Self::Output, TaskError> {
        if let Some(msg) = kwargs.get("fail").and_then(Value::as_str) {
            return Err(TaskError::permanent("StepFailure", msg.to_owned()));
        }
        if let Some(ms) = kwargs.get("sleep_ms").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(key) = kwargs.get("tally").and_then(Value::as_str) {
            if let Ok(mut tally) = TALLY.lock() {
                *tally.entry(key.to_owned()).or_default() += 1;
            }
        }
        if let Some(times) = kwargs.get("fail_times").and_then(Value::as_u64) {
            if u64::from(ctx.retries) < times {
                let after = kwargs
                    .get("retry_after_s")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.1);
                return Err(TaskError::transient("StepTransient", "not yet")
                    .retry_after(Duration::from_secs_f64(after)));
            }
            kwargs.insert("retries".into(), json!(ctx.retries));
        }
        Ok(kwargs)
    }
}

/// `canvas.on_error`: an errback. It receives the failed job's id and reads its failure.
struct OnError;

impl Task for OnError {
    const NAME: &'static str = "canvas.on_error";
    const PARENT_RESULT: Option<&'static str> = Some("failed_id");
    type Args = ErrbackArgs;
    type Output = Value;

    async fn run(&self, ctx: TaskContext, args: ErrbackArgs) -> Result<Value, TaskError> {
        let failure = ctx.failure_of(&args.failed_id).await?;
        Ok(json!({
            "failed_id": failure.id,
            "exc_type": failure.exc_type,
            "message": failure.message,
            "parent_id": ctx.parent_id,
        }))
    }
}

#[derive(serde::Deserialize)]
struct ErrbackArgs {
    failed_id: String,
}

fn registry() -> Registry {
    Registry::new()
        .register(Step)
        .register(OnError)
        .register(Echo)
}

/// Runs `tests/py/canvas.py SCENARIO` against a Rust worker running the canvas tasks; returns
/// what Python printed and the farm, for checks of its queues, before stopping it.
async fn python_canvas(scenario: &str) -> (Value, Farm) {
    python_canvas_with(scenario, &[]).await
}

async fn python_canvas_with(scenario: &str, extra: &[&str]) -> (Value, Farm) {
    python_canvas_on(scenario, extra, settings()).await
}

/// As [`python_canvas_with`], the worker and the Python producer configured as `settings`.
async fn python_canvas_on(scenario: &str, extra: &[&str], settings: Settings) -> (Value, Farm) {
    let farm = Farm::start(&format!("canvas-{scenario}"), settings, registry()).await;
    let env = python_env(&farm.settings);
    let mut args = vec![farm.queue.clone(), scenario.to_owned()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_python("canvas.py", &args, &env)
    })
    .await
    .expect("python ran");
    let v = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("canvas.py printed {out:?}: {e}"));
    (v, farm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_chain_of_three_runs_on_rust_with_parent_children_and_collect() {
    let (out, farm) = python_canvas("chain3").await;
    assert_eq!(out["first"]["ok"], json!({"a": 1}), "{out:#}");
    assert_eq!(
        out["middle"]["ok"],
        json!({"b": 2}),
        "immutable: no parent result: {out:#}"
    );
    assert_eq!(
        out["last"]["ok"],
        json!({"c": 3, "parent": {"b": 2}}),
        "{out:#}"
    );
    let ids = &out["ids"];
    assert_eq!(out["children"]["first"], json!([ids[1]]), "{out:#}");
    assert_eq!(out["children"]["middle"], json!([ids[2]]), "{out:#}");
    assert_eq!(out["children"]["last"], json!([]), "{out:#}");
    assert_eq!(
        out["collected"],
        json!([{"a": 1}, {"b": 2}, {"c": 3, "parent": {"b": 2}}]),
        "{out:#}"
    );
    assert_eq!(out["parent_ids"], json!([null, ids[0], ids[1]]), "{out:#}");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_link_gets_the_return_value() {
    let (out, farm) = python_canvas("link").await;
    assert_eq!(out["parent"]["ok"], json!({"l": 1}), "{out:#}");
    assert_eq!(
        out["children"],
        json!([{"ok": {"m": 2, "parent": {"l": 1}}, "state": "SUCCESS"}]),
        "{out:#}"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_chain_and_group_callbacks_get_the_return_value() {
    let (out, farm) = python_canvas("link-canvas").await;
    assert_eq!(out["parent"]["ok"], json!({"l": 1}), "{out:#}");
    let x = json!({"x": 1, "parent": {"l": 1}});
    assert_eq!(
        out["x"]["ok"], x,
        "the chain's first step got the value: {out:#}"
    );
    assert_eq!(
        out["y"]["ok"],
        json!({"y": 1, "parent": x}),
        "and its second the first's: {out:#}"
    );
    assert_eq!(out["group_type"], "GroupResult", "{out:#}");
    assert_eq!(
        out["group_values"],
        json!([{"u": 1, "parent": {"l": 2}}, {"v": 1, "parent": {"l": 2}}]),
        "{out:#}"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_link_error_reaches_a_rust_errback_with_the_typed_failure() {
    let (out, farm) = python_canvas("link-error").await;
    assert_eq!(out["failed"]["exc_type"], "StepFailure", "{out:#}");
    assert_eq!(
        out["errback"]["ok"],
        json!({
            "failed_id": out["failed_id"],
            "exc_type": "StepFailure",
            "message": "source is 61 MP; the limit is 50 MP",
            "parent_id": out["failed_id"],
        }),
        "{out:#}"
    );
    // The failure is dead-lettered as any final failure is.
    dead_letters(&farm.settings, &farm.queue, 1).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_chain_step_with_a_countdown_waits() {
    let (out, farm) = python_canvas("countdown").await;
    assert_eq!(
        out["last"]["ok"],
        json!({"b": 2, "parent": {"a": 1}}),
        "{out:#}"
    );
    let elapsed = out["elapsed"].as_f64().expect("elapsed");
    assert!(
        elapsed >= 1.9,
        "the step ran after {elapsed} s, before its countdown of 2 s"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_chain_whose_middle_step_is_retried_completes() {
    let (out, farm) = python_canvas("retried-middle").await;
    let middle = json!({"fail_times": 1, "retry_after_s": 0.2, "parent": {"a": 1}, "retries": 1});
    assert_eq!(out["middle"]["ok"], middle, "{out:#}");
    assert_eq!(
        out["last"]["ok"],
        json!({"c": 3, "parent": middle}),
        "{out:#}"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_canvas_fails_clearly_and_is_dead_lettered() {
    let (out, farm) = python_canvas("unsupported").await;
    let n = &out["nested_callback"];
    assert_eq!(n["exc_type"], "UnsupportedCanvas", "{out:#}");
    assert!(
        n["message"]
            .as_str()
            .unwrap_or("")
            .contains("embed `callbacks`[0] header is a group whose member 1 is a chord"),
        "{out:#}"
    );
    let x = &out["xmap_callback"];
    assert_eq!(x["exc_type"], "UnsupportedCanvas", "{out:#}");
    assert!(
        x["message"]
            .as_str()
            .unwrap_or("")
            .contains("embed `callbacks`[0] is Celery's xmap (task celery.map)"),
        "{out:#}"
    );
    let letters = dead_letters(&farm.settings, &farm.queue, 2).await;
    assert!(letters
        .iter()
        .all(|l| l.kind.as_deref() == Some("UnsupportedCanvas")));
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_cannot_take_a_parent_result_fails_naming_the_signature() {
    let (out, farm) = python_canvas("no-parent-kwarg").await;
    let last = &out["last"];
    assert_eq!(last["exc_type"], "InvalidArguments", "{out:#}");
    let message = last["message"].as_str().unwrap_or("");
    assert!(
        message
            .contains(r#"signature echo.echo([{"a":1}], {"b":2}) cannot take its parent's result"#)
            && message.contains(".si()"),
        "{out:#}"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_runs_across_rust_and_python_workers() {
    let pyq = unique_queue("canvas-py");
    let py = PythonWorker::start(&pyq);
    let (out, farm) = python_canvas_with("mixed", &[&pyq]).await;
    drop(py);
    let middle = json!({"worker": "python", "parent": {"a": 1}, "kwargs": {"w": 1}});
    assert_eq!(out["middle"]["ok"], middle, "{out:#}");
    assert_eq!(
        out["last"]["ok"],
        json!({"c": 3, "parent": middle}),
        "{out:#}"
    );
    assert_eq!(
        out["collected"],
        json!([{"a": 1}, middle, {"c": 3, "parent": middle}]),
        "{out:#}"
    );
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_errback_gets_the_failed_rust_jobs_id() {
    let pyq = unique_queue("canvas-pyerr");
    let py = PythonWorker::start(&pyq);
    let (out, farm) = python_canvas_with("python-errback", &[&pyq]).await;
    drop(py);
    assert_eq!(out["failed"]["exc_type"], "StepFailure", "{out:#}");
    assert_eq!(
        out["errback"]["ok"],
        json!({"task_id": out["failed_id"], "exc_type": "StepFailure", "message": "no such upload"}),
        "{out:#}"
    );
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_group_of_100_runs_on_rust_in_order_and_saves_and_restores() {
    let (out, farm) = python_canvas("group").await;
    let want: Vec<Value> = (0..100).map(|i| json!({"i": i})).collect();
    assert_eq!(out["values"], json!(want), "{out:#}");
    assert_eq!(out["restored"], json!(want), "{out:#}");
    assert_eq!(out["group_ids"], json!([out["group_id"]]), "{out:#}");
    farm.stop().await;
}

/// Checks what every completed chord of 100 Rust headers shows; returns the body's value.
fn chord_completed(out: &Value) -> &Value {
    let body = &out["body"];
    assert_eq!(body["state"], "SUCCESS", "{out:#}");
    assert_eq!(out["keys_left"], 0, "the join's keys are deleted: {out:#}");
    let parent = out["body_parent_id"]
        .as_str()
        .expect("the body has a parent");
    assert!(
        out["header_ids"]
            .as_array()
            .expect("header ids")
            .iter()
            .any(|h| h == parent),
        "the body's parent is the header that completed the chord: {out:#}"
    );
    &body["ok"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_of_100_on_rust_sends_its_rust_body_the_results_in_order() {
    let (out, farm) = python_canvas("chord-rust-body").await;
    let want: Vec<Value> = (0..100).map(|i| json!({"h": i})).collect();
    assert_eq!(
        chord_completed(&out),
        &json!({"body": 1, "parent": want}),
        "{out:#}"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_of_100_on_rust_sends_a_python_body_the_results_in_order() {
    let pyq = unique_queue("canvas-pybody");
    let py = PythonWorker::start(&pyq);
    let (out, farm) = python_canvas_with("chord-python-body", &[&pyq]).await;
    drop(py);
    let want: Vec<Value> = (0..100).map(|i| json!({"h": i})).collect();
    assert_eq!(
        chord_completed(&out),
        &json!({"worker": "python", "parent": want, "kwargs": {"w": 1}}),
        "{out:#}"
    );
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_whose_header_mixes_rust_and_python_workers_completes_once() {
    let pyq = unique_queue("canvas-pymix");
    let py = PythonWorker::start(&pyq);
    let (out, farm) = python_canvas_with("chord-mixed", &[&pyq]).await;
    drop(py);
    let body = &out["body"]["ok"];
    assert_eq!(out["body"]["state"], "SUCCESS", "{out:#}");
    assert_eq!(out["keys_left"], 0, "{out:#}");
    let results = body["parent"].as_array().expect("the results");
    assert_eq!(results.len(), 20, "{out:#}");
    for (i, r) in results.iter().enumerate() {
        if i % 2 == 1 {
            assert_eq!(r, &json!({"h": i}), "{out:#}");
        } else {
            assert_eq!(r["worker"], "python", "{out:#}");
            assert_eq!(r["kwargs"], json!({"h": i}), "{out:#}");
        }
    }
    // Exactly once: nothing else was published to the body's queue.
    assert_eq!(ready_count(&farm.settings, &farm.queue).await, 0);
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

/// Celery's `result_backend_transport_options = {"result_chord_ordered": False}` on the
/// producer, the Python worker and (as the same setting) the Rust worker: the header results
/// are joined in a list, in the order they ended, by whichever side completes the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unordered_chord_mixing_rust_and_python_headers_joins_in_arrival_order() {
    let mut s = settings();
    s.result_backend_transport_options.result_chord_ordered = false;
    let pyq = unique_queue("canvas-pyunordered");
    let py = PythonWorker::start_with(&pyq, &s);
    let (out, farm) = python_canvas_on("chord-mixed-unordered", &[&pyq], s).await;
    drop(py);
    assert_eq!(out["body"]["state"], "SUCCESS", "{out:#}");
    assert_eq!(out["keys_left"], 0, "{out:#}");
    let body = &out["body"]["ok"];
    assert_eq!(body["worker"], "python", "{out:#}");
    let results = body["parent"].as_array().expect("the results");
    assert_eq!(results.len(), 20, "{out:#}");
    let h = |r: &Value| r["h"].as_u64().or_else(|| r["kwargs"]["h"].as_u64());
    let mut seen: Vec<u64> = results.iter().filter_map(h).collect();
    // Header 0 sleeps while the other Rust headers (odd) run on the worker's other slots: in
    // arrival order it comes after all of them, where the ordered join puts it first. (The
    // Python headers may end later still: their worker starts with the test.)
    let position = |want: u64| seen.iter().position(|&x| x == want);
    let zero = position(0).expect("header 0's result");
    assert_eq!(results[zero], json!({"h": 0, "sleep_ms": 1500}), "{out:#}");
    for odd in (1..20).step_by(2) {
        assert!(
            position(odd) < Some(zero),
            "header {odd} ended before header 0: {seen:?}"
        );
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<u64>>(), "{out:#}");
    assert_eq!(ready_count(&farm.settings, &farm.queue).await, 0);
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_with_a_failing_header_fails_its_body_with_chord_error_and_calls_its_errback() {
    let (out, farm) = python_canvas("chord-failing-header").await;
    assert_eq!(out["via_parent"]["exc_type"], "StepFailure", "{out:#}");
    let body = &out["body"];
    assert_eq!(body["state"], "FAILURE", "{out:#}");
    assert_eq!(body["exc_type"], "ChordError", "{out:#}");
    let failed = out["failed_header"].as_str().expect("failed header id");
    let message = format!("Dependency {failed} raised StepFailure('frame 3 is corrupt')");
    assert_eq!(body["message"], json!(message), "{out:#}");
    assert_eq!(
        out["errback"]["ok"],
        json!({
            "failed_id": out["body_id"],
            "exc_type": "ChordError",
            "message": message,
            "parent_id": out["body_id"],
        }),
        "{out:#}"
    );
    farm.stop().await;
}

/// Celery 5.7's `_fail_chain`: the step after a chord whose header failed is stored as the
/// body's `ChordError`, so `.get()` on the chain's last result raises instead of waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chain_after_a_chord_whose_header_fails_fails_with_chord_error() {
    let (out, farm) = python_canvas("chain-chord-failing-header").await;
    let failed = out["failed_header"].as_str().expect("failed header id");
    let message = format!("Dependency {failed} raised StepFailure('frame 3 is corrupt')");
    // `.get()` on the returned result raises whichever it sees first: the failed header (it
    // walks the parents) or c's own ChordError; its `state` may be read before c's is stored.
    let raised = out["via_parents"]["exc_type"].as_str();
    assert!(
        matches!(raised, Some("StepFailure" | "ChordError")),
        "{out:#}"
    );
    for which in ["body", "last"] {
        assert_eq!(
            (
                &out[which]["state"],
                &out[which]["exc_type"],
                &out[which]["message"]
            ),
            (&json!("FAILURE"), &json!("ChordError"), &json!(message)),
            "{which}: {out:#}"
        );
    }
    assert_eq!(runs(&format!("{}/c", farm.queue)), 0, "c never ran");
    assert_eq!(ready_count(&farm.settings, &farm.queue).await, 0);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chain_whose_middle_step_fails_fails_the_steps_after_it() {
    let (out, farm) = python_canvas("failing-middle").await;
    for which in ["via_parents", "failed", "after", "last"] {
        assert_eq!(
            (
                &out[which]["state"],
                &out[which]["exc_type"],
                &out[which]["message"]
            ),
            (
                &json!("FAILURE"),
                &json!("StepFailure"),
                &json!("frame 7 is corrupt")
            ),
            "{which}: {out:#}"
        );
    }
    for step in ["c", "d"] {
        assert_eq!(
            runs(&format!("{}/{step}", farm.queue)),
            0,
            "{step} never ran"
        );
    }
    assert_eq!(ready_count(&farm.settings, &farm.queue).await, 0);
    farm.stop().await;
}

/// `chain(a, group(b, c), d, e)` from Python, as Celery sends it: the group and `d` upgraded to
/// a chord step in `a`'s chain. Checks what Python sees; returns the body's expected value.
fn chain_chord_completed(out: &Value, queue: &str, body: &Value) {
    let a = json!({"a": 1});
    let header = json!([{"b": 1, "parent": a}, {"c": 1, "parent": a}]);
    assert_eq!(out["first"]["ok"], a, "{out:#}");
    assert_eq!(
        out["header"],
        json!([{"ok": header[0], "state": "SUCCESS"}, {"ok": header[1], "state": "SUCCESS"}]),
        "each header task got a's value: {out:#}"
    );
    assert_eq!(out["body"]["ok"], *body, "{out:#}");
    assert_eq!(
        body["parent"], header,
        "the body got the header's results: {out:#}"
    );
    assert_eq!(
        out["last"]["ok"],
        json!({"e": 1, "tally": format!("{queue}/e"), "parent": body}),
        "the step after the chord ran on the body's value: {out:#}"
    );
    assert_eq!(out["header_groups"], json!([out["group_id"]]), "{out:#}");
    assert_eq!(
        out["first_children"],
        json!([["GroupResult", out["group_id"], out["header_ids"]]]),
        "a's children: the header's GroupResult: {out:#}"
    );
    assert_eq!(
        out["parent_ids"],
        json!([out["first_id"], out["first_id"], out["body_id"]]),
        "the header's parent is a, the last step's the body: {out:#}"
    );
    assert_eq!(out["keys_left"], 0, "the join's keys are deleted: {out:#}");
    assert_eq!(
        runs(&format!("{queue}/e")),
        1,
        "the last step ran exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chain_with_a_group_in_the_middle_runs_its_chord_step_on_rust() {
    let (out, farm) = python_canvas("chain-chord").await;
    let q = farm.queue.clone();
    let a = json!({"a": 1});
    let header = json!([{"b": 1, "parent": a}, {"c": 1, "parent": a}]);
    let body = json!({"d": 1, "tally": format!("{q}/d"), "parent": header});
    chain_chord_completed(&out, &q, &body);
    assert_eq!(runs(&format!("{q}/d")), 1, "the body ran exactly once");
    assert_eq!(ready_count(&farm.settings, &farm.queue).await, 0);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chain_with_a_group_in_the_middle_runs_its_chord_body_on_python() {
    let pyq = unique_queue("canvas-chainchord-py");
    let py = PythonWorker::start(&pyq);
    let (out, farm) = python_canvas_with("chain-chord-python-body", &[&pyq]).await;
    drop(py);
    let a = json!({"a": 1});
    let header = json!([{"b": 1, "parent": a}, {"c": 1, "parent": a}]);
    let body = json!({"worker": "python", "parent": header, "kwargs": {"w": 1}});
    chain_chord_completed(&out, &farm.queue, &body);
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chain_ending_in_a_group_sends_the_group_the_value() {
    let (out, farm) = python_canvas("chain-group").await;
    assert_eq!(out["type"], "GroupResult", "{out:#}");
    let a = json!({"a": 1});
    assert_eq!(out["first"]["ok"], a, "{out:#}");
    assert_eq!(
        out["values"],
        json!([{"b": 1, "parent": a}, {"c": 1, "parent": a}]),
        "{out:#}"
    );
    assert_eq!(out["group_ids"], json!([out["group_id"]]), "{out:#}");
    assert_eq!(
        out["first_children"],
        json!([["GroupResult", out["group_id"], out["member_ids"]]]),
        "{out:#}"
    );
    farm.stop().await;
}

/// What every `chord(header of 10, chain(b1, b2))` shows Python; returns b1's expected value.
fn chord_chain_body_completed(out: &Value) -> Value {
    let header: Vec<Value> = (0..10).map(|i| json!({ "h": i })).collect();
    let b1 = json!({"b1": 1, "parent": header});
    assert_eq!(
        out["b1"]["ok"], b1,
        "b1 got the header's results in order: {out:#}"
    );
    let headers = out["header_ids"].as_array().expect("header ids");
    assert!(
        headers.contains(&out["b1_parent_id"]),
        "b1's parent is a header task: {out:#}"
    );
    assert_eq!(out["header_type"], "GroupResult", "{out:#}");
    assert_eq!(
        out["last_group_id"], out["group_id"],
        "the chain's last step is in the chord's group, as Celery freezes it: {out:#}"
    );
    assert_eq!(out["keys_left"], 0, "the join's keys are deleted: {out:#}");
    b1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chord_whose_body_is_a_chain_runs_the_chain_on_rust() {
    let (out, farm) = python_canvas("chord-chain-body").await;
    let q = farm.queue.clone();
    let b1 = chord_chain_body_completed(&out);
    assert_eq!(
        out["last"]["ok"],
        json!({"b2": 1, "tally": format!("{q}/b2"), "parent": b1}),
        "{out:#}"
    );
    assert_eq!(runs(&format!("{q}/b2")), 1, "the chain ran once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ready_count(&farm.settings, &q).await, 0);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chord_whose_body_chain_ends_on_python_completes() {
    let pyq = unique_queue("canvas-chordchain-py");
    let py = PythonWorker::start(&pyq);
    let (out, farm) = python_canvas_with("chord-chain-body-mixed", &[&pyq]).await;
    drop(py);
    let b1 = chord_chain_body_completed(&out);
    assert_eq!(
        out["last"]["ok"],
        json!({"worker": "python", "parent": b1, "kwargs": {"w": 2}}),
        "{out:#}"
    );
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

/// The names of a chord's join keys still in Redis (`.c` aside) and what `.c` holds.
async fn join_keys(client: &Client, gid: &str) -> (Vec<String>, Option<String>) {
    let mut conn = client.backend().connection();
    let mut left = Vec::new();
    for k in [".j", ".t", ".s", ".d"] {
        let key = format!("celery-taskset-meta-{gid}{k}");
        let n: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("redis");
        if n > 0 {
            left.push(k.to_owned());
        }
    }
    let claim: Option<String> = redis::cmd("GET")
        .arg(format!("celery-taskset-meta-{gid}.c"))
        .query_async(&mut conn)
        .await
        .expect("redis");
    (left, claim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chord_whose_body_chain_has_options_of_its_own_runs_them_as_celery() {
    let pyq = unique_queue("canvas-chainopts-py");
    let py = PythonWorker::start(&pyq);
    let (out, farm) = python_canvas_with("chord-chain-body-options", &[&pyq]).await;
    drop(py);
    let q = farm.queue.clone();
    let header: Vec<Value> = (0..5).map(|i| json!({ "h": i })).collect();
    // The chain's `queue` moved its first step (sent to the Rust queue) to the Python worker.
    let b1 = json!({"worker": "python", "parent": header, "kwargs": {"w": 1}});
    assert_eq!(out["b1"]["ok"], b1, "{out:#}");
    let last = json!({"b2": 1, "tally": format!("{q}/b2"), "parent": b1});
    assert_eq!(out["last"]["ok"], last, "{out:#}");
    // Its `link` went to its last step.
    assert_eq!(
        out["callback"]["ok"],
        json!({"cb": 1, "parent": last}),
        "{out:#}"
    );
    assert_eq!(runs(&format!("{q}/b2")), 1);
    // After a failed header the chain's id fails and its own `link_error` runs.
    let failed = &out["failed_last"];
    assert_eq!(failed["exc_type"], "ChordError", "{out:#}");
    assert_eq!(
        out["failed_errback"]["ok"]["failed_id"], out["failed_last_id"],
        "{out:#}"
    );
    assert_eq!(
        out["failed_errback"]["ok"]["exc_type"], "ChordError",
        "{out:#}"
    );
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chord_whose_body_is_a_group_sends_each_member_the_results() {
    let pyq = unique_queue("canvas-groupbody-py");
    let py = PythonWorker::start(&pyq);
    let (out, farm) = python_canvas_with("chord-group-body", &[&pyq]).await;
    drop(py);
    let q = farm.queue.clone();
    let header: Vec<Value> = (0..5).map(|i| json!({ "h": i })).collect();
    assert_eq!(out["type"], "GroupResult", "{out:#}");
    assert_eq!(
        out["values"],
        json!([
            {"x": 1, "parent": header},
            {"worker": "python", "parent": header, "kwargs": {"w": 1}},
            {"y": 1, "tally": format!("{q}/y"), "parent": header},
        ]),
        "every member got the header's results, in order: {out:#}"
    );
    let gid = &out["group_id"];
    assert_eq!(out["member_groups"], json!([gid, gid, gid]), "{out:#}");
    assert_eq!(runs(&format!("{q}/y")), 1, "the body ran once");
    assert_eq!(out["keys_left"], 0, "{out:#}");
    assert_eq!(out["claim"], "done", "{out:#}");
    // A failed header: each member fails with the header's own exception, as Celery's
    // `_handle_group_chord_error` stores it, the group too, and the member's errback runs.
    for m in out["failed_members"].as_array().expect("members") {
        assert_eq!(m["state"], "FAILURE", "{out:#}");
        assert_eq!(m["exc_type"], "StepFailure", "{out:#}");
        assert_eq!(m["message"], "frame 3 is corrupt", "{out:#}");
    }
    assert_eq!(out["failed_group"]["exc_type"], "StepFailure", "{out:#}");
    assert_eq!(
        out["failed_errback"]["ok"]["failed_id"], out["failed_member_ids"][0],
        "{out:#}"
    );
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_chord_whose_body_is_a_chord_joins_both() {
    let (out, farm) = python_canvas("chord-chord-body").await;
    let q = farm.queue.clone();
    let header: Vec<Value> = (0..5).map(|i| json!({ "h": i })).collect();
    assert_eq!(
        out["last"]["ok"],
        json!({"z": 1, "tally": format!("{q}/z"), "parent": [
            {"x": 1, "parent": header}, {"y": 1, "parent": header}]}),
        "{out:#}"
    );
    assert_eq!(runs(&format!("{q}/z")), 1, "the inner body ran once");
    let failed = &out["failed_last"];
    assert_eq!(failed["exc_type"], "ChordError", "{out:#}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or("")
            .contains("raised StepFailure('frame 3 is corrupt')"),
        "{out:#}"
    );
    assert_eq!(
        out["failed_errback"]["ok"]["failed_id"], out["failed_last_id"],
        "{out:#}"
    );
    // `chain(a, chord([h1, h2], group(x1, x2)), z)`, sent as a chord whose body is a chord.
    let a = json!({"a": 1});
    let hs = json!([{"h": 1, "parent": a}, {"h": 2, "parent": a}]);
    assert_eq!(
        out["chain_last"]["ok"],
        json!({"z": 2, "tally": format!("{q}/z2"), "parent": [
            {"x": 1, "parent": hs}, {"x": 2, "parent": hs}]}),
        "{out:#}"
    );
    assert_eq!(runs(&format!("{q}/z2")), 1);
    farm.stop().await;
}

/// Celery 5.7's join marks a chord whose body was sent (`.c` = `done`) so that a copy of a
/// header arriving later is ignored. A chord joined by Python, then a late header on Rust; and
/// one joined by Rust, then a late header on Python: neither starts the chord's keys again,
/// and neither body runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_header_is_ignored_once_python_or_rust_sent_the_body() {
    let pyq = unique_queue("canvas-late-py");
    let py = PythonWorker::start(&pyq);
    let farm = Farm::start("canvas-late", settings(), registry()).await;
    let q = farm.queue.clone();
    let echo = |queue: &str, i: i64| {
        Signature::new("echo.echo", mediafarm_tests::kwargs(json!({ "i": i }))).queue(queue)
    };
    for (joins, late, name) in [(&pyq, &q, "python"), (&q, &pyq, "rust")] {
        let tally = format!("{q}/late-{name}");
        let plan = chord(
            (0..3).map(|i| echo(joins, i)),
            rust_step(&q, json!({ "tally": tally })),
        )
        .plan(chrono::Utc::now())
        .expect("plan");
        let gid = plan.group_id.clone();
        farm.client
            .backend()
            .chord_set_size(&gid, plan.size, false)
            .await
            .expect("size");
        let msgs: Vec<_> = plan.publish.iter().map(|(_, m)| m.clone()).collect();
        farm.client.publish_batch(joins, &msgs).await.expect("sent");
        farm.client
            .result(&plan.body_id)
            .get(Duration::from_secs(60))
            .await
            .expect("the body ran");
        // The join deletes its keys once the body is published, which may be after the body
        // ran: wait for that.
        let done = (Vec::new(), Some("done".to_owned()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while join_keys(&farm.client, &gid).await != done && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            join_keys(&farm.client, &gid).await,
            done,
            "joined by {name}: keys deleted, the claim marked done"
        );
        // A copy of header 0 (its own id, to wait for it) on the other side.
        let mut copy = msgs[0].clone();
        copy.id = new_id("late");
        farm.client
            .publish_batch(late, std::slice::from_ref(&copy))
            .await
            .expect("sent");
        farm.client
            .result(&copy.id)
            .get(Duration::from_secs(60))
            .await
            .expect("the late copy ran");
        assert_eq!(
            join_keys(&farm.client, &gid).await,
            done,
            "a late header after {name} joined: nothing joined again"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(runs(&tally), 1, "the body ran once");
    }
    drop(py);
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

// Workflows sent by the Rust producer API (`mediafarm::client::workflow`) and by
// `mediafarm submit --workflow`.

fn rust_step(queue: &str, kwargs: Value) -> Signature {
    Signature::new("canvas.step", mediafarm_tests::kwargs(kwargs)).queue(queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chain_runs_on_rust_workers_with_parents_and_ids_kept() {
    let farm = Farm::start("canvas-rs-chain", settings(), registry()).await;
    let q = farm.queue.clone();
    let last = chain([
        rust_step(&q, json!({"a": 1})),
        rust_step(&q, json!({"b": 2}))
            .si()
            .task_id(new_id("middle")),
        rust_step(&q, json!({"c": 3})),
    ])
    .apply_async(&farm.client)
    .await
    .expect("sent");
    let t = Duration::from_secs(30);
    let got = last.get(t).await.expect("the chain ends");
    assert_eq!(got, json!({"c": 3, "parent": {"b": 2}}));
    let middle = last.parent().expect("the middle step");
    assert!(middle.id.starts_with("middle"), "{}", middle.id);
    assert_eq!(middle.get(t).await.expect("middle"), json!({"b": 2}));
    let first = middle.parent().expect("the first step");
    assert_eq!(first.get(t).await.expect("first"), json!({"a": 1}));
    assert!(first.parent().is_none());
    let meta = last.meta().await.expect("read").expect("stored");
    assert_eq!(meta.extra["parent_id"], json!(middle.id));
    let meta = first.meta().await.expect("read").expect("stored");
    assert_eq!(
        meta.children,
        vec![json!([[middle.id, null], null])],
        "children as Celery stores them"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chain_with_a_group_in_the_middle_runs_through_its_chord() {
    let farm = Farm::start("canvas-rs-chainchord", settings(), registry()).await;
    let q = farm.queue.clone();
    let last = chain([
        ChainStep::from(rust_step(&q, json!({"a": 1}))),
        group([
            rust_step(&q, json!({"b": 1})),
            rust_step(&q, json!({"c": 1})),
        ])
        .into(),
        rust_step(&q, json!({"d": 1})).into(),
        rust_step(&q, json!({"e": 1, "tally": format!("{q}/e")})).into(),
    ])
    .apply_async(&farm.client)
    .await
    .expect("sent");
    let t = Duration::from_secs(30);
    let a = json!({"a": 1});
    let body = json!({"d": 1, "parent": [{"b": 1, "parent": a}, {"c": 1, "parent": a}]});
    assert_eq!(
        last.get(t).await.expect("the chain ends"),
        json!({"e": 1, "tally": format!("{q}/e"), "parent": body})
    );
    let d = last.parent().expect("the chord's body");
    assert_eq!(d.get(t).await.expect("the body"), body);
    assert_eq!(runs(&format!("{q}/e")), 1);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chain_ending_in_a_group_sends_the_group_the_value() {
    let farm = Farm::start("canvas-rs-chaingroup", settings(), registry()).await;
    let q = farm.queue.clone();
    let c = chain([
        ChainStep::from(rust_step(&q, json!({"a": 1}))),
        group([
            rust_step(&q, json!({"b": 1})),
            rust_step(&q, json!({"c": 1})).si(),
        ])
        .into(),
    ]);
    let Err(err) = c.apply_async(&farm.client).await else {
        panic!("a chain ending in a group has no one task's result")
    };
    assert!(err.to_string().contains("apply_async_group"), "{err}");
    let g = c.apply_async_group(&farm.client).await.expect("sent");
    let t = Duration::from_secs(30);
    let a = json!({"a": 1});
    assert_eq!(
        g.get(t).await.expect("the group ends"),
        vec![json!({"b": 1, "parent": a}), json!({"c": 1})]
    );
    let first = g.parent().expect("the first step");
    assert_eq!(first.get(t).await.expect("first"), a);
    let meta = first.meta().await.expect("read").expect("stored");
    let members: Vec<Value> = g
        .results
        .iter()
        .map(|r| json!([[r.id, null], null]))
        .collect();
    assert_eq!(
        meta.children,
        vec![json!([[g.id, null], members])],
        "the group recorded as Celery's GroupResult"
    );
    for r in &g.results {
        let meta = r.meta().await.expect("read").expect("stored");
        assert_eq!(meta.extra["group_id"], json!(g.id));
    }
    farm.stop().await;
}

/// The Rust producer's chain ending in a group, carried out by Python Celery's worker: the
/// wire form is Celery's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chain_ending_in_a_group_runs_on_a_python_worker() {
    let pyq = unique_queue("canvas-rs-pygroup");
    let py = PythonWorker::start(&pyq);
    let client = Client::connect(&settings()).await.expect("client");
    let wrap = |w: i64| {
        Signature::new("pyside.wrap", mediafarm_tests::kwargs(json!({ "w": w }))).queue(&pyq)
    };
    let g = chain([
        ChainStep::from(wrap(1).args(vec![json!("upload-7")])),
        group([wrap(2), wrap(3)]).into(),
    ])
    .apply_async_group(&client)
    .await
    .expect("sent");
    let got = g
        .get(Duration::from_secs(60))
        .await
        .expect("the group ends on Python");
    let first = json!({"worker": "python", "parent": "upload-7", "kwargs": {"w": 1}});
    let h = |w: i64| json!({"worker": "python", "parent": first, "kwargs": {"w": w}});
    assert_eq!(got, vec![h(2), h(3)]);
    drop(py);
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chord_whose_body_is_a_chain_runs_on_rust_workers() {
    let farm = Farm::start("canvas-rs-chordchain", settings(), registry()).await;
    let q = farm.queue.clone();
    let header = (0..5).map(|i| rust_step(&q, json!({ "i": i })));
    let body = chain([
        rust_step(&q, json!({"b1": 1})),
        rust_step(&q, json!({"b2": 1, "tally": format!("{q}/b2")})),
    ]);
    let c = chord(header, body)
        .apply_async(&farm.client)
        .await
        .expect("sent");
    let t = Duration::from_secs(60);
    let results: Vec<Value> = (0..5).map(|i| json!({ "i": i })).collect();
    let b1 = json!({"b1": 1, "parent": results});
    assert_eq!(
        c.body.get(t).await.expect("the body chain ends"),
        json!({"b2": 1, "tally": format!("{q}/b2"), "parent": b1})
    );
    let first = c.body.parent().expect("the chain's first step");
    assert_eq!(first.get(t).await.expect("b1"), b1);
    let meta = c.body.meta().await.expect("read").expect("stored");
    assert_eq!(
        meta.extra["group_id"],
        json!(c.header.id),
        "in the chord's group"
    );
    assert_eq!(runs(&format!("{q}/b2")), 1);
    farm.stop().await;
}

/// `chord(header, group(x, w))` from the Rust producer: the join sends each task of the group
/// the header's results, `x` on a Rust worker and `w` on a Python one, in the group's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chord_whose_body_is_a_group_runs_on_rust_and_python_workers() {
    let pyq = unique_queue("canvas-rs-chordgroup-py");
    let py = PythonWorker::start(&pyq);
    let farm = Farm::start("canvas-rs-chordgroup", settings(), registry()).await;
    let q = farm.queue.clone();
    let header = (0..3).map(|i| rust_step(&q, json!({ "i": i })));
    let wrap = Signature::new("pyside.wrap", mediafarm_tests::kwargs(json!({"w": 1}))).queue(&pyq);
    let body = group([
        rust_step(&q, json!({"x": 1, "tally": format!("{q}/x")})),
        wrap,
    ]);
    let c = chord(header, body)
        .apply_async(&farm.client)
        .await
        .expect("sent");
    let t = Duration::from_secs(60);
    let results: Vec<Value> = (0..3).map(|i| json!({ "i": i })).collect();
    let got = c.get(t).await.expect("the group body ran");
    assert_eq!(
        got,
        json!([
            {"x": 1, "tally": format!("{q}/x"), "parent": results},
            {"worker": "python", "parent": results, "kwargs": {"w": 1}},
        ])
    );
    let g = c.body_group.as_ref().expect("a group body");
    assert_eq!(g.id, c.body.id);
    for r in &g.results {
        let meta = r.meta().await.expect("read").expect("stored");
        assert_eq!(meta.extra["group_id"], json!(g.id), "in the body's group");
    }
    assert_eq!(runs(&format!("{q}/x")), 1);
    drop(py);
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

/// `chord(header, chord(h2, z))` as `mediafarm submit --workflow` JSON: the join sends the
/// inner chord's header the outer results, its join sends `z` the inner results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_workflow_chord_whose_body_is_a_chord_runs_on_rust_workers() {
    let farm = Farm::start("canvas-rs-chordchord", settings(), registry()).await;
    let q = farm.queue.clone();
    let sig = |kw: Value| json!({"task": "canvas.step", "kwargs": kw, "options": {"queue": q}});
    let w = mediafarm::client::Workflow::from_json(&json!({"chord": {
        "header": [sig(json!({"h": 0})), sig(json!({"h": 1}))],
        "body": {"chord": {
            "header": [sig(json!({"x": 1})), sig(json!({"y": 1}))],
            "body": sig(json!({"z": 1, "tally": format!("{q}/z")})),
        }},
    }}))
    .expect("reads");
    let r = w.apply_async(&farm.client).await.expect("sent");
    let outer = json!([{"h": 0}, {"h": 1}]);
    assert_eq!(
        r.get(Duration::from_secs(60)).await.expect("z ran"),
        json!({"z": 1, "tally": format!("{q}/z"), "parent": [
            {"x": 1, "parent": outer}, {"y": 1, "parent": outer}]})
    );
    assert_eq!(runs(&format!("{q}/z")), 1, "z ran once");
    assert_eq!(ready_count(&farm.settings, &farm.queue).await, 0);
    farm.stop().await;
}

/// Python Celery's worker joins a Rust-produced chord whose body is a chain: it reads the
/// chain from the header's `chord` embed and runs it, as for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chord_whose_body_is_a_chain_is_joined_by_python_celery() {
    let pyq = unique_queue("canvas-rs-pychordchain");
    let py = PythonWorker::start(&pyq);
    let client = Client::connect(&settings()).await.expect("client");
    let header = (0..3).map(|i| {
        Signature::new("echo.echo", mediafarm_tests::kwargs(json!({ "i": i }))).queue(&pyq)
    });
    let wrap = |w: i64| {
        Signature::new("pyside.wrap", mediafarm_tests::kwargs(json!({ "w": w }))).queue(&pyq)
    };
    let c = chord(header, chain([wrap(1), wrap(2)]))
        .apply_async(&client)
        .await
        .expect("sent");
    let got = c
        .body
        .get(Duration::from_secs(60))
        .await
        .expect("the body chain ran");
    assert_eq!(got["kwargs"], json!({"w": 2}), "{got:#}");
    let b1 = &got["parent"];
    assert_eq!(b1["kwargs"], json!({"w": 1}), "{got:#}");
    let parents: Vec<Value> = b1["parent"]
        .as_array()
        .expect("the header's results")
        .iter()
        .map(|r| r["kwargs"].clone())
        .collect();
    assert_eq!(
        parents,
        [json!({"i": 0}), json!({"i": 1}), json!({"i": 2})],
        "{got:#}"
    );
    drop(py);
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_group_runs_on_rust_workers_in_order() {
    let farm = Farm::start("canvas-rs-group", settings(), registry()).await;
    let q = farm.queue.clone();
    let g = group((0..20).map(|i| rust_step(&q, json!({ "i": i }))))
        .apply_async(&farm.client)
        .await
        .expect("sent");
    assert_eq!(g.results.len(), 20);
    let got = g.get(Duration::from_secs(30)).await.expect("all end");
    let want: Vec<Value> = (0..20).map(|i| json!({ "i": i })).collect();
    assert_eq!(got, want, "results in the group's order");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chain_runs_on_a_python_worker() {
    let pyq = unique_queue("canvas-rs-py");
    let py = PythonWorker::start(&pyq);
    let client = Client::connect(&settings()).await.expect("client");
    let last = chain([
        Signature::new("pyside.wrap", mediafarm_tests::kwargs(json!({"w": 1})))
            .args(vec![json!("upload-7")])
            .queue(&pyq),
        Signature::new("pyside.wrap", mediafarm_tests::kwargs(json!({"w": 2}))).queue(&pyq),
        Signature::new("echo.echo", mediafarm_tests::kwargs(json!({"e": 3})))
            .si()
            .queue(&pyq),
    ])
    .apply_async(&client)
    .await
    .expect("sent");
    let t = Duration::from_secs(60);
    let got = last.get(t).await.expect("the chain ends on Python");
    assert_eq!(got["worker"], "python", "{got:#}");
    assert_eq!(got["kwargs"], json!({"e": 3}), "immutable: {got:#}");
    let first = json!({"worker": "python", "parent": "upload-7", "kwargs": {"w": 1}});
    let middle = last.parent().expect("middle");
    assert_eq!(
        middle.get(t).await.expect("middle"),
        json!({"worker": "python", "parent": first, "kwargs": {"w": 2}})
    );
    drop(py);
    delete_queue(&settings(), &pyq).await;
}

/// The Rust producer's chord step, carried out by Python Celery's worker (its `_chord.run` and
/// its Redis join): the wire form is Celery's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chain_with_a_group_in_the_middle_runs_on_a_python_worker() {
    let pyq = unique_queue("canvas-rs-pychord");
    let py = PythonWorker::start(&pyq);
    let client = Client::connect(&settings()).await.expect("client");
    let wrap = |w: i64| {
        Signature::new("pyside.wrap", mediafarm_tests::kwargs(json!({ "w": w }))).queue(&pyq)
    };
    let last = chain([
        ChainStep::from(wrap(1).args(vec![json!("upload-7")])),
        group([wrap(2), wrap(3)]).into(),
        wrap(4).into(),
    ])
    .apply_async(&client)
    .await
    .expect("sent");
    let got = last
        .get(Duration::from_secs(60))
        .await
        .expect("the chain ends on Python");
    let first = json!({"worker": "python", "parent": "upload-7", "kwargs": {"w": 1}});
    let h = |w: i64| json!({"worker": "python", "parent": first, "kwargs": {"w": w}});
    assert_eq!(
        got,
        json!({"worker": "python", "parent": [h(2), h(3)], "kwargs": {"w": 4}})
    );
    drop(py);
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chain_runs_across_rust_and_python_workers() {
    let pyq = unique_queue("canvas-rs-mixed");
    let py = PythonWorker::start(&pyq);
    let farm = Farm::start("canvas-rs-mixed", settings(), registry()).await;
    let q = farm.queue.clone();
    let last = chain([
        rust_step(&q, json!({"a": 1})),
        Signature::new("pyside.wrap", mediafarm_tests::kwargs(json!({"w": 1}))).queue(&pyq),
        rust_step(&q, json!({"c": 3})),
    ])
    .apply_async(&farm.client)
    .await
    .expect("sent");
    let middle = json!({"worker": "python", "parent": {"a": 1}, "kwargs": {"w": 1}});
    assert_eq!(
        last.get(Duration::from_secs(60)).await.expect("ends"),
        json!({"c": 3, "parent": middle})
    );
    drop(py);
    farm.stop().await;
    delete_queue(&settings(), &pyq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mediafarm_submit_workflow_runs_a_chain_and_prints_the_last_result() {
    let farm = Farm::start("canvas-cli", settings(), registry()).await;
    let q = &farm.queue;
    let workflow = json!({"chain": [
        {"task": "canvas.step", "kwargs": {"a": 1}, "options": {"queue": q}},
        {"task": "canvas.step", "kwargs": {"b": 2}, "options": {"queue": q}},
        {"task": "canvas.step", "kwargs": {"c": 3}, "options": {"queue": q}, "immutable": true},
    ]});
    let dir = mediafarm_tests::temp_dir("canvas-cli");
    let file = dir.join("workflow.json");
    std::fs::write(&file, workflow.to_string()).expect("written");
    let (broker, backend) = (
        farm.settings.broker_url.clone(),
        farm.settings.result_backend.clone(),
    );
    let run = move |args: Vec<String>, stdin: Option<String>| {
        submit_workflow(&dir, &broker, &backend, &args, stdin)
    };
    let run2 = run.clone();
    let run3 = run.clone();
    let from_file = {
        let file = file.display().to_string();
        tokio::task::spawn_blocking(move || run(vec!["--workflow".into(), file], None))
    };
    let out = from_file.await.expect("ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{out:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_str(&stdout).expect("JSON printed");
    assert_eq!(got, json!({"c": 3}), "the chain's last result");

    // A chain ending in a group: the group's results, in order.
    let to_group = json!({"chain": [
        {"task": "canvas.step", "kwargs": {"a": 1}, "options": {"queue": q}},
        {"group": [
            {"task": "canvas.step", "kwargs": {"b": 1}, "options": {"queue": q}},
            {"task": "canvas.step", "kwargs": {"c": 1}, "options": {"queue": q}},
        ]},
    ]});
    let out = tokio::task::spawn_blocking(move || {
        run3(
            vec!["--workflow".into(), "-".into()],
            Some(to_group.to_string()),
        )
    })
    .await
    .expect("ran");
    assert!(
        out.status.success(),
        "{out:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("JSON printed");
    assert_eq!(
        got,
        json!([{"b": 1, "parent": {"a": 1}}, {"c": 1, "parent": {"a": 1}}]),
        "the group's results"
    );

    // From stdin, with a step that fails: exit 1 naming the failed job.
    let failing = json!({"chain": [
        {"task": "canvas.step", "kwargs": {"a": 1}, "options": {"queue": q}},
        {"task": "canvas.step", "kwargs": {"fail": "no such upload"}, "options": {"queue": q}},
    ]});
    let out = tokio::task::spawn_blocking(move || {
        run2(
            vec!["--workflow".into(), "-".into()],
            Some(failing.to_string()),
        )
    })
    .await
    .expect("ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("StepFailure: no such upload"), "{stderr}");

    // Several workflows on one stdin: each is sent (and its id printed) as soon as the line
    // that ends it is read, while the next is still to be written; a pretty-printed one as
    // well as one per line.
    let first = json!({"chain": [
        {"task": "canvas.step", "kwargs": {"a": 1}, "options": {"queue": q}},
        {"task": "canvas.step", "kwargs": {"b": 2}, "options": {"queue": q}},
    ]});
    let second = json!({"task": "canvas.step", "kwargs": {"c": 3}, "options": {"queue": q}});
    let mut child = std::process::Command::new(mediafarm_tests::binary("mediafarm"))
        .args(["submit", "--workflow", "-"])
        .env("MEDIAFARM_BROKER_URL", &farm.settings.broker_url)
        .env("MEDIAFARM_RESULT_BACKEND", &farm.settings.result_backend)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mediafarm runs");
    let mut input = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (ids_tx, mut ids) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = ids_tx.send(line);
        }
    });
    {
        use std::io::Write;
        let pretty = serde_json::to_string_pretty(&first).expect("JSON");
        writeln!(input, "{pretty}").expect("stdin");
        input.flush().expect("stdin");
    }
    async fn next_id(ids: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) -> String {
        let line = tokio::time::timeout(Duration::from_secs(30), ids.recv()).await;
        line.expect(what).expect("a line")
    }
    let first_id = next_id(
        &mut ids,
        "the first workflow's id is printed before stdin ends",
    )
    .await;
    assert_eq!(
        farm.client
            .result(&first_id)
            .get(Duration::from_secs(30))
            .await
            .expect("the first workflow ran while stdin was still open"),
        json!({"b": 2, "parent": {"a": 1}})
    );
    {
        use std::io::Write;
        writeln!(input, "\n{second}").expect("stdin");
    }
    drop(input);
    let second_id = next_id(&mut ids, "the second id").await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("joined")
        .expect("mediafarm ends");
    assert!(
        out.status.success(),
        "{out:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        farm.client
            .result(&second_id)
            .get(Duration::from_secs(30))
            .await
            .expect("the second workflow ran"),
        json!({"c": 3})
    );
    farm.stop().await;
}

/// Runs `mediafarm submit --wait --timeout 30 ARGS` in `dir`, writing `stdin` to it.
fn submit_workflow(
    dir: &std::path::Path,
    broker: &str,
    backend: &str,
    args: &[String],
    stdin: Option<String>,
) -> std::process::Output {
    let mut child = std::process::Command::new(mediafarm_tests::binary("mediafarm"))
        .current_dir(dir)
        .args(["submit", "--wait", "--timeout", "30"])
        .args(args)
        .env("MEDIAFARM_BROKER_URL", broker)
        .env("MEDIAFARM_RESULT_BACKEND", backend)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mediafarm runs");
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        input.write_all(text.as_bytes()).expect("stdin");
    }
    child.wait_with_output().expect("mediafarm ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chord_is_joined_by_rust_workers_and_its_body_runs_once() {
    let farm = Farm::start("canvas-rs-chord-rs", settings(), registry()).await;
    let q = farm.queue.clone();
    let header = (0..30).map(|i| rust_step(&q, json!({ "i": i })));
    let c = chord(header, rust_step(&q, json!({"body": true})))
        .apply_async(&farm.client)
        .await
        .expect("sent");
    let got = c
        .body
        .get(Duration::from_secs(60))
        .await
        .expect("the body ran");
    let want: Vec<Value> = (0..30).map(|i| json!({ "i": i })).collect();
    assert_eq!(got["parent"], json!(want), "the header's results in order");
    assert_eq!(got["body"], json!(true));
    // The join ran once: nothing else was queued, and the chord's counters are gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ready_count(&farm.settings, &q).await, 0);
    let mut conn = farm.client.backend().connection();
    let gid = c.header.id.clone();
    let left: i64 = redis::cmd("EXISTS")
        .arg(format!("celery-taskset-meta-{gid}.j"))
        .arg(format!("celery-taskset-meta-{gid}.s"))
        .query_async(&mut conn)
        .await
        .expect("redis");
    assert_eq!(left, 0, "the chord's keys are deleted after the join");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_header_refused_before_it_runs_still_fails_its_body() {
    // A header no worker can run (an unknown task) is refused before it runs; the chord must
    // still hear of it, or its body would wait for ever.
    let farm = Farm::start("canvas-rs-chord-refused", settings(), registry()).await;
    let q = farm.queue.clone();
    let refused = Signature::new("canvas.no_such_task", mediafarm_tests::kwargs(json!({})))
        .queue(&q)
        .task_id(new_id("refused"));
    let header = (0..3)
        .map(|i| rust_step(&q, json!({ "i": i })))
        .chain([refused]);
    let c = chord(header, rust_step(&q, json!({"body": true})))
        .apply_async(&farm.client)
        .await
        .expect("sent");
    let err = c
        .body
        .get(Duration::from_secs(60))
        .await
        .expect_err("the body fails");
    let meta = c.body.meta().await.expect("read").expect("stored");
    assert_eq!(meta.status, TaskState::Failure, "{err}");
    let failure = meta.error().expect("a failure");
    assert_eq!(failure.exc_type, "ChordError", "{failure:?}");
    assert!(
        failure.message.contains("refused") && failure.message.contains("NotRegistered"),
        "the body's error names the refused header: {failure:?}"
    );
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_produced_chord_is_joined_by_python_celery_from_its_size_key() {
    // Python Celery's Redis backend joins the chord: it reads the header size the producer set
    // at celery-taskset-meta-<gid>.s and the body from each header's `chord` embed.
    let pyq = unique_queue("canvas-rs-chord");
    let py = PythonWorker::start(&pyq);
    let client = Client::connect(&settings()).await.expect("client");
    let header = (0..3).map(|i| {
        Signature::new("echo.echo", mediafarm_tests::kwargs(json!({ "i": i }))).queue(&pyq)
    });
    let body = Signature::new("pyside.wrap", mediafarm_tests::kwargs(json!({"w": 1}))).queue(&pyq);
    let c = chord(header, body)
        .apply_async(&client)
        .await
        .expect("sent");
    let got = c
        .body
        .get(Duration::from_secs(60))
        .await
        .expect("the body ran");
    let parents: Vec<Value> = got["parent"]
        .as_array()
        .expect("the header's results")
        .iter()
        .map(|r| r["kwargs"].clone())
        .collect();
    assert_eq!(
        parents,
        [json!({"i": 0}), json!({"i": 1}), json!({"i": 2})],
        "{got:#}"
    );
    assert_eq!(got["kwargs"], json!({"w": 1}), "{got:#}");
    assert_eq!(c.header.results.len(), 3);
    drop(py);
    delete_queue(&settings(), &pyq).await;
}

/// A job that sends a chord step and runs again after the chord finished (delivered again:
/// its result was never stored, as when its worker dies between sending the header and
/// storing) sends the same chord again. The chord was marked started, so its size is not set
/// again: the header's copies run and join a chord with no size, and the body does not run a
/// second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_run_again_after_its_chord_finished_does_not_run_the_body_twice() {
    let farm = Farm::start("canvas-chord-rerun", settings(), registry()).await;
    let q = farm.queue.clone();
    let (header_key, body_key) = (format!("{q}/header"), format!("{q}/body"));
    let plan = chain([
        ChainStep::from(rust_step(&q, json!({"a": 1}))),
        group([
            rust_step(&q, json!({"b": 1, "tally": header_key})),
            rust_step(&q, json!({"c": 1})),
        ])
        .into(),
        rust_step(&q, json!({"d": 1, "tally": body_key})).into(),
    ])
    .plan(chrono::Utc::now())
    .expect("plan");
    farm.client
        .publish_batch(&q, std::slice::from_ref(&plan.msg))
        .await
        .expect("sent");
    let body = farm.client.result(plan.ids.last().expect("the body's id"));
    body.get(Duration::from_secs(30))
        .await
        .expect("the body ran");
    assert_eq!((runs(&header_key), runs(&body_key)), (1, 1));
    // The body's result does not mean the first job has stored its own: that job stores it
    // after RabbitMQ confirms the header it sent (Celery's order), and RabbitMQ delivers a
    // message before it confirms it, so the whole chord can end first. Deleting the record
    // before it is written would leave the rerun below to find it and rightly skip the job.
    farm.client
        .result(&plan.msg.id)
        .get(Duration::from_secs(30))
        .await
        .expect("the first job's result is stored");

    // The first job again, its result gone, delivered a second time (from a queue of its own,
    // taken once and returned unacknowledged, so RabbitMQ marks it redelivered).
    let mut conn = farm.client.backend().connection();
    let deleted: u32 = redis::cmd("DEL")
        .arg(format!("celery-task-meta-{}", plan.msg.id))
        .query_async(&mut conn)
        .await
        .expect("redis");
    assert_eq!(deleted, 1, "the first job's result was there to delete");
    let again = unique_queue("canvas-chord-rerun-again");
    farm.client
        .publish_batch(&again, std::slice::from_ref(&plan.msg))
        .await
        .expect("sent again");
    let amqp = mediafarm::amqp::broker::connect(&farm.settings, "test redelivery")
        .await
        .expect("amqp");
    let ch = amqp.create_channel().await.expect("channel");
    let got = ch
        .basic_get(
            again.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .expect("basic.get")
        .expect("the message waits");
    got.delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .expect("returned");
    mediafarm::amqp::broker::close_quietly(&amqp, &[&ch], "done").await;
    let rerun = Farm::start_on(again, settings(), registry()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while runs(&header_key) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs(&header_key), 2, "the rerun sent the header again");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs(&body_key), 1, "the body did not run a second time");
    rerun.stop().await;
    farm.stop().await;
}

/// An `echo-worker` process consuming `queue` at `-c 8`; killed when dropped.
fn echo_worker_process(queue: &str) -> mediafarm_tests::process::Proc {
    mediafarm_tests::process::Proc::spawn(
        std::process::Command::new(mediafarm_tests::binary("echo-worker"))
            .args([
                "--concurrency",
                "8",
                "--queues",
                queue,
                "--loglevel",
                "error",
            ])
            .env("MEDIAFARM_METRICS_ADDR", "127.0.0.1:0")
            .stdout(std::process::Stdio::null()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_chord_of_1000_loses_no_header_and_sends_the_body_once() {
    let s = settings();
    let q = unique_queue("chord-kill");
    let bodyq = unique_queue("chord-kill-body");
    let client = Client::connect(&s).await.expect("client");
    let header = (0..1000).map(|i| {
        Signature::new(
            "echo.step",
            mediafarm_tests::kwargs(json!({ "i": i, "sleep_ms": 10 })),
        )
        .queue(&q)
    });
    // The body waits on a queue nobody consumes yet, so the test can count how often it was sent.
    let body =
        Signature::new("echo.step", mediafarm_tests::kwargs(json!({"body": true}))).queue(&bodyq);
    let c = chord(header, body)
        .apply_async(&client)
        .await
        .expect("sent");
    let joined_key = format!("celery-taskset-meta-{}.j", c.header.id);
    let mut victim = echo_worker_process(&q);
    let _steady = echo_worker_process(&q);
    // Kill one worker with -9 once a quarter of the headers have joined: its unacknowledged
    // headers (some run, some with their results stored) go back to the queue.
    let mut conn = client.backend().connection();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let joined: u64 = redis::cmd("ZCARD")
            .arg(&joined_key)
            .query_async(&mut conn)
            .await
            .expect("redis");
        if joined >= 250 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "headers did not run: {joined} joined"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill9();
    assert_eq!(
        ready_count(&s, &bodyq).await,
        0,
        "the kill came before the chord completed"
    );
    let _replacement = echo_worker_process(&q);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while ready_count(&s, &bodyq).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the body was never sent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Redelivered headers that finish after the join must not send the body again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ready_count(&s, &bodyq).await,
        1,
        "the body is sent exactly once"
    );
    let _body_worker = echo_worker_process(&bodyq);
    let got = c
        .body
        .get(Duration::from_secs(60))
        .await
        .expect("the body ran");
    let want: Vec<Value> = (0..1000)
        .map(|i| json!({ "i": i, "sleep_ms": 10 }))
        .collect();
    assert_eq!(
        got["parent"],
        json!(want),
        "every header's result, in order"
    );
    delete_queue(&s, &q).await;
    delete_queue(&s, &bodyq).await;
}

/// Celery's `result_chord_expires` sets how long a chord's counters live (here 120 s instead of
/// `result_expires`), and `result_chord_join_timeout` the dispatch claim and the `done` mark
/// after the body was sent (here 100 s: a 200 s claim, `done` for 400 s instead of 300).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_chord_expires_and_join_timeout_set_the_chords_expiries_as_in_celery() {
    let mut s = settings();
    s.result_chord_expires = Some(Duration::from_secs(120));
    s.result_chord_join_timeout = Duration::from_secs(100);
    let farm = Farm::start("canvas-chord-times", s.clone(), registry()).await;
    let (q, late) = (farm.queue.clone(), unique_queue("canvas-chord-times-late"));
    // The last header waits on a queue nobody consumes yet, so the chord stays open.
    let header = (0..5)
        .map(|i| rust_step(&q, json!({ "i": i })))
        .chain([rust_step(&late, json!({ "i": 5 }))]);
    let c = chord(header, rust_step(&q, json!({"body": true})))
        .apply_async(&farm.client)
        .await
        .expect("sent");
    let gid = c.header.id.clone();
    let key = |suffix: &str| format!("celery-taskset-meta-{gid}{suffix}");
    let mut conn = farm.client.backend().connection();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let joined: u64 = redis::cmd("ZCARD")
            .arg(key(".j"))
            .query_async(&mut conn)
            .await
            .expect("redis");
        if joined == 5 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{joined} joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for suffix in [".j", ".s", ".d"] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(key(suffix))
            .query_async(&mut conn)
            .await
            .expect("redis");
        assert!(
            (1..=120).contains(&ttl),
            "{suffix} expires in {ttl} s, not within result_chord_expires"
        );
    }
    let last = Farm::start_on(late.clone(), s, registry()).await;
    c.body
        .get(Duration::from_secs(60))
        .await
        .expect("the body ran");
    // The body's worker may store its result before the header's worker marks the chord done.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mark: Option<String> = redis::cmd("GET")
            .arg(key(".c"))
            .query_async(&mut conn)
            .await
            .expect("redis");
        if mark.as_deref() == Some("done") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, ".c is {mark:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done_ttl: i64 = redis::cmd("TTL")
        .arg(key(".c"))
        .query_async(&mut conn)
        .await
        .expect("redis");
    assert!(
        (301..=400).contains(&done_ttl),
        ".c says done for {done_ttl} s; twice the 200 s claim is 400"
    );
    last.stop().await;
    farm.stop().await;
}
