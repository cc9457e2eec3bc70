"""The house's layout (docs/layout.md): every import runs down a floor or within a room, and only
the scripts, the tests and the training entry point's users import training/."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Rooms by floor, lowest first; a module imports only from its own room and lower floors (the
#: rooms on one floor may use each other).
FLOORS = [
    ('dnnlib', 'torch_utils'),
    ('solver_utils',),
    ('solvers', 'models'),
    ('predictors', 'cli'),
    ('generation', 'metrics', 'integrations', 'training'),
    ('evaluation', 'benchmarks'),
    ('train', 'sample', 'fid'),
]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
#: Who may import training/ at all, and what of it (None: anything).
TRAINING_USERS = {'train': None, 'evaluation': {'training'}, 'benchmarks': {'training'}}


def modules():
    """(room, path) of every project source file outside tests/."""
    for room in FLOOR:
        path = os.path.join(ROOT, room + '.py')
        if os.path.isfile(path):
            yield room, path
        for folder, _, files in os.walk(os.path.join(ROOT, room)):
            for name in files:
                if name.endswith('.py'):
                    yield room, os.path.join(folder, name)


def imports(path):
    """The absolute module names ``path`` imports (relative imports stay in the room)."""
    tree = ast.parse(open(path, encoding='utf-8').read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_no_import_runs_up_a_floor():
    bad = []
    for room, path in modules():
        for name in imports(path):
            target = name.split('.')[0]
            if target in FLOOR and target != room and FLOOR[target] > FLOOR[room]:
                bad.append(f'{os.path.relpath(path, ROOT)} imports {name}')
    assert not bad, bad


def test_only_the_entry_point_of_training_is_imported():
    bad = []
    for room, path in modules():
        for name in imports(path):
            if name.split('.')[0] != 'training' or room == 'training':
                continue
            if room not in TRAINING_USERS or (TRAINING_USERS[room] is not None and name not in TRAINING_USERS[room]):
                bad.append(f'{os.path.relpath(path, ROOT)} imports {name}')
    assert not bad, bad
