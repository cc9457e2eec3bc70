"""The one solver-settings value (predictors/settings.py): validated when built, and every option of
every solver survives a snapshot, a solver card and a sample manifest unchanged."""

import json

import pytest

import solver_utils
import solvers
from generation import generate, manifest
from integrations import card as C
from models.presets import load_model
from predictors import load_predictor
from predictors.networks import AMEDPredictor
from predictors.settings import SolverSettings
from predictors.snapshot import save_snapshot


def option_values(cls, option):
    """The values of ``option`` worth trying on solver class ``cls``."""
    if option == 'max_order':
        return list(range(1, cls.max_order_limit + 1))
    choices = dict(variant=solver_utils.UNIPC_VARIANTS, deis_mode=solver_utils.DEIS_MODES)
    return list(choices.get(option, (True, False)))


CASES = [(name, opt, value) for name, cls in solvers.REGISTRY.items() for opt in cls.options
         for value in option_values(cls, opt)]


@pytest.fixture(scope='module')
def toy():
    return load_model('toy')


def test_every_option_is_tried():
    assert {(n, o) for n, o, _ in CASES} == {(n, o) for n, c in solvers.REGISTRY.items() for o in c.options}


@pytest.mark.parametrize('name,option,value', CASES)
def test_snapshot_card_and_manifest_keep_every_option(name, option, value, toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cls = solvers.REGISTRY[name]
    settings = SolverSettings(name, num_steps=4, options={option: value}, schedule_type='logsnr', afs=True)
    assert SolverSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings

    # Snapshot (students only: a predictor drives a student).
    if cls.student:
        info = dict(dataset_name='toy', img_shape=list(toy.img_shape), label_dim=0)
        save_snapshot('p.pt', AMEDPredictor(), dict(settings.to_dict(), **info))
        loaded = load_predictor('p.pt')
        assert loaded.solver == settings and loaded.solver.solver_options[option] == value

        # A card exported from that snapshot, written, read back as a predictor.
        C.save_card(C.export_card('p.pt', feature='zero', model=toy), 'card.json')
        card = load_predictor('card.json')
        spec, t_steps = settings.prepare(toy, loaded.predictor)
        assert card.solver == SolverSettings.resolved(spec, t_steps, settings.afs)
        assert card.solver.solver_options[option] == value

    # Sample manifest of a plain run (a solver that needs a predictor gets a fixed one).
    predictor = solvers.FixedPredictor() if cls.needs_predictor else None
    plan = generate.build_plan(toy, [0], 'out', settings, predictor)
    written = manifest.make_manifest(plan.config, [0])
    json.dump(written, open('manifest.json', 'w'))
    entry = manifest.read_manifest('manifest.json')['config']['solver']
    assert SolverSettings.from_dict(entry) == SolverSettings.resolved(plan.solver, plan.t_steps, True)
    assert SolverSettings.from_dict(entry).solver_options[option] == value


def test_older_dicts_read_the_same():
    """The unversioned dicts of older snapshots (flat options, absent ones missing) and manifests."""
    flat = dict(solver='dpmpp', num_steps=5, schedule_type='logsnr', schedule_rho=7.0, afs=True, max_order=3,
                predict_x0=True, dataset_name='toy', M=2)
    s = SolverSettings.from_dict(flat)
    assert s.solver_options == dict(max_order=3, predict_x0=True, lower_order_final=None, thresholding=None,
                                    corrected_3m=None)
    old_manifest = dict(name='ipndm', options=dict(max_order=2), afs=False, t_steps=[80.0, 1.0, 0.002])
    assert SolverSettings.from_dict(old_manifest) == SolverSettings('ipndm', options=dict(max_order=2),
                                                                    t_steps=(80.0, 1.0, 0.002))


@pytest.mark.parametrize('kwargs,message', [
    (dict(solver='nope'), "unknown solver 'nope'"),
    (dict(solver='euler', options=dict(max_order=2)), 'max_order is an option of'),
    (dict(solver='ipndm', options=dict(max_order=9)), 'max_order=9 is out of range'),
    (dict(solver='euler', schedule_type='cosine'), "unknown schedule_type 'cosine'"),
    (dict(solver='euler', sigma_min=-1.0), 'sigma_min must be a positive number'),
    (dict(solver='euler', t_steps=[1.0, 2.0]), 't_steps must be a descending list'),
    (dict(solver='euler', num_steps=1), 'num_steps must be an integer >= 2'),
])
def test_bad_settings_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SolverSettings(**kwargs)
    with pytest.raises(ValueError, match=message):
        SolverSettings.from_dict(dict(kwargs.pop('options', {}), **kwargs))


def test_a_newer_version_is_refused():
    with pytest.raises(ValueError, match='unsupported solver settings version 99'):
        SolverSettings.from_dict(dict(solver='euler', settings_version=99))


def test_the_loader_reads_pt_and_card_urls(toy, tmp_path, monkeypatch):
    """A .pt snapshot and a .json card given as http URLs load (a loopback server; the download
    goes to the dnnlib cache), with the source naming the URL, the local copy and its sha256."""
    import functools
    import http.server
    import threading

    from dnnlib.util import sha256_file

    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    served = tmp_path / 'served'
    served.mkdir()
    settings = SolverSettings('ipndm', num_steps=4, options=dict(max_order=3), afs=True)
    save_snapshot(str(served / 'p.pt'), AMEDPredictor(), dict(settings.to_dict(), dataset_name='toy',
                                                              img_shape=list(toy.img_shape), label_dim=0))
    C.save_card(C.export_card(str(served / 'p.pt'), feature='zero', model=toy), str(served / 'card.json'))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f'http://127.0.0.1:{httpd.server_address[1]}'
        for name, kind in (('p.pt', 'predictor'), ('card.json', 'card')):
            loaded = load_predictor(f'{base}/{name}')
            assert loaded.source['kind'] == kind and loaded.source['path'] == f'{base}/{name}'
            assert loaded.source['sha256'] == sha256_file(served / name) == sha256_file(loaded.source['file'])
            assert loaded.solver.solver == 'ipndm' and loaded.solver.solver_options['max_order'] == 3
    finally:
        httpd.shutdown()
        httpd.server_close()
