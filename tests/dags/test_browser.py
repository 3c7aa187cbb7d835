"""Browser tier: Airflow standalone driven as a user would, through Debian's chromium and Playwright.

One Airflow standalone (SQLite, LocalExecutor, in-process workers) for the module, against the
moto S3 server and the OpenAI-compatible test double. Screenshots land in
``.artifacts/browser/`` (kept by CI runs for a look; the README's come from there).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts.demo import free_port, http, wait_for
from testkit.data import MODEL, photo
from testkit.openai_server import OpenAITestServer, Reply
from tests.airflow_env import AIRFLOW, ROOT, airflow, airflow_env

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# without the background-networking flags chromium keeps dialling Google, which this network refuses
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / ".artifacts" / "browser"
# the README's screenshots: this tier takes them, so they show the UI and the pages as they are now (commit them after a run)
README_SHOTS = ROOT / "docs" / "img"
BUCKET = "vqa-demo"  # the deployment's data root here (VQA_DATA_ROOT): scheduled runs with default params read it


@dataclass
class Standalone:
    """A running ``airflow standalone`` and how to talk to it."""

    url: str
    password: str
    token: str
    env: dict[str, str]

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return http(method, f"{self.url}/api/v2{path}", body, token=self.token)

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 240) -> str:
        """The run's final state (success or failed)."""
        return wait_for(
            f"{dag_id} run {run_id}",
            lambda: (s := self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]) in ("success", "failed") and s,
            timeout,
        )


def upload_day(s3, dag_id: str, day: str, n: int) -> None:
    """``n`` image rows (and one with a missing image) for ``day``'s partition, at the DAG's default input_uri."""
    for i in range(n):
        buf = io.BytesIO()
        photo((320, 240), seed=i).save(buf, "JPEG")
        s3.put_object(Bucket=BUCKET, Key=f"media/{day}/p{i}.jpg", Body=buf.getvalue())
    rows = [{"id": f"{day}-{i}", "image": f"media/{day}/p{i}.jpg"} for i in range(n)] + [
        {"id": f"{day}-missing", "image": "media/nowhere.jpg"}
    ]
    s3.put_object(Bucket=BUCKET, Key=f"raw/{dag_id}/{day}/input.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())


def output_rows(s3, key: str) -> list[dict]:
    return [json.loads(line) for line in s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode().splitlines()]


@pytest.fixture(scope="module")
def s3_demo(s3_endpoint: str):
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing-key-id",
        aws_secret_access_key="testing-secret-value",
        region_name="us-east-1",
    )
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    # today's and yesterday's partitions: unpausing the DAG starts the latest scheduled run, which reads one of them
    for day in {time.strftime("%Y-%m-%d", time.gmtime(time.time() - d * 86400)) for d in (0, 1)}:
        upload_day(client, "image_qa", day, 3)
    return client


@pytest.fixture(scope="module")
def standalone(
    tmp_path_factory: pytest.TempPathFactory, _vlm_server: OpenAITestServer, s3_endpoint: str, s3_demo
) -> Iterator[Standalone]:
    home = tmp_path_factory.mktemp("standalone")
    port = free_port(18080)
    url = f"http://localhost:{port}"
    env = airflow_env(home, s3_endpoint=s3_endpoint, vlm_base_url=_vlm_server.base_url, model=MODEL)
    env.update(
        {
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "VQA_DATA_ROOT": f"s3://{BUCKET}",
            # standalone starts its components as `airflow ...` subprocesses
            "PATH": f"{Path(AIRFLOW).parent}:{os.environ.get('PATH', '')}",
        }
    )
    log = open(home / "standalone.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [AIRFLOW, "standalone"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for("Airflow API", lambda: http("GET", f"{url}/api/v2/monitor/health")["scheduler"]["status"] == "healthy", 240)
        password_file = home / "simple_auth_manager_passwords.json.generated"
        password = wait_for("admin password", lambda: json.loads(password_file.read_text()).get("admin"), 60)
        token = http("POST", f"{url}/auth/token", {"username": "admin", "password": password})["access_token"]
        server = Standalone(url=url, password=password, token=token, env=env)
        wait_for("the DAGs", lambda: all(server.api("GET", f"/dags/{d}") for d in ("image_qa", "pers_qa", "video_qa")), 120)
        yield server
    except BaseException:
        print((home / "standalone.log").read_text()[-5000:])
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, standalone: Standalone) -> Iterator[Any]:
    """A logged-in page."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{standalone.url}/dags")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", standalone.password)
    page.click("button[type=submit]")
    page.wait_for_url("**/dags**")
    yield page
    context.close()


def trigger_from_form(
    page: Any, standalone: Standalone, dag_id: str, run_id: str, fields: dict[str, str], shot: str | None = None
) -> None:
    """Open the DAG's trigger form, change ``fields``, name the run, and press Trigger."""
    page.goto(f"{standalone.url}/dags/{dag_id}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.locator("[role=dialog][data-state=open]")
    dialog.wait_for()
    for name, value in fields.items():
        page.fill(f"input[name=element_{name}]", value)
    if shot:  # the whole form: a viewport tall enough for the dialog, then back
        size = page.viewport_size
        page.set_viewport_size({"width": size["width"], "height": 2400})
        dialog.screenshot(path=str(README_SHOTS / shot))
        page.set_viewport_size(size)
    dialog.get_by_role("button", name="Advanced Options").click()
    page.fill("input[name=dagRunId]", run_id)
    page.get_by_role("button", name="Trigger").last.click()
    page.wait_for_url(f"**/dags/{dag_id}/runs/{run_id}**")


def test_trigger_image_qa_from_the_form_and_read_its_log(page: Any, standalone: Standalone, s3_demo, s3_endpoint: str) -> None:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    trigger_from_form(page, standalone, "image_qa", "ui_form_run", {"pairs_per_row": "2"}, shot="trigger-form.png")
    assert standalone.wait_run("image_qa", "ui_form_run") == "success"

    # the run's page shows every task green in the grid
    page.goto(f"{standalone.url}/dags/image_qa/runs/ui_form_run")
    for task in ("plan", "merge"):
        page.get_by_text(task, exact=True).first.wait_for()
    page.get_by_text("Success").first.wait_for()
    assert page.get_by_text("Success", exact=True).count() >= 3  # plan, generate[0], merge in the task instance list
    page.screenshot(path=str(ARTIFACTS / "run-grid.png"))

    # the mapped worker's log: the try, a progress line per batch, the summary
    page.goto(f"{standalone.url}/dags/image_qa/runs/ui_form_run/tasks/generate/mapped/0")
    page.get_by_text("rows/s").first.wait_for()
    log_text = page.locator("body").inner_text()
    assert "try 1 of 4: running image_qa in-process" in log_text
    assert re.search(
        r"image_qa: 4/4 rows \(100\.0%\), [\d.]+ rows/s, [\d,]+ tokens .*ETA 0s, 1 failed \{'image_not_found': 1\}", log_text
    )
    page.screenshot(path=str(ARTIFACTS / "task-log.png"))

    # the form's change reached the run: two pairs per row, today's partition read
    manifest = standalone.api("GET", "/dags/image_qa/dagRuns/ui_form_run/taskInstances/merge/xcomEntries/return_value")["value"]
    manifest = json.loads(manifest) if isinstance(manifest, str) else manifest
    assert manifest["input"] == f"s3://{BUCKET}/raw/image_qa/{today}/input.jsonl"
    rows = output_rows(s3_demo, manifest["output"].removeprefix(f"s3://{BUCKET}/"))
    assert [r["id"] for r in rows] == [f"{today}-{i}" for i in range(3)] and all(len(r["qa_pairs"]) == 2 for r in rows)

    # the merge task's "QA preview" link is the presigned preview URL
    preview_url = standalone.api("GET", "/dags/image_qa/dagRuns/ui_form_run/taskInstances/merge/links")["extra_links"][
        "QA preview"
    ]
    assert preview_url.startswith(f"{s3_endpoint}/{BUCKET}/output/image_qa/ui_form_run/generate.preview.html?")

    # ... and it renders: every thumbnail decoded, the failure under its reason
    page.goto(preview_url)
    page.wait_for_load_state("load")
    sizes = page.eval_on_selector_all("img.thumb", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(sizes) == 3 and all(w > 0 for w in sizes)
    assert page.locator("h3").all_inner_texts() == ["image_not_found · 1 row"]
    assert page.locator(".qa li").count() == 6
    page.screenshot(path=str(README_SHOTS / "preview.png"), full_page=True)


def test_a_failed_try_is_retried_and_the_ui_shows_try_2(
    page: Any, standalone: Standalone, s3_demo, _vlm_server: OpenAITestServer
) -> None:
    # rows of this run ask for 4 pairs: the first try gets 2 rows through, then the server goes
    # away until that try has given up (its checkpoint is on S3); the retry resumes
    served = 0
    lock = threading.Lock()

    def outage(body: dict) -> Reply | None:
        nonlocal served
        schema = body.get("response_format", {}).get("json_schema", {}).get("schema", {})
        if schema.get("properties", {}).get("qa_pairs", {}).get("minItems") != 4:
            return None
        with lock:
            served += 1
            n = served
        checkpointed = (
            s3_demo.list_objects_v2(Bucket=BUCKET, Prefix="output/image_qa/ui_retry_run/generate/").get("KeyCount", 0) > 0
        )
        return Reply(drop=True) if n > 2 and not checkpointed else None

    _vlm_server.responder = outage
    try:
        trigger_from_form(page, standalone, "image_qa", "ui_retry_run", {"pairs_per_row": "4", "concurrency": "1"})
        assert standalone.wait_run("image_qa", "ui_retry_run") == "success"
    finally:
        _vlm_server.responder = None

    ti = standalone.api("GET", "/dags/image_qa/dagRuns/ui_retry_run/taskInstances/generate/0")
    assert (ti["try_number"], ti["state"]) == (2, "success")
    manifest = standalone.api(
        "GET", "/dags/image_qa/dagRuns/ui_retry_run/taskInstances/generate/xcomEntries/return_value?map_index=0"
    )["value"]
    manifest = json.loads(manifest) if isinstance(manifest, str) else manifest
    reused = manifest["rows_reused"]
    # two rows answered, and the row with the missing image (no model call) may have finished beside them
    assert manifest["try_number"] == 2 and manifest["rows_in"] == 4 and reused in (2, 3)

    # the task page shows try 2, whose log says what it reused ...
    page.goto(f"{standalone.url}/dags/image_qa/runs/ui_retry_run/tasks/generate/mapped/0")
    page.get_by_text("rows/s").first.wait_for()
    page.screenshot(path=str(README_SHOTS / "retry-try-2.png"))
    body = page.locator("body").inner_text()
    assert re.search(r"Try Number\s+2\b", body) and "Task Tries" in body
    assert "try 2 of 4: running image_qa in-process" in body
    assert f"try 2: {reused} rows finished by earlier tries will be reused" in body
    assert f"try 2: 4 rows in, 3 out, 1 failed {{'image_not_found': 1}}, {reused} reused from earlier tries" in body
    # ... and try 1's log ends with the retry callback's one line
    page.get_by_role("button", name="1", exact=True).click()  # the "Task Tries" selector
    page.get_by_text("ServerUnavailableError").first.wait_for()
    page.get_by_text("Post Execute").last.click()  # the callbacks run after the task, in the log's last (folded) group
    page.get_by_text("failed, will retry").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "retry-try-1.png"))
    first = page.locator("body").inner_text()
    assert re.search(
        rf"image_qa\.generate\[0\] try 1 of 4 failed, will retry: ServerUnavailableError: .*; {reused}/4 rows finished \({reused} this try, 0 reused\)",
        first,
    )


def test_backfill_three_dates_each_with_its_own_output(standalone: Standalone, s3_demo) -> None:
    days = ["2026-01-05", "2026-01-06", "2026-01-07"]
    for n, day in enumerate(days, start=1):
        upload_day(s3_demo, "image_qa", day, n)  # 1, 2 and 3 good rows
    standalone.api("PATCH", "/dags/image_qa", {"is_paused": False})  # backfill runs wait while a DAG is paused
    # the CLI writes to the same SQLite file as the running scheduler: it waits for the scheduler's lock (the busy
    # timeout airflow_env sets), so one call is enough
    proc = airflow(
        "backfill",
        "create",
        "--dag-id",
        "image_qa",
        "--from-date",
        days[0],
        "--to-date",
        days[-1],
        "--max-active-runs",
        "3",
        env=standalone.env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    def backfill_runs() -> list[dict]:
        runs = [r for r in standalone.api("GET", "/dags/image_qa/dagRuns?limit=100")["dag_runs"] if r["run_type"] == "backfill"]
        return runs if len(runs) == 3 and all(r["state"] in ("success", "failed") for r in runs) else []

    try:
        runs = sorted(wait_for("three backfill runs", backfill_runs, 300), key=lambda r: r["logical_date"])
    except SystemExit:
        listed = standalone.api("GET", "/dags/image_qa/dagRuns?limit=100")["dag_runs"]
        pytest.fail(
            f"backfill runs not done: {[(r['dag_run_id'], r['run_type'], r['state']) for r in listed]}; CLI said: {proc.stdout[-1500:]}"
        )
    assert [r["state"] for r in runs] == ["success"] * 3
    assert [r["logical_date"][:10] for r in runs] == days
    for n, (run, day) in enumerate(zip(runs, days, strict=True), start=1):
        manifest = standalone.api(
            "GET", f"/dags/image_qa/dagRuns/{run['dag_run_id']}/taskInstances/merge/xcomEntries/return_value"
        )["value"]
        manifest = json.loads(manifest) if isinstance(manifest, str) else manifest
        assert manifest["input"] == f"s3://{BUCKET}/raw/image_qa/{day}/input.jsonl"
        assert manifest["output"] == f"s3://{BUCKET}/output/image_qa/{run['dag_run_id']}/generate.jsonl"
        assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_failed"]) == (n + 1, n, 1)
        assert [r["id"] for r in output_rows(s3_demo, manifest["output"].removeprefix(f"s3://{BUCKET}/"))] == [
            f"{day}-{i}" for i in range(n)
        ]


def test_a_published_dataset_starts_the_downstream_dag_and_a_failed_run_starts_nothing(standalone: Standalone, s3_demo) -> None:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    for dag_id in ("image_qa", "dataset_ready"):  # the consumer is created paused; paused DAGs get no asset events queued
        standalone.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
    # a run that fails (its input does not exist: plan fails at once, without retries) beside one that succeeds;
    # an asset event is recorded only as a task succeeds, so once the failed run has ended none can come from it
    inputs = {
        "asset_failed_run": f"s3://{BUCKET}/raw/image_qa/no-such-day/input.jsonl",
        "asset_ok_run": f"s3://{BUCKET}/raw/image_qa/{today}/input.jsonl",
    }
    for name, input_uri in inputs.items():
        standalone.api(
            "POST",
            "/dags/image_qa/dagRuns",
            {"dag_run_id": name, "logical_date": None, "conf": {"input_uri": input_uri, "pairs_per_row": 1}},
        )
    assert [standalone.wait_run("image_qa", name) for name in inputs] == ["failed", "success"]

    def consumer_runs() -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """Each consumer run and its triggering events, once the run started for asset_ok_run has ended."""
        listed = {r["dag_run_id"]: r for r in standalone.api("GET", "/dags/dataset_ready/dagRuns?limit=100")["dag_runs"]}
        events = {
            run_id: standalone.api("GET", f"/dags/dataset_ready/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]
            for run_id in listed
        }
        ours = [run_id for run_id, evs in events.items() if any(e["source_run_id"] == "asset_ok_run" for e in evs)]
        return (listed, events) if ours and listed[ours[0]]["state"] in ("success", "failed") else ({}, {})

    runs_seen, events = wait_for("the consumer's run for asset_ok_run", lambda: (found := consumer_runs())[0] and found, 120)
    sources = {e["source_run_id"] for evs in events.values() for e in evs}
    assert "asset_ok_run" in sources and "asset_failed_run" not in sources
    # the failed run recorded no event at all, for any asset
    assert standalone.api("GET", "/assets/events?source_run_id=asset_failed_run")["asset_events"] == []

    # the event carries the manifest's counts and URIs, and the consumer's task read them
    manifest = standalone.api("GET", "/dags/image_qa/dagRuns/asset_ok_run/taskInstances/merge/xcomEntries/return_value")["value"]
    manifest = json.loads(manifest) if isinstance(manifest, str) else manifest
    # (a consumer run may hold other runs' events too, e.g. a scheduled run's that finished alongside)
    [(consumer_run, event)] = [(run_id, e) for run_id, evs in events.items() for e in evs if e["source_run_id"] == "asset_ok_run"]
    assert (runs_seen[consumer_run]["run_type"], runs_seen[consumer_run]["state"]) == ("asset_triggered", "success")
    assert (event["name"], event["source_dag_id"], event["source_task_id"], event["partition_key"]) == (
        "vqa.image_qa",
        "image_qa",
        "merge",
        None,
    )
    assert event["extra"]["output"] == manifest["output"] == f"s3://{BUCKET}/output/image_qa/asset_ok_run/generate.jsonl"
    assert {
        k: event["extra"][k] for k in ("rows_in", "rows_out", "rows_failed", "rows_rejected", "manifest", "errors", "rejected")
    } == {k: manifest[k] for k in ("rows_in", "rows_out", "rows_failed", "rows_rejected", "manifest", "errors", "rejected")}
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_failed"]) == (4, 3, 1)
    # the event names every stage's errors file, and what made each stage
    prefix = f"s3://{BUCKET}/output/image_qa/asset_ok_run"
    assert event["extra"]["errors"] == {
        "generate": f"{prefix}/generate.errors.jsonl",
        "quality": f"{prefix}/quality.errors.jsonl",
    }
    assert (
        set(event["extra"]["stages"]) == {"generate", "dedup", "quality"}
        and event["extra"]["stages"]["quality"]["errors"] == f"{prefix}/quality.errors.jsonl"
    )
    read = standalone.api(
        "GET", f"/dags/dataset_ready/dagRuns/{consumer_run}/taskInstances/new_datasets/xcomEntries/return_value"
    )["value"]
    read = json.loads(read) if isinstance(read, str) else read
    assert [(d["asset"], d["output"], d["rows_out"]) for d in read if d["source_run_id"] == "asset_ok_run"] == [
        ("vqa.image_qa", manifest["output"], 3)
    ]
    standalone.api("PATCH", "/dags/dataset_ready", {"is_paused": True})
