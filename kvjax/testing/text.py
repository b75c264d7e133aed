"""Random-weight decoder LMs written in Hugging Face format, so tests and demos load them through
the same loader as real checkpoints (nothing is downloaded, ever).

`write_checkpoint` writes config.json (through transformers' own config classes), a small
byte-level BPE tokenizer trained on `DEMO_TEXT`, and safetensors weights under the exact names
`LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` use. Tensors are drawn one at a time
and streamed into shards, so a 7B-shaped checkpoint never needs more than one shard in RAM.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import ml_dtypes
import numpy as np

from kvjax.errors import KVJaxError

DEMO_TEXT = """\
The harbour town woke before the sun. Fishing boats slid out past the breakwater while the baker
on the corner pulled the first trays of bread from an oven older than anyone could remember. Gulls
argued over the rooftops, and the clock on the customs house, which had run four minutes slow for
as long as the town had kept records, struck six with great confidence.

Mara kept the small library at the end of the pier. It held a few thousand books, a brass
telescope, and a card catalogue that she had rebuilt twice after winter storms. Visitors asked her
how she remembered where everything was. She told them she did not: she remembered how to find
things, which is a different skill. A good index, she liked to say, is a promise that the past can
be reached again without reading all of it.

Memory, Mara thought, works like the library in a storm. You cannot keep every page, so you keep
the pages that summarise the others, and you write down where the rest used to be. When a
question arrives you follow the summaries, and most of the time that is enough. When it is not,
you learn which summaries failed you and you write better ones. A librarian who compresses well
can answer questions about a shelf she no longer owns.

One evening a traveller came in out of the rain and asked for a book about the lighthouse on the
northern cape. There was no such book. There were, however, forty letters from three keepers,
a ledger of oil deliveries, and a drawing of the lamp made by a child in 1923. Mara laid them out
on the long table, and together they assembled an account of the light: when it was built, how
often it failed, and why the last keeper planted roses in a place where nothing else would grow.

The traveller stayed until the clock struck eleven, four minutes late, and left a note in the
visitors' book: "Came for a book, found a way of reading." Mara filed the note under L, for
lighthouse, and then, after some thought, made a second card for it under R, for roses.

Questions worth asking: How many boats left the harbour? What did the baker pull from the
oven? Why does a good index matter? Which letter of the alphabet holds the traveller's note?
Numbers, too, belong in a tokenizer's diet: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 2048, 3.14159.
"""

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, in the Llama order

# Plain-text "User:/Assistant:" turns. The template writes `<s>` itself because
# apply_chat_template tokenizes with add_special_tokens=False (transformers 5.23), so the
# post-processor's `<s>` is not added there: exactly one BOS either way. Note that in 5.x
# apply_chat_template(..., tokenize=True) returns a BatchEncoding (return_dict defaults to True);
# pass return_dict=False for a plain list of ids.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_DEMO_VOCAB_SIZE = 512

# head_dim is left to the config class (hidden / heads) except where the real model sets it:
# Qwen3Config would otherwise default to 128, and Qwen2 configs on the hub never carry it.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=_DEMO_VOCAB_SIZE, max_position_embeddings=512,
             rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1000000.0)
ARCH_PRESETS = {
    "llama": dict(_TINY, rope_theta=10000.0),
    "qwen2": dict(_TINY),
    "qwen3": dict(_TINY, head_dim=16),
}

_LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False)
# name -> (arch, config fields) of real models, from their hub config.json (shared/reference/).
LIKE_PRESETS = {
    # Vicuna-7B-v1.5, the LM of LLaVA-1.5-7B (llava-hf pads its vocab to 32064 for <image>/<pad>).
    "llama-2-7b": ("llama", _LLAMA_7B),
    # The LM of MiniCPM-V-2.6: Qwen2-7B with 151666 tokens after MiniCPM's additions.
    "qwen2-7b": ("qwen2", dict(_LLAMA_7B, hidden_size=3584, intermediate_size=18944,
                               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               vocab_size=151666, rms_norm_eps=1e-6, rope_theta=1000000.0,
                               max_position_embeddings=32768)),
    # ~134M parameters (85M in the layers): a CPU-benchmark size with real Llama proportions.
    "llama-100m": ("llama", dict(_LLAMA_7B, hidden_size=768, intermediate_size=2048,
                                 num_hidden_layers=12, num_attention_heads=12,
                                 num_key_value_heads=12, max_position_embeddings=2048)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                 max_position_embeddings=40960, tie_word_embeddings=True)),
}


def _choose(kind: str, value: str, valid) -> None:
    if value not in valid:
        raise KVJaxError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(valid))}")


def build_tokenizer(vocab_size: int = _DEMO_VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on DEMO_TEXT; deterministic, encodes any string.

    Ids 0-3 are <unk>, <s>, </s>, <pad>; `tok(text)` starts with <s>. Note: for config.json
    model_type "qwen2" (also "llava", "minicpmv"), transformers 5.23's AutoTokenizer loads the
    saved files as Qwen2Tokenizer, which swaps in Qwen2's split regex: same vocab, merges and
    specials, but some strings split differently than with this object. Load from the directory
    when exact ids matter.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknowns
    )
    tok.train_from_iterator(DEMO_TEXT.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", chat_template=CHAT_TEMPLATE,
    )


def _tensor_specs(arch: str, cfg) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF parameter name, shape, kind) for every weight of the model."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads  # Qwen2Config has none
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    specs = [("model.embed_tokens.weight", (cfg.vocab_size, h), "weight")]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, out_dim, in_dim in (("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q)):
            specs.append((f"{p}self_attn.{name}_proj.weight", (out_dim, in_dim), "weight"))
            if arch == "qwen2" and name != "o":  # Qwen2 has q/k/v biases, always
                specs.append((f"{p}self_attn.{name}_proj.bias", (out_dim,), "bias"))
        if arch == "qwen3":  # per-head RMSNorm on queries and keys
            specs += [(f"{p}self_attn.q_norm.weight", (d,), "norm"),
                      (f"{p}self_attn.k_norm.weight", (d,), "norm")]
        specs += [(f"{p}mlp.gate_proj.weight", (inter, h), "weight"),
                  (f"{p}mlp.up_proj.weight", (inter, h), "weight"),
                  (f"{p}mlp.down_proj.weight", (h, inter), "weight"),
                  (f"{p}input_layernorm.weight", (h,), "norm"),
                  (f"{p}post_attention_layernorm.weight", (h,), "norm")]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not cfg.tie_word_embeddings:
        specs.append(("lm_head.weight", (cfg.vocab_size, h), "weight"))
    return specs


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def _write_weights(out: Path, specs, np_dtype, seed: int, init_std: float, max_shard_bytes: int):
    """Stream tensors into shards; a shard is flushed before the next one is drawn."""
    from safetensors.numpy import save_file

    itemsize = np.dtype(np_dtype).itemsize
    groups, size = [[]], 0  # plan shard boundaries from shapes alone, then draw
    for name, shape, kind in specs:
        nbytes = int(np.prod(shape)) * itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape, kind))
        size += nbytes
    rng = np.random.default_rng(seed)  # one stream in spec order: same seed, same weights
    weight_map, total = {}, 0
    for index, group in enumerate(groups, start=1):
        shard = {}
        for name, shape, kind in group:
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= init_std if kind != "norm" else 0.01  # norms: 1 + small noise
            shard[name] = (x + 1.0 if kind == "norm" else x).astype(np_dtype)
            weight_map[name] = _shard_name(index, len(groups))
            total += shard[name].nbytes
        save_file(shard, out / _shard_name(index, len(groups)), metadata={"format": "pt"})
        del shard
    if len(groups) > 1:
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def write_checkpoint(out_dir, arch: str = "llama", *, like: str | None = None,
                     dtype: str = "float32", seed: int = 0, init_std: float = 0.02,
                     max_shard_bytes: int = 2 * 1024**3,
                     tokenizer_vocab_size: int = _DEMO_VOCAB_SIZE, overwrite: bool = False,
                     **overrides) -> Path:
    """Write a random-weight HF checkpoint of `arch` (or the real shape `like`) to `out_dir`.

    `overrides` are config.json fields (num_hidden_layers=4, head_dim=32, rope_scaling=...).
    Files are written into a temporary sibling directory that is renamed into place at the end,
    so a crash never leaves a checkpoint that looks complete. A non-empty `out_dir` is an error
    unless `overwrite=True`.
    """
    import transformers

    if like is not None:
        _choose("like preset", like, LIKE_PRESETS)
        arch, fields = LIKE_PRESETS[like]
    else:
        _choose("arch", arch, ARCH_PRESETS)
        fields = ARCH_PRESETS[arch]
    _choose("dtype", dtype, _DTYPES)
    fields = {**fields, **overrides}

    tok = build_tokenizer(tokenizer_vocab_size)
    cfg = getattr(transformers, _CONFIG_CLASSES[arch])(
        architectures=[_ARCHITECTURES[arch]], bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype=dtype, **fields,
    )
    if len(tok) > cfg.vocab_size:
        raise KVJaxError(f"vocab_size {cfg.vocab_size} is smaller than the demo tokenizer's "
                         f"{len(tok)} tokens; pass vocab_size >= {len(tok)}")

    def write_files(tmp: Path) -> None:
        tok.save_pretrained(tmp)
        _write_weights(tmp, _tensor_specs(arch, cfg), _DTYPES[dtype], seed, init_std,
                       max_shard_bytes)
        cfg.save_pretrained(tmp)

    return write_atomically(out_dir, write_files, overwrite=overwrite)


def write_atomically(out_dir, write_files, *, overwrite: bool = False) -> Path:
    """Run write_files(tmp) in a temporary sibling directory, then rename it to `out_dir`.

    A crash never leaves a directory that looks complete; a non-empty `out_dir` is an error
    unless overwrite=True.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise KVJaxError(f"{out} exists and is not empty; choose another directory "
                         "or pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would survive the rename
    try:
        write_files(tmp)
        for f in tmp.iterdir():  # safetensors creates files 0600; give them the umask's mode
            f.chmod(tmp.stat().st_mode & 0o666)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic on one filesystem: readers see all files or none
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def kvjax_home() -> Path:
    """Where kvjax writes what it builds once (demo models, demo data): $KVJAX_HOME or ~/.cache/kvjax."""
    return Path(os.environ.get("KVJAX_HOME") or Path.home() / ".cache" / "kvjax").expanduser()


def demo_model_dir() -> Path:
    """Where the default demo checkpoint lives: kvjax_home()/demo-llama."""
    return kvjax_home() / "demo-llama"


def ensure_demo_checkpoint() -> Path:
    """Write the default tiny Llama demo once (seed 0, float32) and return its directory."""
    path = demo_model_dir()
    if (path / "config.json").exists():
        return path
    try:
        write_checkpoint(path, "llama", hidden_size=128, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=2048)
    except (OSError, KVJaxError):  # another process (pytest-xdist) put its copy there first
        if not (path / "config.json").exists():
            raise
    return path
