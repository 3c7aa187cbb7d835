"""Real-vLLM tier, once more on vLLM's `guidance` structured-output backend (llguidance): the five worker commands and the double's parity."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import real_vllm
from tests.real_vllm import check_parity

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def guidance_url(tiny_idefics3: Path) -> Iterator[str]:
    with real_vllm.vllm_server(tiny_idefics3, "guidance", backend="guidance") as base_url:
        yield base_url


def test_five_worker_commands_on_the_guidance_backend(guidance_url: str, tmp_path: Path) -> None:
    # half the default tier's rows: every schema is still asked for, and CI time goes to the other tiers
    figures = real_vllm.check_five_stages(guidance_url, tmp_path, "guidance", images=12, videos=4)
    assert [figures[s]["rows_in"] for s in real_vllm.STAGES] == [12, 12, 4, 4, 4]


def test_the_double_answers_every_request_with_vllms_status_on_guidance(guidance_url: str) -> None:
    check_parity(guidance_url, "guidance")
