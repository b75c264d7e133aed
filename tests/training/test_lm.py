"""The default model's pretraining pipeline on a tiny config: corpus parsing, deterministic batches
with retrieval tasks, a resumed run bitwise equal to an uninterrupted one, and the HF export
loading through kvjax.load with the trained model's logits."""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import retrieval
from kvjax.testing import DEMO_TEXT
from training import lm
from training.lm_run import new_model, train

DUMP = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep.

Genesis 2

  1 Thus the heavens and the earth were finished.

1 Samuel 1

  1 Now there was a certain man.
"""
CFG = lm.LMConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=16, seq_len=96, batch_size=2, steps=4, warmup_steps=1)


def test_bible_dump_parses_into_books_of_chapters():
    books = lm.parse_bible(DUMP)
    assert list(books) == ["Genesis", "1 Samuel"]
    assert books["Genesis"].split("\n") == [
        "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
        "darkness was upon the face of the deep.", "Thus the heavens and the earth were finished."]


def test_retrieval_tasks_are_seeded_and_hold_their_answer():
    sentences = retrieval.sentences(DEMO_TEXT)
    task = retrieval.key_value_recall(sentences, 3, num_records=4, num_words=120)
    assert task == retrieval.key_value_recall(sentences, 3, num_records=4, num_words=120)
    assert task.context.count("The code of ") == 4 and f"is {task.answer}." in task.context
    assert task.question == f"What is the code of {task.name}?"
    assert task.reply == f"The code of {task.name} is {task.answer}." and task.reply in task.context
    assert (task.name, task.answer) in task.records and len(task.records) == 4
    wrong = str((int(task.answer) - 999) % 9000 + 1000)  # another 4-digit code
    assert task.is_answered_by(task.reply) and task.is_answered_by(f"{task.answer}")
    assert not task.is_answered_by(f"The code is {wrong}.") and not task.is_answered_by(f"1{task.answer}")
    assert not task.is_answered_by("I do not know")
    first = retrieval.needle(sentences, 0, depth=0.0, num_words=80)
    last = retrieval.needle(sentences, 0, depth=1.0, num_words=80)
    assert first.context.startswith("The code of ") and last.context.endswith(f"is {last.answer}.")
    with pytest.raises(kvjax.KVJaxError, match="depth"):
        retrieval.needle(sentences, 0, depth=1.5)


@pytest.fixture(scope="module")
def tokenizer():
    return lm.train_tokenizer(DEMO_TEXT.splitlines(keepends=True), CFG.vocab_size)


def test_batches_are_deterministic_and_weigh_every_reply(tokenizer):
    cfg = dataclasses.replace(CFG, seq_len=256, retrieval_share=1.0, questions=3, max_records=3, short_seq_len=128,
                              short_share=0.5)
    batches = lm.Batches(tokenizer, DEMO_TEXT, cfg)
    one, again = batches(5), batches(5)
    np.testing.assert_array_equal(one["tokens"], again["tokens"])
    assert not np.array_equal(one["tokens"], batches(6)["tokens"])
    shapes = {batches(step)["tokens"].shape for step in range(12)}  # short steps: twice the rows, half the length
    assert shapes == {(2, 257), (4, 129)}
    follow_ups, rows = 0, [(r, w) for b in map(batches, range(12)) for r, w in zip(b["tokens"], b["weights"])]
    for row, weights in rows:
        is_reply = weights == cfg.answer_weight  # weights[t] scores the prediction of tokens[t + 1]
        replies = tokenizer.decode(row[1:][is_reply]).split("<|end|>")[:-1]
        assert replies, "every row is a task with an answer"
        text = tokenizer.decode(row[row != tokenizer.pad_token_id])
        assert len(replies) >= text.count("<|assistant|>") - 1  # every turn's reply weighs (the last may be cut)
        follow_ups += len(replies) > 1
        for reply in replies:  # each reply is a record of this row's context, asked in the turn before it
            name = reply.removeprefix("The code of ").split(" is ")[0]
            assert reply.startswith("The code of ") and reply in text.split("<|assistant|>")[0]
            assert f"What is the code of {name}?<|end|>\n<|assistant|>\n{reply}<|end|>" in text
    assert follow_ups, "some row asks a follow-up question"


def test_resumed_run_equals_an_uninterrupted_one_and_exports(tmp_path, tokenizer):
    texts = {"train": DEMO_TEXT, "validation": DEMO_TEXT}
    whole = train(tmp_path / "whole", texts, tokenizer, CFG, save_every=2, eval_every=4, quiet=True)
    assert train(tmp_path / "cut", texts, tokenizer, CFG, save_every=2, eval_every=4, stop_after=2, quiet=True) is None
    resumed = train(tmp_path / "cut", texts, tokenizer, CFG, save_every=2, eval_every=4, quiet=True)
    for a, b in zip(nnx.to_flat_state(nnx.state(whole)), nnx.to_flat_state(nnx.state(resumed))):
        np.testing.assert_array_equal(np.asarray(a[1].get_value()), np.asarray(b[1].get_value()))
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert {"recall_acc", "digit_acc_r1", "digit_acc_r8"} <= set(json.loads(lines[-1]))
    with pytest.raises(kvjax.KVJaxError, match="other settings"):
        train(tmp_path / "cut", texts, tokenizer, dataclasses.replace(CFG, lr=0.5), save_every=2, eval_every=4)

    out = lm.export(whole, tokenizer, CFG, tmp_path / "export", {"data": "test"})
    model, tok, cfg = kvjax.load(out, dtype="float32")
    assert cfg.head_dim == 16 and cfg.tie_word_embeddings and tok.chat_template == lm.CHAT_TEMPLATE
    ids = np.asarray(tok("In the beginning")["input_ids"], np.int32)[None]
    want, _ = kvjax.prefill(whole, kvjax.KVCache.for_model(whole.cfg, 1, 32), ids)
    got, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 32), ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.05)  # bf16 weights


def test_stages_record_each_run_the_model_grew_from(tmp_path):
    """training.json's recipe of a staged model: every --init-from link, oldest first, each with its
    settings and the checkpoint step it passed on (not a metrics line logged past it)."""
    from training.loop import stages

    links = {"a": str(tmp_path / "exported"), "b": str(tmp_path / "a"), "c": str(tmp_path / "b")}
    for name, steps in (("a", (50, 100)), ("b", (300,)), ("c", (20,))):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        for step in steps:
            (tmp_path / name / "checkpoints" / str(step)).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"lr": 0.1, "init_from": links[name]}))
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": steps[-1] + 7}) + "\n")
    chain = stages(tmp_path / "c")
    assert chain[0] == {"init_from": str(tmp_path / "exported")}
    assert [(s["work_dir"], s["steps_done"], s["settings"]["init_from"]) for s in chain[1:]] == [
        ("a", 100, links["a"]), ("b", 300, links["b"]), ("c", 20, links["c"])]


def test_copy_rows_repeat_a_span_and_weigh_only_the_repeats(tokenizer):
    batches = lm.Batches(tokenizer, DEMO_TEXT, dataclasses.replace(CFG, copy_share=1.0))
    for row, weights in zip(*batches(3).values()):
        period = next(p for p in range(8, len(row)) if np.array_equal(row[p:], row[:len(row) - p]))
        assert (row >= len(lm.SPECIAL_TOKENS)).all() and len(set(row[:period].tolist())) > 1
        stream = batches.stream  # the span is a piece of the prose
        assert any(np.array_equal(row[:period], stream[i:i + period]) for i in range(len(stream) - period))
        assert not weights[:period - 1].any() and weights[period - 1:].all()


def test_validation_batch_is_prose_only_whatever_the_training_mix(tokenizer):
    mix = dataclasses.replace(CFG, copy_share=0.5, retrieval_share=0.5, short_seq_len=48, short_share=1.0)
    batch = lm.prose_batch(tokenizer, DEMO_TEXT, mix)
    assert batch["tokens"].shape == (CFG.batch_size, CFG.seq_len + 1) and (batch["weights"] == 1.0).all()
    np.testing.assert_array_equal(batch["tokens"], lm.prose_batch(tokenizer, DEMO_TEXT, CFG)["tokens"])


def test_digit_accuracy_scores_the_asked_codes_digits_by_the_models_argmax(tokenizer):
    tasks = [retrieval.key_value_recall(retrieval.sentences(DEMO_TEXT), i, num_records=2, num_words=10)
             for i in range(3)]
    batch = lm.code_digit_rows(tokenizer, tasks)
    for row, weights, task in zip(batch["tokens"], batch["weights"], tasks):
        assert tokenizer.decode(row[1:][weights > 0]) == task.answer and weights.sum() == 4
    model = new_model(CFG, tokenizer)
    lengths = np.asarray([len(lm.encode_task(tokenizer, t)[0]) for t in tasks], np.int32)
    tokens = batch["tokens"].copy()
    argmax = lambda: np.asarray(kvjax.prefill(  # noqa: E731  (the serving path, every position's logits)
        model, kvjax.KVCache.for_model(model.cfg, 3, tokens.shape[1]), tokens, lengths, all_logits=True)[0]).argmax(-1)
    last = lengths - 3  # the last digit (before "." and <|end|>)
    tokens[np.arange(3), last] = argmax()[np.arange(3), last - 1]  # forced right: an accuracy of at least 1/4
    hits = argmax()[:, :-1] == tokens[:, 1:]
    want = hits[batch["weights"] > 0].mean()
    graphdef, params = nnx.split(model)
    got = float(lm.digit_accuracy(params, graphdef, {"tokens": tokens, "weights": batch["weights"]}))
    assert want >= 0.25 and got == pytest.approx(want)
