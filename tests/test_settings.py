"""Each setting has one home (vqa_operators/settings.py): every VQA_* variable is read there and documented in the README."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError, Reason
from vqa_operators.generators import generator_class
from vqa_operators.generators.image_qa import ImageQAOptions
from vqa_operators.generators.quality import QualityOptions
from vqa_operators.generators.video_qa import VideoQAOptions
from vqa_operators.storage.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for folder in ("plugins", "dags", "scripts") for p in (ROOT / folder).rglob("*.py")]
README = (ROOT / "README.md").read_text()


def _mentioned_variables(path: Path) -> set[str]:
    """Every string constant in ``path`` that names a VQA_* variable."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"VQA_[A-Z_]+", n.value)
    }


def _environment_reads(path: Path) -> list[str]:
    """``os.environ.get(...)``, ``os.environ[...]`` and ``os.getenv(...)`` in ``path``, as source text."""
    tree = ast.parse(path.read_text(), filename=str(path))
    reads = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv")) or (
            isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" and isinstance(node.ctx, ast.Load)
        ):
            reads.append(ast.unparse(node))
    return reads


def test_every_variable_the_code_names_is_a_setting_and_the_readme_documents_it() -> None:
    known = set(settings.variables())
    mentioned = set().union(*(_mentioned_variables(p) for p in CODE))
    assert mentioned <= known, f"VQA_* names that are not settings: {sorted(mentioned - known)}"
    table = "\n".join(line for line in README.splitlines() if line.startswith("| `VQA_"))
    undocumented = [name for name in known if f"`{name}`" not in table]
    assert undocumented == [], f"missing from the README's configuration table: {undocumented}"


def test_only_the_settings_module_reads_the_environment_for_vqa_variables() -> None:
    offenders = {}
    for path in CODE:
        if path.name == "settings.py":
            continue
        reads = [r for r in _environment_reads(path) if "VQA_" in r or "API_KEY" in r]
        if reads:
            offenders[str(path.relative_to(ROOT))] = reads
    assert offenders == {}


def test_a_bad_variable_is_a_config_error_that_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQA_VLLM_PORT", "eighty")
    with pytest.raises(ConfigError, match=r"^VQA_VLLM_PORT must be an integer, got 'eighty'$"):
        settings.environment()
    monkeypatch.setenv("VQA_VLLM_PORT", "8001")
    monkeypatch.setenv("VQA_ALLOWED_MEDIA_ROOTS", " s3://media/ ,/data/images,, ")
    monkeypatch.setenv("VQA_EXECUTION", " Kubernetes ")
    monkeypatch.setenv("VQA_MODEL", "")  # empty counts as unset
    env = settings.environment()
    assert (env.vllm_port, env.allowed_media_roots, env.execution, env.model) == (
        8001,
        ["s3://media/", "/data/images"],
        "kubernetes",
        None,
    )


def test_every_default_has_one_value_everywhere_it_is_offered() -> None:
    """The CLI, JobOptions, WorkerSpec, the DAG params and the serving classes offer the same defaults, from settings."""
    import inspect

    from vqa_operators.operators.dag_config import io_params
    from vqa_operators.seed_compat.serving import LocalModelVLMServing_vllm
    from vqa_operators.serving.base import SamplingParams
    from vqa_operators.serving.openai_api import OpenAIServing
    from vqa_operators.worker import JobOptions

    opts = JobOptions(generator="image_qa", input="in.jsonl", output="out.jsonl")
    sampling = SamplingParams()
    for got in (opts, sampling):
        assert (got.temperature, got.top_p) == (settings.TEMPERATURE, settings.TOP_P)
    # the completion token limit: the generator's own unless a run sets it (video QA's stages declare theirs)
    assert opts.max_tokens is None and sampling.max_tokens == settings.MAX_TOKENS
    assert generator_class("image_qa").max_tokens == settings.MAX_TOKENS and generator_class("video_qa_final").max_tokens == 4096
    assert opts.max_pixels == settings.MAX_PIXELS
    client = inspect.signature(OpenAIServing).parameters
    local = inspect.signature(LocalModelVLMServing_vllm).parameters
    assert (client["temperature"].default, client["top_p"].default, client["max_tokens"].default) == (
        settings.TEMPERATURE,
        settings.TOP_P,
        settings.MAX_TOKENS,
    )
    assert (local["vllm_temperature"].default, local["vllm_top_p"].default, local["vllm_max_tokens"].default) == (
        settings.TEMPERATURE,
        settings.TOP_P,
        settings.MAX_TOKENS,
    )
    assert (opts.request_timeout, opts.max_retries, opts.max_consecutive_failures) == (
        client["timeout"].default,
        client["max_retries"].default,
        client["max_consecutive_failures"].default,
    )
    assert (local["vllm_gpu_memory_utilization"].default, local["concurrency"].default) == (
        settings.VLLM_GPU_MEMORY_UTILIZATION,
        settings.MAX_NUM_SEQS,
    )
    checkpoint = inspect.signature(Checkpoint).parameters
    assert (checkpoint["every_rows"].default, checkpoint["every_seconds"].default) == (
        settings.CHECKPOINT_EVERY,
        settings.CHECKPOINT_SECONDS,
    )
    # the quality gate sends a video's frames and a row's images on the same budgets as the stages that made the row
    assert (
        QualityOptions.model_fields["max_frames"].default
        == VideoQAOptions.model_fields["max_frames"].default
        == settings.MAX_FRAMES
    )
    assert (
        QualityOptions.model_fields["frame_max_pixels"].default
        == VideoQAOptions.model_fields["frame_max_pixels"].default
        == settings.FRAME_MAX_PIXELS
    )
    assert (
        QualityOptions.model_fields["max_images_per_row"].default
        == ImageQAOptions.model_fields["max_images_per_row"].default
        == settings.MAX_IMAGES_PER_ROW
    )

    params = io_params("image_qa", rows_doc="", final_task="generate")
    assert params["max_shards"].value == settings.MAX_SHARDS and params["rows_per_shard"].value == settings.ROWS_PER_SHARD


def test_the_http_clients_defaults_are_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators.seed_compat.serving import APIVLMServing_openai

    monkeypatch.setenv("VQA_MODEL", "served-model")
    monkeypatch.setenv("VQA_MAX_NUM_SEQS", "32")
    monkeypatch.delenv("VQA_CONCURRENCY", raising=False)
    client = APIVLMServing_openai(api_url="http://127.0.0.1:9/v1")
    assert client.model_name == "served-model" and client.concurrency == settings.default_concurrency(32) == 40
    monkeypatch.delenv("VQA_MODEL")
    with pytest.raises(ConfigError, match="no model name"):
        APIVLMServing_openai(api_url="http://127.0.0.1:9/v1")


def test_every_reason_code_is_documented() -> None:
    start = README.index("Reason codes:")
    codes_section = README[start : README.index("- Output rows keep every input field", start)]
    missing = [reason.value for reason in Reason if f"`{reason.value}`" not in codes_section]
    assert missing == []
