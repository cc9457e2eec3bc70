"""Training recipes: named sets of ``train.py`` option defaults (``train.py --recipe=NAME``).

A recipe is data: a dict of training options. The options given explicitly (on the command line,
or in the options dict of :func:`training.launch.plan_training`) override it; the rest of the
run keeps the usual defaults. Each recipe states where it was chosen and what it
measured (docs/recipes.md).
"""

#: Every recipe, by name.
RECIPES = {
    # Chosen on validation seeds over the built-in models (docs/recipes.md): AMED-Plugin on iPNDM as a
    # table of per-interval scalars, trained on the final output against an iPNDM teacher with M=5.
    'recommended': dict(sampler_stu='ipndm', sampler_tea='ipndm', M=5, max_order=4, afs=True,
                        schedule_type='polynomial', schedule_rho=7.0, scale_dir=0.01, scale_time=0.2,
                        predictor='table', loss='trajectory', lr=0.05, batch=32, total_kimg=2.0),
}


def recipe_help():
    """Each recipe with its options, for ``--help``."""
    return '; '.join(f"{name} = " + ' '.join(f'--{k}={v}' for k, v in opts.items()) for name, opts in RECIPES.items())


def recipe_options(name):
    """The options of recipe ``name`` (None: no recipe, {}); ValueError for an unknown recipe."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (choose one of {', '.join(RECIPES)})")
    return dict(RECIPES[name])
