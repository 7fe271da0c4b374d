"""A stand-in for the `vllm` package in tests (vLLM needs CUDA; the test machines have no GPU).

Laid out like vLLM: package metadata (../vllm-0.99.0.dist-info) declaring the `vllm` console
script, `vllm.entrypoints.cli.main:main` with the `serve` subcommand, which takes vLLM's flags
and answers vLLM's HTTP protocol by running real small models on the CPU; and
`vllm.entrypoints.openai.api_server` as an alias stub that exits without serving, as it can
in current vLLM.
"""
