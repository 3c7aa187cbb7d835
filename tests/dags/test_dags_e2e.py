"""Slow tier: ``airflow dags test`` runs whole DAGs in local mode against the S3 and model servers."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from testkit.data import MODEL, make_jpeg
from testkit.openai_server import OpenAITestServer, Reply
from testkit.verdicts import ScriptedVerdicts
from testkit.videos import write_video
from tests.airflow_env import airflow, airflow_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory, _vlm_server: OpenAITestServer, s3_endpoint: str) -> Path:
    """An Airflow home on SQLite, migrated once for the module's DAG runs."""
    home = tmp_path_factory.mktemp("airflow_home")
    migrate = airflow(
        "db", "migrate", env=airflow_env(home, s3_endpoint=s3_endpoint, vlm_base_url=_vlm_server.base_url, model=MODEL)
    )
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    return home


def read_jsonl(s3, bucket: str, key: str) -> list[dict]:
    return [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()]


def run_keys(s3, bucket: str, dag_id: str) -> list[str]:
    """The objects one DAG run staged: output/<dag_id>/<run_id>/..., without checkpoints."""
    every = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"output/{dag_id}/")["Contents"]]
    assert len({k.split("/")[2] for k in every}) == 1 and every[0].split("/")[2].startswith("manual__")
    keys = [k for k in every if ".checkpoint/" not in k]
    # checkpoints sit beside shard outputs (a shard with no rows has none)
    shard_outputs = {k.removesuffix(".jsonl") for k in keys if "/shard-" in k and not k.endswith(".errors.jsonl")}
    assert {k.split(".checkpoint/")[0] for k in every if ".checkpoint/" in k} <= shard_outputs
    return keys


def names(keys: list[str]) -> list[str]:
    """The keys below output/<dag_id>/<run_id>/."""
    return sorted(k.split("/", 3)[3] for k in keys)


def test_image_qa_dag_end_to_end(vlm_server: OpenAITestServer, s3, bucket: str, s3_endpoint: str, airflow_home: Path) -> None:
    s3.put_object(Bucket=bucket, Key="media/street.jpg", Body=make_jpeg((640, 480)))
    s3.put_object(Bucket=bucket, Key="media/side.jpg", Body=make_jpeg((300, 300)))
    rows = [{"image": ["media/street.jpg", "media/side.jpg"]}, {"image": "media/street.jpg"}, {"image": "media/missing.jpg"}]
    s3.put_object(Bucket=bucket, Key="input/rows.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    env = airflow_env(airflow_home, s3_endpoint=s3_endpoint, vlm_base_url=vlm_server.base_url, model=MODEL)

    conf = {
        "input_uri": f"s3://{bucket}/input/rows.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/",
        "pairs_per_row": 2,
        "seed": 5,
        "rows_per_shard": 2,
        # the double words a row's questions alike but for their number: only exact repeats are near-duplicates here
        "near_duplicate_threshold": 0.99,
    }
    proc = airflow("dags", "test", "image_qa", "-c", json.dumps(conf), env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    keys = run_keys(s3, bucket, "image_qa")
    # two mapped shards, each staged under its map index, merged into the run's output
    # the dataset's media, copied into the run's folder under their content's names
    media = sorted(f"media/{hashlib.sha256(make_jpeg(size)).hexdigest()}.jpg" for size in ((640, 480), (300, 300)))
    assert names(keys) == sorted(
        [
            "README.md",
            "dataset_info.json",
            "generate.errors.jsonl",
            "generate.jsonl",
            "generate.llava.json",
            "generate.manifest.json",
            "generate.preview.html",
            "generate.rejected.jsonl",
            "generate.sharegpt.json",
            "dedup/shard-00000.jsonl",
            "dedup/shard-00000.rejected.jsonl",
            "dedup/shard-00001.jsonl",
            "dedup/shard-00001.rejected.jsonl",
            "generate/shard-00000.errors.jsonl",
            "generate/shard-00000.jsonl",
            "generate/shard-00001.errors.jsonl",
            "generate/shard-00001.jsonl",
            "hf/README.md",
            "hf/data/train-00000.parquet",
            *media,
            "quality.errors.jsonl",
            "quality/shard-00000.errors.jsonl",
            "quality/shard-00000.jsonl",
            "quality/shard-00000.rejected.jsonl",
            "quality/shard-00001.errors.jsonl",
            "quality/shard-00001.jsonl",
            "quality/shard-00001.rejected.jsonl",
        ]
    )
    outputs = [k for k in keys if k.endswith("/generate.jsonl")]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=outputs[0].replace(".jsonl", ".manifest.json"))["Body"].read())
    assert (
        manifest["shards"],
        manifest["rows_in"],
        manifest["rows_out"],
        manifest["rows_failed"],
        manifest["rows_rejected"],
    ) == (2, 3, 2, 1, 0)
    # the double's default verdicts keep every pair: 3 quality calls per pair (blind answer, agreement, grounding)
    assert (manifest["pairs_kept"], manifest["pairs_rejected"], manifest["acceptance_rate"]) == (4, 0, 1.0)
    assert manifest["stages"]["quality"]["requests"] == 12
    out = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=outputs[0])["Body"].read().decode().splitlines()]
    errors_key = outputs[0].replace("generate.jsonl", "generate.errors.jsonl")
    errors = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=errors_key)["Body"].read().decode().splitlines()]
    assert [len(r["qa_pairs"]) for r in out] == [2, 2]
    assert "saw 2 image(s) 640x480,300x300" in out[0]["qa_pairs"][0]["answer"]
    assert [e["reason"] for e in errors] == ["image_not_found"]
    assert out[0]["vqa_provenance"]["image_qa"]["seed"] == 5
    assert [v["grounding"]["score"] for v in out[0]["vqa_provenance"]["quality"]["verdicts"]] == [5, 5]
    assert all(r["seed"] is not None for r in vlm_server.requests)
    assert "sk-airflow-secret-456" not in log and "testing-secret-value" not in log

    # the QA preview beside the output: the three images as thumbnails, the failure under its reason
    preview = s3.get_object(Bucket=bucket, Key=outputs[0].replace(".jsonl", ".preview.html"))
    assert preview["ContentType"].startswith("text/html")
    page = preview["Body"].read().decode()
    assert page.count('<img class="thumb" src="data:image/jpeg;base64,') == 3
    assert "<h3>image_not_found · 1 row</h3>" in page and "acceptance rate 100.0%: 4 of 4 pairs kept" in page
    assert manifest["preview"] == f"s3://{bucket}/" + outputs[0].replace(".jsonl", ".preview.html")
    # the merge task logs where it is, and a link a browser can open (presigned, on the local S3)
    assert f"QA preview: {manifest['preview']}" in log
    assert re.search(
        rf"QA preview in a browser .*: {re.escape(s3_endpoint)}/{bucket}/output/image_qa/\S+/generate\.preview\.html\?\S*Signature=",
        log,
    )
    # progress: one line per batch with done/total, rate, tokens, ETA and failures; the try is named
    assert re.search(
        r"image_qa: 2/2 rows \(100\.0%\), [\d.]+ rows/s, [\d,]+ tokens \(in [\d,]+, out [\d,]+\), ETA 0s, 0 failed, 0 reused", log
    )
    assert re.search(r"image_qa: 1/1 rows \(100\.0%\), .* 1 failed \{'image_not_found': 1\}", log)
    assert "try 1 of 4: running image_qa in-process" in log


def test_pers_qa_dag_end_to_end(vlm_server: OpenAITestServer, s3, bucket: str, s3_endpoint: str, airflow_home: Path) -> None:
    s3.put_object(Bucket=bucket, Key="media/dog.jpg", Body=make_jpeg((500, 400)))
    s3.put_object(Bucket=bucket, Key="media/dog2.jpg", Body=make_jpeg((400, 500)))
    rows = [
        {"image": ["media/dog.jpg", "media/dog2.jpg"], "subject_type": "pet"},
        {"image": "media/dog.jpg"},
        {"image": ["media/nope.jpg"]},
    ]
    s3.put_object(Bucket=bucket, Key="input/pers.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    env = airflow_env(airflow_home, s3_endpoint=s3_endpoint, vlm_base_url=vlm_server.base_url, model=MODEL)
    conf = {
        "input_uri": f"s3://{bucket}/input/pers.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/",
        "tag": "<mam>",
        "seed": 2,
    }
    # the judge finds the second row's pair (its only image: 500x400) answerable without it
    vlm_server.verdicts = ScriptedVerdicts(answerable_blind=lambda question, answer: "saw 1 image(s) 500x400" in answer)
    proc = airflow("dags", "test", "pers_qa", "-c", json.dumps(conf), env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    keys = run_keys(s3, bucket, "pers_qa")
    out = read_jsonl(s3, bucket, next(k for k in keys if k.endswith("/generate.jsonl")))
    errors = read_jsonl(s3, bucket, next(k for k in keys if k.endswith("/generate.errors.jsonl")))
    assert [r["image"] for r in out] == [rows[0]["image"]]
    rejected = read_jsonl(s3, bucket, next(k for k in keys if k.endswith("/generate.rejected.jsonl")))
    assert [(e["stage"], e["line"], e["reason"], e["row_rejected"], e["pair"]) for e in rejected] == [
        ("quality", 2, "answerable_blind", True, rejected[0]["row"]["pers_qa"])
    ]
    for row in out:
        question, answer = row["pers_qa"].removeprefix("Question: ").split(" Answer: ")
        assert "<mam>" in question and answer.startswith("<mam> ")
    assert "saw 2 image(s) 500x400,400x500" in out[0]["pers_qa"]
    assert [e["reason"] for e in errors] == ["image_not_found"]


def test_an_estimate_run_annotates_a_sample_and_projects_the_whole_input(
    vlm_server: OpenAITestServer, s3, bucket: str, s3_endpoint: str, airflow_home: Path
) -> None:
    s3.put_object(Bucket=bucket, Key="media/dog.jpg", Body=make_jpeg((500, 400)))
    s3.put_object(Bucket=bucket, Key="media/dog2.jpg", Body=make_jpeg((400, 500)))
    rows = [
        {"image": ["media/dog.jpg", "media/dog2.jpg"], "subject_type": "pet"},
        {"image": "media/dog.jpg"},
        {"image": "media/dog2.jpg"},
    ]
    s3.put_object(Bucket=bucket, Key="input/pers.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    env = airflow_env(airflow_home, s3_endpoint=s3_endpoint, vlm_base_url=vlm_server.base_url, model=MODEL)
    conf = {
        "input_uri": f"s3://{bucket}/input/pers.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/",
        "tag": "<mam>",
        "seed": 2,
        "estimate_rows": 2,
        "estimate_requests_per_s": 2.0,
        "quality_mode": "annotate",
    }
    vlm_server.verdicts = ScriptedVerdicts(answerable_blind=lambda question, answer: "saw 1 image(s) 500x400" in answer)
    proc = airflow("dags", "test", "pers_qa", "-c", json.dumps(conf), env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "an estimate: the first 2 of the input's 3 rows go through every stage" in log
    assert "estimate for the whole input: 12 model calls" in log and "hours of one model server at 2.0 requests/s (given)" in log

    keys = run_keys(s3, bucket, "pers_qa")
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key=next(k for k in keys if k.endswith("/generate.manifest.json")))["Body"].read()
    )
    # the sample's 2 rows: 1 call each to generate, 3 each to judge their one pair (annotate asks every check)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["requests"]) == (2, 2, 8)
    estimate = manifest["estimate"]
    assert (
        estimate["sample_rows"],
        estimate["input_rows"],
        estimate["per_row"]["requests"],
        estimate["projected"]["requests"],
    ) == (2, 3, 4.0, 12)
    assert estimate["server_hours"] == round(12 / 2.0 / 3600, 3)
    # annotate kept the blind-answerable pair, with what filter would have done
    out = read_jsonl(s3, bucket, next(k for k in keys if k.endswith("/generate.jsonl")))
    assert [v["rejection"] and v["rejection"]["reason"] for r in out for v in r["vqa_provenance"]["quality"]["verdicts"]] == [
        None,
        "answerable_blind",
    ]
    assert manifest["quality_scores"]["failing"] == {"answerable_blind": 1}


def _final_row(rows: list[dict], row_id: str) -> dict:
    return next(r for r in rows if r["id"] == row_id)


def final_answers_with_two_labels(body: dict) -> Reply | None:
    """The final stage's answers, written as a model might: every other pair with two labels, each about the row's last clip."""
    answer = body["response_format"]["json_schema"]
    if answer["name"] != "VideoQAFinal":
        return None  # the schema's own answer
    pairs = answer["schema"]["properties"]["qa"]["minItems"]
    last_clip = answer["schema"]["$defs"]["LabelledPair"]["properties"]["clips"]["items"]["maximum"]
    row = hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()[:8]
    qa = [
        {
            "labels": ["theme_and_brand", "persuasion_strategy"] if i % 2 == 0 else ["visual_understanding"],
            "question": f"question {i + 1}: of row {row}",
            "answer": f"answer {i + 1} of row {row}",
            "clips": [last_clip],
        }
        for i in range(pairs)
    ]
    return Reply(content=json.dumps({"qa": qa}))


def test_video_qa_dag_end_to_end(
    vlm_server: OpenAITestServer, s3, bucket: str, s3_endpoint: str, airflow_home: Path, tmp_path: Path
) -> None:
    for i in range(8):
        s3.put_object(Bucket=bucket, Key=f"media/clip/f{i}.jpg", Body=make_jpeg((640, 360)))
    clips = [
        {
            "Description": "a runner on a trail",
            "Audio_Text": "Go further.",
            "Frames_Images": [f"media/clip/f{i}.jpg" for i in range(4)],
        },
        {"Description": "the shoe, close up", "Audio_Text": "", "Frames_Images": [f"media/clip/f{i}.jpg" for i in range(4, 8)]},
    ]
    # a raw video file too: two scenes of 2 s, cut by the ingest into two clips of two frames
    s3.upload_file(str(write_video(tmp_path / "cuts.mp4", [2.0, 2.0], fps=10)), bucket, "media/raw/cuts.mp4")
    rows = [
        {"id": "ad-1", "Meta": "Trail shoe ad", "Clips": clips},
        {"id": "ad-2", "Meta": "Teaser", "Clips": clips[1:]},
        {"id": "ad-3", "Meta": "broken", "Clips": "x"},
        {"id": "ad-4", "video": "media/raw/cuts.mp4", "Meta": "Cuts ad"},
    ]
    s3.put_object(Bucket=bucket, Key="input/videos.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    env = airflow_env(airflow_home, s3_endpoint=s3_endpoint, vlm_base_url=vlm_server.base_url, model=MODEL)
    conf = {
        "input_uri": f"s3://{bucket}/input/videos.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/",
        "max_frames": 6,
        "max_iterations": 2,
        "final_pairs": 6,
        "seed": 4,
        "rows_per_shard": 2,
        "near_duplicate_threshold": 0.99,
        "frames_per_clip": 2,
    }
    # the judge scores each video's sixth final pair 2: below min_judge_score (3), so it is rejected as not grounded
    vlm_server.verdicts = ScriptedVerdicts(score=lambda question, answer: 2 if question.startswith("question 6:") else 5)
    vlm_server.responder = final_answers_with_two_labels
    proc = airflow("dags", "test", "video_qa", "-c", json.dumps(conf), env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    keys = run_keys(s3, bucket, "video_qa")
    stages = ("ingest", "initial", "multiagent", "final", "quality")
    shards = [f"{t}/shard-0000{i}{ext}" for t in stages for i in (0, 1) for ext in (".jsonl", ".errors.jsonl")]
    shards += [f"quality/shard-0000{i}.rejected.jsonl" for i in (0, 1)]
    shards += [f"dedup/shard-0000{i}{ext}" for i in (0, 1) for ext in (".jsonl", ".rejected.jsonl")]
    # the ingest stored ad-4's frames beside its shard's output (the second shard)
    frames = sorted(n for n in names(keys) if ".frames/" in n)
    assert len(frames) == 4 and all(
        re.fullmatch(r"ingest/shard-00001\.frames/[0-9a-f]{20}/clip-00[01]/frame-0[01]\.jpg", n) for n in frames
    )
    merged = ["final.jsonl", "final.errors.jsonl", "final.manifest.json", "final.preview.html", "final.rejected.jsonl"]
    merged += [f"{t}.errors.jsonl" for t in stages if t != "final"]
    # the training-ready copies, the dataset card, and the frames the model was shown, copied under their content's names
    merged += [
        "hf/README.md",
        "hf/data/train-00000.parquet",
        "final.sharegpt.json",
        "dataset_info.json",
        "final.llava.json",
        "README.md",
    ]
    media = [n for n in names(keys) if n.startswith("media/")]
    assert media and all(re.fullmatch(r"media/[0-9a-f]{64}\.jpg", n) for n in media)
    assert names(keys) == sorted(shards + merged + frames + media)
    prefix = next(k for k in keys if k.endswith("/final.jsonl")).rsplit("/", 1)[0]
    ingested = read_jsonl(s3, bucket, f"{prefix}/ingest/shard-00001.jsonl")[1]
    assert [(c["Start"], c["End"], c["Frame_Times"]) for c in ingested["Clips"]] == [
        (0.0, 2.0, [0.5, 1.5]),
        (2.0, 4.0, [2.5, 3.5]),
    ]
    assert all(c["Description"] for c in ingested["Clips"]) and ingested["Meta"] == "Cuts ad"
    middle = read_jsonl(s3, bucket, f"{prefix}/multiagent/shard-00000.jsonl") + read_jsonl(
        s3, bucket, f"{prefix}/multiagent/shard-00001.jsonl"
    )
    assert [r["video_qa_state"]["iterations"] for r in middle] == [2, 2, 2]
    final = read_jsonl(s3, bucket, f"{prefix}/final.jsonl")
    assert [r["id"] for r in final] == ["ad-1", "ad-2", "ad-4"]
    for row in final:
        assert len(row["QA"]) == 5 and all(
            set(p) == {"Label", "Question", "Answer", "Clips"}
            and p["Clips"]
            and all(0 <= c < len(row["Clips"]) for c in p["Clips"])
            for p in row["QA"]
        )
        assert "video_qa_state" not in row
    rejected = read_jsonl(s3, bucket, f"{prefix}/final.rejected.jsonl")
    assert [(e["line"], e["index"], e["reason"], e["verdicts"]["grounding"]["score"]) for e in rejected] == [
        (1, 5, "not_grounded", 2),
        (2, 5, "not_grounded", 2),
        (4, 5, "not_grounded", 2),
    ]
    # the grounding check saw each video's sampled frames (max_frames 6), the blind check none
    grounding = [r for r in vlm_server.requests if r["response_format"]["json_schema"]["name"] == "GroundingVerdict"]
    frames = [sum(p["type"] == "image_url" for p in r["messages"][-1]["content"]) for r in grounding]
    assert sorted(set(frames)) == [4, 6] and len(grounding) == 18
    assert [e["reason"] for e in read_jsonl(s3, bucket, f"{prefix}/initial.errors.jsonl")] == ["bad_field"]
    # the frame budget: 6 of ad-1's 8 frames and all 4 of ad-2's and of ad-4's reach the model in the initial requests
    initial = [r for r in vlm_server.requests if r["response_format"]["json_schema"]["name"] == "VideoQASet"]
    counts = [
        sum(p["type"] == "image_url" for m in r["messages"] if isinstance(m["content"], list) for p in m["content"])
        for r in initial
    ]
    assert sorted(counts) == [4, 4, 6]
    # the preview shows each video's strip of the frames that were sent, its labelled QA, and the initial stage's failure
    page = s3.get_object(Bucket=bucket, Key=f"{prefix}/final.preview.html")["Body"].read().decode()
    strips = re.findall(r'<div class="media strip">(.*?)</div>', page)
    assert [strip.count('<img class="thumb"') for strip in strips] == [6, 4, 4]
    assert (
        "6 of 8 frames sent" in page
        and page.count('<span class="label">') >= 15
        and "acceptance rate 83.3%: 15 of 18 pairs kept" in page
    )
    assert "<h3>bad_field · 1 row</h3>" in page
    # the video file's pairs are about its last clip: the page gives their seconds; and so does the final stage's provenance
    assert page.count('<span class="span">2.0–4.0 s</span>') == 5
    assert _final_row(final, "ad-4")["vqa_provenance"]["video_qa_final"]["clip_spans"] == [[0.0, 2.0], [2.0, 4.0]]

    # training-ready copies: each video is a conversation over the frames the model was shown, with its five kept pairs
    llava = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/final.llava.json")["Body"].read())
    assert [(item["id"], len(item["image"]), len(item["conversations"])) for item in llava] == [
        ("ad-1", 6, 10),
        ("ad-2", 4, 10),
        ("ad-4", 4, 10),
    ]
    # relative paths into the run's folder, each the copy of the frame the model was shown
    assert all(path in media for item in llava for path in item["image"])
    ingested_copies = [
        f"media/{hashlib.sha256(s3.get_object(Bucket=bucket, Key=uri.split('/', 3)[3])['Body'].read()).hexdigest()}.jpg"
        for c in ingested["Clips"]
        for uri in c["Frames_Images"]
    ]
    assert llava[2]["image"] == ingested_copies
    assert llava[1]["conversations"][0]["value"] == "<image>\n" * 4 + final[1]["QA"][0]["Question"]
    sharegpt = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/final.sharegpt.json")["Body"].read())
    assert [len(item["videos"][0]) for item in sharegpt] == [6, 4, 4] and all(
        item["messages"][0]["content"].startswith("<video>") for item in sharegpt
    )
    # a pair's labels are the ones the final stage joined with ", ", as the output declaration reads them; its clips' seconds, where the
    # clips have them (the ingested video file's)
    declared = [[label.strip() for label in p["Label"].split(", ")] for r in final for p in r["QA"]]
    assert [p["labels"] for item in sharegpt for p in item["qa"]] == declared and any(len(labels) == 2 for labels in declared)
    assert [(p["clips"], p["start"], p["end"]) for p in sharegpt[2]["qa"]] == [
        ([1], 2.0, 4.0)
    ] * 5  # the video file's last clip: 2-4 s
    assert all(
        (p["start"], p["end"]) == (None, None) for item in sharegpt[:2] for p in item["qa"]
    )  # clips given as frames have no times
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=f"{prefix}/hf/data/train-00000.parquet")["Body"].read()))
    assert table.column("meta").to_pylist() == ["Trail shoe ad", "Teaser", "Cuts ad"]
    assert [p["labels"] for qa in table.column("qa").to_pylist() for p in qa] == declared
    card = s3.get_object(Bucket=bucket, Key=f"{prefix}/README.md")["Body"].read().decode()
    labels = Counter(label for labels in declared for label in labels)
    assert "- **Labels**: " + ", ".join(f"`{k}` {v}" for k, v in labels.most_common()) + "." in card
    assert "- **Rows**: 3 in the dataset, of 4 input rows (1 failed, 0 rejected by the quality checks)." in card


def test_a_retried_task_resumes_from_the_failed_try(
    vlm_server: OpenAITestServer, s3, bucket: str, s3_endpoint: str, airflow_home: Path
) -> None:
    import sqlite3

    from testkit.openai_server import Reply

    s3.put_object(Bucket=bucket, Key="media/a.jpg", Body=make_jpeg((200, 100)))
    rows = [{"id": i, "image": "media/a.jpg"} for i in range(10)]
    s3.put_object(Bucket=bucket, Key="input/rows.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    served = 0

    def outage_after_four(body: dict) -> Reply:
        # try 1 finishes four rows, then the server drops every connection until that try has
        # given up (its checkpoint part appears on S3); then it answers again
        nonlocal served
        served += 1
        checkpointed = s3.list_objects_v2(Bucket=bucket, Prefix="output/").get("KeyCount", 0) > 0
        return Reply(drop=True) if served > 4 and not checkpointed else Reply()

    vlm_server.responder = outage_after_four
    env = airflow_env(airflow_home, s3_endpoint=s3_endpoint, vlm_base_url=vlm_server.base_url, model=MODEL)
    env["VQA_RETRY_DELAY_SECONDS"] = "1"
    conf = {
        "input_uri": f"s3://{bucket}/input/rows.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/",
        "concurrency": 1,
        "pairs_per_row": 1,
    }
    proc = airflow("dags", "test", "image_qa", "-c", json.dumps(conf), env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    assert "ServerUnavailableError: model server at" in log  # try 1 failed on the outage, as a job error
    assert (
        "try 2: 4 rows finished by earlier tries will be reused" in log
        and "try 2: 10 rows in, 10 out, 0 failed {}, 4 reused from earlier tries" in log
    )
    # the retry callback's one line: which try, why, and what it had done
    assert re.search(
        r"image_qa\.generate\[0\] try 1 of 4 failed, will retry: ServerUnavailableError: .*; 4/10 rows finished \(4 this try, 0 reused\), 0 failed \{\}",
        log,
    )
    keys = run_keys(s3, bucket, "image_qa")
    out = read_jsonl(s3, bucket, next(k for k in keys if k.endswith("/generate.jsonl")))
    assert [r["id"] for r in out] == list(range(10))

    with sqlite3.connect(airflow_home / "airflow.db") as db:
        run_id = db.execute("SELECT run_id FROM dag_run WHERE dag_id='image_qa' ORDER BY id DESC LIMIT 1").fetchone()[0]
        tries = db.execute(
            "SELECT try_number, state FROM task_instance WHERE dag_id='image_qa' AND run_id=? AND task_id='generate'", (run_id,)
        ).fetchone()
        xcom = db.execute(
            "SELECT value FROM xcom WHERE dag_id='image_qa' AND run_id=? AND task_id='generate' AND key='return_value'", (run_id,)
        ).fetchone()[0]
    manifest = json.loads(xcom if isinstance(xcom, str) else xcom.decode())
    assert tries == (2, "success")
    assert (manifest["rows_reused"], manifest["requests"], manifest["rows_out"], manifest["try_number"]) == (4, 6, 10, 2)
    assert "sk-airflow-secret-456" not in log + json.dumps(manifest) and "testing-secret-value" not in log + json.dumps(manifest)
