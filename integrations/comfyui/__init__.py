"""AMED-Solver nodes for ComfyUI: a solver card as a SAMPLER plus its SIGMAS, or as SIGMAS alone.

Install: symlink (or copy) this folder into ComfyUI's ``custom_nodes`` (see README.md here). The
nodes run this repository's code, so the folder finds the repository it belongs to: through the
symlink, or through the ``AMED_SOLVER_ROOT`` environment variable for a copy.
"""

import os
import sys


def _repository_root():
    here = os.path.dirname(os.path.realpath(__file__))
    for root in (os.environ.get('AMED_SOLVER_ROOT'), os.path.dirname(os.path.dirname(here))):
        if root and os.path.isfile(os.path.join(root, 'solvers.py')) and os.path.isdir(os.path.join(root, 'integrations')):
            return os.path.abspath(root)
    raise ImportError('AMED nodes: the AMED-Solver repository was not found: symlink this folder from the repository '
                      '(integrations/comfyui) or set AMED_SOLVER_ROOT to the repository folder')


_ROOT = _repository_root()
if _ROOT not in sys.path:
    sys.path.append(_ROOT)   # appended: ComfyUI's own modules keep their precedence

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ['NODE_CLASS_MAPPINGS', 'NODE_DISPLAY_NAME_MAPPINGS']
