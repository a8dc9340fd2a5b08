"""What Flower shows of a mediafarm worker: its HTTP API, then its pages in a real browser.

Usage: flower_check.py FLOWER_URL NODE OK_TASK_ID FAILED_TASK_ID SCREENSHOT_DIR [LABEL]

1. Polls Flower's API (bounded: 60 s) until `/api/tasks` has both tasks in a ready state and
   `/api/workers?refresh=1` lists NODE.
2. Opens Flower's Workers and Tasks pages in Debian's Chromium (headless, driven by Playwright
   with the system browser: Playwright cannot download its own here) and waits until NODE and
   both task ids are on them; saves a screenshot of each into SCREENSHOT_DIR (named
   LABEL-workers.png and LABEL-tasks.png, LABEL "flower" by default). Then opens NODE's own
   page (Flower renders it from the worker's inspect replies) and reads its broker tab.

Prints one JSON object with what it read; the Rust test asserts on it.
"""
import json
import sys
import time
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


def poll_api(base, node, ok_id, failed_id, limit=60.0):
    deadline = time.monotonic() + limit
    tasks, workers, last_error = {}, {}, None
    while time.monotonic() < deadline:
        try:
            tasks = get_json(f"{base}/api/tasks")
            workers = get_json(f"{base}/api/workers?refresh=1")
        except Exception as e:  # Flower still starting, or a refresh timed out
            last_error = repr(e)
            time.sleep(0.5)
            continue
        ok, failed = tasks.get(ok_id, {}), tasks.get(failed_id, {})
        if ok.get("state") == "SUCCESS" and failed.get("state") == "FAILURE" and node in workers:
            return tasks, workers, None
        time.sleep(0.5)
    return tasks, workers, last_error or "timed out waiting for Flower to show both tasks"


def browse(base, node, ok_id, failed_id, out_dir, label):
    from playwright.sync_api import sync_playwright

    seen = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{base}/workers", wait_until="networkidle", timeout=30_000)
            page.wait_for_selector(f"text={node}", timeout=30_000)
            seen["workers_page_has_node"] = node in page.content()
            page.screenshot(path=f"{out_dir}/{label}-workers.png", full_page=True)
            page.goto(f"{base}/tasks", wait_until="networkidle", timeout=30_000)
            # Flower lists 15 tasks a page, newest first, and sees every test's events on
            # the broker: filter by this worker's name (its search box) so the two are shown.
            page.fill("#tasks-table_filter input", node)
            page.wait_for_selector(f"text={ok_id}", timeout=30_000)
            html = page.content()
            seen["tasks_page_has_ok"] = ok_id in html
            seen["tasks_page_has_failed"] = failed_id in html
            page.screenshot(path=f"{out_dir}/{label}-tasks.png", full_page=True)
            page.goto(f"{base}/task/{failed_id}", wait_until="networkidle", timeout=30_000)
            seen["failed_task_page"] = page.inner_text("body")
            reply = page.goto(f"{base}/worker/{node}", wait_until="networkidle", timeout=30_000)
            seen["worker_page_status"] = reply.status if reply else None
            broker_tab = page.query_selector("#tab-broker")
            seen["worker_page_broker"] = broker_tab.text_content() if broker_tab else None
        finally:
            browser.close()
    return seen


def main():
    base, node, ok_id, failed_id, out_dir = sys.argv[1:6]
    label = sys.argv[6] if len(sys.argv) > 6 else "flower"
    tasks, workers, error = poll_api(base, node, ok_id, failed_id)
    report = {
        "error": error,
        "ok": tasks.get(ok_id),
        "failed": tasks.get(failed_id),
        "workers": sorted(workers),
        "worker": workers.get(node),
    }
    if error is None:
        report["browser"] = browse(base, node, ok_id, failed_id, out_dir, label)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
