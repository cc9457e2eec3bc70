"""Training the AMED predictor: the losses (loss.py), the loop (training_loop.py), the training
state of an unfinished run (state.py) and the launch of a run from its options (launch.py). The
predictor itself, its files and run folders live in :mod:`predictors`.

The public entry point, for train.py, the evaluation and the benchmarks: :func:`plan_training`
(or :func:`plan_resume`) validates the options and loads what the run needs, :func:`run_training`
trains; :class:`AMEDLoss` is the loss they train with; :data:`RECIPES` are the named recipes
(:mod:`training.recipes`).
"""

from training.launch import plan_resume, plan_training, run_training
from training.loss import LOSSES, AMEDLoss
from training.recipes import RECIPES

__all__ = ['plan_training', 'plan_resume', 'run_training', 'AMEDLoss', 'LOSSES', 'RECIPES']
