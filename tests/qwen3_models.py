"""Tiny Qwen3-architecture models with random weights, built offline for tests.

No Qwen3 checkpoint can be downloaded here, so the tests make their own: a byte-level BPE
tokenizer trained on a small corpus with Qwen's special tokens and pre-tokenizer, a Qwen3
chat template that honours `enable_thinking`, and Qwen3ForCausalLM weights drawn from a
seeded config (hidden size 64, 2 layers). The folders look like a user's download
(config.json, model.safetensors, tokenizer files), so they are launched like real models.

`write_gguf` converts such a folder to GGUF (f32) the way llama.cpp's converter does for
Qwen3: as a plain causal LM, or as a reranker with a classifier head `cls.output` whose two
rows are the lm_head rows of "yes" and "no" (llama.cpp applies softmax over them, so the
first output is P(yes)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3 marks these as added but not special: they survive skip_special_tokens.
THINK_TOKENS = ["<think>", "</think>"]

# The Qwen2/Qwen3 pre-tokenizer pattern; llama.cpp's "qwen2" pre-tokenizer uses the same one,
# so a GGUF conversion tokenizes exactly like the HF folder.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's template, trimmed to what the tests need (no tools): history turns drop their
# reasoning, the generation prompt gets an empty think block when enable_thinking is false.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Qwen3-*-Thinking-2507 style: the generation prompt itself opens the think block, so the
# model's output starts with reasoning and holds only the closing tag.
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

_WORDS = (
    "yes no the a of to and in is was for on that with as it by at from this be are or an have not "
    "which one all were they but their has more been its when there who can what will about if out "
    "Paris France capital city river Seine Berlin Germany Tokyo Japan query document passage search "
    "retrieve relevant answer question judge requirements instruct provided given web embedding "
    "rerank model server vector score think hmm let me see reasoning content system user assistant "
    "hello world weather today sunny rain cat dog apple banana panda bamboo eats sleeps runs quick brown "
    "fox jumps over lazy machine learning neural network language translation python code numbers"
).split()


def _corpus() -> list[str]:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(400):
        n = int(rng.integers(4, 14))
        lines.append(" ".join(rng.choice(_WORDS, size=n)))
    # "yes" and "no" must each be one token, as in Qwen's vocabulary (the reranker reads their logits).
    lines += ["yes no yes no", "yes", "no", 'can only be "yes" or "no".'] * 50
    lines += [
        "<Instruct>: Given a web search query, retrieve relevant passages that answer the query",
        "<Query>: what is the capital of France?\n<Document>: Paris is the capital of France.",
        "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
        "Instruct: Given a web search query\nQuery:what is",
        "hmm Paris\n\nParis hmm\n\nhello",
    ] * 20
    return lines


def build_tokenizer(*, append_eos: bool = False):
    """A trained byte-level BPE with Qwen's pre-tokenizer and special tokens.

    append_eos=True adds a post-processor that appends <|endoftext|>, as the current
    Qwen3-Embedding tokenizer does; without it the engine must append it itself.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    if append_eos:
        eos_id = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", eos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for word in ("yes", "no"):
        assert tok.token_to_id(word) is not None, f"tokenizer lacks a single {word!r} token"
    return tok


def save_tokenizer(folder: Path, *, append_eos: bool = False) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(append_eos=append_eos),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False, model_max_length=4096,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(folder)


def _config(vocab_size: int, *, initializer_range: float, tie: bool, **extra):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=tie,
        initializer_range=initializer_range, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, torch_dtype="float32", **extra,
    )


def build_model(folder: Path, *, kind: str, seed: int = 0, append_eos: bool = False) -> Path:
    """Write a tiny Qwen3 folder. kind: 'chat' | 'thinking' | 'embedding' | 'reranker'.

    The chat model is random except for a planted bigram chain, so greedy decoding after
    "assistant\\n" says "<think>hmm</think>Paris<|im_end|>" and after an empty think block
    says "Paris<|im_end|>": the reasoning split is then tested on text the model really
    generated. The 'thinking' model has THINKING_TEMPLATE (the prompt ends in "<think>\\n") and
    a chain that continues it with "hmm</think>Paris<|im_end|>", as Qwen3 thinking models do.
    Embedding and reranker weights are plain random draws (wider than the default init so that
    scores spread out and a wrong rule shows).
    """
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder, append_eos=append_eos)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    init = {"chat": 0.02, "thinking": 0.02, "embedding": 0.2, "reranker": 0.3}[kind]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    chat = kind in ("chat", "thinking")
    config = _config(vocab_size, initializer_range=init, tie=not chat)
    config.eos_token_id = endoftext if kind == "embedding" else im_end
    config.pad_token_id = endoftext
    model = Qwen3ForCausalLM(config).eval()
    if chat:
        _plant_chain(model, tokenizer, THINKING_CHAIN if kind == "thinking" else CHAT_CHAIN)
    model.save_pretrained(folder, safe_serialization=True)
    if kind == "thinking":
        tokenizer.chat_template = THINKING_TEMPLATE
        tokenizer.save_pretrained(folder)
    if chat:
        generation = {"eos_token_id": [im_end, endoftext], "pad_token_id": endoftext,
                      "do_sample": True, "temperature": 0.6, "top_p": 0.95}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder


CHAT_CHAIN = [("\n", "<think>"), ("<think>", "hmm"), ("hmm", "</think>"), ("</think>", "Paris"),
              ("\n\n", "Paris"), ("Paris", "<|im_end|>")]
THINKING_CHAIN = [("\n", "hmm"), ("hmm", "</think>"), ("</think>", "Paris"), ("Paris", "<|im_end|>")]


def _plant_chain(model, tokenizer, chain) -> None:
    import torch

    def one(text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        planted = list(range(len(chain)))
        # Reserved residual directions: only chain tokens write them (layers and other
        # embeddings are zeroed there), so they survive the final RMSNorm and map through the
        # head to the next token of the chain, while other text stays purely random.
        embed[:, planted] = 0.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[planted, :] = 0.0
            layer.mlp.down_proj.weight[planted, :] = 0.0
        for dim, (current, following) in enumerate(chain):
            embed[one(current), dim] = 4.0
            head[one(following), dim] = 6.0


def build_all(root: Path) -> dict[str, Path]:
    """The folders the tests use, named like the real downloads so auto-detection applies."""
    return {
        "chat": build_model(root / "Qwen3-Tiny-Chat", kind="chat", seed=1),
        "embedding": build_model(root / "Qwen3-Embedding-Tiny", kind="embedding", seed=2),
        "embedding_eos": build_model(root / "Qwen3-Embedding-Tiny-EOS", kind="embedding", seed=3,
                                     append_eos=True),
        "reranker": build_model(root / "Qwen3-Reranker-Tiny", kind="reranker", seed=4),
    }


# --- The official repos' file layouts ---------------------------------------------------------
#
# Qwen/Qwen3-Embedding-4B ships, besides config.json (Qwen3ForCausalLM), tokenizer files and
# sharded safetensors: modules.json (Transformer -> Pooling -> Normalize), 1_Pooling/config.json
# (last-token pooling), config_sentence_transformers.json (the query prompt). Qwen/Qwen3-Reranker-4B
# ships the sentence-transformers >= 5.4 CrossEncoder files: modules.json (Transformer ->
# LogitScore), 1_LogitScore/config.json (ids of "yes" and "no"), sentence_bert_config.json
# (text-generation task), config_sentence_transformers.json and chat_template.jinja.

EMBEDDING_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def official_layout(source: Path, folder: Path, *, kind: str) -> Path:
    """Copy a tiny 'embedding' or 'reranker' folder into the official repo's file set."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(source)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="200KB")  # model-0000x-of-0000n
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    tokenizer_data = json.loads((source / "tokenizer.json").read_text())
    _write_json(folder / "vocab.json", tokenizer_data["model"]["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_data["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "README.md").write_text(f"# {folder.name} (tiny random weights for tests)\n")
    if kind == "embedding":
        _write_json(folder / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
        _write_json(folder / "1_Pooling" / "config.json", {
            "word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True, "include_prompt": True})
        _write_json(folder / "config_sentence_transformers.json", {
            "prompts": {"query": EMBEDDING_QUERY_PROMPT, "document": ""},
            "default_prompt_name": None, "similarity_fn_name": "cosine"})
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
        _write_json(folder / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
            {"idx": 1, "name": "1", "path": "1_LogitScore",
             "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"}])
        _write_json(folder / "1_LogitScore" / "config.json", {
            "true_token_id": tokenizer.convert_tokens_to_ids("yes"),
            "false_token_id": tokenizer.convert_tokens_to_ids("no")})
        _write_json(folder / "sentence_bert_config.json", {"transformer_task": "text-generation",
                                                          "module_output_name": "causal_logits"})
        _write_json(folder / "config_sentence_transformers.json", {
            "model_type": "CrossEncoder",
            "prompts": {"query": "Given a web search query, retrieve relevant passages that answer the query"},
            "default_prompt_name": "query"})
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


# --- GGUF ------------------------------------------------------------------------------------

def _gguf_vocab(folder: Path):
    """Tokens, types and merges from tokenizer.json, in the layout llama.cpp's gpt2 BPE reads."""
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, info in added.items():
        vocab[content] = info["id"]
    size = max(vocab.values()) + 1
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if token in added:
            types.append(gguf.TokenType.CONTROL if added[token]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def write_gguf(folder: Path, out: Path, *, classifier_head: bool = False, last_pooling: bool = False) -> Path:
    """Convert a tiny Qwen3 folder to an f32 GGUF, as llama.cpp's converter would (last_pooling: as the
    official Qwen3-Embedding GGUFs, pooling_type LAST, no EOS added by the tokenizer)."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    tokens, types, merges = _gguf_vocab(folder)
    token_id = {t: i for i, t in enumerate(tokens)}

    arch = "qwen3"
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 1e6))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(token_id["<|endoftext|>"])
    writer.add_eos_token_id(token_id["<|im_end|>"])
    writer.add_pad_token_id(token_id["<|endoftext|>"])
    writer.add_add_bos_token(False)
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else tok_config.get("chat_template")
    template = template or CHAT_TEMPLATE
    if classifier_head:
        from qwen3_reference import RERANK_INSTRUCTION, RERANK_PREFIX, RERANK_SUFFIX

        # llama.cpp formats rank-pooling requests with this named template ({query}/{document}
        # placeholders), as its converter writes it for Qwen3-Reranker.
        rerank = (RERANK_PREFIX + f"<Instruct>: {RERANK_INSTRUCTION}\n<Query>: {{query}}\n<Document>: {{document}}"
                  + RERANK_SUFFIX)
        writer.add_chat_template([{"name": "default", "template": template},
                                  {"name": "rerank", "template": rerank}])
    else:
        writer.add_chat_template(template)

    embed = weights["model.embed_tokens.weight"]
    head = weights.get("lm_head.weight", embed)
    if last_pooling:
        writer.add_pooling_type(gguf.PoolingType.LAST)
    if classifier_head:
        writer.add_pooling_type(gguf.PoolingType.RANK)
        writer.add_classifier_output_labels(["yes", "no"])
        cls_out = np.stack([head[token_id["yes"]], head[token_id["no"]]]).astype(np.float32)
        writer.add_tensor("cls.output.weight", cls_out)

    writer.add_tensor("token_embd.weight", embed.astype(np.float32))
    if not config.get("tie_word_embeddings", False):
        writer.add_tensor("output.weight", head.astype(np.float32))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"].astype(np.float32))
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in names.items():
            tensor = weights[f"model.layers.{layer}.{hf_name}.weight"].astype(np.float32)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", tensor)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def ensure_models(base: Path) -> dict[str, Path]:
    """Build the folders and GGUF files once per test session (several test modules share them)."""
    root = base / "qwen3-tiny"
    done = root / ".complete"
    paths = {
        "chat": root / "Qwen3-Tiny-Chat",
        "embedding": root / "Qwen3-Embedding-Tiny",
        "embedding_eos": root / "Qwen3-Embedding-Tiny-EOS",
        "reranker": root / "Qwen3-Reranker-Tiny",
        "reranker_gguf_plain": root / "gguf" / "Qwen3-Reranker-Tiny-f32.gguf",
        "reranker_gguf_rank": root / "gguf" / "Qwen3-Reranker-Tiny-rank-f32.gguf",
    }
    if not done.exists():
        build_all(root)
        (root / "gguf").mkdir(exist_ok=True)
        write_gguf(paths["reranker"], paths["reranker_gguf_plain"])
        write_gguf(paths["reranker"], paths["reranker_gguf_rank"], classifier_head=True)
        done.write_text("ok")
    return paths


def ensure_layout_models(base: Path) -> dict[str, Path]:
    """The official repos' layouts (under the official names and under a neutral hub-cache snapshot
    name) and the thinking chat model with its GGUF conversion; built once per test session."""
    paths = ensure_models(base)
    root = base / "qwen3-tiny" / "layouts"
    snapshot = "models--Org--Mirror/snapshots/" + "0123456789abcdef" * 2
    extra = {
        "embedding_official": root / "Qwen3-Embedding-4B",
        "reranker_official": root / "Qwen3-Reranker-4B",
        "embedding_neutral": root / "embedder" / snapshot,
        "reranker_neutral": root / "reranker" / snapshot,
        "thinking": root / "Qwen3-Tiny-Thinking",
        "thinking_gguf": root / "gguf" / "Qwen3-Tiny-Thinking-f32.gguf",
        "embedding_gguf": root / "gguf" / "Qwen3-Embedding-Tiny-f32.gguf",
    }
    done = root / ".complete"
    if not done.exists():
        for kind in ("embedding", "reranker"):
            official_layout(paths[kind], extra[f"{kind}_official"], kind=kind)
            official_layout(paths[kind], extra[f"{kind}_neutral"], kind=kind)
        build_model(extra["thinking"], kind="thinking", seed=5)
        extra["thinking_gguf"].parent.mkdir(parents=True, exist_ok=True)
        write_gguf(extra["thinking"], extra["thinking_gguf"])
        write_gguf(paths["embedding"], extra["embedding_gguf"], last_pooling=True)
        done.write_text("ok")
    return {**paths, **extra}
