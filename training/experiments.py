"""Experiment folders: naming new runs and finding a run's predictor by experiment number.

A run lives in ``<outdir>/NNNNN-<dataset>-<num_steps>-<nfe>-<student>-<teacher>-<M>-<schedule>[-afs][-<desc>]``
(REFERENCE.md section 5; unlike the official code, ``--desc`` is joined with a '-').
"""

import os
import re

import solver_utils

SNAPSHOT_RE = re.compile(r'^network-snapshot-(\d+)\.(pt|pkl)$')
SEARCH_DIRS = ('exps', 'exp')   # ./exps (ours), ./exp (where the brief puts the published predictors)


def schedule_tag(schedule_type, schedule_rho):
    """The schedule part of a run name, as the official code writes it (e.g. 'poly7.0', 'uni1.0')."""
    rho = float(schedule_rho)
    return {'polynomial': f'poly{rho}', 'logsnr': 'logsnr', 'time_uniform': f'uni{rho}',
            'discrete': 'discrete'}[schedule_type]


def run_name(run_id, dataset_name, num_steps, nfe, sampler_stu, sampler_tea, M, schedule_type, schedule_rho,
             afs, desc=None, trajectory=False):
    """The run folder name; ``trajectory`` (the --loss=trajectory runs) adds '-traj' after the
    official fields, before the description."""
    name = (f'{run_id:05d}-{dataset_name}-{num_steps}-{nfe}-{sampler_stu}-{sampler_tea}-{M}-'
            f'{schedule_tag(schedule_type, schedule_rho)}')
    if afs:
        name += '-afs'
    if trajectory:
        name += '-traj'
    if desc:
        if not re.fullmatch(r'[A-Za-z0-9_.+=-]+', desc):
            raise ValueError(f'desc {desc!r} may contain only letters, digits and _.+=-')
        name += f'-{desc}'
    return name


def training_nfe(num_steps, afs, calls_per_eval=1):
    """NFE of the student with a predictor, as in the run name (doubled under CFG)."""
    return solver_utils.count_nfe('amed', num_steps, afs, with_predictor=True, calls_per_eval=calls_per_eval)


def _run_ids(outdir):
    ids = []
    if os.path.isdir(outdir):
        for entry in os.listdir(outdir):
            m = re.match(r'^(\d+)', entry)
            if m:
                ids.append(int(m.group(1)))
    return ids


def make_run_dir(outdir, name_fn):
    """Create a new run folder ``outdir/<name_fn(id)>`` with id = 1 + the largest existing id (0 if
    none). Never reuses or overwrites a folder: creation is exclusive, retried with the next id."""
    os.makedirs(outdir, exist_ok=True)
    run_id = max(_run_ids(outdir), default=-1) + 1
    for _ in range(100):
        path = os.path.join(outdir, name_fn(run_id))
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            run_id = max(_run_ids(outdir) + [run_id]) + 1
    raise RuntimeError(f'could not create a new run folder in {outdir}')


def latest_snapshot(run_dir):
    """The snapshot with the largest kimg in a run folder (ours .pt or published .pkl)."""
    found = []
    for entry in os.listdir(run_dir):
        m = SNAPSHOT_RE.match(entry)
        if m:
            found.append((int(m.group(1)), entry.endswith('.pt'), entry))
    if not found:
        raise FileNotFoundError(f'no network-snapshot-*.pt or *.pkl in {run_dir}')
    return os.path.join(run_dir, max(found)[2])


def resolve_predictor_path(spec, search_dirs=SEARCH_DIRS):
    """``spec`` is a snapshot file (or URL), a run folder, or an experiment number such as '3' or
    '00003', looked up in ./exps and ./exp. Returns the snapshot path; raises FileNotFoundError /
    ValueError with one line when nothing or more than one run matches."""
    spec = str(spec)
    if re.fullmatch(r'\d+', spec):
        run_id = int(spec)
        matches = []
        for d in search_dirs:
            if os.path.isdir(d):
                for entry in sorted(os.listdir(d)):
                    m = re.match(r'^(\d+)-', entry)
                    if m and int(m.group(1)) == run_id and os.path.isdir(os.path.join(d, entry)):
                        matches.append(os.path.join(d, entry))
        if not matches:
            raise FileNotFoundError(f"experiment {run_id} not found in {' or '.join('./' + d for d in search_dirs)}")
        if len(matches) > 1:
            raise ValueError(f"experiment {run_id} is ambiguous: {', '.join(matches)}")
        return latest_snapshot(matches[0])
    if '://' in spec:
        return spec
    if os.path.isdir(spec):
        return latest_snapshot(spec)
    if not os.path.exists(spec):
        raise FileNotFoundError(f'predictor file not found: {spec}')
    return spec
