"""Kept-token parity between kvjax presses and NVIDIA kvpress on one tiny random Llama.

kvpress 0.5.5 needs transformers < 5.3, so it lives in its own venv:

    python3 -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0 transformers==5.2.0 kvpress==0.5.5
    python scripts/kvpress_parity.py --kvpress-python /tmp/kvpress-venv/bin/python --json parity.json

The project venv writes the model (transformers save_pretrained, init std 0.2, distinct tokens: see
shared/reference/kvpress-presses.md §6.2) and computes kvjax's kept sets; the kvpress venv runs
`python kvpress_parity.py --run-kvpress DIR` on the same files and reports kvpress's kept sets,
found by matching every kept cache row to the full-prefill row with identical K and V (§6.3).
Exit status 1 if any (press, ratio, layer, head) set differs.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RATIOS = (0.25, 0.5, 0.75)
CASES = {  # kvpress class -> (kvjax registry name, kwargs)
    "KnormPress": ("knorm", {}),
    "StreamingLLMPress": ("streaming_llm_press", {}),
    "SnapKVPress": ("snapkv", {"window_size": 8}),
    "PyramidKVPress": ("pyramidkv", {"window_size": 8}),  # per-layer budgets
    "ExpectedAttentionPress": ("expected_attention", {}),
    "TOVAPress": ("tova", {}),
    "ObservedAttentionPress": ("observed_attention", {}),
}
PROMPT_LEN = 64


def run_kvpress(model_dir: Path) -> dict:
    """In the kvpress venv: {"Class@ratio": [layer][head] sorted kept indices}."""
    import kvpress
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    prompt = torch.tensor([json.loads((model_dir / "prompt.json").read_text())])
    out = {}
    for impl in ("sdpa", "eager"):  # ObservedAttention needs eager weights
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=impl).eval()
        full = DynamicCache()
        with torch.no_grad():
            model.model(input_ids=prompt, past_key_values=full)
        for cls, (_, kwargs) in CASES.items():
            if (cls == "ObservedAttentionPress") != (impl == "eager"):
                continue
            for ratio in RATIOS:
                cache = DynamicCache()
                with torch.no_grad(), getattr(kvpress, cls)(compression_ratio=ratio, **kwargs)(model):
                    model.model(input_ids=prompt, past_key_values=cache)
                out[f"{cls}@{ratio}"] = [_kept_rows(full.layers[i], cache.layers[i]) for i in range(len(cache.layers))]
    return out


def _kept_rows(full, kept) -> list:
    sets = []
    for head in range(kept.keys.shape[1]):
        rows = []
        for k, v in zip(kept.keys[0, head], kept.values[0, head]):
            same = ((full.keys[0, head] == k).all(-1) & (full.values[0, head] == v).all(-1)).nonzero().flatten()
            if len(same) != 1:
                raise RuntimeError(f"kept row matches {len(same)} original rows")
            rows.append(int(same[0]))
        sets.append(sorted(rows))
    return sets


def kvjax_sets(model_dir: Path) -> dict:
    """In the project venv: the same keys from kvjax.presses.kept_tokens."""
    import numpy as np

    import kvjax
    from kvjax.compression import prefill_observing as prefill
    from kvjax.compression.presses import get_press, kept_tokens

    model, _, cfg = kvjax.load(model_dir, dtype="float32", tokenizer=False)
    prompt = np.asarray(json.loads((model_dir / "prompt.json").read_text()), np.int32)
    out = {}
    for cls, (name, kwargs) in CASES.items():
        for ratio in RATIOS:
            press = get_press(name, compression_ratio=ratio, **kwargs)
            _, cache, obs = prefill(model, kvjax.KVCache.for_model(cfg, 1, PROMPT_LEN), prompt[None], press=press)
            kept = kept_tokens(cache, press, obs)
            out[f"{cls}@{ratio}"] = [[np.flatnonzero(h).tolist() for h in layer[0]] for layer in kept]
    return out


def write_model(model_dir: Path, seed: int = 0) -> None:
    import numpy as np
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(model_dir)
    prompt = np.random.default_rng(seed).permutation(np.arange(3, 128))[:PROMPT_LEN]
    (model_dir / "prompt.json").write_text(json.dumps(prompt.tolist()))


def compare(kvpress_python: str, model_dir: Path) -> dict:
    """Run both sides; returns {"Class@ratio": {"match": bool, "n_kept": int}}."""
    write_model(model_dir)
    done = subprocess.run([kvpress_python, __file__, "--run-kvpress", str(model_dir)], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"kvpress side failed:\n{done.stderr[-3000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = kvjax_sets(model_dir)
    return {key: {"match": ours[key] == theirs[key], "n_kept": len(theirs[key][0][0])} for key in theirs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvpress-python", help="python of a venv with kvpress 0.5.5 installed")
    parser.add_argument("--run-kvpress", type=Path, help=argparse.SUPPRESS)  # the kvpress-venv side
    parser.add_argument("--json", type=Path, help="write the result table here")
    args = parser.parse_args(argv)
    if args.run_kvpress:
        print(json.dumps(run_kvpress(args.run_kvpress)))
        return 0
    if not args.kvpress_python:
        parser.error("--kvpress-python is required")
    with tempfile.TemporaryDirectory() as tmp:
        result = compare(args.kvpress_python, Path(tmp))
    for key, row in result.items():
        print(f"{key:32s} n_kept={row['n_kept']:3d} {'same sets' if row['match'] else 'DIFFERENT'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(row["match"] for row in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
