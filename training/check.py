"""Did the predictor help? The check at the end of a training run.

After the last batch, :func:`check_predictor` runs the trained predictor and its plain base solver
(the student solver without a predictor, at the same NFE, on the same schedule type and sigma
range, with the same AFS; AMED-Solver, which needs a predictor, is compared with DPM-Solver-2, the
same two-stage rule at r = 1/2) from the starting noise of ``num`` held-out trajectories, and
measures both against the teacher's final state from that noise (the training targets, so no
ground truth is needed). The ratio of the mean per-sample RMS errors says whether the predictor is
worth using on this model:

* ``helps``: ratio < 1 by more than twice its standard error;
* ``does not help``: ratio >= 1 by more than twice its standard error;
* ``unclear``: within twice its standard error of 1 (check more trajectories: ``--check``).

The standard error is the delta-method one of a ratio of two paired means (the same noise feeds
both solvers): sqrt(var(e_pred - ratio * e_base) / num) / mean(e_base).

The held-out seeds come from their own seed sequence and exclude every seed training drew, so
they never fed training (:func:`held_out_seeds`).
"""

import math

import numpy as np
import torch

import solvers
from models.base import seeded_inputs

#: The spawn key of the held-out seed sequence (training's own sequence has none).
HELD_OUT_KEY = 0xC0FFEE


def held_out_seeds(seed, num, exclude=()):
    """``num`` per-sample seeds from the held-out sequence of training seed ``seed``, none of them in
    ``exclude`` (the seeds training drew)."""
    exclude = set(exclude)
    out, draw = [], 0
    while len(out) < num:
        ss = np.random.SeedSequence([int(seed), draw], spawn_key=(HELD_OUT_KEY,))
        out += [int(s) for s in ss.generate_state(num, dtype=np.uint32) if int(s) not in exclude]
        draw += 1
    return out[:num]


def base_solver(student):
    """The plain solver a predictor-driven ``student`` is compared with: itself, or DPM-Solver-2 for
    a solver that needs a predictor."""
    return 'dpm' if solvers.REGISTRY[student].needs_predictor else student


def base_num_steps(student, num_steps, afs):
    """Time points of the plain base solver whose NFE equals the student's with a predictor."""
    base = base_solver(student)
    nfe = solvers.count_nfe(student, num_steps, afs, with_predictor=True)
    for n in range(2, 2 * num_steps + 2):
        if solvers.count_nfe(base, n, afs) == nfe:
            return n
    raise ValueError(f'no plain {base} run has the NFE {nfe} of {student} with a predictor')   # pragma: no cover


def per_sample_rms(x, ref):
    return (x.double() - ref.double()).flatten(1).square().mean(1).sqrt()


def verdict(ratio, se):
    if se is None:
        return 'unclear'
    if ratio + 2 * se < 1:
        return 'helps'
    if ratio - 2 * se >= 1:
        return 'does not help'
    return 'unclear'


@torch.no_grad()
def errors(loss_fn, predictor, seeds, device=torch.device('cpu'), batch=64):
    """Per-sample RMS errors against the teacher of ``loss_fn`` (a :class:`training.loss.AMEDLoss`)
    on ``seeds``: (the predictor's (n,), the plain base solver's (n,), facts of the base run)."""
    model, student = loss_fn.model, loss_fn.student
    base = base_solver(student.name)
    base_steps = base_num_steps(student.name, loss_fn.num_steps, loss_fn.afs)
    base_spec = solvers.make_solver(base, getattr(model, 'latent', False),
                                    **{k: v for k, v in solvers.options_of(student).items()
                                       if k in solvers.REGISTRY[base].options})
    base_t = solvers.get_model_schedule(model, base_steps, **loss_fn.schedule)
    e_pred, e_base = [], []
    for i in range(0, len(seeds), batch):
        latents, cond = seeded_inputs(model, seeds[i:i + batch], device, training=True)   # as training draws
        target = loss_fn.teacher_targets(latents, cond)[-1]
        x = solvers.sample(model, latents, cond, solver=student, t_steps=loss_fn.t_student, afs=loss_fn.afs,
                           predictor=predictor)
        y = solvers.sample(model, latents, cond, solver=base_spec, t_steps=base_t, afs=loss_fn.afs)
        e_pred.append(per_sample_rms(x, target).cpu())
        e_base.append(per_sample_rms(y, target).cpu())
    facts = dict(base_solver=base, base_num_steps=base_steps,
                 nfe=solvers.count_nfe(student.name, loss_fn.num_steps, loss_fn.afs, with_predictor=True),
                 reference=f'teacher {loss_fn.teacher.name}, M={loss_fn.M}')
    return torch.cat(e_pred), torch.cat(e_base), facts


def ratio_of(e_pred, e_base):
    """(ratio of the mean errors, its standard error (None for one sample), verdict); the ratio is
    None (verdict 'unclear') when the base solver's error is 0, as when it is its own teacher."""
    n = len(e_pred)
    if not float(e_base.mean()) > 0:   # the base reproduces the teacher exactly: no ratio to speak of
        return None, None, 'unclear'
    ratio = float(e_pred.mean() / e_base.mean())
    se = float((e_pred - ratio * e_base).std() / math.sqrt(n) / e_base.mean()) if n > 1 else None
    return ratio, se, verdict(ratio, se)


def check_predictor(loss_fn, predictor, seeds, device=torch.device('cpu'), batch=64):
    """Compare ``predictor`` with its plain base solver on the held-out ``seeds`` (:func:`errors`).
    Returns a dict of plain data: ratio, its standard error, the verdict, both mean errors, the base
    solver, its num_steps, the NFE and the number of trajectories."""
    e_pred, e_base, facts = errors(loss_fn, predictor, seeds, device, batch)
    ratio, se, word = ratio_of(e_pred, e_base)
    return dict(ratio=ratio, ratio_se=se, verdict=word, error=float(e_pred.mean()), base_error=float(e_base.mean()),
                num=len(e_pred), **facts)


def check_line(result):
    """The console line of a check."""
    se = '' if result['ratio_se'] is None else f" (+-{result['ratio_se']:.3f})"
    ratio = 'n/a (the base has no error against the teacher), ' if result['ratio'] is None else \
        f"{result['ratio']:.3f}x{se}"
    return (f"Check on {result['num']} held-out trajectories (against the teacher): the predictor's error is "
            f"{ratio} plain {result['base_solver']}'s at NFE "
            f"{result['nfe']} ({result['error']:.4g} vs {result['base_error']:.4g}): {result['verdict']}")
