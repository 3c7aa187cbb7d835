"""``VLMHook``: the ``vqa_vlm`` connection to an OpenAI-compatible model server (vLLM).

Connection fields: host = base URL (``http://vllm:8000/v1``), password = API key,
``extra.model`` = served model name. Without the connection, ``VQA_BASE_URL``, ``VQA_API_KEY``
and ``VQA_MODEL`` from the environment are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseHook

from vqa_operators import settings


@dataclass(frozen=True)
class VLMEndpoint:
    """Where the model server is and what it serves; the key is kept out of repr."""

    base_url: str | None
    model: str | None
    api_key: str | None = field(default=None, repr=False)


class VLMHook(BaseHook):
    """Resolves the model endpoint from an Airflow connection, falling back to the environment."""

    conn_name_attr = "vlm_conn_id"
    default_conn_name = "vqa_vlm"
    conn_type = "http"
    hook_name = "VQA vision-language model server"

    def __init__(self, vlm_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.vlm_conn_id = vlm_conn_id

    def get_endpoint(self) -> VLMEndpoint:
        """The connection's endpoint, or the VQA_* environment variables if the connection does not exist."""
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.vlm_conn_id)
        except AirflowNotFoundException:
            self.log.info("connection %s not defined; using VQA_BASE_URL / VQA_MODEL / VQA_API_KEY", self.vlm_conn_id)
            env = settings.environment()
            # the API key is read by the client itself (VQA_API_KEY), as the seeds' API does
            return VLMEndpoint(base_url=env.base_url, model=env.model, api_key=None)
        extra: dict[str, Any] = conn.extra_dejson or {}
        host = conn.host or ""
        if host and "://" not in host:
            host = f"{conn.schema or 'http'}://{host}" + (f":{conn.port}" if conn.port else "")
        return VLMEndpoint(base_url=host or None, model=extra.get("model"), api_key=conn.password or None)

    def test_connection(self) -> tuple[bool, str]:
        """Ask the server for its models and check that the configured one is served."""
        import asyncio

        from vqa_operators.exceptions import JobError
        from vqa_operators.serving.openai_api import OpenAIServing

        endpoint = self.get_endpoint()
        try:
            serving = OpenAIServing(
                base_url=endpoint.base_url or "",
                model=endpoint.model or "",
                concurrency=1,
                api_key=endpoint.api_key,
                max_retries=0,
            )
            asyncio.run(serving.check())
        except JobError as err:
            return False, str(err)
        return True, f"{endpoint.model} is served at {endpoint.base_url}"
