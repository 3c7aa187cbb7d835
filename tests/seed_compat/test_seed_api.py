"""The seeds' Example Usage (tests/seed_examples.py) against the test double, with the HTTP serving in place of vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testkit.data import MODEL, make_jpeg
from testkit.openai_server import OpenAITestServer, Reply
from tests.seed_examples import SEED_ROWS, image_qa_example, pers_qa_example, read_results, video_qa_example, write_seed_inputs
from vqa_operators import APIVLMServing_openai


@pytest.fixture
def seed_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_seed_inputs(tmp_path, make_jpeg)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def api_serving(vlm_server: OpenAITestServer, **sampling: float) -> APIVLMServing_openai:
    """Step 1 of the examples, with the HTTP serving in place of LocalModelVLMServing_vllm."""
    return APIVLMServing_openai(api_url=vlm_server.base_url, model_name=MODEL, max_workers=4, **sampling)


def test_image_qa_example_usage(vlm_server: OpenAITestServer, seed_workdir: Path) -> None:
    image_qa_example(api_serving(vlm_server))
    out, errors = read_results(seed_workdir, "imageqa")
    assert [r["image"] for r in out] == [r["image"] for r in SEED_ROWS["image"][:3]]
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


def test_pers_qa_example_usage(vlm_server: OpenAITestServer, seed_workdir: Path) -> None:
    pers_qa_example(api_serving(vlm_server))
    out, errors = read_results(seed_workdir, "pers_qa")
    assert [r["image"] for r in out] == [r["image"] for r in SEED_ROWS["pers"][:2]]
    for row in out:
        assert set(row) == {"image", "pers_qa"}
        question, answer = row["pers_qa"].removeprefix("Question: ").split(" Answer: ")
        assert "<mam>" in question and answer.startswith("<mam> ")
    assert [e["reason"] for e in errors] == ["bad_field"]


def test_video_qa_example_usage(vlm_server: OpenAITestServer, seed_workdir: Path) -> None:
    def master_terminates_for_the_second_video(body: dict) -> Reply | None:
        prompt = json.dumps(body["messages"])
        if body["response_format"]["json_schema"]["name"] == "MasterDecision" and "Second video" in prompt:
            return Reply(content=json.dumps({"action": "terminate", "reason": "enough"}))
        return None

    vlm_server.responder = master_terminates_for_the_second_video
    video_qa_example(api_serving(vlm_server, temperature=0.7, top_p=0.9, max_tokens=6000))

    out, errors = read_results(seed_workdir, "video_qa")
    assert [r["Meta"] for r in out] == ["Meta Information", "Second video"]
    for row in out:
        assert set(row) == {"Meta", "Clips", "QA"}  # the seed's output format, exactly
        assert len(row["QA"]) == 10 and all(set(p) == {"Label", "Question", "Answer"} for p in row["QA"])
    # the errors of the initial stage survive the chaining and land beside the final output
    assert [(e["stage"], e["reason"]) for e in errors] == [
        ("video_qa_initial", "bad_field"),
        ("video_qa_initial", "image_not_found"),
    ]
    names = [b["response_format"]["json_schema"]["name"] for b in vlm_server.requests]
    # video 1: initial, 3 x (recruit, expert, revise), final; video 2: initial, recruit -> terminate, final
    assert names.count("VideoQASet") == 2 and names.count("MasterDecision") == 4 and names.count("ExpertQASet") == 3
    assert names.count("VideoQAFinal") == 2
    assert all(b["max_tokens"] == 6000 and b["temperature"] == 0.7 for b in vlm_server.requests)


def test_every_seed_class_is_exported() -> None:
    import vqa_operators

    seed_names = {
        "FileStorage",
        "APIVLMServing_openai",
        "LocalModelVLMServing_vllm",
        "ImageQAGenerate",
        "PersQAGenerate",
        "MultiroleVideoQAInitialGenerator",
        "MultiroleVideoQAMultiAgentGenerator",
        "MultiroleVideoQAFinalGenerator",
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


def _absolute_rows(workdir: Path, media: Path) -> None:
    """The image example's input with every path absolute, into ``media``: a folder outside the working directory."""
    media.mkdir(parents=True, exist_ok=True)
    for name in ("street_scene.jpg", "second.jpg"):
        (media / name).write_bytes((workdir / "test" / name).read_bytes())
    rows = [
        {"image": [str(media / "street_scene.jpg")]},
        {"image": [str(media / "street_scene.jpg"), str(media / "second.jpg")]},
        {"image": str(media / "second.jpg")},
    ]
    (workdir / "data" / "example_qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_seed_example_reads_absolute_paths_anywhere_as_dataflow_does(
    vlm_server: OpenAITestServer, seed_workdir: Path, tmp_path_factory
) -> None:
    media = tmp_path_factory.mktemp("elsewhere") / "photos"
    _absolute_rows(seed_workdir, media)
    image_qa_example(api_serving(vlm_server))
    out, errors = read_results(seed_workdir, "imageqa")
    assert errors == []
    assert [len(row["qa_pairs"]) for row in out] == [3, 3, 3]
    assert "saw 2 image(s)" in out[1]["qa_pairs"][0]["answer"]


@pytest.mark.parametrize("confine", ["media_root", "allowed_media_roots"])
def test_a_media_root_or_allowed_roots_confine_the_seed_api(
    vlm_server: OpenAITestServer, seed_workdir: Path, tmp_path_factory, confine: str
) -> None:
    from vqa_operators import FileStorage, ImageQAGenerate

    media = tmp_path_factory.mktemp("elsewhere") / "photos"
    _absolute_rows(seed_workdir, media)
    allowed = seed_workdir / "test"
    storage = FileStorage(
        first_entry_file_name="data/example_qa.jsonl", cache_path="./cache_local", file_name_prefix="imageqa", cache_type="jsonl"
    )
    kwargs = {"media_root": str(allowed)} if confine == "media_root" else {"allowed_media_roots": [str(allowed)]}
    ImageQAGenerate(api_serving(vlm_server), **kwargs).run(storage=storage.step())
    out, errors = read_results(seed_workdir, "imageqa")
    assert out == [] and [e["reason"] for e in errors] == ["path_not_allowed"] * 3
    assert vlm_server.requests == []
