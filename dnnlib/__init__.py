"""Small utilities shared across the codebase (NVIDIA dnnlib-compatible names).

`dnnlib.EasyDict` must keep this exact name: EDM and AMED pickles refer to it.
"""

from .util import EasyDict, make_cache_dir_path, open_url

__all__ = ['EasyDict', 'make_cache_dir_path', 'open_url']
