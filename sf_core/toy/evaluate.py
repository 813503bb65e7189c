"""The paper's Table 2 in miniature: students scored by the detector on held-out prompts, at the trained length and
on a 4x longer rolling-window stream (window = the trained length, sink = the first chunk).

    python -m sf_core.toy.evaluate --student toy_recipe_state/student_self.safetensors --prompts 32
    python -m sf_core.toy.evaluate --steer toy_recipe_state/teacher.safetensors   # where the teacher decides motion
    python -m sf_core.toy.evaluate --sink sf_core/toy/models/toy_self_forcing_dit.safetensors   # the sink's effect
    python -m sf_core.toy.evaluate --i2v sf_core/toy/models/toy_self_forcing_dit.safetensors    # start image kept
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
from .diffusion import FRAMES_PER_CHUNK, LATENT_FRAMES, SHIFT, guided_flow, ode_trajectories
from .metrics import JUMP, classify_motion, mean_scores, score, subject, windows, wrap
from .models import MODELS_DIR, Toy
from .world import (COLOUR_NAMES, MOTION_PHRASES, ObjectSpec, Scene, caption, held_out_prompts, parse_caption, render,
                    scene_from_caption)

LONG = 4  # the long stream is this many times the trained length
STILL_RADIUS = 9.0  # the smallest half extent of a still object in the world (pixels)
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


SWITCH_CHUNK = 2  # the re-cached prompt switch of `evaluate_switch` comes at this chunk of a four-chunk stream
SWITCH_STREAM = 4 * FRAMES_PER_CHUNK  # its latent frames


def recoloured(text: str) -> str:
    """The caption with its subject in the next colour of the world's list (a one-attribute prompt edit)."""
    objects, bg, pan = parse_caption(text)
    colour, shape, motion = objects[0]
    new = COLOUR_NAMES[(COLOUR_NAMES.index(colour) + 1) % len(COLOUR_NAMES)]
    return caption(Scene(tuple(ObjectSpec(*o) for o in [(new, shape, motion), *objects[1:]]), bg, pan))


CHUNK_FRAMES = 4 * FRAMES_PER_CHUNK  # video frames per chunk after the first (the first has 1 + 4 (n - 1))


def first_frame_of_chunk(k: int) -> int:
    """The first video frame decoded from latent chunk k."""
    return 0 if k == 0 else 1 + 4 * (FRAMES_PER_CHUNK - 1) + CHUNK_FRAMES * (k - 1)


def evaluate_switch(toy: Toy, prompts: list[str], seed: int = 0) -> dict:
    """Re-cached prompt switches that change the subject's colour, at chunk SWITCH_CHUNK of a rolling stream:
    'followed': share of the last four frames of the second chunk after the switch whose dominant colour is the
    new one; 'in_place': share of switches followed (>= 3 of those 4 frames) with the subject where it was (its
    centre one chunk after the switch within JUMP of its last centre before)."""
    followed, in_place = [], []
    chunk, at = CHUNK_FRAMES, first_frame_of_chunk(SWITCH_CHUNK)
    for i, p in enumerate(prompts):
        q = recoloured(p)
        video = toy.generate([(0, p), (SWITCH_CHUNK, q)], SWITCH_STREAM, seed=seed + i, window=LATENT_FRAMES,
                             sink=FRAMES_PER_CHUNK, switch="recache")
        det = detect(video)
        old, new = subject(p)[0], subject(q)[0]
        share = (det.dominant[at + 2 * chunk - 4 : at + 2 * chunk] == new).float().mean()
        jump = wrap(det.centre[at + chunk, new] - det.centre[at - 1, old]).abs().max()
        followed.append(float(share))
        in_place.append(float(share >= 0.75 and bool(det.present[at - 1, old]) and float(jump) < JUMP))
    return {"followed": sum(followed) / len(followed), "in_place": sum(in_place) / len(in_place)}


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


@torch.no_grad()
def sink_effect(toy: Toy, prompts: list[str], length: int = 8, seeds: int = 3) -> dict:
    """The attention sink's effect on a long rolling-window stream (`length` x the trained length, window = the
    trained length): {sink: share of the last 33 frames with the subject on screen}, for a sink of one chunk and for
    none, over prompts x seeds (the same seeds for both)."""
    out = {}
    for sink in (FRAMES_PER_CHUNK, 0):
        seen = []
        for r in range(seeds):
            for i, p in enumerate(prompts):
                video = toy.generate(p, length * LATENT_FRAMES, seed=i + 100 * r, window=LATENT_FRAMES, sink=sink)
                seen.append(detect(video[:, -TRAINED_FRAMES:]).present[:, subject(p)[0]].float().mean())
        out[sink] = float(torch.stack(seen).mean())
    return out


@torch.no_grad()
def start_image_kept(toy: Toy, images: int = 8,
                     prompt: str = "a yellow square stays still on a grey background") -> dict:
    """Image-to-video: a rendered start image of a still object, then `LATENT_FRAMES - 1` generated latent frames.
    -> {"median_px": median over all frames of all videos of the subject's distance (on the torus, the larger axis)
    from where the image had it, "drifted": share of videos whose own median exceeds the smallest object radius,
    "on_screen": the lowest share of frames with the subject on screen in any video}."""
    colour = subject(prompt)[0]
    errors, drifted, on_screen = [], 0, 1.0
    for seed in range(images):
        scene = scene_from_caption(prompt, seed=4 + seed)
        image, truth = render([scene], 1)
        video = toy.generate(prompt, LATENT_FRAMES - 1, seed=seed, prefix=toy.autoencoder.encode_normalized(image))
        det = detect(video)
        err = wrap(det.centre[:, colour] - truth.centre[0, 0, 0]).abs().amax(-1)
        errors.append(err)
        drifted += float(err.median()) > STILL_RADIUS
        on_screen = min(on_screen, float(det.present[:, colour].float().mean()))
    return {"median_px": float(torch.cat(errors).median()), "drifted": drifted / images, "on_screen": on_screen}


STEER_PAIRS = (("right", "left"), ("left", "right"), ("still", "up"), ("up", "down"), ("grow", "shrink"), ("orbit", "still"))


@torch.no_grad()
def motion_steering(toy: Toy, teacher: Path, sigmas=(1.0, 0.85, 0.7, 0.5), seeds: int = 3, n: int = 20) -> dict:
    """Where the bidirectional teacher decides motion: a rendered clip of a red circle with one motion is noised to
    sigma and sampled back (Euler, CFG) under the caption of another motion. -> {sigma: {"target": share of videos
    with the caption's motion, "source": share with the clip's}}. A teacher that reads motion from text follows the
    caption at high sigma; one whose motion comes from the noise does not."""
    backbone = WanBackbone(load_dit(teacher)[0])
    uncond = backbone.encode_text(toy.encode([""]))
    red = COLOUR_NAMES.index("red")
    out = {}
    for sigma in sigmas:
        target = source = total = 0
        for src, dst in STEER_PAIRS:
            kv = backbone.encode_text(toy.encode([f"a red circle {MOTION_PHRASES[dst]} on a grey background"]))
            for seed in range(seeds):
                scene = scene_from_caption(f"a red circle {MOTION_PHRASES[src]} on a grey background", seed)
                x0 = toy.autoencoder.encode_normalized(render([scene], TRAINED_FRAMES)[0])
                g = torch.Generator().manual_seed(seed)
                x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
                levels = [sigma * (1 - i / n) for i in range(n + 1)]
                for a, b in zip(levels[:-1], levels[1:]):
                    x = x + (b - a) * guided_flow(backbone, x, a, kv, uncond)
                det = detect(toy.autoencoder.decode_normalized(x)[0])
                got = classify_motion(det.centre[:, red], det.size[:, red], det.present[:, red])
                target, source, total = target + (got == dst), source + (got == src), total + 1
        out[sigma] = {"target": target / total, "source": source / total}
    return out


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
            results[name]["switch"] = evaluate_switch(toy, chosen, seed)
        log(f"[evaluate] {name}: {json.dumps(results[name]['trained'])}")
    return {"prompts": unique, "seeds_per_prompt": seeds, "seed": seed, "trained_frames": TRAINED_FRAMES,
            "long_frames": 1 + 4 * (LONG * LATENT_FRAMES - 1), "window": LATENT_FRAMES, "sink": FRAMES_PER_CHUNK,
            "results": results}


METRICS = ("colour", "shape", "motion", "consistency", "on_screen")


def markdown_table(table: dict) -> str:
    """The results as a markdown table: trained length, 4x stream (all windows), drift (last - first window)."""
    head = "| student | " + " | ".join(f"{m} @33" for m in METRICS[:4]) + " | " + \
        " | ".join(f"{m} @4x" for m in METRICS[:4]) + " | colour drift | shape drift | re-cached switch followed | in place |"
    rows = [head, "|" + "---|" * (2 + 8 + 2 + 2 - 1)]
    for name, r in table["results"].items():
        cells = [f"{r['trained'][m]:.2f}" for m in METRICS[:4]]
        if r.get("long") is None:  # not a stream (the bidirectional teacher)
            cells += ["—"] * 6
        else:
            cells += [f"{r['long'][m]:.2f}" for m in METRICS[:4]]
            cells += [f"{r['drift']['colour']:+.2f}", f"{r['drift']['shape']:+.2f}"]
        switch = r.get("switch")
        cells += ["—"] * 2 if switch is None else [f"{switch['followed']:.2f}", f"{switch['in_place']:.2f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sf_core.toy.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", action="append", default=[], help="DiT file (repeat); name=path also works")
    p.add_argument("--sink", metavar="DIT", help="instead: on-screen share in the last 33 frames of an 8x stream with "
                   "and without the attention sink, for this DiT (held-out prompts x 3 seeds)")
    p.add_argument("--i2v", metavar="DIT", help="instead: how well this DiT keeps a start image's object in place "
                   "(8 start images)")
    p.add_argument("--steer", metavar="TEACHER", help="instead: where this bidirectional teacher decides motion "
                   "(a clip re-noised to each sigma, sampled under another motion's caption)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    p.add_argument("--models", default=str(MODELS_DIR), help="folder with the toy autoencoder and text encoder")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.steer:
        steer = motion_steering(Toy.load(args.steer, Path(args.models)), Path(args.steer))
        print("| sigma | follows the caption's motion | keeps the clip's motion |\n|---|---|---|")
        for sigma, r in steer.items():
            print(f"| {sigma:g} | {r['target']:.2f} | {r['source']:.2f} |")
        return 0
    if args.sink:
        effect = sink_effect(Toy.load(args.sink, Path(args.models)), held_out_prompts()[: args.prompts])
        print(f"on screen in the last 33 frames at 8x: sink {FRAMES_PER_CHUNK}: {effect[FRAMES_PER_CHUNK]:.3f}, "
              f"no sink: {effect[0]:.3f}")
        return 0
    if args.i2v:
        kept = start_image_kept(Toy.load(args.i2v, Path(args.models)))
        print(f"image-to-video, 8 start images: the subject {kept['median_px']:.1f} px from where the image had it "
              f"(median over all frames), {kept['drifted']:.2f} of the videos drifted beyond {STILL_RADIUS:g} px")
        return 0
    if not args.student:
        p.error("give --student (or --sink, --i2v or --steer)")
    students = dict((s.split("=", 1) if "=" in s else (Path(s).stem, s)) for s in args.student)
    table = evaluate_students({k: Path(v) for k, v in students.items()}, Path(args.models), args.prompts, args.seed,
                              log=lambda m: print(m, file=sys.stderr), seeds=args.seeds)
    print(markdown_table(table))
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
