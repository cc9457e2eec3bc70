"""Training recipes as data: ``train.py --recipe=NAME`` sets every option of a recipe, and options
given explicitly override it.

* ``paper-solver``: AMED-Solver as the paper trains it on CIFAR-10 (the official launch script:
  Heun teacher with one inserted point, 4 time points with AFS (NFE 5), time-uniform schedule,
  batch 128, 10k trajectories);
* ``paper-plugin``: AMED-Plugin on iPNDM as the paper trains it on CIFAR-10 (iPNDM teacher with two
  inserted points, polynomial schedule rho 7, order 4, scale_time 0.2);
* ``plugin-dpmpp``: AMED-Plugin on DPM-Solver++(3M) on the logSNR schedule, with the iPNDM
  recipe's other settings (not a recipe of the paper; the evaluation's third student);
* ``recommended``: chosen on validation seeds over the built-in models (docs/recipes.md): AMED-Plugin
  on iPNDM as a table of per-interval scalars, trained on the final output (trajectory loss)
  against an iPNDM teacher with M=5; at 3 time points (NFE 3 with AFS), schedule rho 10 instead of 7.

Each recipe splits into its ``solver`` part (student, teacher, M, schedule, solver options, scale
heads: what the evaluation trains at any NFE) and its ``run`` part (time points, AFS, batch,
length, learning rate); ``by_num_steps`` changes some of its values at a given number of time
points (``--num_steps``, given or the recipe's). The options given explicitly (on the command line, or in the options
dict of :func:`training.launch.plan_training`) override a recipe; the rest of the run keeps the
usual defaults.
"""

import dataclasses
import textwrap


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named set of training options: ``label`` (as in tables), ``solver`` and ``run`` (see the
    module docstring); :attr:`options` is both."""
    name: str
    label: str
    description: str
    solver: dict
    run: dict
    by_num_steps: dict = dataclasses.field(default_factory=dict)

    @property
    def options(self):
        return dict(self.solver, **self.run)

    def options_for(self, num_steps=None):
        """The options at ``num_steps`` time points: :attr:`options`, with the values that
        :attr:`by_num_steps` gives for that number of steps (None: the base options)."""
        return dict(self.options, **self.by_num_steps.get(num_steps, {}))


_PAPER_RUN = dict(num_steps=4, afs=True, batch=128, total_kimg=10.0, lr=5e-3)

RECIPES = {r.name: r for r in (
    Recipe('paper-solver', 'AMED-Solver', "the paper's AMED-Solver (CIFAR-10)",
           dict(sampler_stu='amed', sampler_tea='heun', M=1, schedule_type='time_uniform', schedule_rho=1.0,
                scale_dir=0.01, scale_time=0.0), _PAPER_RUN),
    Recipe('paper-plugin', 'AMED-Plugin (iPNDM)', "the paper's AMED-Plugin on iPNDM (CIFAR-10)",
           dict(sampler_stu='ipndm', sampler_tea='ipndm', M=2, schedule_type='polynomial', schedule_rho=7.0,
                max_order=4, scale_dir=0.01, scale_time=0.2), _PAPER_RUN),
    Recipe('plugin-dpmpp', 'AMED-Plugin (DPM-Solver++)', 'AMED-Plugin on DPM-Solver++(3M), logSNR schedule',
           dict(sampler_stu='dpmpp', sampler_tea='dpmpp', M=2, schedule_type='logsnr', max_order=3,
                scale_dir=0.01, scale_time=0.2), _PAPER_RUN),
    Recipe('recommended', 'AMED-Plugin (iPNDM, recommended)', 'AMED-Plugin on iPNDM as a per-interval table, '
           'trajectory loss (docs/recipes.md)',
           dict(sampler_stu='ipndm', sampler_tea='ipndm', M=5, schedule_type='polynomial', schedule_rho=7.0,
                max_order=4, scale_dir=0.01, scale_time=0.2, predictor='table', loss='trajectory'),
           dict(afs=True, batch=32, total_kimg=2.0, lr=0.05), by_num_steps={3: dict(schedule_rho=10.0)}),
)}


def recipe(name):
    """The recipe ``name``; ValueError naming the choices otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (choose one of {', '.join(RECIPES)})")
    return RECIPES[name]


def recipe_options(name, num_steps=None):
    """The options of recipe ``name`` at ``num_steps`` time points (:meth:`Recipe.options_for`;
    None: no recipe, {}); ValueError for an unknown recipe."""
    return {} if name is None else recipe(name).options_for(num_steps)


def describe(name, width=76):
    """The recipe's name and description, then its options as train.py flags, wrapped at ``width``."""
    r = recipe(name)
    flags = _flags(r.options)
    for steps, values in r.by_num_steps.items():
        flags += f'; at --num_steps={steps}: {_flags(values)}'
    return '\n'.join([f'{name}: {r.description}', *textwrap.wrap(flags, width, initial_indent='    ',
                                                                   subsequent_indent='    ')])


def _flags(options):
    return ' '.join(f'--{k}={v:g}' if isinstance(v, float) else f'--{k}={v}' for k, v in options.items())
