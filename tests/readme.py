"""The runnable snippets of README.md and the docs pages, for the tests that run them."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')


def snippet(title, doc=README, lang='python'):
    """The first ```<lang> block of the section ``## <title>`` of ``doc`` (README.md, or a path
    relative to the repository such as docs/integrations.md)."""
    path = os.path.join(ROOT, doc)
    with open(path, encoding='utf-8') as f:
        text = f.read()
    name = os.path.relpath(path, ROOT)
    head = f'\n## {title}\n'
    assert head in text, f'{name} has no section {title!r}'
    section = text.split(head, 1)[1].split('\n## ', 1)[0]
    assert f'```{lang}\n' in section, f'{name} section {title!r} has no {lang} snippet'
    return section.split(f'```{lang}\n', 1)[1].split('\n```', 1)[0]
