"""Distillation (tutorial §8.1 "蒸馏"), the task behind ``difflab distill TEACHER_RUN``: a student that samples in
1-8 network evaluations what its teacher samples in hundreds. The formulas are in :mod:`difflab.distillation`.

* ``--method progressive`` (Salimans & Ho 2022, Algorithm 2): stages of ``--updates`` optimizer updates. The student
  starts from the teacher's weights; each stage halves its DDIM steps, from ``--from-steps`` down to ``--to-steps``,
  on nested "trailing" grids. A student of an eps teacher predicts v (``--student-prediction``); the conversion is
  one stage more at the teacher's own step count, whose target is the teacher's x0 estimate. At the end of each
  stage the EMA weights are written to ``stage_<steps>_steps/`` (a checkpoint ``difflab sample`` takes, with its
  sample grid), become the next stage's teacher and the student's new start.
* ``--method consistency`` (Song et al. 2023, Algorithm 2): a consistency model f(x, sigma) on the teacher's
  parameterization, trained for ``--updates`` updates against an EMA target network (``--target-decay``) on an
  N-point Karras grid (``--grid-points``) with the teacher's DDIM or Heun step and the pseudo-Huber distance.

Class- and text-conditional teachers are distilled with classifier-free guidance folded in (``--guidance-scale``:
the teacher's targets are guided, as in LCM, Luo et al. 2023); the student then samples unguided.

    run = difflab.distill("runs/digits", method="progressive", to_steps=4)
    run = difflab.distill("runs/digits", method="consistency")
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from difflab.conditioning import Cond, TextConditioner
from difflab.denoisers import (
    ConsistencyParameterization,
    Denoiser,
    DenoiserFn,
    EDMParameterization,
    Parameterization,
    VPParameterization,
)
from difflab.distillation import TEACHER_SOLVERS, consistency_grid, consistency_loss, progressive_loss, teacher_step
from difflab.errors import DifflabError
from difflab.guidance import classifier_free_guidance
from difflab.models import CLASSIFIER_FORMAT, MODEL_FORMAT, VAE_FORMAT, Model, load_model, upgrade_config
from difflab.tasks.diffusion import DiffusionConfig, DiffusionTask, sample_grid
from difflab.training import loop
from difflab.training.checkpoint import (
    REQUIRED_FILES,
    CheckpointWriteError,
    latest_valid_checkpoint,
    load_state,
    load_tensors,
    read_config,
    resolve_checkpoint,
    write_folder,
)
from difflab.training.config import RunConfig, from_json, setting
from difflab.training.task import Task

METHODS = ("progressive", "consistency")
DEFAULT_UPDATES = {"progressive": 1000, "consistency": 3000}
DEFAULT_CONVERT_UPDATES = 1000  # consistency: the conversion stage before it
DEFAULT_CONVERT_STEPS = 64      # consistency: the DDIM grid the conversion stage trains on
TEACHER_DATA = "teacher"  # --dataset default: the data the teacher was trained on


@dataclass
class DistillConfig:
    """The settings of distillation besides the shared ones."""

    teacher: str | None = setting(None, "the teacher: a difflab train run folder (its newest checkpoint, EMA weights) "
                                        "or one of its checkpoints", frozen=True, metavar="TEACHER_RUN",
                                  positional=True)
    method: str = setting("progressive", "progressive (Salimans & Ho 2022: halve the DDIM steps stage by stage) or "
                                         "consistency (Song et al. 2023: a 1-step consistency model)", frozen=True)
    updates: int | None = setting(None, "optimizer updates per stage (progressive: each halving; default 1000) or of "
                                        "the consistency model (default 3000)", frozen=True, metavar="N")
    convert_updates: int | None = setting(None, "updates of the conversion stage that first teaches the student its "
                                                "new prediction type (an eps teacher's v student; default: --updates "
                                                "for progressive, 1000 for consistency)", frozen=True, metavar="N")
    to_steps: int = setting(4, "progressive: the final student's DDIM steps", frozen=True, metavar="N")
    from_steps: int = setting(64, "progressive: the teacher's DDIM steps the first halving starts from (--to-steps "
                                  "times a power of 2)", frozen=True, metavar="N")
    student_prediction: str | None = setting(None, "vp teachers: what the student predicts, v or x0 (default: v "
                                                   "for an eps teacher, else the teacher's; eps students are unstable "
                                                   "at few steps, Salimans & Ho §4: x0 = x - sigma eps amplifies "
                                                   "errors by sigma, up to 157 on the linear schedule)", frozen=True,
                                             metavar="KIND")
    guidance_scale: float | None = setting(None, "conditional teachers: classifier-free guidance scale folded into the "
                                                 "student (the teacher's targets are guided; default: none, i.e. "
                                                 "plain conditional)", frozen=True, metavar="W")
    grid_points: int = setting(18, "consistency: N, points of the Karras grid between sigma_min and sigma_max (Song et "
                                   "al.: 18 with Heun on CIFAR-10)", frozen=True, metavar="N")
    teacher_solver: str = setting("heun", "consistency: the teacher's ODE step between grid points: heun (2 "
                                          "evaluations) or ddim (1)", frozen=True, metavar="SOLVER")
    target_decay: float = setting(0.95, "consistency: mu, the EMA decay of the target network theta- (Song et al.: "
                                        "0.95 for CIFAR-10)", frozen=True, metavar="MU")
    huber_c: float | None = setting(None, "consistency: c of the pseudo-Huber distance (default: 0.00054 sqrt(dim), "
                                          "Song & Dhariwal 2023)", frozen=True, metavar="C")
    sigma_data: float | None = setting(None, "consistency: sigma_data of c_skip and c_out (default: an EDM teacher's, "
                                             "else 0.5 as in Song et al.)", frozen=True, metavar="SIGMA")
    num_samples: int = setting(64, "images in each sample grid")


class Stage(NamedTuple):
    steps: int     # the student's DDIM steps at the end of the stage (1 for a consistency model)
    ratio: int     # teacher steps per student step: 2 (a halving), 1 (a change of prediction type), 0 (consistency)
    updates: int   # optimizer updates it trains


class DistillBatch(NamedTuple):
    x0: torch.Tensor               # clean images in the model's space (n, C, H, W)
    noise: torch.Tensor            # n ~ N(0, I)
    sigmas: list[torch.Tensor]     # per-example noise levels (n,): the student's step and the teacher's points
    cond: Cond
    stage: int


def teacher_files(teacher: str | Path) -> tuple[Path, dict, dict, Path]:
    """(checkpoint, its model config, the teacher run's flat training settings, its run folder) of a teacher given as
    a run folder or a checkpoint inside one; one-line errors for anything else."""
    checkpoint = resolve_checkpoint(teacher)
    config = upgrade_config(read_config(checkpoint))
    if config.get("format") != MODEL_FORMAT:
        kind = {CLASSIFIER_FORMAT: "a noise-aware classifier (difflab train-classifier)",
                VAE_FORMAT: "an autoencoder (difflab train-vae)"}.get(config.get("format"), "not a difflab model")
        raise DifflabError(f"the teacher '{teacher}' is {kind}: distillation needs a diffusion model (difflab train)")
    if config["parameterization"].get("kind") == "consistency":
        raise DifflabError(f"the teacher '{teacher}' is a consistency model already: distil its own teacher instead")
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else Path(teacher)
    saved = run_dir / "config.json"
    if all((run_dir / f).is_file() for f in REQUIRED_FILES) or not saved.is_file():
        raise DifflabError(f"cannot find the training settings of the teacher '{teacher}' (the run folder's "
                           "config.json): give the difflab train run folder, or a checkpoint inside its checkpoints/")
    task, settings = from_json(read_config(run_dir), saved)
    if task != "diffusion":
        raise DifflabError(f"the teacher '{teacher}' was trained by '{task}', not by difflab train: distillation needs "
                           "a diffusion model trained by difflab train")
    return checkpoint, config, settings, run_dir


def student_prediction(cfg: DistillConfig, teacher_param: dict) -> str | None:
    """The progressive student's prediction type (None for EDM teachers, which keep their preconditioning)."""
    if teacher_param["kind"] != "vp":
        if cfg.student_prediction is not None:
            raise DifflabError("--student-prediction applies to vp teachers; an EDM student keeps EDM's "
                               "preconditioning (already a mix of x0 and eps, like v)")
        return None
    return cfg.student_prediction or ("v" if teacher_param["prediction"] == "eps" else teacher_param["prediction"])


def plan(cfg: DistillConfig, teacher_param: dict) -> list[Stage]:
    """The stages of a distillation: a conversion stage when the prediction type changes (its target is the teacher's
    own x0 estimate, one student step per teacher step), then progressive -- one stage per halving from --from-steps
    to --to-steps -- or consistency -- one stage."""
    updates = cfg.updates if cfg.updates is not None else DEFAULT_UPDATES[cfg.method]
    convert = teacher_param["kind"] == "vp" and student_prediction(cfg, teacher_param) != teacher_param["prediction"]
    conversion = cfg.convert_updates if cfg.convert_updates is not None else \
        (updates if cfg.method == "progressive" else DEFAULT_CONVERT_UPDATES)
    stages = [Stage(cfg.from_steps if cfg.method == "progressive" else DEFAULT_CONVERT_STEPS, 1, conversion)] * convert
    if cfg.method == "consistency":
        return stages + [Stage(1, 0, updates)]
    halvings = cfg.from_steps // cfg.to_steps
    return stages + [Stage(cfg.from_steps >> k, 2, updates) for k in range(1, halvings.bit_length())]


class DistillTask(Task):
    """Distil a trained diffusion model (the teacher) into a few-step student; see the module doc."""

    name, noun, command = "distill", "distillation", "difflab distill"
    config_class = DistillConfig
    positional = "teacher"
    run_defaults = dict(dataset=TEACHER_DATA, lr=5e-4, warmup=50, ema_decay=0.995, checkpoint_every=500,
                        sample_every=0)
    summary = "distil a trained model into a 1-8 step student (progressive or consistency distillation)"
    description = ("Distil a diffusion model trained by difflab train into a student that samples in a few network "
                   "evaluations: progressive distillation (Salimans & Ho 2022) halves the DDIM steps stage by stage; "
                   "consistency distillation (Song et al. 2023) trains a one-step consistency model. The student "
                   "starts from the teacher's weights and trains on the teacher's data (tutorial §8.1).")
    examples = """examples:
  difflab distill runs/digits                                  # progressive, 64 -> 4 DDIM steps (v-prediction student)
  difflab distill runs/digits --to-steps 1 --updates 2000      # down to one step, 2000 updates per halving
  difflab distill runs/digits --method consistency             # a consistency model: 1 step (Heun teacher, N=18)
  difflab distill runs/digits-cond --guidance-scale 3          # guidance folded into the student
  difflab distill --resume runs/digits-progressive             # continues mid-stage, exactly
  difflab sample runs/digits-progressive                       # DDIM at the final step count
  difflab sample runs/digits-progressive/stage_16_steps        # any stage is a model of its own
  difflab sample runs/digits-consistency --sigmas 157,1        # a 2-step consistency sample

A progressive run folder holds stage_<N>_steps/ (weights, config.json, samples.png) for each finished stage;
--steps is set by the stages: --updates times the number of stages."""
    report = ("the student: {run}, sample it with: difflab sample {run_arg}\n"
              "each finished stage (a model of its own, with its samples.png): {run}/stage_*")
    derived_fields = ("steps",)
    derived_help = ("the sum of the stages' updates: --updates per halving (progressive) or for the consistency model, "
                    "plus --convert-updates when the student's prediction type changes")

    @classmethod
    def derived_run_settings(cls, cfg: DistillConfig) -> dict:
        if cfg.teacher is None or cfg.method not in METHODS:
            return {}  # check() says what is wrong
        cls._check_steps(cfg)
        config = teacher_files(cfg.teacher)[1]
        return {"steps": sum(stage.updates for stage in plan(cfg, config["parameterization"]))}

    @staticmethod
    def _check_steps(cfg: DistillConfig) -> None:
        for name in ("updates", "convert_updates"):
            if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
                raise DifflabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
        if cfg.method != "progressive":
            return
        if cfg.to_steps < 1:
            raise DifflabError(f"--to-steps must be at least 1, got {cfg.to_steps}")
        ratio = cfg.from_steps / cfg.to_steps
        if cfg.from_steps <= cfg.to_steps or not ratio.is_integer() or int(ratio) & (int(ratio) - 1):
            raise DifflabError(f"--to-steps {cfg.to_steps} cannot be reached by halving from --from-steps "
                               f"{cfg.from_steps}: --from-steps must be --to-steps times 2, 4, 8, ... (e.g. "
                               f"{cfg.to_steps * 16})")

    @classmethod
    def check(cls, run: RunConfig, cfg: DistillConfig) -> None:
        if cfg.teacher is None:
            raise DifflabError("give the teacher to distil: difflab distill TEACHER_RUN (a difflab train run folder)")
        if cfg.method not in METHODS:
            raise DifflabError(f"--method must be one of {', '.join(METHODS)}, got '{cfg.method}'")
        cls._check_steps(cfg)
        config = teacher_files(cfg.teacher)[1]
        param = config["parameterization"]
        if cfg.student_prediction not in (None, "v", "x0"):
            raise DifflabError(f"--student-prediction must be v or x0, got '{cfg.student_prediction}'")
        student_prediction(cfg, param)
        if cfg.method == "progressive":
            if param["kind"] == "vp" and cfg.from_steps > param["timesteps"]:
                raise DifflabError(f"--from-steps {cfg.from_steps} exceeds the teacher's {param['timesteps']} "
                                   "timesteps")
        else:
            if cfg.teacher_solver not in TEACHER_SOLVERS:
                raise DifflabError(f"--teacher-solver must be one of {', '.join(TEACHER_SOLVERS)}, got "
                                   f"'{cfg.teacher_solver}'")
            if cfg.grid_points < 2:
                raise DifflabError(f"--grid-points must be at least 2, got {cfg.grid_points}")
            if not 0.0 <= cfg.target_decay < 1.0:
                raise DifflabError(f"--target-decay must lie in [0, 1), got {cfg.target_decay}")
            for name in ("huber_c", "sigma_data"):
                value = getattr(cfg, name)
                if value is not None and not (math.isfinite(value) and value > 0):
                    raise DifflabError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if cfg.guidance_scale is not None:
            if not (math.isfinite(cfg.guidance_scale) and cfg.guidance_scale >= 0):
                raise DifflabError(f"--guidance-scale must be a finite number >= 0, got {cfg.guidance_scale}")
            if config.get("conditioner") is None:
                raise DifflabError("--guidance-scale needs a class- or text-conditional teacher; this one is "
                                   "unconditional")
            if not config["conditioner"].get("dropout") and cfg.guidance_scale != 1:
                raise DifflabError("--guidance-scale: the teacher was trained without label or caption dropout, so its "
                                   "null condition is untrained and guided targets would extrapolate from noise")
        if cfg.method == "progressive" and run.lr_schedule != "constant":
            raise DifflabError("--lr-schedule cosine would decay over all stages, leaving the last halvings (the "
                               "hardest) almost no learning rate; progressive distillation uses a constant rate")
        if cfg.num_samples < 1:
            raise DifflabError(f"--num-samples must be at least 1, got {cfg.num_samples}")

    # -------------------------------------------------------------------------------------------------------
    # setup: the teacher's data pipeline (a diffusion task with the teacher's settings), the teacher, the student

    def setup(self) -> torch.nn.Module:
        cfg, ctx = self.config, self.ctx
        checkpoint, config, settings, run_dir = teacher_files(cfg.teacher)
        # pinned: the checkpoint distilled from, not whatever the teacher run's newest one is when this run resumes
        self.config = cfg = dataclasses.replace(cfg, teacher=str(checkpoint.resolve()))
        self.teacher_source = cfg.teacher
        self.folder_base, self.folder_suffix = run_dir.name, f"-{cfg.method}"  # runs/digits -> runs/digits-progressive
        data_run = self.run
        if data_run.dataset == TEACHER_DATA:  # the teacher's data, as it saw it
            data_run = dataclasses.replace(data_run, **{k: settings[k] for k in ("dataset", "data_dir", "image_size",
                                                                                   "channels", "hflip")})
        data_run = dataclasses.replace(data_run, eval_every=0)
        names = {f.name for f in dataclasses.fields(DiffusionConfig)}
        teacher_cfg = DiffusionConfig(**{k: v for k, v in settings.items() if k in names})
        self.data_task = DiffusionTask(data_run, teacher_cfg, ctx)
        net = self.data_task.setup()  # the teacher's architecture (and data, encoder, conditioner, captions)
        self.run = dataclasses.replace(self.run, **{k: getattr(self.data_task.run, k) for k in
                                                    ("dataset", "data_dir", "image_size", "channels", "hflip")})
        teacher = load_model(checkpoint, device=ctx.device)
        load_state(net, teacher.denoiser.net.state_dict(), checkpoint)  # the student starts as the teacher
        teacher.denoiser.requires_grad_(False).eval()
        self.teacher_model, self.student = teacher, net
        self.teacher_param = teacher.parameterization
        self.stages = plan(cfg, config["parameterization"])
        self.ends = [sum(s.updates for s in self.stages[:k + 1]) for k in range(len(self.stages))]  # last step of each
        self.param = self._student_parameterization()  # what the student is in its final stage
        self.shard = ctx.shard(self.run.batch_size)
        self.grids: dict[int, torch.Tensor] = {}
        self.teacher_stage, self.teacher = None, None  # the denoiser the current stage learns from (set lazily)
        self.stage = 0
        # the diffusion parameterization under a consistency model: its DDIM grids and noise range
        self.base = self.param.base if isinstance(self.param, ConsistencyParameterization) else self.param
        if cfg.method == "consistency":
            self.cd_grid = consistency_grid(cfg.grid_points, self.base.sigma_min, self.base.sigma_max).to(
                ctx.device, torch.float32)
        return net

    def _student_parameterization(self) -> Parameterization:
        cfg, teacher = self.config, self.teacher_param
        base = teacher
        if isinstance(teacher, VPParameterization):
            prediction = student_prediction(cfg, {"kind": "vp", "prediction": teacher.prediction})
            base = VPParameterization(teacher.schedule, prediction)
        if cfg.method == "consistency":
            sigma_data = cfg.sigma_data or (teacher.sigma_data if isinstance(teacher, EDMParameterization) else 0.5)
            return ConsistencyParameterization(base, sigma_data)
        return base

    def param_of(self, stage: int) -> Parameterization:
        """The student's parameterization in ``stage``: a conversion stage trains the consistency model's base."""
        return self.base if self.stages[stage].ratio == 1 else self.param

    def ema_decays(self) -> dict[str, float]:
        decays = {"ema": self.run.ema_decay}
        if self.config.method == "consistency":
            decays["ema_target"] = self.config.target_decay  # theta-, the target network (Song et al. eq. 8)
        return decays

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        """A latent model's autoencoder; in a later progressive stage also its teacher (the previous stage's EMA),
        so a resumed run does not depend on the stage folders (which a user may delete)."""
        modules = self.data_task.checkpoint_modules()
        if self.teacher_stage and self.stages[self.teacher_stage].ratio == 2:
            modules["teacher"] = self.teacher.net
        return modules

    # -------------------------------------------------------------------------------------------------------
    # the stages (progressive): which one a step belongs to, its teacher, its grid

    def stage_of(self, step: int) -> int:
        """The stage that optimizer step ``step`` (0-based) trains."""
        return next((k for k, end in enumerate(self.ends) if step < end), len(self.stages) - 1)

    def grid(self, steps: int) -> torch.Tensor:
        """The nested trailing grid of ``steps`` DDIM steps (steps + 1,) float32 on the device, ending with 0."""
        if steps not in self.grids:
            self.grids[steps] = self.base.sampling_sigmas(steps, "trailing").to(self.ctx.device, torch.float32)
        return self.grids[steps]

    def stage_folder(self, stage: int) -> Path:
        """stage_<N>_steps for a progressive stage; a consistency run's stage_conversion and stage_consistency."""
        steps, ratio, _ = self.stages[stage]
        if self.config.method == "consistency":
            return self.ctx.run_dir / ("stage_consistency" if ratio == 0 else "stage_conversion")
        return self.ctx.run_dir / f"stage_{steps}_steps"

    def _teacher_for(self, stage: int) -> DenoiserFn:
        """Stage 0, a conversion and a consistency stage learn from the teacher (guided when asked); a later halving
        from the previous stage's EMA, which after_step keeps in memory and every checkpoint of the stage holds as
        teacher.safetensors, where a resumed run reads it back (the same bits)."""
        if self.teacher_stage != stage:
            if stage == 0 or self.stages[stage].ratio != 2:  # conversion and consistency learn from the teacher
                self.teacher = self._guided(self.teacher_model.denoiser)
            else:  # a resumed run: the teacher saved in the checkpoint it resumed from (the newest usable one)
                checkpoint = latest_valid_checkpoint(self.ctx.run_dir, report=lambda checkpoint, problem: None)
                saved = checkpoint / "teacher.safetensors" if checkpoint is not None else None
                if saved is None or not saved.is_file():
                    raise DifflabError(f"cannot resume stage {stage + 1} of {self.ctx.run_dir}: its checkpoint holds "
                                       "no teacher.safetensors (the previous stage's model); start over")
                net = copy.deepcopy(self.student).requires_grad_(False).eval()
                load_state(net, load_tensors(saved), saved)
                self.teacher = Denoiser(net, self.param_of(stage - 1))
            self.teacher_stage = stage
        return self.teacher

    def _guided(self, teacher: DenoiserFn) -> DenoiserFn:
        """The teacher with classifier-free guidance at --guidance-scale (Ho & Salimans eq. 6); its null condition in
        the form the batches carry (token ids when the U-Net owns its text encoder, else what the conditioner makes)."""
        w = self.config.guidance_scale
        if w is None:
            return teacher
        conditioner = self.data_task.conditioner
        if isinstance(conditioner, TextConditioner) and conditioner.in_unet:
            null = conditioner.encoder.tokenize([""])
        else:
            null = self.teacher_model.conditioner.null(1)
        return classifier_free_guidance(teacher, w, null_cond=null)

    def checks_before(self, step: int) -> bool:
        return step in self.ends

    def after_step(self, step: int) -> None:
        """At the end of a stage: write its folder (EMA weights, config, sample grid). In progressive distillation the
        EMA then becomes the next stage's teacher and the student's new start (Salimans & Ho Alg. 2: the student
        starts as its teacher); a consistency run goes on from its weights as they are."""
        if step not in self.ends:
            return
        stage = self.ends.index(step)
        ema = self.emas["ema"]
        self._write_stage(stage, ema)
        if self.config.method == "progressive" and stage + 1 < len(self.stages):
            with torch.no_grad():
                self.teacher = Denoiser(copy.deepcopy(ema).requires_grad_(False).eval(), self.param_of(stage))
                self.teacher_stage = stage + 1
                student = self.student
                torch._foreach_copy_(list(student.parameters()), list(ema.parameters()))
                for b, b_ema in zip(student.buffers(), ema.buffers()):
                    b.copy_(b_ema)

    def _write_stage(self, stage: int, ema: torch.nn.Module) -> None:
        """stage_*/: the EMA student of ``stage`` (the one batch() last drew for, so model_config() describes it)."""
        folder = self.stage_folder(stage)
        config = self.model_config()
        files = {"model.safetensors": self.student.state_dict(), "ema.safetensors": ema.state_dict(),
                 **{f"{k}.safetensors": m.state_dict() for k, m in self.checkpoint_modules().items()}}

        def write() -> None:
            try:
                write_folder(folder, files, {"config.json": config})
            except CheckpointWriteError as e:
                raise DifflabError(f"{e}; training goes on (the checkpoints carry what resuming needs)") from None

        self.ctx.on_main(f"writing {folder.name}", write)
        self._grid(ema, [folder / "samples.png"])

    # -------------------------------------------------------------------------------------------------------
    # the objective

    def batch(self, step: int, generator: torch.Generator) -> DistillBatch:
        b = self.data_task.batch(step, generator)  # this process's x0, noise and conds (its sigmas go unused)
        device, n = self.ctx.device, self.run.batch_size
        self.stage = stage = self.stage_of(step)
        if self.stages[stage].ratio:
            steps, ratio, _ = self.stages[stage]
            fine = self.grid(steps * ratio)  # the teacher's grid; the student's is every ratio-th point
            i = torch.randint(0, steps, (n,), generator=generator, device=device)[self.shard] * ratio  # Alg. 2, l. 4
            sigmas = [fine[i + k] for k in range(ratio + 1)]
        else:
            k = torch.randint(0, len(self.cd_grid) - 1, (n,), generator=generator, device=device)[self.shard]
            sigmas = [self.cd_grid[k], self.cd_grid[k + 1]]  # s_{n+1} > s_n (Song et al. Alg. 2, line 3)
        return DistillBatch(b.x0, b.noise, sigmas, b.cond, stage)

    def loss(self, net, b: DistillBatch):
        student = Denoiser(net, self.param_of(b.stage))
        teacher = self._teacher_for(b.stage)
        steps = torch.full_like(b.sigmas[0], float(self.stages[b.stage].steps))
        if self.stages[b.stage].ratio:
            return progressive_loss(student, teacher, b.x0, b.noise, b.sigmas, b.cond), {"student_steps": steps}
        target = Denoiser(self.emas["ema_target"], self.param)
        per = consistency_loss(student, target, teacher_step(teacher, self.config.teacher_solver), b.x0, b.noise,
                               b.sigmas[0], b.sigmas[1], b.cond, self.config.huber_c)
        return per, {"student_steps": steps}

    # -------------------------------------------------------------------------------------------------------
    # what the student is

    def model_config(self) -> dict:
        cfg, (steps, ratio, _) = self.config, self.stages[self.stage]
        config = self.data_task.model_config()
        config["parameterization"] = self.param_of(self.stage).config()
        made_for = {"method": cfg.method, "teacher": self.teacher_source, "sampler": "ddim", "steps": steps,
                    "spacing": "trailing", "guidance_scale": cfg.guidance_scale, "stage": self.stage + 1,
                    "stages": len(self.stages)}
        if ratio == 0:
            made_for.update(sampler="consistency", grid_points=cfg.grid_points, teacher_solver=cfg.teacher_solver)
        elif cfg.method == "progressive":
            made_for.update(teacher_steps=cfg.from_steps)
        else:  # the conversion stage of a consistency distillation: a v (or x0) model sampled like its teacher
            made_for.update(method="conversion", teacher_steps=steps)
        config["distillation"] = made_for
        return config

    def model(self, ema: torch.nn.Module) -> Model:
        """The EMA student as a :class:`Model`, for sampling."""
        m = self.data_task.model(ema)  # prompts through the EMA's own text encoder when it has one
        return Model(Denoiser(ema, self.param_of(self.stage)), m.encoder, m.conditioner, self.model_config())

    def _grid(self, ema, paths: list[Path]) -> None:
        """The student's sample grid with its own sampler settings, unguided (guidance is folded in, if at all)."""
        sample_grid(self.ctx, self.model(ema), self.data_task.conditioner, self.config.num_samples, paths)

    def show(self, step: int, ema) -> None:
        run_dir = self.ctx.run_dir
        self._grid(ema, [run_dir / "samples" / f"step_{step:07d}.png", run_dir / "samples.png"])


def distill(teacher: str | Path | None = None, config: dict | None = None, *, resume: str | Path | None = None,
            overwrite: bool = False, progress: bool = True, **overrides) -> Path:
    """Distil a trained diffusion model (a difflab train run folder) into a few-step student; returns the run folder
    (stage_<N>_steps/ per progressive stage, samples.png, checkpoints/). ``method="progressive"`` (default) or
    ``"consistency"``; other settings as :class:`DistillConfig` and the shared run settings. ``resume`` continues a
    run exactly, mid-stage included."""
    if teacher is not None:
        overrides["teacher"] = str(teacher)
    return loop.train(DistillTask, config, resume=resume, overwrite=overwrite, progress=progress, **overrides)
