//! A job that blocks its runtime thread past its hard time limit makes the worker report
//! itself unhealthy. In a test binary of its own: the job blocks a thread of this process on
//! purpose, and two CI runs that had it beside the other fault tests hung (once in this test,
//! once in another that ran beside it), so it shares its process with nothing.

use std::time::{Duration, Instant};

use mediafarm::SendOptions;
use mediafarm_tests::{echo_registry, kwargs, settings, to, Farm};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_blocks_its_thread_past_the_hard_limit_makes_the_worker_unhealthy() {
    let farm = Farm::start("wedged", settings(), echo_registry()).await;
    let addr = farm.worker.metrics_addr;
    // Every wait is bounded, so a regression fails this test instead of hanging the run.
    let health = |path: &'static str| async move {
        let ask = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(req.as_bytes()).await?;
            let mut text = String::new();
            stream.read_to_string(&mut text).await?;
            Ok::<_, std::io::Error>(text)
        };
        match tokio::time::timeout(Duration::from_secs(20), ask).await {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => panic!("GET {path}: {e}"),
            Err(_) => panic!("GET {path} had no answer within 20 s"),
        }
    };
    assert!(health("/healthz").await.starts_with("HTTP/1.1 200"));
    let opts = SendOptions {
        time_limit: Some(1.0),
        ..to(&farm.queue)
    };
    // Blocks a runtime thread for 9 s: the 1 s hard limit cannot fire while it does.
    let r = farm
        .client
        .send_task("echo.echo", kwargs(json!({"block_ms": 9000})), &opts)
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(8);
    let mut seen = String::new();
    while Instant::now() < end {
        seen = health("/healthz").await;
        if seen.starts_with("HTTP/1.1 503") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        seen.starts_with("HTTP/1.1 503") && seen.contains("past its hard time limit of 1 s"),
        "{seen}"
    );
    assert!(health("/readyz").await.starts_with("HTTP/1.1 503"));
    // Once the thread is free again the job ends (whichever way) and the worker is healthy.
    let _ = r.get(WAIT).await;
    assert!(health("/healthz").await.starts_with("HTTP/1.1 200"));
    tokio::time::timeout(Duration::from_secs(60), farm.stop())
        .await
        .expect("the worker stops within 60 s once the job has ended");
}
