"""Celery canvas from a plain Python producer to mediafarm workers: chains, link, link_error,
groups and chords.

Usage: canvas.py QUEUE SCENARIO [PYTHON_QUEUE]. Prints one JSON object describing what Python saw.
The Rust side (tests/canvas.rs) runs `canvas.step` (returns its kwargs, the parent's result
under `parent`) and `canvas.on_error` (returns the failure it read for the id it got); a Python
worker (celery_app.py) on PYTHON_QUEUE runs `pyside.wrap` and `pyside.on_error`.
"""
import json
import sys
import time
import uuid

from celery import chain, chord, group, signature
from celery.canvas import xmap

# The same app and result reader as the plain producer (JSON only, broker and backend from
# the environment); canvas steps wait longer.
from producer import app
from producer import outcome as read_outcome


def outcome(result, timeout=30):
    return read_outcome(result, timeout)


def main():
    queue, scenario = sys.argv[1], sys.argv[2]
    step = lambda immutable=False, **kw: signature(
        "canvas.step", kwargs=kw, queue=queue, immutable=immutable)
    if scenario == "chain3":
        last = chain(step(a=1), step(immutable=True, b=2), step(c=3)).apply_async()
        out = {"last": outcome(last)}
        middle, first = last.parent, last.parent.parent
        out["middle"] = outcome(middle)
        out["first"] = outcome(first)
        out["ids"] = [first.id, middle.id, last.id]
        out["children"] = {"first": [c.id for c in first.children],
                           "middle": [c.id for c in middle.children],
                           "last": [c.id for c in (last.children or [])]}
        out["collected"] = [value for _, value in first.collect(timeout=30)]
        out["parent_ids"] = [app.backend.get_task_meta(i).get("parent_id") for i in out["ids"]]
    elif scenario == "link":
        r = step(l=1).apply_async(link=step(m=2))
        out = {"parent": outcome(r)}
        out["children"] = [outcome(c) for c in r.children]
    elif scenario == "link-error":
        errback_id = str(uuid.uuid4())
        errback = signature("canvas.on_error", queue=queue).set(task_id=errback_id)
        r = step(fail="source is 61 MP; the limit is 50 MP").apply_async(link_error=errback)
        out = {"failed": outcome(r), "failed_id": r.id,
               "errback": outcome(app.AsyncResult(errback_id))}
    elif scenario == "countdown":
        start = time.monotonic()
        last = chain(step(a=1), step(b=2).set(countdown=2)).apply_async()
        out = {"last": outcome(last), "elapsed": time.monotonic() - start}
    elif scenario == "failing-middle":
        # Celery 5.7's `mark_as_failure` → `_fail_chain`: the steps after a failed one get its
        # FAILURE. Their records are read without their parents (which `.get()` walks, raising
        # the failed step's error either way), so a step left PENDING times out here.
        last = chain(step(a=1), step(fail="frame 7 is corrupt"), step(c=1, tally=queue + "/c"),
                     step(d=1, tally=queue + "/d")).apply_async()
        after = last.parent
        out = {"via_parents": outcome(last, timeout=60),
               "failed": outcome(app.AsyncResult(after.parent.id)),
               "after": outcome(app.AsyncResult(after.id)),
               "last": outcome(app.AsyncResult(last.id))}
    elif scenario == "retried-middle":
        last = chain(step(a=1), step(fail_times=1, retry_after_s=0.2), step(c=3)).apply_async()
        out = {"last": outcome(last), "middle": outcome(last.parent)}
    elif scenario == "no-parent-kwarg":
        echo = signature("echo.echo", kwargs={"b": 2}, queue=queue)
        last = chain(step(a=1), echo).apply_async()
        out = {"last": outcome(last)}
    elif scenario == "mixed":
        pyq = sys.argv[3]
        wrap = signature("pyside.wrap", kwargs={"w": 1}, queue=pyq)
        last = chain(step(a=1), wrap, step(c=3)).apply_async()
        out = {"last": outcome(last, timeout=60), "middle": outcome(last.parent)}
        out["collected"] = [value for _, value in last.parent.parent.collect(timeout=30)]
    elif scenario == "python-errback":
        pyq = sys.argv[3]
        errback_id = str(uuid.uuid4())
        errback = signature("pyside.on_error", queue=pyq).set(task_id=errback_id)
        r = step(fail="no such upload").apply_async(link_error=errback)
        out = {"failed": outcome(r), "failed_id": r.id,
               "errback": outcome(app.AsyncResult(errback_id), timeout=60)}
    elif scenario == "group":
        res = group(step(i=i) for i in range(100)).apply_async()
        out = {"values": res.get(timeout=60)}
        res.save()
        restored = app.GroupResult.restore(res.id)
        out["restored"] = restored.get(timeout=30) if restored else None
        out["group_ids"] = sorted({app.backend.get_task_meta(r.id).get("group_id")
                                   for r in res.results})
        out["group_id"] = res.id
    elif scenario in ("chord-rust-body", "chord-python-body", "chord-mixed",
                      "chord-mixed-unordered"):
        headers = [step(h=i) for i in range(100)]
        body = step(body=1)
        if scenario == "chord-python-body":
            body = signature("pyside.wrap", kwargs={"w": 1}, queue=sys.argv[3])
        if scenario == "chord-mixed":
            py = lambda i: signature("echo.echo", kwargs={"h": i}, queue=sys.argv[3])
            headers = [step(h=i) if i % 2 else py(i) for i in range(20)]
        if scenario == "chord-mixed-unordered":
            # `result_chord_ordered = False` on every side: header 0 ends after the other Rust
            # headers, so its result follows theirs where the ordered join would put it first.
            py = lambda i: signature("echo.echo", kwargs={"h": i}, queue=sys.argv[3])
            headers = [step(h=0, sleep_ms=1500)]
            headers += [step(h=i) if i % 2 else py(i) for i in range(1, 20)]
            body = signature("pyside.wrap", kwargs={"w": 1}, queue=sys.argv[3])
        r = chord(headers, body).apply_async()
        out = {"body": outcome(r, timeout=90), "body_id": r.id, "group_id": r.parent.id}
        out["body_parent_id"] = app.backend.get_task_meta(r.id).get("parent_id")
        out["header_ids"] = [h.id for h in r.parent.results]
        keys = ["celery-taskset-meta-%s%s" % (r.parent.id, k) for k in (".j", ".t", ".s")]
        for _ in range(50):
            out["keys_left"] = app.backend.client.exists(*keys)
            if not out["keys_left"]:
                break
            time.sleep(0.1)
    elif scenario == "chord-failing-header":
        errback_id = str(uuid.uuid4())
        errback = signature("canvas.on_error", queue=queue).set(task_id=errback_id)
        headers = [step(h=1), step(fail="frame 3 is corrupt"), step(h=3)]
        r = chord(headers, step(body=1).set(link_error=errback)).apply_async()
        # The body's own record first, read without its parents: once it has failed, the
        # header's failure is stored too (a header stores its result before it joins), so
        # `r.get()` then deterministically re-raises the failed header (Celery walks a
        # result's parents before waiting). Called earlier, `get()` raises whichever it sees
        # first — with Celery's own workers too.
        body = outcome(app.AsyncResult(r.id), timeout=60)
        out = {"via_parent": outcome(r, timeout=60), "body_id": r.id, "body": body,
               "failed_header": r.parent.results[1].id,
               "errback": outcome(app.AsyncResult(errback_id))}
    elif scenario == "chain-chord-failing-header":
        # `chain(a, chord(header, body), c)` whose header fails: Celery 5.7's `_fail_chain`
        # fails `c` too. `c`'s own record is read without its parents (which `last.get()`
        # walks, raising the failed header's error), so a `c` left PENDING times out here.
        headers = [step(h=1), step(fail="frame 3 is corrupt"), step(h=3)]
        last = chain(step(a=1), chord(headers, step(body=1)),
                     step(c=1, tally=queue + "/c")).apply_async()
        body = last.parent
        out = {"via_parents": outcome(last, timeout=60), "last_id": last.id,
               "body_id": body.id, "failed_header": body.parent.results[1].id,
               "body": outcome(app.AsyncResult(body.id)),
               "last": outcome(app.AsyncResult(last.id))}
    elif scenario in ("chain-chord", "chain-chord-python-body"):
        # Celery upgrades the group and the step after it to a chord; `e` follows the body.
        # `tally`: the Rust side counts how often a step ran with it.
        body = step(d=1, tally=queue + "/d")
        if scenario == "chain-chord-python-body":
            body = signature("pyside.wrap", kwargs={"w": 1}, queue=sys.argv[3])
        last = chain(step(a=1), group(step(b=1), step(c=1)), body,
                     step(e=1, tally=queue + "/e")).apply_async()
        out = {"last": outcome(last, timeout=60), "body": outcome(last.parent)}
        header = last.parent.parent
        out["header"] = [outcome(r) for r in header.results]
        out["group_id"] = header.id
        out["header_groups"] = sorted({app.backend.get_task_meta(r.id).get("group_id")
                                       for r in header.results})
        first = header.parent
        out["first"] = outcome(first)
        out["first_id"], out["body_id"] = first.id, last.parent.id
        out["first_children"] = [
            [type(c).__name__, c.id, [r.id for r in getattr(c, "results", [])]]
            for c in app.AsyncResult(first.id).children]
        out["header_ids"] = [r.id for r in header.results]
        out["parent_ids"] = [app.backend.get_task_meta(i).get("parent_id")
                             for i in [r.id for r in header.results] + [last.id]]
        keys = ["celery-taskset-meta-%s%s" % (header.id, k) for k in (".j", ".t", ".s")]
        for _ in range(50):
            out["keys_left"] = app.backend.client.exists(*keys)
            if not out["keys_left"]:
                break
            time.sleep(0.1)
    elif scenario in ("chord-chain-body", "chord-chain-body-mixed"):
        # `chord(header, chain(b1, b2))`: the chain is the body; b1 gets the header's results.
        headers = [step(h=i) for i in range(10)]
        b2 = step(b2=1, tally=queue + "/b2")
        if scenario == "chord-chain-body-mixed":
            b2 = signature("pyside.wrap", kwargs={"w": 2}, queue=sys.argv[3])
        r = chord(headers, chain(step(b1=1), b2)).apply_async()
        # `r` is the chain's last step; Celery makes its `parent` the header's GroupResult.
        out = {"last": outcome(r, timeout=60), "last_id": r.id}
        header = r.parent
        out["header_type"] = type(header).__name__
        out["group_id"] = header.id
        out["header_ids"] = [h.id for h in header.results]
        last_meta = app.backend.get_task_meta(r.id)
        out["last_group_id"] = last_meta.get("group_id")
        out["b1_id"] = last_meta.get("parent_id")
        out["b1"] = outcome(app.AsyncResult(out["b1_id"]))
        out["b1_parent_id"] = app.backend.get_task_meta(out["b1_id"]).get("parent_id")
        keys = ["celery-taskset-meta-%s%s" % (header.id, k) for k in (".j", ".t", ".s")]
        for _ in range(50):
            out["keys_left"] = app.backend.client.exists(*keys)
            if not out["keys_left"]:
                break
            time.sleep(0.1)
    elif scenario == "chain-group":
        res = chain(step(a=1), group(step(b=1), step(c=1))).apply_async()
        out = {"type": type(res).__name__, "values": res.get(timeout=60), "group_id": res.id}
        out["group_ids"] = sorted({app.backend.get_task_meta(r.id).get("group_id")
                                   for r in res.results})
        first = app.AsyncResult(res.parent.id)
        out["first"] = outcome(first)
        out["first_children"] = [
            [type(c).__name__, c.id, [r.id for r in getattr(c, "results", [])]]
            for c in first.children]
        out["member_ids"] = [r.id for r in res.results]
    elif scenario == "link-canvas":
        # A chain and a group as `link=` callbacks; their ids are the worker's to assign.
        r = step(l=1).apply_async(link=chain(step(x=1), step(y=1)))
        out = {"parent": outcome(r)}
        x = r.children[0]
        out["x"] = outcome(x)
        out["y"] = outcome(x.children[0])
        r = step(l=2).apply_async(link=group(step(u=1), step(v=1)))
        out["group_parent"] = outcome(r)
        g = r.children[0]
        out["group_type"] = type(g).__name__
        out["group_values"] = g.get(timeout=30)
    elif scenario == "chord-chain-body-options":
        # The chain's own options, applied as Celery's `_chain.run` does: `queue` (over the
        # first step's own) and `countdown` to its first step, `link` to its last step,
        # `link_error` (`on_error`) to every step and to the chord's error handling.
        pyq = sys.argv[3]
        cb_id, eb_id = str(uuid.uuid4()), str(uuid.uuid4())
        headers = [step(h=i) for i in range(5)]
        first = signature("pyside.wrap", kwargs={"w": 1}, queue=queue)  # the chain moves it
        body = chain(first, step(b2=1, tally=queue + "/b2")).set(
            queue=pyq, countdown=0.2, link=step(cb=1).set(task_id=cb_id))
        body = body.on_error(signature("canvas.on_error", queue=queue).set(task_id=eb_id))
        r = chord(headers, body).apply_async()
        out = {"last": outcome(r, timeout=60), "last_id": r.id,
               "callback": outcome(app.AsyncResult(cb_id), timeout=30)}
        out["b1"] = outcome(app.AsyncResult(app.backend.get_task_meta(r.id).get("parent_id")))
        # The same chain after a failed header: its id fails with ChordError, its errback runs.
        eb2 = str(uuid.uuid4())
        body = chain(step(b1=1), step(b2=1)).on_error(
            signature("canvas.on_error", queue=queue).set(task_id=eb2))
        r = chord([step(h=1), step(fail="frame 3 is corrupt")], body).apply_async()
        out["failed_last"] = outcome(app.AsyncResult(r.id), timeout=60)
        out["failed_last_id"] = r.id
        out["failed_errback"] = outcome(app.AsyncResult(eb2), timeout=30)
    elif scenario == "chord-group-body":
        # `chord(header, group(...))`: every task of the group gets the header's results; a
        # member runs on a Python worker. Then a failed header: each member fails with the
        # header's own exception and its errback runs.
        pyq = sys.argv[3]
        headers = [step(h=i) for i in range(5)]
        body = group(step(x=1), signature("pyside.wrap", kwargs={"w": 1}, queue=pyq),
                     step(y=1, tally=queue + "/y"))
        r = chord(headers, body).apply_async()
        out = {"type": type(r).__name__, "values": r.get(timeout=60), "group_id": r.id,
               "member_groups": [app.backend.get_task_meta(m.id).get("group_id")
                                 for m in r.results],
               "header_group": r.parent.id if r.parent is not None else None}
        keys = ["celery-taskset-meta-%s%s" % (out["header_group"], k)
                for k in (".j", ".t", ".s", ".d")]
        for _ in range(50):  # the join deletes them once the body is published
            out["keys_left"] = app.backend.client.exists(*keys)
            out["claim"] = (app.backend.client.get(
                "celery-taskset-meta-%s.c" % out["header_group"]) or b"").decode()
            if not out["keys_left"] and out["claim"] == "done":
                break
            time.sleep(0.1)
        eb = str(uuid.uuid4())
        body = group(step(x=1).set(link_error=signature("canvas.on_error", queue=queue)
                                   .set(task_id=eb)), step(y=1))
        r = chord([step(h=1), step(fail="frame 3 is corrupt")], body).apply_async()
        out["failed_members"] = [outcome(app.AsyncResult(m.id), timeout=60) for m in r.results]
        out["failed_member_ids"] = [m.id for m in r.results]
        out["failed_group"] = outcome(app.AsyncResult(r.id))
        out["failed_errback"] = outcome(app.AsyncResult(eb), timeout=30)
    elif scenario == "chord-chord-body":
        # `chord(header, chord([x, y], z))`: x and y each get the outer header's results, z
        # theirs; the inner chord's body joins on whichever worker finishes last.
        headers = [step(h=i) for i in range(5)]
        inner = chord([step(x=1), step(y=1)], step(z=1, tally=queue + "/z"))
        r = chord(headers, inner).apply_async()
        out = {"last": outcome(r, timeout=60), "last_id": r.id}
        eb = str(uuid.uuid4())
        inner = chord([step(x=1), step(y=1)],
                      step(z=1).set(link_error=signature("canvas.on_error", queue=queue)
                                    .set(task_id=eb)))
        r = chord([step(h=1), step(fail="frame 3 is corrupt")], inner).apply_async()
        out["failed_last"] = outcome(app.AsyncResult(r.id), timeout=60)
        out["failed_last_id"] = r.id
        out["failed_errback"] = outcome(app.AsyncResult(eb), timeout=30)
        # In a chain, a chord whose body is a group followed by a task: Celery's producer makes
        # the group and the task the chord's body chord.
        last = chain(step(a=1), chord([step(h=1), step(h=2)], group(step(x=1), step(x=2))),
                     step(z=2, tally=queue + "/z2")).apply_async()
        out["chain_last"] = outcome(last, timeout=60)
    elif scenario == "unsupported":
        out = {}
        # A chord inside a chord's header, as a callback.
        nested = chord([step(x=1), chord([step(y=1)], step(z=1))], step(w=1))
        r = step(g=1).apply_async(link=nested)
        out["nested_callback"] = outcome(r)
        r = step(g=2).apply_async(link=xmap(signature("canvas.step", queue=queue), [1, 2]))
        out["xmap_callback"] = outcome(r)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
