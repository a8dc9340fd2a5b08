use chrono::Utc;
use serde_json::{json, Map, Value};

use super::*;
use crate::canvas::Canvas;

fn kw(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn step(n: i64) -> Signature {
    Signature::new("echo.echo", kw(json!({ "n": n })))
}

#[test]
fn a_signature_encodes_as_celerys_dict_and_decodes_back() {
    let sig = step(1)
        .queue("image")
        .countdown(2.0)
        .priority(5)
        .time_limit(30.0)
        .soft_time_limit(20.0)
        .task_id("t-1")
        .link(step(2).si())
        .link_error(step(3));
    let v = sig.to_value();
    assert_eq!(v["task"], "echo.echo");
    assert_eq!(v["subtask_type"], Value::Null);
    assert_eq!(v["immutable"], false);
    assert_eq!(v["options"]["link"][0]["immutable"], true);
    let d = crate::canvas::Signature::decode(&v, "t").expect("decodes");
    assert_eq!(d.queue, "image");
    assert_eq!(d.options.task_id.as_deref(), Some("t-1"));
    assert_eq!(d.options.priority, Some(5));
    assert_eq!(d.options.link.len(), 1);
    assert_eq!(d.options.link_error.len(), 1);
    assert_eq!(Signature::from_json(&v, "t").expect("reads back"), sig);
}

#[test]
fn a_chain_sends_its_first_step_with_the_rest_reversed_and_every_id_assigned() {
    let plan = chain([
        step(1),
        step(2).si().task_id("fixed"),
        step(3).queue("other"),
    ])
    .plan(Utc::now())
    .expect("plan");
    assert_eq!(plan.queue, "echo");
    assert_eq!(plan.ids.len(), 3);
    assert_eq!(plan.ids[1], "fixed");
    assert_eq!(plan.msg.id, plan.ids[0]);
    assert_eq!(plan.msg.root_id.as_deref(), Some(plan.ids[0].as_str()));
    let canvas = Canvas::from_embed(&plan.msg.embed).expect("a worker reads the embed");
    let ids: Vec<_> = canvas
        .chain
        .iter()
        .map(|s| s.options.task_id.clone().unwrap_or_default())
        .collect();
    assert_eq!(ids, [plan.ids[2].clone(), plan.ids[1].clone()], "reversed");
    assert_eq!(canvas.chain[0].queue, "other");
    assert!(canvas.chain[1].immutable);
    assert!(chain(Vec::<Signature>::new()).plan(Utc::now()).is_err());
}

#[test]
fn a_group_in_a_chain_is_sent_as_a_chord_step_a_worker_carries_out() {
    let plan = chain([
        Step::from(step(1)),
        group([step(2), step(3)]).into(),
        step(4).task_id("body").into(),
        chord([step(5)], step(6)).into(),
    ])
    .plan(Utc::now())
    .expect("plan");
    assert_eq!(
        plan.ids.len(),
        3,
        "the first, the chord's body, the last chord's body"
    );
    assert_eq!(plan.ids[1], "body");
    let canvas = Canvas::from_embed(&plan.msg.embed).expect("a worker reads the embed");
    assert_eq!(canvas.chain.len(), 2);
    let crate::canvas::Kind::Chord(c) = &canvas.chain[1].kind else {
        panic!("not a chord: {:?}", canvas.chain[1])
    };
    assert_eq!(c.body.options.task_id.as_deref(), Some("body"));
    let crate::canvas::Kind::Group(members) = &c.header.kind else {
        panic!("not a group")
    };
    assert_eq!(members.len(), 2);
    assert_eq!(members[1].options.group_index, Some(1));
    assert!(members.iter().all(|m| m.options.task_id.is_some()));
    // What a worker sends once the first step returns.
    let parent = crate::canvas::Parent {
        id: &plan.msg.id,
        root_id: &plan.msg.id,
    };
    let next = crate::canvas::on_success(&canvas, parent, &json!(1), Utc::now());
    assert_eq!(next.publish.len(), 2);
    assert_eq!(next.chord_sizes.len(), 1);
    assert_eq!(next.publish[0].msg.args, vec![json!(1)]);

    let first = chain([Step::from(group([step(2)])), step(1).into()]).plan(Utc::now());
    assert!(first
        .expect_err("refused")
        .to_string()
        .contains("first step must be a task"));
}

#[test]
fn a_bad_step_fails_before_anything_is_sent() {
    let bad = step(2).set("countdown", json!("soon"));
    let err = chain([step(1), bad]).plan(Utc::now()).expect_err("refused");
    assert!(err.to_string().contains("chain step 1"), "{err}");
    assert!(err.to_string().contains("countdown"), "{err}");
}

#[test]
fn a_group_numbers_its_members_under_one_id() {
    let mut g = group([step(1), step(2), step(3)]);
    g.id = Some("g-1".into());
    let plan = g.plan(Utc::now()).expect("plan");
    assert_eq!(plan.id, "g-1");
    for (i, (queue, msg)) in plan.publish.iter().enumerate() {
        assert_eq!(queue, "echo");
        assert_eq!(msg.group.as_deref(), Some("g-1"));
        assert_eq!(msg.group_index, Some(i as i64));
        assert_eq!(msg.kwargs["n"], json!(i + 1));
    }
}

#[test]
fn a_chord_carries_its_body_in_every_header_and_counts_the_header() {
    let mut c = chord([step(1), step(2)], step(9).task_id("body"));
    c.id = Some("g-2".into());
    let plan = c.plan(Utc::now()).expect("plan");
    assert_eq!(plan.group_id, "g-2");
    assert_eq!(plan.size, 2);
    assert_eq!(plan.body_id, "body");
    assert_eq!(chord_size_key("g-2"), "celery-taskset-meta-g-2.s");
    for (i, (_, msg)) in plan.publish.iter().enumerate() {
        assert_eq!(msg.group.as_deref(), Some("g-2"));
        assert_eq!(msg.group_index, Some(i as i64));
        let body = &msg.embed["chord"];
        assert_eq!(body["task"], "echo.echo");
        assert_eq!(body["options"]["task_id"], "body");
        assert_eq!(body["options"]["group_id"], "g-2");
        assert_eq!(body["subtask_type"], Value::Null);
    }
    // An empty header sends the body at once with an empty list, as Celery does.
    let plan = chord([], step(9)).plan(Utc::now()).expect("plan");
    assert_eq!(plan.size, 0);
    assert_eq!(plan.publish.len(), 1);
    assert_eq!(plan.publish[0].1.args, vec![json!([])]);
    assert_eq!(plan.publish[0].1.id, plan.body_id);
}

#[test]
fn a_workflow_reads_from_json_and_refuses_what_it_does_not_know() {
    let w = Workflow::from_json(&json!({"chain": [
        {"task": "image.transform", "kwargs": {"source": "a.png"}},
        {"task": "notify.webhook", "kwargs": {"url": "https://x"}, "options": {"countdown": 1}},
    ]}))
    .expect("a chain");
    let Workflow::Chain(c) = w else {
        panic!("not a chain: {w:?}")
    };
    assert_eq!(c.steps.len(), 2);
    let Step::Task(second) = &c.steps[1] else {
        panic!("not a task: {c:?}")
    };
    assert_eq!(second.options["countdown"], json!(1));
    let w = Workflow::from_json(&json!({"chain": [
        {"task": "a.b"},
        {"group": [{"task": "c.d"}, {"task": "c.e"}]},
        {"task": "f.g"},
    ]}))
    .expect("a chain with a group");
    assert!(matches!(w, Workflow::Chain(ref c) if matches!(c.steps[1], Step::Group(_))));

    let w = Workflow::from_json(&json!({"chord": {"header": [{"task": "a.b"}], "body": {"task": "c.d", "immutable": true}}}))
        .expect("a chord");
    assert!(
        matches!(w, Workflow::Chord(ref c) if matches!(c.body, Body::Task(ref b) if b.immutable) && c.header.len() == 1)
    );
    let w = Workflow::from_json(&json!({"chord": {"header": [{"task": "a.b"}],
        "body": {"chain": [{"task": "c.d"}, {"task": "c.e"}]}}}))
    .expect("a chord whose body is a chain");
    assert!(
        matches!(w, Workflow::Chord(ref c) if matches!(c.body, Body::Chain(ref b) if b.steps.len() == 2))
    );
    let w = Workflow::from_json(&json!({"chain": [{"task": "a.b"}, {"group": [{"task": "c.d"}]}]}))
        .expect("a chain ending in a group");
    assert!(matches!(w, Workflow::Chain(ref c) if c.ends_in_group()));
    assert!(matches!(
        Workflow::from_json(&json!({"task": "a.b"})),
        Ok(Workflow::Task(_))
    ));

    let refused = |v: Value, words: &str| {
        let e = Workflow::from_json(&v).expect_err("refused").to_string();
        assert!(e.contains(words), "{e} lacks {words}");
    };
    refused(json!({"chain": []}), "at least one step");
    refused(json!({"chunks": []}), "unknown workflow kind `chunks`");
    refused(
        json!({"chain": [{"task": "a.b", "options": {"countdwn": 1}}]}),
        "unknown option `countdwn`",
    );
    refused(
        json!({"chain": [{"chain": []}]}),
        "chain[0]: a chain step is a signature, a group or a chord, not a chain",
    );
    refused(
        json!({"chain": [{"task": "a.b", "subtask_type": "group"}]}),
        "not nested groups",
    );
    refused(
        json!({"group": [{"task": "a.b", "kwargs": [1]}]}),
        "group[0] field `kwargs`",
    );
    refused(
        json!({"chord": {"header": [], "bdy": {}}}),
        "unknown field `bdy`",
    );
    refused(json!([1]), "a workflow is a JSON object");
}

/// The embed `chain` Celery 5.7 sent with the first step of
/// `chain(step(a=1), group(step(b=1), step(c=1)))`, captured from RabbitMQ (ids and the
/// producer's `reply_to` aside, which the Rust producer does not send).
const CELERY_CHAIN_GROUP: &str = r#"[{"task": "celery.group", "args": [], "kwargs": {"tasks": [{"task": "canvas.step", "args": [], "kwargs": {"b": 1}, "options": {"queue": "q", "task_id": "57badea8-d713-439d-8299-817caa5147bd", "reply_to": "1f146e54-b955-3f00-900d-2f10c47e6dce", "group_index": 0}, "subtask_type": null, "immutable": false}, {"task": "canvas.step", "args": [], "kwargs": {"c": 1}, "options": {"queue": "q", "task_id": "28389b1f-9d2e-49aa-b8bc-b35a7ae7c4e0", "reply_to": "1f146e54-b955-3f00-900d-2f10c47e6dce", "group_index": 1}, "subtask_type": null, "immutable": false}]}, "options": {"task_id": "8c70ee22-a150-48ed-b56b-a88b79a07ee4", "root_id": null, "parent_id": null}, "subtask_type": "group", "immutable": false}]"#;

/// `v` with every id replaced by its first appearance's number and `reply_to` dropped, so two
/// wire forms compare by shape.
fn shape(v: &Value, ids: &mut Vec<String>) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "reply_to")
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("task_id" | "group_id", Value::String(id)) => {
                            let n = ids.iter().position(|x| x == id).unwrap_or_else(|| {
                                ids.push(id.clone());
                                ids.len() - 1
                            });
                            json!(format!("id{n}"))
                        }
                        _ => shape(v, ids),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|i| shape(i, ids)).collect()),
        other => other.clone(),
    }
}

fn canvas_step(k: &str) -> Signature {
    Signature::new("canvas.step", kw(json!({ k: 1 }))).queue("q")
}

#[test]
fn a_chain_ending_in_a_group_is_sent_as_celery_sends_it() {
    let plan = chain([
        Step::from(canvas_step("a")),
        group([canvas_step("b"), canvas_step("c")]).into(),
    ])
    .plan(Utc::now())
    .expect("plan");
    let celery: Value = serde_json::from_str(CELERY_CHAIN_GROUP).unwrap();
    assert_eq!(
        shape(&plan.msg.embed["chain"], &mut Vec::new()),
        shape(&celery, &mut Vec::new()),
        "the same wire form as Celery 5.7's"
    );
    let members = plan.last_group.clone().expect("it ends in a group");
    assert_eq!(members.len(), 2);
    assert_eq!(plan.ids.len(), 2, "the first step and the group");
    assert_eq!(
        plan.msg.embed["chain"][0]["options"]["task_id"],
        json!(plan.ids[1])
    );
    // What a worker sends once the first step returns: the members, in the group.
    let canvas = Canvas::from_embed(&plan.msg.embed).expect("a worker reads the embed");
    let parent = crate::canvas::Parent {
        id: &plan.msg.id,
        root_id: &plan.msg.id,
    };
    let next = crate::canvas::on_success(&canvas, parent, &json!({"a": 1}), Utc::now());
    let sent: Vec<&str> = next.publish.iter().map(|p| p.msg.id.as_str()).collect();
    assert_eq!(sent, members);
    for (i, p) in next.publish.iter().enumerate() {
        assert_eq!(p.msg.group.as_deref(), Some(plan.ids[1].as_str()));
        assert_eq!(p.msg.group_index, Some(i as i64));
        assert_eq!(p.msg.args, vec![json!({"a": 1})]);
    }
    let json = Workflow::from_json(&json!({"chain": [
        {"task": "canvas.step"}, {"group": [{"task": "canvas.step"}]}]}))
    .expect("reads");
    let Workflow::Chain(c) = json else {
        panic!("a chain")
    };
    assert!(c.plan(Utc::now()).expect("plan").last_group.is_some());
}

#[test]
fn a_chord_whose_body_is_a_chain_carries_it_as_celery_does() {
    let body = chain([canvas_step("b1"), canvas_step("b2")]);
    let mut c = chord([canvas_step("h"), canvas_step("h")], body);
    c.id = Some("12108be6-b2b1-40f5-a7c2-4b6a33e0524e".into());
    let plan = c.plan(Utc::now()).expect("plan");
    assert_eq!(plan.body_chain.len(), 2);
    assert_eq!(plan.body_chain.last(), Some(&plan.body_id));
    let celery: Value =
        serde_json::from_str(crate::canvas::tests::nested::CELERY_CHAIN_BODY).unwrap();
    for (_, msg) in &plan.publish {
        let mut ids = vec![plan.group_id.clone()];
        let mut celery_ids = vec![plan.group_id.clone()];
        assert_eq!(
            shape(&msg.embed["chord"], &mut ids),
            shape(&celery, &mut celery_ids),
            "the same wire form as Celery 5.7's"
        );
        assert_eq!(msg.group.as_deref(), Some(plan.group_id.as_str()));
    }
    // A chain's chord step whose body is a chain: a chord of its first step, then the rest.
    let plan = chain([
        Step::from(canvas_step("a")),
        chord(
            [canvas_step("h")],
            chain([canvas_step("b1"), canvas_step("b2").task_id("b2")]),
        )
        .into(),
        canvas_step("e").into(),
    ])
    .plan(Utc::now())
    .expect("plan");
    let steps = &plan.msg.embed["chain"];
    assert_eq!(steps.as_array().map(Vec::len), Some(3), "{steps}");
    assert_eq!(steps[2]["subtask_type"], "chord");
    assert_eq!(steps[2]["kwargs"]["body"]["kwargs"], json!({"b1": 1}));
    assert_eq!(steps[1]["options"]["task_id"], "b2");
    assert_eq!(steps[0]["kwargs"], json!({"e": 1}));
    // An empty header sends the chain's first step at once, with the rest as its chain.
    let plan = chord([], chain([canvas_step("b1"), canvas_step("b2")]))
        .plan(Utc::now())
        .expect("plan");
    let (queue, msg) = &plan.publish[0];
    assert_eq!(queue, "q");
    assert_eq!(msg.id, plan.body_chain[0]);
    assert_eq!(msg.args, vec![json!([])]);
    assert_eq!(
        msg.embed["chain"][0]["options"]["task_id"],
        json!(plan.body_id)
    );
    assert_eq!(msg.parent_id, None);
    // A body chain ending in a group is refused: the chord's result is one task's.
    let err = chord(
        [canvas_step("h")],
        chain([
            Step::from(canvas_step("b1")),
            group([canvas_step("x")]).into(),
        ]),
    )
    .plan(Utc::now())
    .expect_err("refused");
    assert!(err.to_string().contains("must end in a task"), "{err}");
}

/// The header messages' embed `chord`, each the same, in `shape` with the chord's group first.
fn sent_body(plan: &ChordPlan) -> Value {
    let bodies: Vec<Value> = plan
        .publish
        .iter()
        .map(|(_, m)| shape(&m.embed["chord"], &mut vec![plan.group_id.clone()]))
        .collect();
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    bodies[0].clone()
}

#[test]
fn a_chord_whose_body_is_a_group_carries_it_as_celery_does() {
    let c = chord(
        [canvas_step("h")],
        group([canvas_step("x"), canvas_step("y")]),
    );
    let plan = c.plan(Utc::now()).expect("plan");
    let celery: Value =
        serde_json::from_str(crate::canvas::tests::nested::CELERY_GROUP_BODY).unwrap();
    assert_eq!(
        sent_body(&plan),
        shape(
            &celery,
            &mut vec!["359e11e6-3394-434b-8f18-7dd90443bffe".into()]
        ),
        "the same wire form as Celery 5.7's"
    );
    let members = plan.body_group.clone().expect("a group body");
    let body = &plan.publish[0].1.embed["chord"];
    assert_eq!(body["options"]["task_id"], json!(plan.body_id));
    assert_eq!(
        body["kwargs"]["tasks"][1]["options"]["task_id"],
        json!(members[1])
    );
    // The worker's join sends each task the results, in the group.
    let part = Canvas::from_message(&plan.publish[0].1)
        .expect("a worker reads it")
        .chord
        .expect("a chord header");
    let parent = crate::canvas::Parent {
        id: "h",
        root_id: "h",
    };
    let sent = crate::canvas::chord::body_message(&part, vec![json!(1)], parent, Utc::now());
    let ids: Vec<&str> = sent.publish.iter().map(|p| p.msg.id.as_str()).collect();
    assert_eq!(ids, members.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(sent
        .publish
        .iter()
        .all(|p| p.msg.group.as_deref() == Some(plan.body_id.as_str())));
    // An empty header sends the group's tasks at once, each with [].
    let plan = chord([], group([canvas_step("x"), canvas_step("y")]))
        .plan(Utc::now())
        .expect("plan");
    assert_eq!(plan.publish.len(), 2);
    assert!(plan.publish.iter().all(|(_, m)| m.args == vec![json!([])]));
}

#[test]
fn a_chord_whose_body_is_a_chord_carries_it_as_celery_does() {
    let inner = chord([canvas_step("x"), canvas_step("y")], canvas_step("z"));
    let plan = chord([canvas_step("h")], inner.clone())
        .plan(Utc::now())
        .expect("plan");
    let celery: Value =
        serde_json::from_str(crate::canvas::tests::nested::CELERY_CHORD_BODY).unwrap();
    assert_eq!(
        sent_body(&plan),
        shape(
            &celery,
            &mut vec!["7f5af501-0038-4248-a38e-4a80a0335aac".into()]
        ),
        "the same wire form as Celery 5.7's"
    );
    let body = &plan.publish[0].1.embed["chord"];
    assert_eq!(
        body["kwargs"]["body"]["options"]["task_id"],
        json!(plan.body_id)
    );
    assert!(plan.body_group.is_none());
    // Its body must be a task, and it needs a header.
    let err = chord(
        [canvas_step("h")],
        chord([canvas_step("x")], group([canvas_step("z")])),
    )
    .plan(Utc::now())
    .expect_err("refused");
    assert!(err.to_string().contains("must have a task"), "{err}");
    let err = chord([canvas_step("h")], chord([], canvas_step("z")))
        .plan(Utc::now())
        .expect_err("refused");
    assert!(err.to_string().contains("needs a header"), "{err}");
    // As JSON, for `mediafarm submit --workflow`.
    let w = Workflow::from_json(&json!({"chord": {"header": [{"task": "canvas.step"}],
        "body": {"chord": {"header": [{"task": "canvas.step"}], "body": {"task": "canvas.step"}}}}}))
    .expect("reads");
    assert!(matches!(w, Workflow::Chord(ref c) if matches!(c.body, Body::Chord(_))));
    let w = Workflow::from_json(&json!({"chord": {"header": [{"task": "canvas.step"}],
        "body": {"group": [{"task": "canvas.step"}, {"task": "canvas.step"}]}}}))
    .expect("reads");
    assert!(
        matches!(w, Workflow::Chord(ref c) if matches!(c.body, Body::Group(ref g) if g.members.len() == 2))
    );
    // Not as a chain's chord step.
    let err = chain([
        Step::from(canvas_step("a")),
        chord([canvas_step("h")], inner).into(),
    ])
    .plan(Utc::now())
    .expect_err("refused");
    assert!(
        err.to_string().contains("must be a task or a chain"),
        "{err}"
    );
}
