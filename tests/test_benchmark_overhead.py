"""Smoke test of benchmarks/overhead.py on a tiny network: structure only, no timing thresholds."""

import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smallest SongUNet that has the block EDMDenoiser hooks for the unconditional AMED feature:
# enc['8x8_block3'] needs an 8x8 encoder level (img_resolution 8, one level) with 4 blocks.
TINY_CONFIG = dict(precond='VPPrecond', model_type='SongUNet', img_resolution=8, img_channels=3, label_dim=0,
                   model_channels=16, channel_mult=[1], num_blocks=4, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope='module')
def overhead():
    spec = importlib.util.spec_from_file_location('benchmark_overhead', os.path.join(ROOT, 'benchmarks', 'overhead.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def result(overhead):
    return overhead.run_benchmark('cpu', batch=2, repeats=1, warmup=0, calls=1, net_config=TINY_CONFIG, stub_runs=2)


def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_configurations(overhead):
    configs = overhead.default_configs()
    assert [(c.solver, c.predictor) for c in configs] == [
        ('amed', True), ('euler', True), ('euler', False), ('ipndm', True), ('ipndm', False),
        ('dpm', True), ('dpm', False), ('dpmpp', True), ('dpmpp', False)]
    steps = {(c.solver, c.predictor): c.num_steps for c in configs}
    assert steps[('euler', False)] == steps[('ipndm', False)] == steps[('dpmpp', False)] == 7
    assert steps[('dpm', False)] == 4
    assert all(c.afs and c.nfe == 5 for c in configs)
    assert all(c.num_steps == 4 for c in configs if c.predictor)
    assert {c.solver: c.max_order for c in configs} == {'amed': None, 'euler': None, 'ipndm': 4, 'dpm': None,
                                                       'dpmpp': 3}
    assert overhead.CIFAR10_CONFIG['model_channels'] == 128 and overhead.CIFAR10_CONFIG['precond'] == 'VPPrecond'


def test_rows(overhead, result):
    configs = overhead.default_configs()
    rows = result['rows']
    assert [(r['solver'], r['predictor']) for r in rows] == [(c.solver, c.predictor) for c in configs]
    assert _positive(result['net_call_s'])
    for r in rows:
        assert r['nfe'] == 5
        assert len(r['walls_s']) == 1
        for key in ('wall_s', 'ratio', 'stub_s'):
            assert _positive(r[key]), (r['label'], key, r[key])
        assert math.isfinite(r['overhead']) and math.isfinite(r['stub_ratio']) and r['stub_ratio'] > 1
        if r['predictor'] and r['solver'] != 'amed':
            assert _positive(r['vs_plain'])
        else:
            assert r['vs_plain'] is None
    meta = result['meta']
    assert meta['batch'] == 2 and meta['repeats'] == 1 and meta['net_calls'] == len(rows)


def test_report_and_section(overhead, result, tmp_path):
    report = overhead.format_report(result, 'python benchmarks/overhead.py --device cpu')
    table = [line for line in report.splitlines() if line.startswith('| ')]
    assert len(table) == 1 + len(result['rows'])    # header + one row per configuration
    assert 'python benchmarks/overhead.py --device cpu' in report and 'batch 2' in report

    path = tmp_path / 'docs' / 'benchmarks.md'
    overhead.write_section(str(path), report, 'cpu')
    text = path.read_text()
    assert text.count('<!-- overhead:cpu:start -->') == 1 and text.count('<!-- overhead:cpu:end -->') == 1

    # Text outside the section is kept; rewriting replaces only the section.
    path.write_text('# Mine\n\nintro\n\n' + text[text.index('<!-- overhead:cpu:start'):] + '\ntrailer\n')
    overhead.write_section(str(path), 'new body', 'cpu')
    text = path.read_text()
    assert text.startswith('# Mine\n\nintro\n\n') and text.endswith('\ntrailer\n')
    assert 'new body' in text and '| configuration' not in text
    overhead.write_section(str(path), 'gpu body', 'cuda')
    text = path.read_text()
    assert 'new body' in text and 'gpu body' in text

    path.write_text('<!-- overhead:cpu:start -->\nbroken\n')
    with pytest.raises(ValueError, match='unbalanced'):
        overhead.write_section(str(path), 'x', 'cpu')
