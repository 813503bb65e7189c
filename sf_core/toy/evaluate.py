"""The paper's Table 2 in miniature: students scored by the detector on held-out prompts, at the trained length and
on a 4x longer rolling-window stream (window = the trained length, sink = the first chunk).

    python -m sf_core.toy.evaluate --student toy_recipe_state/student_self.safetensors --prompts 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..checkpoints import load_dit
from ..schedule import FlowSchedule
from ..wan.forward import WanBackbone
from .detect import detect
from .diffusion import FRAMES_PER_CHUNK, LATENT_FRAMES, SHIFT, ode_trajectories
from .metrics import mean_scores, score, windows
from .models import MODELS_DIR, Toy
from .world import held_out_prompts, render, scene_from_caption

LONG = 4  # the long stream is this many times the trained length
TRAINED_FRAMES = 1 + 4 * (LATENT_FRAMES - 1)  # 33 video frames


def evaluate_student(toy: Toy, prompts: list[str], seed: int = 0) -> dict:
    """Mean scores over prompts: 'trained' (33 frames), 'long' (all 33-frame windows of a 4x stream),
    'long_first' / 'long_last' (its first / last window) and 'drift' (last minus first)."""
    trained, long_all, first, last = [], [], [], []
    for i, p in enumerate(prompts):
        video = toy.generate(p, LATENT_FRAMES, seed=seed + i)
        trained.append(score(detect(video), p))
        video = toy.generate(p, LONG * LATENT_FRAMES, seed=seed + i, window=LATENT_FRAMES, sink=FRAMES_PER_CHUNK)
        parts = windows(detect(video), TRAINED_FRAMES)
        s = [score(d, p) for d in parts]
        long_all += s
        first.append(s[0])
        last.append(s[-1])
    out = {"trained": mean_scores(trained), "long": mean_scores(long_all), "long_first": mean_scores(first),
           "long_last": mean_scores(last)}
    out["drift"] = {k: out["long_last"][k] - out["long_first"][k] for k in out["trained"]}
    return out


@torch.no_grad()
def evaluate_autoencoder(toy: Toy, prompts: list[str], seed: int = 0) -> dict:
    """The same scores for rendered videos of the prompts passed through the autoencoder: the ceiling a DiT working
    in its latent space can reach."""
    def run(frames):
        out = []
        for i, p in enumerate(prompts):
            video, _ = render([scene_from_caption(p, seed + i)], frames)
            rec = toy.autoencoder.decode_normalized(toy.autoencoder.encode_normalized(video))[0]
            out.append([score(d, p) for d in windows(detect(rec), TRAINED_FRAMES)])
        return out

    trained = [s[0] for s in run(TRAINED_FRAMES)]
    long = run(1 + 4 * (LONG * LATENT_FRAMES - 1))
    out = {"trained": mean_scores(trained), "long": mean_scores([x for s in long for x in s]),
           "long_first": mean_scores([s[0] for s in long]), "long_last": mean_scores([s[-1] for s in long])}
    out["drift"] = {k: out["long_last"][k] - out["long_first"][k] for k in out["trained"]}
    return out


@torch.no_grad()
def evaluate_teacher(toy: Toy, teacher: Path, prompts: list[str], uncond: torch.Tensor, seed: int = 0) -> dict:
    """The bidirectional teacher at the trained length (its many-step CFG sampler, the whole clip at once): the
    reference the students distil. No stream, so no 4x row."""
    backbone = WanBackbone(load_dit(teacher)[0])
    scores = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        _, z = ode_trajectories(backbone, toy.encode([p]), uncond, g, FlowSchedule(SHIFT), (16, LATENT_FRAMES, 8, 8))
        scores.append(score(detect(toy.autoencoder.decode_normalized(z)[0]), p))
    return {"trained": mean_scores(scores), "long": None, "drift": None}


def evaluate_students(students: dict[str, Path], folder: Path = MODELS_DIR, prompts: int = 32, seed: int = 0,
                      log=print, seeds: int = 2, teacher: Path | None = None) -> dict:
    """{name: DiT file} -> {"prompts": [...], "results": {name: evaluate_student(...)}}: the first `prompts` held-out
    prompts, each with `seeds` seeds (videos: prompts x seeds, every one with its own seed)."""
    unique = held_out_prompts()[:prompts]
    chosen = unique * seeds
    toy = Toy.load(next(iter(students.values())), folder)
    results = {"world through the autoencoder (ceiling)": evaluate_autoencoder(toy, chosen, seed)}
    log(f"[evaluate] autoencoder ceiling: {json.dumps(results['world through the autoencoder (ceiling)']['trained'])}")
    if teacher is not None:
        uncond = toy.encode([""])
        results["bidirectional teacher (20 steps, CFG)"] = evaluate_teacher(toy, teacher, chosen, uncond, seed)
    for name, path in students.items():
        toy.backbone = WanBackbone(load_dit(path)[0])
        with torch.no_grad():
            results[name] = evaluate_student(toy, chosen, seed)
        log(f"[evaluate] {name}: {json.dumps(results[name]['trained'])}")
    return {"prompts": unique, "seeds_per_prompt": seeds, "seed": seed, "trained_frames": TRAINED_FRAMES,
            "long_frames": 1 + 4 * (LONG * LATENT_FRAMES - 1), "window": LATENT_FRAMES, "sink": FRAMES_PER_CHUNK,
            "results": results}


METRICS = ("colour", "shape", "motion", "consistency", "on_screen")


def markdown_table(table: dict) -> str:
    """The results as a markdown table: trained length, 4x stream (all windows), drift (last - first window)."""
    head = "| student | " + " | ".join(f"{m} @33" for m in METRICS[:4]) + " | " + \
        " | ".join(f"{m} @4x" for m in METRICS[:4]) + " | colour drift | shape drift |"
    rows = [head, "|" + "---|" * (2 + 8 + 2 - 1)]
    for name, r in table["results"].items():
        cells = [f"{r['trained'][m]:.2f}" for m in METRICS[:4]]
        if r.get("long") is None:  # not a stream (the bidirectional teacher)
            cells += ["—"] * 6
        else:
            cells += [f"{r['long'][m]:.2f}" for m in METRICS[:4]]
            cells += [f"{r['drift']['colour']:+.2f}", f"{r['drift']['shape']:+.2f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sf_core.toy.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", action="append", required=True, help="DiT file (repeat); name=path also works")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    p.add_argument("--models", default=str(MODELS_DIR), help="folder with the toy autoencoder and text encoder")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    students = dict((s.split("=", 1) if "=" in s else (Path(s).stem, s)) for s in args.student)
    table = evaluate_students({k: Path(v) for k, v in students.items()}, Path(args.models), args.prompts, args.seed,
                              log=lambda m: print(m, file=sys.stderr), seeds=args.seeds)
    print(markdown_table(table))
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
