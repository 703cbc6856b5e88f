"""FSDP through Accelerate (train/fsdp.py): a real 2-process FSDP2 run on CPU processes
(gloo) of a tiny LLaMA with LoRA2 (rank decisions inside the run, one after the
resume) and CondLoRA (shared maps), evaluated after every step, stopped and resumed
from its sharded run's checkpoint, equal to the 1-process run, and a chat task whose 3
generated samples equal the 1-process run's; the merged export from it; the sharded
state after an evaluation, in torch alone on 2 processes; and the settings (recipe key,
Accelerate's FSDP config variables, the conflicts refused) without launching."""

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.train import fsdp
from tests.conftest import WORDS, tiny_config

METHODS = {  # LoRA2 is LoRA plus its scale vector and pruning: it covers LoRA's path too
    "lora2": "{name: lora2, r: 4, k: 2, alpha: 8, target_rank: 1, t_init: 1, t_final: 1, mask_interval: 1}",
    "condlora": "{name: condlora, r: 4, alpha: 8}",
}


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def recipe_text(backbone, data, chat_data, enabled: bool = True) -> str:
    """Two tasks, each run per method: classification, and chat with 3 generated samples
    (an odd count: the 2 processes get uneven shares of the prompts); an evaluation, and a
    checkpoint, after every step (the steps after a mid-run evaluation)."""
    (train, validation), (chat_train, chat_validation) = data, chat_data
    points = "\n".join(f"    - {m}" for m in METHODS.values())
    return textwrap.dedent(f"""
        name: tiny-fsdp
        backbone: {{name: {backbone}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 4, alpha: 8}}
        tasks:
          classification:
            task:
              name: classification
              data: {{train: {train}, validation: {validation}}}
              max_length: 16
          chat:
            task:
              name: chat
              data: {{train: {chat_train}, validation: {chat_validation}}}
              max_length: 24
              samples: 3
              generation: {{max_new_tokens: 6, batch_size: 1}}
        training:
          learning_rate: 1.0e-2
          max_steps: 4
          batch_size: 16
          seed: 0
          log_every: 1
          eval_every: 1
          fsdp: {{enabled: {str(enabled).lower()}}}
        sweep:
          method:
        """).lstrip() + points + "\n"


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ' ' + m['content'] + eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant' }}{% endif %}")


def save_tiny_causal_llama(directory):
    """A random tiny LLaMA LM (classification adds its own head to it) with a word-level
    tokenizer that has bos/eos/pad and a chat template."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "user", "assistant", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(vocab))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_chat_data(directory) -> tuple:
    """Chat conversations of random words: 64 to train on (one epoch of the 4 steps), 3 to
    sample from."""
    rng = random.Random(0)
    paths = []
    for split, n in (("train", 64), ("validation", 3)):
        rows = [{"messages": [{"role": "user", "content": " ".join(rng.sample(WORDS, 4))},
                              {"role": "assistant", "content": " ".join(rng.sample(WORDS, 3))}]} for _ in range(n)]
        paths.append(directory / f"chat_{split}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tuple(paths)


@pytest.fixture(scope="module")
def llama_recipe(tmp_path_factory, sentiment_data):
    root = tmp_path_factory.mktemp("fsdp")
    backbone = save_tiny_causal_llama(root / "llama")
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_text(backbone, sentiment_data, write_chat_data(root)))
    return recipe


def two_processes(*args) -> subprocess.CompletedProcess:
    """``lrr run`` on 2 CPU processes (torchrun: what `accelerate launch --num_processes 2` starts)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "lowrank_runner", "run", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def run_dir(out, method, task="classification"):
    return out / task / f"method={method}" / "seed0"


def logged(run, key="loss") -> dict[int, float]:
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {ln["step"]: ln[key] for ln in lines if key in ln}


@pytest.mark.slow
def test_two_process_fsdp_run_resumes_and_equals_one_process(llama_recipe, tmp_path):
    """Sharded on 2 processes, evaluated and checkpointed after every step, stopped after
    step 2 and resumed: every method's losses, evaluations (each step's, the training
    steps after them included), rank budgets (LoRA2 prunes at step 2, before the stop,
    and 3, after it) and final adapter equal the 1-process run's; the report records the
    sharding; the chat task's generated samples (3 prompts on 2 processes) equal the
    1-process run's; the merged export of the sharded run verifies as today."""
    code, out = lrr("run", llama_recipe, "--output", tmp_path / "one")  # one process: FSDP is off (a note says so)
    assert code == 0, out
    assert "nothing to shard" in out
    two_processes(llama_recipe, "--output", tmp_path / "two", "--stop-after-step", 2)
    assert all((run_dir(tmp_path / "two", m) / "checkpoints" / "step-000002").is_dir() for m in METHODS)
    two_processes(llama_recipe, "--output", tmp_path / "two", "--resume")
    for method in METHODS:
        one, two = run_dir(tmp_path / "one", method), run_dir(tmp_path / "two", method)
        assert list(logged(two)) == [1, 2, 3, 4]
        assert list(logged(two).values()) == pytest.approx(list(logged(one).values()), rel=1e-4)
        assert list(logged(two, "eval")) == [1, 2, 3, 4]  # mid-run evaluations, each followed by a step
        for step, scores in logged(two, "eval").items():
            assert scores == pytest.approx(logged(one, "eval")[step], rel=1e-4), step
        a, b = load_file(one / "adapter" / "adapter.safetensors"), load_file(two / "adapter" / "adapter.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
        report = json.loads((two / "report.json").read_text())
        # the evaluation loss covers both processes' examples, not the main process's share
        final_one = json.loads((one / "report.json").read_text())["final_eval"]
        assert report["final_eval"]["loss"] == pytest.approx(final_one["loss"], rel=1e-4)
        assert report["fsdp"]["source"] == "recipe" and report["fsdp"]["processes"] == 2
        assert report["fsdp"]["wrapped"] == ["LlamaDecoderLayer"] and report["fsdp"]["whole_params"] > 0
    for method in METHODS:  # chat: 3 samples decoded by 2 processes in uneven shares, through the sharded model
        one, two = run_dir(tmp_path / "one", method, "chat"), run_dir(tmp_path / "two", method, "chat")
        assert list(logged(two, "eval")) == [1, 2, 3, 4]
        for step, scores in logged(two, "eval").items():  # loss and perplexity after every step
            assert scores == pytest.approx(logged(one, "eval")[step], rel=1e-4), step
        samples = [(run / "outputs_validation.jsonl").read_text().splitlines() for run in (one, two)]
        assert len(samples[0]) == 3 and samples[1] == samples[0]  # greedy: the same generations, in order
        assert json.loads((two / "report.json").read_text())["fsdp"]["processes"] == 2
    budgets = logged(run_dir(tmp_path / "two", "lora2"), "rank_budget")
    assert budgets == logged(run_dir(tmp_path / "one", "lora2"), "rank_budget")
    assert budgets[1] > budgets[2] > budgets[3]  # pruned before and after the resume
    code, out = lrr("export", run_dir(tmp_path / "two", "condlora"), "--merge", "--out", tmp_path / "merged")
    assert code == 0, out
    assert (tmp_path / "merged" / "config.json").is_file()


# ------------------------------------------------------------------ settings, no launch


def test_recipe_key_builds_an_fsdp2_plugin():
    plugin = fsdp.plugin_from_recipe({"enabled": True, "strategy": "shard_grad_op", "auto_wrap": "transformer_layer",
                                      "cpu_offload": True})
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy and isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.cpu_ram_efficient_loading is False
    whole = fsdp.plugin_from_recipe({"enabled": True, "strategy": "full_shard", "auto_wrap": "none", "cpu_offload": False})
    assert whole.reshard_after_forward is True and whole.auto_wrap_policy is None


def test_a_single_process_trains_without_fsdp(capsys):
    sharding = fsdp.Sharding.for_run({"fsdp": {"enabled": True}}, "r.yaml [t, seed 0]")
    assert not sharding.enabled and sharding.accelerator_options() == {}
    assert "nothing to shard" in capsys.readouterr().err


def test_recipe_key_and_an_accelerate_fsdp_config_are_refused_together(monkeypatch):
    monkeypatch.setattr(fsdp, "_LAUNCH_FSDP", True)
    with pytest.raises(fsdp.FsdpError, match="training.fsdp.enabled is true and `accelerate launch` was given an FSDP"):
        fsdp.Sharding.for_run({"fsdp": {"enabled": True}}, "r.yaml")


ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
use_cpu: true
fsdp_config: {{fsdp_version: {version}, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP}}
"""


def launch_environment(monkeypatch, tmp_path, version: int) -> None:
    """This process's environment as `accelerate launch --config_file` sets it for its
    processes (Accelerate's own launch code: FSDP_VERSION, and its defaults
    FSDP_SYNC_MODULE_STATES/FSDP_CPU_RAM_EFFICIENT_LOADING true, ...), without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = tmp_path / f"fsdp{version}.yaml"
    config.write_text(ACCELERATE_CONFIG.format(version=version))
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "lowrank_runner", "run", "r.yaml"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == str(version)
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)


def test_accelerate_config_must_be_fsdp2(monkeypatch, tmp_path, capsys):
    """What `accelerate launch --config_file` passes: version 1 is refused (before
    Accelerate's FSDP1 plugin fails on CPU processes); version 2 with
    cpu_ram_efficient_loading (Accelerate's default) has it turned off, with a note."""
    launch_environment(monkeypatch, tmp_path, 1)
    with pytest.raises(fsdp.FsdpError, match="asks for FSDP version 1.*set fsdp_version: 2"):
        fsdp.plugin_from_launch("r.yaml")
    launch_environment(monkeypatch, tmp_path, 2)
    assert fsdp.os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    plugin = fsdp.plugin_from_launch("r.yaml")
    assert plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading is False
    assert fsdp.os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
    assert "fsdp_cpu_ram_efficient_loading is off" in capsys.readouterr().err


def test_deepspeed_config_on_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(fsdp, "_LAUNCH_DEEPSPEED", True)
    with pytest.raises(fsdp.FsdpError, match="DeepSpeed, which Accelerate applies only on GPUs"):
        fsdp.Sharding.for_run({"fsdp": {"enabled": False}}, "r.yaml")


def test_the_modules_kept_whole_are_those_holding_trained_tensors(llama_recipe):
    """Adapters, the method's shared maps and the head: never a frozen backbone module."""
    from lowrank_runner.modeling import build_adapted_model
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.tasks.base import build_task

    run = next(r for r in load_recipe(llama_recipe).runs if r.config["method"]["name"] == "condlora")
    task = build_task(run.config["task"])
    adapted = build_adapted_model(run.config, task.model_class, task.model_config_kwargs(), weights=False)
    whole = fsdp.whole_modules(adapted.model, adapted.trainable_names)
    names = {n for n, m in adapted.model.named_modules() if any(m is w for w in whole)}
    assert names and all(n.endswith("lrr_adapter") or n.startswith("lrr_shared") or n == "score" for n in names)
    assert "score" in names and any(n.startswith("lrr_shared") for n in names)


def test_inspect_shows_the_fsdp_settings(llama_recipe):
    code, out = lrr("inspect", llama_recipe, "--json")
    assert code == 0, out
    run = json.loads(out)["runs"][0]
    assert run["training"]["fsdp"] == {"enabled": True, "strategy": "full_shard", "auto_wrap": "transformer_layer",
                                       "cpu_offload": False}
    assert "FSDP2 full_shard" in run["fsdp"] and "LlamaDecoderLayer" in run["fsdp"]


def test_a_bad_strategy_is_a_recipe_error(llama_recipe, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(llama_recipe.read_text().replace("fsdp: {enabled: true}", "fsdp: {enabled: true, strategy: hybrid}"))
    code, out = lrr("validate", bad)
    assert code != 0 and "training.fsdp.strategy" in out and "bad.yaml:" in out


def test_a_quantized_base_under_an_accelerate_fsdp_config_is_refused(monkeypatch):
    """The recipe key with backbone.quantization is refused by `lrr validate`; an FSDP
    config given to `accelerate launch` is refused when the run starts, before loading."""
    monkeypatch.setattr(fsdp, "_LAUNCH_FSDP", True)
    with pytest.raises(fsdp.FsdpError, match="backbone.quantization is set and `accelerate launch` was given an FSDP"):
        fsdp.Sharding.for_run({"fsdp": {"enabled": False}}, "r.yaml", quantized=True)


AFTER_EVALUATION = """
import json, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from lowrank_runner.train.fsdp import Sharding

dist.init_process_group("gloo")
torch.manual_seed(0)
adapter = nn.Linear(8, 8)  # trained, whole (FSDP's ignored_params, as lrr's adapters)
model = nn.Sequential(adapter, nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8))
for p in model[1:].parameters():
    p.requires_grad_(False)
fully_shard(model[1]), fully_shard(model[2])  # the blocks
fully_shard(model[3], reshard_after_forward=False)  # Accelerate's tail unit (final norm, output layer)
fully_shard(model, ignored_params=set(adapter.parameters()))
x = torch.randn(4, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
gathers = [0]
all_gather = dist.all_gather_single
def counted(*args, **kwargs):
    gathers[0] += 1
    return all_gather(*args, **kwargs)
dist.all_gather_single = counted

def step():
    gathers[0] = 0
    model(x).sum().backward()
    adapter.zero_grad()
    return gathers[0]

plain = step()
with torch.no_grad():  # an evaluation: forwards, no backward
    model.eval(), model(x), model(x), model.train()
if sys.argv[1] == "fixed":
    Sharding(plugin=object(), source="recipe").after_evaluation(model)
if dist.get_rank() == 0:
    model.state_dict()  # the main process alone reads the trained tensors for a checkpoint
tail = torch.tensor([int(isinstance(model[3].weight, DTensor))])
tails = [torch.zeros_like(tail) for _ in range(2)]
dist.all_gather(tails, tail)
result = {"tail_sharded": [int(t) for t in tails], "plain_step_gathers": plain}
if sys.argv[1] == "fixed":  # unfixed, the step would hang or fail: rank 0 all-gathers the tail alone
    result["next_step_gathers"] = step()
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def two_process_script(directory, code: str, mode: str) -> list[dict]:
    """``code`` on 2 CPU processes (torchrun) with ``mode``; what each process wrote
    (``rank<N>.json`` in ``directory``, by rank)."""
    directory.mkdir()
    script = directory / "script.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           mode, str(directory)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_after_an_evaluation_every_process_holds_the_same_sharded_state(tmp_path):
    """The cause of the mid-run evaluation failure, in torch alone: a unit with
    reshard_after_forward=False stays gathered after a forward without backward; the
    main process's state_dict() (FSDP2's hook reshards) then leaves it sharded there only,
    and the next forward would all-gather it on the main process alone. After
    ``Sharding.after_evaluation`` every process is sharded, and the next step makes the
    all-gathers of a plain step (no prefetch of the evaluation's units)."""
    unfixed = two_process_script(tmp_path / "unfixed", AFTER_EVALUATION, "unfixed")
    assert [r["tail_sharded"] for r in unfixed] == [[1, 0], [1, 0]]  # diverged: rank 0 resharded, rank 1 not
    fixed = two_process_script(tmp_path / "fixed", AFTER_EVALUATION, "fixed")
    assert [r["tail_sharded"] for r in fixed] == [[1, 1], [1, 1]]
    from torch.distributed.fsdp import FSDPModule

    extra = 0 if hasattr(FSDPModule, "reset_iter_state") else 1  # older torch: resharded, one unit prefetched
    assert all(r["next_step_gathers"] == r["plain_step_gathers"] + extra for r in fixed), fixed
    fsdp.Sharding(plugin=None, source="").after_evaluation(torch.nn.Linear(2, 2))  # no FSDP: nothing to do
