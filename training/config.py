"""TrainConfig: every setting of a training run, one frozen dataclass; CLI flags are built from it.

A `--config` file (JSON, or YAML since pyyaml is installed) carries the same keys as the flags
(`compression_factor` or `compression-factor`); flags given on the command line win.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from kvjax.errors import KVJaxError

COMPRESSORS = ("decouple", "hybrid")
POSITIONS = ("original", "compressed")
LOSSES = ("kl", "fastcache")
DTYPES = ("float32", "bfloat16")
DEMOS = ("llava", "minicpmv")


def _opt(default, help: str, choices=None, kind=None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "type": kind})


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
    model_dir: str | None = _opt(None, "HF model directory (default: the built-in demo Llama)", kind=str)
    data: str | None = _opt(None, "LLaVA-style .json or text .jsonl (default: the built-in demo dataset)", kind=str)
    demo: str | None = _opt(None, "train a built-in demo VLM on the demo image dataset (unless --model-dir/--data "
                            "say otherwise)", DEMOS, str)
    image_root: str | None = _opt(None, "directory the data's image paths are relative to", kind=str)
    out: str = _opt("kvjax_train_out", "output directory (checkpoints, metrics.jsonl, compressor/)")
    compressor: str | None = _opt(None, "decouple (image+text MLPs) or hybrid (text MLPs only); "
                                  "default: hybrid for text data", COMPRESSORS, str)
    init_compressor: str | None = _opt(None, "start from this compressor checkpoint", kind=str)
    compression_factor: int = _opt(5, "tokens merged into one")
    min_seq_len: int = _opt(2, "spans with fewer groups stay uncompressed")
    keep_last: int = _opt(0, "each prompt's last N tokens (the question) stay uncompressed; 0: FastCache's CCM")
    dropout: float = _opt(0.4, "compressor dropout while training (FastCache: 0.4)")
    positions: str = _opt("original", "RoPE positions after compression (DESIGN.md)", POSITIONS)
    epochs: int = _opt(3, "passes over the training split")
    batch_size: int = _opt(4, "examples per step")
    accumulate: int = _opt(1, "micro-batches per optimizer update (optax.MultiSteps)")
    lr: float = _opt(5e-4, "Adam learning rate")
    clip_norm: float = _opt(1.0, "clip gradients to this global norm (0 = off)")
    plateau_factor: float = _opt(0.5, "learning-rate factor when validation loss plateaus")
    plateau_patience: int = _opt(2, "validations without improvement before the factor applies")
    loss: str = _opt("kl", "kl: KL(teacher||student); fastcache: FastCache's CE/JS/L1/hidden composite", LOSSES)
    kl_weight: float | None = _opt(None, "weight of the KL term (default from --loss)", kind=float)
    ce_weight: float | None = _opt(None, "weight of CE against the top-p teacher (default from --loss)", kind=float)
    js_weight: float | None = _opt(None, "weight of the JS term (default from --loss)", kind=float)
    l1_weight: float | None = _opt(None, "weight of the L1 term (default from --loss)", kind=float)
    hidden_weight: float | None = _opt(None, "weight of hidden-state MSE+cosine (default from --loss)", kind=float)
    temperature: float = _opt(1.0, "KL temperature")
    top_p: float = _opt(0.9, "top-p of the truncated teacher in the CE term")
    val_ratio: float = _opt(0.2, "fraction of examples held out for validation")
    seed: int = _opt(0, "seed of the split, shuffles, init and dropout")
    save_every: int = _opt(50, "checkpoint every N steps (and at the end)")
    max_context_len: int = _opt(512, "keep the last N context tokens")
    max_answer_len: int = _opt(128, "keep the first N answer tokens")
    min_bucket: int = _opt(32, "smallest padded context length (contexts pad to powers of two)")
    max_examples: int | None = _opt(None, "use only the first N records", kind=int)
    dtype: str = _opt("float32", "backbone (and compressor) dtype", DTYPES)
    resume: bool = _opt(False, "continue the run in --out from its latest checkpoint")
    overwrite: bool = _opt(False, "replace an existing --out")
    quiet: bool = _opt(False, "no progress bar")
    stop_after: int | None = _opt(None, "stop (checkpointed) after N steps, as if interrupted", kind=int)

    def __post_init__(self):
        positive = ("compression_factor", "epochs", "batch_size", "accumulate", "save_every", "max_context_len",
                    "max_answer_len", "min_bucket", "max_examples", "stop_after", "plateau_patience")
        for name in positive:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise KVJaxError(f"{name} must be a positive integer, got {value!r}")
        for name in ("min_seq_len", "keep_last"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise KVJaxError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name, low, high in (("lr", 0, None), ("val_ratio", 0, 1), ("plateau_factor", 0, 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (value > low and (high is None or value < high)):
                raise KVJaxError(f"{name} must be a number in ({low}, {high or 'inf'}), got {value!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise KVJaxError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.clip_norm, (int, float)) or self.clip_norm < 0:
            raise KVJaxError(f"clip_norm must be >= 0, got {self.clip_norm!r}")
        for f in dataclasses.fields(self):
            if f.metadata["choices"] and getattr(self, f.name) is not None \
                    and getattr(self, f.name) not in f.metadata["choices"]:
                raise KVJaxError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}; "
                                 f"got {getattr(self, f.name)!r}")
        if self.resume and self.overwrite:
            raise KVJaxError("--resume and --overwrite contradict each other; pass one")

    @classmethod
    def from_mapping(cls, values: dict, source: str = "config") -> TrainConfig:
        """Build from a dict whose keys may use dashes; unknown keys and wrong types raise."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise KVJaxError(f"{source}: unknown key {key!r}; known keys: {', '.join(fields)}")
            kind = type(fields[name].default) if fields[name].metadata["type"] is None else fields[name].metadata["type"]
            is_bool = isinstance(value, bool)
            ok = value is None or (isinstance(value, kind) and (kind is bool or not is_bool)) \
                or (kind is float and isinstance(value, int) and not is_bool)
            if not ok:
                raise KVJaxError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
            clean[name] = float(value) if kind is float and value is not None else value
        return cls(**clean)


def read_config_file(path) -> dict:
    """A JSON or YAML mapping of config keys."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise KVJaxError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # noqa: PLC0415 (only YAML configs need it)

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json and yaml raise different types; both mean "not parseable"
        raise KVJaxError(f"config file {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                         f"{str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise KVJaxError(f"config file {path} must hold a mapping of keys to values")
    return data
