"""Where a metric came from: one JSON line per ``fid.py calc`` / ``fid.py clip`` run, EDM style.

Every run appends one line to ``metrics.jsonl`` beside the images (inside an image folder; in the
folder of a zip), or to ``--metrics_file``. A line holds:

* ``metric`` (``FID``, ``FD-pixel8``, ``CLIP score``) and ``value``;
* ``images``: ``path``, ``num_images``, ``seeds`` (the seed list in sample.py's ``--seeds`` syntax,
  from file names ``<seed>.png``; null when a name is not a number), ``names_sha256`` (sha256 of
  the sorted relative file names, one per line), ``subset`` (``--num``/``--seed`` when a seeded
  subset was used) and ``manifest`` (path and sha256 of a sample-folder ``manifest.json`` when there
  is one);
* the network: ``detector`` (FID: the path or URL, the local file and its sha256; FD-pixel8: no
  file) or ``model`` (CLIP: name, pretrained tag, weights file and sha256, tokenizer);
* ``ref`` (FID): the statistics' path or URL, local file, sha256 and their own provenance;
  ``captions`` (CLIP): the file and its sha256;
* ``options`` (every option of the command, defaults included), ``command`` (``sys.argv``),
  ``time`` (UTC, ISO 8601), ``processes`` and ``code`` (the git commit of this code, when known).

``fid.py ref`` stores the same record (without a value) as the JSON string ``provenance`` in the
statistics file it writes.
"""

import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
import zipfile

from dnnlib.util import file_identity, sha256_file
from torch_utils import distributed as dist
from generation.manifest import MANIFEST
from torch_utils.misc import check_output_file, format_int_list

METRICS_FILE = 'metrics.jsonl'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def file_record(spec, **extra):
    """``{'path': spec, 'file': local path, 'sha256': ...}`` of a path or URL
    (:func:`dnnlib.util.file_identity`), plus ``extra``."""
    return dict(file_identity(spec), **extra)


def seeds_of_names(names):
    """The seeds of image files named ``<seed>.<ext>`` (any folder), in the given order; None when
    some name is not a non-negative integer."""
    stems = [os.path.splitext(os.path.basename(n))[0] for n in names]
    if not all(s.isdigit() for s in stems):
        return None
    return [int(s) for s in stems]


def _manifest(images):
    """Path and sha256 of the image set's ``manifest.json`` (folder or zip root), or None."""
    if images.kind == 'dir':
        path = os.path.join(images.path, MANIFEST)
        return dict(path=os.path.abspath(path), sha256=sha256_file(path)) if os.path.isfile(path) else None
    with zipfile.ZipFile(images.path) as z:
        if MANIFEST not in z.namelist():
            return None
        digest = hashlib.sha256(z.read(MANIFEST)).hexdigest()
    return dict(path=f'{os.path.abspath(images.path)}:{MANIFEST}', sha256=digest)


def images_record(images, num=None, seed=0):
    """The ``images`` entry of a metrics line for an :class:`metrics.image_sets.ImageSet`."""
    seeds = seeds_of_names(images.names)
    return dict(path=os.path.abspath(images.path), num_images=len(images),
                seeds=format_int_list(seeds) if seeds is not None and len(set(seeds)) == len(seeds) else None,
                names_sha256=hashlib.sha256('\n'.join(images.names).encode('utf-8')).hexdigest(),
                subset=dict(num=num, seed=seed) if num is not None else None, manifest=_manifest(images))


def metrics_file(images_path, override=None):
    """Where a run on ``images_path`` appends its line: ``override``, else ``metrics.jsonl`` inside the
    image folder or beside the zip."""
    if override:
        return override
    path = os.fspath(images_path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, METRICS_FILE)


def check_writable(path):
    """A one-line message when ``path`` cannot be appended to (checked before a long computation), else None."""
    try:
        check_output_file(path, 'the metrics file')
    except ValueError as e:
        return f'{e} (choose another with --metrics_file)'
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f'cannot write the metrics file {path}: no write permission (choose another with --metrics_file)'
    return None


def _code_version():
    try:
        out = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(['git', '-C', ROOT, 'status', '--porcelain', '--untracked-files=no'],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ('+dirty' if dirty.stdout.strip() else '')


def run_record(options):
    """The parts of a record that describe the run: options, command line, time, processes, code."""
    return dict(options=options, command=shlex.join(sys.argv), time=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec='seconds'), processes=dist.get_world_size(), code=_code_version())


def append(path, record):
    """Append ``record`` as one JSON line to ``path`` (creating folders), in a single write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    line = json.dumps(record, sort_keys=False) + '\n'
    with open(path, 'a', encoding='utf-8') as f:
        f.write(line)
