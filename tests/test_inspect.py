"""`lrr inspect` needs only config.json: shapes on the meta device, counts, steps."""

import json
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


def inspect(*sets):
    args = [sys.executable, "-m", "lowrank_runner", "inspect", "recipes/quickstart.yaml", "--json"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("backbone,targets,r,expected", [
    ("deberta-v3-base", "[Wq,Wk,Wv,Wa,Wm,Wo]", 1, 165_888),  # LoRA2 Table 1, LoRA r=1
    ("deberta-v3-base", "[Wq,Wk,Wv,Wa,Wm,Wo]", 8, 1_327_104),  # LoRA2 Table 1, LoRA r=8
    ("roberta-base", "[Wq,Wv]", 8, 294_912),  # CondLoRA Table 4, LoRA
])
def test_lora_parameter_counts_match_the_papers(config_dirs, backbone, targets, r, expected):
    out = inspect(f"backbone.name={config_dirs[backbone]}", f"targets={targets}", "method.name=lora", f"method.r={r}")
    (run,) = out["runs"]
    assert run["adapter_params"] == expected
    head = 768 * 768 + 768 + 768 * 2 + 2  # classifier (RoBERTa: dense + out_proj; DeBERTa: pooler + classifier)
    assert run["trainable_params"] == expected + head


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
    out = inspect(f"backbone.name={config_dirs['roberta-base']}", "training.batch_size=32",
                  "training.gradient_accumulation_steps=3", "training.epochs=2")
    assert out["runs"][0]["steps"] == 2 * 9  # ceil(ceil(800/32) / 3) = 9 per epoch


def test_inspect_reports_unknown_backbone_without_hanging(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lowrank_runner", "inspect", "recipes/quickstart.yaml", "--set", "backbone.name=someorg/no-such-model"],
        capture_output=True, text=True, cwd=REPO, timeout=60, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1
    assert "backbone 'someorg/no-such-model' is not a local directory" in proc.stderr
    assert "--set backbone.name=models/no-such-model" in proc.stderr
    assert "Traceback" not in proc.stderr
