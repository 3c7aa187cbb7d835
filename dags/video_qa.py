"""
### Multi-role video QA

Three tasks turn videos, given as `Meta` text and ordered `Clips` (each with `Description`,
`Audio_Text` and `Frames_Images`), into labelled question-answer pairs, and a fourth judges them.
Rows may instead name a video file (`{"video": "<path or s3:// URI>", "Meta": ...}`): the first
task, **ingest**, turns those into `Meta` and `Clips`, and passes the other rows through.

0. **ingest**: each video is decoded (PyAV) and cut into clips at scene changes (every `clip_s`
   seconds if there are none; `min_clip_s` to `max_clip_s` long); `frames_per_clip` frames are
   sampled evenly within each clip and stored as JPEG under the run's folder, with their
   timestamps. Each clip's `Description` is a caption from the model (`caption`); its
   `Audio_Text` comes from the speech-to-text endpoint `VQA_TRANSCRIPTION_URL` (`transcribe`).
   Corrupt, empty or audio-only files, unknown codecs and absurd sizes go to
   `ingest.errors.jsonl` with a reason.
1. **initial**: every clip's text and evenly sampled frames (at most `max_frames` per request)
   plus `Meta` -> up to 10 QA pairs.
2. **multiagent**: up to `max_iterations` rounds; in each, a master recruits one new expert (or
   stops), the expert adds pairs, and the master merges and deduplicates the set.
3. **final**: the `final_pairs` best pairs, each labelled with one or two of
   `visual_understanding`, `emotion_recognition`, `theme_and_brand`, `persuasion_strategy`,
   `audience_and_engagement`, written as `QA: [{"Label", "Question", "Answer"}]`.

4. **quality**: every final pair is judged. Asked with only `Meta`, is it answered anyway
   (`answerable_blind`)? Shown up to `max_frames` frames, is it grounded, with a score of at
   least `min_judge_score` (`not_grounded`)? `dedup` removes near-duplicate questions
   across shards (`near_duplicate`) before `quality` judges any. Rejected pairs, and rows left with none, go to
   `final.rejected.jsonl` with their reason and verdicts; params switch each check.

`plan` splits the input into shards of `rows_per_shard` rows (at most `max_shards`); each of the
five tasks runs once per shard (mapped), `dedup` drops near-duplicates across all shards before
`quality`, and `merge` joins the shards. The tasks pass JSONL
through `<output_prefix>/video_qa/<run_id>/<task>/shard-<map index>.jsonl`; the state between
them (current QA set, experts, iteration count) travels in the rows (`QA`, `video_qa_state`).
The run's output is `final.jsonl`, with `final.manifest.json` and each task's failed rows, with
a reason, in `<task>.errors.jsonl` beside it. XCom holds only manifests.

- **Published** as the asset `vqa.video_qa`: each successful run's event
  carries its counts and URIs, and downstream DAGs schedule on it (see `dags/dataset_ready.py`).
"""

from __future__ import annotations

from airflow.sdk import dag

from vqa_operators.generators.video_qa import VideoQAFinalOptions, VideoQAMultiAgentOptions, VideoQAOptions
from vqa_operators.operators import Placement, WorkerSpec, judge_and_merge, shard_plan, staged_output, worker_task
from vqa_operators.operators.dag_config import (
    DAG_DEFAULTS,
    INGEST_OPTIONS,
    RUN_OPTIONS,
    export_params,
    ingest_params,
    io_params,
    option_param,
    quality_params,
)
from vqa_operators.operators.spec import from_params

# kubernetes mode: where this DAG's worker pods run, and what they carry (placement.PodSettings), for every
# task or per task id, e.g. Placement(default=PodSettings(s3_secret=None, service_account_name="vqa-worker"),
# tasks={"ingest": {"cpu": "8", "tmp_size": "200Gi"}})
PODS = Placement()


@dag(
    dag_id="video_qa",
    doc_md=__doc__,
    tags=["vqa", "video_qa", "generation"],
    **DAG_DEFAULTS,
    params={
        **io_params(
            "video_qa",
            rows_doc="`Meta` (text) and `Clips` (a list of {Description, Audio_Text, Frames_Images}), or a `video` file to ingest",
            final_task="final",
        ),
        **ingest_params(),
        **export_params(),
        **quality_params(),
        "max_frames": option_param(VideoQAOptions, "max_frames"),
        "max_iterations": option_param(VideoQAMultiAgentOptions, "max_iterations"),
        "final_pairs": option_param(VideoQAFinalOptions, "final_pairs"),
    },
)
def video_qa() -> None:
    plan = shard_plan()
    ingest = worker_task(
        task_id="ingest", shards=plan, pods=PODS, spec=WorkerSpec(generator="video_ingest", params=INGEST_OPTIONS, **RUN_OPTIONS)
    )
    initial = worker_task(
        task_id="initial",
        shards=plan,
        pods=PODS,
        spec=WorkerSpec(
            generator="video_qa_initial", input=staged_output("ingest"), params=from_params("max_frames"), **RUN_OPTIONS
        ),
    )
    multiagent = worker_task(
        task_id="multiagent",
        shards=plan,
        pods=PODS,
        spec=WorkerSpec(
            generator="video_qa_multiagent",
            input=staged_output("initial"),
            params=from_params("max_frames", "max_iterations"),
            **RUN_OPTIONS,
        ),
    )
    final = worker_task(
        task_id="final",
        shards=plan,
        pods=PODS,
        spec=WorkerSpec(
            generator="video_qa_final", input=staged_output("multiagent"), params=from_params("final_pairs"), **RUN_OPTIONS
        ),
    )
    ingest >> initial >> multiagent >> final
    stages = {"ingest": ingest, "initial": initial, "multiagent": multiagent, "final": final}
    judge_and_merge(
        plan, stages, source="video_qa_final", dataset="video_qa", params=from_params("max_frames"), pods=PODS, **RUN_OPTIONS
    )


video_qa()
