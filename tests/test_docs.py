"""The documentation: README.md stays a front page, and every relative link in it and in docs/ resolves."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 300
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def markdown_files():
    docs = os.path.join(ROOT, 'docs')
    return [os.path.join(ROOT, 'README.md')] + sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(docs) for name in names if name.endswith('.md'))


def anchors(path):
    """GitHub's heading anchors of a markdown file (lower case, punctuation dropped, spaces to '-')."""
    with open(path, encoding='utf-8') as f:
        text = re.sub(r'```.*?```', '', f.read(), flags=re.S)
    found = set()
    for heading in re.findall(r'^#+\s+(.+?)\s*$', text, flags=re.M):
        found.add(re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-'))
    return found


def broken_links(path):
    with open(path, encoding='utf-8') as f:
        text = re.sub(r'```.*?```', '', f.read(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r'[a-z]+:', target):
            continue
        file, _, anchor = target.partition('#')
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(resolved):
            broken.append(f'{target} (no such file)')
        elif anchor and resolved.endswith('.md') and anchor not in anchors(resolved):
            broken.append(f'{target} (no such heading)')
    return broken


def test_readme_is_a_front_page():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        lines = f.read().count('\n')
    assert lines <= README_MAX_LINES, f'README.md has {lines} lines; move detail into a docs/ page'


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f'{os.path.relpath(path, ROOT)}: broken links'


@pytest.mark.parametrize('path', markdown_files()[1:], ids=lambda p: os.path.relpath(p, ROOT))
def test_docs_pages_link_back_to_the_readme(path):
    with open(path, encoding='utf-8') as f:
        text = f.read()
    readme = os.path.relpath(os.path.join(ROOT, 'README.md'), os.path.dirname(path))
    assert f']({readme})' in text, f'{os.path.relpath(path, ROOT)} does not link back to the README'


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('# Title\n\n[ok](page.md#title) [gone](missing.md) [bad anchor](#nothing) [web](https://x.org)\n')
    assert broken_links(str(page)) == ['missing.md (no such file)', '#nothing (no such heading)']


#: The scripts whose --help texts docs/help.md keeps: (heading, command line after the interpreter).
HELP_COMMANDS = [
    ('train.py', ['train.py']),
    ('sample.py', ['sample.py']),
    ('fid.py', ['fid.py']),
    ('fid.py calc', ['fid.py', 'calc']),
    ('fid.py ref', ['fid.py', 'ref']),
    ('fid.py toydata', ['fid.py', 'toydata']),
    ('fid.py clip', ['fid.py', 'clip']),
    ('python -m evaluation.quickstart', ['-m', 'evaluation.quickstart']),
    ('python -m evaluation.plots training', ['-m', 'evaluation.plots', 'training']),
    ('python -m evaluation.plots strip', ['-m', 'evaluation.plots', 'strip']),
    ('python -m integrations.card export', ['-m', 'integrations.card', 'export']),
    ('python -m evaluation.gits', ['-m', 'evaluation.gits']),
    ('python -m evaluation.compare', ['-m', 'evaluation.compare']),
]
HELP_PAGE = os.path.join(ROOT, 'docs', 'help.md')


def help_page():
    """docs/help.md as the scripts print their --help now (80 columns)."""
    import subprocess
    import sys
    env = dict(os.environ, COLUMNS='80', PYTHONWARNINGS='ignore')
    parts = ['# The --help texts\n\n[Back to the README](../README.md)\n\n'
             'What each command prints with `--help`. `python tests/test_docs.py --write-help` rewrites this page; '
             'tests/test_docs.py checks that it is in step with the code.\n']
    for title, args in HELP_COMMANDS:
        out = subprocess.run([sys.executable, *args, '--help'], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout
        parts.append(f'\n## {title}\n\n```text\n{out.rstrip()}\n```\n')
    return ''.join(parts)


def test_help_page_in_step_with_the_code():
    with open(HELP_PAGE, encoding='utf-8') as f:
        saved = f.read()
    assert saved == help_page(), 'docs/help.md is out of date: run python tests/test_docs.py --write-help'


if __name__ == '__main__':
    import sys
    if sys.argv[1:] == ['--write-help']:
        page = help_page()          # all of it first: a failing script leaves the old page
        with open(HELP_PAGE, 'w', encoding='utf-8') as f:
            f.write(page)


GENERATED = re.compile(r'<!-- tables: python (benchmarks/loss_study\.py) report (.*?) -->\n(.*?)<!-- end of tables -->', re.S)


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_generated_tables_match_their_data(path):
    """A table block marked as the output of ``loss_study.py report`` is that output for the JSONL
    files in the repository: the tables cannot drift from the measured rows."""
    import glob
    import shlex
    from click.testing import CliRunner
    from benchmarks import loss_study

    with open(path, encoding='utf-8') as f:
        blocks = GENERATED.findall(f.read())
    for _, args, body in blocks:
        argv = [a for arg in shlex.split(args)
                for a in (sorted(glob.glob(os.path.join(ROOT, arg))) if '*' in arg else [arg])]
        result = CliRunner().invoke(loss_study.main, ['report', *argv])
        assert result.exit_code == 0, result.output
        assert body.strip() == result.output.strip(), f'{os.path.relpath(path, ROOT)}: rerun the report for {args}'
