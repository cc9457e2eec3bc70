"""The AMED distillation losses: teacher targets, and the student's steps.

The student step is :func:`solvers.step`, the same function sampling uses, so a predictor samples
exactly as it was trained. The teacher solves the same schedule refined by M inserted points per
student interval; by the schedules' refinement property its grid contains the student's grid at
every (M+1)-th point, and those points are the targets (the official code).

Two losses share the targets (``train.py --loss``); each is an object that trains one global batch
(:meth:`IntervalLoss.train_batch`, :meth:`TrajectoryLoss.train_batch`), so the training loop only
draws batches and calls it:

* ``interval`` (the official loss, the default): one student step per interval, per-sample squared
  L2 distance to the teacher point at its end, one optimiser step per interval. Single-step
  students restart each interval from the teacher point; multistep students carry their own
  state, detached. Each interval's choice of s is greedy: it cannot see its effect on later steps.
* ``trajectory``: the student runs from noise over its whole schedule, history not detached, and
  the loss is the squared L2 distance of its final state to the teacher's final state, plus
  ``inter_weight`` times the same distance at every intermediate student point. Gradients flow
  through every student step (the 8x8 feature the predictor reads stays an observation: it is
  detached, as in sampling). One optimiser step per batch. With ``soft_radius`` > 0 (a "soft
  teacher", after LD3) the student may start anywhere within a ball of that radius, relative to
  the starting noise's norm, around the teacher's start: one projected gradient step moves each
  sample's start toward where the loss is smallest (a line search on a quadratic model), and the
  predictor trains from there (about twice the student's cost). The targets do not move; sampling
  starts from the noise itself.
"""

import contextlib
import math

import torch

import solver_utils
import solvers
from torch_utils import distributed as dist


def build_solvers(model, sampler_stu, sampler_tea, **options):
    """The student and teacher solvers of a training run: each gets the ``options`` it takes
    (``Solver.options``: max_order, predict_x0, ...), and an option that neither takes is a
    ValueError naming it."""
    stu = solvers.solver_class(sampler_stu, 'sampler_stu')
    tea = solvers.solver_class(sampler_tea, 'sampler_tea')
    if not stu.student:
        raise ValueError(f"sampler_stu {sampler_stu!r} is a teacher only (students: {', '.join(solvers.STUDENTS)})")
    if not tea.teacher:
        raise ValueError(f"sampler_tea {sampler_tea!r} is a student only (teachers: {', '.join(solvers.TEACHERS)})")
    given = {k: v for k, v in options.items() if v is not None}
    for opt in given:
        if opt not in stu.options and opt not in tea.options:
            raise ValueError(f"{opt} is an option of {solvers.takers(opt)} only, and neither the student "
                             f"{sampler_stu!r} nor the teacher {sampler_tea!r} is one")
    latent = getattr(model, 'latent', False)
    return tuple(solvers.make_solver(cls.name, latent, **{k: v for k, v in given.items() if k in cls.options})
                 for cls in (stu, tea))


class AMEDLoss:
    """Teacher trajectories and the student's per-interval step for one frozen model. Built once
    per training run; it validates every solver and schedule option.

    Args:
        model: the frozen denoiser (models/base.py interface).
        sampler_stu, sampler_tea: student and teacher solver names.
        num_steps: student time points N; M: teacher points inserted per student interval.
        schedule_type, schedule_rho, sigma_min, sigma_max: the schedule shared by both.
        t_steps: an explicit student schedule instead (``num_steps`` levels, e.g. a GITS schedule);
            the teacher refines it evenly in ``t^(1/schedule_rho)`` (:func:`solver_utils.refine_schedule`).
        afs: analytical first step for the student (the teacher never uses it, as the official code).
        **options: solver options (max_order, predict_x0, lower_order_final, thresholding,
            corrected_3m), given to whichever of student and teacher takes them (:func:`build_solvers`).
    """

    def __init__(self, model, sampler_stu, sampler_tea, num_steps, M, schedule_type=solver_utils.SCHEDULE_TYPE,
                 schedule_rho=solver_utils.SCHEDULE_RHO, sigma_min=None, sigma_max=None, afs=False, t_steps=None,
                 **options):
        if int(M) != M or M < 1:
            raise ValueError(f'M must be a positive integer, got {M}')
        solver_utils.check_schedule_args(num_steps, 1.0, 2.0, 'polynomial', 1.0)   # num_steps first, then M
        if (M + 1) * (num_steps - 1) + 1 > solver_utils.MAX_TIME_POINTS:
            raise ValueError(f'M {M} is too large for num_steps {num_steps}: the teacher grid would have '
                             f'{(M + 1) * (num_steps - 1) + 1} time points, at most {solver_utils.MAX_TIME_POINTS}')
        self.model = model
        self.num_steps, self.M, self.afs = int(num_steps), int(M), bool(afs)
        self.student, self.teacher = build_solvers(model, sampler_stu, sampler_tea, **options)
        sched = dict(sigma_min=sigma_min, sigma_max=sigma_max, schedule_type=schedule_type, schedule_rho=schedule_rho)
        self.schedule = sched
        if t_steps is None:
            self.t_student = solvers.get_model_schedule(model, self.num_steps, **sched).tolist()
            self.t_teacher = solvers.get_model_schedule(model, (self.M + 1) * (self.num_steps - 1) + 1,
                                                        **sched).tolist()
        else:
            t = solvers.check_t_steps(t_steps)
            if len(t) != self.num_steps:
                raise ValueError(f't_steps has {len(t)} noise levels, num_steps is {self.num_steps}')
            self.t_student = t.tolist()
            self.t_teacher = solver_utils.refine_schedule(t, self.M, schedule_rho).tolist()

    @property
    def multistep(self):
        return self.student.multistep

    @torch.no_grad()
    def teacher_targets(self, latents, cond=None):
        """The teacher's states at the student's time points: a list of N tensors, the first
        being latents * sigma_max."""
        traj = solvers.sample(self.model, latents, cond, solver=self.teacher, t_steps=self.t_teacher,
                              return_inters=True)
        return list(traj[::self.M + 1])

    def start_state(self, targets, k, carried=None):
        """The student's state at interval k: the teacher point for single-step students, the
        carried (detached) state for multistep students."""
        if k == 0 or not self.multistep:
            return solvers.SolverState(targets[k], k)
        return carried

    def __call__(self, predictor, state, target, cond=None):
        """One student step from ``state`` with ``predictor``; returns the per-sample squared L2
        distance to ``target`` (B,), the new state and the step info."""
        new_state, info = solvers.step(self.model, self.student, state, self.t_student, cond, predictor, self.afs)
        loss = (new_state.x - target).square().flatten(1).sum(1)
        return loss, new_state, info

    def trajectory(self, predictor, targets, cond=None, inter_weight=0.0, detach_state=False,
                   checkpointing=False):
        """The trajectory loss: the student runs from ``targets[0]`` over its whole schedule.

        Returns the per-sample loss (B,) = |x_{N-1} - y_{N-1}|^2 + inter_weight * sum_{k=1}^{N-2}
        |x_k - y_k|^2 (x the student, y the teacher targets) and the list of the N-1 steps' infos.
        ``detach_state`` cuts the graph between steps (then, with ``inter_weight=1`` and a
        multistep student, the gradient is the sum of the interval losses' gradients: a test of the
        pieces); ``checkpointing`` recomputes each step in the backward pass instead of storing
        its activations (gradient checkpointing: memory of one step instead of N-1).
        """
        total, infos = 0.0, []
        run = solvers.iterate(self.model, self.student, targets[0], self.t_student, cond, predictor, self.afs,
                              checkpointing=checkpointing, detach_state=detach_state)
        for k, (state, info) in enumerate(run):
            weight = 1.0 if k == self.num_steps - 2 else float(inter_weight)
            if weight != 0:
                total = total + weight * (state.x - targets[k + 1]).square().flatten(1).sum(1)
            infos.append(info)
        return total, infos


# ----------------------------------------------------------------------------------------------
# The losses: each trains one global batch.

def sanitize_gradients(module):
    """Replace NaN/inf gradients in place (NaN -> 0, +-inf -> +-1e5), as the official code."""
    for p in module.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


def add_step_stats(stats, loss, infos):
    """Record a step's per-sample loss and the predictor's outputs in ``stats``."""
    stats.add('Loss/loss', loss)
    stats.add('Loss/l2', loss.sqrt())
    for info in infos:
        stats.add('Pred/r', info.r)
        stats.add('Pred/scale_dir', info.scale_dir)
        stats.add('Pred/scale_time', info.scale_time)


class Loss:
    """A training loss over the targets of an :class:`AMEDLoss` (``problem``). Class data: its
    ``name`` (``train.py --loss``), its ``options`` with their defaults, ``run_tag`` (added to the
    run folder name, or None) and ``ddp`` (its gradients are averaged across processes by
    DistributedDataParallel). :meth:`train_batch` trains one global batch."""

    name = None
    options = {}
    run_tag = None
    ddp = False

    def __init__(self, problem, **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(f"{', '.join(sorted(unknown))}: not an option of --loss={self.name}")
        self.problem = problem
        for key, default in self.options.items():
            setattr(self, key, options.get(key, default))

    def train_batch(self, ddp, predictor, optimizer, rounds_data, batch_gpu_total, stats):
        """One global batch: ``rounds_data`` are this process's accumulation rounds (dicts with
        ``cond``, ``targets`` and ``state``), ``batch_gpu_total`` its share of the batch; ``ddp`` is
        ``predictor`` or its DistributedDataParallel wrapper; ``stats`` collects the statistics."""
        raise NotImplementedError


class IntervalLoss(Loss):
    """The official loss: N-1 Adam steps per batch, one per student interval, each the per-sample
    squared L2 distance of one student step to the teacher point at the interval's end."""

    name = 'interval'
    ddp = True

    def train_batch(self, ddp, predictor, optimizer, rounds_data, batch_gpu_total, stats):
        problem, rounds = self.problem, len(rounds_data)
        for k in range(problem.num_steps - 1):
            optimizer.zero_grad(set_to_none=True)
            for g, data in enumerate(rounds_data):
                sync = contextlib.nullcontext() if (g == rounds - 1 or ddp is predictor) else ddp.no_sync()
                with sync:
                    state = problem.start_state(data['targets'], k, data['state'])
                    loss, new_state, info = problem(ddp, state, data['targets'][k + 1], data['cond'])
                    loss.sum().mul(1 / batch_gpu_total).backward()
                data['state'] = new_state.detach()
                add_step_stats(stats, loss, [info])
            sanitize_gradients(predictor)
            optimizer.step()


class TrajectoryLoss(Loss):
    """The whole student run against the teacher's final state (``inter_weight``: weight of every
    intermediate point; ``checkpointing``: gradient checkpointing per student step): one backward
    pass per round, the gradients averaged over the global batch (summed over processes here, not
    by DDP: the predictor is called N-1 times before one backward pass), one Adam step."""

    name = 'trajectory'
    options = dict(inter_weight=0.0, checkpointing=False, soft_radius=0.0)
    run_tag = 'traj'

    def __init__(self, problem, **options):
        super().__init__(problem, **options)
        for key in ('inter_weight', 'soft_radius'):
            value = getattr(self, key)
            if isinstance(value, bool) or not (value >= 0 and math.isfinite(value)):
                raise ValueError(f'{key} must be a finite number >= 0, got {value}')

    def soft_start(self, predictor, targets, cond):
        """The soft teacher's student start: ``targets[0]`` moved against the gradient of the
        trajectory loss there, by at most ``soft_radius`` times its norm (per sample). The step
        length minimises the quadratic through the loss and its slope at the start and the loss at
        the full radius (one more student run, no gradient): exact where the run is linear in its
        start, and never past the ball. A sample with a zero gradient stays."""
        x0 = targets[0].detach()
        x = x0.clone().requires_grad_(True)
        loss0, _ = self.problem.trajectory(predictor, [x, *targets[1:]], cond, self.inter_weight,
                                           checkpointing=self.checkpointing)
        grad, = torch.autograd.grad(loss0.sum(), x)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        gnorm, tiny = grad.flatten(1).norm(dim=1), torch.finfo(grad.dtype).tiny
        unit = grad / gnorm.clamp_min(tiny).view(shape)
        reach = self.soft_radius * x0.flatten(1).norm(dim=1)
        with torch.no_grad():
            loss1, _ = self.problem.trajectory(predictor, [x0 - reach.view(shape) * unit, *targets[1:]], cond,
                                               self.inter_weight)
            loss0, slope = loss0.detach(), -reach * gnorm          # d loss / d s at s = 0 (s: fraction of reach)
            curvature = loss1 - loss0 - slope
            s = torch.where(curvature > 0, (-slope / (2 * curvature.clamp_min(tiny))).clamp(0, 1),
                            torch.ones_like(slope))
        return x0 - (s * reach).view(shape) * unit

    def train_batch(self, ddp, predictor, optimizer, rounds_data, batch_gpu_total, stats):
        optimizer.zero_grad(set_to_none=True)
        for data in rounds_data:
            targets = data['targets']
            if self.soft_radius > 0:
                targets = [self.soft_start(predictor, targets, data['cond']), *targets[1:]]
            loss, infos = self.problem.trajectory(predictor, targets, data['cond'], self.inter_weight,
                                                  checkpointing=self.checkpointing)
            loss.sum().mul(1 / (batch_gpu_total * dist.get_world_size())).backward()
            add_step_stats(stats, loss, infos)
        if dist.get_world_size() > 1:
            for p in predictor.parameters():
                if p.grad is not None:
                    dist.all_reduce_sum(p.grad)
        sanitize_gradients(predictor)
        optimizer.step()


#: Every loss by name (``train.py --loss``).
LOSSES = {cls.name: cls for cls in (IntervalLoss, TrajectoryLoss)}
LOSS_OPTIONS = {k: v for cls in LOSSES.values() for k, v in cls.options.items()}


def make_loss(name, problem, **options):
    """The loss ``name`` over ``problem`` with its ``options``; ValueError naming an unknown loss or
    an option another loss takes when it differs from its default."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (choose one of {', '.join(LOSSES)})")
    cls = LOSSES[name]
    for key, value in options.items():
        if key not in cls.options and value != LOSS_OPTIONS.get(key, value):
            takers = ' and '.join(f'--loss={n}' for n, c in LOSSES.items() if key in c.options)
            raise ValueError(f'{key} is an option of {takers} only')
    return cls(problem, **{k: v for k, v in options.items() if k in cls.options})
