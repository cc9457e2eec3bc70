"""Sample-folder manifests: a folder of samples says what made it, so that it never mixes two
configurations, and what of it is complete.

sample.py (and ``fid.py toydata``) writes ``manifest.json`` beside the images before it samples::

    {"format": "amed-samples", "version": 1,
     "config": {"source": ..., "model": {...}, "solver": {...}, "layout": {...}},
     "asked": "0-49999", "seeds": "0-49999"}

``config`` is everything that decides the images and where they lie: the predictor file and its
sha256 (or the card's, or "plain"), the model (preset, model file, guidance, prompts), the solver
settings (:class:`predictors.settings.SolverSettings`: every option resolved, the exact schedule
``t_steps`` and AFS; older manifests' ``{name, options, afs, t_steps}`` read as the same), and the
file layout (grid, 1000-seed subfolders, trajectories). ``asked`` are the seeds asked for (the union over runs into the folder);
``seeds`` those whose files a run finished writing (written when a run ends, stops on a signal or
fails to write; a run killed outright leaves the previous value): the manifest never lists a seed
that was not written. Manifests without ``asked`` (older ones) asked for their ``seeds``. Seed sets
are kept as ranges (:class:`torch_utils.misc.SeedSet`), never expanded.

* Writing into a folder whose manifest has another ``config`` is refused (one line naming the first
  differing field) unless ``--overwrite``; so is a folder that holds sample files but no manifest.
  ``--overwrite`` first removes the folder's sample files (``<seed>.png``, ``<seed>.npz``,
  ``grid.png``, in 1000-seed subfolders of 6 or more digits) and its manifest; every run removes the
  temporary files an interrupted run left (:func:`is_temporary`); nothing else is touched.
* ``--resume`` skips the seeds whose files are complete (:func:`complete_seeds`).
* ``fid.py calc`` and ``ref`` check an image set with :func:`check_image_set`: one configuration,
  every image where its manifest's layout puts one of its asked seeds, no seed twice; the report
  says whether the set is complete.
"""

import json
import os
import re
import zipfile

import PIL.Image

from dnnlib.util import read_settings_text
from predictors.settings import SolverSettings
from torch_utils.misc import SeedSet, atomic_write, check_output_dir

MANIFEST = 'manifest.json'
FORMAT = 'amed-samples'
VERSION = 1
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_SEED_FILE = re.compile(r'^\d+\.(png|npz)$')
_SEED_FOLDER = re.compile(r'^\d{6,}$')
# Temporary files of atomic writes (torch_utils.misc.atomic_write): '.<name>.<random>.tmp', and
# those of older code, '.<name>.<random>.<ext>'.
_TEMPORARY = re.compile(r'^\..+\.tmp$|^\.(\d+\.(png|npz)|grid\.png|manifest\.json)\.[A-Za-z0-9_]{8}\.(png|npz|json)$')


def is_temporary(name):
    """Whether the file name ``name`` is a temporary file of an atomic write (never an image)."""
    return bool(_TEMPORARY.match(name))


def is_hidden(relpath):
    """Whether a relative path ('/'-separated) has a part starting with '.': temporary files, lock
    files and the like, which no image scan counts."""
    return any(part.startswith('.') for part in relpath.split('/'))


def make_manifest(config, seeds, asked=None):
    """The manifest dict of ``config`` (JSON data), the written ``seeds`` and the ``asked`` ones
    (default: the written ones)."""
    return dict(format=FORMAT, version=VERSION, config=json.loads(json.dumps(config)),
                asked=str(SeedSet(seeds if asked is None else asked)), seeds=str(SeedSet(seeds)))


def parse_manifest(text, path):
    """The manifest in ``text`` (read from ``path``, named in errors); ValueError (one line)."""
    try:
        data = json.loads(text)
    except ValueError as e:
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
    for key in ('seeds', 'asked'):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f'{path}: bad {key} in the sample manifest: not a seed list string')
        try:
            SeedSet(data.get(key, ''))
        except ValueError as e:
            raise ValueError(f'{path}: bad {key} in the sample manifest: {e}') from None
    return data


def read_manifest(path):
    """The manifest at ``path`` (a file, or a folder holding ``manifest.json``), None when there is
    none; ValueError (one line naming the file) when it is not a readable sample manifest."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        text = read_settings_text(path, 'sample manifest')   # its seeds are ranges: small
    except OSError as e:
        raise ValueError(f'{path}: unreadable sample manifest ({type(e).__name__}: {e})') from None
    return parse_manifest(text, path)


def manifest_seeds(manifest):
    """The seeds a manifest says were written, as a :class:`SeedSet`."""
    return SeedSet(manifest.get('seeds', ''))


def asked_seeds(manifest):
    """The seeds a manifest says were asked for, as a :class:`SeedSet`."""
    return SeedSet(manifest.get('asked', manifest.get('seeds', '')))


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


def _folder_entries(folder):
    """(root, seed subfolders) of a sample folder: the folders where sample.py puts files."""
    subs = [os.path.join(folder, e) for e in sorted(os.listdir(folder))
            if _SEED_FOLDER.match(e) and os.path.isdir(os.path.join(folder, e))]
    return [folder] + subs


def sample_files(folder):
    """The sample files of ``folder`` (sample.py's layout: ``[<000000>/]<seed>.png|npz`` and
    ``grid.png``), as paths."""
    if not os.path.isdir(folder):
        return []
    found = [os.path.join(folder, 'grid.png')] if os.path.isfile(os.path.join(folder, 'grid.png')) else []
    for sub in _folder_entries(folder):
        found.extend(os.path.join(sub, e) for e in sorted(os.listdir(sub))
                     if _SEED_FILE.match(e) and os.path.isfile(os.path.join(sub, e)))
    return found


def temporary_files(folder):
    """The temporary files that interrupted writes left in ``folder`` and its seed subfolders."""
    if not os.path.isdir(folder):
        return []
    return [os.path.join(sub, e) for sub in _folder_entries(folder) for e in sorted(os.listdir(sub))
            if is_temporary(e) and os.path.isfile(os.path.join(sub, e))]


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


def _complete_png(path):
    try:
        with PIL.Image.open(path) as img:
            img.load()
    except Exception:  # a damaged or cut-off file: sample it again
        return False
    return True


def complete_seeds(outdir, seeds, subdirs=True, return_inters=False):
    """The seeds whose files in ``outdir`` are complete (what ``--resume`` skips): the PNG exists
    and decodes, and with ``return_inters`` the trajectory ``.npz`` exists and is a whole archive."""
    done = []
    for seed in seeds:
        path = seed_path(outdir, seed, 'png', subdirs)
        if not os.path.isfile(path) or not _complete_png(path):
            continue
        if return_inters and not zipfile.is_zipfile(seed_path(outdir, seed, 'npz', subdirs)):
            continue
        done.append(seed)
    return done


def seed_path(outdir, seed, ext, subdirs=True):
    """Where sample.py puts the ``ext`` file of ``seed``: ``outdir/<seed - seed % 1000>/<seed>.<ext>``
    (folder and file names of at least 6 digits: seeds from 10^6 on have 7 or more)."""
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.{ext}')


def prepare_folder(outdir, config, seeds, existing=None, overwrite=False):
    """Rank 0, holding the folder's lock, after :func:`check_folder` and before sampling: remove
    temporary files of interrupted runs; with ``overwrite`` also the folder's sample files and
    manifest; then write the manifest (asked: the union with ``existing``'s; written: ``existing``'s)."""
    doomed = temporary_files(outdir)
    if overwrite:
        doomed += sample_files(outdir) + [os.path.join(outdir, MANIFEST)]
    for path in doomed:
        if os.path.isfile(path):
            os.remove(path)
    os.makedirs(outdir, exist_ok=True)
    asked = SeedSet(seeds) | (asked_seeds(existing) if existing else SeedSet())
    write_manifest(outdir, config, asked, manifest_seeds(existing) if existing else SeedSet())


def write_manifest(outdir, config, asked, seeds):
    """Write ``outdir``'s manifest atomically."""
    text = json.dumps(make_manifest(config, seeds, asked), indent=2) + '\n'

    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
    atomic_write(os.path.join(outdir, MANIFEST), write)


def record_written(outdir, written):
    """Add the seeds ``written`` (whose files a run finished) to the manifest's ``seeds``."""
    current = read_manifest(outdir)
    write_manifest(outdir, current['config'], asked_seeds(current), manifest_seeds(current) | written)


# ----------------------------------------------------------------------------
# The integrity check of image sets (fid.py calc and ref).

def _expected_name(seed, layout):
    return '/'.join(os.path.split(seed_path('', seed, 'png', layout.get('subdirs', True)))).lstrip('/')


def check_image_set(path, files, read_text):
    """Check that the image set at ``path`` (a folder or zip) is one configuration's set.

    ``files``: every file of the set (relative '/'-separated names, images or not); ``read_text(name)``
    returns a file's text. Returns None when the set holds no manifest (a plain data set), else a
    dict: ``complete`` (bool), ``asked``, ``found`` and ``missing`` (counts) and ``message`` (one
    line). ValueError (one line) when the manifests describe more than one configuration, when an
    image lies outside every folder with a manifest, is not where its manifest's layout puts one
    of its asked seeds, or when a seed appears twice. Hidden files (temporary files, locks) are no
    images and are not counted."""
    manifests = {}
    for name in files:
        if name.split('/')[-1] == MANIFEST and not is_hidden(name):
            folder = name.rpartition('/')[0]
            shown = f'{path}:{name}' if not os.path.isdir(path) else os.path.join(path, name)
            try:
                text = read_text(name)
            except (OSError, KeyError, UnicodeDecodeError) as e:
                raise ValueError(f'{shown}: unreadable sample manifest ({e})') from None
            manifests[folder] = (shown, parse_manifest(text, shown))
    if not manifests:
        return None
    (first_path, first), *others = manifests.values()
    for other_path, other in others:
        diff = first_difference(first['config'], other['config'])
        if diff:
            raise ValueError(f'{path} mixes samples of two configurations: {first_path} and {other_path} differ in '
                             f'{diff}')
    layout = first['config'].get('layout', {})
    asked = {folder: asked_seeds(m) for folder, (_, m) in manifests.items()}
    seen = {}
    for name in files:
        if is_hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        parts = name.split('/')
        folder = next((f for f in ('/'.join(parts[:i]) for i in range(len(parts) - 1, -1, -1)) if f in manifests),
                      None)
        if folder is None:
            raise ValueError(f'{path} holds images outside every folder with a {MANIFEST} (e.g. {name}): they may '
                             f'come from another run; move them away or give --images a folder of one run')
        rel = name[len(folder) + 1:] if folder else name
        if layout.get('grid'):
            if rel != 'grid.png':
                raise ValueError(f'{path} holds {name}, which its grid-layout {MANIFEST} does not list')
            continue
        stem = os.path.splitext(rel.split('/')[-1])[0]
        seed = int(stem) if stem.isdigit() else None
        if seed is None or seed not in asked[folder]:
            raise ValueError(f'{path} holds image(s) that its {MANIFEST} does not list (e.g. {name}): they come '
                             f'from another run')
        if rel != _expected_name(seed, layout):
            raise ValueError(f'{path} holds {name}, which is not where sample.py puts seed {seed} '
                             f'({_expected_name(seed, layout)}): it comes from another run or was moved')
        if seed in seen:
            raise ValueError(f'{path} holds seed {seed} twice ({seen[seed]} and {name}): the same seeds were '
                             f'sampled into two folders; give --images one of them')
        seen[seed] = name
    if layout.get('grid'):
        return dict(complete=True, asked=0, found=0, missing=0, message=f'{path}: grid images')
    total = SeedSet()
    for seeds in asked.values():
        total = total | seeds
    found, want = len(seen), len(total)
    message = (f'{path}: {found} of the {want} seeds in its {MANIFEST} ({want - found} missing); the set is incomplete'
               if found < want else f'{path}: all {want} seeds in its {MANIFEST}')
    return dict(complete=found == want, asked=want, found=found, missing=want - found, message=message)
