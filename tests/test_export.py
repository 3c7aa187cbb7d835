"""Training-ready export: each format is loaded back with the library a user would use (datasets, pyarrow, json)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from testkit.data import job_options, make_jpeg, read_rows
from testkit.verdicts import ScriptedVerdicts
from vqa_operators.export import IMAGE_TOKEN, ExportSettings, export_run
from vqa_operators.sharding import NearDuplicateSettings, merge_run, plan_shards
from vqa_operators.storage import Storage
from vqa_operators.worker import run_job


def _merged(server, folder: Path, generator: str, rows: list[dict], params: dict) -> dict:
    """generate -> quality -> merge over ``rows`` (one shard), as the DAG runs them; the merged manifest."""
    media = folder / "media"
    media.mkdir(exist_ok=True)
    (media / "a.jpg").write_bytes(make_jpeg((64, 48)))
    (media / "b.jpg").write_bytes(make_jpeg((48, 64), color=(20, 120, 200)))
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [shard] = plan_shards(Storage(), str(source), rows_per_shard=100)
    generated = folder / "run" / "generate" / "shard-00000.jsonl"
    made = run_job(job_options(server, folder, source, generator=generator, output=str(generated), shard=shard, task_key="g", params=params))
    judged = run_job(
        job_options(server, folder, generated, generator="quality", output=str(folder / "run" / "quality" / "shard-00000.jsonl"), shard=shard, task_key="q", params={"source": generator})
    )
    return merge_run(Storage(), {"generate": [made], "quality": [judged]}, output=str(folder / "run" / "generate.jsonl"), plan=[shard.model_dump()], near_duplicates=NearDuplicateSettings(enabled=False))


IMAGE_ROWS = [{"id": "one", "image": "a.jpg"}, {"id": "two", "image": ["a.jpg", "b.jpg"]}, {"id": "gone", "image": "nowhere.jpg"}, {"id": "three", "image": "b.jpg"}]


@pytest.mark.parametrize("embed", [False, True])
def test_image_qa_exports_load_back_with_datasets_pyarrow_and_json(vlm_server, tmp_path: Path, embed: bool) -> None:
    from datasets import load_dataset

    # the gate rejects every pair of row "three" (its only image is b.jpg, 48x64): the row leaves the dataset
    vlm_server.verdicts = ScriptedVerdicts(score=lambda q, a: 1 if "48x64" in q and "64x48" not in q else 5)
    manifest = _merged(vlm_server, tmp_path, "image_qa", IMAGE_ROWS, {"pairs_per_row": 2})
    assert (manifest["rows_out"], manifest["rows_failed"], manifest["rows_rejected"]) == (2, 1, 1)
    out = read_rows(tmp_path / "run" / "generate.jsonl")
    exports = export_run(Storage(), manifest, formats=["parquet", "llava"], embed_images=embed, media_root=str(tmp_path / "media"), dataset="image_qa", run_id="r1")
    run = tmp_path / "run"
    assert exports == {"parquet": str(run / "generate.parquet"), "llava": str(run / "generate.llava.json"), "card": str(run / "README.md")}
    a, b = str(tmp_path / "media" / "a.jpg"), str(tmp_path / "media" / "b.jpg")

    # Hugging Face datasets, as a user loads it
    ds = load_dataset("parquet", data_files=exports["parquet"], cache_dir=str(tmp_path / "hf"))["train"]
    assert ds.num_rows == 2 and ds["id"] == ["one", "two"]
    assert [[(p["question"], p["answer"]) for p in row["qa"]] for row in ds] == [[(p["question"], p["answer"]) for p in r["qa_pairs"]] for r in out]
    first = ds[1]
    assert first["conversations"][0] == {"from": "human", "value": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n" + out[1]["qa_pairs"][0]["question"]}
    assert [t["from"] for t in first["conversations"]] == ["human", "gpt", "human", "gpt"]
    if embed:  # datasets decodes the embedded bytes as images
        assert [img.size for img in first["images"]] == [(64, 48), (48, 64)]
    else:
        assert first["images"] == [a, b]
    # pyarrow: the schema, and the bytes as they are on disk
    table = pq.read_table(exports["parquet"])
    assert table.column_names == ["id", "images", "qa", "conversations", "meta", "dataset"] and table.num_rows == 2
    assert table.column("dataset").to_pylist() == ["image_qa", "image_qa"] and table.column("meta").to_pylist() == [None, None]
    if embed:
        assert table.column("images")[0].as_py() == [{"bytes": Path(a).read_bytes(), "path": a}]

    # LLaVA JSON: one image is a string, several a list; one <image> line per image; a turn pair per QA pair
    llava = json.loads(Path(exports["llava"]).read_text())
    assert [(item["id"], item["image"]) for item in llava] == [("one", a), ("two", [a, b])]
    assert llava[0]["conversations"] == [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n" + out[0]["qa_pairs"][0]["question"]}, {"from": "gpt", "value": out[0]["qa_pairs"][0]["answer"]},
        {"from": "human", "value": out[0]["qa_pairs"][1]["question"]}, {"from": "gpt", "value": out[0]["qa_pairs"][1]["answer"]},
    ]

    # the card: counts, acceptance, reasons, models and prompt hashes, the input and the run
    card = Path(exports["card"]).read_text()
    assert card.startswith("---\ntask_categories:\n- visual-question-answering\nconfigs:\n- config_name: default\n  data_files: generate.parquet\n---\n")
    assert "- **Rows**: 2 in the dataset, of 4 input rows (1 failed, 1 rejected by the quality checks)." in card
    assert "- **QA pairs**: 4; the quality checks kept 4 of 6 judged (acceptance rate 66.7%)." in card
    assert "`not_grounded` 2" in card and "`image_not_found` 1" in card and "- **Run**: `r1`" in card
    assert f"| quality | `{manifest['stages']['quality']['model']}` | `{manifest['stages']['quality']['prompt_sha256'][:16]}` |" in card


def test_pers_qa_rows_are_one_turn_each(vlm_server, tmp_path: Path) -> None:
    manifest = _merged(vlm_server, tmp_path, "pers_qa", [{"id": "p1", "image": "a.jpg"}, {"id": "p2", "image": "b.jpg"}], {})
    out = read_rows(tmp_path / "run" / "generate.jsonl")
    exports = export_run(Storage(), manifest, formats=["llava"], media_root=str(tmp_path / "media"))
    assert set(exports) == {"llava", "card"} and not (tmp_path / "run" / "generate.parquet").exists()
    llava = json.loads(Path(exports["llava"]).read_text())
    question, answer = out[0]["pers_qa"].removeprefix("Question: ").split(" Answer: ")
    assert llava[0]["conversations"] == [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]
    assert answer.startswith("<mam>") and len(llava) == 2


def test_the_settings_read_the_params_and_refuse_unknown_formats(tmp_path: Path) -> None:
    assert ExportSettings.model_validate({"formats": "parquet,llava", "embed_images": "False"}) == ExportSettings(formats=["parquet", "llava"], embed_images=False)
    assert ExportSettings.model_validate({"formats": "", "embed_images": "True"}).formats == []
    with pytest.raises(ValueError, match="csv"):
        ExportSettings.model_validate({"formats": "parquet,csv"})


def test_an_image_gone_since_generation_is_a_clear_error_and_nothing_is_published(vlm_server, tmp_path: Path) -> None:
    manifest = _merged(vlm_server, tmp_path, "image_qa", IMAGE_ROWS[:2], {"pairs_per_row": 1})
    (tmp_path / "media" / "b.jpg").unlink()
    from vqa_operators.exceptions import ExportError

    with pytest.raises(ExportError, match=r"cannot embed .*b\.jpg \(row two\)"):
        export_run(Storage(), manifest, formats=["parquet", "llava"], embed_images=True, media_root=str(tmp_path / "media"))
    # the writes are atomic: a failed export leaves no half-written file
    assert not (tmp_path / "run" / "generate.parquet").exists() and not (tmp_path / "run" / "generate.llava.json").exists()
