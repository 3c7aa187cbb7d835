"""Multi-role video QA: frame sampling, prompts, every stage's parsing, bounded state, early stop, labels."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testkit.data import MODEL, make_jpeg
from testkit.openai_server import OpenAITestServer, Reply
from vqa_operators.exceptions import RowError
from vqa_operators.generators.video_qa import (
    LABELS,
    Clip,
    VideoQAFinalGenerator,
    VideoQAInitialGenerator,
    VideoQAMultiAgentGenerator,
    dedupe,
    sample_frames,
)
from vqa_operators.media import MediaReader, target_size
from vqa_operators.seed_compat.serving import APIVLMServing_openai
from vqa_operators.storage import Storage
from vqa_operators.worker.rows import run_rows


@pytest.fixture
def frames(tmp_path: Path) -> Path:
    for i in range(12):
        (tmp_path / f"f{i:02d}.jpg").write_bytes(make_jpeg((640, 360)))
    return tmp_path


def video_row(clips: int = 3, per_clip: int = 4, meta: Any = "A 30-second ad for trail shoes.") -> dict[str, Any]:
    return {
        "id": "v1",
        "Meta": meta,
        "Clips": [
            {
                "Audio_Text": f"narration {c}",
                "Frames_Images": [f"f{c * per_clip + i:02d}.jpg" for i in range(per_clip)],
                "Description": f"scene {c}",
            }
            for c in range(clips)
        ],
    }


def make(cls: type, server: OpenAITestServer, root: Path, **options: Any) -> Any:
    serving = APIVLMServing_openai(api_url=server.base_url, model_name=MODEL, max_workers=8, max_retries=0)
    return cls(serving, options=options, media=MediaReader(Storage(), media_root=str(root)), seed=1)


def schema_name(body: dict) -> str:
    return body["response_format"]["json_schema"]["name"]


def user_parts(body: dict) -> list[dict]:
    return [m for m in body["messages"] if m["role"] == "user"][0]["content"]


def texts(body: dict) -> str:
    return "\n".join(
        m["content"] if isinstance(m["content"], str) else "\n".join(p.get("text", "") for p in m["content"])
        for m in body["messages"]
    )


def qa(*questions: str) -> str:
    return json.dumps({"qa_pairs": [{"question": q, "answer": f"answer to {q}"} for q in questions]})


def scripted(**by_schema: Callable[[dict, int], str]) -> Callable[[dict], Reply | None]:
    """A responder that answers by the requested schema's name; the int is how often that schema was asked."""
    counts: dict[str, int] = {}

    def respond(body: dict) -> Reply | None:
        name = schema_name(body)
        if name not in by_schema:
            return None
        counts[name] = counts.get(name, 0) + 1
        return Reply(content=by_schema[name](body, counts[name]))

    return respond


def recruit(role: str) -> str:
    return json.dumps(
        {
            "action": "recruit",
            "reason": "gap",
            "expert": {"role": role, "description": f"knows {role}", "subtask": f"ask about {role}"},
        }
    )


TERMINATE = json.dumps({"action": "terminate", "reason": "the set is complete"})


# --- frames ------------------------------------------------------------------------------------


def test_frames_are_sampled_evenly_over_the_whole_video() -> None:
    clips = [Clip.model_validate({"Description": "d", "Frames_Images": [f"c{c}_{i}" for i in range(4)]}) for c in range(3)]
    picked = sample_frames(clips, 4)
    assert [f.path for f in picked] == ["c0_1", "c1_0", "c1_3", "c2_2"]  # the middle of each twelfth-by-four span
    assert [f.path for f in sample_frames(clips, 50)] == [f"c{c}_{i}" for c in range(3) for i in range(4)]
    one = sample_frames(clips, 1)
    assert len(one) == 1 and one[0].path == "c1_2"


def test_initial_prompt_interleaves_clips_and_frames_within_the_budget(vlm_server: OpenAITestServer, frames: Path) -> None:
    gen = make(VideoQAInitialGenerator, vlm_server, frames, max_frames=5, initial_pairs=6)
    fields, meta = asyncio.run(gen.generate(video_row()))
    body = vlm_server.requests[0]
    parts = user_parts(body)
    kinds = ["img" if p["type"] == "image_url" else p["text"].split("\n")[0] for p in parts]
    assert kinds[0].startswith("Video information: A 30-second ad for trail shoes.")
    # each clip's text, then the frames sampled from that clip, in order
    assert kinds[1:-1] == ["Clip 1 of 3", "img", "img", "Clip 2 of 3", "img", "Clip 3 of 3", "img", "img"]
    assert kinds[-1].startswith("Write up to 6 question-answer pairs about this video")
    assert "5 of its 12 frames are shown" in parts[0]["text"]
    assert "Audio: narration 1" in parts[4]["text"] and "Frames: 1 of this clip's 4 shown below" in parts[4]["text"]
    assert [(f["clip"], f["frame"]) for f in meta["frames_sent"]] == [(0, 1), (0, 3), (1, 2), (2, 0), (2, 2)]
    assert meta["frames_total"] == 12
    w, h = target_size(640, 360, 448 * 448)  # frames use the per-frame pixel budget, not the image one
    assert w * h <= 448 * 448 < 640 * 360
    assert "saw 5 image(s) " + ",".join([f"{w}x{h}"] * 5) in fields["QA"][0]["Answer"]
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["qa_pairs"]["maxItems"] == 6
    # no file paths, no Python reprs
    prompt = texts(body)
    assert ".jpg" not in prompt and "{'" not in prompt and "Frames_Images" not in prompt


def test_initial_output_fields_and_deduplication(vlm_server: OpenAITestServer, frames: Path) -> None:
    vlm_server.enqueue(Reply(content=qa("What is sold?", "what  is SOLD", "Who runs?")))
    fields, meta = asyncio.run(make(VideoQAInitialGenerator, vlm_server, frames).generate(video_row()))
    assert fields["QA"] == [
        {"Question": "What is sold?", "Answer": "answer to What is sold?"},
        {"Question": "Who runs?", "Answer": "answer to Who runs?"},
    ]
    assert fields["video_qa_state"] == {"experts": [], "iterations": 0, "terminated": False, "stop_reason": None}
    assert meta["duplicates_dropped"] == 1


def test_meta_object_is_sent_as_json(vlm_server: OpenAITestServer, frames: Path) -> None:
    asyncio.run(make(VideoQAInitialGenerator, vlm_server, frames).generate(video_row(meta={"brand": "Acme", "length_s": 30})))
    assert 'Video information: {"brand": "Acme", "length_s": 30}' in texts(vlm_server.requests[0])


@pytest.mark.parametrize(
    ("change", "reason", "detail"),
    [
        (lambda r: r.pop("Meta"), "missing_field", "no 'Meta'"),
        (lambda r: r.update(Clips="clip.mp4"), "bad_field", "non-empty list"),
        (lambda r: r.update(Clips=[]), "bad_field", "non-empty list"),
        (lambda r: r["Clips"][1].pop("Description"), "bad_field", "clip 2: Description"),
        (lambda r: r["Clips"][0].update(Frames_Images="f00.jpg"), "bad_field", "clip 1: Frames_Images"),
        (lambda r: [c.update(Frames_Images=[]) for c in r["Clips"]], "bad_field", "no clip has any frame"),
        (lambda r: r["Clips"][2]["Frames_Images"].append("gone.jpg"), "image_not_found", "gone.jpg"),
        (lambda r: r.update(Meta=5), "bad_field", "'Meta' must be text"),
    ],
)
def test_bad_rows_are_row_errors(vlm_server: OpenAITestServer, frames: Path, change: Callable, reason: str, detail: str) -> None:
    row = video_row()
    change(row)
    with pytest.raises(RowError) as info:
        asyncio.run(make(VideoQAInitialGenerator, vlm_server, frames, max_frames=64).generate(row))
    assert info.value.reason == reason and detail in info.value.detail
    assert vlm_server.requests == []


# --- multi-agent -------------------------------------------------------------------------------


def initial_row(*questions: str) -> dict[str, Any]:
    return {**video_row(), "QA": [{"Question": q, "Answer": f"answer to {q}"} for q in questions], "video_qa_state": None}


def between(text: str, start: str, end: str | None) -> str:
    tail = text.split(start, 1)[1]
    return tail.split(end, 1)[0] if end else tail


def test_each_iteration_recruits_answers_and_revises_with_arguments_in_their_slots(
    vlm_server: OpenAITestServer, frames: Path
) -> None:
    roles = ["Brand strategist", "Cinematographer", "Sports coach"]
    vlm_server.responder = scripted(
        MasterDecision=lambda body, n: recruit(roles[n - 1]),
        ExpertQASet=lambda body, n: qa(f"expert {n} question A", f"expert {n} question B"),
        # the revised set keeps the first current pair and the expert's first pair
        RevisedQASet=lambda body, n: qa(f"revised {n} question", f"expert {n} question A"),
    )
    gen = make(VideoQAMultiAgentGenerator, vlm_server, frames, max_iterations=3, max_frames=4)
    fields, meta = asyncio.run(gen.generate(initial_row("initial question 1", "initial question 2")))
    names = [schema_name(b) for b in vlm_server.requests]
    assert names == ["MasterDecision", "ExpertQASet", "RevisedQASet"] * 3
    state = fields["video_qa_state"]
    assert [e["role"] for e in state["experts"]] == roles and [e["iteration"] for e in state["experts"]] == [1, 2, 3]
    assert state["iterations"] == 3 and state["terminated"] is False and state["stop_reason"] == "max_iterations"
    assert [p["Question"] for p in fields["QA"]] == ["revised 3 question", "expert 3 question A"]
    assert meta["iterations_run"] == 3

    # iteration 2's revise call: the current set (iteration 1's revision) in the current slot, the expert's new pairs in the expert slot
    revise2 = texts(vlm_server.requests[5])
    current_slot = between(revise2, "The current set (2 pairs):", "New pairs from the expert")
    expert_slot = between(revise2, 'New pairs from the expert "Cinematographer" (2 pairs):', "Merge the new pairs")
    assert "revised 1 question" in current_slot and "expert 1 question A" in current_slot and "expert 2" not in current_slot
    assert "expert 2 question A" in expert_slot and "expert 2 question B" in expert_slot and "revised 1" not in expert_slot
    # the carried set is the revision, not a growing concatenation: nothing from before iteration 1's revision comes back
    for body in vlm_server.requests[3:]:
        assert "initial question" not in texts(body) and "expert 1 question B" not in texts(body)
    # the expert sees the frames and speaks in its role; the master's calls are text-only
    expert_call = vlm_server.requests[1]
    assert expert_call["messages"][0]["content"].startswith("You are Brand strategist: knows Brand strategist")
    assert sum(p["type"] == "image_url" for p in user_parts(expert_call)) == 4
    assert all(p["type"] == "text" for p in user_parts(vlm_server.requests[0]) + user_parts(vlm_server.requests[2]))
    # the master sees who was already recruited
    assert "- Brand strategist: ask about Brand strategist" in texts(vlm_server.requests[3])


def test_the_carried_set_stays_bounded(vlm_server: OpenAITestServer, frames: Path) -> None:
    vlm_server.responder = scripted(
        MasterDecision=lambda body, n: recruit(f"expert {n}"),
        ExpertQASet=lambda body, n: qa(*[f"e{n} q{i}" for i in range(5)]),
        RevisedQASet=lambda body, n: qa(*[f"r{n} q{i}" for i in range(5)]),
    )
    gen = make(VideoQAMultiAgentGenerator, vlm_server, frames, max_iterations=6, max_pairs=5)
    fields, _ = asyncio.run(gen.generate(initial_row(*[f"init q{i}" for i in range(5)])))
    assert len(fields["QA"]) == 5
    revise_schemas = [
        b["response_format"]["json_schema"]["schema"] for b in vlm_server.requests if schema_name(b) == "RevisedQASet"
    ]
    assert all(s["properties"]["qa_pairs"]["maxItems"] == 5 for s in revise_schemas)
    sizes = [len(texts(b)) for b in vlm_server.requests if schema_name(b) == "RevisedQASet"]
    assert max(sizes) - min(sizes) < 100  # prompt size does not grow with the iterations


def test_a_revision_over_the_bound_is_repaired(vlm_server: OpenAITestServer, frames: Path) -> None:
    too_many = qa(*[f"q{i}" for i in range(4)])
    vlm_server.responder = scripted(
        MasterDecision=lambda body, n: recruit(f"expert {n}"),
        ExpertQASet=lambda body, n: qa("new"),
        RevisedQASet=lambda body, n: too_many if n == 1 else qa("q0", "q1", "q2"),
    )
    fields, _ = asyncio.run(
        make(VideoQAMultiAgentGenerator, vlm_server, frames, max_iterations=1, max_pairs=3).generate(initial_row("a"))
    )
    assert [p["Question"] for p in fields["QA"]] == ["q0", "q1", "q2"]
    assert "at most 3" in vlm_server.requests[-1]["messages"][-1]["content"]


def test_the_master_can_terminate_early(vlm_server: OpenAITestServer, frames: Path) -> None:
    vlm_server.responder = scripted(
        MasterDecision=lambda body, n: recruit("Colourist") if n == 1 else TERMINATE,
        ExpertQASet=lambda body, n: qa("colour?"),
        RevisedQASet=lambda body, n: qa("merged"),
    )
    fields, meta = asyncio.run(make(VideoQAMultiAgentGenerator, vlm_server, frames, max_iterations=3).generate(initial_row("a")))
    assert [schema_name(b) for b in vlm_server.requests] == ["MasterDecision", "ExpertQASet", "RevisedQASet", "MasterDecision"]
    state = fields["video_qa_state"]
    assert state["terminated"] is True and state["stop_reason"] == "master_terminated" and state["iterations"] == 1
    assert [p["Question"] for p in fields["QA"]] == ["merged"] and meta["iterations_run"] == 1


def test_a_repeated_expert_is_repaired_then_stops_the_row_without_losing_it(vlm_server: OpenAITestServer, frames: Path) -> None:
    vlm_server.responder = scripted(
        MasterDecision=lambda body, n: recruit("Brand strategist" if n == 1 else "brand  STRATEGIST!"),
        ExpertQASet=lambda body, n: qa("x"),
        RevisedQASet=lambda body, n: qa("kept"),
    )
    fields, _ = asyncio.run(make(VideoQAMultiAgentGenerator, vlm_server, frames, max_iterations=3).generate(initial_row("a")))
    names = [schema_name(b) for b in vlm_server.requests]
    assert names == ["MasterDecision", "ExpertQASet", "RevisedQASet", "MasterDecision", "MasterDecision"]
    assert "was already recruited" in vlm_server.requests[4]["messages"][-1]["content"]
    state = fields["video_qa_state"]
    assert (
        state["stop_reason"] == "duplicate_expert"
        and state["terminated"]
        and [e["role"] for e in state["experts"]] == ["Brand strategist"]
    )
    assert [p["Question"] for p in fields["QA"]] == ["kept"]


def test_rerunning_the_stage_on_its_output_does_no_more_work(vlm_server: OpenAITestServer, frames: Path) -> None:
    gen = make(VideoQAMultiAgentGenerator, vlm_server, frames, max_iterations=2)
    fields, _ = asyncio.run(gen.generate(initial_row("a")))
    first = len(vlm_server.requests)
    assert first == 6
    again, meta = asyncio.run(gen.generate({**initial_row(), **fields}))
    assert len(vlm_server.requests) == first and meta["iterations_run"] == 0
    assert again == fields


def test_multiagent_needs_an_initial_set(vlm_server: OpenAITestServer, frames: Path) -> None:
    with pytest.raises(RowError, match="run video_qa_initial") as info:
        asyncio.run(make(VideoQAMultiAgentGenerator, vlm_server, frames).generate(video_row()))
    assert info.value.reason == "missing_field"
    with pytest.raises(RowError, match="Question") as info:
        asyncio.run(make(VideoQAMultiAgentGenerator, vlm_server, frames).generate({**video_row(), "QA": [{"q": "x"}]}))
    assert info.value.reason == "bad_field"


# --- final -------------------------------------------------------------------------------------


def final_answer(*items: tuple[list[str], str] | tuple[list[str], str, list[int]]) -> str:
    """The final stage's answer; each pair names the clips it is about (its third element, numbers from 1; default clip 1)."""
    return json.dumps(
        {
            "qa": [
                {"labels": p[0], "question": p[1], "answer": f"answer to {p[1]}", "clips": p[2] if len(p) > 2 else [1]}
                for p in items
            ]
        }
    )


def test_final_labels_and_the_seed_output_format(vlm_server: OpenAITestServer, frames: Path) -> None:
    vlm_server.enqueue(
        Reply(
            content=final_answer(
                (["visual_understanding"], "What is shown?", [2, 1, 2]),
                (["theme_and_brand", "persuasion_strategy"], "How does it sell?", [2]),
            )
        )
    )
    gen = make(VideoQAFinalGenerator, vlm_server, frames, final_pairs=2)
    row = {
        **initial_row("a", "b"),
        "video_qa_state": {
            "experts": [{"role": "R", "description": "d", "subtask": "s", "iteration": 1}],
            "iterations": 1,
            "terminated": True,
            "stop_reason": "master_terminated",
        },
    }
    fields, meta = asyncio.run(gen.generate(row))
    # each pair names the clips it is about, as indices into the row's clips (a clip named twice counts once)
    assert fields["QA"] == [
        {"Label": "visual_understanding", "Question": "What is shown?", "Answer": "answer to What is shown?", "Clips": [0, 1]},
        {
            "Label": "theme_and_brand, persuasion_strategy",
            "Question": "How does it sell?",
            "Answer": "answer to How does it sell?",
            "Clips": [1],
        },
    ]
    # the declaration reads the labels as the stage writes them
    items = gen.output_fields(gen.options).pairs(fields)
    assert [(item.labels, item.clips) for item in items] == [
        (["visual_understanding"], [0, 1]),
        (["theme_and_brand", "persuasion_strategy"], [1]),
    ]
    out = gen.finish_row(row, fields)
    assert set(out) == {"id", "Meta", "Clips", "QA"}  # the carried state leaves the row ...
    assert meta["state"]["experts"][0]["role"] == "R"  # ... and is kept in provenance
    body = vlm_server.requests[0]
    schema = body["response_format"]["json_schema"]["schema"]
    qa_schema = schema["properties"]["qa"]
    assert qa_schema["minItems"] == 2 == qa_schema["maxItems"]
    label_items = schema["$defs"]["LabelledPair"]["properties"]["labels"]
    assert label_items["maxItems"] == 2 and set(label_items["items"]["enum"]) == set(LABELS)
    # the clip numbers guided decoding may write are the row's: 1 to 3
    clip_items = schema["$defs"]["LabelledPair"]["properties"]["clips"]
    assert (clip_items["items"]["minimum"], clip_items["items"]["maximum"], clip_items["minItems"], clip_items["maxItems"]) == (
        1,
        3,
        1,
        3,
    )
    prompt = texts(body)
    for label, description in LABELS.items():
        assert f"- {label}: {description}" in prompt
    assert "by their numbers (1 to 3)" in prompt


@pytest.mark.parametrize(
    "bad",
    [
        final_answer((["humour"], "Q1"), (["visual_understanding"], "Q2")),
        final_answer(
            (["visual_understanding", "emotion_recognition", "theme_and_brand"], "Q1"), (["visual_understanding"], "Q2")
        ),
        final_answer(([], "Q1"), (["visual_understanding"], "Q2")),
        final_answer((["visual_understanding"], "Q1")),
        final_answer((["visual_understanding"], "Q1", [4]), (["visual_understanding"], "Q2")),
        final_answer((["visual_understanding"], "Q1", []), (["visual_understanding"], "Q2")),
    ],
    ids=["unknown", "three", "none", "too-few-pairs", "no-such-clip", "no-clip"],
)
def test_bad_labels_are_repaired_then_row_errors(vlm_server: OpenAITestServer, frames: Path, bad: str) -> None:
    vlm_server.enqueue(Reply(content=bad), Reply(content=bad))
    with pytest.raises(RowError) as info:
        asyncio.run(make(VideoQAFinalGenerator, vlm_server, frames, final_pairs=2).generate(initial_row("a")))
    assert info.value.reason == "schema_mismatch" and len(vlm_server.requests) == 2
    assert "does not match the schema" in vlm_server.requests[1]["messages"][-1]["content"]


def test_a_label_given_twice_is_one_label(vlm_server: OpenAITestServer, frames: Path) -> None:
    # the schema cannot say "distinct" in terms vLLM accepts (it refuses uniqueItems); the intent is plain
    vlm_server.enqueue(
        Reply(content=final_answer((["theme_and_brand", "theme_and_brand"], "Q1"), (["visual_understanding"], "Q2")))
    )
    fields, _ = asyncio.run(make(VideoQAFinalGenerator, vlm_server, frames, final_pairs=2).generate(initial_row("a")))
    assert [p["Label"] for p in fields["QA"]] == ["theme_and_brand", "visual_understanding"] and len(vlm_server.requests) == 1


def test_a_recruit_without_an_expert_cannot_be_written(vlm_server: OpenAITestServer, frames: Path) -> None:
    # the master's answer is a union: "recruit" carries an expert in the schema itself, which guided decoding enforces
    gen = make(VideoQAMultiAgentGenerator, vlm_server, frames, max_iterations=1)
    vlm_server.responder = scripted(MasterDecision=lambda body, n: TERMINATE)
    asyncio.run(gen.generate(initial_row("a")))
    schema = vlm_server.requests[0]["response_format"]["json_schema"]["schema"]
    recruit_schema = schema["$defs"]["Recruit"]
    assert [s["$ref"] for s in schema["anyOf"]] == ["#/$defs/Recruit", "#/$defs/Terminate"]
    assert "expert" in recruit_schema["required"] and recruit_schema["properties"]["action"]["const"] == "recruit"
    assert "expert" not in schema["$defs"]["Terminate"]["properties"]


def test_deduplication_ignores_case_punctuation_and_spacing() -> None:
    pairs = [
        {"Question": q, "Answer": a}
        for q, a in [("What is sold?", "1"), ("what is  SOLD", "2"), ("Who runs?", "3"), ("What's sold?", "4")]
    ]
    assert [p["Answer"] for p in dedupe(pairs)] == ["1", "3", "4"]


# --- concurrency -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls", [VideoQAInitialGenerator, VideoQAMultiAgentGenerator, VideoQAFinalGenerator], ids=lambda c: c.name
)
def test_rows_of_every_stage_are_in_flight_together(vlm_server: OpenAITestServer, frames: Path, cls: type) -> None:
    vlm_server.latency = 0.1
    gen = make(cls, vlm_server, frames, max_frames=2, **({"max_iterations": 1} if cls is VideoQAMultiAgentGenerator else {}))
    rows = [{**initial_row("a"), "id": i} for i in range(6)]

    async def run() -> list:
        return [o async for o in run_rows(gen, list(enumerate(rows, start=1)), concurrency=6)]

    outcomes = asyncio.run(run())
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    assert vlm_server.peak_concurrency >= 4
    assert re.search(r"reply [0-9a-f]{8}", json.dumps([o.fields for o in outcomes]))
