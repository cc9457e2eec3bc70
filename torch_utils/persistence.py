"""Pickling of whole classes together with their source code.

This module reads and writes the pickle format of NVIDIA's
``torch_utils/persistence.py`` (as used by EDM and AMED-Solver), so that the
released ``.pkl`` networks load here and pickles written here load there.

How it works
------------
A class decorated with :func:`persistent_class` remembers the complete source
text of the module that defines it.  Pickling an instance does not refer to the
class by its import path; it stores::

    (_reconstruct_persistent_obj, (meta,), None, ...)

where ``meta = dict(type='class', version=6, module_src=<module source>,
class_name=<class name>, state=<instance __dict__>)``.  The only GLOBAL the
pickle needs from this scheme is ``torch_utils.persistence._reconstruct_persistent_obj``.
On loading, the module source is executed in a fresh module named
``_imported_module_<hex>`` (once per distinct source text), the class is looked
up in it and the instance state is restored.  The defining module therefore
does not need to be importable (or even to exist) where the pickle is loaded;
only the modules that the embedded source itself imports do.

Security
--------
**Unpickling executes code.**  Any pickle may do so, and a persistent pickle
explicitly ``exec``s the module source it carries.  Only load pickles from
sources you trust.
"""

import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import dnnlib

# ----------------------------------------------------------------------------
# Format version and module-level registries (names match NVIDIA's module).

_version = 6                # Version of the pickle format; stored in every meta dict.
_decorators = set()         # Every class produced by persistent_class().
_import_hooks = []          # Callables meta -> meta, run before reconstructing an object.
_module_to_src_dict = dict()  # module object -> its full source text
_src_to_module_dict = dict()  # full source text -> module object

# Fully qualified type names whose instances always pickle (checked by name so
# that this module does not need to import numpy or torch).
_ALWAYS_PICKLEABLE_TYPES = frozenset([
    'numpy.ndarray',
    'torch.Tensor',
    'torch.nn.parameter.Parameter',
])

# ----------------------------------------------------------------------------


def persistent_class(orig_class):
    """Class decorator: make instances pickle together with their module source.

    Instances of the returned class record deep copies of their constructor
    arguments (``obj.init_args``, ``obj.init_kwargs``) unless the instance sets
    ``self._record_init_args = False`` before its ``__init__`` finishes, and
    their pickles embed the full source text of the module defining
    ``orig_class``.  See the module docstring for the pickle layout.

    Restrictions (as for NVIDIA's version): the class must be defined at the
    top level of a module whose source ``inspect.getsource`` can read, and the
    instance state must itself be pickleable; this is checked at construction.

    Args:
        orig_class: the class to decorate.

    Returns:
        A subclass of ``orig_class`` with the same ``__name__`` and
        ``__module__``, or ``orig_class`` itself if it is already persistent.
    """
    assert isinstance(orig_class, type), 'persistent_class() expects a class'
    if is_persistent(orig_class):
        return orig_class

    assert orig_class.__module__ in sys.modules, \
        f'module {orig_class.__module__!r} of {orig_class.__name__} is not loaded'
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record else None
            self._init_kwargs = copy.deepcopy(kwargs) if record else None
            assert orig_class.__name__ in orig_module.__dict__, \
                f'{orig_class.__name__} must be defined at the top level of its module'
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self):
            """Deep copy of the positional constructor arguments (a tuple)."""
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            """Deep copy of the keyword constructor arguments (an EasyDict)."""
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(
                    type='class',
                    version=_version,
                    module_src=self._orig_module_src,
                    class_name=self._orig_class_name,
                    state=fields[2],
                )
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = getattr(orig_class, '__qualname__', orig_class.__name__)
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    return Decorator

# ----------------------------------------------------------------------------


def is_persistent(obj_or_class):
    """Return True if the argument is a persistent class or an instance of one."""
    try:
        if obj_or_class in _decorators:
            return True
    except TypeError:  # unhashable instance
        pass
    return type(obj_or_class) in _decorators

# ----------------------------------------------------------------------------


def import_hook(hook):
    """Register ``hook(meta) -> meta``, run on every persistent object being unpickled.

    Hooks run in registration order before the version check and before the
    embedded source is executed.  ``meta`` is an EasyDict with the fields
    ``type``, ``version``, ``module_src``, ``class_name`` and ``state``; a hook
    typically rewrites ``meta.module_src`` (e.g. to rename an imported module)
    and must return the (possibly new) meta, never None.

    Returns ``hook`` so that this can be used as a decorator.
    """
    assert callable(hook), 'import_hook() expects a callable'
    _import_hooks.append(hook)
    return hook

# ----------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta):
    """Rebuild a persistent object from its meta dict (called by the unpickler).

    The name and signature are part of the pickle format: every persistent
    pickle refers to ``torch_utils.persistence._reconstruct_persistent_obj``.
    This executes ``meta['module_src']`` (once per distinct source text).
    """
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None, f'import hook {hook!r} returned None'

    assert meta.version == _version, \
        f'unsupported persistence pickle version {meta.version!r} (expected {_version})'
    module = _src_to_module(meta.module_src)

    assert meta.type == 'class', f'unsupported persistent object type {meta.type!r}'
    orig_class = module.__dict__[meta.class_name]
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)

    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj

# ----------------------------------------------------------------------------


def _module_to_src(module):
    """Return the full source text of ``module`` (cached in both directions)."""
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src):
    """Return a module built from the source text ``src`` (cached by exact text).

    On a cache miss a fresh module ``_imported_module_<uuid hex>`` is created,
    registered in ``sys.modules`` and in both caches *before* the source runs
    (so that the source's own ``@persistent_class`` decorators find it), and
    then ``exec(src, module.__dict__)`` runs.  This executes arbitrary code.
    """
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)  # pylint: disable=exec-used
    return module

# ----------------------------------------------------------------------------


def _check_pickleable(obj):
    """Raise if ``obj`` cannot be pickled; cheap for the common cases.

    Containers (list, tuple, set, dict) are walked recursively.  Primitives,
    numpy arrays, torch tensors and persistent objects are assumed fine without
    serialising them; every other leaf is trial-pickled into a scratch buffer.
    """
    trial = []
    seen = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple, set, frozenset, dict)):
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                for key, value in item.items():
                    stack.append(key)
                    stack.append(value)
            else:
                stack.extend(item)
            continue
        if item is None or isinstance(item, (str, int, float, complex, bool, bytes, bytearray)):
            continue
        if f'{type(item).__module__}.{type(item).__name__}' in _ALWAYS_PICKLEABLE_TYPES:
            continue
        if is_persistent(item):
            continue
        trial.append(item)
    with io.BytesIO() as scratch:
        pickle.dump(trial, scratch)

# ----------------------------------------------------------------------------
# Loading pickles that hold CUDA tensors on a machine without CUDA.


def _load_storage_to_cpu(data):
    """Replacement for ``torch.storage._load_from_bytes`` that maps to the CPU."""
    import torch  # pylint: disable=import-outside-toplevel
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=False)


class CPUUnpickler(pickle.Unpickler):
    """Unpickler that loads every pickled torch storage onto the CPU.

    Plain ``pickle.load`` rebuilds tensor storages through
    ``torch.storage._load_from_bytes``, which restores them on the device they
    were saved from and fails for CUDA tensors when CUDA is unavailable.  This
    unpickler substitutes a loader with ``map_location='cpu'``; every other
    GLOBAL resolves as usual.  Unpickling still executes code: trusted files only.
    """

    def find_class(self, module, name):
        """Resolve a GLOBAL, remapping ``torch.storage._load_from_bytes``."""
        if module == 'torch.storage' and name == '_load_from_bytes':
            return _load_storage_to_cpu
        return super().find_class(module, name)


def cpu_unpickler_load(f):
    """Like ``pickle.load(f)`` but with all torch tensors placed on the CPU.

    Use this for EDM/AMED ``.pkl`` files whose tensors were saved on CUDA (e.g.
    the ``loss_fn`` entry of AMED snapshots) on a machine without CUDA.

    **Security:** unpickling executes code (persistent objects ``exec`` their
    embedded module source); only load files you trust.

    Args:
        f: a binary file object open for reading.

    Returns:
        The unpickled object.
    """
    return CPUUnpickler(f).load()

# ----------------------------------------------------------------------------


def load_pickle(path, what='network', verbose=True):
    """Load a pickle from a path or URL (URLs are downloaded once to the dnnlib cache) with every
    tensor on the CPU. Prints a one-line note to stderr first (``verbose``): unpickling executes
    the code stored in the file. A file that does not unpickle raises ValueError naming it."""
    with dnnlib.util.open_url(path, verbose=verbose) as f:
        if verbose:
            print(f'note: loading {path} executes the code stored in it (NVIDIA pickle); load only files you trust',
                  file=sys.stderr)
        try:
            return cpu_unpickler_load(f)
        except Exception as e:   # a corrupt or foreign file: one line, naming it
            reason = ' '.join(str(e).split())[:200]
            raise ValueError(f'{path}: not a readable {what} pickle ({type(e).__name__}: {reason})') from None
