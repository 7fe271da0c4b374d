"""A stand-in for the `vllm` package in tests (vLLM needs CUDA; the test machines have no GPU).

Only `vllm.entrypoints.openai.api_server` exists: it accepts vLLM's server flags and answers
vLLM's HTTP protocol by running real small models on the CPU. No package metadata is installed
for it, so ragserve's engine learns the flag style from `--help`, as it does for a source tree.
"""
