use chrono::TimeZone;
use serde_json::{json, Map, Value};

use super::*;

fn embed(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc
        .with_ymd_and_hms(2026, 11, 29, 12, 0, 0)
        .unwrap()
}

/// The embed Celery 5.7 sent for `chain(s1, s2.si(countdown=3), s3.set(priority=5))`,
/// captured from RabbitMQ (the first step's message).
fn celery_chain_embed() -> Map<String, Value> {
    embed(json!({"callbacks": null, "errbacks": null, "chain": [
        {"task": "echo.echo", "args": [], "kwargs": {"c": 3}, "options": {"queue": "q1",
         "priority": 5, "task_id": "f8b94e82-33e7-4b6e-8d74-7427c1b3e5d1",
         "reply_to": "029e8b62-a5f7-3282-8f14-9dfe196704dc"}, "subtask_type": null,
         "immutable": false},
        {"task": "echo.echo", "args": [], "kwargs": {"b": 2}, "options": {"queue": "q1",
         "countdown": 3, "task_id": "118d2bf5-34d6-4037-8fc8-3e0d0b0aaa64",
         "reply_to": "029e8b62-a5f7-3282-8f14-9dfe196704dc"}, "subtask_type": null,
         "immutable": true}],
        "chord": null}))
}

const PARENT: Parent<'static> = Parent {
    id: "p-1",
    root_id: "root-1",
};

#[test]
fn a_celery_chain_decodes_and_the_last_item_runs_next() {
    let c = Canvas::from_embed(&celery_chain_embed()).unwrap();
    assert_eq!(c.chain.len(), 2);
    assert!(c.callbacks.is_empty() && c.errbacks.is_empty());
    let next = on_success(&c, PARENT, &json!({"r": 1}), now());
    assert_eq!(next.publish.len(), 1);
    let p = &next.publish[0];
    assert_eq!(p.queue, "q1");
    let m = &p.msg;
    assert_eq!(
        m.id, "118d2bf5-34d6-4037-8fc8-3e0d0b0aaa64",
        "the producer's id is kept"
    );
    assert_eq!(m.args, Vec::<Value>::new(), "immutable: sent as it is");
    assert_eq!(m.kwargs, embed(json!({"b": 2})));
    assert_eq!(m.eta, Some(now() + chrono::Duration::seconds(3)));
    assert_eq!(m.parent_id.as_deref(), Some("p-1"));
    assert_eq!(m.root_id.as_deref(), Some("root-1"));
    // The rest of the chain travels on untouched.
    assert_eq!(m.embed["chain"], json!([celery_chain_embed()["chain"][0]]));
    assert_eq!(
        next.children,
        vec![json!([
            ["118d2bf5-34d6-4037-8fc8-3e0d0b0aaa64", null],
            null
        ])]
    );

    // The step after: not immutable, so the parent's value comes first; its priority is kept.
    let c = Canvas::from_embed(&m.embed).unwrap();
    let next = on_success(
        &c,
        Parent {
            id: &m.id,
            root_id: "root-1",
        },
        &json!("v"),
        now(),
    );
    let m = &next.publish[0].msg;
    assert_eq!(m.args, vec![json!("v")]);
    assert_eq!(m.priority, Some(5));
    assert_eq!(m.embed["chain"], Value::Null);
    assert_eq!(m.eta, None);
}

#[test]
fn callbacks_get_the_value_and_several_go_out_as_a_group() {
    let c = Canvas::from_embed(&embed(json!({"callbacks": [
        {"task": "notify.webhook", "args": [1], "kwargs": {"url": "u"}, "options": {},
         "subtask_type": null, "immutable": false}
    ]})))
    .unwrap();
    let a = on_success(&c, PARENT, &json!(7), now());
    let b = on_success(&c, PARENT, &json!(7), now());
    assert_eq!(a, b, "the same job sends the same ids again");
    let m = &a.publish[0].msg;
    assert_eq!(
        a.publish[0].queue, "notify",
        "routed as the client routes the name"
    );
    assert_eq!(m.args, vec![json!(7), json!(1)]);
    assert_ne!(m.id, PARENT.id);
    let two = embed(json!({"callbacks": [
        {"task": "a.x", "args": [], "kwargs": {}, "options": {"queue": "qa"}, "immutable": false},
        {"task": "b.y", "args": [], "kwargs": {}, "options": {"routing_key": "qb"}, "immutable": true}
    ]}));
    let next = on_success(&Canvas::from_embed(&two).unwrap(), PARENT, &json!(7), now());
    let queues: Vec<&str> = next.publish.iter().map(|p| p.queue.as_str()).collect();
    assert_eq!(queues, ["qa", "qb"]);
    let group = next.publish[0].msg.group.clone().unwrap();
    assert_eq!(next.publish[1].msg.group.as_deref(), Some(group.as_str()));
    assert_eq!(next.publish[1].msg.group_index, Some(1));
    assert_eq!(next.publish[1].msg.args, Vec::<Value>::new());
    assert_eq!(
        next.children,
        vec![json!([
            [group, null],
            [
                [[next.publish[0].msg.id, null], null],
                [[next.publish[1].msg.id, null], null]
            ]
        ])]
    );
}

#[test]
fn errbacks_get_the_failed_id_old_style() {
    let c = Canvas::from_embed(&embed(json!({"errbacks": [
        {"task": "echo.on_error", "args": ["x"], "kwargs": {}, "options": {"queue": "e"},
         "subtask_type": null, "immutable": false},
        {"task": "echo.fail", "args": [], "kwargs": {}, "options": {"queue": "e"},
         "subtask_type": null, "immutable": true}
    ]})))
    .unwrap();
    assert!(on_success(&c, PARENT, &json!(1), now()).publish.is_empty());
    let sent = on_failure(&c, PARENT, now());
    assert_eq!(sent[0].msg.args, vec![json!("p-1"), json!("x")]);
    assert!(sent[1].msg.args.is_empty());
    assert_eq!(sent[0].msg.parent_id.as_deref(), Some("p-1"));
}

#[test]
fn options_are_honoured_and_stamps_pass_through() {
    let c = Canvas::from_embed(&embed(json!({"chain": [
        {"task": "echo.echo", "args": [], "kwargs": {}, "immutable": true, "options": {
            "eta": "2030-01-01T00:00:00+00:00", "countdown": 5, "expires": 60,
            "time_limit": 30, "soft_time_limit": 20, "shadow": "nick",
            "link": {"task": "echo.after", "options": {}},
            "link_error": [{"task": "echo.err", "options": {}}],
            "stamped_headers": ["tenant"], "tenant": "acme", "retry": true}}
    ]})))
    .unwrap();
    let m = &on_success(&c, PARENT, &json!(1), now()).publish[0].msg;
    assert_eq!(
        m.eta,
        crate::protocol::parse_time("2030-01-01T00:00:00Z"),
        "eta wins"
    );
    assert_eq!(m.expires, Some(now() + chrono::Duration::seconds(60)));
    assert_eq!(
        m.timelimit,
        crate::protocol::TimeLimits {
            hard: Some(30.0),
            soft: Some(20.0)
        }
    );
    assert_eq!(m.shadow.as_deref(), Some("nick"));
    assert_eq!(
        m.embed["callbacks"],
        json!([{"task": "echo.after", "options": {}}])
    );
    assert_eq!(
        m.embed["errbacks"],
        json!([{"task": "echo.err", "options": {}}])
    );
    assert_eq!(m.stamped_headers, Some(json!(["tenant"])));
    assert_eq!(m.stamps, embed(json!({"tenant": "acme"})));
}

#[test]
fn bad_signatures_are_refused_naming_the_field() {
    let cases = [
        (
            json!({"chain": [{"task": "a", "options": {"countdown": "soon"}}]}),
            "embed `chain`[0] option `countdown`",
        ),
        (
            json!({"chain": [{"task": "a", "options": {"priority": 300}}]}),
            "`priority`",
        ),
        (
            json!({"callbacks": [{"task": 5}]}),
            "embed `callbacks`[0] field `task`",
        ),
        (json!({"callbacks": [{"args": []}]}), "has no `task` field"),
        (
            json!({"callbacks": [{"task": "a", "args": {}}]}),
            "field `args` must be a list",
        ),
        (
            json!({"callbacks": [{"task": "a", "immutable": "yes"}]}),
            "field `immutable`",
        ),
        (json!({"errbacks": "a"}), "embed `errbacks` must be a list"),
        (
            json!({"chain": [{"task": "a", "options": {"link": [{"task": 1}]}}]}),
            "embed `chain`[0] option `link`[0] field `task`",
        ),
        (
            json!({"chain": [{"task": "a b.c"}]}),
            "default queue is \"a b\", which is not a queue name",
        ),
        (
            json!({"chain": [{"task": "a", "options": {"queue": "x".repeat(300)}}]}),
            "option `queue`",
        ),
    ];
    for (e, want) in cases {
        let err = Canvas::from_embed(&embed(e.clone())).unwrap_err();
        assert!(matches!(err, CanvasError::Invalid(_)), "{e}: {err:?}");
        assert!(err.to_string().contains(want), "{e}: {err}");
        assert!(err.to_string().len() < 400, "values are cut short: {err}");
    }
}

#[test]
fn unsupported_canvas_is_named_never_dropped() {
    let step =
        |k: i64| json!({"task": "canvas.step", "kwargs": {"k": k}, "options": {"queue": "q"}});
    let group = |tasks: Value| {
        json!({"task": "celery.group", "kwargs": {"tasks": tasks}, "options": {},
               "subtask_type": "group"})
    };
    let chord = |header: Value, body: Value| {
        json!({"task": "celery.chord", "kwargs": {"header": header, "body": body, "kwargs": {}},
               "options": {}, "subtask_type": "chord"})
    };
    let cases = [
        (
            json!({"chord": {"task": "celery.chunks", "subtask_type": "chunks", "kwargs": {}}}),
            "chunks",
        ),
        (
            json!({"callbacks": [{"task": "celery.map", "subtask_type": "xmap",
                                  "kwargs": {"task": step(1), "it": [1, 2]}}]}),
            "is a xmap (subtask_type \"xmap\")",
        ),
        (
            // As Celery 5.7 sends `xmap(...)`: a plain signature of its built-in task.
            json!({"callbacks": [{"task": "celery.map", "subtask_type": null, "immutable": true,
                                  "kwargs": {"task": step(1), "it": [1, 2]}, "options": {}}]}),
            "embed `callbacks`[0] is Celery's xmap (task celery.map)",
        ),
        (
            json!({"chain": [{"task": "celery.chunks", "args": [], "options": {},
                              "kwargs": {"task": step(1), "it": [[1]], "n": 1}}]}),
            "chunks",
        ),
        (
            json!({"chain": [{"task": "celery.starmap", "subtask_type": "xstarmap",
                              "kwargs": {}}]}),
            "xstarmap",
        ),
        (
            json!({"chain": [chord(group(json!([step(1), chord(group(json!([step(2)])), step(3))])),
                                   step(4))]}),
            "a group whose member 1 is a chord",
        ),
        (
            json!({"chain": [step(5), chord(group(json!([step(1)])), group(json!([step(2)])))]}),
            "a chord whose body is a group followed by more steps",
        ),
        (
            json!({"chain": [step(5), {"task": "celery.chain", "subtask_type": "chain",
                              "options": {"queue": "elsewhere"},
                              "kwargs": {"tasks": [step(1), step(2)]}}]}),
            "a chain inside it with option `queue`",
        ),
        (
            json!({"chain": [step(3), group(json!([step(1)])), group(json!([step(2)]))]}),
            "a group followed by a group",
        ),
        (
            json!({"chord": {"task": "celery.chain", "subtask_type": "chain", "options": {},
                             "kwargs": {"tasks": [group(json!([step(1)])), step(2)]}}}),
            "embed `chord` is a chain led by a chord",
        ),
        (
            json!({"callbacks": [{"task": "celery.group", "kwargs": {"tasks": [step(1)]},
                                  "options": {"queue": "elsewhere"}, "subtask_type": "group"}]}),
            "a group with option `queue`",
        ),
        (
            json!({"errbacks": [group(json!([step(1)]))]}),
            "errbacks that are single tasks",
        ),
        (json!({"sideways": [1]}), "sideways"),
    ];
    for (e, want) in cases {
        let mut msg = crate::protocol::TaskMessage::new("t", Map::new());
        msg.embed = embed(e.clone());
        msg.group = Some("g".into());
        let err = Canvas::from_message(&msg).unwrap_err();
        assert_eq!(err.exc_type(), "UnsupportedCanvas", "{e}: {err}");
        assert!(err.to_string().contains(want), "{e}: {err}");
    }
    let broken = [
        (
            json!({"chain": [{"task": "celery.chain", "subtask_type": "chain"}]}),
            "`kwargs.tasks`",
        ),
        (
            json!({"chain": [{"task": "celery.chord", "subtask_type": "chord",
                           "kwargs": {"body": step(1)}}]}),
            "without `kwargs.header`",
        ),
        (
            json!({"chain": [chord(step(1), step(2))]}),
            "whose header is the task",
        ),
    ];
    for (e, want) in broken {
        let err = Canvas::from_embed(&embed(e.clone())).unwrap_err();
        assert_eq!(err.exc_type(), "InvalidMessage", "{e}: {err}");
        assert!(err.to_string().contains(want), "{e}: {err}");
    }
    assert!(
        Canvas::from_embed(&embed(json!({"chord": null, "callbacks": null})))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn nesting_is_bounded() {
    let mut sig = json!({"task": "a"});
    for _ in 0..40 {
        sig = json!({"task": "a", "options": {"link": [sig]}});
    }
    let err = Canvas::from_embed(&embed(json!({"callbacks": [sig]}))).unwrap_err();
    assert!(err.to_string().contains("nest deeper"), "{err}");
}

pub(crate) mod nested;

mod chord {
    use super::*;
    use crate::backend::result::{ResultMeta, TaskState};
    use crate::canvas::chord::{
        body_failure, body_message, chain_failures, is_complete, member, results, ChordFailure,
    };
    use crate::protocol::TaskMessage;

    /// A header message as Celery 5.7 sent it for `chord([h1, h2], body.set(link_error=eb))`,
    /// captured from RabbitMQ.
    fn header(index: i64) -> TaskMessage {
        let mut msg = TaskMessage::new("canvas.step", Map::new());
        msg.id = format!("h-{index}");
        msg.group = Some("5c8f12b1-a5bd-4968-b73a-4fe98bde8520".into());
        msg.group_index = Some(index);
        msg.embed = embed(
            json!({"callbacks": null, "errbacks": null, "chain": null, "chord": {
            "task": "canvas.step", "args": [], "kwargs": {"body": 1}, "options": {
                "queue": "chordcap", "link_error": {"task": "canvas.on_error", "args": [],
                "kwargs": {}, "options": {"queue": "chordcap"}, "subtask_type": null,
                "immutable": false}, "task_id": "f679c3e3-d68c-4bae-b7b0-18d6e82abe17",
                "reply_to": "4d5da7bd-36a3-3626-be3e-07413a33d86c",
                "group_id": "5c8f12b1-a5bd-4968-b73a-4fe98bde8520"},
            "subtask_type": null, "immutable": false}}),
        );
        msg
    }

    #[test]
    fn a_header_decodes_with_its_group_and_index() {
        let c = Canvas::from_message(&header(1)).unwrap();
        let part = c.chord.expect("a chord part");
        assert_eq!(part.group, "5c8f12b1-a5bd-4968-b73a-4fe98bde8520");
        assert_eq!(part.index, Some(1));
        assert_eq!(part.body.task, "canvas.step");
        let mut no_group = header(0);
        no_group.group = None;
        let err = Canvas::from_message(&no_group).unwrap_err();
        assert_eq!(err.exc_type(), "InvalidMessage");
        assert!(err.to_string().contains("no `group` header"), "{err}");
    }

    #[test]
    fn a_member_is_the_same_bytes_when_read_back_from_the_stored_record() {
        let result =
            json!({"z": 1.5, "a": [1, "x", null], "m": {"k": 1e300, "b": true}, "u": "é\u{1}"});
        let meta = ResultMeta::success("t-1", result.clone());
        let stored = serde_json::to_vec(&meta).unwrap();
        let back: ResultMeta = serde_json::from_slice(&stored).unwrap();
        let first = member("t-1", &meta.status, &meta.result);
        assert_eq!(first, member("t-1", &back.status, &back.result));
        assert!(first.starts_with(r#"[1,"t-1","SUCCESS","#), "{first}");
        let parsed: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(parsed, json!([1, "t-1", "SUCCESS", result]));
    }

    #[test]
    fn the_chord_completes_when_the_count_reaches_size_plus_diff() {
        assert!(is_complete(3, 0, Some(3)));
        assert!(!is_complete(2, 0, Some(3)));
        assert!(is_complete(4, 1, Some(3)), "add_to_chord grew it");
        assert!(!is_complete(3, 1, Some(3)));
        assert!(
            !is_complete(3, 0, None),
            "no size: the producer never set one"
        );
        assert!(!is_complete(0, 0, Some(0)));
    }

    #[test]
    fn results_come_in_order_or_the_first_failure_as_celery_words_it() {
        let ok = [
            member("a", &TaskState::Success, &json!({"h": 1})),
            // As a Python worker encodes it: spaces after separators.
            r#"[1, "b", "SUCCESS", {"h": 2}]"#.to_owned(),
        ];
        assert_eq!(
            results(&ok).unwrap(),
            vec![json!({"h": 1}), json!({"h": 2})]
        );
        let failed = [
            ok[0].clone(),
            member(
                "b",
                &TaskState::Failure,
                &json!({"exc_type": "StepFailure", "exc_message": ["it's \"bad\""],
                        "exc_module": "mediafarm.errors"}),
            ),
            member(
                "c",
                &TaskState::Revoked,
                &json!({"exc_type": "TaskRevokedError", "exc_message": ["x"],
                        "exc_module": "celery.exceptions"}),
            ),
        ];
        let failure = results(&failed).unwrap_err();
        assert_eq!(
            failure.reason,
            r#"Dependency b raised StepFailure('it\'s "bad"')"#
        );
        assert_eq!(
            failure.cause.unwrap()["exc_type"],
            "StepFailure",
            "the failed header's own exception, for a group body's tasks"
        );
        let broken = results(&["nope".to_owned()]).unwrap_err();
        assert!(broken.reason.starts_with("Join error"));
        assert_eq!(broken.cause, None);
    }

    #[test]
    fn the_body_gets_the_results_first_and_the_completing_header_as_parent() {
        let msg = header(1);
        let part = Canvas::from_message(&msg).unwrap().chord.unwrap();
        let sent = body_message(
            &part,
            vec![json!(1), json!(2)],
            Parent {
                id: "h-1",
                root_id: "r",
            },
            now(),
        );
        assert_eq!(sent.publish.len(), 1);
        assert!(sent.chord_sizes.is_empty());
        let p = &sent.publish[0];
        assert_eq!(p.queue, "chordcap");
        assert_eq!(p.msg.id, "f679c3e3-d68c-4bae-b7b0-18d6e82abe17");
        assert_eq!(p.msg.args, vec![json!([1, 2])]);
        assert_eq!(p.msg.kwargs, embed(json!({"body": 1})));
        assert_eq!(p.msg.parent_id.as_deref(), Some("h-1"));
        assert_eq!(p.msg.root_id.as_deref(), Some("r"));
        assert_eq!(p.msg.group.as_deref(), Some(part.group.as_str()));
        assert_eq!(p.msg.embed["errbacks"][0]["task"], "canvas.on_error");
        let mut immutable = part.clone();
        immutable.body.immutable = true;
        let p = body_message(&immutable, vec![json!(1)], PARENT, now());
        assert!(p.publish[0].msg.args.is_empty());
    }

    #[test]
    fn a_failed_header_fails_the_body_with_chord_error_and_sends_its_errbacks() {
        let part = Canvas::from_message(&header(0)).unwrap().chord.unwrap();
        let failure = ChordFailure {
            reason: "Dependency b raised X('y')".into(),
            cause: Some(json!({"exc_type": "X", "exc_message": ["y"], "exc_module": "m"})),
        };
        let (metas, errbacks) = body_failure(&part, &failure, now());
        assert_eq!(metas.len(), 1);
        let meta = &metas[0];
        assert_eq!(meta.task_id, "f679c3e3-d68c-4bae-b7b0-18d6e82abe17");
        assert_eq!(meta.status, TaskState::Failure);
        let e = meta.error().unwrap();
        assert_eq!(
            (
                e.exc_type.as_ref(),
                e.exc_module.as_ref(),
                e.message.as_str()
            ),
            (
                "ChordError",
                "celery.exceptions",
                "Dependency b raised X('y')"
            )
        );
        assert_eq!(errbacks.len(), 1);
        let m = &errbacks[0].msg;
        assert_eq!(m.task, "canvas.on_error");
        assert_eq!(m.args, vec![json!(meta.task_id)]);
        assert_eq!(m.parent_id.as_deref(), Some(meta.task_id.as_str()));
        assert_eq!(m.root_id.as_deref(), Some(meta.task_id.as_str()));
        let (_, again) = body_failure(&part, &failure, now());
        assert_eq!(
            again[0].msg.id, m.id,
            "a second join sends the same errback id"
        );
    }

    /// Celery 5.7's `_fail_chain`: `chain(a, chord(h, body), c, d)` puts `[d, c]` in the
    /// body's options; a failed header fails them with the body's `ChordError`.
    #[test]
    fn a_failed_header_fails_the_chain_that_follows_the_chord() {
        let mut msg = header(0);
        let step = |id: &str| {
            json!({"task": "canvas.step", "args": [], "kwargs": {},
                   "options": {"task_id": id, "queue": "chordcap"},
                   "subtask_type": null, "immutable": false})
        };
        msg.embed["chord"]["options"]["chain"] = json!([step("d"), step("c")]);
        let part = Canvas::from_message(&msg).unwrap().chord.unwrap();
        let failure = ChordFailure {
            reason: "Dependency b raised X('y')".into(),
            cause: None,
        };
        let (metas, errbacks) = body_failure(&part, &failure, now());
        let ids: Vec<&str> = metas.iter().map(|m| m.task_id.as_str()).collect();
        assert_eq!(ids, ["f679c3e3-d68c-4bae-b7b0-18d6e82abe17", "d", "c"]);
        for meta in &metas[1..] {
            assert_eq!(meta.status, TaskState::Failure);
            let e = meta.error().unwrap();
            assert_eq!(e.exc_type, "ChordError");
            assert_eq!(e.message, "Dependency b raised X('y')");
            assert_eq!(meta.traceback, None, "Celery passes no traceback");
        }
        assert_eq!(errbacks.len(), 1, "the chain's steps send no errbacks");
    }

    #[test]
    fn failing_a_chain_descends_into_a_chord_step_and_skips_steps_without_an_id() {
        let chain = [
            json!({"task": "celery.chord", "args": [], "subtask_type": "chord",
                   "options": {"task_id": "k"}, "immutable": false,
                   "kwargs": {"header": {"task": "celery.group", "args": [], "kwargs": {"tasks": []},
                                         "options": {}, "subtask_type": "group", "immutable": false},
                              "body": {"task": "z", "args": [], "kwargs": {}, "subtask_type": null,
                                       "options": {"task_id": "z-id", "group_id": "g"},
                                       "immutable": false}}}),
            json!({"task": "no-id", "args": [], "kwargs": {}, "options": {},
                   "subtask_type": null, "immutable": false}),
        ];
        let metas = chain_failures(&chain, "why");
        let ids: Vec<&str> = metas.iter().map(|m| m.task_id.as_str()).collect();
        assert_eq!(ids, ["k", "z-id"]);
        assert_eq!(metas[1].extra["group_id"], "g");
        assert!(!metas[0].extra.contains_key("group_id"));
        assert!(chain_failures(&[], "why").is_empty());
    }
}
