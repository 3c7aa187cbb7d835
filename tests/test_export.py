"""Training-ready export: a self-contained folder, each format loaded back as its readers load it (datasets, json, pyarrow).

``tests/test_training.py`` goes further: a trainer's data pipeline and an optimizer step on each format.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from testkit.data import job_options, make_jpeg, read_rows
from testkit.verdicts import ScriptedVerdicts
from tests.helpers import run_manifest
from vqa_operators.exceptions import ExportError
from vqa_operators.export import IMAGE_TOKEN, VIDEO_TOKEN, export_run
from vqa_operators.merge import merge_run
from vqa_operators.records import ExportSettings
from vqa_operators.sharding import plan_shards
from vqa_operators.storage import Storage
from vqa_operators.worker import run_job


def _merged(server, folder: Path, generator: str, rows: list[dict], params: dict) -> dict:
    """generate -> quality -> merge over ``rows`` (one shard), as the DAG runs them; the merged manifest."""
    media = folder / "media-in"
    media.mkdir(exist_ok=True)
    (media / "a.jpg").write_bytes(make_jpeg((64, 48)))
    (media / "b.jpg").write_bytes(make_jpeg((48, 64), color=(20, 120, 200)))
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [shard] = plan_shards(Storage(), str(source), rows_per_shard=100)
    generated = folder / "run" / "generate" / "shard-00000.jsonl"
    made = run_job(
        job_options(
            server,
            folder,
            source,
            generator=generator,
            output=str(generated),
            shard=shard,
            task_key="g",
            params=params,
            media_root=str(media),
        )
    )
    judged = run_job(
        job_options(
            server,
            folder,
            generated,
            generator="quality",
            output=str(folder / "run" / "quality" / "shard-00000.jsonl"),
            shard=shard,
            task_key="q",
            params={"source": generator},
            media_root=str(media),
        )
    )
    return merge_run(
        Storage(),
        {"generate": [made], "quality": [judged]},
        output=str(folder / "run" / "generate.jsonl"),
        plan=[shard.model_dump()],
    )


IMAGE_ROWS = [
    {"id": "one", "image": "a.jpg"},
    {"id": "two", "image": ["a.jpg", "b.jpg"]},
    {"id": "gone", "image": "nowhere.jpg"},
    {"id": "three", "image": "b.jpg"},
]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def sha_name(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() + ".jpg"


def test_the_exports_are_a_self_contained_folder_a_trainer_reads_after_a_copy(vlm_server, tmp_path: Path) -> None:
    from datasets import load_dataset

    # the gate rejects every pair of row "three" (its only image is b.jpg, 48x64): the row leaves the dataset
    vlm_server.verdicts = ScriptedVerdicts(score=lambda q, a: 1 if "48x64" in q and "64x48" not in q else 5)
    manifest = _merged(vlm_server, tmp_path, "image_qa", IMAGE_ROWS, {"pairs_per_row": 2})
    assert (manifest.rows_out, manifest.rows_failed, manifest.rows_rejected) == (2, 1, 1)
    out = read_rows(tmp_path / "run" / "generate.jsonl")
    run = tmp_path / "run"
    exports = export_run(
        Storage(),
        manifest,
        formats=["hf", "sharegpt", "llava"],
        media_root=str(tmp_path / "media-in"),
        dataset="image_qa",
        run_id="r1",
    )
    assert exports == {
        "hf": str(run / "hf"),
        "sharegpt": str(run / "generate.sharegpt.json"),
        "dataset_info": str(run / "dataset_info.json"),
        "llava": str(run / "generate.llava.json"),
        "media": str(run / "media"),
        "card": str(run / "README.md"),
    }
    a, b = sha_name(tmp_path / "media-in" / "a.jpg"), sha_name(tmp_path / "media-in" / "b.jpg")
    # the media the kept rows use, once each, named by content (row "three" and its b.jpg-only pairs were rejected, "two" still uses b.jpg)
    assert sorted(p.name for p in (run / "media").iterdir()) == sorted([a, b])

    # the folder is copied elsewhere (aws s3 sync, say), and the source media deleted: what it names must still be there
    copy = tmp_path / "elsewhere" / "dataset"
    shutil.copytree(run, copy)
    shutil.rmtree(tmp_path / "media-in")

    llava = json.loads((copy / "generate.llava.json").read_text())
    assert [(item["id"], item["image"]) for item in llava] == [("one", f"media/{a}"), ("two", [f"media/{a}", f"media/{b}"])]
    assert llava[0]["conversations"] == [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n" + out[0]["qa_pairs"][0]["question"]},
        {"from": "gpt", "value": out[0]["qa_pairs"][0]["answer"]},
        {"from": "human", "value": out[0]["qa_pairs"][1]["question"]},
        {"from": "gpt", "value": out[0]["qa_pairs"][1]["answer"]},
    ]
    assert all(
        (copy / path).exists()
        for item in llava
        for path in ([item["image"]] if isinstance(item["image"], str) else item["image"])
    )

    sharegpt = json.loads((copy / "generate.sharegpt.json").read_text())
    assert sharegpt[1]["images"] == [f"media/{a}", f"media/{b}"]
    assert sharegpt[1]["messages"][0] == {"role": "user", "content": IMAGE_TOKEN * 2 + out[1]["qa_pairs"][0]["question"]}
    assert [m["role"] for m in sharegpt[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    info = json.loads((copy / "dataset_info.json").read_text())
    assert info == {
        "vqa_image_qa": {
            "file_name": "generate.sharegpt.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    }

    # the hf folder loads as a folder, its images decoded from the bytes it holds, TRL's messages as they are
    ds = load_dataset(str(copy / "hf"), cache_dir=str(tmp_path / "cache"))["train"]
    assert ds.num_rows == 2 and ds["id"] == ["one", "two"]
    assert [img.size for img in ds[1]["images"]] == [(64, 48), (48, 64)]
    assert ds[1]["messages"][0] == {
        "role": "user",
        "content": [
            {"type": "image", "text": None},
            {"type": "image", "text": None},
            {"type": "text", "text": out[1]["qa_pairs"][0]["question"]},
        ],
    }
    assert ds[1]["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": out[1]["qa_pairs"][0]["answer"]}]}
    card = front_matter((copy / "hf" / "README.md").read_text())
    assert card["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]
    assert (
        card["license"] == "other"
        and card["size_categories"] == ["n<1K"]
        and "visual-question-answering" in card["task_categories"]
    )
    assert [f["name"] for f in card["dataset_info"]["features"]] == ["id", "images", "messages", "qa", "meta", "dataset"]
    # the run's own card loads the same dataset from the run's folder
    assert load_dataset(str(copy), cache_dir=str(tmp_path / "cache2"))["train"].num_rows == 2

    text = (run / "README.md").read_text()
    assert front_matter(text)["configs"][0]["data_files"][0]["path"] == "hf/data/train-*.parquet"
    assert "- **Rows**: 2 in the dataset, of 4 input rows (1 failed, 1 rejected by the quality checks)." in text
    assert "- **QA pairs**: 4; the quality checks kept 4 of 6 judged (acceptance rate 66.7%)." in text
    assert "`not_grounded` 2" in text and "`image_not_found` 1" in text and "- **Run**: `r1`" in text
    # how it was made: every stage's generator, model, prompts and errors file
    quality, generate = manifest.stages["quality"], manifest.stages["generate"]
    assert f"| quality | quality | `{quality.model}` | `{quality.prompt_sha256[:16]}` | 0 | `{quality.errors}` |" in text
    assert f"| generate | image_qa | `{generate.model}` | `{generate.prompt_sha256[:16]}` | 1 | `{generate.errors}` |" in text
    assert generate.errors == str(run / "generate.errors.jsonl") and "- **DAG**: " not in text  # merged outside a DAG


@pytest.mark.parametrize("embed", [False, True])
def test_the_flat_parquet_keeps_the_medias_own_uris(vlm_server, tmp_path: Path, embed: bool) -> None:
    from datasets import load_dataset

    manifest = _merged(vlm_server, tmp_path, "image_qa", IMAGE_ROWS[:2], {"pairs_per_row": 1})
    a, b = str(tmp_path / "media-in" / "a.jpg"), str(tmp_path / "media-in" / "b.jpg")
    exports = export_run(Storage(), manifest, formats=["parquet"], embed_images=embed, media_root=str(tmp_path / "media-in"))
    assert set(exports) == {"parquet", "card"} and not (tmp_path / "run" / "media").exists()
    ds = load_dataset("parquet", data_files=exports["parquet"], cache_dir=str(tmp_path / "hf"))["train"]
    assert ds["id"] == ["one", "two"]
    if embed:  # datasets decodes the embedded bytes as images
        assert [img.size for img in ds[1]["images"]] == [(64, 48), (48, 64)]
    else:
        assert ds[1]["images"] == [a, b]
    table = pq.read_table(exports["parquet"])
    assert table.column_names == ["id", "images", "qa", "conversations", "meta", "dataset"]


def test_without_copies_the_files_name_the_medias_own_uris(vlm_server, tmp_path: Path) -> None:
    manifest = _merged(vlm_server, tmp_path, "pers_qa", [{"id": "p1", "image": "a.jpg"}, {"id": "p2", "image": "b.jpg"}], {})
    out = read_rows(tmp_path / "run" / "generate.jsonl")
    exports = export_run(Storage(), manifest, formats=["llava"], copy_media=False, media_root=str(tmp_path / "media-in"))
    assert set(exports) == {"llava", "card"} and not (tmp_path / "run" / "media").exists()
    llava = json.loads(Path(exports["llava"]).read_text())
    question, answer = out[0]["pers_qa"].removeprefix("Question: ").split(" Answer: ")
    assert llava[0]["image"] == str(tmp_path / "media-in" / "a.jpg")
    assert llava[0]["conversations"] == [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
        {"from": "gpt", "value": answer},
    ]


def test_big_runs_are_split_into_bounded_parquet_shards(vlm_server, tmp_path: Path) -> None:
    from datasets import load_dataset

    rows = [{"id": f"r{i}", "image": "a.jpg" if i % 2 else "b.jpg"} for i in range(6)]
    manifest = _merged(vlm_server, tmp_path, "image_qa", rows, {"pairs_per_row": 1})
    image = (tmp_path / "media-in" / "a.jpg").stat().st_size
    export_run(Storage(), manifest, formats=["hf"], media_root=str(tmp_path / "media-in"), shard_bytes=2 * image + 500)
    shards = sorted(p.name for p in (tmp_path / "run" / "hf" / "data").iterdir())
    assert shards == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert load_dataset(str(tmp_path / "run" / "hf"), cache_dir=str(tmp_path / "cache"))["train"]["id"] == [
        f"r{i}" for i in range(6)
    ]


def test_a_sample_whose_placeholders_do_not_match_its_media_is_never_written(
    vlm_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vqa_operators import export

    manifest = _merged(vlm_server, tmp_path, "image_qa", IMAGE_ROWS[:2], {"pairs_per_row": 1})
    real = export.sharegpt_item
    monkeypatch.setattr(
        export, "sharegpt_item", lambda example, paths, **kw: {**real(example, paths, **kw), "images": paths[:1]}
    )  # one image lost
    with pytest.raises(
        ExportError, match=r"row two: 2 media placeholders in its sharegpt sample for 1 media files; nothing is exported"
    ):
        export_run(
            Storage(), manifest, formats=["hf", "sharegpt", "llava"], media_root=str(tmp_path / "media-in"), shard_bytes=10
        )
    run = tmp_path / "run"
    # all or nothing: no export file, no hf shard (a first one was published before the mismatch), no card
    assert not list((run / "hf" / "data").glob("*.parquet")) and not (run / "generate.sharegpt.json").exists()
    assert (
        not (run / "generate.llava.json").exists()
        and not (run / "dataset_info.json").exists()
        and not (run / "README.md").exists()
    )


def test_placeholders_the_model_wrote_cannot_count_as_media(vlm_server, tmp_path: Path) -> None:
    from testkit.openai_server import Reply

    question = f"What is in the {IMAGE_TOKEN} and the {VIDEO_TOKEN}?"
    vlm_server.enqueue(Reply(content=json.dumps({"qa_pairs": [{"question": question, "answer": f"A cat {IMAGE_TOKEN}"}]})))
    manifest = _merged(vlm_server, tmp_path, "image_qa", IMAGE_ROWS[:1], {"pairs_per_row": 1})
    exports = export_run(Storage(), manifest, formats=["sharegpt", "llava"], media_root=str(tmp_path / "media-in"))
    sharegpt = json.loads(Path(exports["sharegpt"]).read_text())
    assert sharegpt[0]["messages"][0]["content"] == IMAGE_TOKEN + "What is in the [image] and the [video]?"
    assert sharegpt[0]["messages"][1]["content"] == "A cat [image]"


def test_an_image_gone_since_generation_is_a_clear_error_and_nothing_is_published(vlm_server, tmp_path: Path) -> None:
    manifest = _merged(vlm_server, tmp_path, "image_qa", IMAGE_ROWS[:2], {"pairs_per_row": 1})
    (tmp_path / "media-in" / "b.jpg").unlink()
    with pytest.raises(ExportError, match=r"cannot read .*b\.jpg \(row two\) for the export"):
        export_run(
            Storage(),
            manifest,
            formats=["hf", "sharegpt", "llava", "parquet"],
            embed_images=True,
            media_root=str(tmp_path / "media-in"),
        )
    assert not [
        p
        for p in (tmp_path / "run").rglob("*")
        if (p.suffix in (".parquet", ".json") or p.name == "README.md") and p.name != "generate.manifest.json"
    ]


@pytest.mark.parametrize("one_size", [True, False], ids=["frames-of-one-size", "frames-of-two-sizes"])
def test_video_pairs_keep_their_labels_and_the_seconds_they_are_about(tmp_path: Path, one_size: bool) -> None:
    from datasets import load_dataset

    frames = []
    for i in range(4):
        frames.append(tmp_path / f"f{i}.jpg")
        frames[-1].write_bytes(make_jpeg((64, 36) if one_size or i < 2 else (36, 64), color=(60 * i, 80, 120)))
    clips = [
        {
            "Description": "a runner",
            "Audio_Text": "",
            "Frames_Images": [str(frames[0]), str(frames[1])],
            "Start": 0.0,
            "End": 2.5,
        },
        {"Description": "a shoe", "Audio_Text": "", "Frames_Images": [str(frames[2]), str(frames[3])], "Start": 2.5, "End": 6.0},
    ]
    qa = [
        {"Label": "theme_and_brand, persuasion_strategy", "Question": "Q1", "Answer": "A1", "Clips": [1]},
        {"Label": "visual_understanding", "Question": "Q2", "Answer": "A2", "Clips": [0, 1]},
    ]
    sent = [{"clip": c, "frame": f, "path": p} for c, clip in enumerate(clips) for f, p in enumerate(clip["Frames_Images"][:1])]
    row = {
        "id": "ad-1",
        "Meta": "Trail ad",
        "Clips": clips,
        "QA": qa,
        "vqa_provenance": {"video_qa_initial": {"frames_sent": sent, "frames_total": 4}, "video_qa_final": {}},
    }
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.jsonl").write_text(json.dumps(row) + "\n")
    manifest = run_manifest("video_qa_final", run / "final.jsonl", rows_in=1, rows_out=1)
    exports = export_run(
        Storage(),
        manifest,
        formats=["hf", "sharegpt"],
        media_root=str(tmp_path),
        allowed_roots=[str(tmp_path)],
        dataset="video_qa",
    )
    sharegpt = json.loads(Path(exports["sharegpt"]).read_text())[0]
    sent_copies = [f"media/{sha_name(frames[0])}", f"media/{sha_name(frames[2])}"]
    columns = json.loads(Path(exports["dataset_info"]).read_text())["vqa_video_qa"]["columns"]
    if one_size:  # the frames the model was shown, as one video: one <video>
        assert (
            sharegpt["videos"] == [sent_copies]
            and "images" not in sharegpt
            and sharegpt["messages"][0]["content"] == VIDEO_TOKEN + "Q1"
        )
        assert columns == {"messages": "messages", "videos": "videos"}
    else:  # frames of two sizes cannot be stacked into one video (LLaMA-Factory stacks them): images, one <image> each
        assert (
            sharegpt["images"] == sent_copies
            and "videos" not in sharegpt
            and sharegpt["messages"][0]["content"] == IMAGE_TOKEN * 2 + "Q1"
        )
        assert columns == {"messages": "messages", "images": "images"}
    assert [(p["labels"], p["clips"], p["start"], p["end"]) for p in sharegpt["qa"]] == [
        (["theme_and_brand", "persuasion_strategy"], [1], 2.5, 6.0),
        (["visual_understanding"], [0, 1], 0.0, 6.0),
    ]
    ds = load_dataset(exports["hf"], cache_dir=str(tmp_path / "cache"))["train"]
    assert [(p["labels"], p["start"], p["end"]) for p in ds[0]["qa"]] == [
        (["theme_and_brand", "persuasion_strategy"], 2.5, 6.0),
        (["visual_understanding"], 0.0, 6.0),
    ]
    assert len(ds[0]["images"]) == 2 and ds[0]["meta"] == "Trail ad"
    card = Path(exports["card"]).read_text()
    assert "- **Labels**: `theme_and_brand` 1, `persuasion_strategy` 1, `visual_understanding` 1." in card and "- video" in card


def test_the_settings_read_the_params_and_refuse_unknown_formats() -> None:
    # the params as the form gives them: a list and booleans, never a joined string
    assert ExportSettings.model_validate(
        {"export_formats": ["hf", "sharegpt"], "copy_media": True, "embed_images": False}
    ) == ExportSettings(export_formats=["hf", "sharegpt"], copy_media=True, embed_images=False)
    assert ExportSettings.model_validate({"export_formats": []}).export_formats == []
    assert ExportSettings().export_formats == ["hf", "sharegpt", "llava"]
    with pytest.raises(ValueError, match="csv"):
        ExportSettings.model_validate({"export_formats": ["hf", "csv"]})
