//! notify-worker end to end on the real RabbitMQ and Redis: emails to a real SMTP server
//! (aiosmtpd, started here on a free port) read back with Python's own MIME parser; the SMTP
//! pool reused across jobs; 4xx retried and 5xx failed; templates; the outboxes; Twilio's
//! documented Messages API and a generic JSON provider served by an HTTP server in this test;
//! signed webhooks checked by the receiver; bad input refused; a job redelivered after a
//! `kill -9` between send and ack sending once; the Python celery client end to end.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use mediafarm::settings::WebhookSettings;
use mediafarm::storage::Storage;
use mediafarm::{ClientError, FailureKind, Settings, TaskError};
use mediafarm_tests::certs::test_pki;
use mediafarm_tests::http_fake::{HttpFake, Reply};
use mediafarm_tests::smtp::{parse_eml, SmtpSink};
use mediafarm_tests::{failed, python_env, run_python, settings, temp_dir, to, Farm};
use notify_worker::NotifySettings;
use serde_json::{json, Value};
use sha2::Sha256;

const WAIT: Duration = Duration::from_secs(60);

/// A worker running the notify tasks on a fresh queue, with its own storage, outboxes and
/// template directory, and quick retries.
struct NotifyFarm {
    farm: Farm,
    notify: NotifySettings,
    storage: Storage,
    root: PathBuf,
}

/// The core settings, notify-worker's own and the webhook rules, for a test to change.
struct Config {
    core: Settings,
    notify: NotifySettings,
    webhook: WebhookSettings,
}

impl NotifyFarm {
    async fn start(label: &str, tweak: impl FnOnce(&mut Config)) -> NotifyFarm {
        let root = temp_dir(label);
        let mut g = Config {
            core: settings(),
            notify: NotifySettings::default(),
            webhook: WebhookSettings::default(),
        };
        g.core.storage_url = format!("file://{}", root.join("storage").display());
        g.notify.email_outbox_dir = root.join("outbox/email").display().to_string();
        g.notify.sms_outbox_dir = root.join("outbox/sms").display().to_string();
        g.notify.notify_template_dir = root.join("templates").display().to_string();
        g.core.task_default_retry_delay = Duration::from_millis(300);
        g.core.task_retry_jitter = false;
        g.core.task_max_retries = 3;
        tweak(&mut g);
        let s = g.core;
        let storage = Storage::from_settings(&s).unwrap();
        let registry =
            notify_worker::registry(&s, &g.notify, &g.webhook).expect("notify settings are usable");
        let farm = Farm::start(label, s, registry).await;
        NotifyFarm {
            farm,
            notify: g.notify,
            storage,
            root,
        }
    }

    async fn send(&self, task: &str, kwargs: Value) -> Result<Value, ClientError> {
        let r = self
            .farm
            .client
            .send_task(
                task,
                kwargs.as_object().cloned().unwrap(),
                &to(&self.farm.queue),
            )
            .await
            .unwrap();
        r.get(WAIT).await
    }

    fn template(&self, file: &str, text: &str) {
        let path = self.root.join("templates").join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn files(&self, sub: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.root.join(sub))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.retain(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'));
        v.sort();
        v
    }

    async fn stop(self) {
        self.farm.stop().await;
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn unique_addr(label: &str) -> String {
    format!(
        "{label}-{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(Sha256::digest(data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_arrives_with_utf8_headers_alternatives_and_attachments() {
    let sink = SmtpSink::start(&[]);
    let f = NotifyFarm::start("mail", |s| s.notify.smtp_url = Some(sink.url())).await;
    let pdf = b"%PDF-1.4\n% test document\n".repeat(40);
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDRxxxx".to_vec();
    f.storage
        .put(
            "docs/report.pdf",
            Bytes::from(pdf.clone()),
            "application/octet-stream",
        )
        .await
        .unwrap();
    f.storage
        .put(
            "docs/chart",
            Bytes::from(png.clone()),
            "application/octet-stream",
        )
        .await
        .unwrap();
    let to_addr = unique_addr("zhang");
    let out = f
        .send(
            "notify.email",
            json!({
                "to": format!("张三 <{to_addr}>"),
                "cc": ["cc@example.com"],
                "bcc": "hidden@example.com",
                "reply_to": "客服 <help@example.com>",
                "from": "订单系统 <orders@shop.example>",
                "subject": "您的订单已发货 — order #42 shipped",
                "text": "你好，张三！\n您的包裹已经发出。",
                "html": "<p>你好，<b>张三</b>！</p>",
                "headers": {"X-Campaign": "发货通知"},
                "attachments": [
                    "docs/report.pdf",
                    {"key": "docs/chart", "filename": "图表"},
                ],
            }),
        )
        .await
        .unwrap();
    let received = sink.to(&to_addr);
    assert_eq!(received.len(), 1, "one message reached the server");
    let (meta, path) = &received[0];
    assert_eq!(meta["mail_from"], "orders@shop.example");
    let mut rcpts: Vec<&str> = meta["rcpt_tos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    rcpts.sort();
    let mut want = vec![to_addr.as_str(), "cc@example.com", "hidden@example.com"];
    want.sort();
    assert_eq!(rcpts, want, "to, cc and bcc are all envelope recipients");
    let mail = parse_eml(path);
    assert!(
        mail["raw_is_ascii"].as_bool().unwrap(),
        "headers are RFC 2047 encoded words, bodies 7-bit"
    );
    assert_eq!(mail["subject"], "您的订单已发货 — order #42 shipped");
    assert_eq!(mail["from"], "订单系统 <orders@shop.example>");
    assert_eq!(mail["to"], format!("张三 <{to_addr}>"));
    assert_eq!(mail["reply_to"], "客服 <help@example.com>");
    assert_eq!(mail["bcc"], Value::Null, "Bcc is not in the message itself");
    assert_eq!(mail["extra"]["X-Campaign"], "发货通知");
    // Email text travels with CRLF line ends.
    assert_eq!(
        mail["text"]
            .as_str()
            .unwrap()
            .replace("\r\n", "\n")
            .trim_end(),
        "你好，张三！\n您的包裹已经发出。"
    );
    assert_eq!(
        mail["html"].as_str().unwrap().trim_end(),
        "<p>你好，<b>张三</b>！</p>"
    );
    assert_eq!(mail["content_type"], "multipart/mixed");
    let atts = mail["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 2);
    assert_eq!(atts[0]["filename"], "report.pdf");
    assert_eq!(atts[0]["content_type"], "application/pdf");
    assert_eq!(atts[0]["sha256"], sha256_hex(&pdf));
    assert_eq!(atts[1]["filename"], "图表");
    assert_eq!(atts[1]["content_type"], "image/png", "typed from its bytes");
    assert_eq!(atts[1]["sha256"], sha256_hex(&png));
    assert_eq!(out["message_id"], mail["message_id"]);
    assert_eq!(out["rejected"], json!([]));
    assert_eq!(out["accepted"].as_array().unwrap().len(), 3);

    // Over the attachment cap, or a missing key: refused before anything is sent.
    let e = failed(
        f.send(
            "notify.email",
            json!({"to": to_addr, "subject": "s", "text": "t", "attachments": ["docs/missing.pdf"]}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "AttachmentNotFound", "{}", e.message);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pooled_authenticated_connection_carries_many_jobs() {
    let sink = SmtpSink::start(&["--auth", "mailer:s3cret"]);
    let f = NotifyFarm::start("pool", |s| {
        s.notify.smtp_url = Some(sink.url());
        s.notify.smtp_username = Some("mailer".into());
        s.notify.smtp_password = Some("s3cret".into());
    })
    .await;
    let to_addr = unique_addr("pool");
    for i in 0..6 {
        f.send(
            "notify.email",
            json!({"to": to_addr, "subject": format!("n{i}"), "text": "x"}),
        )
        .await
        .unwrap();
    }
    let got = sink.to(&to_addr);
    assert_eq!(got.len(), 6);
    assert!(got.iter().all(|(m, _)| m["auth"] == "mailer"), "{got:?}");
    assert_eq!(sink.connections(), 1, "six jobs, one SMTP connection");
    f.stop().await;

    // Wrong password: the server's 535 is permanent.
    let f = NotifyFarm::start("badauth", |s| {
        s.notify.smtp_url = Some(sink.url());
        s.notify.smtp_username = Some("mailer".into());
        s.notify.smtp_password = Some("wrong".into());
    })
    .await;
    let e = failed(
        f.send(
            "notify.email",
            json!({"to": to_addr, "subject": "s", "text": "x"}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "SmtpRejected", "{}", e.message);
    assert!(e.message.contains("535"), "{}", e.message);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_that_never_clears_fails_with_a_message_that_does_not_promise_a_retry() {
    let sink = SmtpSink::start(&[]);
    let f = NotifyFarm::start("defer-always", |s| {
        s.notify.smtp_url = Some(sink.url());
        s.core.task_max_retries = 2;
        s.core.task_default_retry_delay = Duration::from_millis(200);
        s.core.task_retry_jitter = false;
    })
    .await;
    let to_addr = format!("defer-always@{}.example.com", uuid::Uuid::new_v4().simple());
    let e = failed(
        f.send(
            "notify.email",
            json!({"to": to_addr, "subject": "s", "text": "x"}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "SmtpDeferred", "{}", e.message);
    assert!(
        e.message.contains("452") && e.message.ends_with("(gave up after 2 retries)"),
        "{}",
        e.message
    );
    assert!(!e.message.contains("will be retried"), "{}", e.message);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_4xx_is_retried_and_5xx_fails_for_good() {
    let sink = SmtpSink::start(&[]);
    let f = NotifyFarm::start("codes", |s| s.notify.smtp_url = Some(sink.url())).await;
    let deferred = format!("defer-once@{}.example.com", uuid::Uuid::new_v4().simple());
    let r = f
        .farm
        .client
        .send_task(
            "notify.email",
            json!({"to": deferred, "subject": "s", "text": "x"})
                .as_object()
                .cloned()
                .unwrap(),
            &to(&f.farm.queue),
        )
        .await
        .unwrap();
    r.get(WAIT).await.unwrap();
    let meta = r.meta().await.unwrap().unwrap();
    assert_eq!(
        meta.extra
            .get("retries")
            .and_then(Value::as_u64)
            .unwrap_or(1),
        1
    );
    assert_eq!(
        sink.to(&deferred).len(),
        1,
        "451 first, then sent once on the retry"
    );

    let e = failed(
        f.send(
            "notify.email",
            json!({"to": "reject@example.com", "subject": "s", "text": "x"}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "SmtpRejected", "{}", e.message);
    assert!(e.message.contains("550"), "{}", e.message);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_render_and_bad_input_fails_clearly() {
    let sink = SmtpSink::start(&[]);
    let f = NotifyFarm::start("tpl", |s| s.notify.smtp_url = Some(sink.url())).await;
    f.template("welcome.subject.txt", "欢迎, {{ name }}!\n");
    f.template("welcome.txt", "Hello {{ name }}, your code is {{ code }}.");
    f.template("welcome.html", "<p>Hello {{ name }}</p>");
    f.template("broken.subject.txt", "{% if %}");
    f.template("inject.subject.txt", "{{ subject }}");
    f.template("inject.txt", "body");
    let to_addr = unique_addr("tpl");
    f.send(
        "notify.email",
        json!({"to": to_addr, "template": "welcome", "context": {"name": "<王五>", "code": 7}}),
    )
    .await
    .unwrap();
    let (_, path) = sink.to(&to_addr).pop().unwrap();
    let mail = parse_eml(&path);
    assert_eq!(mail["subject"], "欢迎, <王五>!");
    assert_eq!(
        mail["text"].as_str().unwrap().trim_end(),
        "Hello <王五>, your code is 7."
    );
    assert_eq!(
        mail["html"].as_str().unwrap().trim_end(),
        "<p>Hello &lt;王五&gt;</p>"
    );

    let cases = [
        (
            json!({"to": to_addr, "template": "nope"}),
            "UnknownTemplate",
            "no template \"nope\"",
        ),
        (
            json!({"to": to_addr, "template": "../etc/passwd"}),
            "UnknownTemplate",
            "not valid",
        ),
        (
            json!({"to": to_addr, "template": "broken"}),
            "TemplateError",
            "broken.subject.txt",
        ),
        (
            json!({"to": to_addr, "template": "welcome", "context": {"name": "x"}}),
            "TemplateError",
            "undefined",
        ),
        (
            json!({"to": to_addr, "template": "inject", "context": {"subject": "hi\nBcc: evil@example.com"}}),
            "HeaderInjection",
            "line feed",
        ),
        (
            json!({"to": to_addr, "subject": "hi\r\nBcc: evil@example.com", "text": "x"}),
            "HeaderInjection",
            "carriage return",
        ),
        (
            json!({"to": format!("{to_addr}\r\nBcc: evil@example.com"), "subject": "s", "text": "x"}),
            "HeaderInjection",
            "`to`",
        ),
        (
            json!({"to": "x@example.com", "subject": "s", "text": "x", "headers": {"X-A": "1\nBcc: e@example.com"}}),
            "HeaderInjection",
            "headers.X-A",
        ),
        (
            json!({"to": "not-an-address", "subject": "s", "text": "x"}),
            "InvalidAddress",
            "not-an-address",
        ),
        (
            json!({"to": [], "subject": "s", "text": "x"}),
            "InvalidAddress",
            "`to` is empty",
        ),
        (
            json!({"to": to_addr, "subject": "s", "text": "  ", "html": ""}),
            "EmptyBody",
            "no body",
        ),
        (
            json!({"to": to_addr, "subject": "s"}),
            "EmptyBody",
            "no body",
        ),
        (
            json!({"to": to_addr, "text": "x"}),
            "InvalidArguments",
            "subject",
        ),
        (
            json!({"to": to_addr, "subject": "s", "text": "x", "bogus": 1}),
            "InvalidArguments",
            "bogus",
        ),
    ];
    for (kwargs, exc_type, words) in cases {
        let e = failed(f.send("notify.email", kwargs.clone()).await);
        assert_eq!(e.exc_type, exc_type, "{kwargs}: {}", e.message);
        assert!(e.message.contains(words), "{kwargs}: {}", e.message);
    }
    assert_eq!(sink.messages().len(), 1, "nothing else was sent");
    assert!(sink
        .messages()
        .iter()
        .all(|(m, _)| !m["rcpt_tos"].to_string().contains("evil")));
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_smtp_or_a_provider_messages_go_to_the_outboxes() {
    let f = NotifyFarm::start("outbox", |_| {}).await;
    assert_eq!(f.notify.smtp_url, None, "the default has no SMTP server");
    assert_eq!(f.notify.sms_provider, "outbox");
    let out = f
        .send(
            "notify.email",
            json!({"to": "王 <wang@example.com>", "subject": "你好", "text": "正文"}),
        )
        .await
        .unwrap();
    let files = f.files("outbox/email");
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].extension().unwrap() == "eml");
    let mail = parse_eml(&files[0]);
    assert_eq!(mail["subject"], "你好");
    assert_eq!(
        mail["from"], "mediafarm <mediafarm@localhost>",
        "email_from's default"
    );
    assert_eq!(mail["message_id"], out["message_id"]);
    let sms = f
        .send(
            "notify.sms",
            json!({"to": "+8613800138000", "body": "验证码 4321"}),
        )
        .await
        .unwrap();
    assert_eq!(sms["provider"], "outbox");
    assert_eq!(sms["status"], "written");
    let files = f.files("outbox/sms");
    assert_eq!(files.len(), 1);
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    assert_eq!(written["to"], "+8613800138000");
    assert_eq!(written["body"], "验证码 4321");
    f.stop().await;
}

/// Twilio's documented answers: 201 with the message, 400 with its error JSON, 429 with
/// Retry-After, 500. Numbers choose the behaviour; 429 and 500 happen once per number.
async fn twilio_fake() -> HttpFake {
    let seen: Arc<Mutex<VecDeque<String>>> = Arc::default();
    HttpFake::start(move |req| {
        let form = req.form();
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
        let to = get("To");
        let first_time = {
            let mut s = seen.lock().unwrap();
            let first = !s.contains(&to);
            s.push_back(to.clone());
            first
        };
        let err = |status: u16, code: u32, msg: &str| -> Reply {
            (
                status,
                vec![("content-type", "application/json".into())],
                json!({"code": code, "message": msg, "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status}).to_string(),
            )
        };
        if to.ends_with("0400") {
            return err(400, 21211, &format!("The 'To' number {to} is not a valid phone number."));
        }
        if to.ends_with("0429") && first_time {
            let (s, mut h, b) = err(429, 20429, "Too Many Requests");
            h.push(("retry-after", "1".into()));
            return (s, h, b);
        }
        if to.ends_with("0500") && first_time {
            return (500, vec![], "upstream trouble".into());
        }
        (
            201,
            vec![("content-type", "application/json".into())],
            json!({"sid": format!("SM{:032x}", seen.lock().unwrap().len()), "status": "queued", "to": to, "body": get("Body"), "error_code": null}).to_string(),
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_messages_api_201_400_429_and_500() {
    let fake = twilio_fake().await;
    let f = NotifyFarm::start("twilio", |s| {
        s.notify.sms_provider = "twilio".into();
        s.notify.twilio_account_sid = Some("AC0123456789abcdef".into());
        s.notify.twilio_auth_token = Some("tok".into());
        s.notify.twilio_from = Some("+15005550006".into());
        s.notify.twilio_base_url = fake.url("");
        s.notify.twilio_status_callback = Some("https://app.example.com/sms/status".into());
    })
    .await;
    let ok = f
        .send(
            "notify.sms",
            json!({"to": "+14155550001", "body": "你好 Twilio"}),
        )
        .await
        .unwrap();
    assert_eq!(ok["provider"], "twilio");
    assert_eq!(ok["status"], "queued");
    assert!(ok["provider_id"].as_str().unwrap().starts_with("SM"));
    let req = fake.requests().pop().unwrap();
    assert_eq!(req.method, "POST");
    assert_eq!(
        req.path,
        "/2010-04-01/Accounts/AC0123456789abcdef/Messages.json"
    );
    assert_eq!(
        req.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    // base64("AC0123456789abcdef:tok")
    assert_eq!(
        req.header("authorization"),
        Some("Basic QUMwMTIzNDU2Nzg5YWJjZGVmOnRvaw==")
    );
    let form = req.form();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(field("To"), Some("+14155550001"));
    assert_eq!(field("From"), Some("+15005550006"));
    assert_eq!(field("Body"), Some("你好 Twilio"));
    assert_eq!(
        field("StatusCallback"),
        Some("https://app.example.com/sms/status")
    );

    let e = failed(
        f.send("notify.sms", json!({"to": "+14155550400", "body": "x"}))
            .await,
    );
    assert_eq!(e.exc_type, "ProviderRejected", "{}", e.message);
    assert!(
        e.message.contains("21211") && e.message.contains("not a valid phone number"),
        "{}",
        e.message
    );

    for number in ["+14155550429", "+14155550500"] {
        let before = fake.requests().len();
        let out = f
            .send("notify.sms", json!({"to": number, "body": "x"}))
            .await
            .unwrap();
        assert_eq!(out["status"], "queued");
        let tries: Vec<_> = fake.requests()[before..]
            .iter()
            .map(|r| r.path.clone())
            .collect();
        assert_eq!(
            tries.len(),
            2,
            "{number}: one refusal, one retry that went through"
        );
    }

    for (kwargs, exc_type) in [
        (
            json!({"to": "4155550001", "body": "x"}),
            "InvalidPhoneNumber",
        ),
        (
            json!({"to": "+1415555000\n1", "body": "x"}),
            "InvalidPhoneNumber",
        ),
        (json!({"to": "+14155550001", "body": " "}), "EmptyBody"),
        (json!({"to": "+14155550001"}), "EmptyBody"),
        (
            json!({"to": "+14155550001", "body": "x".repeat(1601)}),
            "BodyTooLong",
        ),
        (
            json!({"to": "+14155550001", "template": "nope"}),
            "UnknownTemplate",
        ),
        (
            json!({"to": "+14155550001", "body": "x", "provider": "http"}),
            "UnknownProvider",
        ),
    ] {
        let e = failed(f.send("notify.sms", kwargs.clone()).await);
        assert_eq!(e.exc_type, exc_type, "{kwargs}: {}", e.message);
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_json_provider_and_sms_templates() {
    let fake = HttpFake::start(|req| {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        if req.header("authorization") != Some("Bearer k-123") {
            return (401, vec![], "{\"error\": \"bad key\"}".into());
        }
        (
            202,
            vec![("content-type", "application/json".into())],
            json!({"messages": [{"id": format!("m-{}", body["recipient"].as_str().unwrap_or("")), "state": "accepted"}]}).to_string(),
        )
    })
    .await;
    let f = NotifyFarm::start("smshttp", |s| {
        s.notify.sms_provider = "http".into();
        s.notify.sms_http_url = Some(fake.url("/v1/send"));
        s.notify.sms_http_authorization = Some("Bearer k-123".into());
        s.notify.sms_http_from = Some("ACME".into());
        s.notify.sms_http_body = r#"{"recipient": {{ to|tojson }}, "sender": {{ from|tojson }}, "text": {{ body|tojson }}}"#.into();
        s.notify.sms_http_id_pointer = "/messages/0/id".into();
        s.notify.sms_http_status_pointer = "/messages/0/state".into();
    })
    .await;
    f.template("code.sms.txt", "Your code is {{ code }} — \"{{ app }}\"");
    let out = f
        .send("notify.sms", json!({"to": "+447700900123", "template": "code", "context": {"code": 9876, "app": "Shop"}}))
        .await
        .unwrap();
    assert_eq!(
        out,
        json!({"provider": "http", "provider_id": "m-+447700900123", "status": "accepted"})
    );
    let req = fake.requests().pop().unwrap();
    assert_eq!(req.path, "/v1/send");
    let body: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(
        body,
        json!({"recipient": "+447700900123", "sender": "ACME", "text": "Your code is 9876 — \"Shop\""})
    );
    // The outbox is still there when a job asks for it.
    let out = f
        .send(
            "notify.sms",
            json!({"to": "+447700900124", "body": "x", "provider": "outbox"}),
        )
        .await
        .unwrap();
    assert_eq!(out["provider"], "outbox");
    f.stop().await;

    let f = NotifyFarm::start("smshttp401", |s| {
        s.notify.sms_provider = "http".into();
        s.notify.sms_http_url = Some(fake.url("/v1/send"));
        s.notify.sms_http_authorization = Some("Bearer wrong".into());
    })
    .await;
    let e = failed(
        f.send("notify.sms", json!({"to": "+447700900123", "body": "x"}))
            .await,
    );
    assert_eq!(e.exc_type, "ProviderAuthFailed", "{}", e.message);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_by_cause_and_kept_off_internal_addresses() {
    const SECRET: &str = "whsec-test";
    let calls = Arc::new(Mutex::new(0u32));
    let counter = calls.clone();
    let flaky = AtomicU32::new(0);
    let fake = HttpFake::start(move |req| {
        // The receiver's side of the contract: HMAC-SHA256 over "<timestamp>.<body>".
        let ts = req.header("x-mediafarm-timestamp").unwrap_or("");
        let sig = req.header("x-mediafarm-signature").unwrap_or("");
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(&req.body);
        let expected = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
        if sig != expected {
            return (401, vec![], "bad signature".into());
        }
        let mut n = counter.lock().unwrap();
        *n += 1;
        let flaky_seen = flaky.fetch_add(u32::from(req.path == "/flaky"), Ordering::SeqCst);
        match req.path.as_str() {
            "/flaky" if flaky_seen == 0 => (503, vec![("retry-after", "1".into())], "busy".into()),
            "/gone" => (410, vec![], "no such hook".into()),
            "/redirect" => (
                302,
                vec![("location", "http://169.254.169.254/".into())],
                String::new(),
            ),
            _ => (204, vec![], String::new()),
        }
    })
    .await;
    let f = NotifyFarm::start("hook", |s| {
        s.webhook.webhook_secret = Some(SECRET.into());
        s.webhook.webhook_allow_private = true;
        s.webhook.webhook_allow_http = true;
    })
    .await;
    let payload = json!({"event": "order.paid", "订单": 42, "items": [1, 2]});
    let out = f
        .send("notify.webhook", json!({"url": fake.url("/hook"), "json": payload, "headers": {"X-Event": "order.paid"}, "idempotency_key": "evt-1"}))
        .await
        .unwrap();
    let req = fake.requests().pop().unwrap();
    assert_eq!(out, json!({"status": 204, "bytes": req.body.len()}));
    let got: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(got, payload);
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("x-event"), Some("order.paid"));
    assert_eq!(req.header("x-mediafarm-id"), Some("evt-1"));
    assert_eq!(
        *calls.lock().unwrap(),
        1,
        "the receiver verified the signature"
    );

    f.send(
        "notify.webhook",
        json!({"url": fake.url("/flaky"), "json": {}}),
    )
    .await
    .unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        3,
        "503 + Retry-After, then delivered on the retry"
    );
    let e = failed(
        f.send(
            "notify.webhook",
            json!({"url": fake.url("/gone"), "json": {}}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "ProviderRejected", "{}", e.message);
    assert!(e.message.contains("410"), "{}", e.message);
    let e = failed(
        f.send(
            "notify.webhook",
            json!({"url": fake.url("/redirect"), "json": {}}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "ProviderRedirected", "{}", e.message);
    let e = failed(
        f.send(
            "notify.webhook",
            json!({"url": fake.url("/hook"), "json": {}, "headers": {"X-A": "1\r\nX-B: 2"}}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "HeaderInjection", "{}", e.message);
    f.stop().await;

    // With the default rules, loopback and plain http are refused before any request.
    let f = NotifyFarm::start("hookssrf", |s| s.webhook.webhook_allow_http = true).await;
    let before = fake.requests().len();
    let e = failed(
        f.send(
            "notify.webhook",
            json!({"url": fake.url("/hook"), "json": {}}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "WebhookRefused", "{}", e.message);
    assert!(e.message.contains("internal address"), "{}", e.message);
    let e = failed(
        f.send(
            "notify.webhook",
            json!({"url": "https://localhost:1/x", "json": {}}),
        )
        .await,
    );
    assert_eq!(e.exc_type, "WebhookRefused", "{}", e.message);
    assert_eq!(
        fake.requests().len(),
        before,
        "nothing reached the internal server"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_idempotency_key_returns_the_stored_result_without_sending() {
    let sink = SmtpSink::start(&[]);
    let f = NotifyFarm::start("idem", |s| s.notify.smtp_url = Some(sink.url())).await;
    let to_addr = unique_addr("idem");
    let key = format!("welcome-{}", uuid::Uuid::new_v4().simple());
    let kwargs = json!({"to": to_addr, "subject": "s", "text": "x", "idempotency_key": key});
    let first = f.send("notify.email", kwargs.clone()).await.unwrap();
    let second = f.send("notify.email", kwargs).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(
        sink.to(&to_addr).len(),
        1,
        "sent once for two jobs with one key"
    );
    // The same key to another recipient is another message.
    let other = unique_addr("idem2");
    f.send(
        "notify.email",
        json!({"to": other, "subject": "s", "text": "x", "idempotency_key": key}),
    )
    .await
    .unwrap();
    assert_eq!(sink.to(&other).len(), 1);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_bucket_is_shared_through_redis() {
    let s = settings();
    let backend = mediafarm::ResultBackend::connect(&s.result_backend, None)
        .await
        .unwrap();
    let key = format!("mediafarm-rate-test-{}", uuid::Uuid::new_v4().simple());
    let limit = mediafarm::settings::RateLimit::parse("3/h").unwrap();
    // Two workers' connections draw from one bucket.
    let (mut a, mut b) = (backend.connection(), backend.connection());
    let mut waits = Vec::new();
    for i in 0..4 {
        let conn = if i % 2 == 0 { &mut a } else { &mut b };
        waits.push(
            notify_worker::rate_limit::take(conn, &key, limit)
                .await
                .unwrap(),
        );
    }
    assert_eq!(&waits[..3], &[0, 0, 0]);
    // The fourth waits for a third of an hour's refill, less the moments that passed.
    assert!((1_000_000..=1_200_000).contains(&waits[3]), "{waits:?}");
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut a)
        .await
        .unwrap();
}

/// Builds `notify-worker` and returns its path.
fn notify_worker_binary() -> PathBuf {
    mediafarm_tests::worker_binary("notify-worker")
}

fn spawn_worker(
    bin: &Path,
    s: &Settings,
    notify: &NotifySettings,
    queue: &str,
    smtp: &str,
    pause: Option<(&str, u64)>,
) -> Child {
    let mut cmd = Command::new(bin);
    cmd.args([
        "-Q",
        queue,
        "-n",
        &format!("kill9@{queue}"),
        "--metrics-addr",
        "127.0.0.1:0",
        "-c",
        "2",
    ])
    .current_dir(std::env::temp_dir())
    .env("MEDIAFARM_BROKER_URL", &s.broker_url)
    .env("MEDIAFARM_RESULT_BACKEND", &s.result_backend)
    .env("MEDIAFARM_SMTP_URL", smtp)
    .env("MEDIAFARM_STORAGE_URL", &s.storage_url)
    .env("MEDIAFARM_EMAIL_OUTBOX_DIR", &notify.email_outbox_dir)
    .env("MEDIAFARM_TASK_DEFAULT_RETRY_DELAY", "0.3")
    // A lease of 6 x 1 s + 10 s, so the crash-window test waits 16 s, not minutes.
    .env("MEDIAFARM_SMTP_TIMEOUT", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some((variable, ms)) = pause {
        cmd.env(variable, ms.to_string());
    }
    cmd.spawn().expect("notify-worker starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_send_and_ack_still_sends_once() {
    let bin = notify_worker_binary();
    let sink = SmtpSink::start(&[]);
    let root = temp_dir("kill9");
    let mut s = settings();
    s.storage_url = format!("file://{}", root.join("storage").display());
    let notify = NotifySettings {
        email_outbox_dir: root.join("outbox").display().to_string(),
        ..Default::default()
    };
    let queue = mediafarm_tests::unique_queue("notify-kill9");
    let client = mediafarm::Client::connect(&s).await.unwrap();
    let to_addr = unique_addr("kill9");
    let key = format!("k9-{}", uuid::Uuid::new_v4().simple());
    let mut first = spawn_worker(
        &bin,
        &s,
        &notify,
        &queue,
        &sink.url(),
        Some(("MEDIAFARM_NOTIFY_PAUSE_AFTER_SEND_MS", 120_000)),
    );
    let job = client
        .send_task(
            "notify.email",
            json!({"to": to_addr, "subject": "once", "text": "only once", "idempotency_key": key})
                .as_object()
                .cloned()
                .unwrap(),
            &to(&queue),
        )
        .await
        .unwrap();
    // Wait until the message reached the server and the send was recorded in Redis; the
    // worker now sits between the send and the ack.
    let mut conn = client.backend().connection();
    let pattern = format!(
        "{}notify.email:{key}:*",
        mediafarm::backend::once::KEY_PREFIX
    );
    let mut recorded = false;
    for _ in 0..600 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .unwrap();
        if let Some(k) = keys.first() {
            let v: Option<String> = redis::cmd("GET")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
            if v.is_some_and(|v| v.contains("\"done\"")) {
                recorded = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recorded, "the first worker sent and recorded the email");
    assert_eq!(sink.to(&to_addr).len(), 1);
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    assert!(
        job.meta().await.unwrap().is_none(),
        "no result was stored before the kill"
    );

    let mut second = spawn_worker(&bin, &s, &notify, &queue, &sink.url(), None);
    let out = job.get(WAIT).await;
    let _ = second.kill();
    let _ = second.wait();
    let out = out.expect("the redelivered job succeeds");
    let received = sink.to(&to_addr);
    assert_eq!(
        received.len(),
        1,
        "redelivery returned the stored result and sent nothing"
    );
    assert_eq!(out["message_id"], parse_eml(&received[0].1)["message_id"]);
    mediafarm_tests::delete_queue(&s, &queue).await;
    mediafarm_tests::delete_queue(&s, &mediafarm::amqp::reroute::dead_queue(&queue)).await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_celery_client_sends_email_and_sms() {
    let sink = SmtpSink::start(&[]);
    let f = NotifyFarm::start("py", |s| s.notify.smtp_url = Some(sink.url())).await;
    let to_addr = unique_addr("py");
    let queue = f.farm.queue.clone();
    let env = python_env(&f.farm.settings);
    let to_clone = to_addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_python(
            "notify_client.py",
            &[&queue, &to_clone, "+14155550199"],
            &env,
        )
    })
    .await
    .unwrap();
    let out: Value = serde_json::from_str(out.trim()).unwrap();
    let received = sink.to(&to_addr);
    assert_eq!(received.len(), 1);
    let mail = parse_eml(&received[0].1);
    assert_eq!(mail["subject"], "欢迎 from Celery");
    assert_eq!(mail["to"], format!("李雷 <{to_addr}>"));
    assert_eq!(out["email"]["message_id"], mail["message_id"]);
    assert_eq!(out["email"]["accepted"], json!([to_addr]));
    assert_eq!(out["sms"]["provider"], "outbox");
    assert_eq!(out["bad"]["type"], "HeaderInjection");
    assert!(
        out["bad"]["message"]
            .as_str()
            .unwrap()
            .contains("carriage return"),
        "{out}"
    );
    f.stop().await;
}

#[test]
fn failure_kinds_match_the_retry_rules() {
    // The runtime retries only transient failures; these are the kinds notify relies on.
    let e = TaskError::transient("SmtpDeferred", "x").retry_after(Duration::from_secs(1));
    assert!(matches!(
        e.kind,
        FailureKind::Transient {
            retry_after: Some(_)
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_implicit_tls_with_a_verified_certificate() {
    let bin = notify_worker_binary();
    let root = temp_dir("tls");
    let pki = test_pki(&root.join("pki"));
    let ca = pki.ca;
    let (cert, key) = (
        pki.server_cert.to_str().unwrap(),
        pki.server_key.to_str().unwrap(),
    );
    let mut s = settings();
    s.storage_url = format!("file://{}", root.join("storage").display());
    let client = mediafarm::Client::connect(&s).await.unwrap();
    for mode in ["starttls", "implicit"] {
        let sink = SmtpSink::start(&["--tls", mode, "--cert", cert, "--key", key]);
        let url = match mode {
            "starttls" => format!("smtp://localhost:{}?tls=required", sink.port),
            _ => format!("smtps://localhost:{}", sink.port),
        };
        let queue = mediafarm_tests::unique_queue("notify-tls");
        let mut worker = Command::new(&bin);
        worker
            .args(["-Q", &queue, "--metrics-addr", "127.0.0.1:0"])
            .current_dir(&root)
            .env("MEDIAFARM_BROKER_URL", &s.broker_url)
            .env("MEDIAFARM_RESULT_BACKEND", &s.result_backend)
            .env("MEDIAFARM_STORAGE_URL", &s.storage_url)
            .env("MEDIAFARM_SMTP_URL", &url)
            .env("SSL_CERT_FILE", &ca)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut worker = worker.spawn().expect("notify-worker starts");
        let to_addr = unique_addr(mode);
        let job = client
            .send_task(
                "notify.email",
                json!({"to": to_addr, "subject": "über TLS", "text": "verschlüsselt"})
                    .as_object()
                    .cloned()
                    .unwrap(),
                &to(&queue),
            )
            .await
            .unwrap();
        let out = job.get(WAIT).await;
        let _ = worker.kill();
        let _ = worker.wait();
        mediafarm_tests::delete_queue(&s, &queue).await;
        mediafarm_tests::delete_queue(&s, &mediafarm::amqp::reroute::dead_queue(&queue)).await;
        out.unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        let got = sink.to(&to_addr);
        assert_eq!(got.len(), 1, "{mode}");
        assert_eq!(got[0].0["tls"], mode, "the message travelled over {mode}");
        assert_eq!(parse_eml(&got[0].1)["subject"], "über TLS");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_acceptance_and_record_repeats_with_the_same_message_id() {
    // The documented crash window: the server accepted the email, the worker died before the
    // claim recorded it. After the lease a redelivery sends again, with the same Message-ID.
    let bin = notify_worker_binary();
    let sink = SmtpSink::start(&[]);
    let root = temp_dir("window");
    let mut s = settings();
    s.storage_url = format!("file://{}", root.join("storage").display());
    let notify = NotifySettings {
        email_outbox_dir: root.join("outbox").display().to_string(),
        ..Default::default()
    };
    let queue = mediafarm_tests::unique_queue("notify-window");
    let client = mediafarm::Client::connect(&s).await.unwrap();
    let to_addr = unique_addr("window");
    let mut first = spawn_worker(
        &bin,
        &s,
        &notify,
        &queue,
        &sink.url(),
        Some(("MEDIAFARM_NOTIFY_PAUSE_BEFORE_RECORD_MS", 120_000)),
    );
    let job = client
        .send_task(
            "notify.email",
            json!({"to": to_addr, "subject": "window", "text": "x"})
                .as_object()
                .cloned()
                .unwrap(),
            &to(&queue),
        )
        .await
        .unwrap();
    for _ in 0..600 {
        if !sink.to(&to_addr).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sink.to(&to_addr).len(), 1, "the server accepted the email");
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    // A short SMTP timeout makes the lease (6 x timeout + 10 s) 16 s.
    let mut second = Command::new(&bin);
    second
        .args(["-Q", &queue, "--metrics-addr", "127.0.0.1:0"])
        .current_dir(&root)
        .env("MEDIAFARM_BROKER_URL", &s.broker_url)
        .env("MEDIAFARM_RESULT_BACKEND", &s.result_backend)
        .env("MEDIAFARM_STORAGE_URL", &s.storage_url)
        .env("MEDIAFARM_SMTP_URL", sink.url())
        .env("MEDIAFARM_SMTP_TIMEOUT", "1")
        .env("MEDIAFARM_TASK_MAX_RETRIES", "10")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("second.log")).unwrap());
    let mut second = second.spawn().expect("notify-worker starts");
    let out = job.get(Duration::from_secs(120)).await;
    let _ = second.kill();
    let _ = second.wait();
    mediafarm_tests::delete_queue(&s, &queue).await;
    mediafarm_tests::delete_queue(&s, &mediafarm::amqp::reroute::dead_queue(&queue)).await;
    let out = out.unwrap_or_else(|e| {
        let log = std::fs::read_to_string(root.join("second.log")).unwrap_or_default();
        panic!("the redelivered job did not succeed after the lease: {e:?}\n{log}")
    });
    let got = sink.to(&to_addr);
    assert_eq!(
        got.len(),
        2,
        "at-least-once in the window: sent again after the lease"
    );
    let (a, b) = (parse_eml(&got[0].1), parse_eml(&got[1].1));
    assert_eq!(
        a["message_id"], b["message_id"],
        "the repeat can be recognised"
    );
    assert_eq!(out["message_id"], a["message_id"]);
    let _ = std::fs::remove_dir_all(&root);
}
