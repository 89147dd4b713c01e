"""The embedded demo model `llmprune-tiny`: its config states the context it was trained on, the
quick start's defaults follow it, and its probes have signal (benchmarks/make_tiny_model.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmprune.eval import probes
from llmprune.io.load import EMBEDDED_MODELS
from llmprune.recipe import Calibration

ASSET = EMBEDDED_MODELS["llmprune-tiny"]


def test_config_context_is_the_training_window():
    config = json.loads((ASSET / "config.json").read_text())
    training = json.loads((ASSET / "training.json").read_text())
    assert config["max_position_embeddings"] == training["seqlen"] == training["max_positions"]
    assert f"Context: {training['seqlen']} tokens" in (ASSET / "README.md").read_text()
    # committed to git: small, safetensors only
    assert not list(ASSET.glob("*.bin")) and (ASSET / "model.safetensors").stat().st_size < 5e6


def test_default_calibration_uses_the_model_context():
    """`compress` with the default recipe (2048-token windows) calibrates on the model's 256 positions."""
    from llmprune.calibration.sets import calibration_set

    tokenizer = AutoTokenizer.from_pretrained(ASSET)
    config = SimpleNamespace(max_position_embeddings=json.loads((ASSET / "config.json").read_text())
                             ["max_position_embeddings"])
    calib = calibration_set(config, tokenizer, SimpleNamespace(calibration=Calibration(data="stdlib", samples=4)))
    assert calib.ids.shape == (4, config.max_position_embeddings)
    assert calib.spec["seqlen"] == config.max_position_embeddings


def test_dense_bracket_probe_beats_chance():
    """Greedy bracket closing on the suite's first 20 items (seed 0, excluded from training). A model
    that has not learned the skill scores ~0: a random closing of 1-4 brackets from 4 kinds is rarely exact."""
    tokenizer = AutoTokenizer.from_pretrained(ASSET)
    model = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    items = probes.make_brackets(20, seed=0)
    correct = 0
    for item in items:
        ids = tokenizer(item.prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(item.target) + 8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        correct += probes.score("brackets", item, tokenizer.decode(out[0, ids.shape[1]:]))
    assert correct / len(items) >= 0.75
