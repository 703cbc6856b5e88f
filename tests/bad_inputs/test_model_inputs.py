"""Bad model directories, targets, ranks and lengths: each gives one clear error line
(exit 1, no traceback), and no code from a model or dataset directory ever runs.

The "custom code" directories carry a Python module whose import writes a marker file;
``lrr`` gets ``y`` on standard input (transformers' "trust remote code?" prompt would
read it), and the marker must never appear.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from tests.bad_inputs.harness import assert_clean_error, lrr, snapshot
from tests.conftest import save_tiny_backbone, tiny_config, tiny_recipe_text

TRUST = "lrr runs no code from model files unless the recipe sets backbone.trust_remote_code: true (read that code first)"


# --- building bad model directories ---------------------------------------------------------

@pytest.fixture
def clean(tiny_bert) -> Path:
    """The session's clean tiny BERT directory (never modified: model_dir copies it)."""
    return tiny_bert


@pytest.fixture
def model_dir(clean, tmp_path):
    """A fresh copy of the clean tiny BERT directory, to break."""
    def copy(name: str = "model") -> Path:
        target = tmp_path / name
        shutil.copytree(clean, target)
        return target
    return copy


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def plant_code(directory: Path, marker: Path, module: str = "custom_model") -> None:
    """A modeling file whose import writes ``marker`` (and defines classes transformers
    could use, so only the refusal stops it)."""
    (directory / f"{module}.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("code from the model directory ran")
        from transformers import BertConfig, BertModel, BertTokenizer
        class CustomConfig(BertConfig):
            model_type = "custom-bert"
        class CustomModel(BertModel):
            config_class = CustomConfig
        class CustomTokenizer(BertTokenizer):
            pass
    """))


def custom_config_dir(model_dir, marker: Path, model_type: str = "custom-bert") -> Path:
    d = model_dir("custom")
    plant_code(d, marker)
    edit_json(d / "config.json", model_type=model_type, auto_map={
        "AutoConfig": "custom_model.CustomConfig", "AutoModel": "custom_model.CustomModel",
        "AutoModelForSequenceClassification": "custom_model.CustomModel"})
    return d


@pytest.fixture
def recipe(tmp_path, sentiment_data):
    """A valid tiny recipe on ``backbone`` (extra YAML appended, --set style keys inline)."""
    def make(backbone, extra: str = "", name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(tiny_recipe_text(Path(backbone), sentiment_data) + textwrap.dedent(extra))
        return path
    return make


# --- 1. no code from model or dataset directories --------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "run", "export"])
def test_custom_modeling_code_never_runs_even_when_stdin_says_yes(command, model_dir, recipe, tmp_path, tiny_run):
    marker = tmp_path / "MARKER"
    custom = custom_config_dir(model_dir, marker)
    if command == "export":
        args = ["export", tiny_run, "--merge", "--out", tmp_path / "merged", "--backbone", custom]
    else:
        args = [command, recipe(custom)] + (["--output", tmp_path / "run"] if command == "run" else [])
    result = lrr(*args, subprocess=True, input="y\n" * 3, timeout=180)
    assert_clean_error(result, f"{custom}/config.json: auto_map asks to run Python code from the model "
                               f"(custom_model.py); {TRUST}", code=1)
    assert "[y/N]" not in result.output  # transformers never prompted
    assert not marker.exists()
    assert not (tmp_path / "merged").exists()


def test_custom_code_of_a_hub_model_never_runs(model_dir, recipe, tmp_path):
    """A hub repository with auto_map (from the local hub cache, offline): refused the same way."""
    marker = tmp_path / "MARKER"
    custom = custom_config_dir(model_dir, marker)
    snapshot_dir = tmp_path / "hub" / "models--acme--custom" / "snapshots" / "0123abcd"
    shutil.copytree(custom, snapshot_dir)
    (snapshot_dir.parent.parent / "refs").mkdir()
    (snapshot_dir.parent.parent / "refs" / "main").write_text("0123abcd")
    result = lrr("inspect", recipe("acme/custom"), subprocess=True, input="y\n",
                 env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert_clean_error(result, "acme/custom@main (hub): config.json: auto_map asks to run Python code from the model "
                               f"(custom_model.py); {TRUST}", code=1)
    assert not marker.exists()


def test_auto_map_on_a_known_model_type_is_refused_too(model_dir, recipe, tmp_path):
    marker = tmp_path / "MARKER"
    custom = custom_config_dir(model_dir, marker, model_type="bert")  # transformers would silently use its own bert
    result = lrr("inspect", recipe(custom), input="y\n")
    assert_clean_error(result, f"{custom}/config.json: auto_map asks to run Python code from the model "
                               f"(custom_model.py); {TRUST}, or delete auto_map from config.json to use "
                               "transformers' own 'bert' code", code=1)
    assert not marker.exists()


def test_custom_tokenizer_code_never_runs(model_dir, recipe, tmp_path):
    marker = tmp_path / "MARKER"
    d = model_dir()
    plant_code(d, marker, "custom_tokenizer")
    edit_json(d / "tokenizer_config.json", tokenizer_class="CustomTokenizer",
              auto_map={"AutoTokenizer": ["custom_tokenizer.CustomTokenizer", None]})
    result = lrr("run", recipe(d), "--output", tmp_path / "run", input="y\n")
    assert_clean_error(result, f"{d}/tokenizer_config.json: auto_map asks to run Python code from the model "
                               f"(custom_tokenizer.py); {TRUST}", code=1)
    assert not marker.exists()


def test_tokenizer_code_named_by_config_json_never_runs(model_dir, recipe, tmp_path):
    marker = tmp_path / "MARKER"
    d = model_dir()
    plant_code(d, marker, "custom_tokenizer")
    (d / "tokenizer_config.json").unlink()
    edit_json(d / "config.json", auto_map={"AutoTokenizer": ["custom_tokenizer.CustomTokenizer", None]})
    result = lrr("run", recipe(d), "--output", tmp_path / "run", input="y\n")
    assert_clean_error(result, f"{d}/config.json: auto_map asks to run Python code from the model "
                               f"(custom_tokenizer.py); {TRUST}, or delete auto_map from config.json to use "
                               "transformers' own 'bert' code", code=1)
    assert not marker.exists()


def test_trust_remote_code_opts_in(model_dir, recipe, tmp_path):
    """The recipe key is the one way to run a model's code, and it does run it."""
    marker = tmp_path / "MARKER"
    custom = custom_config_dir(model_dir, marker)
    result = lrr("inspect", recipe(custom), "--set", "backbone.trust_remote_code=true", "--set", "targets=[re:query]",
                 "--json")
    assert result.code == 0, result.output
    assert marker.exists()
    assert json.loads(result.stdout)["runs"][0]["model_type"] == "custom-bert"


def test_a_dataset_loading_script_never_runs(tmp_path, clean, make_recipe):
    marker = tmp_path / "MARKER"
    dataset = tmp_path / "scripted"
    dataset.mkdir()
    (dataset / "scripted.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    path = make_recipe(f"""
        name: scripted
        backbone: {{name: {clean}}}
        targets: [Wq]
        method: {{name: lora, r: 2}}
        task: {{name: sst2, dataset: {dataset}, max_length: 16}}
        """)
    result = lrr("inspect", path, input="y\n")
    assert_clean_error(result, code=1, contains=("Dataset scripts are no longer supported, but found scripted.py",))
    assert not marker.exists()


# --- 2. pickles and broken model files ---------------------------------------------------------

def test_a_malicious_pickle_is_never_unpickled(model_dir, recipe, tmp_path):
    import torch

    marker = tmp_path / "MARKER"
    d = model_dir()
    (d / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (Path(marker).write_text, ("unpickled",))

    torch.save({"bert.embeddings.word_embeddings.weight": Payload()}, d / "pytorch_model.bin")
    result = lrr("run", recipe(d), "--output", tmp_path / "run")
    assert_clean_error(result, code=1, contains=(
        f"backbone '{d}': {d}: its pytorch_model.bin is a pickle holding more than tensors, and lrr reads pickles "
        "only with torch's weights_only loader, which refused it (it calls the Python object getattr); ",
        "if you trust the file, convert it to safetensors once"))
    assert "will likely succeed" not in result.output and "add_safe_globals" not in result.output
    assert not marker.exists()


def test_plain_tensor_pickles_still_load(model_dir):
    """weights_only reads an ordinary pytorch_model.bin (older checkpoints) unchanged."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from lowrank_runner import backbones

    d = model_dir()
    state = load_file(d / "model.safetensors")
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    ref = backbones.resolve({"name": str(d)})
    model, info = backbones.load_model(transformers.AutoModel, ref, backbones.load_config(ref))
    assert torch.equal(model.embeddings.word_embeddings.weight, state["embeddings.word_embeddings.weight"])


def as_pickle(damage):
    """The weights as a pytorch_model.bin (torch.save's zip archive), then damaged."""
    def convert(d):
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
        path = d / "pytorch_model.bin"
        path.write_bytes(damage(path.read_bytes()))
    return convert


def break_config(text: str):
    return lambda d: (d / "config.json").write_text(text)


def change_config(**changes):
    return lambda d: edit_json(d / "config.json", **changes)


def truncate(name: str, keep: float):
    def cut(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])
    return cut


def shard(d):
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


# (case id, how to break the copy, command, expected line with {d} for the directory)
BROKEN = [
    ("config-invalid-json", break_config('{"model_type": "bert",\n  "hidden_size": 16,,\n}'), "inspect",
     "{d}/config.json:2:21: not valid JSON (Expecting property name enclosed in double quotes); fix the file or restore "
     "it from the model's source"),
    ("config-not-an-object", break_config("[1, 2]"), "inspect",
     "{d}/config.json: expected a JSON object ({{...}}), found a list"),
    ("config-not-utf8", lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00garbage"), "inspect",
     "{d}/config.json: not UTF-8 text (is it a JSON file?); restore it from the model's source"),
    ("config-no-model-type", change_config(model_type=None), "inspect",
     '{d}/config.json: no model_type (e.g. "model_type": "bert"); transformers needs it to know the architecture: '
     "restore config.json from the model's source"),
    ("config-unknown-model-type", change_config(model_type="bertish"), "inspect",
     "{d}/config.json: model_type 'bertish' is not an architecture transformers {tv} knows; upgrade transformers or "
     "fix config.json"),
    ("config-wrong-value-type", change_config(hidden_size="big"), "inspect",
     ("cannot load the config.json of backbone '{d}' from {d}", "Field 'hidden_size' expected int, got str")),
    ("config-unknown-dtype", change_config(dtype="bogus"), "inspect",
     ("cannot load the config.json of backbone '{d}' from {d}: AttributeError: module 'torch' has no attribute 'bogus'",)),
    ("config-zero-hidden-size", change_config(hidden_size=0), "inspect",
     "backbone '{d}': {d}/config.json describes a model that AutoModelForSequenceClassification cannot build "
     "(ZeroDivisionError: 0.0 cannot be raised to a negative power); fix config.json"),
    ("config-impossible-model", change_config(num_attention_heads=3), "inspect",
     "backbone '{d}': {d}/config.json describes a model that AutoModelForSequenceClassification cannot build "
     "(ValueError: The hidden size (16) is not a multiple of the number of attention heads (3)); fix config.json"),
    ("no-weights", lambda d: (d / "model.safetensors").unlink(), "run",
     "backbone '{d}': {d} holds no weights (model.safetensors, or model.safetensors.index.json with its shards); "
     "copy them next to config.json (lrr inspect needs only config.json)"),
    ("truncated-safetensors", truncate("model.safetensors", 0.9), "run",
     "{d}/model.safetensors: not a readable safetensors file (Error while deserializing header: incomplete metadata, "
     "file not fully covered); it may be truncated or corrupted: copy or download it again"),
    ("empty-safetensors", truncate("model.safetensors", 0), "run",
     "{d}/model.safetensors: not a readable safetensors file (Error while deserializing header: header too small); "
     "it may be truncated or corrupted: copy or download it again"),
    ("truncated-pytorch-bin", as_pickle(lambda data: data[: len(data) // 2]), "run",
     "{d}/pytorch_model.bin: an incomplete PyTorch zip archive; it may be truncated or corrupted: copy or download it "
     "again"),
    ("garbage-pytorch-bin", as_pickle(lambda data: b"\x80\x02garbage" * 10), "run",
     "backbone '{d}': {d}: its pytorch_model.bin is not a PyTorch checkpoint torch's weights_only loader can read "
     "(Unsupported operand 103); it may be corrupted or not a checkpoint: copy or download it again"),
    ("missing-shard", shard, "run",
     "{d}/model.safetensors.index.json names shards that are not in {d}: model-00002-of-00002.safetensors; copy or "
     "download them again"),
    ("weights-of-another-shape", change_config(intermediate_size=32), "run",
     "backbone '{d}': the weights in {d} do not fit the model its config.json describes: "
     "bert.encoder.layer.0.intermediate.dense.bias is 24 in the checkpoint, 32 in the model, "
     "bert.encoder.layer.0.intermediate.dense.weight is 24x16 in the checkpoint, 32x16 in the model (and 4 more); fix "
     "config.json (hidden_size, vocab_size, ...) or use the weights it belongs to"),
    ("no-tokenizer", lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], "run",
     "backbone '{d}': {d} holds no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file: its "
     "vocabulary would be the special tokens only); copy the tokenizer files next to config.json or set "
     "backbone.tokenizer to where they are"),
    ("tokenizer-of-another-model", change_config(vocab_size=20), "run",
     "backbone '{d}': the tokenizer of {d} has 47 tokens, the model only 20 (vocab_size in {d}/config.json): token ids "
     "from 20 on would index past its embeddings; use the tokenizer the model was trained with (backbone.tokenizer)"),
    ("tokenizer-config-invalid-json", lambda d: (d / "tokenizer_config.json").write_text("{oops"), "run",
     "{d}/tokenizer_config.json:1:2: not valid JSON (Expecting property name enclosed in double quotes); fix the file "
     "or restore it from the model's source"),
    ("tokenizer-json-invalid", lambda d: (d / "tokenizer.json").write_text('{"version": "1.0",'), "run",
     "{d}/tokenizer.json:1:19: not valid JSON (Expecting property name enclosed in double quotes); fix the file or "
     "restore it from the model's source"),
]


@pytest.mark.parametrize("case,breaks,command,message", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_model_directory(case, breaks, command, message, model_dir, recipe, tmp_path):
    import transformers

    d = model_dir()
    breaks(d)
    before = snapshot(d)
    args = [command, recipe(d)] + (["--output", tmp_path / "run"] if command == "run" else [])
    result = lrr(*args)
    if isinstance(message, tuple):  # transformers' own words, wrapped: the file and the field
        assert_clean_error(result, code=1, contains=tuple(m.format(d=d) for m in message))
    else:
        assert_clean_error(result, message.format(d=d, tv=transformers.__version__), code=1)
    assert snapshot(d) == before  # the model directory is only read


@pytest.mark.parametrize("name,message", [
    ("{tmp}/model/config.json", "backbone.name {tmp}/model/config.json: {tmp}/model/config.json is a file, not a "
     "directory; point it at the directory holding config.json, the weights and the tokenizer"),
    ("{tmp}/empty", "backbone.name {tmp}/empty: the directory is empty; point it at a model directory (config.json, "
     "model.safetensors, tokenizer files)"),
    ("{tmp}/weights-only", "backbone.name {tmp}/weights-only: the directory holds no config.json; point it at a model "
     "directory (config.json, model.safetensors, tokenizer files)"),
    ("{tmp}/no/such/dir", "backbone.name {tmp}/no/such/dir: no such directory (nor a Hugging Face hub id such as "
     "microsoft/deberta-v3-base); point it at a model directory holding config.json"),
])
def test_backbone_name_that_is_no_model_directory(name, message, model_dir, recipe, tmp_path):
    """Where the backbone is resolved (run, inspect, export, load_adapted, pkg: paths);
    lrr validate reports these with the recipe's line first."""
    from lowrank_runner.backbones import resolve
    from lowrank_runner.errors import BackboneError

    model_dir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "model.safetensors").write_bytes(b"")
    with pytest.raises(BackboneError) as exc:
        resolve({"name": name.format(tmp=tmp_path)})
    assert str(exc.value) == message.format(tmp=tmp_path)
    result = lrr("inspect", recipe(name.format(tmp=tmp_path)))
    assert_clean_error(result, code=1, contains=(name.format(tmp=tmp_path),))


# --- 5 and 7: targets and ranks, on the meta model (lrr inspect) and before weights (lrr run) ---

LINEAR_HINT = ("only linear layers (nn.Linear, GPT-2's Conv1D) can: narrow the target to them, e.g. "
               r"re:\.attention\.self\.(query|value)$")
BERT_ADAPTABLE = ("its adaptable modules: attention.self.query, attention.self.key, attention.self.value, "
                  "attention.output.dense, intermediate.dense, output.dense, bert.pooler.dense, classifier")


@pytest.mark.parametrize("targets,message", [
    ("[re:.*]", "target pattern 're:.*' matches 37 module(s) that cannot be adapted: the whole model "
     "(BertForSequenceClassification), bert (BertModel), bert.embeddings (BertEmbeddings), "
     f"bert.embeddings.word_embeddings (Embedding) and 33 more; {LINEAR_HINT}"),
    ("[embeddings.word_embeddings]", "target pattern 'embeddings.word_embeddings' matches 1 module(s) that cannot be "
     f"adapted: bert.embeddings.word_embeddings (Embedding); {LINEAR_HINT}"),
    ("[LayerNorm]", "target pattern 'LayerNorm' matches 5 module(s) that cannot be adapted: bert.embeddings.LayerNorm "
     "(LayerNorm), bert.encoder.layer.0.attention.output.LayerNorm (LayerNorm), bert.encoder.layer.0.output.LayerNorm "
     f"(LayerNorm), bert.encoder.layer.1.attention.output.LayerNorm (LayerNorm) and 1 more; {LINEAR_HINT}"),
    ("[Wq, attention]", "target pattern 'attention' matches 2 module(s) that cannot be adapted: "
     "bert.encoder.layer.0.attention (BertAttention), bert.encoder.layer.1.attention (BertAttention); "
     f"{LINEAR_HINT}"),
    ("['re:']", "target pattern 're:' matches 37 module(s) that cannot be adapted: the whole model "
     "(BertForSequenceClassification), bert (BertModel), bert.embeddings (BertEmbeddings), "
     f"bert.embeddings.word_embeddings (Embedding) and 33 more; {LINEAR_HINT}"),
    ("[attn.c_attn]", f"target pattern 'attn.c_attn' matched no module of this bert model; {BERT_ADAPTABLE}"),
    ("[query_proj]", f"target pattern 'query_proj' matched no module of this bert model; {BERT_ADAPTABLE}"),
])
def test_targets_that_cannot_be_adapted(targets, message, clean, recipe):
    result = lrr("inspect", recipe(clean), "--set", f"targets={targets}")
    assert_clean_error(result, f"targets: {message}", code=1)


def test_symbols_on_a_family_without_symbols_list_what_can_be_adapted(tmp_path, recipe):
    import transformers

    d = tmp_path / "albert"
    d.mkdir()
    transformers.AlbertConfig(vocab_size=47, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=24, max_position_embeddings=64).save_pretrained(d)
    result = lrr("inspect", recipe(d))
    assert_clean_error(result, code=1, contains=(
        "targets: target symbol Wq is not defined for model_type 'albert' (families with symbols: ",
        "write explicit module patterns instead; its adaptable modules: albert.encoder.embedding_hidden_mapping_in, "
        "attention.query, attention.key, attention.value, attention.dense, ffn, ffn_output, albert.pooler, classifier"))


def test_an_invalid_regular_expression(clean, recipe):
    result = lrr("inspect", recipe(clean), "--set", "targets=['re:(']")
    assert_clean_error(result, code=1, contains=("re:(",))
    assert "regular expression" in result.output


RANK_TAIL = "the largest valid method.r for these targets is 16"


@pytest.mark.parametrize("method,message", [
    ("{name: lora, r: 4096}", "method.r 4096 is above the rank a module can have, min(in, out), for 4 adapted "
     "module(s): bert.encoder.layer.0.attention.self.query (16 in, 16 out), bert.encoder.layer.0.attention.self.value "
     f"(16 in, 16 out), bert.encoder.layer.1.attention.self.query (16 in, 16 out) and 1 more; {RANK_TAIL}"),
    ("{name: lora, r: 100000000}", "method.r 100000000 is above the rank a module can have, min(in, out), for 4 "
     "adapted module(s): bert.encoder.layer.0.attention.self.query (16 in, 16 out), "
     "bert.encoder.layer.0.attention.self.value (16 in, 16 out), bert.encoder.layer.1.attention.self.query (16 in, "
     f"16 out) and 1 more; {RANK_TAIL}"),
    ("{name: condlora, r: 17}", "method.r 17 is above the rank a module can have, min(in, out), for 4 adapted "
     "module(s): bert.encoder.layer.0.attention.self.query (16 in, 16 out), bert.encoder.layer.0.attention.self.value "
     f"(16 in, 16 out), bert.encoder.layer.1.attention.self.query (16 in, 16 out) and 1 more; {RANK_TAIL}"),
    ("{name: triadaptlora, r: 1, r_ref: 2, max_rank: 40, growth: linear}", "method.max_rank 40 is above the rank a "
     "module can have, min(in, out), for 4 adapted module(s): bert.encoder.layer.0.attention.self.query (16 in, 16 "
     "out), bert.encoder.layer.0.attention.self.value (16 in, 16 out), bert.encoder.layer.1.attention.self.query (16 "
     "in, 16 out) and 1 more; the largest valid method.max_rank for these targets is 16"),
])
def test_ranks_above_the_layer_size(method, message, clean, recipe):
    result = lrr("inspect", recipe(clean), "--set", f"method={method}")
    assert_clean_error(result, message, code=1)


def test_a_rank_is_checked_before_any_weight_is_read(model_dir, recipe, tmp_path):
    d = model_dir()
    (d / "model.safetensors").unlink()  # loading weights would fail with another message
    result = lrr("run", recipe(d), "--set", "method.r=64", "--set", "targets=[Wm]", "--output", tmp_path / "run")
    assert_clean_error(result, "method.r 64 is above the rank a module can have, min(in, out), for 2 adapted "
                               "module(s): bert.encoder.layer.0.intermediate.dense (16 in, 24 out), "
                               "bert.encoder.layer.1.intermediate.dense (16 in, 24 out); the largest valid method.r "
                               "for these targets is 16", code=1)


def test_a_fused_projection_is_bounded_per_group(tmp_path, recipe):
    d = save_tiny_backbone(tmp_path / "gpt2", "gpt2")
    result = lrr("inspect", recipe(d), "--set", "targets=[Wq]", "--set", "method.r=17")
    assert_clean_error(result, "method.r 17 is above the rank a module can have, min(in, out), for 2 adapted "
                               "module(s): transformer.h.0.attn.c_attn (16 in, 16 out), transformer.h.1.attn.c_attn "
                               "(16 in, 16 out); the largest valid method.r for these targets is 16", code=1)


def test_the_largest_valid_rank_is_accepted(clean, recipe):
    result = lrr("inspect", recipe(clean), "--set", "method.r=16", "--json")
    assert result.code == 0, result.output


# --- 8: task.max_length beyond the model's positions ---------------------------------------------

def config_only(directory: Path, model_type: str, **overrides) -> Path:
    directory.mkdir()
    tiny_config(model_type, **overrides).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model_type,length,message", [
    ("bert", 65, "task.max_length 65 needs 65 token positions, beyond the 64 of backbone '{d}' "
     "(max_position_embeddings 64 in {d}/config.json); lower task.max_length so that at most 64 are needed"),
    ("roberta", 64, "task.max_length 64 needs 64 token positions, beyond the 63 of backbone '{d}' "
     "(max_position_embeddings 64 in {d}/config.json, less 1 reserved by its padding offset); lower task.max_length "
     "so that at most 63 are needed"),
    ("gpt2", 100, "task.max_length 100 needs 100 token positions, beyond the 64 of backbone '{d}' "
     "(n_positions 64 in {d}/config.json); lower task.max_length so that at most 64 are needed"),
])
def test_max_length_beyond_the_position_table(model_type, length, message, tmp_path, recipe):
    d = config_only(tmp_path / model_type, model_type)
    result = lrr("inspect", recipe(d), "--set", f"task.max_length={length}", "--set", "targets=['re:\\.(query|c_proj)$']")
    assert_clean_error(result, message.format(d=d), code=1)


def test_an_architecture_without_the_tasks_model_class(tmp_path, recipe):
    import transformers

    d = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24).save_pretrained(d)
    result = lrr("inspect", recipe(d))
    assert_clean_error(result, f"backbone '{d}' is a 'vit' model, and transformers has no "
                               "AutoModelForSequenceClassification for that architecture, which the task needs; choose "
                               "a backbone of another architecture", code=1)


def test_max_length_on_relative_positions_is_a_warning(tmp_path, recipe):
    """DeBERTa-v2 with position_biased_input false has no absolute table: longer inputs
    run (log-bucketed relative positions), beyond what pretraining saw."""
    d = config_only(tmp_path / "deberta", "deberta-v2")
    result = lrr("inspect", recipe(d), "--set", "task.max_length=100", "--json")
    assert result.code == 0, result.output
    assert (f"warning: task.max_length 100 needs 100 token positions, beyond the 64 backbone '{d}' was pretrained "
            f"with (max_position_embeddings in {d}/config.json); it has no absolute position table (relative or "
            "rotary positions), so longer inputs run, but the model never saw them in pretraining") in result.error_lines()


def test_generation_counts_the_new_tokens():
    from lowrank_runner.modeling import positions_needed

    assert positions_needed({"max_length": 64}) == (64, "task.max_length 64")
    assert positions_needed({"max_length": 64, "generation": {"max_new_tokens": 40}}) == (
        72, "task.max_length 64 // 2 + task.generation.max_new_tokens 40")
    assert positions_needed({"max_length": 64, "generation": {"max_new_tokens": 8}}) == (64, "task.max_length 64")


@pytest.mark.parametrize("where", ["recipe", "set"])
def test_problems_only_the_model_shows_name_the_recipe_line(tmp_path, tiny_bert, sentiment_data, where):
    """A rank above the layers, found with the model at hand, is still named at the line
    of the recipe (or the --set) that sets it, as validation names its problems."""
    from tests.conftest import tiny_recipe_text

    recipe = tmp_path / "r.yaml"
    text = tiny_recipe_text(tiny_bert, sentiment_data)
    recipe.write_text(text.replace("r: 4,", "r: 64,") if where == "recipe" else text)
    args = ("--set", "method.r=64") if where == "set" else ()
    line, text = next((i, ln) for i, ln in enumerate(recipe.read_text().splitlines(), 1) if ln.startswith("method:"))
    at = f"{recipe}:{line}:{text.index('r: 64') + 4}" if where == "recipe" else "--set method.r=64"
    for command in ("inspect", "run"):
        result = lrr(command, recipe, *args, *(("--output", tmp_path / "out") if command == "run" else ()))
        assert_clean_error(result, code=1)
        assert result.error_lines()[-1].startswith(f"error: {at}: method.r 64 is above the rank a module can have"), \
            result.stderr
