//! persist-worker end to end on the real RabbitMQ, Redis, PostgreSQL (127.0.0.1:5432, user
//! postgres, db `test`) and MariaDB (127.0.0.1:3306, root, db `test`): upserts guarded by a
//! version and append-only tables on both servers; the order of writes to one key across many
//! small batches and a replayed job changing nothing; a bad row among good ones failing alone;
//! a database that cannot be reached retried and then reported; the Python celery client's
//! `send_task` end to end. Every test makes tables of its own and drops them at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use mediafarm::{ClientError, Settings};
use mediafarm_tests::{failed, kwargs, python_env, run_python, settings, to, Farm};
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
