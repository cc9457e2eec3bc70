"""The tensor manifests of the official checkpoints (copied from the project's shared fixtures):
for each file, its config, parameter count, state-dict keys and shapes, and module types."""

import json
import os

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


def load_manifest(name):
    with open(os.path.join(FIXTURE_DIR, name + '.json')) as f:
        return json.load(f)
