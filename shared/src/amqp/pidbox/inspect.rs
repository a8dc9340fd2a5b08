//! Read-only replies, each in the shape Celery 5.7's `celery/worker/control.py` returns, so
//! `celery inspect` prints them and Flower reads them unchanged: `stats` (Celery's
//! `Worker.stats()`: totals, pid, clock, uptime, pool, broker, the prefetch window in effect
//! as `prefetch_count`, rusage), `active`/`reserved`/`scheduled`/`query_task` (Celery's
//! `Request.info()`), `registered`, `active_queues` (kombu's `Queue.as_dict(recurse=True)`),
//! `revoked`, `conf` (the core settings, secrets masked as Celery's `filter_hidden_settings`
//! masks them), `report`, and `hello` (mingle's exchange of revoked ids, so Python workers
//! starting beside a mediafarm worker do not log a failed sync).

use serde_json::{json, Map, Value};

use super::jobs::JobState;
use super::mailbox::Request;
use super::Node;
use crate::settings::{Group, Settings};

/// Celery's mask for a hidden value.
const MASK: &str = "********";

pub fn stats(node: &Node) -> Value {
    let s = &node.settings;
    let secs = |d: Option<std::time::Duration>| d.map_or(0.0, |d| d.as_secs_f64());
    json!({
        "total": node.jobs.totals(),
        "pid": std::process::id(),
        "clock": node.clock().to_string(),
        "uptime": node.uptime().as_secs(),
        "pool": {
            "implementation": "mediafarm:tokio",
            "max-concurrency": s.worker_concurrency,
            "processes": [std::process::id()],
            "max-tasks-per-child": "N/A",
            "put-guarded-by-semaphore": false,
            "timeouts": [secs(s.task_soft_time_limit), secs(s.task_time_limit)],
            "writes": "N/A",
        },
        "broker": broker_info(s),
        "prefetch_count": node.prefetch_in_effect(),
        "rusage": rusage().unwrap_or_else(|| json!("N/A")),
    })
}

/// kombu's `Connection.info()` without the password, as Celery's `stats.broker`. Always an
/// object: Flower's worker page iterates over it.
fn broker_info(s: &Settings) -> Value {
    if s.broker_is_redis() {
        return redis_broker_info(s);
    }
    let broker = crate::amqp::broker::effective_url(s);
    let Ok(uri) = crate::amqp::broker::parse_url(&broker, s.broker_heartbeat) else {
        return json!("N/A");
    };
    let ssl = matches!(uri.scheme, lapin::uri::AMQPScheme::AMQPS);
    json!({
        "hostname": uri.authority.host,
        "userid": uri.authority.userinfo.username,
        "virtual_host": uri.vhost,
        "port": uri.authority.port,
        "insist": false,
        "ssl": ssl,
        "transport": "amqp",
        "connect_timeout": uri.query.connection_timeout.map_or(4.0, |ms| ms as f64 / 1000.0),
        "transport_options": {},
        "login_method": "PLAIN",
        "uri_prefix": null,
        "heartbeat": uri.query.heartbeat.map_or(0.0, f64::from),
        "failover_strategy": "round-robin",
        "alternates": [],
    })
}

/// What a Python worker on kombu's Redis transport reports: the database as `virtual_host`,
/// no login method, Celery's default heartbeat.
fn redis_broker_info(s: &Settings) -> Value {
    if let Ok(u) = crate::settings::sentinel::parse(&s.broker_url) {
        let (host, port) = u.sentinels.first().cloned().unwrap_or_default();
        return json!({
            "hostname": host,
            "userid": u.username,
            "virtual_host": u.db.to_string(),
            "port": port,
            "insist": false,
            "ssl": false,
            "transport": "sentinel",
            "connect_timeout": 4,
            "transport_options": {"master_name": s.broker_transport_options.master_name},
            "login_method": null,
            "uri_prefix": null,
            "heartbeat": f64::from(s.broker_heartbeat),
            "failover_strategy": "round-robin",
            "alternates": [],
        });
    }
    let Ok(client) = crate::tls::redis_client(&s.broker_url, None) else {
        return json!({ "transport": "redis" });
    };
    let info = client.get_connection_info();
    let (hostname, port, ssl) = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => (json!(host), json!(port), false),
        redis::ConnectionAddr::TcpTls { host, port, .. } => (json!(host), json!(port), true),
        redis::ConnectionAddr::Unix(path) => {
            (json!(path.display().to_string()), json!(null), false)
        }
        _ => (json!(null), json!(null), false),
    };
    let redis = info.redis_settings();
    json!({
        "hostname": hostname,
        "userid": redis.username(),
        "virtual_host": redis.db().to_string(),
        "port": port,
        "insist": false,
        "ssl": ssl,
        "transport": if ssl { "rediss" } else { "redis" },
        "connect_timeout": 4,
        "transport_options": {},
        "login_method": null,
        "uri_prefix": null,
        "heartbeat": f64::from(s.broker_heartbeat),
        "failover_strategy": "round-robin",
        "alternates": [],
    })
}

/// `getrusage(RUSAGE_SELF)` as Celery reports it, read from `/proc/self` (Linux); `None`
/// elsewhere (Celery then says "N/A").
fn rusage() -> Option<Value> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // After ')': state(0) ppid(1) ... minflt(7) cminflt(8) majflt(9) cmajflt(10) utime(11) stime(12)
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ is 100 on every Linux architecture mediafarm ships on.
    let ticks = |i: usize| num(i) as f64 / 100.0;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(json!({
        "utime": ticks(11),
        "stime": ticks(12),
        "maxrss": field("VmHWM:"),
        "ixrss": 0,
        "idrss": 0,
        "isrss": 0,
        "minflt": num(7),
        "majflt": num(9),
        "nswap": 0,
        "inblock": 0,
        "oublock": 0,
        "msgsnd": 0,
        "msgrcv": 0,
        "nsignals": 0,
        "nvcsw": field("voluntary_ctxt_switches:"),
        "nivcsw": field("nonvoluntary_ctxt_switches:"),
    }))
}

pub fn active(node: &Node) -> Value {
    json!(node.jobs.info(JobState::Active, &node.hostname))
}

pub fn reserved(node: &Node) -> Value {
    json!(node.jobs.info(JobState::Reserved, &node.hostname))
}

pub fn scheduled(node: &Node) -> Value {
    json!(node.jobs.scheduled(&node.hostname))
}

/// Task names, sorted (mediafarm tasks have none of the `exchange`, `routing_key`,
/// `rate_limit` attributes Celery appends in brackets).
pub fn registered(node: &Node) -> Value {
    json!(node.tasks)
}

/// kombu's `Queue(name).as_dict(recurse=True)` for each queue consumed, as the runtime
/// declares them (a durable direct exchange named as the queue, routing key the queue's name,
/// the queue arguments the settings give).
pub fn active_queues(node: &Node) -> Value {
    let shape = crate::amqp::broker::QueueShape::of(&node.settings);
    json!(node
        .queues()
        .iter()
        .map(|q| queue_as_dict(q, &shape))
        .collect::<Vec<_>>())
}

pub fn queue_as_dict(name: &str, shape: &crate::amqp::broker::QueueShape) -> Value {
    let arguments = crate::amqp::table::table_to_json(&shape.work_arguments(name));
    let arguments = if arguments.is_empty() {
        Value::Null
    } else {
        Value::Object(arguments)
    };
    json!({
        "name": name,
        "exchange": {
            "name": name,
            "type": "direct",
            "arguments": null,
            "durable": true,
            "passive": false,
            "auto_delete": false,
            "delivery_mode": null,
            "no_declare": false,
        },
        "routing_key": name,
        "queue_arguments": arguments,
        "binding_arguments": null,
        "consumer_arguments": null,
        "durable": true,
        "exclusive": false,
        "auto_delete": false,
        "no_ack": false,
        "alias": null,
        "bindings": [],
        "no_declare": null,
        "expires": null,
        "message_ttl": null,
        "max_length": null,
        "max_length_bytes": null,
        "max_priority": shape.max_priority,
    })
}

pub fn revoked(node: &Node) -> Value {
    let mut ids = node.revocations.ids();
    ids.sort();
    json!(ids)
}

/// `{id: [state, info]}` for the ids (Celery's `ids` argument) this worker holds.
pub fn query_task(node: &Node, req: &Request) -> Value {
    Value::Object(node.jobs.query(&req.list("ids"), &node.hostname))
}

/// The core settings (changed from their defaults, or all with `with_defaults`), masked.
pub fn conf(node: &Node, req: &Request) -> Value {
    let with_defaults = match req.arguments.get("with_defaults") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => {
            matches!(s.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        }
        _ => false,
    };
    Value::Object(settings_table(&node.settings, with_defaults))
}

fn settings_table(settings: &Settings, with_defaults: bool) -> Map<String, Value> {
    let defaults: std::collections::HashMap<&str, String> = Settings::describe()
        .into_iter()
        .map(|i| (i.name, i.default))
        .collect();
    settings
        .shown_values()
        .into_iter()
        .filter(|(name, shown)| with_defaults || defaults.get(name) != Some(shown))
        .map(|(name, shown)| (name.to_owned(), censor(name, as_json(&shown))))
        .collect()
}

/// A shown setting value as JSON: `(unset)` is null, numbers, booleans, lists and quoted
/// strings are themselves, anything else a string.
fn as_json(shown: &str) -> Value {
    if shown == "(unset)" {
        return Value::Null;
    }
    serde_json::from_str(shown).unwrap_or_else(|_| Value::String(shown.to_owned()))
}

/// Celery's `filter_hidden_settings`: names that look secret are masked, and the password in
/// the broker URL and in any `*backend*` URL.
fn censor(name: &str, value: Value) -> Value {
    const HIDDEN: &[&str] = &[
        "API",
        "TOKEN",
        "KEY",
        "SECRET",
        "PASS",
        "PROFANITIES_LIST",
        "SIGNATURE",
        "DATABASE",
        "BEAT_DBURI",
    ];
    let upper = name.to_ascii_uppercase();
    if HIDDEN.iter().any(|h| upper.contains(h)) {
        return json!(MASK);
    }
    let is_url = name.starts_with("broker_") && name.ends_with("_url") || name.contains("backend");
    match value {
        Value::String(s) if is_url => Value::String(mask_password(&s)),
        other => other,
    }
}

/// `scheme://user:********@host/...` for a URL with a password; others unchanged.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{MASK}@{host}"),
        None => url.to_owned(),
    }
}

/// Celery's `report`: `{"ok": <bug-report text>}`, with mediafarm's versions.
pub fn report(node: &Node) -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let settings: Vec<String> = settings_table(&node.settings, false)
        .into_iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let text = format!(
        "\nsoftware -> mediafarm:{} (Celery protocol v2)\n\
         platform -> system:{} arch:{} kernel version:{} imp:Rust\n\
         loader   -> mediafarm\n\
         settings -> transport:{} results:{}\n\n{}\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        kernel.trim(),
        if node.settings.broker_is_redis() {
            "redis"
        } else {
            "amqp"
        },
        mask_password(&node.settings.result_backend),
        settings.join("\n"),
    );
    json!({ "ok": text })
}

/// mingle's `hello` from another node: take its revoked ids, answer with ours and the clock
/// (Celery answers its own hello with nothing).
pub fn hello(node: &Node, req: &Request) -> Value {
    if req.text("from_node") == Some(node.hostname.as_str()) {
        return Value::Null;
    }
    let theirs = req.list("revoked");
    if !theirs.is_empty() {
        let until = super::remember_until(&node.settings);
        node.revocations.apply(&theirs, false, until);
    }
    json!({"revoked": revoked(node), "clock": node.clock()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_as_celery_masks_them() {
        let s = Settings {
            broker_url: "amqp://app:s3cret@rabbit:5672/prod".into(),
            result_backend: "redis://:pw@redis:6379/1".into(),
            worker_concurrency: 3,
            ..Settings::default()
        };
        let changed = settings_table(&s, false);
        assert_eq!(
            changed["broker_url"],
            json!("amqp://app:********@rabbit:5672/prod")
        );
        assert_eq!(
            changed["result_backend"],
            json!("redis://:********@redis:6379/1")
        );
        assert_eq!(changed["worker_concurrency"], json!(3));
        assert!(
            !changed.contains_key("task_max_retries"),
            "defaults are left out"
        );
        let all = settings_table(&s, true);
        assert_eq!(all["task_max_retries"], json!(3));
        assert_eq!(all["task_time_limit"], Value::Null);
        assert_eq!(all["accept_content"], json!(["json"]));
        assert_eq!(all["task_message_max_bytes"], json!(1 << 20));
        assert_eq!(censor("aws_secret", json!("x")), json!(MASK));
        assert_eq!(censor("api_token", json!("x")), json!(MASK));
    }

    #[test]
    fn queues_read_as_kombu_writes_them() {
        let q = queue_as_dict("image", &Default::default());
        assert_eq!(q["queue_arguments"], Value::Null);
        assert_eq!(q["max_priority"], Value::Null);
        let prio = crate::amqp::broker::QueueShape {
            max_priority: Some(10),
            ..Default::default()
        };
        let p = queue_as_dict("image", &prio);
        assert_eq!(p["queue_arguments"], json!({"x-max-priority": 10}));
        assert_eq!(p["max_priority"], json!(10));
        assert_eq!(q["name"], "image");
        assert_eq!(q["exchange"]["name"], "image");
        assert_eq!(q["exchange"]["type"], "direct");
        assert_eq!(q["routing_key"], "image");
        assert_eq!(q["durable"], true);
        assert_eq!(q.as_object().unwrap().len(), 18, "kombu's 18 keys");
    }

    #[test]
    fn a_redis_broker_is_described_as_kombus_redis_transport() {
        let s = Settings {
            broker_url: "redis://app:s3cret@cache:6380/9".into(),
            ..Settings::default()
        };
        let b = broker_info(&s);
        assert_eq!(b["transport"], "redis");
        assert_eq!(b["hostname"], "cache");
        assert_eq!(b["port"], 6380);
        assert_eq!(b["virtual_host"], "9");
        assert_eq!(b["userid"], "app");
        assert_eq!(b["ssl"], false);
        assert!(!b.to_string().contains("s3cret"), "{b}");
        // Flower's worker page iterates over it: an object, with kombu's 14 keys.
        assert_eq!(b.as_object().map(|o| o.len()), Some(14), "{b}");
    }

    #[test]
    fn rusage_is_read_from_proc() {
        let r = rusage().expect("Linux has /proc/self");
        assert!(r["maxrss"].as_u64().unwrap() > 0, "{r}");
        assert!(r["minflt"].as_u64().unwrap() > 0, "{r}");
    }
}
