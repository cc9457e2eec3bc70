"""CLIP score of generated images against their captions: the library behind ``fid.py clip``.

Score = mean over images of 100 * cos(image embedding, caption embedding), the official
``clip_score.py``'s definition (no clamp at 0, no 2.5 weight; the official code), with open_clip's
ViT-g-14 ``laion2b_s34b_b88k`` by default, run by our own towers (:mod:`models.clip`).

* Caption i for seed i (the rule sample.py uses): image files are named by their seed
  (``<seed>.png`` in any sub-folder, as sample.py writes them); caption ``seed`` of the CSV's ``text``
  column (:func:`models.stable_diffusion.load_captions`) is its caption. Without ``num`` there must
  be one image per caption; a seed without a caption, a name that is not a seed, or a seed that
  appears twice stops the run with one line.
* Multi-process: each rank scores its share of the images (:func:`torch_utils.distributed.rank_seeds`
  over image indices, ``batch`` per forward); the sum of the scores and the count are summed over
  ranks (float64) before the mean, so one process and two give the same score.
* Rank 0 appends the score and its provenance to ``metrics.jsonl`` beside the images
  (:mod:`metrics.provenance`) and prints ``CLIP score (<model>): <value %g>``.
"""

import functools
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dnnlib
from metrics import provenance as prov
from models import clip
from models.files import find_file, load_checkpoint
from models.stable_diffusion import captions_file, load_captions
from torch_utils import distributed as dist
from metrics.image_sets import ImageSet, MetricError, agree, attempt, image_loader, rank0_then_others, start

LABEL = 'CLIP score'
WEIGHTS_DIR = './src/clip'


def _user(fn, *args, **kwargs):
    """Call ``fn``; the model code's FileNotFoundError / ValueError become MetricError (one line)."""
    try:
        return fn(*args, **kwargs)
    except MetricError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise MetricError(' '.join(str(e).split())) from None


def _need_extra():
    try:
        import ftfy  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
        raise MetricError(f'the CLIP score needs the optional extra ({e.name} is missing): '
                       f'pip install -r requirements-latent.txt') from None


# ----------------------------------------------------------------------------
# Images and their captions.

def caption_indices(images, captions, path, subset):
    """The caption index (= seed) of every image of an :class:`ImageSet`, checked against the captions."""
    seeds = prov.seeds_of_names(images.names)
    if seeds is None:
        bad = next(n for n in images.names if not os.path.splitext(os.path.basename(n))[0].isdigit())
        raise MetricError(f'cannot tell the seed of {images.display_name(images.names.index(bad))}: the CLIP score '
                       f'takes caption i for seed i and needs images named <seed>.png (as sample.py writes them)')
    first = {}
    for i, s in enumerate(seeds):
        if s in first:
            raise MetricError(f'seed {s} appears twice: {images.display_name(first[s])} and {images.display_name(i)}')
        first[s] = i
        if s >= len(captions):
            raise MetricError(f'image {images.display_name(i)} is seed {s} but {path} has {len(captions)} captions '
                           f'(seeds 0-{len(captions) - 1})')
    if not subset and len(seeds) != len(captions):
        raise MetricError(f'{images.path} holds {len(seeds)} images but {path} has {len(captions)} captions: the '
                       f'CLIP score takes one image per caption (seeds 0-{len(captions) - 1}); pass --num to '
                       f'score a seeded subset of the images')
    return seeds


def _pixels(images, i, img, size, mean, std):
    """CLIP input: image i preprocessed as open_clip does (:func:`models.clip.preprocess`)."""
    return clip.preprocess(img, size, mean, std)


# ----------------------------------------------------------------------------
# The model.

def _load(model, weights, device):
    """(CLIP net in eval mode on ``device``, tokenizer, the ``model`` record of the provenance)."""
    cfg, name, tag, url = clip.read_config(model)
    if weights is None:
        if url is None:
            raise MetricError(f'--model {model} is a config file: give its weights with --weights')
        candidate = os.path.join(WEIGHTS_DIR, f'{name}-{tag}', 'open_clip_pytorch_model.bin')
        path = find_file(f'the CLIP weights of {name} {tag}', [candidate], url, option='--weights')
        spec = candidate if path == candidate else url
        tokenizer_dir = os.path.join(os.path.dirname(candidate), 'tokenizer')   # also for a download
    else:
        try:
            path, spec = dnnlib.util.open_url(weights, return_filename=True, verbose=dist.is_main()), weights
        except FileNotFoundError as e:
            raise MetricError(f'--weights {weights}: {e.strerror}') from None
        except dnnlib.util.DownloadError as e:
            raise MetricError(str(e)) from None
        tokenizer_dir = os.path.join(os.path.dirname(os.path.abspath(path)), 'tokenizer')
    net = clip.CLIP(cfg, where=f'--model {model}')
    clip.load_state(net, load_checkpoint(path, 'CLIP'), path)
    tokenizer = clip.load_tokenizer(tokenizer_dir)
    if len(tokenizer) != net.vocab_size:
        raise MetricError(f'the tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but the CLIP text '
                       f'tower {net.vocab_size}')
    record = dict(name=name, pretrained=tag, weights=spec, file=os.path.abspath(path), tokenizer=tokenizer.name_or_path)
    return net.eval().requires_grad_(False).to(device), tokenizer, record


def model_title(record):
    """How the printed score names the model: ``ViT-g-14 laion2b_s34b_b88k``, or the config and weights files."""
    if record['pretrained']:
        return f'{record["name"]} {record["pretrained"]}'
    return f'{record["name"]}, {os.path.basename(str(record["weights"]).split("?")[0])}'


@torch.no_grad()
def score_sums(net, tokenizer, images, seeds, captions, batch=64, device=torch.device('cpu'), workers=2,
               progress=True):
    """(sum of 100 cos over all ranks' images, number of images), both float64 tensors summed over ranks;
    image i of the :class:`ImageSet` goes with ``captions[seeds[i]]``."""
    batches = dist.rank_seeds(range(len(images)), batch)
    prepare = functools.partial(_pixels, size=net.image_size, mean=net.mean, std=net.std)
    loader = image_loader(images, batches, prepare, workers)
    total = torch.zeros([1], dtype=torch.float64, device=device)
    count = torch.zeros([1], dtype=torch.float64, device=device)
    for idx, x, err in tqdm(loader, total=len(batches), unit='batch', disable=not (progress and dist.is_main()),
                            dynamic_ncols=True):
        agree(err)
        if x is None:
            continue
        ids = clip.tokenize(tokenizer, [captions[seeds[i]] for i in idx], net.context_length).to(device)
        cos = F.cosine_similarity(net.encode_image(x.to(device)), net.encode_text(ids), dim=-1)
        total += (100 * cos).double().sum()
        count += len(idx)
    dist.all_reduce_sum(total)
    dist.all_reduce_sum(count)
    return total, count


def compute_clip_score(images, prompt_path=None, model=clip.DEFAULT_MODEL, weights=None, num=None, seed=0, batch=64,
                       device=None, workers=2, progress=True, metrics_file=None):
    """CLIP score of ``images`` (folder or zip of ``<seed>.png``) against the captions CSV ``prompt_path``
    (default: the MS-COCO val2014 30k captions file), caption i for seed i.

    ``model``: a name of :data:`models.clip.PRETRAINED` (weights from ``weights``, else
    ``./src/clip/<name>-<tag>/open_clip_pytorch_model.bin``, else the released file, downloaded once
    into the dnnlib cache) or an open_clip model-config JSON (``weights`` required). The tokenizer
    files (``vocab.json``, ``merges.txt``) are read from ``tokenizer/`` beside the weights (beside the
    ``./src/clip/...`` path for a download), else from openai/clip-vit-large-patch14 in the Hugging
    Face cache (fetched once when online; the same BPE as open_clip's). Rank 0 appends
    the provenance line, prints ``CLIP score (<model>): <value %g>`` and returns the value."""
    options = dict(images=images, prompt_path=prompt_path, model=model, weights=weights, num=num, seed=seed,
                   batch=batch, device=device, workers=workers, metrics_file=metrics_file)
    _need_extra()
    dev = start(device)
    caption_path = rank0_then_others(_user, captions_file, prompt_path)   # rank 0 downloads the default first
    captions, err = attempt(_user, load_captions, caption_path)
    agree(err)
    image_set, err = attempt(ImageSet, images, num=num, seed=seed, min_images=1, purpose='the CLIP score')
    agree(err)
    seeds, err = attempt(caption_indices, image_set, captions, caption_path, num is not None)
    agree(err)
    log = prov.metrics_file(images, metrics_file)
    agree(prov.check_writable(log) if dist.is_main() else None)

    net, tokenizer, record = rank0_then_others(_user, _load, model, weights, dev)
    title = model_title(record)
    dist.print0(f'Computing the {LABEL} of {len(image_set)} images in {images} with CLIP {title}...')
    start_time = time.time()
    total, count = score_sums(net, tokenizer, image_set, seeds, captions, batch=batch, device=dev, workers=workers,
                              progress=progress)
    n = len(image_set)
    assert int(count.item()) == n, (count.item(), n)
    elapsed = time.time() - start_time
    dist.print0(f'{n} images in {elapsed:.1f} s: {n / max(elapsed, 1e-9):.1f} images/s '
                f'({dist.get_world_size()} process(es), batch {batch} per process, {dev.type})')
    if not dist.is_main():
        return None
    value = float(total.item() / n)

    def write_line():
        prov.append(log, dict(metric=LABEL, value=value, images=prov.images_record(image_set, num, seed),
                              model=dict(record, sha256=prov.sha256_file(record['file'])),
                              captions=dict(path=os.path.abspath(caption_path), sha256=prov.sha256_file(caption_path),
                                            column='text', rule='caption i for seed i'),
                              **prov.run_record(options)))
    _, err = attempt(write_line)
    if err:
        raise MetricError(f'{LABEL} ({title}): {value:g}, but the metrics file could not be written: {err}')
    print(f'{LABEL} ({title}): {value:g}')
    return value
