"""Frechet Inception Distance (python fid.py calc / ref).

Not part of this build yet: the Inception detector, statistics files and the multi-process
calculation are a separate capability (see the README's status section). Until then this
command says so and exits with an error, rather than computing anything half-way.
"""

import click


@click.group()
def main():
    """FID tools: calc (FID of an image folder against reference statistics) and ref (statistics)."""


@main.command()
@click.option('--images', type=str, required=True)
@click.option('--ref', type=str, required=True)
def calc(images, ref):
    """Compute FID of --images against --ref (not available in this build)."""
    raise click.ClickException('fid.py calc is not available in this build yet (see README, "Status")')


@main.command()
@click.option('--data', type=str, required=True)
@click.option('--dest', type=str, required=True)
def ref(data, dest):
    """Compute reference statistics of --data (not available in this build)."""
    raise click.ClickException('fid.py ref is not available in this build yet (see README, "Status")')


if __name__ == '__main__':
    main()
