"""The saved --help texts in docs/help/ are the commands' current --help (80 columns). After a
change to an option, rewrite them with ``python -m tests.test_help``."""

import os

import pytest
from click.testing import CliRunner

import fid
import sample
import train
from integrations import card

HELP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'help')

#: file name -> (command, arguments, program name)
COMMANDS = {
    'train.txt': (train.main, [], 'python train.py'),
    'sample.txt': (sample.main, [], 'python sample.py'),
    'fid.txt': (fid.main, [], 'python fid.py'),
    **{f'fid-{name}.txt': (fid.main, [name], 'python fid.py') for name in ('calc', 'clip', 'ref', 'toydata')},
    'card.txt': (card.main, [], 'python -m integrations.card'),
    'card-export.txt': (card.main, ['export'], 'python -m integrations.card'),
}


def help_text(name):
    cmd, args, prog = COMMANDS[name]
    result = CliRunner().invoke(cmd, args + ['--help'], prog_name=prog, terminal_width=80, max_content_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_saved_help_is_current(name):
    path = os.path.join(HELP_DIR, name)
    assert os.path.exists(path), f'{path} missing: run python -m tests.test_help'
    with open(path, encoding='utf-8') as f:
        assert f.read() == help_text(name), f'{path} is outdated: run python -m tests.test_help'


def test_every_command_has_examples():
    for name in COMMANDS:
        if '-' not in name or name == 'card-export.txt':
            assert 'Examples:' in help_text(name), name


if __name__ == '__main__':
    os.makedirs(HELP_DIR, exist_ok=True)
    for name in COMMANDS:
        with open(os.path.join(HELP_DIR, name), 'w', encoding='utf-8') as f:
            f.write(help_text(name))
        print(f'wrote docs/help/{name}')
