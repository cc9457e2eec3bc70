"""Sample-folder manifests: a folder of samples says what made it, so that it never mixes two
configurations.

sample.py writes ``manifest.json`` beside the images before it samples::

    {"format": "amed-samples", "version": 1,
     "config": {"source": ..., "predictor": {...}, "model": {...}, "solver": {...}, "layout": {...}},
     "seeds": "0-49999"}

``config`` is everything that decides the images and where they lie: the predictor file and its
sha256 (or the card's, or "plain"), the model (preset, model file, guidance, prompts), the solver
settings (:class:`predictors.settings.SolverSettings`: every option resolved, the exact schedule
``t_steps`` and AFS; older manifests' ``{name, options, afs, t_steps}`` read as the same), and the file layout (grid, 1000-seed
subfolders, trajectories). ``seeds`` are the seeds asked for (the union over runs into the folder).

* Writing into a folder whose manifest has another ``config`` is refused (one line naming the first
  differing field) unless ``--overwrite``; so is a folder that holds sample files but no manifest.
  ``--overwrite`` first removes the folder's sample files (``<seed>.png``, ``<seed>.npz``,
  ``grid.png``) and its manifest; nothing else is touched.
* ``--resume`` skips the seeds whose PNG exists and decodes (:func:`complete_seeds`).
* ``fid.py calc`` reads the manifests under the image folder (:func:`read_manifests`): it reports
  how many of the asked seeds it found and refuses a set whose manifests differ.
"""

import json
import os
import re

import PIL.Image

from predictors.settings import SolverSettings
from torch_utils.misc import atomic_write, check_output_dir, format_int_list, parse_int_list

MANIFEST = 'manifest.json'
FORMAT = 'amed-samples'
VERSION = 1
_SEED_FILE = re.compile(r'^\d+\.(png|npz)$')
_SEED_FOLDER = re.compile(r'^\d{6}$')


def make_manifest(config, seeds):
    """The manifest dict of ``config`` (JSON data) and the asked ``seeds``."""
    return dict(format=FORMAT, version=VERSION, config=json.loads(json.dumps(config)),
                seeds=format_int_list(seeds))


def read_manifest(path):
    """The manifest at ``path`` (a file, or a folder holding ``manifest.json``), None when there is
    none; ValueError (one line naming the file) when it is not a readable sample manifest."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: unreadable sample manifest ({type(e).__name__}: {e})') from None
    if not isinstance(data, dict) or data.get('format') != FORMAT or not isinstance(data.get('config'), dict):
        raise ValueError(f'{path}: not a sample manifest (no format tag {FORMAT!r})')
    if data.get('version') != VERSION:
        raise ValueError(f'{path}: unsupported sample manifest version {data.get("version")!r}')
    solver = data['config'].get('solver')
    if isinstance(solver, dict) and 'settings_version' not in solver:   # written by older code: read it as now
        try:
            data['config']['solver'] = SolverSettings.from_dict(solver).to_dict()
        except ValueError as e:
            raise ValueError(f'{path}: bad solver settings in the sample manifest ({e})') from None
    try:
        parse_int_list(data.get('seeds', ''))
    except ValueError as e:
        raise ValueError(f'{path}: bad seeds in the sample manifest: {e}') from None
    return data


def manifest_seeds(manifest):
    return parse_int_list(manifest['seeds']) if manifest['seeds'] else []


def first_difference(a, b, prefix=''):
    """The dotted name of the first field where the JSON data ``a`` and ``b`` differ, None if equal
    (in the order of ``b``'s keys, then ``a``'s others)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*b, *(k for k in a if k not in b)]:
            diff = first_difference(a.get(key), b.get(key), f'{prefix}{key}.')
            if diff:
                return diff
        return None
    return None if a == b else prefix.rstrip('.') or '(root)'


def sample_files(folder):
    """The sample files of ``folder`` (sample.py's layout: ``[<000000>/]<seed>.png|npz`` and
    ``grid.png``), as paths."""
    found = []
    if not os.path.isdir(folder):
        return found
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry == 'grid.png' or (_SEED_FILE.match(entry) and os.path.isfile(path)):
            found.append(path)
        elif _SEED_FOLDER.match(entry) and os.path.isdir(path):
            found.extend(os.path.join(path, e) for e in sorted(os.listdir(path)) if _SEED_FILE.match(e))
    return found


def check_folder(outdir, config, overwrite=False, resume=False, option='--outdir'):
    """Decide, before anything is written, whether samples of ``config`` may go into ``outdir``.

    Returns the manifest already there (None if none). ValueError (one line) when the folder holds
    samples of another configuration or sample files without a manifest (unless ``overwrite``), or
    when both ``overwrite`` and ``resume`` are asked for. ``option`` names the folder in the messages."""
    if overwrite and resume:
        raise ValueError('give --overwrite (start again) or --resume (continue), not both')
    check_output_dir(outdir, option)
    try:
        existing = read_manifest(outdir) if os.path.isdir(outdir) else None
    except ValueError:
        if overwrite:
            return None
        raise
    if existing is None:
        if sample_files(outdir) and not overwrite:
            raise ValueError(f'{outdir} holds sample files but no {MANIFEST}: they may come from another '
                             f'configuration; choose another {option} or pass --overwrite to replace them')
        return None
    diff = first_difference(existing['config'], json.loads(json.dumps(config)))
    if diff and not overwrite:
        raise ValueError(f'{outdir} holds samples of another configuration (its {MANIFEST} differs in {diff}); '
                         f'choose another {option} or pass --overwrite to replace them')
    return None if diff else existing


def complete_seeds(outdir, seeds, subdirs=True):
    """The seeds whose PNG in ``outdir`` exists and decodes completely (what ``--resume`` skips)."""
    done = []
    for seed in seeds:
        path = seed_path(outdir, seed, 'png', subdirs)
        if not os.path.isfile(path):
            continue
        try:
            with PIL.Image.open(path) as img:
                img.load()
        except Exception:  # a damaged or cut-off file: sample it again
            continue
        done.append(seed)
    return done


def seed_path(outdir, seed, ext, subdirs=True):
    """Where sample.py puts the ``ext`` file of ``seed``: ``outdir/<seed - seed % 1000>/<seed>.<ext>``."""
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.{ext}')


def prepare_folder(outdir, config, seeds, existing=None, overwrite=False):
    """Rank 0, after :func:`check_folder` and before sampling: with ``overwrite`` remove the folder's
    sample files and manifest; then write the manifest (seeds: the union with ``existing``'s)."""
    if overwrite:
        for path in sample_files(outdir) + [os.path.join(outdir, MANIFEST)]:
            if os.path.isfile(path):
                os.remove(path)
    os.makedirs(outdir, exist_ok=True)
    all_seeds = sorted(set(seeds) | set(manifest_seeds(existing) if existing else []))
    text = json.dumps(make_manifest(config, all_seeds), indent=2) + '\n'

    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
    atomic_write(os.path.join(outdir, MANIFEST), write)


def read_manifests(path):
    """The sample manifests under an image folder (itself and any subfolder), as (path, manifest)."""
    found = []
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            if MANIFEST in files:
                found.append((os.path.join(root, MANIFEST), read_manifest(os.path.join(root, MANIFEST))))
    return found


def check_image_set(path, names):
    """What ``fid.py`` learns from the manifests of an image folder ``path`` whose images are
    ``names`` (relative paths): None when it holds no manifest, else a one-line report of how many
    of the seeds asked for it holds. ValueError (one line) when its manifests describe more than one
    configuration, or when it holds images that no manifest lists."""
    found = read_manifests(path)
    if not found:
        return None
    (first_path, first), others = found[0], found[1:]
    for other_path, other in others:
        diff = first_difference(first['config'], other['config'])
        if diff:
            raise ValueError(f'{path} mixes samples of two configurations: {first_path} and {other_path} differ in '
                             f'{diff}')
    asked = set()
    for _, m in found:
        asked.update(manifest_seeds(m))
    stems = [os.path.splitext(os.path.basename(n))[0] for n in names]
    strays = [n for n, s in zip(names, stems) if not s.isdigit() or int(s) not in asked]
    if strays:
        raise ValueError(f'{path} holds {len(strays)} image(s) that its {MANIFEST} does not list (e.g. {strays[0]}): '
                         f'they come from another run')
    return (f'{path}: {len(names)} of the {len(asked)} seeds in its {MANIFEST} '
            f'({len(asked) - len(names)} missing)' if len(names) < len(asked) else
            f'{path}: all {len(asked)} seeds in its {MANIFEST}')
