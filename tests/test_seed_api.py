"""Seed 002's Example Usage, with only the imports changed and the HTTP serving in place of vLLM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import MODEL, make_jpeg
from tests.doubles.openai_server import OpenAITestServer


@pytest.fixture
def seed_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "test").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "test" / "street_scene.jpg").write_bytes(make_jpeg((320, 240)))
    (tmp_path / "test" / "second.jpg").write_bytes(make_jpeg((100, 100)))
    rows = [
        {"image": ["./test/street_scene.jpg"]},
        {"image": ["./test/street_scene.jpg", "./test/second.jpg"]},
        {"image": "./test/second.jpg"},
        {"image": ["./test/missing.jpg"]},
    ]
    (tmp_path / "data" / "example_qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_image_qa_example_usage(vlm_server: OpenAITestServer, seed_workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQA_TEST_URL", vlm_server.base_url)
    # --- seed 002 Example Usage: imports changed, APIVLMServing_openai in place of LocalModelVLMServing_vllm ---
    from vqa_operators import APIVLMServing_openai, FileStorage, ImageQAGenerate

    serving = APIVLMServing_openai(api_url=os.environ["VQA_TEST_URL"], model_name=MODEL, max_workers=4)

    storage = FileStorage(
        first_entry_file_name="data/example_qa.jsonl",
        cache_path="./cache_local",
        file_name_prefix="imageqa",
        cache_type="jsonl",
        media_key="image",
        media_type="image",
    )
    storage.step()

    qa_generator = ImageQAGenerate(serving)
    qa_generator.run(
        storage=storage,
        multi_modal_key="image",
        output_key="qa_pairs",
    )
    # --- end of the example ---
    out = [json.loads(line) for line in (seed_workdir / "cache_local" / "imageqa_step1.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (seed_workdir / "cache_local" / "imageqa_step1.errors.jsonl").read_text().splitlines()]
    assert [r["image"] for r in out] == [["./test/street_scene.jpg"], ["./test/street_scene.jpg", "./test/second.jpg"], "./test/second.jpg"]
    for row in out:
        assert set(row) == {"image", "qa_pairs"}  # the seed's output format, exactly
        assert len(row["qa_pairs"]) == 3 and all(set(p) == {"question", "answer"} for p in row["qa_pairs"])
    assert "saw 2 image(s)" in out[1]["qa_pairs"][0]["answer"]
    assert sorted(e["reason"] for e in errors) == ["image_not_found", "malformed_json"]
    assert len(out) + len(errors) == 5  # every input line accounted for


def test_step_semantics(tmp_path: Path) -> None:
    from vqa_operators import FileStorage

    storage = FileStorage(first_entry_file_name=str(tmp_path / "in.jsonl"), cache_path=str(tmp_path / "c"), file_name_prefix="p")
    with pytest.raises(ValueError, match="step"):
        _ = storage.read_path
    pinned = storage.step()
    assert storage.operator_step == 0 == pinned.operator_step
    assert storage.read_path == str(tmp_path / "in.jsonl")
    assert storage.write_path == str(tmp_path / "c" / "p_step1.jsonl")
    storage.step()
    assert storage.read_path == str(tmp_path / "c" / "p_step1.jsonl") and pinned.operator_step == 0
