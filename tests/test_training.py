"""Slow tier: each export trains as it is. A real trainer's data pipeline reads it, and one optimizer step runs on every sample, on the CPU.

The exports are what the DAGs write: image_qa and video_qa rows through the worker (the test
double as the model), the quality stage, ``merge`` and ``export_run``, with the media copied
into the run's folder. Each trainer runs in an environment of its own with its own pins, as vLLM
does (``make trainer-venvs``), from a copy of that folder in another place (as after ``aws s3
sync``), with the original media deleted:

- TRL's ``SFTTrainer`` on the ``hf`` export, with the tiny Idefics3 the tests build;
- the ``llava`` export through the same model's processor, and an AdamW step;
- LLaMA-Factory's own data pipeline (``dataset_info.json``, its ShareGPT converter, its
  ``qwen2_vl`` template and plugin) and a step of its trainer on the ``sharegpt`` export, with a
  tiny Qwen2-VL built offline (LLaMA-Factory has no Idefics3 template).

Each run must report every sample and a finite loss; a sample whose placeholders do not match its
media is refused by the trainers themselves, which the negative cases show.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from testkit.data import job_options, make_jpeg
from testkit.openai_server import OpenAITestServer
from tests.airflow_env import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.training]

TRL = ROOT / ".venv-trl" / "bin" / "python"
LLAMAFACTORY = ROOT / ".venv-llamafactory" / "bin" / "python"
TRAINERS = ROOT / "tests" / "trainers"
OUTPUT = {"image_qa": "generate", "video_qa": "final"}


def _run(folder: Path, server: OpenAITestServer, rows: list[dict], stages: list[tuple[str, str, dict]], name: str) -> Path:
    """The stages over ``rows`` (one shard), the merge and the exports, as the DAG runs them; the run's folder."""
    from vqa_operators.export import export_run
    from vqa_operators.merge import merge_run
    from vqa_operators.sharding import plan_shards
    from vqa_operators.storage import Storage
    from vqa_operators.worker import run_job

    media = folder / "media-in"
    media.mkdir(parents=True)
    for i, size in enumerate([(64, 48), (48, 64), (80, 60), (60, 80)]):
        (media / f"{i}.jpg").write_bytes(make_jpeg(size, color=(40 * i, 100, 200 - 30 * i)))
        (media / f"frame{i}.jpg").write_bytes(
            make_jpeg((64, 48), color=(200 - 40 * i, 100, 30 * i))
        )  # a video's frames share one size
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [shard] = plan_shards(Storage(), str(source), rows_per_shard=100)
    made, current = {}, source
    for stage, generator, params in stages:
        out = folder / "run" / stage / "shard-00000.jsonl"
        made[stage] = run_job(
            job_options(
                server,
                folder,
                current,
                generator=generator,
                output=str(out),
                shard=shard,
                task_key=stage,
                params=params,
                media_root=str(media),
            )
        )
        current = out
    output = folder / "run" / f"{OUTPUT[name]}.jsonl"
    manifest = merge_run(Storage(), {k: [v] for k, v in made.items()}, output=str(output), plan=[shard.model_dump()])
    export_run(
        Storage(), manifest, formats=["hf", "sharegpt", "llava"], media_root=str(media), dataset=name, run_id="training-tier"
    )
    # the dataset elsewhere, without its sources: what it names must travel with it
    copy = folder / "synced" / "run"
    shutil.copytree(folder / "run", copy)
    shutil.rmtree(media)
    assert manifest.rows_out >= 3
    return copy


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, _vlm_server: OpenAITestServer) -> dict[str, Path]:
    for env in (TRL, LLAMAFACTORY):
        assert env.exists(), f"{env} is missing: make trainer-venvs"
    _vlm_server.reset()
    image_rows = [{"id": f"i{i}", "image": [f"{i % 4}.jpg", f"{(i + 1) % 4}.jpg"] if i % 2 else f"{i % 4}.jpg"} for i in range(5)]

    def clips(n: int) -> list[dict[str, object]]:
        return [
            {"Description": f"clip {c}", "Audio_Text": "", "Frames_Images": [f"frame{(c + k) % 4}.jpg" for k in range(2)]}
            for c in range(n)
        ]

    video_rows = [{"id": f"v{i}", "Meta": f"Ad {i}", "Clips": clips(2 + i % 2)} for i in range(3)]
    return {
        "image_qa": _run(
            tmp_path_factory.mktemp("image_qa"),
            _vlm_server,
            image_rows,
            [
                ("generate", "image_qa", {"pairs_per_row": 2}),
                ("quality", "quality", {"source": "image_qa"}),
            ],
            "image_qa",
        ),
        "video_qa": _run(
            tmp_path_factory.mktemp("video_qa"),
            _vlm_server,
            video_rows,
            [
                ("initial", "video_qa_initial", {"max_frames": 4}),
                ("multiagent", "video_qa_multiagent", {"max_iterations": 1, "max_frames": 4}),
                ("final", "video_qa_final", {"final_pairs": 2}),
                ("quality", "quality", {"source": "video_qa_final", "max_frames": 4}),
            ],
            "video_qa",
        ),
    }


def trainer(python: Path, script: str, *args: object, ok: bool = True) -> dict | str:
    """Run a trainer script; its JSON report (or, with ``ok=False``, its output, which must be a failure)."""
    proc = subprocess.run(
        [str(python), str(TRAINERS / script), *map(str, args)], capture_output=True, text=True, timeout=600, check=False
    )
    if not ok:
        assert proc.returncode != 0, proc.stdout[-2000:]
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)  # the figures, in the test's log
    return report


def rows_out(run: Path, name: str) -> int:
    return len((run / f"{OUTPUT[name]}.jsonl").read_text().splitlines())


@pytest.mark.parametrize("name", ["image_qa", "video_qa"])
def test_trl_sft_trains_one_step_on_every_sample_of_the_hf_export(
    exports: dict[str, Path], tiny_idefics3: Path, tmp_path: Path, name: str
) -> None:
    report = trainer(TRL, "trl_sft.py", exports[name] / "hf", tiny_idefics3, tmp_path)
    assert isinstance(report, dict)
    assert report["samples"] == rows_out(exports[name], name) == len(report["sample_losses"]) and report["steps"] == 1
    assert all(math.isfinite(x) for x in [report["step_loss"], *report["sample_losses"]])


@pytest.mark.parametrize("name", ["image_qa", "video_qa"])
def test_the_llava_export_goes_through_the_models_processor_and_trains(
    exports: dict[str, Path], tiny_idefics3: Path, tmp_path: Path, name: str
) -> None:
    llava = exports[name] / f"{OUTPUT[name]}.llava.json"
    report = trainer(TRL, "llava_step.py", llava, exports[name], tiny_idefics3)
    assert isinstance(report, dict) and report["samples"] == rows_out(exports[name], name) == len(report["sample_losses"])
    assert all(math.isfinite(x) for x in [report["step_loss"], *report["sample_losses"]])
    if name == "image_qa":  # the processor itself refuses a sample with one <image> too many: what the export must never write
        items = json.loads(llava.read_text())
        items[0]["conversations"][0]["value"] = "<image>\n" + items[0]["conversations"][0]["value"]
        (tmp_path / "bad.llava.json").write_text(json.dumps(items))
        failed = trainer(TRL, "llava_step.py", tmp_path / "bad.llava.json", exports[name], tiny_idefics3, ok=False)
        assert (
            "The total number of <image> tokens in the prompts should be the same as the number of images passed. Found total 2 <image> tokens and 1 images"
            in str(failed)
        ), str(failed)[-3000:]


@pytest.mark.parametrize("name", ["image_qa", "video_qa"])
def test_llamafactory_reads_converts_and_trains_on_every_sample_of_the_sharegpt_export(
    exports: dict[str, Path], tmp_path: Path, name: str
) -> None:
    report = trainer(LLAMAFACTORY, "llamafactory_sft.py", exports[name], f"vqa_{name}", tmp_path)
    assert isinstance(report, dict) and report["samples"] == report["pipeline_kept"] == rows_out(exports[name], name)
    assert report["steps"] == 1 and math.isfinite(report["step_loss"])
    if name == "image_qa":  # LLaMA-Factory refuses a sample whose images and <image> placeholders differ
        bad = tmp_path / "bad"
        shutil.copytree(exports[name], bad)
        items = json.loads((bad / "generate.sharegpt.json").read_text())
        two = next(item for item in items if len(item["images"]) == 2)
        two["images"] = two["images"][:1]
        (bad / "generate.sharegpt.json").write_text(json.dumps(items))
        failed = trainer(LLAMAFACTORY, "llamafactory_sft.py", bad, f"vqa_{name}", tmp_path / "w", ok=False)
        assert "The number of images does not match the number of <image> tokens" in str(failed), str(failed)[-3000:]
