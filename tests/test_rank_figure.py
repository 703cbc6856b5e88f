"""``lrr report --ranks``: the final rank patterns of several runs side by side, one
colour scale (TriAdaptLoRA Figure 2: TriAdaptLoRA, AdaLoRA and IncreLoRA on MNLI)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from lowrank_runner.cli import app

METHODS = {  # 12 steps: grows twice / prunes in its decay
    "triadaptlora": "{name: triadaptlora, r: 1, r_ref: 3, grow_by: 1, growth: fixed_k, fixed_k: 1, t_init: 2, grow_interval: 3}",
    "lora2": "{name: lora2, r: 4, target_rank: 2, t_init: 2, t_final: 2, mask_interval: 2}",
    # IncreLoRA, Figure 2's third method: rank 1 to 3 on average, 2 of the 4 modules grow per step
    "increlora": "{name: increlora, r: 1, target_rank: 3, top_h: 2, incre_rank_num: 1, init_warmup: 1, "
                 "incre_interval: 1}",
}


def lrr(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, sentiment_data):
    from tests.conftest import tiny_recipe_text

    root = tmp_path_factory.mktemp("ranks")
    for name, method in METHODS.items():
        path = root / f"{name}.yaml"
        path.write_text(tiny_recipe_text(tiny_bert, sentiment_data).replace("{name: lora, r: 4, alpha: 8}", method)
                        .replace("name: tiny", f"name: {name}"))
        code, out, err = lrr("run", path, "--output", root / name)
        assert code == 0, out + err
    return root


def test_the_runs_rank_patterns_side_by_side(runs, tmp_path):
    figure = tmp_path / "fig2.png"
    code, out, err = lrr("report", "--ranks", *(runs / m for m in METHODS), "--figure", figure, "--json")
    assert code == 0 and f"figure written to {figure} (3 run(s))" in err
    panels = json.loads(out)
    assert [p["title"] for p in panels] == ["triadaptlora", "lora2", "increlora"]
    for panel, name in zip(panels, METHODS):
        pattern = json.loads((runs / name / "rank_pattern.json").read_text())
        assert panel["targets"] == ["Wq", "Wv"] and panel["layers"] == [0, 1]
        assert sum(map(sum, panel["ranks"])) == panel["total_rank"] == sum(pattern.values())
        layer1_query = next(v for k, v in pattern.items() if ".1." in k and k.endswith("query"))
        assert panel["ranks"][1][0] == layer1_query
    assert panels[0]["total_rank"] == 3 * 4 and panels[1]["total_rank"] == 2 * 4  # r_ref x modules, target x modules
    assert panels[2]["total_rank"] == 3 * 4  # target_rank x modules
    width, height = Image.open(figure).size
    assert width > 2 * height > 200  # three panels side by side


def test_ranks_refuses_what_it_cannot_draw(runs, tmp_path, tiny_recipe):
    fixed = tmp_path / "lora"
    assert lrr("run", tiny_recipe(), "--output", fixed)[0] == 0
    tmp_path = tmp_path / "figures"  # not the recipe's directory
    tmp_path.mkdir()
    code, _, err = lrr("report", "--ranks", runs / "lora2", fixed, "--figure", tmp_path / "f.png")
    assert code == 2 and "no rank_pattern.json: lora keeps its ranks fixed" in err and not (tmp_path / "f.png").exists()
    code, _, err = lrr("report", "--ranks", runs / "lora2")
    assert code == 2 and "--ranks needs --figure FILE.png" in err
    code, _, err = lrr("report", "--ranks", runs / "lora2", "--figure", tmp_path / "f.jpg")
    assert code == 2 and "give a file ending in .png" in err
    code, _, err = lrr("report", "--ranks", "--table", runs / "lora2", "--figure", tmp_path / "f.png")
    assert code == 2 and "give one of them" in err
    damaged = shutil.copytree(runs / "lora2", tmp_path / "damaged")
    (damaged / "rank_pattern.json").write_text("[1, 2]")
    code, _, err = lrr("report", "--ranks", damaged, "--figure", tmp_path / "f.png")
    assert code == 2 and "rank_pattern.json: not a mapping of module paths to ranks" in err
