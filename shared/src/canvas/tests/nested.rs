//! Groups, chords and chains inside a canvas: as Celery 5.7's producer sends them, and what a
//! worker sends when one is its next step or callback.

use super::*;
use crate::canvas::chord::body_message;

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
    let body = body_message(&part, results.clone(), hp, now());
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
    let p = body_message(&part, vec![json!({"h": 1}), json!({"h": 2})], header, now());
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
    let p = body_message(&part, vec![json!(1)], header, now());
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
    let p = body_message(&part, vec![json!(1)], PARENT, now());
    assert_eq!(p.msg.kwargs, embed(json!({"b1": 1})));
    let rest = p.msg.embed["chain"].as_array().unwrap();
    let kwargs: Vec<&Value> = rest.iter().map(|s| &s["kwargs"]).collect();
    assert_eq!(
        kwargs,
        [&json!({"e": 1}), &json!({"b2": 1})],
        "reversed: b2 next"
    );
}
