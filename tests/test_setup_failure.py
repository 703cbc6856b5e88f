"""A multi-run recipe whose first run fails before training for a cause every run shares
(the same backbone, the same data) stops at once: one error line, a non-zero exit, no
run directory left (train/setup_failure.py)."""

import shutil

from typer.testing import CliRunner

from lowrank_runner.cli import app


def run_cli(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)], env={"COLUMNS": "200"})


def assert_stopped_at_once(result, output, says: str) -> None:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1, result.output
    assert len(errors) == 1 and says in errors[0], result.output
    assert "the other run of this recipe uses" in errors[0] and "none was started" in errors[0], errors[0]
    assert " failed:" not in result.output and "seed1" not in result.output, result.output  # the second run never began
    assert not output.exists(), sorted(output.rglob("*"))


def without_weights(tiny_bert, tmp_path):
    """A copy of the tiny backbone without its weights: valid to lrr validate, not to load."""
    broken = tmp_path / "no-weights"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert / name, broken / name)
    return broken


def two_seeds(recipe, tmp_path, old: str, new: str):
    path = tmp_path / "two-seeds.yaml"
    path.write_text(recipe.read_text().replace(old, new).replace("seed: 0", "seed: [0, 1]"))
    return path


def test_a_backbone_that_cannot_load_stops_every_run_at_once(tiny_recipe, tiny_bert, tmp_path):
    path = two_seeds(tiny_recipe(), tmp_path, str(tiny_bert), str(without_weights(tiny_bert, tmp_path)))
    output = tmp_path / "out"
    assert_stopped_at_once(run_cli(path, "--output", output), output, "holds no weights")


def test_a_data_file_that_cannot_be_read_stops_every_run_at_once(tiny_recipe, sentiment_data, tmp_path):
    train = sentiment_data[0]
    lines = train.read_text().splitlines()
    lines[40] = '{"text": "cut off"'  # lrr validate reads the first lines only; loading the data finds it
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    path = two_seeds(tiny_recipe(), tmp_path, str(train), str(bad))
    output = tmp_path / "out"
    assert_stopped_at_once(run_cli(path, "--output", output), output, f"{bad}:41")


def test_without_output_the_timestamped_directory_is_removed_too(tiny_recipe, tiny_bert, tmp_path):
    recipe = tiny_recipe(f"output: {{dir: {tmp_path / 'runs'}}}\n")
    result = run_cli(two_seeds(recipe, tmp_path, str(tiny_bert), str(without_weights(tiny_bert, tmp_path))))
    assert result.exit_code == 1 and "none was started" in result.output, result.output
    assert not (tmp_path / "runs").exists()
