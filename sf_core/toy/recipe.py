"""The recipe of the embedded models, as code: `python -m sf_core.toy.recipe` regenerates every shipped file from
seeds, stage by stage, resumable (a stopped run continues where it stopped), with progress bars.

Stages (outputs in --work unless shipped):
  tokenizer      sentencepiece trained on the caption grammar
  text_encoder   small frozen random UMT5 + the tokenizer          -> models/toy_umt5.safetensors
  autoencoder    TAEHV architecture trained on rendered clips      -> models/toy_taehv.safetensors
  dataset        rendered clips encoded to latents, their captions
  decoder        the autoencoder's decoder alone, longer on whole frames (latents unchanged)
                                                                    -> models/toy_taehv.safetensors
  teacher        bidirectional Wan DiT, flow matching, caption dropout
  ode            teacher ODE trajectories (CFG) at the student's steps
  student        causal student initialised by ODE regression
  dmd_self, dmd_teacher, dmd_diffusion
                 DMD (sf_core.train.Trainer) from the same student, equal iterations, with the cache holding the
                 student's own chunks (Self Forcing) / ground truth (Teacher Forcing) / noised ground truth
                 (Diffusion Forcing)
  dmd_switch     the Self Forcing student tuned on rollouts whose prompt switches (re-cache) at a random chunk,
                 the frames after the switch judged as a clip of their own under the new prompt
  evaluate       held-out prompts, trained length, a 4x longer rolling-window stream and re-cached colour
                 switches                                           -> table.json
  ship           the switch-tuned Self Forcing student              -> models/toy_self_forcing_dit.safetensors,
                 and the model card                                 -> models/MODEL_CARD.md
Every stage records its CPU time (process time) and wall time in <work>/state.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..checkpoints import load_dit
from ..errors import SelfForcingError
from ..io import atomic_path
from ..schedule import FlowSchedule
from ..text import load_text_encoder
from ..train.trainer import Trainer, TrainSettings
from ..vae.taehv import TAEHV
from ..wan.forward import WanBackbone
from .autoencoder import cosine_lr, new_autoencoder, state_dict_for_file, train_autoencoder
from .card import model_card
from .detect import accuracy
from .diffusion import (CAPTION_DROPOUT, FRAMES_PER_CHUNK, GUIDANCE, LATENT_FRAMES, SHIFT, STEPS, flow_matching_loss,
                        new_dit, ode_regression_loss, ode_trajectories)
from .evaluate import evaluate_students
from .models import FILES, MODELS_DIR
from .text import random_text_encoder, train_tokenizer
from .world import TRAIN_BACKGROUNDS, TRAIN_OBJECTS, caption, render, sample_scene

STAGES = ("tokenizer", "text_encoder", "autoencoder", "dataset", "decoder", "teacher", "ode", "student",
          "dmd_self", "dmd_teacher", "dmd_diffusion", "dmd_switch", "evaluate", "ship")
TEXT_LEN = 32  # caption embeddings are stored this long (the grammar's longest caption is shorter); zeros follow


@dataclass(frozen=True)
class RecipeConfig:
    seed: int = 0
    ae_steps: int = 3000
    ae_full_steps: int = 800
    decoder_steps: int = 250
    ae_batch: int = 8
    ae_lr: float = 1e-3
    clips: int = 1536
    teacher_steps: int = 4000
    teacher_batch: int = 16
    teacher_lr: float = 1e-3
    dit_patch: int = 2
    ode_count: int = 512
    ode_steps: int = 20
    student_steps: int = 800
    student_batch: int = 16
    student_lr: float = 2e-4
    dmd_iterations: int = 600
    dmd_batch: int = 8
    dmd_rank: int = 32
    dmd_lr: float = 3e-4
    dmd_critic_lr: float = 6e-4
    dmd_critic_ratio: int = 2
    switch_iterations: int = 600  # dmd_switch: iterations of prompt-switch tuning from the Self Forcing student
    switch_share: float = 1.0  # dmd_switch: share of rollouts whose prompt switches
    eval_prompts: int = 24
    save_every: int = 100


def _bar(total: int, initial: int, desc: str):

    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, mininterval=10.0, dynamic_ncols=True)


def _save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _save_st(sd: dict, path: Path, metadata: dict | None = None) -> None:

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    path.chmod(0o644)  # package data, readable by all


class Recipe:
    def __init__(self, work: Path, out: Path = MODELS_DIR, config: RecipeConfig = RecipeConfig()):
        self.work, self.out, self.cfg = Path(work), Path(out), config
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = self.work / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.state.setdefault("stages", {})

    # ---- bookkeeping -------------------------------------------------------------------------
    def _write_state(self, stage: str) -> None:
        """Write this stage's record into the file as it is now (another process may run other stages)."""
        on_disk = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"stages": {}}
        on_disk["stages"][stage] = self.state["stages"][stage]
        self.state = on_disk
        with atomic_path(self.state_path) as tmp:
            Path(tmp).write_text(json.dumps(self.state, indent=2))

    def done(self, stage: str) -> bool:
        if self.state_path.exists():
            self.state["stages"].update(json.loads(self.state_path.read_text())["stages"])
        return self.state["stages"].get(stage, {}).get("done", False)

    def run(self, stages=STAGES, log=print) -> dict:
        for stage in stages:
            if stage not in STAGES:
                raise SelfForcingError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        for stage in stages:
            if self.done(stage):
                log(f"[recipe] {stage}: done before ({self.state['stages'][stage]['cpu_s']:.0f} s CPU)")
                continue
            rec = self.state["stages"].setdefault(stage, {"cpu_s": 0.0, "wall_s": 0.0})
            cpu, wall = time.process_time(), time.time()
            log(f"[recipe] {stage}: start")
            info = getattr(self, "stage_" + stage)() or {}
            rec["cpu_s"] += time.process_time() - cpu
            rec["wall_s"] += time.time() - wall
            rec.update(info, done=True, config=dataclasses.asdict(self.cfg))
            self._write_state(stage)
            log(f"[recipe] {stage}: done in {rec['cpu_s']:.0f} s CPU, {rec['wall_s']:.0f} s wall {json.dumps(info)}")
        return self.state

    # ---- shared pieces -----------------------------------------------------------------------
    def text_encoder(self):
        return load_text_encoder(self.out / FILES["text_encoder"])

    def embed(self, captions: list[str]) -> torch.Tensor:
        """captions -> [N, TEXT_LEN, 64] (the encoder's output is zero after the last token)."""
        with self.text_encoder() as te:
            emb = te.encode(captions).float()
        if emb[:, TEXT_LEN:].abs().max() > 0:
            raise SelfForcingError(f"a caption is longer than {TEXT_LEN} tokens")
        return emb[:, :TEXT_LEN].contiguous()

    def autoencoder(self):
        return TAEHV.from_state_dict(load_file(str(self.out / FILES["autoencoder"])))

    def _dit(self, path: Path):
        return load_dit(path)[0]

    # ---- stages ------------------------------------------------------------------------------
    def stage_tokenizer(self):
        spm = train_tokenizer(self.cfg.seed)
        with atomic_path(self.work / "spiece.model") as tmp:
            Path(tmp).write_bytes(spm)
        return {"bytes": len(spm)}

    def stage_text_encoder(self):
        sd = random_text_encoder((self.work / "spiece.model").read_bytes(), self.cfg.seed)
        _save_st(sd, self.out / FILES["text_encoder"])
        return {"params": sum(v.numel() for k, v in sd.items() if k != "spiece_model")}

    def stage_autoencoder(self):
        c = self.cfg
        ckpt = self.work / "autoencoder.ckpt.pt"
        model = new_autoencoder(c.seed)
        opt = torch.optim.Adam(model.parameters(), lr=c.ae_lr)
        step = 0
        if ckpt.exists():
            st = torch.load(ckpt, weights_only=True)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            step = st["step"]
        bar = _bar(c.ae_steps, step, "autoencoder")
        last = {}
        cpu, wall = time.process_time(), time.time()

        def on_step(k, info):
            nonlocal cpu, wall
            last.update(info)
            bar.update(1)
            bar.set_postfix(mse=f"{info['mse']:.4f}", stats=f"{info['stats']:.3f}", refresh=False)
            if (k + 1) % c.save_every == 0 and k + 1 < c.ae_steps:
                _save({"model": model.state_dict(), "opt": opt.state_dict(), "step": k + 1}, ckpt)

        train_autoencoder(model, opt, range(step, c.ae_steps), c.ae_batch, c.seed, c.ae_lr, on_step, c.ae_full_steps)
        bar.close()
        _save_st(state_dict_for_file(model), self.out / FILES["autoencoder"])
        return {"final_mse": last.get("mse"), "latent_stats_loss": last.get("stats")}

    def stage_decoder(self):
        c = self.cfg
        ckpt = self.work / "decoder.ckpt.pt"
        model = self.autoencoder()
        model.encoder.requires_grad_(False)
        model.decoder.requires_grad_(True)
        opt = torch.optim.Adam(model.decoder.parameters(), lr=c.ae_lr / 2)
        step = 0
        if ckpt.exists():
            st = torch.load(ckpt, weights_only=True)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            step = st["step"]
        bar = _bar(c.decoder_steps, step, "decoder")
        last = {}

        def on_step(k, info):
            last.update(info)
            bar.update(1)
            bar.set_postfix(mse=f"{info['mse']:.4f}", refresh=False)
            if (k + 1) % c.save_every == 0 and k + 1 < c.decoder_steps:
                _save({"model": model.state_dict(), "opt": opt.state_dict(), "step": k + 1}, ckpt)

        train_autoencoder(model, opt, range(step, c.decoder_steps), c.ae_batch, c.seed + 17, c.ae_lr / 2, on_step,
                          full_steps=c.decoder_steps, train_encoder=False)
        bar.close()
        _save_st(state_dict_for_file(model), self.out / FILES["autoencoder"])
        return {"final_mse": last.get("mse")}

    def stage_dataset(self):
        c = self.cfg
        ae = self.autoencoder()
        frames = 1 + 4 * (LATENT_FRAMES - 1)
        scenes = [sample_scene(c.seed * 7_919 + 1_000_000 + i, backgrounds=TRAIN_BACKGROUNDS, objects=TRAIN_OBJECTS)
                  for i in range(c.clips)]
        latents = []
        bar = _bar(c.clips, 0, "dataset")
        for a in range(0, c.clips, 32):
            video, _ = render(scenes[a : a + 32], frames)
            latents.append(ae.encode_normalized(video).half())
            bar.update(len(scenes[a : a + 32]))
        bar.close()
        z = torch.cat(latents)
        captions = [caption(s) for s in scenes]
        unique = sorted(set(captions))
        emb = self.embed(unique + [""])
        index = torch.tensor([unique.index(t) for t in captions])
        _save({"latents": z, "captions": captions, "unique": unique, "index": index, "emb": emb[:-1].half(),
               "uncond": emb[-1:].clone()}, self.work / "dataset.pt")
        zf = z.float()
        return {"clips": c.clips, "unique_captions": len(unique), "latent_mean": float(zf.mean()),
                "latent_std": float(zf.std())}

    def _dataset(self) -> dict:
        return torch.load(self.work / "dataset.pt", weights_only=True)

    def stage_teacher(self):
        c = self.cfg
        data = self._dataset()
        z, emb, index, uncond = data["latents"], data["emb"], data["index"], data["uncond"]
        model = new_dit(c.seed + 1, c.dit_patch)
        ema = new_dit(c.seed + 1, c.dit_patch).requires_grad_(False)
        ema.load_state_dict(model.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=c.teacher_lr, weight_decay=0.01)
        ckpt, step = self.work / "teacher.ckpt.pt", 0
        if ckpt.exists():
            st = torch.load(ckpt, weights_only=True)
            model.load_state_dict(st["model"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
            step = st["step"]
        bb = WanBackbone(model)
        sched = FlowSchedule(SHIFT)
        bar = _bar(c.teacher_steps, step, "teacher")
        run = None
        for k in range(step, c.teacher_steps):
            g = torch.Generator().manual_seed(c.seed * 100_003 + k)
            idx = torch.randint(0, z.shape[0], (c.teacher_batch,), generator=g)
            text = emb[index[idx]].float()
            drop = torch.rand(c.teacher_batch, generator=g) < CAPTION_DROPOUT
            text = torch.where(drop.view(-1, 1, 1), uncond.expand_as(text), text)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(c.teacher_lr, k, c.teacher_steps) * min(1.0, (k + 1) / 50)
            loss = flow_matching_loss(bb, z[idx].float(), text, g, sched)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - min(0.995, (k + 1) / (k + 10)))
            run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{run:.4f}", refresh=False)
            if (k + 1) % c.save_every == 0 and k + 1 < c.teacher_steps:
                _save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": k + 1}, ckpt)
        bar.close()
        _save_st({k: v.contiguous() for k, v in ema.state_dict().items()}, self.work / "teacher.safetensors")
        return {"loss_ema": run}

    def stage_ode(self):
        c = self.cfg
        data = self._dataset()
        teacher = WanBackbone(self._dit(self.work / "teacher.safetensors"))
        g = torch.Generator().manual_seed(c.seed + 3)
        pick = torch.randperm(data["latents"].shape[0], generator=g)[: c.ode_count]
        text = data["emb"][data["index"][pick]].float()
        states, clean = [], []
        bar = _bar(c.ode_count, 0, "ode")
        for a in range(0, c.ode_count, 32):
            s, x = ode_trajectories(teacher, text[a : a + 32], data["uncond"], g, FlowSchedule(SHIFT),
                                    (16, LATENT_FRAMES, 8, 8), GUIDANCE, c.ode_steps)
            states.append(s.half()), clean.append(x.half())
            bar.update(text[a : a + 32].shape[0])
        bar.close()
        _save({"states": torch.cat(states), "clean": torch.cat(clean), "pick": pick}, self.work / "ode.pt")
        return {"trajectories": c.ode_count}

    def stage_student(self):
        c = self.cfg
        data = self._dataset()
        ode = torch.load(self.work / "ode.pt", weights_only=True)
        text_all = data["emb"][data["index"][ode["pick"]]]
        model = self._dit(self.work / "teacher.safetensors").requires_grad_(True).train()
        opt = torch.optim.AdamW(model.parameters(), lr=c.student_lr, weight_decay=0.01)
        ckpt, step = self.work / "student.ckpt.pt", 0
        if ckpt.exists():
            st = torch.load(ckpt, weights_only=True)
            model.load_state_dict(st["model"]), opt.load_state_dict(st["opt"])
            step = st["step"]
        bb = WanBackbone(model)
        sched = FlowSchedule(SHIFT)
        bar = _bar(c.student_steps, step, "student (ODE regression)")
        run = None
        for k in range(step, c.student_steps):
            g = torch.Generator().manual_seed(c.seed * 200_003 + k)
            idx = torch.randint(0, ode["clean"].shape[0], (c.student_batch,), generator=g)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(c.student_lr, k, c.student_steps)
            loss = ode_regression_loss(bb, ode["states"][idx].float(), ode["clean"][idx].float(),
                                       text_all[idx].float(), g, sched)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{run:.4f}", refresh=False)
            if (k + 1) % c.save_every == 0 and k + 1 < c.student_steps:
                _save({"model": model.state_dict(), "opt": opt.state_dict(), "step": k + 1}, ckpt)
        bar.close()
        _save_st({k: v.detach().contiguous() for k, v in model.state_dict().items()}, self.work / "student_ode.safetensors")
        return {"loss_ema": run}

    def _dmd(self, kind: str, start: str = "student_ode", name: str | None = None, switch: float = 0.0, seed: int = 11,
             iterations: int | None = None):
        """DMD from the `start` student with the `kind` context; `switch`: share of prompt-switch rollouts."""
        c = self.cfg
        name = name or kind
        iterations = iterations or c.dmd_iterations
        data = self._dataset()
        g = torch.Generator().manual_seed(c.seed + 5)
        pick = torch.randperm(data["latents"].shape[0], generator=g)[:512]  # the same prompts for every paradigm
        prompts = data["emb"][data["index"][pick]].float()
        videos = data["latents"][pick].float()
        settings = TrainSettings(
            iterations=iterations, rank=c.dmd_rank, lr=c.dmd_lr, critic_lr=c.dmd_critic_lr,
            critic_ratio=c.dmd_critic_ratio, ema=None, checkpointing=False, latent_frames=LATENT_FRAMES,
            latent_height=8, latent_width=8, frames_per_chunk=FRAMES_PER_CHUNK, denoising_steps=STEPS, shift=SHIFT,
            guidance=GUIDANCE, batch=c.dmd_batch, seed=c.seed + seed, save_every=25, context=kind, switch=switch,
        )
        gen = self._dit(self.work / f"{start}.safetensors")
        teacher = self._dit(self.work / "teacher.safetensors")
        trainer = Trainer(gen, teacher, prompts, data["uncond"], settings, videos=videos if kind != "self" else None)
        ckpt = self.work / f"dmd_{name}.ckpt.pt"
        if ckpt.exists():
            trainer.resume(ckpt)
        bar = _bar(iterations, trainer.iteration, f"dmd ({name})")
        last = {}

        def on_step(info):
            last.update(info)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in info.items() if k.endswith("loss")}, refresh=False)

        trainer.train(checkpoint=ckpt, on_step=on_step)
        bar.close()
        lora = trainer.final_lora()
        trainer.close()
        lora.merge(gen)
        _save_st({k: v.detach().contiguous() for k, v in gen.state_dict().items()}, self.work / f"student_{name}.safetensors")
        return {"iterations": trainer.iteration, "generator_steps": trainer.generator_steps,
                "last_critic_loss": last.get("critic_loss")}

    def stage_dmd_self(self):
        return self._dmd("self")

    def stage_dmd_teacher(self):
        return self._dmd("teacher")

    def stage_dmd_diffusion(self):
        return self._dmd("diffusion")

    def stage_dmd_switch(self):
        """The Self Forcing student tuned further on rollouts whose prompt switches (re-cache) at a random chunk to
        another training prompt; the frames after the switch are judged as a clip of their own under the new prompt
        (the teacher never sees the old scene with the new caption): what makes a re-cached switch follow it."""
        return self._dmd("self", start="student_self", name="switch", switch=self.cfg.switch_share, seed=23,
                         iterations=self.cfg.switch_iterations)

    def stage_evaluate(self):
        students = {"ODE init (no DMD)": self.work / "student_ode.safetensors",
                    "Teacher Forcing + DMD": self.work / "student_teacher.safetensors",
                    "Diffusion Forcing + DMD": self.work / "student_diffusion.safetensors",
                    "Self Forcing + DMD": self.work / "student_self.safetensors",
                    "Self Forcing + DMD + switch tuning (shipped)": self.work / "student_switch.safetensors"}
        table = evaluate_students(students, self.out, prompts=self.cfg.eval_prompts, log=lambda m: print(m, file=sys.stderr),
                                  teacher=self.work / "teacher.safetensors")
        with atomic_path(self.work / "table.json") as tmp:
            Path(tmp).write_text(json.dumps(table, indent=2))
        return {"table": str(self.work / "table.json")}

    def stage_ship(self):
        sd = load_file(str(self.work / "student_switch.safetensors"))
        _save_st(sd, self.out / FILES["dit"], metadata={"recipe": "sf_core.toy.recipe", "stage": "dmd_switch"})

        table = json.loads((self.work / "table.json").read_text())
        detector = accuracy([sample_scene(100_000 + i, train=False) for i in range(64)], 33)
        with atomic_path(self.out / "MODEL_CARD.md") as tmp:
            Path(tmp).write_text(model_card(table, self.state, self.out, detector, self.cfg))
        (self.out / "MODEL_CARD.md").chmod(0o644)
        return {"files": sorted(FILES.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sf_core.toy.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="toy_recipe_state", help="resumable state (checkpoints, dataset, table)")
    p.add_argument("--out", default=str(MODELS_DIR), help="where the shipped files go")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of stages to run (default all: {','.join(STAGES)})")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy 2-core CPU)")
    p.add_argument("--fresh", action="store_true", help="remove the --work folder first")
    for f in dataclasses.fields(RecipeConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fresh and Path(args.work).exists():
        shutil.rmtree(args.work)
    cfg = RecipeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RecipeConfig)})
    try:
        Recipe(Path(args.work), Path(args.out), cfg).run([s for s in args.stages.split(",") if s])
    except SelfForcingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
