"""Train kvjax's default text model: a small Llama (head_dim 64, GQA) on the King James Bible
(public domain) plus seeded long-context retrieval tasks (kvjax.retrieval), then export it in HF
layout (bf16 safetensors, BPE tokenizer, chat template).

    apt-get install bible-kjv           # Debian's copy of the KJV text and its `bible` reader
    python scripts/train_default_model.py --work-dir ~/.cache/kvjax/default-lm --out kvjax/assets/default-llama

Stages, each skipped when its output exists: corpus (split by book, sha256 in corpus/manifest.json),
tokenizer, training (orbax checkpoints every --save-every steps in WORK/checkpoints; run it again
after any interruption and it resumes, bitwise, from the latest), export. Progress bar unless
--quiet; metrics in WORK/metrics.jsonl. Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

try:
    import kvjax  # noqa: F401  (installed)
except ImportError:  # a source checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kvjax.errors import KVJaxError
from training import lm, loop

# Held-out books (whole books, so no verse of them is trained on).
SPLITS = {"validation": ("Ruth", "Jonah", "Titus", "James"), "test": ("Esther", "Mark", "Philippians", "1 Peter")}
SOURCE = {"name": "King James Version of the Bible (1611)", "licence": "public domain",
          "package": "Debian bible-kjv-text (read with the bible-kjv program)"}


def corpus(work: pathlib.Path, bible_text: str | None = None) -> dict[str, str]:
    """{split: text}; written once to WORK/corpus with a manifest (source, licence, version, sha256)."""
    folder = work / "corpus"
    if (folder / "manifest.json").is_file():
        return {split: (folder / f"{split}.txt").read_text() for split in ("train", "validation", "test")}
    if bible_text is None:
        bible_text = _dump_bible()
    books = lm.parse_bible(bible_text)
    held = {book for names in SPLITS.values() for book in names}
    if missing := held - set(books):
        raise KVJaxError(f"the corpus lacks the held-out books {sorted(missing)}; is it the whole KJV?")
    texts = {"train": "\n".join(t for b, t in books.items() if b not in held),
             **{split: "\n".join(books[b] for b in names) for split, names in SPLITS.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (folder / f"{split}.txt").write_text(text)
    manifest = {**SOURCE, "version": _package_version(), "books": len(books), "splits": SPLITS,
                "sha256": {s: hashlib.sha256(t.encode()).hexdigest() for s, t in texts.items()},
                "characters": {s: len(t) for s, t in texts.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return texts


def _dump_bible() -> str:
    if shutil.which("bible") is None:
        raise KVJaxError("the `bible` program is missing: install the corpus with `apt-get install bible-kjv`")
    return subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout


def _package_version() -> str:
    found = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "bible-kjv-text"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def tokenizer(work: pathlib.Path, texts: dict[str, str], cfg: lm.LMConfig):
    from transformers import PreTrainedTokenizerFast

    folder = work / "tokenizer"
    init = pathlib.Path(cfg.init_from).expanduser()
    source = next((d for d in (init, init / "tokenizer") if cfg.init_from and (d / "tokenizer.json").is_file()), None)
    if not (folder / "tokenizer.json").is_file() and source is not None:  # the weights' own tokenizer
        PreTrainedTokenizerFast.from_pretrained(str(source)).save_pretrained(folder)
    elif not (folder / "tokenizer.json").is_file():
        lm.train_tokenizer(texts["train"].splitlines(keepends=True), cfg.vocab_size).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="~/.cache/kvjax/default-lm", help="corpus, tokenizer, checkpoints, metrics")
    p.add_argument("--out", help="export the trained model here (HF directory)")
    loop.add_run_flags(p, lm.LMConfig, save_every=200, eval_every=500)
    return p.parse_args(argv)


def main(argv=None, *, bible_text: str | None = None) -> int:
    args = parse_args(argv)
    try:
        from training.lm_run import latest_model, train

        work = pathlib.Path(args.work_dir).expanduser()
        cfg = loop.config_from_flags(args, lm.LMConfig, work)
        texts = corpus(work, bible_text)
        extra = {}
        if args.export_latest:
            model, step = latest_model(work, cfg, tokenizer(work, texts, cfg))
            extra = {"steps_done": step}
        else:
            model = train(work, texts, tokenizer(work, texts, cfg), cfg, save_every=args.save_every,
                          eval_every=args.eval_every, stop_after=args.stop_after, quiet=args.quiet)
        if args.out and model is not None:
            manifest = json.loads((work / "corpus" / "manifest.json").read_text())
            extra["stages"] = loop.stages(work)
            out = lm.export(model, tokenizer(work, texts, cfg), cfg, args.out, {"data": manifest, **extra})
            print(f"wrote {out}", file=sys.stderr)
    except KVJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
