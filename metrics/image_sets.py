"""Image sets for the metrics (a folder, searched recursively, or a zip of PNG/JPEG), their
loading in worker processes, and the error handling every metric command shares: user errors are
:class:`MetricError` (a ValueError with a one-line message), and under torchrun an error on one
rank reaches every rank (:func:`agree`), so no rank waits forever at a collective.
"""

import io
import os
import zipfile

import numpy as np
import PIL.Image
import torch
import torch.distributed

from generation.manifest import IMAGE_EXTENSIONS, check_image_set, is_hidden
from torch_utils import distributed as dist
from torch_utils import locks

class MetricError(ValueError):
    """A problem with the user's input: the message is one line that says what to fix."""


# ----------------------------------------------------------------------------
# Keeping ranks in step on errors.

def agree(err):
    """Raise MetricError on every rank if ``err`` (a message or None) is set on any rank
    (:func:`torch_utils.distributed.raise_on_any`)."""
    dist.raise_on_any(err, MetricError)


def attempt(fn, *args, **kwargs):
    """(result, None) or (None, one-line message) for the user-level errors of ``fn``."""
    try:
        return fn(*args, **kwargs), None
    except MetricError as e:
        return None, str(e)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        return None, ' '.join(f'{type(e).__name__}: {e}'.split())


def refusal_as_metric_error(check, *args, **kwargs):
    """``check(*args, **kwargs)`` (one of the shared checks of user input, whose refusals are
    one-line ValueErrors) with its refusal as MetricError."""
    try:
        return check(*args, **kwargs)
    except MetricError:
        raise
    except ValueError as e:
        raise MetricError(str(e)) from None


def rank0_then_others(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 first (e.g. a download into the cache), then on the other ranks."""
    result, err = (attempt(fn, *args, **kwargs) if dist.is_main() else (None, None))
    agree(err)
    if not dist.is_main():
        result, err = attempt(fn, *args, **kwargs)
    agree(err)
    return result


# ----------------------------------------------------------------------------
# Image sets: a folder (recursive) or a zip of PNG/JPEG files.

def _decode(data, name):
    """Bytes of one image file -> uint8 (H, W, 3). Grayscale becomes RGB; alpha is dropped."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert('RGB')
    except PIL.UnidentifiedImageError:
        raise MetricError(f'cannot read image {name}: not an image file that PIL can decode') from None
    except Exception as e:  # PIL raises many types for a damaged file
        reason = ' '.join(str(e).split()) or type(e).__name__
        raise MetricError(f'cannot read image {name}: {reason}') from None
    return np.array(rgb, dtype=np.uint8)  # a writable copy


class ImageSet:
    """The images of a folder (searched recursively) or a ``.zip``, in sorted order of their
    relative paths; files other than PNG/JPEG, and hidden files (a part of the path starting with
    '.': temporary files, locks), are no images. Each image is decoded to RGB uint8.

    ``num`` (optional) selects a seeded subset: ``np.random.RandomState(seed).choice(total, num,
    replace=False)``, sorted. ``files`` lists every file of the set (for :meth:`integrity`).
    Picklable (a zip is reopened in each process). A folder that a writer holds
    (:mod:`torch_utils.locks`) is refused."""

    def __init__(self, path, num=None, seed=0, min_images=2, purpose='the statistics'):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.kind = 'dir'
            refusal_as_metric_error(locks.check_not_being_written, self.path)
            files = []
            for root, _dirs, names in os.walk(self.path):
                for f in names:
                    files.append(os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, '/'))
        elif os.path.isfile(self.path) and self.path.lower().endswith('.zip'):
            self.kind = 'zip'
            refusal_as_metric_error(locks.check_not_being_written, self.path)
            try:
                with zipfile.ZipFile(self.path) as z:
                    files = [n for n in z.namelist() if not n.endswith('/')]
            except (zipfile.BadZipFile, OSError) as e:
                raise MetricError(f'cannot open zip {self.path}: {e}') from None
        elif os.path.exists(self.path):
            raise MetricError(f'{self.path} is neither a folder nor a .zip file')
        else:
            raise MetricError(f'{self.path} does not exist')
        self.files = sorted(files)
        if self.kind == 'dir':   # a writer may hold a subfolder (sample.py --outdir=<images>/a)
            for name in self.files:
                if name.split('/')[-1] == locks.FOLDER_LOCK and '/' in name:
                    folder = os.path.join(self.path, name.rpartition('/')[0])
                    refusal_as_metric_error(locks.check_not_being_written, folder)
        names = [n for n in self.files if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and not is_hidden(n)]
        total = len(names)
        if num is not None:
            if num < min_images:
                raise MetricError(f'--num must be at least {min_images}, got {num}')
            if num > total:
                raise MetricError(f'--num={num} but {self.path} holds only {total} images')
            keep = np.sort(np.random.RandomState(seed).choice(total, num, replace=False))
            names = [names[i] for i in keep]
        if len(names) < min_images:
            raise MetricError(f'{self.path} holds {len(names)} PNG/JPEG image(s); {purpose} need(s) at least {min_images}')
        self.names = names
        self._zip = None
        self._zip_pid = None

    def integrity(self):
        """:func:`generation.manifest.check_image_set` of the whole set (not only a ``num`` subset),
        with its refusals as MetricError: None for a set without manifests, else its report."""
        return refusal_as_metric_error(check_image_set, self.path, self.files,
                                       lambda name: self._read(name).decode('utf-8'))

    def __len__(self):
        return len(self.names)

    def __getstate__(self):
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def _read(self, name):
        if self.kind == 'dir':
            with open(os.path.join(self.path, name), 'rb') as f:
                return f.read()
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip.read(name)

    def display_name(self, i):
        return f'{self.path}:{self.names[i]}' if self.kind == 'zip' else os.path.join(self.path, self.names[i])

    def load(self, i):
        """Image ``i`` as uint8 (H, W, 3)."""
        name = self.display_name(i)
        try:
            data = self._read(self.names[i])
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            raise MetricError(f'cannot read image {name}: {e}') from None
        return _decode(data, name)


class ImageBatches(torch.utils.data.Dataset):
    """Item k = batch k of this rank: (image indices, ``torch.stack`` of ``prepare(images, i, image)``
    over them or None, error message or None).

    Errors travel as messages, so that a DataLoader worker never raises and every rank sees them."""

    def __init__(self, images, batches, prepare):
        self.images, self.batches, self.prepare = images, batches, prepare

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        idx = self.batches[k].tolist()
        if not idx:
            return idx, None, None
        try:
            x = torch.stack([self.prepare(self.images, i, self.images.load(i)) for i in idx])
        except MetricError as e:
            return idx, None, str(e)
        return idx, x, None


def image_loader(images, batches, prepare, workers):
    """A DataLoader over :class:`ImageBatches` (``workers`` processes; 0: in this process)."""
    return torch.utils.data.DataLoader(ImageBatches(images, batches, prepare), batch_size=None, shuffle=False,
                                       num_workers=workers, prefetch_factor=2 if workers > 0 else None)



def start(device=None):
    """``dist.init(device)`` with its errors as MetricError; returns the device."""
    try:
        return dist.init(device)
    except (RuntimeError, ValueError) as e:
        raise MetricError(str(e)) from None
