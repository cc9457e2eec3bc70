"""Small helpers shared by the scripts: per-seed random generators, seed lists, atomic writes."""

import os
import re

import torch

from dnnlib.util import create_temp


class StackedRandomGenerator:
    """One ``torch.Generator`` per seed: row i of every draw comes from seed i's generator, so an
    image depends only on its seed (not on the batch or the number of processes). Each seed draws
    its latents first and then its label, from the same generator (EDM's generate.py order)."""

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

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


def parse_int_list(text):
    """Parse a seed list such as ``'0-63'`` or ``'1,2,5-10'`` (ranges inclusive) into a list of
    ints. Raises ValueError with a one-line message for anything else."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    values = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
        if not m:
            raise ValueError(f'invalid seed list {text!r}: {part!r} is not an integer or a range a-b')
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f'invalid seed list {text!r}: range {part!r} is descending')
        values.extend(range(lo, hi + 1))
    if len(set(values)) != len(values):
        raise ValueError(f'invalid seed list {text!r}: a seed appears twice')
    return values


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


def atomic_write(path, write):
    """Write a file all at once: ``write(tmp_path)`` fills a temporary file in the same folder
    (created if needed), which then replaces ``path``; on any error the temporary file is removed
    and ``path`` is untouched. The temporary file keeps ``path``'s extension; the file gets the
    umask's permissions (:func:`create_temp`)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = create_temp(folder, '.' + os.path.basename(path) + '.', os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
