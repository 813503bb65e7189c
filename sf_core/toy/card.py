"""The model card of the embedded toy models (written by the recipe's `ship` stage)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import load_file

from ..config import WanConfig
from .diffusion import FRAMES_PER_CHUNK, SHIFT, STEPS
from .evaluate import markdown_table
from .models import FILES
from .world import BACKGROUND_NAMES, COLOURS, FPS, GRAMMAR, MOTION_PHRASES, SHAPES, SIZE, TRAIN_BACKGROUNDS, TRAIN_OBJECTS


def model_card(table: dict, state: dict, folder: Path, detector: dict, config) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(config).items())
    dit = load_file(str(folder / FILES["dit"]))
    cfg, params = WanConfig.from_state_dict(dit), sum(v.numel() for v in dit.values())
    sizes = "\n".join(f"| {k} | `{v}` | {(folder / v).stat().st_size / 1e6:.2f} MB |" for k, v in FILES.items())
    stages = "\n".join(f"| {name} | {rec.get('cpu_s', 0):.0f} | {rec.get('wall_s', 0):.0f} |"
                       for name, rec in state["stages"].items())
    return f"""# Toy Self Forcing models (embedded default)

Small models trained in a procedural world with this project's own code paths, so that the pack runs out of the
box (`python -m sf_core generate --prompt "..." -o demo.mp4`, no downloads) and so that behaviour (prompt switching,
attention sink, image-to-video, Self Forcing vs Teacher / Diffusion Forcing) can be tested against ground truth.
They are not a video model of the real world: for real use load the Self Forcing / Wan2.1 weights.

| part | file | size |
|---|---|---|
{sizes}

## World
`sf_core/toy/world.py`: {SIZE}x{SIZE} pixels, {FPS} fps, 1-3 coloured shapes ({len(COLOURS)} colours: {", ".join(COLOURS)};
{len(SHAPES)} shapes: {", ".join(SHAPES)}) on a {", ".join(BACKGROUND_NAMES[:-1])} or {BACKGROUND_NAMES[-1]} background,
each with one motion ({", ".join(MOTION_PHRASES.values())}), optionally a camera pan over the tiled floor; the screen
wraps around (torus). Captions follow a grammar, e.g. "a red circle moves right on a grey background". About one
(colour, shape, motion) combination in nine is held out of training (`world.held_out`). The models are trained on
{" and ".join(TRAIN_BACKGROUNDS)} backgrounds, one object in {TRAIN_OBJECTS[0]:.0%} of the clips and two in the rest;
their captions: {GRAMMAR}.

## Models (real formats, real loaders)
- text encoder `{FILES['text_encoder']}`: a 2-layer UMT5 (dim 64, `sf_core.text.UMT5Encoder`), frozen random
  weights, with a word-level sentencepiece tokenizer trained on the grammar embedded as `spiece_model`
  (ComfyUI text-encoder layout; `sf_core.text.load_text_encoder`).
- autoencoder `{FILES['autoencoder']}`: the TAEHV architecture (encoder and decoder, `sf_core.vae.taehv`),
  16 latent channels, 8x spatial and 4x temporal compression, trained on rendered clips; reads and writes the DiT's
  normalised latents; its first three channels are held to a thumbnail of the frame (each 8x8 block's mean colour),
  the others to unit statistics.
- DiT `{FILES['dit']}`: Wan2.1 DiT layout (dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} head of {cfg.head_dim},
  text dim {cfg.text_dim}, patch {"x".join(map(str, cfg.patch_size))}, {params / 1e6:.2f}M parameters;
  `sf_core.checkpoints.load_dit`), the causal chunk-wise Self Forcing student, tuned for re-cached prompt switches:
  chunks of {FRAMES_PER_CHUNK} latent frames, steps {"/".join(str(int(t)) for t in STEPS)}, shift {SHIFT:g}.

## Recipe (`python -m sf_core.toy.recipe`, resumable, from seeds)
1. tokenizer and frozen random UMT5; 2. autoencoder on rendered clips; 3. dataset: rendered 33-frame clips encoded
to latents; 4. teacher: bidirectional Wan DiT, flow matching, 10% caption dropout (empty caption = unconditional);
5. ODE trajectories of the teacher (Euler, CFG) kept at the student's step timesteps; 6. student: ODE regression
(block-causal attention, earlier chunks clean in the context); 7. DMD with `sf_core.train.Trainer` (teacher = real
score, critic = teacher + LoRA) from that student, equal iterations for Self Forcing, Teacher Forcing and Diffusion
Forcing rollouts; 8. prompt-switch tuning of the Self Forcing student: DMD on Self Forcing rollouts whose prompt
switches with a re-cache at a random chunk to another training prompt, the frames after the switch judged as a clip
of their own under the new prompt (the teacher never sees the old scene under the new caption); 9. evaluation;
10. ship the switch-tuned Self Forcing student (LoRA merged).

Settings (the defaults of `RecipeConfig`, each a flag of the command): {settings}.

CPU time per stage (seconds, `time.process_time` of the recipe process; wall time on a shared 2-core machine):

| stage | CPU s | wall s |
|---|---|---|
{stages}

## Detector (`python -m sf_core.toy.detect --scenes 64 --frames 33`)
On {detector['objects_x_frames']} object-frames of rendered videos (1-3 objects, all backgrounds and pans, held-out
combinations included): colour recall {detector['colour_recall']:.3f}, shape accuracy {detector['shape_accuracy']:.3f},
centre within 2 px {detector['centre_within_2px']:.3f}, false colours per frame {detector['false_colours_per_frame']:.3f}.

## Metrics (held-out prompts, detector `sf_core.toy.detect`)
{len(table['prompts'])} held-out single-object prompts on a grey background, {table.get('seeds_per_prompt', 1)} seeds each. "@33": the trained
length (33 frames); "@4x": every 33-frame window of a {table['long_frames']}-frame rolling-window stream (window
{table['window']} latent frames, sink {table['sink']}); drift: last window minus first window. Re-cached switch: the
prompt switches to the same caption with the next colour at chunk 2 of a 12-latent-frame stream (`switch="recache"`);
"followed": share of the last 4 frames of the second chunk after it whose dominant colour is the new one; "in place":
share of switches followed with the subject where it was (centre one chunk after within 8 px of its last centre).

{markdown_table(table)}

## What the models do and do not do
Tested in `tests/test_toy_models.py` (thresholds from the table above): the shipped student draws the prompt's
colour on held-out prompts, keeps a start image's object (image-to-video), keeps its object on screen over a 4x
longer rolling-window stream with a sink, a prompt switch by cut starts the new prompt's scene at its chunk, and a
re-cached switch turns the subject to the new colour within two chunks (the untuned Self Forcing student mostly kept
the cached colour). The attention sink (`python -m sf_core.toy.evaluate --sink DIT`, 8x streams, 18 held-out prompts
x 3 seeds, subject on screen in the last 33 frames): 0.85 with and 0.77 without for the Self Forcing student before
switch tuning; the shipped student keeps its subject without one too (0.86 / 0.86). Strict expected failures there:
- shapes and motions are at chance for every model, the bidirectional teacher included. The teacher barely reads
  motion from the caption: `python -m sf_core.toy.evaluate --steer toy_recipe_state/teacher.safetensors` re-noises
  clips of one motion to a sigma and samples them back under another motion's caption; from pure noise the
  caption's motion came out in 0.22 of 18 videos (chance 0.11), from sigma 0.7 the clip's motion was kept in 0.61
  and the caption's in 0.11, from 0.5 the clip's in all. A token per latent cell (`--dit-patch 1`, 1200 steps for
  about the same CPU time) scored lower on every metric (colour 0.44, shape 0.18, motion 0.06);
- a re-cached switch mostly does not keep the subject in place: the old object fades and the new colour appears
  elsewhere (column "in place"); the tuning costs some consistency (compare the two Self Forcing rows) and some
  image-to-video fidelity (`python -m sf_core.toy.evaluate --i2v DIT`, 8 start images: the subject a median 8.2 px
  from where the image had it and 3 of 8 drifting beyond 9 px, against 4.5 px and none before switch tuning);
- video-to-video changes the colour only from strength 0.8, where the input's position is no longer followed.
The toy defaults of `generate` therefore switch prompts by cut.

## Licence
Apache-2.0, like the rest of the project. The weights are generated entirely by the recipe from seeds; no external
data or weights.
"""
