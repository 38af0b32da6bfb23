"""Everything ZeroKey asks a multimodal LLM: the OpenAI-compatible client (:mod:`~zerokey.mllm.client`),
namers, pointers, answer parsing, and the local test servers (:mod:`~zerokey.mllm.testing`).
"""
