"""The seeds' three Example Usage blocks, with only the imports changed, run from the current directory.

Step 1 of each block (launching the model service) is the caller's: the tests pass the test double
behind ``APIVLMServing_openai``, real vLLM behind it, or ``LocalModelVLMServing_vllm`` (vLLM in
the process, as in the seeds). Steps 2 and 3 are the seeds' own code. Imports only, no pytest: the
vLLM environment runs this file too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SEED_ROWS = {
    "image": [
        {"image": ["./test/street_scene.jpg"]},
        {"image": ["./test/street_scene.jpg", "./test/second.jpg"]},
        {"image": "./test/second.jpg"},
        {"image": ["./test/missing.jpg"]},
    ],
    "pers": [{"image": ["./test/street_scene.jpg"]}, {"image": ["./test/street_scene.jpg", "./test/second.jpg"]}, {"image": []}],
}


def write_seed_inputs(folder: Path, jpeg: Any) -> None:
    """The examples' data under ``folder``: ``jpeg(size)`` makes each image's bytes."""
    (folder / "test").mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "test" / "street_scene.jpg").write_bytes(jpeg((320, 240)))
    (folder / "test" / "second.jpg").write_bytes(jpeg((100, 100)))
    for i in range(4):
        (folder / "test" / f"frame{i}.jpg").write_bytes(jpeg((160, 90)))
    (folder / "data" / "example_qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEED_ROWS["image"]) + "not json\n")
    (folder / "data" / "example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEED_ROWS["pers"]))
    clips = [
        {"Audio_Text": "Audio_Text1", "Frames_Images": ["./test/frame0.jpg", "./test/frame1.jpg"], "Description": "Description1"},
        {"Audio_Text": "Audio_Text2", "Frames_Images": ["./test/frame2.jpg", "./test/frame3.jpg"], "Description": "Description2"},
    ]
    videos = [
        {"Meta": "Meta Information", "Clips": clips},
        {"Meta": "Second video", "Clips": clips[:1]},
        {"Meta": "No clips", "Clips": []},  # fails at the initial stage
        {"Meta": "Missing frame", "Clips": [{**clips[0], "Frames_Images": ["./test/gone.jpg"]}]},  # fails too
    ]
    (folder / "data" / "video.jsonl").write_text("".join(json.dumps(r) + "\n" for r in videos))


def image_qa_example(serving: Any) -> None:
    """Seed 002, Steps 2 and 3: images -> ``cache_local/imageqa_step1.jsonl``."""
    from vqa_operators import FileStorage, ImageQAGenerate

    # Step 2: Prepare input data
    storage = FileStorage(
        first_entry_file_name="data/example_qa.jsonl",
        cache_path="./cache_local",
        file_name_prefix="imageqa",
        cache_type="jsonl",
        media_key="image",
        media_type="image",
    )
    storage.step()

    # Step 3: Initialize and run the operator
    qa_generator = ImageQAGenerate(serving)
    qa_generator.run(storage=storage, multi_modal_key="image", output_key="qa_pairs")


def pers_qa_example(serving: Any) -> None:
    """Seed 003, Steps 2 and 3: images of a main character -> ``cache_local/pers_qa_step1.jsonl``."""
    from vqa_operators import FileStorage, PersQAGenerate

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
    generator.run(storage=storage, multi_modal_key="image", output_key="pers_qa")


class VideoQAPipeline:
    """Seed 000's Example Usage runs inside a pipeline object (``self.storage``, ``self.llm_serving``)."""

    def __init__(self, llm_serving: Any, first_entry_file: str, cache_path: str, file_name_prefix: str, cache_type: str) -> None:
        from vqa_operators import FileStorage

        # Step 2: Prepare input data
        storage = FileStorage(
            first_entry_file_name=first_entry_file,
            cache_path=cache_path,
            file_name_prefix=file_name_prefix,
            cache_type=cache_type,
        )
        self.llm_serving, self.storage = llm_serving, storage
        self.input_meta_key, self.input_clips_key, self.output_key = "Meta", "Clips", "QA"

    def forward(self) -> None:
        """Step 3, verbatim but for the import: -> ``<cache_path>/<prefix>_step1.jsonl``."""
        from vqa_operators import (
            MultiroleVideoQAFinalGenerator,
            MultiroleVideoQAInitialGenerator,
            MultiroleVideoQAMultiAgentGenerator,
        )

        # Step 3: Initialize and run the operator
        initial_QA_generation = MultiroleVideoQAInitialGenerator(llm_serving=self.llm_serving)
        multiAgent_QA_generation = MultiroleVideoQAMultiAgentGenerator(llm_serving=self.llm_serving, max_iterations=3)
        final_QA_generation = MultiroleVideoQAFinalGenerator(llm_serving=self.llm_serving)

        init_df = initial_QA_generation.run(
            storage=self.storage.step(),
            input_meta_key=self.input_meta_key,
            input_clips_key=self.input_clips_key,
            output_key=self.output_key,
        )
        middle_df = multiAgent_QA_generation.run(
            df=init_df, input_meta_key=self.input_meta_key, input_clips_key=self.input_clips_key, output_key=self.output_key
        )
        final_QA_generation.run(
            storage=self.storage,
            df=middle_df,
            input_meta_key=self.input_meta_key,
            input_clips_key=self.input_clips_key,
            output_key=self.output_key,
        )


def video_qa_example(serving: Any) -> None:
    """Seed 000 over ``data/video.jsonl`` -> ``cache_local/video_qa_step1.jsonl``."""
    VideoQAPipeline(serving, "data/video.jsonl", "./cache_local", "video_qa", "jsonl").forward()


def read_results(folder: Path, prefix: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(output rows, errors) an example wrote under ``folder/cache_local``."""

    def read(name: str) -> list[dict[str, Any]]:
        path = folder / "cache_local" / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return read(f"{prefix}_step1.jsonl"), read(f"{prefix}_step1.errors.jsonl")
