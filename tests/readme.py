"""The runnable snippets of README.md, for the tests that run them."""

import os

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def snippet(title):
    """The first ```python block of the README section ``## <title>``."""
    with open(README, encoding='utf-8') as f:
        text = f.read()
    head = f'\n## {title}\n'
    assert head in text, f'README has no section {title!r}'
    section = text.split(head, 1)[1].split('\n## ', 1)[0]
    assert '```python\n' in section, f'README section {title!r} has no python snippet'
    return section.split('```python\n', 1)[1].split('\n```', 1)[0]
