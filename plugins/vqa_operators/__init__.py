"""Visual question-answer dataset generation with vision-language models, for Apache Airflow.

The names below are the seeds' public API; they are imported on first use so that importing this
package (as every DAG file does) stays cheap.
"""

from __future__ import annotations

from vqa_operators.lazy import lazy_exports

_EXPORTS = {
    "FileStorage": "vqa_operators.seed_compat.file_storage",
    "ImageQAGenerate": "vqa_operators.seed_compat.operators",
    "APIVLMServing_openai": "vqa_operators.seed_compat.serving",
    "LocalModelVLMServing_vllm": "vqa_operators.seed_compat.serving",
    "ImageQAGenerator": "vqa_operators.generators.image_qa",
    "PersQAGenerate": "vqa_operators.seed_compat.operators",
    "MultiroleVideoQAInitialGenerator": "vqa_operators.seed_compat.operators",
    "MultiroleVideoQAMultiAgentGenerator": "vqa_operators.seed_compat.operators",
    "MultiroleVideoQAFinalGenerator": "vqa_operators.seed_compat.operators",
    "PersQAGenerator": "vqa_operators.generators.pers_qa",
    "VideoQAInitialGenerator": "vqa_operators.generators.video_qa",
    "VideoQAMultiAgentGenerator": "vqa_operators.generators.video_qa",
    "VideoQAFinalGenerator": "vqa_operators.generators.video_qa",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
