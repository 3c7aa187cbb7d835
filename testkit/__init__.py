"""What the tests and the benchmarks share: the simulated vLLM server (``openai_server``, held to
``vllm_rules``, vLLM 0.32's own refusals) and sample data (``data``). Not part of the deployed package."""
