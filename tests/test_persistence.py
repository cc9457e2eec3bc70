"""Tests for torch_utils.persistence (NVIDIA persistence pickle format, version 6)."""

import io
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap

import pytest
import torch

import dnnlib
from torch_utils import persistence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NETMOD_SRC = textwrap.dedent('''
    """A module holding a persistent network, written by the tests."""
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class Net(torch.nn.Module):
        """Linear layer plus an additive buffer."""
        def __init__(self, in_features, out_features, scale=1.0):
            super().__init__()
            self.fc = torch.nn.Linear(in_features, out_features)
            self.register_buffer('offset', torch.arange(out_features, dtype=torch.float32))
            self.scale = scale

        def forward(self, x):
            return self.fc(x) * self.scale + self.offset
''')


def _globals_in(data):
    """Return the set of 'module name' GLOBALs referenced by a pickle."""
    found = set()
    strings = []
    for opcode, arg, _pos in pickletools.genops(data):
        if opcode.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE', 'BINUNICODE8'):
            strings.append(arg)
        elif opcode.name == 'GLOBAL':
            found.add(arg)
        elif opcode.name == 'STACK_GLOBAL':
            found.add(f'{strings[-2]} {strings[-1]}')
    return found


def _run(code, pythonpath, cwd):
    """Run ``code`` in a fresh interpreter with exactly ``pythonpath`` on PYTHONPATH."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(pythonpath)
    env.pop('PYTHONSTARTUP', None)
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, cwd=str(cwd),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def netmod(tmp_path, monkeypatch):
    """Write mypkg_tmp/netmod.py under tmp_path and import it in this process."""
    pkg = tmp_path / 'mypkg_tmp'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'netmod.py').write_text(NETMOD_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ('mypkg_tmp', 'mypkg_tmp.netmod'):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import mypkg_tmp.netmod as mod  # pylint: disable=import-outside-toplevel
    yield mod
    for name in ('mypkg_tmp', 'mypkg_tmp.netmod'):
        sys.modules.pop(name, None)


@pytest.fixture
def clean_hooks():
    """Restore the import-hook registry after a test."""
    saved = list(persistence._import_hooks)
    yield
    persistence._import_hooks[:] = saved


def test_roundtrip_in_fresh_process_without_original_module(tmp_path, netmod):
    del netmod
    work = tmp_path / 'work'
    work.mkdir()
    # Pickle in one process (the module is importable there) ...
    _run('''
        import pickle, torch
        from mypkg_tmp.netmod import Net
        torch.manual_seed(0)
        net = Net(4, 3, scale=2.0).eval()
        x = torch.randn(5, 4)
        with open('net.pkl', 'wb') as f:
            pickle.dump(dict(model=net, x=x, y=net(x).detach()), f)
    ''', pythonpath=[ROOT, str(tmp_path)], cwd=work)
    data = (work / 'net.pkl').read_bytes()
    assert 'torch_utils.persistence _reconstruct_persistent_obj' in _globals_in(data)
    assert not any(g.startswith('mypkg_tmp') for g in _globals_in(data))

    # ... and load it in another where only the repository root is importable.
    out = _run('''
        import pickle, sys, torch
        try:
            import mypkg_tmp
            raise SystemExit('original package unexpectedly importable')
        except ImportError:
            pass
        from torch_utils import persistence
        with open('net.pkl', 'rb') as f:
            d = pickle.load(f)
        net = d['model']
        assert persistence.is_persistent(net)
        assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
        assert type(net).__module__ in sys.modules
        assert torch.equal(net(d['x']), d['y'])
        assert net.scale == 2.0 and not net.training
        assert net.init_args == (4, 3) and net.init_kwargs == dict(scale=2.0)
        assert 'mypkg_tmp' not in sys.modules
        print('OK', type(net).__module__)
    ''', pythonpath=[ROOT], cwd=work)
    assert out.startswith('OK _imported_module_')


def test_meta_layout_and_reduce(netmod):
    net = netmod.Net(2, 2)
    fields = net.__reduce__()
    assert fields[0] is persistence._reconstruct_persistent_obj
    assert fields[2] is None
    (meta,) = fields[1]
    assert set(meta) == {'type', 'version', 'module_src', 'class_name', 'state'}
    assert meta['type'] == 'class' and meta['version'] == 6 == persistence._version
    assert meta['class_name'] == 'Net'
    assert meta['module_src'] == NETMOD_SRC
    assert meta['state'] is net.__dict__ or meta['state'] == net.__dict__
    assert '_modules' in meta['state'] and '_init_kwargs' in meta['state']


def test_same_source_executed_once_and_deepcopy(netmod):
    import copy  # pylint: disable=import-outside-toplevel
    net = netmod.Net(3, 2)
    a = pickle.loads(pickle.dumps(net))
    b = pickle.loads(pickle.dumps(net))
    # The source text of a loaded module is the cached one, so both loads reuse
    # the already-imported original module rather than exec-ing it again.
    assert type(a) is type(b) is type(net)
    c = copy.deepcopy(net)
    assert type(c) is type(net)
    x = torch.randn(2, 3)
    assert torch.equal(c(x), net(x))


def test_exec_fresh_module_for_unseen_source(netmod):
    meta = pickle.loads(pickle.dumps(netmod.Net(2, 2))).__reduce__()[1][0]
    changed_src = meta['module_src'] + '\n# a different source text\n'
    meta = dict(meta, module_src=changed_src)
    obj1 = persistence._reconstruct_persistent_obj(meta)
    obj2 = persistence._reconstruct_persistent_obj(meta)
    mod_name = type(obj1).__module__
    assert mod_name.startswith('_imported_module_') and mod_name in sys.modules
    assert type(obj1) is type(obj2)  # exec'd once per distinct source
    assert persistence._src_to_module_dict[changed_src] is sys.modules[mod_name]
    assert persistence._module_to_src_dict[sys.modules[mod_name]] == changed_src
    x = torch.randn(1, 2)
    assert torch.equal(obj1(x), obj2(x))


def test_import_hook_rewrites_source(netmod, clean_hooks):
    seen = []

    @persistence.import_hook
    def hook(meta):
        seen.append(meta.class_name)
        assert isinstance(meta, dnnlib.EasyDict) and isinstance(meta.state, dnnlib.EasyDict)
        meta.module_src = meta.module_src.replace('* self.scale', '* self.scale * 10')
        return meta

    net = netmod.Net(2, 2)
    loaded = pickle.loads(pickle.dumps(net))
    assert seen == ['Net']
    assert type(loaded).__module__.startswith('_imported_module_')
    x = torch.randn(3, 2)
    expected = net.fc(x) * 10 + net.offset
    assert torch.allclose(loaded(x), expected)


def test_import_hook_returning_none_fails(netmod, clean_hooks):
    persistence.import_hook(lambda meta: None)
    with pytest.raises(AssertionError):
        pickle.loads(pickle.dumps(netmod.Net(2, 2)))


def test_version_mismatch_raises(netmod, clean_hooks):
    data = pickle.dumps(netmod.Net(2, 2))
    persistence.import_hook(lambda meta: dnnlib.EasyDict(meta, version=5))
    with pytest.raises(AssertionError, match='version'):
        pickle.loads(data)


def test_is_persistent_and_idempotent_decorator(netmod):
    net = netmod.Net(2, 2)
    assert persistence.is_persistent(netmod.Net)
    assert persistence.is_persistent(net)
    assert not persistence.is_persistent(torch.nn.Linear)
    assert not persistence.is_persistent(torch.nn.Linear(1, 1))
    assert not persistence.is_persistent({})  # unhashable instance
    assert persistence.persistent_class(netmod.Net) is netmod.Net
    assert netmod.Net.__name__ == 'Net' and netmod.Net.__module__ == 'mypkg_tmp.netmod'


def test_init_args_recorded_as_copies(netmod):
    cfg = dict(scale=3.0)
    net = netmod.Net(2, 5, **cfg)
    assert net.init_args == (2, 5)
    assert isinstance(net.init_kwargs, dnnlib.EasyDict)
    assert net.init_kwargs.scale == 3.0
    kw = net.init_kwargs
    kw.scale = 0.0
    assert net.init_kwargs.scale == 3.0  # property returns a copy


def test_record_init_args_can_be_disabled(tmp_path, monkeypatch):
    (tmp_path / 'norecord_tmp.py').write_text(textwrap.dedent('''
        from torch_utils import persistence

        @persistence.persistent_class
        class Thing:
            _record_init_args = False
            def __init__(self, value):
                self.value = value
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'norecord_tmp', raising=False)
    import norecord_tmp  # pylint: disable=import-outside-toplevel
    thing = norecord_tmp.Thing([1, 2])
    assert thing._init_args is None and thing._init_kwargs is None
    loaded = pickle.loads(pickle.dumps(thing))  # plain object: state restored via __dict__.update
    assert loaded.value == [1, 2] and persistence.is_persistent(loaded)
    sys.modules.pop('norecord_tmp', None)


def test_non_persistent_objects_in_state_pickle(tmp_path, monkeypatch, netmod):
    (tmp_path / 'holder_tmp.py').write_text(textwrap.dedent('''
        import collections, os
        from torch_utils import persistence

        @persistence.persistent_class
        class Holder:
            def __init__(self, net):
                self.net = net                        # persistent object
                self.func = os.path.join              # function, pickled by reference
                self.od = collections.OrderedDict(a=1)
                self.layer = __import__('torch').nn.Sigmoid()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'holder_tmp', raising=False)
    import holder_tmp  # pylint: disable=import-outside-toplevel
    holder = holder_tmp.Holder(netmod.Net(2, 2))
    loaded = pickle.loads(pickle.dumps(holder))
    assert loaded.func is os.path.join and loaded.od == {'a': 1}
    assert isinstance(loaded.layer, torch.nn.Sigmoid) and persistence.is_persistent(loaded.net)
    sys.modules.pop('holder_tmp', None)


def test_unpickleable_state_is_rejected_at_construction(tmp_path, monkeypatch):
    (tmp_path / 'bad_tmp.py').write_text(textwrap.dedent('''
        from torch_utils import persistence

        @persistence.persistent_class
        class Bad:
            def __init__(self):
                self.fn = lambda x: x
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'bad_tmp', raising=False)
    import bad_tmp  # pylint: disable=import-outside-toplevel
    with pytest.raises((pickle.PicklingError, AttributeError)):
        bad_tmp.Bad()
    sys.modules.pop('bad_tmp', None)


def test_check_pickleable_cheap_cases():
    persistence._check_pickleable([1, 'a', None, (2.0, b'x'), {'k': torch.zeros(2)}, {3}])
    cyclic = []
    cyclic.append(cyclic)
    persistence._check_pickleable(cyclic)
    with pytest.raises(Exception):
        persistence._check_pickleable({'f': lambda: 0})


def test_cpu_unpickler_remaps_storage_loader(monkeypatch):
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    data = pickle.dumps({'t': tensor})
    assert 'torch.storage _load_from_bytes' in _globals_in(data)

    calls = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', spy_load)
    loaded = persistence.cpu_unpickler_load(io.BytesIO(data))
    assert torch.equal(loaded['t'], tensor) and loaded['t'].device.type == 'cpu'
    assert calls and all(c.get('map_location') == 'cpu' and c.get('weights_only') is False for c in calls)

    unpickler = persistence.CPUUnpickler(io.BytesIO(b''))
    assert unpickler.find_class('torch.storage', '_load_from_bytes') is persistence._load_storage_to_cpu
    assert unpickler.find_class('collections', 'OrderedDict') is __import__('collections').OrderedDict


def test_cpu_unpickler_loads_persistent_pickle(netmod):
    net = netmod.Net(3, 3)
    loaded = persistence.cpu_unpickler_load(io.BytesIO(pickle.dumps(dict(model=net))))['model']
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), net(x))
