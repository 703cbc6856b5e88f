"""bench/bench_memory.py's own logic (not its numbers): every configuration's ``--set``
overrides make a recipe that ``lrr`` loads and validates with the settings it names, and
the table's ratios pair ours with PEFT's run of the same configuration."""

import importlib.util
from pathlib import Path

import pytest

from lowrank_runner.recipe.load import load_recipe

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", ["fp32", "bf16-ckpt", "nf4-ckpt"])
def test_each_configuration_is_a_valid_recipe_with_its_settings(bench, tmp_path, config):
    pytest.importorskip("bitsandbytes")
    import transformers

    transformers.LlamaConfig(**bench.SHAPES["tiny"]).save_pretrained(tmp_path / "model")  # validation reads config.json
    recipe = bench.write_recipe(tmp_path, tmp_path / "model", r=8, seq=64)
    run = load_recipe(recipe, bench.recipe_overrides(config)).runs[0].config
    dtype, checkpointing, bits = bench.CONFIGS[config]
    assert run["backbone"]["dtype"] == dtype
    assert run["training"]["gradient_checkpointing"] is checkpointing
    assert (run["backbone"]["quantization"] or {}).get("bits") == bits
    assert run["method"]["r"] == 8 and run["method"]["alpha"] == 16
    if bits:
        assert run["backbone"]["quantization"]["type"] == "nf4" and run["backbone"]["quantization"]["double_quant"] is True


def test_ratios_pair_ours_with_peft_of_the_same_configuration(bench):
    same = {"model_mb": 10.0, "load_peak_mb": 120.0, "trainable": 64, "first_loss": 6.0}
    results = [{"config": "fp32", "impl": "ours", "train_peak_mb": 90.0, "median_step_s": 2.0, **same},
               {"config": "fp32", "impl": "peft", "train_peak_mb": 100.0, "median_step_s": 4.0, **same},
               {"config": "bf16", "impl": "ours", "train_peak_mb": 45.0, "median_step_s": 1.0, **same},
               {"config": "bf16", "impl": "peft", "error": "failed"}]
    rows = {(r["config"], r["impl"]): r for r in bench.table(results, ["fp32", "bf16"], ["ours", "peft"])}
    assert rows["fp32", "ours"]["peak_vs_peft"] == pytest.approx(0.9)
    assert rows["fp32", "ours"]["time_vs_peft"] == pytest.approx(0.5)
    assert rows["fp32", "peft"]["peak_vs_peft"] is None
    assert rows["bf16", "ours"]["peak_vs_peft"] is None  # PEFT's run failed: no ratio
    assert rows["bf16", "ours"]["peak_vs_fp32"] == pytest.approx(0.5)
    text = bench.markdown(list(rows.values()), "cpu")
    assert "| fp32 | ours | 2.000 | 0.500 | 90 | 0.900 | 1.000 |" in text and "| bf16 | peft | failed: failed |" in text
