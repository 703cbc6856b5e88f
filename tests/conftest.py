"""Shared fixtures: tiny models saved as real local model directories (config +
safetensors + tokenizer, random weights, exact architectures) and tiny datasets."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
# An installed-looking third-party method package (a .dist-info with an entry point), so
# the registry discovers it exactly as it would discover one from PyPI.
sys.path.insert(0, str(PLUGINS))
WORDS = (
    "the a movie film book phone service staff food room battery screen was is it this very really "
    "good great excellent lovely fine bad awful terrible poor broken slow quick friendly rude and but not "
    "i we they loved hated liked enjoyed"
).split()
POSITIVE = {"good", "great", "excellent", "lovely", "fine", "quick", "friendly", "loved", "liked", "enjoyed"}
NEGATIVE = {"bad", "awful", "terrible", "poor", "broken", "slow", "rude", "hated"}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# Under pytest-xdist (the README's `pytest -n auto`) each worker trains with its share of
# the cores: two workers on two cores each run one OpenMP thread, instead of four threads
# spinning against each other. Set before torch is imported; the runs a test starts inherit it.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, _cores // WORKERS)))


# The longest tests (the real MiniLM trained on the quickstart, minutes each): first of all.
LONGEST = ("test_quickstart.py", "test_quickstart_methods.py")


def pytest_collection_modifyitems(config, items):
    """Under pytest -n N (with --maxschedchunk 1: each worker takes the next test when it
    is free) the longest tests start first, then the other slow end-to-end ones
    (``@pytest.mark.slow``), so that none of them is left running alone at the end;
    otherwise the files' order."""
    if WORKERS > 1:
        items.sort(key=lambda item: (item.path.name not in LONGEST, item.get_closest_marker("slow") is None))


def default_sigint() -> None:
    """``preexec_fn`` of a child process the test sends SIGINT (Ctrl-C): the default
    handler, so Python raises KeyboardInterrupt in it even when the shell that started
    pytest ignores SIGINT (as a non-interactive shell does for a background job) and the
    child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tiny_config(model_type: str, **overrides):
    """A small config of the exact architecture (random weights are built from it)."""
    import transformers

    common = dict(vocab_size=len(SPECIAL) + len(WORDS), num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
                  intermediate_size=24, max_position_embeddings=64)
    if model_type == "bert":
        cfg = transformers.BertConfig(**common, type_vocab_size=2)
    elif model_type == "roberta":
        cfg = transformers.RobertaConfig(**common, type_vocab_size=1, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    elif model_type == "deberta-v2":
        cfg = transformers.DebertaV2Config(**common, type_vocab_size=0, relative_attention=True, position_buckets=16,
                                           pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False)
    elif model_type == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=common["vocab_size"], n_layer=2, n_head=2, n_embd=16, n_positions=64,
                                      bos_token_id=2, eos_token_id=3, pad_token_id=0)
    elif model_type == "llama":
        cfg = transformers.LlamaConfig(vocab_size=common["vocab_size"], num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, hidden_size=16, intermediate_size=24,
                                       max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    else:
        raise ValueError(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_classifier(model_type: str, seed: int = 0, num_labels: int = 3):
    """A random-weight sequence classifier of the exact architecture, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=num_labels)).eval()


def token_batch(seed: int = 3) -> dict:
    """Three sequences of random in-vocabulary ids, one of them padded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def save_tiny_backbone(directory: Path, model_type: str = "bert", seed: int = 0) -> Path:
    """Write a random-weight backbone (base model, no task head) and a WordPiece tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(model_type)
    model = transformers.AutoModel.from_config(cfg)
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(directory)
    return directory


def write_sentiment_data(directory: Path, n_train: int = 96, n_eval: int = 32, seed: int = 0,
                         neutral_words: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """Rows of neutral words and one cue word; 5 neutral words each, or a number drawn from
    the ``neutral_words`` range (both ends included) for rows of varied lengths."""
    rng = random.Random(seed)
    neutral = [w for w in WORDS if w not in POSITIVE | NEGATIVE]
    paths = []
    for split, n in (("train", n_train), ("validation", n_eval)):
        path = directory / f"{split}.jsonl"
        with path.open("w") as f:
            for i in range(n):
                label = "positive" if i % 2 == 0 else "negative"
                cue = rng.choice(sorted(POSITIVE if label == "positive" else NEGATIVE))
                count = 5 if neutral_words is None else rng.randint(*neutral_words)
                words = rng.sample(neutral, count) + [cue]
                rng.shuffle(words)
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory) -> tuple[Path, Path]:
    return write_sentiment_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def make_recipe(tmp_path):
    """Write a recipe file from YAML text (dedented) and return its path."""

    def make(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return make


def tiny_recipe_text(backbone: Path, data: tuple[Path, Path]) -> str:
    """The YAML of a valid recipe training LoRA on a tiny backbone for two short epochs."""
    train, validation = data
    return textwrap.dedent(f"""
        name: tiny
        backbone: {{name: {backbone}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 4, alpha: 8}}
        task:
          name: classification
          data: {{train: {train}, validation: {validation}}}
          max_length: 16
        training: {{learning_rate: 1e-2, epochs: 2, batch_size: 16, seed: 0, log_every: 2}}
        """)


@pytest.fixture
def tiny_recipe(make_recipe, tiny_bert, sentiment_data):
    """A valid recipe training LoRA on the tiny BERT (extra YAML is appended)."""

    def make(extra: str = "", name: str = "recipe.yaml") -> Path:
        return make_recipe(tiny_recipe_text(tiny_bert, sentiment_data) + textwrap.dedent(extra), name)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads; one keeps a module cheap on busy cores
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quality():
    """bench/quality.py as a module (registered in sys.modules: its dataclasses look their
    module up), for tests of its logic and of its PEFT loop."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
