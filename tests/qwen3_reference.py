"""Independent reference computations for the Qwen3 recipes, written from the model cards.

Deliberately shares no code with ragserve: the prompt text is spelled out here, each text is
run alone (no padding), and the model is loaded fresh with plain transformers calls. The
engine and the server must agree with these numbers to 1e-4.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

TASK = "Given a web search query, retrieve relevant passages that answer the query"
RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@lru_cache(maxsize=None)
def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@lru_cache(maxsize=None)
def _causal_lm(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def embedding(folder: Path, text: str, *, query: bool = False, task: str = TASK) -> list[float]:
    """Qwen3-Embedding: `Instruct: {task}\\nQuery:{query}` for queries, <|endoftext|> at the end,
    hidden state of the last token, L2-normalised."""
    tokenizer = _tokenizer(str(folder))
    model = _causal_lm(str(folder))
    if query:
        text = f"Instruct: {task}\nQuery:{text}"
    ids = tokenizer(text)["input_ids"]
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if ids[-1] != endoftext:
        ids = ids + [endoftext]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden, dim=-1).tolist()


def cut(vector: list[float], dimensions: int) -> list[float]:
    """Matryoshka: keep the first `dimensions` values, renormalise."""
    head = torch.tensor(vector[:dimensions])
    return (head / head.norm()).tolist()


def rerank_score(folder: Path, query: str, document: str, *, instruction: str = RERANK_INSTRUCTION) -> float:
    """Qwen3-Reranker: P(yes) / (P(yes) + P(no)) at the last position of the judging prompt."""
    tokenizer = _tokenizer(str(folder))
    model = _causal_lm(str(folder))
    pair = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    ids = (tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
           + tokenizer.encode(pair, add_special_tokens=False)
           + tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False))
    yes = tokenizer.convert_tokens_to_ids("yes")
    no = tokenizer.convert_tokens_to_ids("no")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.softmax(torch.stack([logits[no], logits[yes]]), dim=0)[1].item()


def greedy_chat(folder: Path, messages: list[dict], *, max_new_tokens: int = 32, **template_kwargs) -> dict:
    """Greedy continuation of the chat template's prompt: text (special tokens dropped) and token counts."""
    tokenizer = _tokenizer(str(folder))
    model = _causal_lm(str(folder))
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           **template_kwargs)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "prompt_tokens": ids.shape[1],
            "completion_tokens": len(new), "prompt": prompt}


def assert_close(got, expected, tol: float = 1e-4) -> None:
    got_t, expected_t = torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    assert got_t.shape == expected_t.shape, (got_t.shape, expected_t.shape)
    worst = (got_t - expected_t).abs().max().item()
    assert worst <= tol, f"max abs difference {worst:.3g} > {tol}"
