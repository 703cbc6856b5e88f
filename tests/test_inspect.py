"""`lrr inspect` needs only config.json: shapes on the meta device, counts, steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

DEBERTA_V3_BASE = {
    "model_type": "deberta-v2", "architectures": ["DebertaV2ForMaskedLM"], "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "vocab_size": 128100,
    "max_position_embeddings": 512, "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
    "share_att_key": True, "pos_att_type": ["p2c", "c2p"], "layer_norm_eps": 1e-7, "max_relative_positions": -1,
    "position_biased_input": False, "type_vocab_size": 0, "pad_token_id": 0,
}
ROBERTA_BASE = {
    "model_type": "roberta", "architectures": ["RobertaForMaskedLM"], "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "vocab_size": 50265,
    "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    "layer_norm_eps": 1e-5,
}


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    out = {}
    for name, cfg in (("deberta-v3-base", DEBERTA_V3_BASE), ("roberta-base", ROBERTA_BASE)):
        d = tmp_path_factory.mktemp(name)
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = d
    return out


GPT2_MEDIUM = {
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 1024, "n_layer": 24, "n_head": 16,
    "n_positions": 1024, "n_ctx": 1024, "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256,
}


def inspect(*sets):
    """`lrr inspect recipes/quickstart.yaml --json --set ...`, through the CLI code in-process."""
    from typer.testing import CliRunner

    from lowrank_runner.cli import app

    args = ["inspect", "recipes/quickstart.yaml", "--json"]
    for s in sets:
        args += ["--set", s]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


ALL6 = "[Wq,Wk,Wv,Wa,Wm,Wo]"
HEAD = 768 * 768 + 768 + 768 * 2 + 2  # RoBERTa: classifier dense + out_proj; DeBERTa: pooler + classifier


@pytest.mark.parametrize("backbone,targets,method,expected", [
    # From the papers' tables:
    ("deberta-v3-base", ALL6, ["lora", "r=1"], 165_888),  # LoRA2 Table 1, LoRA r=1
    ("deberta-v3-base", ALL6, ["lora", "r=8"], 1_327_104),  # LoRA2 Table 1, LoRA r=8
    ("deberta-v3-base", "[Wq,Wk]", ["lora2", "k=1", "r=8"], 37_440),  # LoRA2 Table 4
    ("deberta-v3-base", "[Wq,Wv]", ["lora2", "k=1", "r=8"], 37_440),  # LoRA2 Table 4
    ("deberta-v3-base", "[Wq,Wk,Wv]", ["lora2", "k=1", "r=8"], 56_160),  # LoRA2 Table 4
    ("deberta-v3-base", ALL6, ["lora2", "k=1", "r=8"], 167_616),  # LoRA2 Table 4 (0.17M in Table 1)
    ("roberta-base", "[Wq,Wv]", ["lora", "r=8"], 294_912),  # CondLoRA Table 4, LoRA
    ("roberta-base", "[Wq,Wv]", ["condlora", "r=8"], 24_576),  # CondLoRA Table 4
    # Derived from the papers' formulas (the papers print no such table):
    ("roberta-base", "[Wq,Wv,Wm,Wo]", ["mtlora", "structure=shim", "r=8"], 1_035_264),  # A+B + one 8x8 C per module
    ("roberta-base", "[Wq,Wv,Wm,Wo]", ["mtlora", "structure=ctcm", "r=8"], 1_038_336),  # + D
    # r(in+out) + r(r+1) per module; growth steps that fit quickstart's 200 steps (the defaults do not)
    ("deberta-v3-base", ALL6, ["triadaptlora", "r=1", "t_init=10", "grow_interval=10"], 166_032),
    ("deberta-v3-base", ALL6, ["condlora", "r=8"], 4 * 12_288 + 2 * 30_720),  # one (theta_A, theta_B) per symbol
])
def test_parameter_counts(config_dirs, backbone, targets, method, expected):
    name, *params = method
    out = inspect(f"backbone.name={config_dirs[backbone]}", f"targets={targets}", f"method={{name: {name}}}",
                  *[f"method.{p}" for p in params])
    (run,) = out["runs"]
    assert run["adapter_params"] == expected
    assert run["trainable_params"] == expected + HEAD


def test_mtlora_fused_qkv_on_gpt2_medium(config_dirs, tmp_path):
    """MTLoRA's GPT-2 setting ({Wq,Wk,Wv,Wf}, r=4): one 12x12 T over the fused c_attn."""
    d = tmp_path / "gpt2-medium"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(GPT2_MEDIUM))
    out = inspect(f"backbone.name={d}", "targets=[Wq,Wk,Wv,Wf]", "method={name: mtlora, structure: shim, r: 4, alpha: 32}")
    (run,) = out["runs"]
    per_layer = (3 * 4 * 1024 + 3 * 1024 * 4 + 12 * 12) + (4 * (1024 + 4096) + 4 * 4)
    assert run["adapter_params"] == 24 * per_layer == 1_085_184
    assert run["targets"]["Wq"][0] == "transformer.h.0.attn.c_attn"


def test_json_shape(config_dirs):
    out = inspect(f"backbone.name={config_dirs['roberta-base']}", "training.seed=[0,1]")
    assert set(out) >= {"recipe_hash", "runs"}
    assert len(out["runs"]) == 2
    run = out["runs"][1]
    assert set(run) >= {"task", "seed", "method", "training", "modules", "adapter_params", "trainable_params", "steps"}
    assert run["seed"] == 1 and run["task"] == "classification"
    assert run["method"]["name"] == "lora" and run["method"]["r"] == 8
    assert len(run["modules"]) == 12 * 6
    assert run["modules"][0] == "roberta.encoder.layer.0.attention.self.query"
    # 800 examples, batch 16, 4 epochs (recipes/quickstart.yaml)
    assert run["steps"] == 200 and run["training"]["warmup_steps"] == 20


def test_planned_steps_follow_batch_accumulation_and_processes(config_dirs):
    out = inspect(f"backbone.name={config_dirs['roberta-base']}", "training.batch_size=96",
                  "training.gradient_accumulation_steps=3", "training.epochs=2")
    assert out["runs"][0]["steps"] == 2 * 9  # effective batch 96 = 32 per device x 3: ceil(ceil(800/32) / 3) = 9 per epoch
    assert out["runs"][0]["batch"] == {"effective": 96, "per_device": 32, "accumulation": 3, "processes": 1,
                                       "batch_size_per": "effective"}


def test_inspect_of_a_hub_backbone_offline_shows_the_plan_and_says_why_counts_are_missing(tmp_path):
    """Offline, a hub backbone that is not cached: the runs and their steps (the data are
    local), no parameter counts, and why, once, with the command that fixes it."""
    proc = subprocess.run(
        [sys.executable, "-m", "lowrank_runner", "inspect", "recipes/quickstart.yaml", "--set", "backbone.name=someorg/no-such-model",
         "--set", "training.seed=[0,1]"],
        capture_output=True, text=True, cwd=REPO, timeout=60, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("backbone 'someorg/no-such-model' is not a local directory") == 1, proc.stdout
    assert "parameter counts and modules could not be computed" in proc.stdout
    assert "--set backbone.name=models/no-such-model" in proc.stdout
    assert "seed 0" in proc.stdout and "seed 1" in proc.stdout and "200 optimizer steps" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_inspect_json_of_a_glue_recipe_offline_plans_from_the_known_sizes(monkeypatch):
    """A paper recipe on a hub backbone and GLUE from the hub, offline: every run with its
    steps (GLUE's known training-set sizes), counts null, ``unavailable`` saying why."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    from typer.testing import CliRunner

    from lowrank_runner.cli import app

    result = CliRunner().invoke(app, ["inspect", str(REPO / "recipes" / "lora2_deberta_glue.yaml"), "--json",
                                      "--set", "backbone.name=lrr-tests/not-cached-model"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["runs"]) == 24 and "lrr-tests/not-cached-model" in out["unavailable"]
    mrpc = next(run for run in out["runs"] if run["task"] == "mrpc")
    assert mrpc["steps"] == 115 * 30 and mrpc["adapter_params"] is None  # ⌈3,668 / 32⌉ steps per epoch, 30 epochs
    assert all(run["warnings"] == [] for run in out["runs"])


@pytest.mark.parametrize("sets, says", [
    (["method.name=triadaptlora"], "triadaptlora: r (8) is not below r_ref (8): nothing can grow"),
    (["method.name=lora2", "method.target_rank=8"], "lora2: target_rank (8) is not below r (8): nothing is pruned"),
    (["method.name=increlora", "method.target_rank=8"], "increlora: r (8) is not below target_rank (8): nothing can grow"),
])
def test_a_dynamic_rank_method_with_nothing_to_grow_or_prune_is_warned(sets, says):
    """The quickstart's r 8 with a method whose rank target is 8 too (x-no-op in its schema):
    inspect's JSON, and validate, say so."""
    out = inspect(*sets)
    assert [w for w in out["warnings"] if says in w], out["warnings"]
    from typer.testing import CliRunner

    from lowrank_runner.cli import app

    args = ["validate", str(REPO / "recipes" / "quickstart.yaml")] + [w for s in sets for w in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and says in result.output, result.output


def test_no_warning_when_the_method_can_act():
    assert inspect("method.name=triadaptlora", "method.r_ref=16", "method.t_init=20", "method.grow_interval=20")["warnings"] == []
    assert inspect("method.name=triadaptlora", "method.growth=none")["warnings"] == []  # fixed ranks, on purpose
    assert inspect("method.name=lora2")["warnings"] == []  # no target_rank: a fixed-rank LoRA2


def inspect_recipe(recipe, *sets):
    from typer.testing import CliRunner

    from lowrank_runner.cli import app

    args = ["inspect", str(REPO / "recipes" / recipe), "--json", "--set", "training.seed=0"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {run["task"]: run for run in json.loads(result.stdout)["runs"]}


GLUE_ORDER = ["mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb"]


def test_lora2_recipe_matches_the_authors_settings(config_dirs):
    runs = inspect_recipe("lora2_deberta_glue.yaml", f"backbone.name={config_dirs['deberta-v3-base']}")
    assert list(runs) == GLUE_ORDER
    assert runs["mnli"]["adapter_params"] == 167_616  # Table 4 "ALL", k = 1, r = 8
    cola = runs["cola"]
    assert (cola["method"]["r"], cola["method"]["target_rank"], cola["method"]["alpha"]) == (4, 3, 32)
    assert (cola["training"]["learning_rate"], cola["training"]["epochs"], cola["training"]["batch_size"]) == (8e-4, 25, 32)
    assert (cola["method"]["t_init"], cola["method"]["t_final"], cola["method"]["mask_interval"]) == (800, 3500, 10)
    assert runs["stsb"]["training"]["weight_decay"] == 0.1 and runs["rte"]["method"]["orth_reg"] == 0.3
    assert runs["mrpc"]["steps"] == 115 * 30  # ⌈3,668 / 32⌉ steps per epoch, 30 epochs: T from the plan
    assert {task: run["warnings"] for task, run in runs.items()} == dict.fromkeys(GLUE_ORDER, [])  # schedules fit T


# Table V's LoRA Dropout row (MNLI SST-2 CoLA QQP QNLI RTE MRPC STS-B): "default" is the
# implementation's default, 0 (PEFT's LoraConfig and loralib alike).
DROPOUTS = [0, 0.3, 0, 0, 0, 0, 0.3, 0]


def test_triadaptlora_recipes_match_table_v(config_dirs):
    for recipe, mode in [("triadaptlora_deberta_glue.yaml", "linear"), ("triadaptlora_deberta_glue_nonlinear.yaml",
                         "nonlinear"), ("triadaptlora_deberta_glue_fixed_k.yaml", "fixed_k")]:
        runs = inspect_recipe(recipe, f"backbone.name={config_dirs['deberta-v3-base']}")
        assert list(runs) == GLUE_ORDER and all(r["method"]["growth"] == mode for r in runs.values())
        assert all(r["warnings"] == [] for r in runs.values())  # every growth schedule fits its planned steps
    epochs = [7, 24, 25, 7, 5, 50, 30, 25]
    lrs = [5e-4, 8e-4, 1e-3, 6e-4, 9e-4, 1.2e-3, 1e-3, 2.2e-3]
    grow_by = [1, 4, 4, 4, 4, 4, 4, 4]
    interval = [1000, 1000, 100, 1000, 500, 100, 100, 100]
    alphas = [16, 16, 32, 16, 32, 32, 32, 32]
    lengths = [256, 128, 64, 320, 512, 320, 320, 128]
    for i, task in enumerate(GLUE_ORDER):
        run = runs[task]
        assert run["training"]["epochs"] == epochs[i] and run["training"]["learning_rate"] == lrs[i]
        assert run["method"]["grow_by"] == grow_by[i] and run["method"]["alpha"] == alphas[i]
        assert run["method"]["t_init"] == run["method"]["grow_interval"] == run["training"]["warmup_steps"] == interval[i]
        assert (run["method"]["r"], run["method"]["r_ref"]) == (1, 8)
        assert run["task_config"]["max_length"] == lengths[i]
        assert run["method"]["dropout"] == DROPOUTS[i]
    assert runs["mnli"]["adapter_params"] == 166_032  # rank 1 everywhere at the start


def test_mtlora_condlora_and_lora_baselines_match_their_tables(config_dirs):
    roberta = f"backbone.name={config_dirs['roberta-base']}"
    for structure in ("", "_icfm", "_ctcm", "_dtsm"):
        runs = inspect_recipe(f"mtlora_roberta_glue{structure}.yaml", roberta)
        assert runs["cola"]["method"]["structure"] == (structure[1:] or "shim")
        assert [runs[t]["training"]["batch_size"] for t in GLUE_ORDER] == [16, 16, 32, 16, 32, 32, 16, 16]
        assert [runs[t]["training"]["epochs"] for t in GLUE_ORDER] == [30, 60, 80, 25, 25, 80, 30, 40]
        # LoRA's protocol: MRPC, RTE and STS-B start from the MNLI adapter of the same seed
        assert {t: (runs[t]["init_from"] or {}).get("run") for t in GLUE_ORDER} == {
            **dict.fromkeys(GLUE_ORDER), **dict.fromkeys(["rte", "mrpc", "stsb"], "mnli-seed0")}
    condlora = inspect_recipe("condlora_roberta_glue.yaml", roberta)
    assert condlora["rte"]["adapter_params"] == 24_576  # CondLoRA Table 4
    assert condlora["cola"]["training"]["learning_rate"] == 6.026e-4 and condlora["qqp"]["training"]["epochs"] == 50
    assert condlora["rte"]["task_config"]["holdout_fraction"] == 0.1  # §3.1: select on 10% of train, test on dev
    assert condlora["rte"]["steps"] == 100 * 141  # ⌈(2,490 − 249) / 16⌉ steps per epoch, 100 epochs
    assert inspect_recipe("lora_roberta_glue.yaml", roberta)["rte"]["adapter_params"] == 294_912  # CondLoRA Table 4
    lora = inspect_recipe("lora_deberta_glue.yaml", f"backbone.name={config_dirs['deberta-v3-base']}")
    assert lora["sst2"]["adapter_params"] == 1_327_104  # LoRA2 Table 1, r = 8
    # TriAdaptLoRA Table V, which the paper says LoRA uses too: its alpha and LoRA dropout rows
    assert [lora[t]["method"]["alpha"] for t in GLUE_ORDER] == [16, 16, 32, 16, 32, 32, 32, 32]
    assert [lora[t]["method"]["dropout"] for t in GLUE_ORDER] == DROPOUTS
