"""Pretraining a small Llama-architecture LM from scratch (the default model kvjax ships): corpus
splits by book, a byte-level BPE tokenizer with a chat template, deterministic batches that mix
prose with long-context retrieval tasks, the jitted Optax step, and export in HF layout.

Batches depend only on (seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kvjax import retrieval
from kvjax.cache import KVCache
from kvjax.errors import KVJaxError
from kvjax.steps import forward_hidden

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
# A turn is <|role|>\n content <|end|>\n; the assistant's answer ends with <|end|> (the EOS id).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclasses.dataclass(frozen=True, slots=True)
class LMConfig:
    """Shape of the model and of the run (what the checkpoints and the export record)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 2048
    seq_len: int = 512  # tokens per training row
    batch_size: int = 8
    steps: int = 6000
    lr: float = 1e-3
    warmup_steps: int = 200
    retrieval_share: float = 0.5  # rows that are retrieval tasks (the rest: prose windows)
    copy_share: float = 0.0  # rows of a prose span repeated (bootstraps induction heads; drawn first)
    answer_weight: float = 4.0  # loss weight of an answer's tokens (the rest weigh 1)
    min_records: int = 1  # records per key-value recall row: min_records to max_records
    max_records: int = 5
    needle_share: float = 0.5  # retrieval rows that are needles (one record); the rest key-value recall
    max_prose_words: int = -1  # >= 0: a retrieval row's prose is 0 to this many words (else seq_len/16 to /2)
    questions: int = 1  # questions per recall row, 1 to this (the later ones as follow-up turns)
    short_seq_len: int = 0  # > 0: a short_share of the steps use rows this long (more rows per step)
    short_share: float = 0.0
    init_from: str = ""  # another run's work dir or an exported HF model: start from its weights (fresh optimizer)
    seed: int = 0

    def hf_config(self, tokenizer):
        import transformers

        return transformers.LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=True,
            rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"], dtype="bfloat16")


def parse_bible(text: str) -> dict[str, str]:
    """The `bible` program's dump ("Book N" headers, numbered verses with wrapped lines) -> {book:
    its text, one paragraph per chapter, verse numbers dropped}."""
    books: dict[str, list[str]] = {}
    book, verses = None, []
    for line in text.splitlines():
        header = re.fullmatch(r"([1-3]? ?[A-Z][A-Za-z ]+) (\d+)", line.strip())
        if header and not line.startswith(" "):
            if book is not None and verses:
                books.setdefault(book, []).append(" ".join(verses))
            book, verses = header.group(1), []
        elif re.match(r"\s+\d+ ", line):
            verses.append(line.strip().split(" ", 1)[1])
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    if book is not None and verses:
        books.setdefault(book, []).append(" ".join(verses))
    return {name: "\n".join(chapters) for name, chapters in books.items()}


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (every string encodes) with digits split one by one, so codes copy digit by digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                       special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)


class Batches:
    """Deterministic training rows: prose windows of the token stream, and retrieval tasks rendered
    with the chat template (question in the user turn, the code as the answer)."""

    def __init__(self, tokenizer, train_text: str, cfg: LMConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        if not 1 <= cfg.min_records <= cfg.max_records:
            raise KVJaxError(f"--min-records {cfg.min_records} and --max-records {cfg.max_records}: need "
                             "1 <= min <= max")
        if not 0.0 <= cfg.needle_share <= 1.0:
            raise KVJaxError(f"--needle-share must be in [0, 1], got {cfg.needle_share}")
        self.stream = np.asarray(tokenizer(train_text, add_special_tokens=False)["input_ids"], np.int32)
        self.sentences = retrieval.sentences(train_text)
        if len(self.stream) <= cfg.seq_len or not self.sentences:
            raise KVJaxError(f"the training text has {len(self.stream)} tokens; it needs more than "
                             f"--seq-len {cfg.seq_len}")

    def task_row(self, seed: int, rng: np.random.Generator, seq_len: int) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, answer spans) of one retrieval conversation that fits seq_len + 1 tokens: a recall task
        (with follow-up questions about its other records) or a needle."""
        cfg = self.cfg
        low, high = (0, cfg.max_prose_words + 1) if cfg.max_prose_words >= 0 else (seq_len // 16, seq_len // 2)
        num_words = int(rng.integers(low, high))
        is_recall = rng.random() >= cfg.needle_share
        num_records = int(rng.integers(cfg.min_records, cfg.max_records + 1))
        num_questions, depth = int(rng.integers(1, cfg.questions + 1)), float(rng.random())
        while True:
            if is_recall:
                task = retrieval.key_value_recall(self.sentences, seed, num_records=num_records, num_words=num_words)
            else:
                task = retrieval.needle(self.sentences, seed, depth=depth, num_words=num_words)
            others = [r for r in task.records if r[0] != task.name]
            order = np.random.default_rng(seed).permutation(len(others))[:num_questions - 1]
            ids, spans = encode_conversation(self.tokenizer, task, [others[i] for i in order])
            if len(ids) <= seq_len + 1 or num_words == 0:  # records alone too long: cut the tail
                return ids[:seq_len + 1], [(a, min(b, seq_len + 1)) for a, b in spans if a < seq_len + 1]
            num_words //= 2

    def copy_row(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """A span of the prose (8 to seq_len / 4 tokens) repeated to fill the row, weighted on the
        repeats only: the lesson behind copying a code from the context (an induction head), in the
        corpus's own tokens."""
        length = int(rng.integers(8, max(seq_len // 4, 9)))
        start = int(rng.integers(len(self.stream) - length))
        span = self.stream[start:start + length]
        weights = np.ones(seq_len, np.float32)
        weights[:length - 1] = 0.0  # targets inside the first copy are ordinary prose: left to the prose rows
        return np.resize(span, seq_len + 1).astype(np.int32), weights

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """tokens int32 [B, T + 1] (inputs and shifted targets) and weights float32 [B, T]; a short step
        has rows of short_seq_len tokens and proportionally more of them."""
        cfg = self.cfg
        rng = np.random.default_rng((cfg.seed, step))
        seq_len, batch_size = cfg.seq_len, cfg.batch_size
        if cfg.short_seq_len and rng.random() < cfg.short_share:
            seq_len, batch_size = cfg.short_seq_len, cfg.batch_size * cfg.seq_len // cfg.short_seq_len
        tokens = np.full((batch_size, seq_len + 1), self.tokenizer.pad_token_id, np.int32)
        weights = np.zeros((batch_size, seq_len), np.float32)
        for row in range(batch_size):
            if cfg.copy_share and rng.random() < cfg.copy_share:
                tokens[row], weights[row] = self.copy_row(rng, seq_len)
            elif rng.random() < cfg.retrieval_share:
                ids, spans = self.task_row(int(rng.integers(1 << 31)), rng, seq_len)
                tokens[row, :len(ids)] = ids
                weights[row, :len(ids) - 1] = 1.0
                for a, b in spans:  # target t is token t + 1
                    weights[row, a - 1:b - 1] = cfg.answer_weight
            else:
                start = int(rng.integers(len(self.stream) - seq_len - 1))
                tokens[row] = self.stream[start:start + seq_len + 1]
                weights[row] = 1.0
        return {"tokens": tokens, "weights": weights}


def prose_batch(tokenizer, text: str, cfg: LMConfig) -> dict[str, np.ndarray]:
    """Fixed full-length prose windows of `text` (the validation loss): no retrieval, copy or short rows,
    so the figure means the same whatever mix a run trains on."""
    prose = dataclasses.replace(cfg, retrieval_share=0.0, copy_share=0.0, short_seq_len=0, seed=cfg.seed + 1)
    return Batches(tokenizer, text, prose)(0)


def encode_conversation(tokenizer, task: retrieval.Task, follow_ups=()) -> tuple[list[int], list[tuple[int, int]]]:
    """A task as chat turns (context and question, then one turn per (name, code) follow-up), each
    reply the record again -> (ids, [start, end) of each reply with its <|end|>)."""
    ids, answer_start = encode_task(tokenizer, task)
    spans = [(answer_start, len(ids))]
    for name, code in follow_ups:
        turn = tokenizer.apply_chat_template([{"role": "user", "content": retrieval.question(name)}],
                                             add_generation_prompt=True, tokenize=False)
        turn = "\n" + turn.removeprefix(tokenizer.bos_token)  # the template's newline after <|end|>
        ids = ids + tokenizer(turn, add_special_tokens=False)["input_ids"]
        answer = tokenizer(retrieval.record(name, int(code)) + "<|end|>", add_special_tokens=False)["input_ids"]
        spans.append((len(ids), len(ids) + len(answer)))
        ids = ids + answer
    return ids, spans


def encode_task(tokenizer, task: retrieval.Task) -> tuple[list[int], int]:
    """A task as a chat turn -> (ids ending with the answer and <|end|>, index of the answer's first id)."""
    messages = [{"role": "user", "content": f"{task.context}\n{task.question}"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids + tokenizer(task.reply + "<|end|>", add_special_tokens=False)["input_ids"], len(ids)


def greedy_answer(model, tokenizer, task: retrieval.Task, max_new_tokens: int = 16) -> tuple[str, int]:
    """The model's greedy answer to a task and the prompt's length; prompts are padded to power-of-two
    buckets, so a sweep compiles a few programs, not one per prompt."""
    import kvjax
    from kvjax.prompts import bucket

    ids, answer_start = encode_task(tokenizer, task)
    tokens = np.zeros((1, bucket(answer_start, smallest=64)), np.int32)
    tokens[0, :answer_start] = ids[:answer_start]
    cache = kvjax.KVCache.for_model(model.cfg, 1, tokens.shape[1] + max_new_tokens)
    out = kvjax.generate(model, cache, tokens, [answer_start], max_new_tokens=max_new_tokens,
                         eos_ids=(tokenizer.eos_token_id,))
    return tokenizer.decode(out.tokens[0, :out.num_generated[0]], skip_special_tokens=True).strip(), answer_start


def optimizer(cfg: LMConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
                                                  cfg.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))


def next_token_logits(graphdef, params, inputs, embeds=None) -> jax.Array:
    """Logits [B, T, V] at every position of full-length rows inputs [B, T] (one fresh cache)."""
    model = nnx.merge(graphdef, params)
    batch_size, seq_len = inputs.shape
    cache = KVCache.for_model(model.cfg, batch_size, seq_len, jnp.float32)
    lengths = jnp.full((batch_size,), seq_len, jnp.int32)
    hidden, _ = forward_hidden(graphdef, params, cache, inputs, lengths, embeds)
    return model.logits(hidden)


def token_loss(graphdef, params, tokens, weights, embeds=None):
    """Next-token NLL of a causal LM: tokens int32 [B, T + 1] (inputs and shifted targets), weights
    float32 [B, T], embeds (inputs given as embeddings, e.g. with image features) [B, T, H] or None
    -> (weighted mean loss, unweighted mean NLL over the weighted targets)."""
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(next_token_logits(graphdef, params, tokens[:, :-1], embeds), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0), jnp.sum(nll * (weights > 0)) / jnp.maximum(
        jnp.sum(weights > 0), 1)


def _loss(params, graphdef, batch):
    return token_loss(graphdef, params, batch["tokens"], batch["weights"])


def make_train_step(loss_fn):
    """The jitted Optax step of a loss_fn(params, graphdef, batch) -> (loss, nll): (params, graphdef,
    opt_state, batch, tx) -> (params, opt_state, metrics); params and opt_state are donated."""

    @functools.partial(jax.jit, static_argnums=(1, 4), donate_argnums=(0, 2))
    def train_step(params, graphdef, opt_state, batch, tx):
        (loss, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "nll": nll,
                                                                 "grad_norm": optax.tree.norm(grads)}

    return train_step


train_step = make_train_step(_loss)


eval_loss = jax.jit(_loss, static_argnums=(1,))


def code_digit_rows(tokenizer, tasks) -> dict[str, np.ndarray]:
    """Teacher-forced rows of recall tasks (context, question, the reply) padded to one width, weight 1
    on the asked code's 4 digits only: tokens int32 [N, T + 1], weights float32 [N, T]."""
    tail = len(tokenizer(".<|end|>", add_special_tokens=False)["input_ids"])  # what follows the code
    rows = [encode_task(tokenizer, task)[0] for task in tasks]
    tokens = np.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, np.int32)
    weights = np.zeros((len(rows), tokens.shape[1] - 1), np.float32)
    for r, (ids, task) in enumerate(zip(rows, tasks)):
        tokens[r, :len(ids)] = ids
        end = len(ids) - tail
        if tokenizer.decode(ids[end - 4:end]) != task.answer:
            raise KVJaxError(f"the reply of task {r} does not end with its code, one token per digit")
        weights[r, end - 5:end - 1] = 1.0  # weight t scores the prediction of token t + 1
    return {"tokens": tokens, "weights": weights}


@functools.partial(jax.jit, static_argnums=(1,))
def digit_accuracy(params, graphdef, batch) -> jax.Array:
    """Share of the weighted targets that the argmax of the model's next-token logits gets right."""
    tokens = batch["tokens"]
    hits = jnp.argmax(next_token_logits(graphdef, params, tokens[:, :-1]), -1) == tokens[:, 1:]
    return jnp.sum(hits * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


def hf_tensors(model) -> dict[str, np.ndarray]:
    """The module's parameters under HF names ([out, in] Linear weights), float32 host arrays."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        value = np.asarray(var.get_value(), np.float32)
        if names[-1] == "kernel":
            names[-1], value = "weight", value.T
        elif names[-1] == "embedding":
            names[-1] = "weight"
        out[".".join(names)] = np.ascontiguousarray(value)
    return out


def export(model, tokenizer, cfg: LMConfig, out_dir, extra: dict) -> pathlib.Path:
    """Write the model as a HF Llama directory (bf16 safetensors, tokenizer, chat template)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.hf_config(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_tensors(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "training.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), **extra}, indent=2) + "\n")
    return out
