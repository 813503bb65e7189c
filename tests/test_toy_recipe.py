"""The recipe is code: its first stages regenerate the shipped text encoder exactly, and a stage stopped part-way
continues from its checkpoint to the same weights as an uninterrupted run."""

import pytest
import torch
from safetensors.torch import load_file

from sf_core.toy import recipe as recipe_module
from sf_core.toy.models import shipped_files
from sf_core.toy.recipe import Recipe, RecipeConfig

TINY = RecipeConfig(ae_steps=2, ae_full_steps=1, decoder_steps=1, ae_batch=2, clips=4, teacher_steps=4,
                    teacher_batch=2, save_every=2)


def test_the_recipe_regenerates_the_shipped_text_encoder(tmp_path):
    Recipe(tmp_path / "work", tmp_path / "out").run(["tokenizer", "text_encoder"], log=lambda *a: None)
    made, shipped = load_file(str(tmp_path / "out" / "toy_umt5.safetensors")), load_file(str(shipped_files()["text_encoder"]))
    assert made.keys() == shipped.keys() and all(torch.equal(made[k], shipped[k]) for k in made)


def _teacher(tmp_path, name, monkeypatch=None, stop_after=None):
    work, out = tmp_path / name, tmp_path / f"{name}_out"
    r = Recipe(work, out, TINY)
    r.run(["tokenizer", "text_encoder", "autoencoder", "dataset"], log=lambda *a: None)
    if stop_after is not None:
        calls = []
        real = recipe_module.flow_matching_loss

        def failing(*a, **k):
            calls.append(1)
            if len(calls) > stop_after:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the stage
            return real(*a, **k)

        monkeypatch.setattr(recipe_module, "flow_matching_loss", failing)
        with pytest.raises(KeyboardInterrupt):
            Recipe(work, out, TINY).run(["teacher"], log=lambda *a: None)
        assert not Recipe(work, out, TINY).done("teacher")
        calls.clear()
        monkeypatch.setattr(recipe_module, "flow_matching_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    Recipe(work, out, TINY).run(["teacher"], log=lambda *a: None)
    steps_run = len(calls) if stop_after is not None else TINY.teacher_steps
    return load_file(str(work / "teacher.safetensors")), steps_run


def test_a_stopped_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    straight, _ = _teacher(tmp_path, "straight")
    resumed, steps_run = _teacher(tmp_path, "resumed", monkeypatch, stop_after=3)  # stopped in step 4
    assert steps_run == 2  # continued from the checkpoint of step 2, not from the start
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
