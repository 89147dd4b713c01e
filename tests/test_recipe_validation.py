"""Every recipe value is checked before a model loads, and the error names the file, the stage and the key."""
import pytest

from llmprune.errors import UserError
from llmprune.recipe import load_recipe


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("stage,match", [
    ("method: sparsegpt\n    sparsity: 0.5\n    block_size: 1.9", r"stages\[0\] \(sparsegpt\): 'block_size' must be an integer, got 1.9"),
    ("method: sparsegpt\n    sparsity: 0.5\n    block_size: 0", r"'block_size' must satisfy 1 <= block_size, got 0"),
    ("method: sparsegpt\n    sparsity: 0.5\n    dampening: -1", r"'dampening' must satisfy 0 <= dampening"),
    ("method: wanda\n    sparsity: true", r"stages\[0\] \(wanda\): 'sparsity' must be"),
    ("method: wanda\n    sparsity: 0.5\n    owl_m: 0", r"'owl_m' must satisfy 0 < owl_m"),
    ("method: wanda\n    sparsity: 0.5\n    true_sequential: yes please", r"'true_sequential' must be true or false"),
    ("method: wanda\n    sparsity: 0.5\n    allocation: best", r"'allocation' must be one of uniform, owl, global"),
    ("method: sparsegpt\n    sparsity: 2:4\n    block_size: 6", r"block_size 6 must be a multiple of M=4"),
    ("method: magnitude\n    sparsity: 0.5\n    true_sequential: true", r"magnitude uses no calibration data"),
    ("method: nope\n    sparsity: 0.5", r"unknown method 'nope'"),
    ("sparsity: 0.5", r"stages\[0\] is missing 'method'"),
    ("method: wanda", r"stages\[0\] \(wanda\) is missing 'sparsity'"),
])
def test_bad_values_name_file_stage_and_key(tmp_path, stage, match):
    with pytest.raises(UserError, match=match) as exc:
        load_recipe(write(tmp_path, f"stages:\n  - {stage}\n"))
    assert str(exc.value).startswith("recipe r.yaml: stages[0]")


def test_unquoted_nm_is_a_pattern_not_a_base60_number(tmp_path):
    recipe = load_recipe(write(tmp_path, "stages:\n  - method: wanda\n    sparsity: 2:4\n"))
    assert recipe.stages[0].params["sparsity"] == "2:4" and str(recipe.stages[0].pattern) == "2:4"


def test_recipe_as_run_round_trips(tmp_path):
    from llmprune.recipe import Recipe

    recipe = load_recipe(write(tmp_path, "stages:\n  - method: sparsegpt\n    sparsity: 0.7\n    block_size: 64\n"
                                         "  - method: width\n    mlp_keep: 0.5\n"))
    again = Recipe.from_dict(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
    assert again.stages[0].params == {"sparsity": 0.7, "block_size": 64}


def test_random_bytes_are_not_calibration_text(tmp_path):
    from llmprune.calibration.data import read_local_texts

    path = tmp_path / "x.txt"
    path.write_bytes(bytes(range(256)) * 80)
    with pytest.raises(UserError, match="does not look like text"):
        read_local_texts(path)


def test_every_shipped_recipe_loads_and_validates():
    from llmprune.recipe import load_recipe, named_recipes

    names = sorted(named_recipes())
    assert len(names) >= 10
    for name in names:
        recipe = load_recipe(name)          # YAML + every stage's keys checked, before any model exists
        assert recipe.stages and recipe.description, name
