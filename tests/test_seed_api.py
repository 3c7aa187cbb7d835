"""Seed 002's Example Usage, with only the imports changed and the HTTP serving in place of vLLM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import MODEL, make_jpeg
from tests.doubles.openai_server import OpenAITestServer, Reply


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


def test_pers_qa_example_usage(vlm_server: OpenAITestServer, seed_workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"image": ["./test/street_scene.jpg"]}, {"image": ["./test/street_scene.jpg", "./test/second.jpg"]}, {"image": []}]
    (seed_workdir / "data" / "example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("VQA_TEST_URL", vlm_server.base_url)
    # --- seed 003 Example Usage: imports changed, APIVLMServing_openai in place of LocalModelVLMServing_vllm ---
    from vqa_operators import APIVLMServing_openai, FileStorage, PersQAGenerate

    # Step 1: Launch local model service
    serving = APIVLMServing_openai(api_url=os.environ["VQA_TEST_URL"], model_name=MODEL, max_workers=4)

    # Step 2: Prepare storage
    storage = FileStorage(
        first_entry_file_name="data/example.jsonl",
        cache_path="./cache_local",
        file_name_prefix="pers_qa",
        cache_type="jsonl",
        media_key="image",
        media_type="image",
    )
    storage.step()

    # Step 3: Initialize and run the operator
    generator = PersQAGenerate(serving)
    generator.run(
        storage=storage,
        multi_modal_key="image",
        output_key="pers_qa",
    )
    # --- end of the example ---
    out = [json.loads(line) for line in (seed_workdir / "cache_local" / "pers_qa_step1.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (seed_workdir / "cache_local" / "pers_qa_step1.errors.jsonl").read_text().splitlines()]
    assert [r["image"] for r in out] == [rows[0]["image"], rows[1]["image"]]
    for row in out:
        assert set(row) == {"image", "pers_qa"}
        question, answer = row["pers_qa"].removeprefix("Question: ").split(" Answer: ")
        assert "<mam>" in question and answer.startswith("<mam> ")
    assert [e["reason"] for e in errors] == ["bad_field"]


class VideoQAPipeline:
    """Seed 000's Example Usage runs inside a pipeline object (``self.storage``, ``self.llm_serving``)."""

    def __init__(self, api_url: str, first_entry_file: str, cache_path: str, file_name_prefix: str, cache_type: str) -> None:
        # --- seed 000 Example Usage, Steps 1 and 2: imports changed, APIVLMServing_openai in place of LocalModelVLMServing_vllm ---
        from vqa_operators import APIVLMServing_openai, FileStorage

        # Step 1: Launch local model service
        llm_serving = APIVLMServing_openai(api_url=api_url, model_name=MODEL, max_workers=4, temperature=0.7, top_p=0.9, max_tokens=6000)

        # Step 2: Prepare input data
        storage = FileStorage(
            first_entry_file_name=first_entry_file,
            cache_path=cache_path,
            file_name_prefix=file_name_prefix,
            cache_type=cache_type,
        )
        # --- end of Steps 1 and 2 ---
        self.llm_serving, self.storage = llm_serving, storage
        self.input_meta_key, self.input_clips_key, self.output_key = "Meta", "Clips", "QA"

    def forward(self) -> None:
        # --- seed 000 Example Usage, Step 3, verbatim but for the import ---
        from vqa_operators import MultiroleVideoQAFinalGenerator, MultiroleVideoQAInitialGenerator, MultiroleVideoQAMultiAgentGenerator

        # Step 3: Initialize and run the operator
        initial_QA_generation = MultiroleVideoQAInitialGenerator(llm_serving = self.llm_serving)  # noqa: E251, N806
        multiAgent_QA_generation = MultiroleVideoQAMultiAgentGenerator(llm_serving = self.llm_serving, max_iterations = 3)  # noqa: E251, N806
        final_QA_generation = MultiroleVideoQAFinalGenerator(llm_serving = self.llm_serving)  # noqa: E251, N806

        init_df = initial_QA_generation.run(
                    storage = self.storage.step(),  # noqa: E251
                    input_meta_key = self.input_meta_key,  # noqa: E251
                    input_clips_key = self.input_clips_key,  # noqa: E251
                    output_key = self.output_key  # noqa: E251
                )
        middle_df = multiAgent_QA_generation.run(
                    df = init_df,  # noqa: E251
                    input_meta_key = self.input_meta_key,  # noqa: E251
                    input_clips_key = self.input_clips_key,  # noqa: E251
                    output_key = self.output_key  # noqa: E251
                )
        final_QA_generation.run(
                    storage = self.storage,  # noqa: E251
                    df = middle_df,  # noqa: E251
                    input_meta_key = self.input_meta_key,  # noqa: E251
                    input_clips_key = self.input_clips_key,  # noqa: E251
                    output_key = self.output_key  # noqa: E251
                )
        # --- end of the example ---


def test_video_qa_example_usage(vlm_server: OpenAITestServer, seed_workdir: Path) -> None:
    for i in range(4):
        (seed_workdir / "test" / f"frame{i}.jpg").write_bytes(make_jpeg((160, 90)))
    clips = [
        {"Audio_Text": "Audio_Text1", "Frames_Images": ["./test/frame0.jpg", "./test/frame1.jpg"], "Description": "Description1"},
        {"Audio_Text": "Audio_Text2", "Frames_Images": ["./test/frame2.jpg", "./test/frame3.jpg"], "Description": "Description2"},
    ]
    rows = [
        {"Meta": "Meta Information", "Clips": clips},
        {"Meta": "Second video", "Clips": clips[:1]},
        {"Meta": "No clips", "Clips": []},  # fails at the initial stage
        {"Meta": "Missing frame", "Clips": [{**clips[0], "Frames_Images": ["./test/gone.jpg"]}]},  # fails too
    ]
    (seed_workdir / "data" / "video.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def master_terminates_for_the_second_video(body: dict) -> Reply | None:
        prompt = json.dumps(body["messages"])
        if body["response_format"]["json_schema"]["name"] == "MasterDecision" and "Second video" in prompt:
            return Reply(content=json.dumps({"action": "terminate", "reason": "enough", "expert": None}))
        return None

    vlm_server.responder = master_terminates_for_the_second_video
    VideoQAPipeline(vlm_server.base_url, "data/video.jsonl", "./cache_local", "video_qa", "jsonl").forward()

    out = [json.loads(line) for line in (seed_workdir / "cache_local" / "video_qa_step1.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (seed_workdir / "cache_local" / "video_qa_step1.errors.jsonl").read_text().splitlines()]
    assert [r["Meta"] for r in out] == ["Meta Information", "Second video"]
    for row in out:
        assert set(row) == {"Meta", "Clips", "QA"}  # the seed's output format, exactly
        assert len(row["QA"]) == 10 and all(set(p) == {"Label", "Question", "Answer"} for p in row["QA"])
        assert row["Clips"] == rows[0]["Clips"][: len(row["Clips"])]
    # the errors of the initial stage survive the chaining and land beside the final output
    assert [(e["stage"], e["reason"]) for e in errors] == [("video_qa_initial", "bad_field"), ("video_qa_initial", "image_not_found")]
    names = [b["response_format"]["json_schema"]["name"] for b in vlm_server.requests]
    # video 1: initial, 3 x (recruit, expert, revise), final; video 2: initial, recruit -> terminate, final
    assert names.count("VideoQASet") == 2 and names.count("MasterDecision") == 4 and names.count("ExpertQASet") == 3
    assert names.count("VideoQAFinal") == 2
    assert all(b["max_tokens"] == 6000 and b["temperature"] == 0.7 for b in vlm_server.requests)


def test_every_seed_class_is_exported() -> None:
    import vqa_operators

    seed_names = {
        "FileStorage", "APIVLMServing_openai", "LocalModelVLMServing_vllm", "ImageQAGenerate", "PersQAGenerate",
        "MultiroleVideoQAInitialGenerator", "MultiroleVideoQAMultiAgentGenerator", "MultiroleVideoQAFinalGenerator",
    }
    assert seed_names <= set(vqa_operators.__all__)
    for name in vqa_operators.__all__:
        assert getattr(vqa_operators, name).__name__ == name


def test_options_a_stage_does_not_have_are_refused(vlm_server: OpenAITestServer, seed_workdir: Path) -> None:
    import pandas as pd

    from vqa_operators import APIVLMServing_openai, MultiroleVideoQAInitialGenerator

    serving = APIVLMServing_openai(api_url=vlm_server.base_url, model_name=MODEL)
    with pytest.raises(ValueError, match="max_iterations"):
        MultiroleVideoQAInitialGenerator(llm_serving=serving, max_iterations=3).run(df=pd.DataFrame([{"Meta": "m", "Clips": []}]))
