//! persist-worker end to end on the real RabbitMQ, Redis, PostgreSQL (127.0.0.1:5432, user
//! postgres, db `test`) and MariaDB (127.0.0.1:3306, root, db `test`): upserts guarded by a
//! version and append-only tables on both servers; the order of writes to one key across many
//! small batches and a replayed job changing nothing; a bad row among good ones failing alone;
//! a database that cannot be reached retried and then reported; the Python celery client's
//! `send_task` end to end; a worker killed with SIGKILL mid-batch (stream and job paths) and a
//! database outage (a proxy the test cuts) losing and duplicating nothing, with `/readyz` and
//! the backlog gauges telling the truth meanwhile. Every test makes tables of its own and drops
//! them at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use mediafarm::{ClientError, Settings};
use mediafarm_tests::process::Proc;
use mediafarm_tests::{
    delete_queue, failed, free_port, kwargs, python_env, run_python, settings, to, worker_binary,
    Farm,
};
use persist_worker::schema::{TableSpec, Tables};
use persist_worker::PersistSettings;
use serde_json::{json, Value};
use sqlx::{MySqlPool, PgPool, Row};

const WAIT: Duration = Duration::from_secs(60);
const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const MY_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// One of the two servers, as the test reads and sets it up (not through the worker).
enum Db {
    Pg(PgPool),
    My(MySqlPool),
}

impl Db {
    async fn both() -> Vec<Db> {
        let pg = PgPool::connect(PG_URL)
            .await
            .expect("PostgreSQL at 127.0.0.1:5432");
        let my = MySqlPool::connect(MY_URL)
            .await
            .expect("MariaDB at 127.0.0.1:3306");
        vec![Db::Pg(pg), Db::My(my)]
    }

    fn url(&self) -> &'static str {
        match self {
            Db::Pg(_) => PG_URL,
            Db::My(_) => MY_URL,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Db::Pg(_) => "pg",
            Db::My(_) => "my",
        }
    }

    async fn exec(&self, sql: &str) {
        match self {
            Db::Pg(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
            Db::My(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The profile table: every column type, a short text column the database can refuse.
    async fn create_profiles(&self, table: &str) {
        self.exec(&match self {
            Db::Pg(_) => format!(
                "CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT, score DOUBLE PRECISION, \
                 active BOOLEAN, at TIMESTAMPTZ, doc JSONB, short VARCHAR(5), version BIGINT NOT NULL)"
            ),
            Db::My(_) => format!(
                "CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT, score DOUBLE, \
                 active BOOLEAN, at DATETIME(6), doc JSON, short VARCHAR(5), version BIGINT NOT NULL)"
            ),
        })
        .await;
    }

    async fn create_events(&self, table: &str) {
        self.exec(&format!(
            "CREATE TABLE {table} (event_id VARCHAR(64) PRIMARY KEY, body TEXT)"
        ))
        .await;
    }

    async fn drop(&self, table: &str) {
        self.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
    }

    /// Rows of `table` by their first column, every column read as text (NULL: `None`).
    async fn rows(&self, table: &str, columns: &[&str]) -> BTreeMap<String, Vec<Option<String>>> {
        let text = match self {
            Db::Pg(_) => "TEXT",
            Db::My(_) => "CHAR",
        };
        let exprs: Vec<String> = columns
            .iter()
            .map(|c| match *c {
                "active" => "CAST(CASE WHEN active THEN 1 ELSE 0 END AS CHAR(1))".to_owned(),
                "at" => match self {
                    Db::Pg(_) => "CAST(CAST(EXTRACT(EPOCH FROM at) AS BIGINT) AS TEXT)".into(),
                    Db::My(_) => {
                        "CAST(TIMESTAMPDIFF(SECOND, '1970-01-01 00:00:00', at) AS CHAR)".into()
                    }
                },
                c => format!("CAST({c} AS {text})"),
            })
            .collect();
        let sql = format!("SELECT {} FROM {table}", exprs.join(", "));
        let mut out = BTreeMap::new();
        macro_rules! collect {
            ($pool:expr) => {
                for r in sqlx::query(&sql).fetch_all($pool).await.unwrap() {
                    let cells: Vec<Option<String>> = (0..columns.len())
                        .map(|i| r.get::<Option<String>, _>(i))
                        .collect();
                    out.insert(cells[0].clone().unwrap(), cells);
                }
            };
        }
        match self {
            Db::Pg(p) => collect!(p),
            Db::My(p) => collect!(p),
        }
        out
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn profiles_spec(url: &str) -> TableSpec {
    serde_json::from_value(json!({
        "key": ["id"],
        "version": "version",
        "database_url": url,
        "columns": {"id": "int", "name": "text", "score": "float", "active": "bool",
                    "at": "timestamp", "doc": "json", "short": "text", "version": "int"}
    }))
    .unwrap()
}

fn events_spec(url: &str) -> TableSpec {
    serde_json::from_value(json!({
        "key": ["event_id"], "mode": "append", "database_url": url,
        "columns": {"event_id": "text", "body": "text"}
    }))
    .unwrap()
}

/// A worker on a fresh queue writing `tables`.
async fn start(
    label: &str,
    tables: Vec<(String, TableSpec)>,
    tweak: impl FnOnce(&mut Settings, &mut PersistSettings),
) -> Farm {
    let mut s = settings();
    s.worker_concurrency = 64;
    s.task_default_retry_delay = Duration::from_millis(200);
    s.task_retry_jitter = false;
    s.task_max_retries = 2;
    let mut p = PersistSettings {
        persist_tables: Tables(tables.into_iter().collect()),
        persist_connect_timeout: Duration::from_secs(2),
        ..PersistSettings::default()
    };
    tweak(&mut s, &mut p);
    let registry = persist_worker::registry(&s, &p).expect("persist settings are usable");
    Farm::start(label, s, registry).await
}

async fn send(farm: &Farm, kwargs: Value) -> Result<Value, ClientError> {
    let r = farm
        .client
        .send_task(
            "persist.write",
            kwargs.as_object().cloned().unwrap(),
            &to(&farm.queue),
        )
        .await
        .unwrap();
    tokio::time::timeout(WAIT, r.get(WAIT))
        .await
        .expect("the job ends in time")
}

/// Sends every job at once and waits for all of them, in order of `jobs`.
async fn send_all(farm: &Farm, jobs: Vec<Value>) -> Vec<Result<Value, ClientError>> {
    futures_util::future::join_all(jobs.into_iter().map(|j| send(farm, j))).await
}

fn profile(table: &str, id: i64, version: i64) -> Value {
    json!({
        "table": table,
        "key": {"id": id},
        "values": {
            "name": format!("k{id}-v{version}"),
            "score": id as f64 + version as f64 / 4.0,
            "active": (id + version) % 2 == 0,
            "at": format!("2026-01-{:02}T10:{:02}:{:02}+02:00", id % 28 + 1, version / 60, version % 60),
            "doc": {"id": id, "v": version, "tags": ["a", version.to_string()]},
        },
        "version": version,
    })
}

const PROFILE_COLUMNS: &[&str] = &["id", "name", "score", "active", "at", "doc", "version"];

/// What the row of `job` reads back as, computed from the job itself.
fn expected(job: &Value) -> Vec<Option<String>> {
    let v = &job["values"];
    let at = chrono::DateTime::parse_from_rfc3339(v["at"].as_str().unwrap())
        .unwrap()
        .timestamp();
    vec![
        Some(job["key"]["id"].to_string()),
        v["name"].as_str().map(str::to_owned),
        Some(v["score"].as_f64().unwrap().to_string()),
        Some(
            if v["active"].as_bool().unwrap() {
                "1"
            } else {
                "0"
            }
            .into(),
        ),
        Some(at.to_string()),
        Some(v["doc"].to_string()),
        Some(job["version"].to_string()),
    ]
}

/// Compares read-back rows with expected ones, JSON columns as JSON.
fn assert_rows(
    db: &str,
    got: &BTreeMap<String, Vec<Option<String>>>,
    want: &BTreeMap<String, Vec<Option<String>>>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{db}: keys"
    );
    for (k, w) in want {
        let g = &got[k];
        for (i, (gc, wc)) in g.iter().zip(w).enumerate() {
            let same = match (gc, wc) {
                (Some(a), Some(b)) if PROFILE_COLUMNS.get(i) == Some(&"doc") => {
                    serde_json::from_str::<Value>(a).unwrap()
                        == serde_json::from_str::<Value>(b).unwrap()
                }
                (Some(a), Some(b)) if PROFILE_COLUMNS.get(i) == Some(&"score") => {
                    a.parse::<f64>().unwrap() == b.parse::<f64>().unwrap()
                }
                (a, b) => a == b,
            };
            assert!(
                same,
                "{db}: row {k} column {}: got {gc:?}, want {wc:?}",
                PROFILE_COLUMNS.get(i).unwrap_or(&"?")
            );
        }
    }
}

#[tokio::test]
async fn upserts_and_appends_on_postgres_and_mariadb() {
    for db in Db::both().await {
        let (profiles, events) = (unique("mf_prof"), unique("mf_ev"));
        db.create_profiles(&profiles).await;
        db.create_events(&events).await;
        let farm = start(
            &format!("persist-upsert-{}", db.label()),
            vec![
                (profiles.clone(), profiles_spec(db.url())),
                (events.clone(), events_spec(db.url())),
            ],
            |_, _| {},
        )
        .await;
        // Versions 1..=3 of keys 1..=8, the newest first for even keys: arrival must not matter.
        let mut jobs = Vec::new();
        for id in 1..=8 {
            let versions: Vec<i64> = if id % 2 == 0 {
                vec![3, 1, 2]
            } else {
                vec![1, 2, 3]
            };
            jobs.extend(versions.into_iter().map(|v| profile(&profiles, id, v)));
        }
        for r in send_all(&farm, jobs.clone()).await {
            let r = r.expect("each write commits");
            assert_eq!(r, json!({"table": profiles, "rows": 1}));
        }
        let want: BTreeMap<String, Vec<Option<String>>> = jobs
            .iter()
            .filter(|j| j["version"] == 3)
            .map(|j| (j["key"]["id"].to_string(), expected(j)))
            .collect();
        assert_rows(
            db.label(),
            &db.rows(&profiles, PROFILE_COLUMNS).await,
            &want,
        );

        // A newer write of some columns keeps the others; an older one changes nothing.
        send(&farm, json!({"table": profiles, "key": {"id": 1}, "values": {"name": "renamed"}, "version": 4}))
            .await
            .unwrap();
        send(&farm, json!({"table": profiles, "key": {"id": 1}, "values": {"name": "stale", "score": 0.0}, "version": 2}))
            .await
            .unwrap();
        let mut want = want;
        let row = want.get_mut("1").unwrap();
        row[1] = Some("renamed".into());
        row[6] = Some("4".into());
        assert_rows(
            db.label(),
            &db.rows(&profiles, PROFILE_COLUMNS).await,
            &want,
        );

        // Append: a key already stored keeps its first body.
        for (id, body) in [("e1", "first"), ("e1", "second"), ("e2", "other")] {
            let r = send(
                &farm,
                json!({"table": events, "key": {"event_id": id}, "values": {"body": body}}),
            )
            .await;
            assert_eq!(r.unwrap()["rows"], 1);
        }
        let got = db.rows(&events, &["event_id", "body"]).await;
        assert_eq!(got["e1"][1].as_deref(), Some("first"), "{}", db.label());
        assert_eq!(got["e2"][1].as_deref(), Some("other"), "{}", db.label());
        assert_eq!(got.len(), 2);

        farm.stop().await;
        db.drop(&profiles).await;
        db.drop(&events).await;
    }
}

#[tokio::test]
async fn order_per_key_across_small_batches_and_replays_change_nothing() {
    for db in Db::both().await {
        let profiles = unique("mf_ord");
        db.create_profiles(&profiles).await;
        let farm = start(
            &format!("persist-order-{}", db.label()),
            vec![(profiles.clone(), profiles_spec(db.url()))],
            |_, p| {
                p.persist_batch_size = 3;
                p.persist_batch_wait = Duration::from_millis(5);
            },
        )
        .await;
        // 30 versions of one key at once: many batches, any arrival order.
        let jobs: Vec<Value> = (1..=30).rev().map(|v| profile(&profiles, 5, v)).collect();
        for r in send_all(&farm, jobs.clone()).await {
            r.expect("each write commits");
        }
        let newest = jobs.iter().find(|j| j["version"] == 30).unwrap();
        let want = BTreeMap::from([("5".to_owned(), expected(newest))]);
        assert_rows(
            db.label(),
            &db.rows(&profiles, PROFILE_COLUMNS).await,
            &want,
        );
        // The same jobs again (a redelivery, a replayed batch): nothing changes.
        for r in send_all(
            &farm,
            vec![newest.clone(), jobs[20].clone(), newest.clone()],
        )
        .await
        {
            r.expect("a replay succeeds");
        }
        assert_rows(
            db.label(),
            &db.rows(&profiles, PROFILE_COLUMNS).await,
            &want,
        );
        farm.stop().await;
        db.drop(&profiles).await;
    }
}

#[tokio::test]
async fn a_bad_row_fails_alone_and_the_rest_of_its_batch_commits() {
    for db in Db::both().await {
        let profiles = unique("mf_bad");
        db.create_profiles(&profiles).await;
        let farm = start(
            &format!("persist-bad-{}", db.label()),
            vec![(profiles.clone(), profiles_spec(db.url()))],
            |_, p| {
                p.persist_batch_size = 100;
                p.persist_batch_wait = Duration::from_millis(500);
            },
        )
        .await;
        let mut jobs: Vec<Value> = (1..=5).map(|id| profile(&profiles, id, 1)).collect();
        // The database refuses this one (VARCHAR(5)); the worker refuses the next two.
        jobs.push(json!({"table": profiles, "key": {"id": 6}, "values": {"short": "far too long"}, "version": 1}));
        jobs.push(
            json!({"table": profiles, "key": {"id": 7}, "values": {"name": 12345}, "version": 1}),
        );
        jobs.push(
            json!({"table": profiles, "key": {"id": 8}, "values": {"shoe_size": 44}, "version": 1}),
        );
        let mut results = send_all(&farm, jobs.clone()).await;
        let unknown = failed(results.pop().unwrap());
        let wrong_type = failed(results.pop().unwrap());
        let too_long = failed(results.pop().unwrap());
        assert_eq!(too_long.exc_type, "RowRefused", "{}", too_long.message);
        assert!(
            too_long.message.contains(&profiles) && too_long.message.contains("far too long"),
            "{}",
            too_long.message
        );
        assert!(
            wrong_type.message.contains(&profiles)
                && wrong_type.message.contains("`name`")
                && wrong_type.message.contains("12345"),
            "{}",
            wrong_type.message
        );
        assert!(
            unknown.message.contains("shoe_size") && unknown.message.contains("44"),
            "{}",
            unknown.message
        );
        for r in results {
            r.expect("the good rows commit");
        }
        let want: BTreeMap<String, Vec<Option<String>>> = jobs[..5]
            .iter()
            .map(|j| (j["key"]["id"].to_string(), expected(j)))
            .collect();
        assert_rows(
            db.label(),
            &db.rows(&profiles, PROFILE_COLUMNS).await,
            &want,
        );
        farm.stop().await;
        db.drop(&profiles).await;
    }
}

#[tokio::test]
async fn an_unreachable_database_is_retried_then_reported() {
    // Nothing listens on port 1: every attempt is a transient failure.
    let table = unique("mf_down");
    let farm = start(
        "persist-down",
        vec![(
            table.clone(),
            events_spec("postgres://postgres@127.0.0.1:1/test"),
        )],
        |s, _| s.task_max_retries = 1,
    )
    .await;
    let e = failed(
        send(
            &farm,
            json!({"table": table, "key": {"event_id": "x"}, "values": {"body": "b"}}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "DatabaseUnavailable", "{}", e.message);
    assert!(e.message.contains(&table), "{}", e.message);
    farm.stop().await;
}

#[tokio::test]
async fn python_send_task_writes_a_row() {
    let dbs = Db::both().await;
    let pg = &dbs[0];
    let profiles = unique("mf_py");
    pg.create_profiles(&profiles).await;
    let farm = start(
        "persist-py",
        vec![(profiles.clone(), profiles_spec(pg.url()))],
        |_, _| {},
    )
    .await;
    let job = profile(&profiles, 42, 7);
    // Off the test's runtime thread, which also runs the worker.
    let (queue, env) = (farm.queue.clone(), python_env(&farm.settings));
    let job_text = job.to_string();
    let out = tokio::task::spawn_blocking(move || {
        run_python("persist_client.py", &[&queue, &job_text], &env)
    })
    .await
    .unwrap();
    let seen: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(seen["ok"], json!({"table": profiles, "rows": 1}), "{seen}");
    assert_eq!(seen["bad"]["exc_type"], "RowRefused", "{seen}");
    let want = BTreeMap::from([("42".to_owned(), expected(&job))]);
    assert_rows("pg", &pg.rows(&profiles, PROFILE_COLUMNS).await, &want);
    farm.stop().await;
    pg.drop(&profiles).await;
}

/// The Redis buffer: entries added with redis-py, drained by `persist.flush`; the later entry
/// of a key wins (stream ids as versions), refused entries go to the dead-letter stream with
/// their reason, everything is acknowledged, a second flush reads nothing, and an entry that
/// another consumer read and never acknowledged is claimed.
#[tokio::test]
async fn the_redis_stream_buffer_is_flushed_into_the_table() {
    let dbs = Db::both().await;
    for db in &dbs {
        let profiles = unique("mf_st");
        db.create_profiles(&profiles).await;
        let prefix = format!("{}:", unique("t-persist"));
        let (stream, dead) = (format!("{prefix}{profiles}"), format!("{prefix}dead"));
        let farm = start(
            &format!("persist-stream-{}", db.label()),
            vec![(profiles.clone(), profiles_spec(db.url()))],
            |_, p| {
                p.persist_stream_prefix = prefix.clone();
                p.persist_stream_dead = dead.clone();
                p.persist_stream_claim_idle = Duration::from_millis(1);
            },
        )
        .await;
        let first = profile(&profiles, 1, 0);
        let newer = profile(&profiles, 1, 0);
        let mut newer_values = newer["values"].clone();
        newer_values["name"] = json!("k1-newer");
        let other = profile(&profiles, 2, 0);
        let entries = json!([
            {"key": first["key"], "values": first["values"]},
            {"key": other["key"], "values": other["values"]},
            {"key": newer["key"], "values": newer_values},
            {"key": {"id": 3}, "values": {"name": 5}},
            {"key": "{not json", "values": {}},
        ]);
        let env = python_env(&farm.settings);
        let (s, e) = (stream.clone(), entries.to_string());
        let ids =
            tokio::task::spawn_blocking(move || run_python("persist_xadd.py", &[&s, &e], &env))
                .await
                .unwrap();
        let ids: Vec<String> = serde_json::from_str(ids.trim()).unwrap();
        assert_eq!(ids.len(), 5);

        let flush = |table: &str| json!({"table": table});
        let r = farm
            .client
            .send_task("persist.flush", kwargs(flush(&profiles)), &to(&farm.queue))
            .await
            .unwrap();
        let out = tokio::time::timeout(WAIT, r.get(WAIT))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, json!({"rows": 3, "dead": 2}), "{}", db.label());

        let version = |id: &str| persist_worker::stream::id_version(id).unwrap();
        let mut want_first = newer.clone();
        want_first["values"] = newer_values.clone();
        want_first["version"] = json!(version(&ids[2]));
        let mut want_other = other.clone();
        want_other["version"] = json!(version(&ids[1]));
        let want = BTreeMap::from([
            ("1".to_owned(), expected(&want_first)),
            ("2".to_owned(), expected(&want_other)),
        ]);
        assert_rows(
            db.label(),
            &db.rows(&profiles, PROFILE_COLUMNS).await,
            &want,
        );

        let mut redis = farm.client.backend().connection();
        let letters: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(&dead)
            .arg("-")
            .arg("+")
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(letters.len(), 2);
        let reason = |i: usize| -> String {
            letters[i]
                .1
                .iter()
                .find(|(k, _)| k == "reason")
                .unwrap()
                .1
                .clone()
        };
        assert!(
            reason(0).contains("`name`") && reason(0).contains('5'),
            "{}",
            reason(0)
        );
        assert!(reason(1).contains("not a JSON object"), "{}", reason(1));
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("persist-worker")
            .query_async(&mut redis)
            .await
            .unwrap();
        let pending = match pending {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::Int(n)) => *n,
                other => panic!("XPENDING count: {other:?}"),
            },
            other => panic!("XPENDING: {other:?}"),
        };
        assert_eq!(pending, 0, "every entry is acknowledged");

        // Another consumer reads an entry and dies before acknowledging it: it is claimed.
        let late = profile(&profiles, 4, 0);
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("key")
            .arg(late["key"].to_string())
            .arg("values")
            .arg(late["values"].to_string())
            .query_async(&mut redis)
            .await
            .unwrap();
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("persist-worker")
            .arg("crashed-consumer")
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut redis)
            .await
            .unwrap();
        let r = farm
            .client
            .send_task("persist.flush", kwargs(json!({})), &to(&farm.queue))
            .await
            .unwrap();
        let out = tokio::time::timeout(WAIT, r.get(WAIT))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, json!({"rows": 1, "dead": 0}), "{}", db.label());
        assert!(db.rows(&profiles, &["id"]).await.contains_key("4"));

        farm.stop().await;
        let _: () = redis::cmd("DEL")
            .arg(&stream)
            .arg(&dead)
            .query_async(&mut redis)
            .await
            .unwrap();
        db.drop(&profiles).await;
    }
}

// ---- Crashes and outages -------------------------------------------------------------------

/// Drops the test's tables (on both servers) and deletes its Redis keys when the test ends, also
/// when it fails.
struct Cleanup {
    tables: Vec<String>,
    keys: Vec<String>,
    redis_url: String,
}

impl Cleanup {
    fn new(tables: &[&str], keys: &[&str]) -> Cleanup {
        Cleanup {
            tables: tables.iter().map(|t| (*t).to_owned()).collect(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            redis_url: settings().result_backend,
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (tables, keys, url) = (
            std::mem::take(&mut self.tables),
            std::mem::take(&mut self.keys),
            self.redis_url.clone(),
        );
        // Its own thread and runtime: the test's runtime may be the one unwinding.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(pg) = PgPool::connect(PG_URL).await {
                    for t in &tables {
                        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                            .execute(&pg)
                            .await;
                    }
                }
                if let Ok(my) = MySqlPool::connect(MY_URL).await {
                    for t in &tables {
                        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                            .execute(&my)
                            .await;
                    }
                }
                if let Ok(client) = redis::Client::open(url) {
                    if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                        let _: Result<(), _> =
                            redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
                    }
                }
            })
        })
        .join();
    }
}

/// Polls `check` every 100 ms until it returns `Some`, for at most [`WAIT`].
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The test's hold on a table: every write to it waits until the hold is released.
enum Hold {
    Pg(sqlx::Transaction<'static, sqlx::Postgres>),
    My(sqlx::Transaction<'static, sqlx::MySql>),
}

impl Hold {
    async fn release(self) {
        match self {
            Hold::Pg(tx) => tx.rollback().await.unwrap(),
            Hold::My(tx) => tx.rollback().await.unwrap(),
        }
    }
}

impl Db {
    /// Blocks every write to `table` (PostgreSQL: a SHARE lock; MariaDB: `SELECT … FOR UPDATE`,
    /// whose next-key locks reach past the last row, so inserts of new keys wait too).
    async fn hold(&self, table: &str) -> Hold {
        match self {
            Db::Pg(p) => {
                let mut tx = p.begin().await.unwrap();
                sqlx::query(&format!("LOCK TABLE {table} IN SHARE MODE"))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                Hold::Pg(tx)
            }
            Db::My(p) => {
                let mut tx = p.begin().await.unwrap();
                sqlx::query(&format!("SELECT id FROM {table} FOR UPDATE"))
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap();
                Hold::My(tx)
            }
        }
    }

    /// Writes to `table` waiting for a lock (a batch blocked on the test's hold).
    async fn lock_waiters(&self, table: &str) -> i64 {
        match self {
            Db::Pg(p) => sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = $1 AND NOT l.granted",
            )
            .bind(table)
            .fetch_one(p)
            .await
            .unwrap(),
            Db::My(p) => sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.INNODB_TRX \
                 WHERE trx_state = 'LOCK WAIT' AND trx_query LIKE CONCAT('%', ?, '%')",
            )
            .bind(table)
            .fetch_one(p)
            .await
            .unwrap(),
        }
    }
}

/// Entries of `stream` read by some consumer of persist-worker's group and not acknowledged.
async fn pending(redis: &mut redis::aio::ConnectionManager, stream: &str) -> i64 {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg("persist-worker")
        .query_async(redis)
        .await
        .unwrap();
    match reply {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("XPENDING count: {other:?}"),
        },
        other => panic!("XPENDING: {other:?}"),
    }
}

async fn xadd(redis: &mut redis::aio::ConnectionManager, stream: &str, job: &Value) {
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("key")
        .arg(job["key"].to_string())
        .arg("values")
        .arg(job["values"].to_string())
        .arg("version")
        .arg(job["version"].to_string())
        .query_async(redis)
        .await
        .unwrap();
}

/// Every key of `ids` at version 3 with the values of its version-3 write, and no other row.
fn newest(table: &str, ids: impl Iterator<Item = i64>) -> BTreeMap<String, Vec<Option<String>>> {
    ids.map(|id| (id.to_string(), expected(&profile(table, id, 3))))
        .collect()
}

/// A persist-worker process reading `table`'s stream continuously and consuming `queue`.
fn worker_process(
    n: u32,
    queue: &str,
    (table, url): (&str, &str),
    prefix: &str,
    dir: &std::path::Path,
) -> Proc {
    let s = settings();
    let tables = json!({ table: profiles_spec(url) });
    let log = std::fs::File::create(dir.join(format!("worker-{n}.log"))).unwrap();
    let mut cmd = std::process::Command::new(worker_binary("persist-worker"));
    cmd.current_dir(dir)
        .args(["--queues", queue, "--loglevel", "info", "-c", "64"])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("-n")
        .arg(format!("persist-kill-{n}@%h"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("MEDIAFARM_BROKER_URL", &s.broker_url)
        .env("MEDIAFARM_RESULT_BACKEND", &s.result_backend)
        .env("MEDIAFARM_PERSIST_TABLES", tables.to_string())
        .env("MEDIAFARM_PERSIST_STREAM_PREFIX", prefix)
        .env("MEDIAFARM_PERSIST_STREAM_DEAD", format!("{prefix}dead"))
        .env("MEDIAFARM_PERSIST_STREAM_CLAIM_IDLE", "1")
        .env("MEDIAFARM_PERSIST_STREAM_CONTINUOUS", "true")
        .env("MEDIAFARM_PERSIST_BATCH_SIZE", "50")
        .env("MEDIAFARM_PERSIST_BATCH_WAIT", "0.02")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    Proc::spawn(&mut cmd)
}

/// On PostgreSQL and on MariaDB, a worker killed with SIGKILL in the middle of a batch — rows
/// read (from the stream) or received (as `persist.write` jobs), their transaction open and
/// blocked on the test's hold on the table — loses nothing: after a restart every row is in
/// the table exactly once (its key is the primary key), at its newest version, and nothing is
/// left pending or dead-lettered.
#[tokio::test]
async fn a_worker_killed_mid_batch_loses_and_duplicates_nothing() {
    for db in Db::both().await {
        killed_mid_batch(&db).await;
    }
}

async fn killed_mid_batch(db: &Db) {
    let table = unique("mf_kill");
    let prefix = format!("{}:", unique("t-persist"));
    let (stream, dead) = (format!("{prefix}{table}"), format!("{prefix}dead"));
    let _cleanup = Cleanup::new(&[&table], &[&stream, &dead]);
    db.create_profiles(&table).await;
    let s = settings();
    let queue = mediafarm_tests::unique_queue(&format!("persist-kill-{}", db.label()));
    let dir = mediafarm_tests::temp_dir("persist-kill");
    let client = mediafarm::Client::connect(&s).await.unwrap();
    let mut redis = client.backend().connection();

    // The stream path: 300 entries (keys 1..=100, versions 1..=3) while the table is locked.
    let mut first = worker_process(1, &queue, (&table, db.url()), &prefix, &dir);
    let lock = db.hold(&table).await;
    for v in 1..=3 {
        for id in 1..=100 {
            xadd(&mut redis, &stream, &profile(&table, id, v)).await;
        }
    }
    eventually("the worker's batch waits for the lock", || {
        let table = &table;
        async move { (db.lock_waiters(table).await > 0).then_some(()) }
    })
    .await;
    first.kill9();
    assert!(
        pending(&mut redis, &stream).await > 0,
        "the killed worker held entries"
    );
    lock.release().await;
    assert!(
        db.rows(&table, &["id"]).await.is_empty(),
        "nothing committed"
    );

    let mut second = worker_process(2, &queue, (&table, db.url()), &prefix, &dir);
    let want = newest(&table, 1..=100);
    eventually("every stream entry is written and acknowledged", || {
        let (table, want) = (&table, &want);
        let (mut redis, stream) = (redis.clone(), &stream);
        async move {
            let got = db.rows(table, PROFILE_COLUMNS).await;
            (got.len() == want.len()
                && got.iter().all(|(k, row)| row.last() == want[k].last())
                && pending(&mut redis, stream).await == 0)
                .then_some(())
        }
    })
    .await;
    assert_rows(db.label(), &db.rows(&table, PROFILE_COLUMNS).await, &want);

    // The persist.write path: 300 jobs (keys 1001..=1100) while the table is locked again.
    let lock = db.hold(&table).await;
    let mut results = Vec::new();
    for v in [2, 1, 3] {
        for id in 1001..=1100 {
            let job = profile(&table, id, v);
            let r = client
                .send_task("persist.write", kwargs(job), &to(&queue))
                .await
                .unwrap();
            results.push(r);
        }
    }
    eventually("the worker's batch waits for the lock", || {
        let table = &table;
        async move { (db.lock_waiters(table).await > 0).then_some(()) }
    })
    .await;
    second.kill9();
    lock.release().await;
    assert_eq!(
        db.rows(&table, &["id"]).await.len(),
        100,
        "nothing of the jobs committed"
    );

    let mut third = worker_process(3, &queue, (&table, db.url()), &prefix, &dir);
    for r in results {
        let out = tokio::time::timeout(WAIT, r.get(WAIT))
            .await
            .expect("the job ends in time")
            .expect("every write commits after the restart");
        assert_eq!(out["rows"], 1);
    }
    let mut want = want;
    want.extend(newest(&table, 1001..=1100));
    assert_rows(db.label(), &db.rows(&table, PROFILE_COLUMNS).await, &want);
    let letters: i64 = redis::cmd("XLEN")
        .arg(&dead)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(letters, 0, "nothing was dead-lettered");
    // SIGTERM stops the stream reader (blocked in XREADGROUP) and the worker, in time.
    mediafarm_tests::process::sigterm(third.0.id());
    let status = eventually("the worker exits after SIGTERM", || {
        let exited = third.0.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status}");
    delete_queue(&s, &queue).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP proxy in front of PostgreSQL that the test cuts (open connections closed, new ones
/// closed at once) and restores: a database outage without touching the machine's server.
struct Proxy {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: &'static str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, watch) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if !*watch.borrow() {
                    continue;
                }
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { port, up, task }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set_up(false);
        self.task.abort();
    }
}

/// `GET path` on the worker's metrics address: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// The value of the series `name{table="<table>"}` on `/metrics`.
async fn gauge(addr: std::net::SocketAddr, name: &str, table: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await;
    let series = format!("{name}{{table=\"{table}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

/// On PostgreSQL and on MariaDB, the database unreachable for a while (a proxy cut between the
/// worker and the server):
/// `/readyz` says so, rows from the stream (read continuously) and from `persist.write` jobs
/// wait, the lag shows on `/metrics`, nothing is acknowledged; when the database returns,
/// every row is written, the jobs succeed and the worker is ready again.
#[tokio::test]
async fn a_database_outage_holds_the_rows_until_it_returns() {
    for db in Db::both().await {
        outage(&db).await;
    }
}

async fn outage(db: &Db) {
    let table = unique("mf_out");
    let prefix = format!("{}:", unique("t-persist"));
    let (stream, dead) = (format!("{prefix}{table}"), format!("{prefix}dead"));
    let _cleanup = Cleanup::new(&[&table], &[&stream, &dead]);
    db.create_profiles(&table).await;
    let (proxy, url) = match db {
        Db::Pg(_) => {
            let proxy = Proxy::start("127.0.0.1:5432").await;
            let url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port);
            (proxy, url)
        }
        Db::My(_) => {
            let proxy = Proxy::start("127.0.0.1:3306").await;
            let url = format!("mysql://root@127.0.0.1:{}/test", proxy.port);
            (proxy, url)
        }
    };
    let farm = start(
        &format!("persist-outage-{}", db.label()),
        vec![(table.clone(), profiles_spec(&url))],
        |s, p| {
            s.task_max_retries = 200;
            s.task_retry_backoff_max = Duration::from_millis(500);
            p.persist_stream_prefix = prefix.clone();
            p.persist_stream_dead = dead.clone();
            p.persist_stream_claim_idle = Duration::from_secs(1);
            p.persist_stream_continuous = true;
        },
    )
    .await;
    let addr = farm.worker.metrics_addr;
    eventually("the worker is ready", || async move {
        (http_get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    // The stream path works before the outage.
    let mut redis = farm.client.backend().connection();
    xadd(&mut redis, &stream, &profile(&table, 1, 3)).await;
    eventually("the first entry is written", || {
        let table = &table;
        async move {
            db.rows(table, &["id"])
                .await
                .contains_key("1")
                .then_some(())
        }
    })
    .await;

    proxy.set_up(false);
    let why = eventually("/readyz reports the database", || async move {
        let (status, body) = http_get(addr, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(why.contains("unreachable") && why.contains(&table), "{why}");
    for id in 2..=40 {
        xadd(&mut redis, &stream, &profile(&table, id, 3)).await;
    }
    let mut results = Vec::new();
    for id in 101..=140 {
        let r = farm
            .client
            .send_task(
                "persist.write",
                kwargs(profile(&table, id, 3)),
                &to(&farm.queue),
            )
            .await
            .unwrap();
        results.push(r);
    }
    // The reader took the entries and could not commit them: pending, and shown as lag.
    let lag = eventually("/metrics shows the entries pending", || {
        let table = &table;
        async move {
            let p = gauge(addr, "mediafarm_persist_stream_pending", table).await?;
            (p >= 1.0).then_some(p)
        }
    })
    .await;
    assert!(lag <= 39.0, "{lag}");
    assert!(
        gauge(addr, "mediafarm_persist_stream_length", &table).await >= Some(39.0),
        "the stream keeps every entry not committed"
    );
    assert!(pending(&mut redis, &stream).await >= 1);
    assert_eq!(
        db.rows(&table, &["id"]).await.len(),
        1,
        "nothing new is written"
    );

    proxy.set_up(true);
    for r in results {
        let out = tokio::time::timeout(WAIT, r.get(WAIT))
            .await
            .expect("the job ends in time")
            .expect("the write commits once the database is back");
        assert_eq!(out["rows"], 1);
    }
    let want = newest(&table, (1..=40).chain(101..=140));
    eventually("every entry is written and acknowledged", || {
        let (table, want) = (&table, &want);
        let (mut redis, stream) = (redis.clone(), &stream);
        async move {
            (db.rows(table, &["id"]).await.len() == want.len()
                && pending(&mut redis, stream).await == 0)
                .then_some(())
        }
    })
    .await;
    assert_rows(db.label(), &db.rows(&table, PROFILE_COLUMNS).await, &want);
    eventually("the worker is ready again", || async move {
        (http_get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    eventually("/metrics shows no entry pending", || {
        let table = &table;
        async move {
            (gauge(addr, "mediafarm_persist_stream_pending", table).await == Some(0.0))
                .then_some(())
        }
    })
    .await;
    // Committed entries are trimmed from the stream (all but the last one read, the group's
    // mark).
    eventually("the stream is trimmed of committed entries", || {
        let (mut redis, stream) = (redis.clone(), &stream);
        async move {
            let len: i64 = redis::cmd("XLEN")
                .arg(stream)
                .query_async(&mut redis)
                .await
                .ok()?;
            (len <= 1).then_some(())
        }
    })
    .await;
    farm.stop().await;
}

/// The avatar pipeline without a Python worker: a chain `image.transform` (two variants stored)
/// → `persist.write`, which takes the variants' URLs from the transform's result by JSON
/// Pointer (`from_parent`) into the profile's row, on PostgreSQL and MariaDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_avatar_pipeline_transforms_then_writes_the_variant_urls() {
    use image_worker::{ImageSettings, Transform};
    use mediafarm::client::{chain, Signature};
    use mediafarm::storage::Storage;

    for db in Db::both().await {
        let table = unique("mf_avatar");
        let _cleanup = Cleanup::new(&[&table], &[]);
        db.exec(&format!(
            "CREATE TABLE {table} (id INT PRIMARY KEY, name TEXT, avatar TEXT, thumb TEXT)"
        ))
        .await;
        let spec: TableSpec = serde_json::from_value(json!({
            "key": ["id"], "database_url": db.url(),
            "columns": {"id": "int", "name": "text", "avatar": "text", "thumb": "text"}
        }))
        .unwrap();
        let dir = mediafarm_tests::temp_dir("avatar");
        let mut s = settings();
        s.storage_url = format!("file://{}", dir.display());
        let p = PersistSettings {
            persist_tables: Tables([(table.clone(), spec)].into_iter().collect()),
            ..PersistSettings::default()
        };
        let registry = persist_worker::registry(&s, &p)
            .expect("persist settings are usable")
            .register(Transform::new(&s, &ImageSettings::default()).expect("image settings"));
        let farm = Farm::start(
            &format!("persist-avatar-{}", db.label()),
            s.clone(),
            registry,
        )
        .await;
        let mut photo = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(640, 480, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
        }))
        .write_to(
            &mut std::io::Cursor::new(&mut photo),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
        let storage = Storage::from_settings(&s).unwrap();
        storage
            .put("uploads/7.jpg", bytes::Bytes::from(photo), "image/jpeg")
            .await
            .unwrap();
        let q = farm.queue.clone();
        let transform = Signature::new(
            "image.transform",
            kwargs(json!({"source": "uploads/7.jpg", "outputs": [
                {"key": "avatars/7-256.jpg", "width": 256, "format": "jpeg"},
                {"key": "avatars/7-64.jpg", "width": 64, "format": "jpeg"},
            ]})),
        )
        .queue(&q);
        let write = Signature::new(
            "persist.write",
            kwargs(json!({
                "table": table, "key": {"id": 7}, "values": {"name": "ada"},
                "from_parent": {"avatar": "/outputs/0/url", "thumb": "/outputs/1/url"},
            })),
        )
        .queue(&q);
        let last = chain([transform, write])
            .apply_async(&farm.client)
            .await
            .expect("sent");
        let out = last.get(WAIT).await.expect("the chain ends");
        assert_eq!(out, json!({"table": table, "rows": 1}));
        let transformed = last
            .parent()
            .expect("the transform step")
            .get(WAIT)
            .await
            .expect("transformed");
        let urls: Vec<String> = transformed["outputs"]
            .as_array()
            .expect("outputs")
            .iter()
            .map(|o| o["url"].as_str().expect("url").to_owned())
            .collect();
        assert_eq!(urls.len(), 2, "{transformed}");
        let rows = db.rows(&table, &["id", "name", "avatar", "thumb"]).await;
        assert_eq!(
            rows.get("7"),
            Some(&vec![
                Some("7".to_owned()),
                Some("ada".to_owned()),
                Some(urls[0].clone()),
                Some(urls[1].clone()),
            ]),
            "{rows:?}"
        );
        farm.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
