//! Groups, chords and chains inside a canvas: as Celery 5.7's producer sends them, and what a
//! worker sends when one is its next step or callback.

use super::*;
use crate::canvas::chord::{body_failure, body_message};

/// The embed `chain` Celery 5.7 sent with the first step of
/// `chain(step(a=1), group(step(b=1), step(c=1)), step(d=1), step(e=1))`: the group and the
/// step after it upgraded to a `celery.chord`, the last step before it (reversed).
const CHORD_STEP_CHAIN: &str = r#"[{"task":"canvas.step","args":[],"kwargs":{"e":1},"options":{"queue":"q","task_id":"ee4360a1-76a4-4a20-8a11-518b8b9934af","reply_to":"c803c744-e324-36a0-8792-124928aa452d"},"subtask_type":null,"immutable":false},{"task":"celery.chord","args":[],"kwargs":{"kwargs":{},"header":{"task":"celery.group","args":[],"kwargs":{"tasks":[{"task":"canvas.step","args":[],"kwargs":{"b":1},"options":{"queue":"q","task_id":"0be7dc69-c503-47cc-bf65-35940c7ff791","reply_to":"c803c744-e324-36a0-8792-124928aa452d","group_index":0},"subtask_type":null,"immutable":false},{"task":"canvas.step","args":[],"kwargs":{"c":1},"options":{"queue":"q","task_id":"e24e1172-e7db-4e20-b5cd-1f3bb15cd26e","reply_to":"c803c744-e324-36a0-8792-124928aa452d","group_index":1},"subtask_type":null,"immutable":false}]},"options":{"task_id":"33778355-f0b5-4295-8beb-d565c6f10ca3","root_id":null,"parent_id":null},"subtask_type":"group","immutable":false},"body":{"task":"canvas.step","args":[],"kwargs":{"d":1},"options":{"queue":"q","task_id":"5e38efad-a106-43b3-9164-9891eb0cc51b","reply_to":"c803c744-e324-36a0-8792-124928aa452d"},"subtask_type":null,"immutable":false}},"options":{"task_id":"33778355-f0b5-4295-8beb-d565c6f10ca3"},"subtask_type":"chord","immutable":false}]"#;

/// The same for `chain(step(a=1), group(step(b=1), step(c=1)))`: the group is the last step.
const GROUP_STEP_CHAIN: &str = r#"[{"task":"celery.group","args":[],"kwargs":{"tasks":[{"task":"canvas.step","args":[],"kwargs":{"b":1},"options":{"queue":"q","task_id":"e7145565-ec9a-4b3a-8de3-3a5b2bcda770","reply_to":"c46e8fe8-c7f7-33ad-a452-b35a9926b5e8","group_index":0},"subtask_type":null,"immutable":false},{"task":"canvas.step","args":[],"kwargs":{"c":1},"options":{"queue":"q","task_id":"89d3917d-2d9d-45f6-808e-0eb39856f394","reply_to":"c46e8fe8-c7f7-33ad-a452-b35a9926b5e8","group_index":1},"subtask_type":null,"immutable":false}]},"options":{"task_id":"b41cb951-d9e0-4500-9660-ac03117ed635","root_id":null,"parent_id":null},"subtask_type":"group","immutable":false}]"#;

const GROUP: &str = "33778355-f0b5-4295-8beb-d565c6f10ca3";
const BODY: &str = "5e38efad-a106-43b3-9164-9891eb0cc51b";
const LAST: &str = "ee4360a1-76a4-4a20-8a11-518b8b9934af";

fn chain_embed(chain: &str) -> Map<String, Value> {
    let chain: Value = serde_json::from_str(chain).unwrap();
    embed(json!({"callbacks": null, "errbacks": null, "chain": chain, "chord": null}))
}

fn step(k: &str) -> Value {
    json!({"task": "canvas.step", "args": [], "kwargs": {k: 1}, "options": {"queue": "q"},
           "subtask_type": null, "immutable": false})
}

#[test]
fn a_chord_step_sends_its_header_the_value_with_the_rest_of_the_chain_in_the_body() {
    let c = Canvas::from_embed(&chain_embed(CHORD_STEP_CHAIN)).unwrap();
    assert!(matches!(c.chain[1].kind, Kind::Chord(_)));
    let next = on_success(&c, PARENT, &json!({"a": 1}), now());
    assert_eq!(next.chord_sizes, vec![(GROUP.to_owned(), 2)]);
    assert_eq!(next.publish.len(), 2, "the header, nothing else yet");
    let ids: Vec<&str> = next.publish.iter().map(|p| p.msg.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "0be7dc69-c503-47cc-bf65-35940c7ff791",
            "e24e1172-e7db-4e20-b5cd-1f3bb15cd26e"
        ],
        "the ids the producer froze"
    );
    for (i, p) in next.publish.iter().enumerate() {
        let m = &p.msg;
        assert_eq!(p.queue, "q");
        assert_eq!(m.args, vec![json!({"a": 1})], "the parent's value first");
        assert_eq!(m.group.as_deref(), Some(GROUP));
        assert_eq!(m.group_index, Some(i as i64));
        assert_eq!(m.parent_id.as_deref(), Some("p-1"));
        assert_eq!(m.root_id.as_deref(), Some("root-1"));
        assert_eq!(
            m.embed["chain"],
            Value::Null,
            "the chain is not the header's"
        );
        let body = &m.embed["chord"];
        assert_eq!(body["kwargs"], json!({"d": 1}));
        assert_eq!(body["options"]["task_id"], BODY);
        assert_eq!(body["options"]["group_id"], GROUP);
        assert_eq!(body["options"]["root_id"], "root-1");
        assert_eq!(body["options"]["chain"][0]["options"]["task_id"], LAST);
    }
    assert_eq!(
        next.children,
        vec![json!([
            [GROUP, null],
            [[[ids[0], null], null], [[ids[1], null], null]]
        ])],
        "the header's GroupResult, as Celery records it"
    );

    // The header's join sends the body with the rest of the chain, which then runs on.
    let header = &next.publish[1].msg;
    let part = Canvas::from_message(header)
        .unwrap()
        .chord
        .expect("a chord header");
    assert_eq!(part.index, Some(1));
    let results = vec![json!({"b": 1}), json!({"c": 1})];
    let hp = Parent {
        id: &header.id,
        root_id: "root-1",
    };
    let body = body_message(&part, results.clone(), hp, now())
        .publish
        .remove(0);
    assert_eq!(body.msg.id, BODY);
    assert_eq!(body.msg.args, vec![json!(results)]);
    assert_eq!(body.msg.embed["chain"][0]["options"]["task_id"], LAST);
    let after_body = Canvas::from_message(&body.msg).unwrap();
    assert!(after_body.chord.is_none());
    let bp = Parent {
        id: BODY,
        root_id: "root-1",
    };
    let last = on_success(&after_body, bp, &json!("d"), now());
    assert_eq!(last.publish.len(), 1);
    assert_eq!(last.publish[0].msg.id, LAST);
    assert_eq!(last.publish[0].msg.args, vec![json!("d")]);
    assert!(last.chord_sizes.is_empty());
}

#[test]
fn a_group_as_the_last_step_gets_the_value_and_is_recorded_as_a_group_result() {
    let c = Canvas::from_embed(&chain_embed(GROUP_STEP_CHAIN)).unwrap();
    let next = on_success(&c, PARENT, &json!(7), now());
    assert!(next.chord_sizes.is_empty());
    let gid = "b41cb951-d9e0-4500-9660-ac03117ed635";
    let members: Vec<Value> = next
        .publish
        .iter()
        .enumerate()
        .map(|(i, p)| {
            assert_eq!(p.msg.args, vec![json!(7)]);
            assert_eq!(p.msg.group.as_deref(), Some(gid));
            assert_eq!(p.msg.group_index, Some(i as i64));
            assert!(!p.msg.embed.contains_key("chord") || p.msg.embed["chord"].is_null());
            children_record(&p.msg.id)
        })
        .collect();
    assert_eq!(
        next.publish[0].msg.id,
        "e7145565-ec9a-4b3a-8de3-3a5b2bcda770"
    );
    assert_eq!(next.children, vec![json!([[gid, null], members])]);
}

#[test]
fn ids_not_frozen_are_derived_from_the_job_so_a_second_run_sends_the_same() {
    let e = embed(json!({"chain": [
        {"task": "celery.chord", "args": [], "subtask_type": "chord", "options": {},
         "kwargs": {"header": [step("b"), step("c")], "body": step("d")}}
    ]}));
    let c = Canvas::from_embed(&e).unwrap();
    let a = on_success(&c, PARENT, &json!(1), now());
    assert_eq!(a, on_success(&c, PARENT, &json!(1), now()));
    let other = on_success(
        &c,
        Parent {
            id: "p-2",
            root_id: "root-1",
        },
        &json!(1),
        now(),
    );
    assert_ne!(a.publish[0].msg.id, a.publish[1].msg.id);
    assert_ne!(a.publish[0].msg.id, other.publish[0].msg.id);
    assert_ne!(a.chord_sizes, other.chord_sizes);
    let group = a.publish[0].msg.group.clone().unwrap();
    assert_eq!(a.chord_sizes, vec![(group, 2)]);
    assert_eq!(
        a.publish[0].msg.embed["chord"]["options"]["task_id"],
        a.publish[1].msg.embed["chord"]["options"]["task_id"]
    );
}

#[test]
fn a_chain_callback_sends_its_first_step_with_the_rest_as_its_chain() {
    // `link=chain(x, group(y, z), w)`, as Celery sends a chain: not frozen, in order.
    let link = json!({"task": "celery.chain", "args": [], "options": {}, "immutable": false,
    "subtask_type": "chain", "kwargs": {"tasks": [
        step("x"),
        {"task": "celery.group", "args": [], "options": {}, "subtask_type": "group",
         "kwargs": {"tasks": [step("y"), step("z")]}},
        step("w"),
    ]}});
    let c = Canvas::from_embed(&embed(json!({"callbacks": [link]}))).unwrap();
    let next = on_success(&c, PARENT, &json!(5), now());
    assert_eq!(next.publish.len(), 1);
    let m = &next.publish[0].msg;
    assert_eq!(m.kwargs, embed(json!({"x": 1})));
    assert_eq!(m.args, vec![json!(5)]);
    // The rest, reversed: one chord (the group upgraded with `w` as its body).
    let rest = m.embed["chain"].as_array().unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["subtask_type"], "chord");
    assert_eq!(rest[0]["kwargs"]["body"]["kwargs"], json!({"w": 1}));
    assert_eq!(next.children, vec![children_record(&m.id)]);
    // When `x` ends, the chord is its next step.
    let c = Canvas::from_message(m).unwrap();
    let after = on_success(
        &c,
        Parent {
            id: &m.id,
            root_id: "root-1",
        },
        &json!("x"),
        now(),
    );
    assert_eq!(after.publish.len(), 2);
    assert_eq!(after.chord_sizes.len(), 1);
    assert_eq!(
        after.publish[0].msg.embed["chord"]["kwargs"],
        json!({"w": 1})
    );
}

#[test]
fn a_group_callback_among_others_goes_on_its_own_and_the_tasks_as_one_group() {
    let g = json!({"task": "celery.group", "args": [], "options": {}, "subtask_type": "group",
                   "kwargs": {"tasks": [step("y"), step("z")]}});
    let c = Canvas::from_embed(&embed(json!({"callbacks": [step("a"), g, step("b")]}))).unwrap();
    let next = on_success(&c, PARENT, &json!(1), now());
    assert_eq!(next.publish.len(), 4);
    assert_eq!(next.children.len(), 2);
    let groups: std::collections::BTreeSet<_> = next
        .publish
        .iter()
        .map(|p| p.msg.group.clone().unwrap())
        .collect();
    assert_eq!(
        groups.len(),
        2,
        "two groups: the callback group and the tasks"
    );
    assert!(next.publish.iter().all(|p| p.msg.args == vec![json!(1)]));
}

#[test]
fn an_immutable_chord_or_group_does_not_pass_the_value_and_its_own_args_come_first() {
    let e = embed(json!({"chain": [
        {"task": "celery.chord", "args": ["c"], "subtask_type": "chord", "options": {},
         "immutable": true,
         "kwargs": {"header": {"task": "celery.group", "args": ["g"], "subtask_type": "group",
                               "options": {}, "kwargs": {"tasks": [step("b")]}},
                    "body": step("d")}}
    ]}));
    let next = on_success(&Canvas::from_embed(&e).unwrap(), PARENT, &json!(1), now());
    assert_eq!(next.publish[0].msg.args, vec![json!("c"), json!("g")]);
}

#[test]
fn a_chord_with_an_empty_header_sends_its_body_at_once_with_no_results() {
    // Reversed: the chord runs next, `e` after it.
    let e = embed(json!({"chain": [
        step("e"),
        {"task": "celery.chord", "args": [], "subtask_type": "chord", "options": {},
         "kwargs": {"header": [], "body": step("d")}},
    ]}));
    let c = Canvas::from_embed(&e).unwrap();
    let next = on_success(&c, PARENT, &json!(1), now());
    assert!(next.chord_sizes.is_empty());
    assert_eq!(next.publish.len(), 1);
    let m = &next.publish[0].msg;
    assert_eq!(m.kwargs, embed(json!({"d": 1})));
    assert_eq!(m.args, vec![json!([])]);
    assert_eq!(m.embed["chain"], json!([step("e")]));
    assert_eq!(next.children, vec![children_record(&m.id)]);
}

/// The embed `chord` of each header task Celery 5.7 sent for
/// `chord([step(h=1), step(h=2)], chain(step(b1=1), step(b2=1)))`, captured from RabbitMQ
/// (its group was `12108be6-b2b1-40f5-a7c2-4b6a33e0524e`).
pub(crate) const CELERY_CHAIN_BODY: &str = r#"{"task": "celery.chain", "args": [], "kwargs": {"tasks": [{"task": "canvas.step", "args": [], "kwargs": {"b1": 1}, "options": {"queue": "q", "task_id": "ff5494af-fa5e-424e-88bb-49c6f1bb2ff6", "reply_to": "0fb66a30-02a9-3ae8-bf19-1d4a06f27bd2"}, "subtask_type": null, "immutable": false}, {"task": "canvas.step", "args": [], "kwargs": {"b2": 1}, "options": {"queue": "q", "task_id": "b9f78361-5f73-4c55-8ef9-62522e8fa536", "reply_to": "0fb66a30-02a9-3ae8-bf19-1d4a06f27bd2", "group_id": "12108be6-b2b1-40f5-a7c2-4b6a33e0524e"}, "subtask_type": null, "immutable": false}]}, "options": {"task_id": "b9f78361-5f73-4c55-8ef9-62522e8fa536"}, "subtask_type": "chain", "immutable": false}"#;

/// A header of `chord([h1, h2], chain(b1, b2))` as Celery 5.7 sent it: the chain is the body.
fn chain_body_header(index: i64) -> crate::protocol::TaskMessage {
    let body: Value = serde_json::from_str(CELERY_CHAIN_BODY).unwrap();
    let mut msg = crate::protocol::TaskMessage::new("canvas.step", Map::new());
    msg.id = format!("h-{index}");
    msg.group = Some("12108be6-b2b1-40f5-a7c2-4b6a33e0524e".into());
    msg.group_index = Some(index);
    msg.embed = embed(json!({"callbacks": null, "errbacks": null, "chain": null, "chord": body}));
    msg
}

#[test]
fn a_chord_whose_body_is_a_chain_sends_its_first_step_the_results_and_the_rest_after() {
    let part = Canvas::from_message(&chain_body_header(1))
        .unwrap()
        .chord
        .expect("a chord header");
    assert!(matches!(part.body.kind, Kind::Chain(ref s) if s.len() == 2));
    assert_eq!(
        crate::canvas::chord::body_id(&part),
        "b9f78361-5f73-4c55-8ef9-62522e8fa536",
        "the chain's id: its last step's, which a failed header fails"
    );
    let header = Parent {
        id: "h-1",
        root_id: "h-0",
    };
    let p = body_message(&part, vec![json!({"h": 1}), json!({"h": 2})], header, now())
        .publish
        .remove(0);
    assert_eq!(
        p.msg.id, "ff5494af-fa5e-424e-88bb-49c6f1bb2ff6",
        "b1, its frozen id"
    );
    assert_eq!(p.msg.kwargs, embed(json!({"b1": 1})));
    assert_eq!(p.msg.args, vec![json!([{"h": 1}, {"h": 2}])]);
    assert_eq!(p.msg.parent_id.as_deref(), Some("h-1"));
    assert_eq!(
        p.msg.group, None,
        "only the last step is in the chord's group"
    );
    let chain = p.msg.embed["chain"]
        .as_array()
        .expect("the rest of the chain");
    assert_eq!(chain.len(), 1);
    assert_eq!(
        chain[0]["options"]["task_id"],
        "b9f78361-5f73-4c55-8ef9-62522e8fa536"
    );
    // b1's worker sends b2 with b1's value, in the chord's group as Celery freezes it.
    let c = Canvas::from_embed(&p.msg.embed).unwrap();
    let b1 = Parent {
        id: "ff5494af-fa5e-424e-88bb-49c6f1bb2ff6",
        root_id: "h-0",
    };
    let next = on_success(&c, b1, &json!({"b1": 1}), now());
    assert_eq!(next.publish.len(), 1);
    let b2 = &next.publish[0].msg;
    assert_eq!(b2.id, "b9f78361-5f73-4c55-8ef9-62522e8fa536");
    assert_eq!(b2.args, vec![json!({"b1": 1})]);
    assert_eq!(
        b2.group.as_deref(),
        Some("12108be6-b2b1-40f5-a7c2-4b6a33e0524e")
    );
    assert_eq!(b2.embed["chain"], Value::Null);
    // An immutable chain gets no results; its first step's own args only.
    let mut frozen: Value = serde_json::from_str(CELERY_CHAIN_BODY).unwrap();
    frozen["immutable"] = json!(true);
    let mut msg = chain_body_header(0);
    msg.embed.insert("chord".into(), frozen);
    let part = Canvas::from_message(&msg).unwrap().chord.unwrap();
    let p = body_message(&part, vec![json!(1)], header, now())
        .publish
        .remove(0);
    assert_eq!(p.msg.args, Vec::<Value>::new());
}

#[test]
fn a_chord_with_a_chain_body_as_a_chain_step_carries_the_rest_after_the_body_chain() {
    let chain_body: Value = serde_json::from_str(CELERY_CHAIN_BODY).unwrap();
    let chord_step = json!({"task": "celery.chord", "args": [], "subtask_type": "chord",
        "immutable": false, "options": {"task_id": GROUP},
        "kwargs": {"kwargs": {}, "body": chain_body, "header": {"task": "celery.group",
            "args": [], "subtask_type": "group", "immutable": false,
            "options": {"task_id": GROUP}, "kwargs": {"tasks": [step("b")]}}}});
    let last = step("e");
    let e = embed(json!({"chain": [last, chord_step]}));
    let c = Canvas::from_embed(&e).unwrap();
    let next = on_success(&c, PARENT, &json!({"a": 1}), now());
    assert_eq!(next.publish.len(), 1, "the header");
    let header = &next.publish[0].msg;
    let body = &header.embed["chord"];
    assert_eq!(body["subtask_type"], "chain");
    assert_eq!(body["options"]["chain"][0]["kwargs"], json!({"e": 1}));
    // The join sends b1, then b2, then e.
    let part = Canvas::from_message(header).unwrap().chord.unwrap();
    let p = body_message(&part, vec![json!(1)], PARENT, now())
        .publish
        .remove(0);
    assert_eq!(p.msg.kwargs, embed(json!({"b1": 1})));
    let rest = p.msg.embed["chain"].as_array().unwrap();
    let kwargs: Vec<&Value> = rest.iter().map(|s| &s["kwargs"]).collect();
    assert_eq!(
        kwargs,
        [&json!({"e": 1}), &json!({"b2": 1})],
        "reversed: b2 next"
    );
}

/// The embed `chord` Celery 5.7 sent for `chord([step(h=1)], chain(step(b1=1),
/// step(b2=1)).set(queue="q2", countdown=3, link=step(cb=1)).on_error(step(eb=1)))`: the
/// chain's own options stay on the chain.
const CELERY_CHAIN_BODY_OPTIONS: &str = r#"{"task": "celery.chain", "args": [], "kwargs": {"tasks": [{"task": "canvas.step", "args": [], "kwargs": {"b1": 1}, "options": {"queue": "q", "task_id": "b7fe5f4e-daeb-4265-8917-dd9e6823f6a1", "reply_to": "e121bfba-0afb-35f2-9ad9-358b2ee5fe55"}, "subtask_type": null, "immutable": false}, {"task": "canvas.step", "args": [], "kwargs": {"b2": 1}, "options": {"queue": "q", "task_id": "13b0170e-080d-4494-aaa4-23f7e5b822a2", "reply_to": "e121bfba-0afb-35f2-9ad9-358b2ee5fe55", "group_id": "f385b844-2345-4412-b280-dc560511ff0f"}, "subtask_type": null, "immutable": false}]}, "options": {"queue": "q2", "countdown": 3, "link": {"task": "canvas.step", "args": [], "kwargs": {"cb": 1}, "options": {"queue": "q"}, "subtask_type": null, "immutable": false}, "link_error": [{"task": "canvas.step", "args": [], "kwargs": {"eb": 1}, "options": {"queue": "q"}, "subtask_type": null, "immutable": false}], "task_id": "13b0170e-080d-4494-aaa4-23f7e5b822a2"}, "subtask_type": "chain", "immutable": false}"#;

/// The same for `chord([step(h=1)], group(step(x=1), step(y=1)))`: the group's `task_id` is
/// its id; its tasks' `group_id` the chord's.
pub(crate) const CELERY_GROUP_BODY: &str = r#"{"task": "celery.group", "args": [], "kwargs": {"tasks": [{"task": "canvas.step", "args": [], "kwargs": {"x": 1}, "options": {"queue": "q", "task_id": "231fa17e-7482-4014-bf46-5b5edee0e267", "reply_to": "1c6f0871-69b6-3434-9d7b-c5ff90b6aff5", "group_id": "359e11e6-3394-434b-8f18-7dd90443bffe", "group_index": 0}, "subtask_type": null, "immutable": false}, {"task": "canvas.step", "args": [], "kwargs": {"y": 1}, "options": {"queue": "q", "task_id": "fb14d16e-7086-4d77-a323-cbb8f0de579d", "reply_to": "1c6f0871-69b6-3434-9d7b-c5ff90b6aff5", "group_id": "359e11e6-3394-434b-8f18-7dd90443bffe", "group_index": 1}, "subtask_type": null, "immutable": false}]}, "options": {"task_id": "afc46fc7-1305-4025-8b81-72d26801e0bd", "group_id": "359e11e6-3394-434b-8f18-7dd90443bffe", "root_id": null, "parent_id": null}, "subtask_type": "group", "immutable": false}"#;

/// The same for `chord([step(h=1)], chord([step(x=1), step(y=1)], step(z=1)))`: the inner
/// chord's `task_id` is its header's group id; `z` keeps the outer chord's group.
pub(crate) const CELERY_CHORD_BODY: &str = r#"{"task": "celery.chord", "args": [], "kwargs": {"kwargs": {}, "header": {"task": "celery.group", "args": [], "kwargs": {"tasks": [{"task": "canvas.step", "args": [], "kwargs": {"x": 1}, "options": {"queue": "q", "task_id": "e7c34c33-f5b5-46d7-8a60-ce66b7e0055a", "reply_to": "784af24f-8cc9-3708-9fdf-a3a4ad9f51b2", "group_index": 0}, "subtask_type": null, "immutable": false}, {"task": "canvas.step", "args": [], "kwargs": {"y": 1}, "options": {"queue": "q", "task_id": "aaa0e946-bbaa-41c7-84c7-68465b1311af", "reply_to": "784af24f-8cc9-3708-9fdf-a3a4ad9f51b2", "group_index": 1}, "subtask_type": null, "immutable": false}]}, "options": {"task_id": "cc88c917-4bc5-4785-a63c-b8ea62651088", "root_id": null, "parent_id": null}, "subtask_type": "group", "immutable": false}, "body": {"task": "canvas.step", "args": [], "kwargs": {"z": 1}, "options": {"queue": "q", "task_id": "b526523b-b061-4c71-96d4-e2ed8f1fcca5", "reply_to": "784af24f-8cc9-3708-9fdf-a3a4ad9f51b2", "group_id": "7f5af501-0038-4248-a38e-4a80a0335aac"}, "subtask_type": null, "immutable": false}}, "options": {"task_id": "cc88c917-4bc5-4785-a63c-b8ea62651088"}, "subtask_type": "chord", "immutable": false}"#;

fn header_with_body(body: &str, group: &str) -> crate::protocol::TaskMessage {
    let body: Value = serde_json::from_str(body).unwrap();
    let mut msg = crate::protocol::TaskMessage::new("canvas.step", Map::new());
    msg.id = "h-0".into();
    msg.group = Some(group.into());
    msg.group_index = Some(0);
    msg.embed = embed(json!({"callbacks": null, "errbacks": null, "chain": null, "chord": body}));
    msg
}

fn failure() -> crate::canvas::chord::ChordFailure {
    crate::canvas::chord::ChordFailure {
        reason: "Dependency h-0 raised StepFailure('bad')".into(),
        cause: Some(json!({"exc_type": "StepFailure", "exc_message": ["bad"],
                           "exc_module": "mediafarm.errors"})),
    }
}

#[test]
fn a_chord_body_chain_runs_its_own_options_as_celery_chain_run_does() {
    let part = Canvas::from_message(&header_with_body(
        CELERY_CHAIN_BODY_OPTIONS,
        "f385b844-2345-4412-b280-dc560511ff0f",
    ))
    .unwrap()
    .chord
    .expect("a chord header");
    let sent = body_message(&part, vec![json!(1)], PARENT, now());
    assert_eq!(sent.publish.len(), 1);
    let b1 = &sent.publish[0];
    assert_eq!(b1.msg.id, "b7fe5f4e-daeb-4265-8917-dd9e6823f6a1");
    assert_eq!(b1.queue, "q2", "the chain's queue, over b1's own");
    assert!(
        b1.msg.eta.is_some(),
        "the chain's countdown delays its first step"
    );
    assert_eq!(b1.msg.args, vec![json!([1])]);
    let eb = json!({"eb": 1});
    assert_eq!(
        b1.msg.embed["errbacks"][0]["kwargs"], eb,
        "link_error on every step"
    );
    assert_eq!(
        b1.msg.embed["callbacks"],
        Value::Null,
        "link on the last step only"
    );
    let b2 = &b1.msg.embed["chain"][0];
    assert_eq!(
        b2["options"]["task_id"],
        "13b0170e-080d-4494-aaa4-23f7e5b822a2"
    );
    assert_eq!(
        b2["options"]["queue"], "q",
        "only the first step takes the chain's queue"
    );
    assert_eq!(b2["options"]["link"][0]["kwargs"], json!({"cb": 1}));
    assert_eq!(b2["options"]["link_error"][0]["kwargs"], eb);
    // A failed header fails the chain's id and sends the chain's own errback with it.
    let (metas, errbacks) = body_failure(&part, &failure(), now());
    assert_eq!(metas.len(), 1);
    assert_eq!(metas[0].task_id, "13b0170e-080d-4494-aaa4-23f7e5b822a2");
    assert_eq!(metas[0].error().unwrap().exc_type, "ChordError");
    assert_eq!(errbacks.len(), 1);
    assert_eq!(errbacks[0].msg.kwargs, embed(eb));
    assert_eq!(
        errbacks[0].msg.args,
        vec![json!("13b0170e-080d-4494-aaa4-23f7e5b822a2")]
    );
}

#[test]
fn a_chord_whose_body_is_a_group_sends_each_task_the_results() {
    let part = Canvas::from_message(&header_with_body(
        CELERY_GROUP_BODY,
        "359e11e6-3394-434b-8f18-7dd90443bffe",
    ))
    .unwrap()
    .chord
    .expect("a chord header");
    let sent = body_message(&part, vec![json!(1), json!(2)], PARENT, now());
    assert!(sent.chord_sizes.is_empty());
    let ids: Vec<&str> = sent.publish.iter().map(|p| p.msg.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "231fa17e-7482-4014-bf46-5b5edee0e267",
            "fb14d16e-7086-4d77-a323-cbb8f0de579d"
        ],
        "the ids the producer froze"
    );
    for (i, p) in sent.publish.iter().enumerate() {
        assert_eq!(p.msg.args, vec![json!([1, 2])]);
        assert_eq!(
            p.msg.group.as_deref(),
            Some("afc46fc7-1305-4025-8b81-72d26801e0bd"),
            "the group's own id"
        );
        assert_eq!(p.msg.group_index, Some(i as i64));
        assert_eq!(p.msg.parent_id.as_deref(), Some("p-1"));
    }
    // A failed header: each task and the group fail with the header's own exception.
    let (metas, errbacks) = body_failure(&part, &failure(), now());
    let failed: Vec<&str> = metas.iter().map(|m| m.task_id.as_str()).collect();
    assert_eq!(
        failed,
        [
            "231fa17e-7482-4014-bf46-5b5edee0e267",
            "fb14d16e-7086-4d77-a323-cbb8f0de579d",
            "afc46fc7-1305-4025-8b81-72d26801e0bd"
        ]
    );
    for m in &metas {
        assert_eq!(m.error().unwrap().exc_type, "StepFailure");
        assert_eq!(m.error().unwrap().message, "bad");
    }
    assert!(errbacks.is_empty());
}

#[test]
fn a_chord_whose_body_is_a_chord_sends_the_inner_header_after_setting_its_size() {
    let part = Canvas::from_message(&header_with_body(
        CELERY_CHORD_BODY,
        "7f5af501-0038-4248-a38e-4a80a0335aac",
    ))
    .unwrap()
    .chord
    .expect("a chord header");
    let sent = body_message(&part, vec![json!(1)], PARENT, now());
    assert_eq!(
        sent.chord_sizes,
        vec![("cc88c917-4bc5-4785-a63c-b8ea62651088".to_owned(), 2)]
    );
    assert_eq!(sent.publish.len(), 2);
    assert_eq!(
        sent.publish[0].msg.id,
        "e7c34c33-f5b5-46d7-8a60-ce66b7e0055a"
    );
    for p in &sent.publish {
        assert_eq!(
            p.msg.args,
            vec![json!([1])],
            "the outer header's results first"
        );
        assert_eq!(
            p.msg.group.as_deref(),
            Some("cc88c917-4bc5-4785-a63c-b8ea62651088")
        );
        let z = &p.msg.embed["chord"];
        assert_eq!(
            z["options"]["task_id"],
            "b526523b-b061-4c71-96d4-e2ed8f1fcca5"
        );
        assert_eq!(
            z["options"]["group_id"], "7f5af501-0038-4248-a38e-4a80a0335aac",
            "z keeps the group it was frozen with"
        );
    }
    let (metas, _) = body_failure(&part, &failure(), now());
    assert_eq!(metas.len(), 1);
    assert_eq!(
        metas[0].task_id, "b526523b-b061-4c71-96d4-e2ed8f1fcca5",
        "z, what Python's result waits on"
    );
    assert_eq!(metas[0].error().unwrap().exc_type, "ChordError");
}
