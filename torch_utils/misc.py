"""Small helpers shared by the scripts: per-seed random generators, seed lists, the checks of
user input that every script makes the same way (finite floats, seeds, usable output paths), and
atomic writes."""

import bisect
import math
import os
import re
import tempfile
import zipfile

import click
import torch

from dnnlib.util import create_temp

#: Seeds are 32-bit, as EDM's: every seed lies in [0, SEED_LIMIT).
SEED_LIMIT = 1 << 32
#: The most seeds one sample.py run takes.
MAX_SEEDS = 10 ** 6


class StackedRandomGenerator:
    """One ``torch.Generator`` per seed: row i of every draw comes from seed i's generator, so an
    image depends only on its seed (not on the batch or the number of processes). Each seed draws
    its latents first and then its label, from the same generator (EDM's generate.py order)."""

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.seeds = [check_seed(s) for s in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def randn(self, size, **kwargs):
        if size[0] != len(self.generators):
            raise ValueError(f'batch size {size[0]} does not match {len(self.generators)} seeds')
        return torch.stack([torch.randn(size[1:], generator=g, device=self.device, **kwargs)
                            for g in self.generators])

    def randint(self, high, size, **kwargs):
        if size[0] != len(self.generators):
            raise ValueError(f'batch size {size[0]} does not match {len(self.generators)} seeds')
        kwargs.pop('device', None)
        return torch.stack([torch.randint(high, size=size[1:], generator=g, device=self.device, **kwargs)
                            for g in self.generators])


def check_seed(seed, what='seed'):
    """``seed`` as an int; ValueError (one line naming ``what``) unless it lies in [0, 2^32)."""
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f'{what} {seed} is out of range: seeds must lie in [0, 2^32)')
    return seed


def parse_int_ranges(text):
    """Parse a seed list such as ``'0-63'`` or ``'1,2,5-10'`` (ranges inclusive) into its ranges
    ``[(lo, hi), ...]`` in the given order, without listing their values. Raises ValueError with a
    one-line message for anything else, and for a value that appears twice."""
    ranges = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
        if not m:
            raise ValueError(f'invalid seed list {text!r}: {part!r} is not an integer or a range a-b')
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f'invalid seed list {text!r}: range {part!r} is descending')
        ranges.append((lo, hi))
    ordered = sorted(ranges)
    if any(b[0] <= a[1] for a, b in zip(ordered, ordered[1:])):
        raise ValueError(f'invalid seed list {text!r}: a seed appears twice')
    return ranges


def parse_int_list(text):
    """Parse a seed list such as ``'0-63'`` or ``'1,2,5-10'`` (ranges inclusive) into a list of
    ints (:func:`parse_int_ranges`); a list or tuple is taken as it is."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    return [v for lo, hi in parse_int_ranges(text) for v in range(lo, hi + 1)]


def parse_seeds(text, option='--seeds', max_count=MAX_SEEDS):
    """The seeds of one run: :func:`parse_int_list`, checked as ranges before any list is built:
    at most ``max_count`` seeds, each in [0, 2^32). ValueError (one line naming ``option``)."""
    ranges = [(int(v), int(v)) for v in text] if isinstance(text, (list, tuple)) else parse_int_ranges(text)
    count = sum(hi - lo + 1 for lo, hi in ranges)
    if count > max_count:
        raise ValueError(f'{option} asks for {count} seeds; one run takes at most {max_count} (split it into '
                         f'several runs into the same --outdir)')
    for lo, hi in ranges:
        for bound in (lo, hi):
            check_seed(bound, f'{option}: seed')
    return parse_int_list(text)


def format_int_list(values):
    """The inverse of :func:`parse_int_list`: sorted ints as ``'0-63'`` or ``'1,2,5-10'`` (runs of
    three or more consecutive values become ranges)."""
    values = sorted(int(v) for v in values)
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f'{values[i]}-{values[j]}')
        else:
            parts.extend(str(v) for v in values[i:j + 1])
        i = j + 1
    return ','.join(parts)


class SeedSet:
    """A set of seeds kept as sorted, disjoint inclusive ranges, never as a list: a manifest whose
    seeds span 10^8 costs a few numbers. Built from a seed-list string (:func:`parse_int_ranges`),
    an iterable of ints or ranges; ``in``, ``len``, ``|``, ``-``, iteration, and ``str`` (the
    seed-list syntax, :func:`format_int_list`)."""

    def __init__(self, seeds=()):
        if isinstance(seeds, SeedSet):
            spans = list(seeds.spans)
        elif isinstance(seeds, str):
            spans = parse_int_ranges(seeds) if seeds.strip() else []
        elif isinstance(seeds, range) and seeds.step == 1:
            spans = [(seeds.start, seeds.stop - 1)] if len(seeds) else []
        else:
            spans = [(int(v), int(v)) for v in seeds]
        self.spans = self._merge(spans)

    @staticmethod
    def _merge(spans):
        merged = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    def __contains__(self, seed):
        i = bisect.bisect_right(self.spans, (seed, float('inf'))) - 1
        return i >= 0 and self.spans[i][0] <= seed <= self.spans[i][1]

    def __len__(self):
        return sum(hi - lo + 1 for lo, hi in self.spans)

    def __iter__(self):
        for lo, hi in self.spans:
            yield from range(lo, hi + 1)

    def __or__(self, other):
        return SeedSet._of(self._merge(self.spans + SeedSet(other).spans))

    def __sub__(self, other):
        out = []
        cuts = SeedSet(other).spans
        for lo, hi in self.spans:
            for clo, chi in cuts:
                if chi < lo or clo > hi:
                    continue
                if clo > lo:
                    out.append((lo, clo - 1))
                lo = chi + 1
                if lo > hi:
                    break
            if lo <= hi:
                out.append((lo, hi))
        return SeedSet._of(out)

    def __eq__(self, other):
        return isinstance(other, SeedSet) and self.spans == other.spans

    @classmethod
    def _of(cls, spans):
        out = cls()
        out.spans = spans
        return out

    def __str__(self):
        return ','.join(f'{lo}-{hi}' if hi - lo >= 2 else ','.join(str(v) for v in range(lo, hi + 1))
                        for lo, hi in self.spans)

    def __repr__(self):
        return f'SeedSet({str(self)!r})'


class FiniteFloat(click.FloatRange):
    """click's FloatRange (bounds optional) that also refuses nan and the infinities, which
    FloatRange lets through: every float option of the scripts has this type."""

    name = 'finite float'

    def _describe_range(self):
        """The bounds for --help; nothing when there are none (click would show '[x<=None]')."""
        return '' if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f'{value!r} is not a finite number', param, ctx)
        return v


# ----------------------------------------------------------------------------
# Output paths, checked before any work: nothing is written by the checks.

def _nearest_existing(path):
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def name_limit(path):
    """The longest file name (bytes) the file system of ``path`` (or its nearest existing folder) takes."""
    try:
        return os.pathconf(_nearest_existing(path), 'PC_NAME_MAX')
    except (OSError, ValueError):
        return 255


def check_name_length(folder, name, what):
    """ValueError (one line naming ``what``) when ``name`` is too long for a file in ``folder``."""
    limit, size = name_limit(folder), len(os.fsencode(name))
    if size > limit:
        raise ValueError(f'{what}: the name {name[:40]}... is {size} bytes long; the file system takes at most {limit}')


def check_output_dir(path, option='--outdir'):
    """ValueError (one line naming ``option``) unless ``path`` can be a folder this process writes
    into: not a file, not under a file, every missing name within the file system's limit, and a
    probe folder can be created in its nearest existing folder (it is removed at once: the check
    leaves nothing behind, and works where permission bits say nothing, as for root or in /proc)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f'{option} {path} is a file, not a folder')
    _check_folder(os.path.abspath(path), f'{option} {path}')


def check_output_file(path, option='--dest', overwrite=True):
    """ValueError (one line naming ``option``) unless ``path`` can be written as a file: not a
    folder, its folder usable (as :func:`check_output_dir`), its name within the limit; an existing
    file is refused unless ``overwrite``."""
    if os.path.isdir(path):
        raise ValueError(f'{option} {path} is a folder, not a file')
    folder = os.path.dirname(os.path.abspath(path))
    _check_folder(folder, f'{option} {path}')
    check_name_length(folder, os.path.basename(path), f'{option} {path}')
    if os.path.exists(path) and not overwrite:
        raise ValueError(f'{option} {path} exists; pass --overwrite to replace it')


def _check_folder(folder, what):
    """The part of :func:`check_output_dir` after the folder itself is known not to be a file."""
    probe = _nearest_existing(folder)
    if probe != os.path.abspath(folder):
        dangling = os.path.join(probe, os.path.relpath(folder, probe).split(os.sep)[0])
        if os.path.lexists(dangling):
            raise ValueError(f'{what}: {dangling} is a symbolic link that leads nowhere (a loop or a missing '
                             f'target)')
    if not os.path.isdir(probe):
        raise ValueError(f'{what} lies under {probe}, which is a file')
    missing = os.path.relpath(folder, probe)
    for name in ([] if missing == '.' else missing.split(os.sep)):
        check_name_length(probe, name, what)
    try:
        os.rmdir(tempfile.mkdtemp(prefix='.probe-', dir=probe))
    except OSError as e:
        raise ValueError(f'{what}: cannot create anything in {probe} ({e.strerror})') from None


# ----------------------------------------------------------------------------
# Why a weights file does not load, in words (for one-line errors that name the file and the cause).

def torch_file_problem(path):
    """What ``path`` is instead of a readable torch file: cut off, a pickle, text, empty..."""
    with open(path, 'rb') as f:
        head = f.read(64)
    if head.startswith(b'PK\x03\x04'):
        if not zipfile.is_zipfile(path):
            return f'a zip archive that is cut off or damaged ({os.path.getsize(path)} bytes, no end record)'
        return 'a zip archive that is not a complete torch file'
    if not head:
        return 'an empty file'
    if head[:1] == b'\x80':
        return 'a pickle, not a torch zip file'
    if all(32 <= b < 127 or b in b'\t\r\n' for b in head):
        return 'a text file, not a torch file'
    return 'not a torch file (neither a zip archive nor a pickle)'


def state_dict_mismatch(module, state):
    """What keeps the dict ``state`` from loading into ``module`` strictly, in words ('3 missing
    (e.g. fc.weight), 1 wrong shape (e.g. ...)'), or None when it fits. Missing batch-norm counters
    (num_batches_tracked) do not count: batch norm restores them itself."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(getattr(state[k], 'shape', ())) != tuple(own[k].shape)]
    problems = [f'{len(keys)} {label} (e.g. {keys[0]})' for label, keys in
                (('missing', missing), ('unexpected', unexpected), ('wrong shape', shapes)) if keys]
    return ', '.join(problems) or None


def atomic_write(path, write):
    """Write a file all at once: ``write(tmp_path)`` fills a temporary file in the same folder
    (created if needed), which then replaces ``path``; on any error the temporary file is removed
    and ``path`` is untouched. The temporary file is hidden and ends in ``.tmp``
    (``.<name>.<random>.tmp``), so that no scan for images or weights takes it for one, even when a
    SIGKILL leaves it behind; ``write`` must therefore not rely on the extension. An OSError (full
    disk, file-size limit) names ``path``, not the temporary file. The file gets the
    umask's permissions (:func:`create_temp`)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = create_temp(folder, '.' + os.path.basename(path) + '.', '.tmp')
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None:   # name the file meant, not the temporary one
            raise OSError(e.errno, e.strerror, path) from None
        raise
