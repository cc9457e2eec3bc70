"""The command lines built from the registries (cli.py): train.py --recipe, sample.py --dry-run,
the options every registered solver brings, and the one error policy."""

import json
import os
import re

import pytest
from click.testing import CliRunner

import fid
import sample
import solvers
import train
from integrations import card
from training import RECIPES


def run(cmd, args):
    result = CliRunner().invoke(cmd, args)
    return result.exit_code, result.output


def dry_run_options(out):
    return json.loads(out[:out.rindex('}') + 1])


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_a_recipe_sets_every_option_and_explicit_ones_win(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run(train.main, ['--dataset_name=toy', f'--recipe={name}', '--batch=8', '--dry-run', '--no-progress'])
    assert code == 0, out
    options = dry_run_options(out)
    expected = dict(RECIPES[name].options, batch=8)
    assert {k: options[k] for k in expected} == expected
    assert not os.path.exists('exps'), 'a dry run writes nothing'


def test_sample_dry_run_validates_loads_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run(sample.main, ['--dataset_name=toy', '--solver=dpmpp', '--corrected_3m=True', '--seeds=0-9',
                                  '--dry-run'])
    assert code == 0, out
    assert 'Sampling 10 images with dpmpp' in out and 'Dry run: nothing written.' in out
    assert dry_run_options(out[out.index('{'):])['solver']['corrected_3m'] is True
    assert os.listdir('.') == []
    code, out = run(sample.main, ['--dataset_name=toy', '--solver=euler', '--max_order=2', '--dry-run'])
    assert code == 1 and re.fullmatch(r"Error: max_order is an option of [a-z_, ]+ only, not of solver 'euler'\n", out)


@pytest.mark.parametrize('cmd', [sample.main, train.main])
def test_every_option_of_every_registered_solver_is_an_option(cmd):
    names = {p.name for p in cmd.params}
    assert set(solvers.OPTIONS) <= names
    helps = {p.name: p.help for p in cmd.params}
    for name, cls in solvers.REGISTRY.items():
        for opt in cls.options:
            assert f'{name}: {opt.help}' in helps[opt], (name, opt)


@pytest.mark.parametrize('cmd,args', [
    (sample.main, ['--predictor_path=missing.pt']),
    (train.main, ['--dataset_name=nope']),
    (fid.main, ['calc', '--images=missing', '--ref=missing.npz']),
    (card.main, ['export', '--predictor_path=missing.pt', '--out=c.json']),
])
def test_one_error_policy(cmd, args, tmp_path, monkeypatch):
    """A bad input is one line 'Error: ...' and exit code 1 in every command."""
    monkeypatch.chdir(tmp_path)
    code, out = run(cmd, args)
    assert code == 1 and out.startswith('Error: ') and len(out.strip().splitlines()) == 1, out
