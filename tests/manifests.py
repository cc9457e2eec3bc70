"""The tensor manifests of the official checkpoints (copied from the project's shared fixtures):
for each file, its config, parameter count, state-dict keys and shapes, and module types."""

import json
import os

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


def load_manifest(name):
    with open(os.path.join(FIXTURE_DIR, name + '.json')) as f:
        return json.load(f)


def assert_matches_manifest(net, manifest):
    """State-dict keys, shapes and order, parameter count and module types equal the manifest's."""
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: list(shape) for k, shape in manifest['state_dict']}
    assert sorted(set(ours) - set(theirs)) == [] and sorted(set(theirs) - set(ours)) == []
    assert ours == theirs
    assert list(ours) == [k for k, _ in manifest['state_dict']]   # the official order, too
    assert sum(p.numel() for p in net.parameters()) == manifest['num_params']
    modules = {n: type(m).__name__ for n, m in net.named_modules() if n}
    assert modules == dict(manifest['modules'])
