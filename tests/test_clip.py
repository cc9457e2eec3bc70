"""fid.py clip (metrics/clip_score.py, models/clip.py): a tiny CLIP of the ViT-g-14 family with random
weights, caption i for seed i, --batch, bad input, torchrun with two processes, and open_clip's own
pipeline (peer venv) on the same weights, images and captions."""

import csv
import json
import os
import subprocess
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

pytest.importorskip('transformers', reason='the CLIP score needs the optional extra (requirements-latent.txt)')
pytest.importorskip('ftfy', reason='the CLIP score needs the optional extra (requirements-latent.txt)')

import fid  # noqa: E402
from metrics import clip_score, provenance  # noqa: E402
from models import clip  # noqa: E402
from models.stable_diffusion import load_captions  # noqa: E402
from tests.latent_fixtures import write_tokenizer  # noqa: E402
from tests.peers import peer_python  # noqa: E402
from tests.torchrun import torchrun as launch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(vocab_size=74, context_length=16):
    """ViT-g-14's layout at toy size: a non-default head_width and a fractional mlp_ratio, as ViT-g-14 has."""
    return dict(embed_dim=24, vision_cfg=dict(image_size=32, layers=2, width=48, head_width=16, mlp_ratio=2.6,
                                              patch_size=8),
                text_cfg=dict(context_length=context_length, vocab_size=vocab_size, width=32, heads=2, layers=2))


def random_clip(cfg, seed=0):
    """Our CLIP with every parameter random (LayerNorm scales and biases too), activations O(1)."""
    torch.manual_seed(seed)
    net = clip.CLIP(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if 'ln_' in name and name.endswith('weight'):
                p.uniform_(0.5, 1.5)
            elif p.ndim <= 1:
                p.normal_(0, 0.3)
            elif name.endswith('proj') and 'mlp' not in name:
                p.normal_(0, p.shape[0] ** -0.5)
            else:
                p.normal_(0, p[0].numel() ** -0.5)
    return net.eval()


def write_model(folder, cfg, seed=0, tokenizer=True):
    """config.json, weights.pt (open_clip layout) and, beside them, tokenizer/ (the tiny BPE)."""
    os.makedirs(folder, exist_ok=True)
    net = random_clip(cfg, seed)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(cfg, f)
    torch.save(net.state_dict(), os.path.join(folder, 'weights.pt'))
    if tokenizer:
        write_tokenizer(os.path.join(folder, 'tokenizer'))
    return net


def write_seed_images(folder, seeds, size=(40, 30), seed=0):
    """Images <folder>/<seed - seed % 1000>/<seed>.png (sample.py's layout), random RGB; returns {seed: uint8 HWC}."""
    rng = np.random.RandomState(seed)
    out = {}
    for s in seeds:
        img = rng.randint(0, 256, (size[1], size[0], 3)).astype(np.uint8)
        path = os.path.join(folder, f'{s - s % 1000:06d}', f'{s:06d}.png')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        PIL.Image.fromarray(img).save(path)
        out[s] = img
    return out


def write_captions(path, captions):
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['id', 'text'])
        for i, c in enumerate(captions):
            writer.writerow([1000 + i, c])


CAPTIONS = ['a cat on a mat', 'two dogs', 'a red bus in the city', 'sunset over the sea', 'a bowl of fruit',
            'people skiing', 'an old clock tower', 'a plate of pasta', 'birds on a wire', 'a kite in the sky']


def run(args):
    result = CliRunner().invoke(fid.main, ['clip', *args], catch_exceptions=False)
    lines = result.stderr.strip().splitlines() if result.exit_code else []
    return result.exit_code, result.output, lines[-1] if lines else ''


def direct_score(net, tokenizer, images, captions):
    """Mean 100 cos over (image, caption) pairs, one pair at a time."""
    scores = []
    with torch.no_grad():
        for img, text in zip(images, captions):
            x = clip.preprocess(img, net.image_size, net.mean, net.std)[None]
            ids = clip.tokenize(tokenizer, [text], net.context_length)
            scores.append(100 * F.cosine_similarity(net.encode_image(x), net.encode_text(ids)).item())
    return float(np.mean(scores))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny(in_tmp):
    net = write_model('m', tiny_config())
    write_captions('captions.csv', CAPTIONS)
    return net, clip.load_tokenizer('m/tokenizer')


def test_config_and_state_dict_names():
    net = clip.CLIP(tiny_config())
    keys = set(net.state_dict())
    for k in ('visual.conv1.weight', 'visual.class_embedding', 'visual.positional_embedding', 'visual.ln_pre.bias',
              'visual.transformer.resblocks.1.attn.in_proj_weight', 'visual.transformer.resblocks.0.mlp.c_fc.weight',
              'visual.ln_post.weight', 'visual.proj', 'token_embedding.weight', 'positional_embedding',
              'transformer.resblocks.1.attn.out_proj.bias', 'transformer.resblocks.0.mlp.c_proj.weight',
              'ln_final.weight', 'text_projection', 'logit_scale'):
        assert k in keys, k
    assert net.state_dict()['visual.transformer.resblocks.0.mlp.c_fc.weight'].shape == (int(48 * 2.6), 48)
    # ViT-g-14 at full size: 1408 wide, 16 heads of 88, MLP 6144, 40 + 24 layers (no weights built).
    _, _, vision, text, mean, _ = clip.parse_config(clip.read_config('ViT-g-14')[0], 'ViT-g-14')
    assert vision['width'] // vision['head_width'] == 16 and int(vision['width'] * vision['mlp_ratio']) == 6144
    assert (vision['layers'], text['layers'], text['context_length']) == (40, 24, 77) and mean == clip.OPENAI_MEAN
    assert clip.read_config('ViT-L-14')[0]['preprocess_cfg']['mean'] == clip.INCEPTION_MEAN
    for bad, word in ((dict(tiny_config(), vision_cfg=dict(tiny_config()['vision_cfg'], ls_init_value=0.1)),
                       'ls_init_value'), (dict(tiny_config(), timm_model_name='x'), 'timm_model_name')):
        with pytest.raises(ValueError, match=word):
            clip.CLIP(bad)


def test_preprocess_resize_and_crop():
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, (30, 45, 3)).astype(np.uint8)          # H 30, W 45 -> 32 x int(32 * 45 / 30) = 48
    x = clip.preprocess(img, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    resized = np.asarray(PIL.Image.fromarray(img).resize((48, 32), PIL.Image.Resampling.BICUBIC), np.float32) / 255
    expected = (resized[:, 8:40] - np.array(clip.OPENAI_MEAN, np.float32)) / np.array(clip.OPENAI_STD, np.float32)
    assert np.allclose(x.numpy().transpose(1, 2, 0), expected, atol=1e-6)
    square = rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)      # already the input size: only normalised
    assert np.allclose(clip.preprocess(square, 32, (0, 0, 0), (1, 1, 1)).numpy().transpose(1, 2, 0), square / 255)


def test_score_caption_per_seed_batch_and_provenance(tiny, monkeypatch):
    net, tokenizer = tiny
    seeds = [3, 7, 8, 1002]
    write_captions('captions.csv', CAPTIONS + [f'caption {i}' for i in range(len(CAPTIONS), 1003)])
    captions = load_captions('captions.csv')
    images = write_seed_images('samples', seeds)
    calls = []
    encode = clip.CLIP.encode_image
    monkeypatch.setattr(clip.CLIP, 'encode_image', lambda self, x: calls.append(len(x)) or encode(self, x))
    args = ['--images=samples', '--prompt_path=captions.csv', '--model=m/config.json', '--weights=m/weights.pt',
            '--num=4', '--workers=0', '--no-progress', '--device=cpu']
    code, out, _ = run([*args, '--batch=3'])
    assert code == 0, out
    assert calls == [2, 2]          # ceil(4 / 3) = 2 batches of at most 3, split evenly as EDM's seeds are
    expected = direct_score(net, tokenizer, [images[s] for s in seeds], [captions[s] for s in seeds])
    wrong = direct_score(net, tokenizer, [images[s] for s in seeds], captions[:4])      # caption i for image i
    assert abs(wrong - expected) > 1e-3
    last = out.strip().splitlines()[-1]
    assert last.startswith('CLIP score (config.json, weights.pt): ')
    line = json.loads(open('samples/metrics.jsonl').read().splitlines()[-1])
    assert line['metric'] == 'CLIP score' and last.endswith(f'{line["value"]:g}')
    assert abs(line['value'] - expected) < 1e-4
    assert line['images']['seeds'] == '3,7,8,1002' and line['images']['num_images'] == 4
    assert line['images']['subset'] == dict(num=4, seed=0) and line['images']['manifest'] is None
    assert line['model']['sha256'] == provenance.sha256_file('m/weights.pt')
    assert line['model']['tokenizer'].endswith('tokenizer')
    assert line['captions']['sha256'] == provenance.sha256_file('captions.csv')
    assert line['options']['batch'] == 3 and line['processes'] == 1 and line['time'].endswith('+00:00')
    # Another batch size gives the same score; a second run appends a second line.
    calls.clear()
    code, out, _ = run([*args, '--batch=1'])
    assert code == 0 and calls == [1, 1, 1, 1], out
    lines = open('samples/metrics.jsonl').read().splitlines()
    assert len(lines) == 2 and abs(json.loads(lines[1])['value'] - line['value']) < 1e-4


def test_bad_input_gives_one_line(tiny):
    write_seed_images('ok', range(10))
    write_seed_images('few', range(4))
    write_seed_images('beyond', [0, 1, 2, 10])
    write_seed_images('named', [0, 1])
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save('named/000000/cat.png')
    write_seed_images('twice', [0, 1])
    os.makedirs('twice/extra')
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save('twice/extra/000001.png')
    write_seed_images('broken', [0, 1])
    open('broken/000000/000001.png', 'wb').write(b'not a png')
    with open('notext.csv', 'w') as f:
        f.write('id,caption\n0,a cat\n')
    write_model('other', dict(tiny_config(), embed_dim=8), tokenizer=False)
    model = ['--model=m/config.json', '--weights=m/weights.pt', '--workers=0', '--no-progress']
    cases = [
        (['--images=few', '--prompt_path=captions.csv', *model], ['holds 4 images', '10 captions', '--num']),
        (['--images=beyond', '--prompt_path=captions.csv', '--num=4', *model],
         ['000010.png', 'seed 10', '10 captions', 'seeds 0-9']),
        (['--images=named', '--prompt_path=captions.csv', '--num=3', *model], ['cat.png', '<seed>.png']),
        (['--images=twice', '--prompt_path=captions.csv', '--num=3', *model], ['seed 1 appears twice']),
        (['--images=broken', '--prompt_path=captions.csv', '--num=2', *model], ['cannot read image', '000001.png']),
        (['--images=missing', '--prompt_path=captions.csv', *model], ['missing does not exist']),
        (['--images=ok', '--prompt_path=nothere.csv', *model], ['nothere.csv']),
        (['--images=ok', '--prompt_path=notext.csv', *model], ["no 'text' column"]),
        (['--images=ok', '--prompt_path=captions.csv', '--model=m/config.json'], ['--weights']),
        (['--images=ok', '--prompt_path=captions.csv', '--model=m/config.json', '--weights=nothere.pt'],
         ['nothere.pt']),
        (['--images=ok', '--prompt_path=captions.csv', '--model=m/config.json', '--weights=other/weights.pt'],
         ['other/weights.pt', 'does not match the CLIP architecture']),
        (['--images=ok', '--prompt_path=captions.csv', '--model=ViT-Q-99'], ['--model must be one of', 'ViT-g-14']),
    ]
    for args, words in cases:
        code, out, last = run(args)
        assert code != 0 and 'Traceback' not in out, (args, out)
        assert last.startswith('Error:') and all(w in last for w in words), (args, last)
    assert not any(os.path.exists(f'{d}/metrics.jsonl') for d in ('ok', 'few', 'beyond', 'named', 'twice', 'broken'))


def test_tokenizer_offline_names_where_to_put_it(tiny, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', os.path.abspath('hf'))     # an empty Hugging Face cache
    write_seed_images('ok', range(10))
    write_model('bare', tiny_config(), tokenizer=False)
    code, out, last = run(['--images=ok', '--prompt_path=captions.csv', '--model=bare/config.json',
                           '--weights=bare/weights.pt', '--workers=0', '--no-progress'])
    assert code != 0 and 'Traceback' not in out
    assert last == (f'Error: the CLIP tokenizer not found: put its files (vocab.json, merges.txt) in '
                    f'{os.path.abspath("bare/tokenizer")}/ or let transformers fetch openai/clip-vit-large-patch14')


def test_default_model_offline_names_where_to_put_the_weights(tiny, monkeypatch):
    import dnnlib  # pylint: disable=import-outside-toplevel
    write_seed_images('ok', range(10))

    def offline(url, dst, verbose, timeout=None):
        raise OSError('network is unreachable')
    monkeypatch.setattr(dnnlib.util, '_download', offline)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', os.path.abspath('cache'))
    code, out, last = run(['--images=ok', '--prompt_path=captions.csv', '--workers=0', '--no-progress'])
    assert code != 0 and 'Traceback' not in out
    assert last.startswith('Error: the CLIP weights of ViT-g-14 laion2b_s34b_b88k not found: put it at '
                           './src/clip/ViT-g-14-laion2b_s34b_b88k/open_clip_pytorch_model.bin or pass --weights'), last
    assert 'CLIP-ViT-g-14-laion2B-s34B-b88K' in last


def test_torchrun_two_processes_match_one(tiny):
    write_seed_images('samples', range(10), size=(24, 36))
    args = ['clip', '--images=samples', '--prompt_path=captions.csv', '--model=m/config.json', '--weights=m/weights.pt',
            '--batch=3', '--workers=0', '--no-progress', '--device=cpu']
    result = CliRunner().invoke(fid.main, [*args, '--workers=2', '--metrics_file=one.jsonl'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    two = launch([os.path.join(ROOT, 'fid.py'), *args, '--metrics_file=two.jsonl'], os.getcwd())
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one_line, two_line = (json.loads(open(f).read().splitlines()[-1]) for f in ('one.jsonl', 'two.jsonl'))
    assert two_line['processes'] == 2 and one_line['processes'] == 1
    assert two_line['images']['num_images'] == 10 and two_line['images']['seeds'] == '0-9'
    assert abs(one_line['value'] - two_line['value']) < 1e-4
    assert two.stdout.count('CLIP score (') == 1            # printed once, by rank 0
    assert 'fid.py clip' in two_line['command'] and '--nproc_per_node' not in two_line['command']


PEER_SCRIPT = textwrap.dedent('''
    import csv, json, os, sys
    import numpy as np
    import PIL.Image
    import torch
    import open_clip
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transform import image_transform

    folder, images_dir, captions_path, out = sys.argv[1:5]
    cfg = json.load(open(os.path.join(folder, 'config.json')))
    # open_clip's BPE as the Hugging Face files beside the weights (its special tokens under the OpenAI names).
    tok = SimpleTokenizer(context_length=cfg['text_cfg']['context_length'])
    names = {'<start_of_text>': '<|startoftext|>', '<end_of_text>': '<|endoftext|>'}
    os.makedirs(os.path.join(folder, 'tokenizer'), exist_ok=True)
    with open(os.path.join(folder, 'tokenizer', 'vocab.json'), 'w') as f:
        json.dump({names.get(k, k): v for k, v in tok.encoder.items()}, f)
    with open(os.path.join(folder, 'tokenizer', 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\\n')
        for (a, b), _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1]):
            f.write(a + ' ' + b + '\\n')

    model = CLIP(embed_dim=cfg['embed_dim'], vision_cfg=cfg['vision_cfg'], text_cfg=cfg['text_cfg']).eval()
    model.load_state_dict(torch.load(os.path.join(folder, 'weights.pt'), weights_only=True), strict=True)
    preprocess = image_transform(cfg['vision_cfg']['image_size'], is_train=False)
    captions = [row['text'] for row in csv.DictReader(open(captions_path, encoding='utf-8'))]
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(images_dir) for f in fs if f.endswith('.png'))
    seeds = [int(os.path.splitext(os.path.basename(f))[0]) for f in files]
    pixels = torch.stack([preprocess(PIL.Image.open(f)) for f in files])
    ids = tok([captions[s] for s in seeds])
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(ids)
        # the official clip_score.py: 100 cos per pair, summed, divided by the number of images
        cos = (torch.nn.functional.normalize(img, dim=-1) * torch.nn.functional.normalize(txt, dim=-1)).sum(-1)
        score = (100 * cos).sum() / len(files)
    np.savez(out, pixels=pixels.numpy(), ids=ids.numpy(), image=img.numpy(), text=txt.numpy(), score=score.item(),
             version=open_clip.__version__)
''')


def test_matches_open_clip(in_tmp):
    """Our towers, preprocessing, tokenizer and score against open_clip's on the same random weights."""
    peer = peer_python('open_clip')
    cfg = tiny_config(vocab_size=49408, context_length=20)
    net = write_model('m', cfg, seed=3, tokenizer=False)
    captions = ['A Man riding   a HORSE &amp; a dog.', '“Curly” quotes, café, naïve, ﬁsh, ＦＵＬＬ width',
                'word ' * 40, '', "don't stop: 12345 tokens!? :-)", '日本語のテキスト 🐱 and a cat']
    write_captions('captions.csv', captions)
    images = write_seed_images('samples', range(len(captions)), size=(45, 30), seed=1)
    result = subprocess.run([peer, '-c', PEER_SCRIPT, 'm', 'samples', 'captions.csv', 'peer.npz'],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    peer = np.load('peer.npz')
    tokenizer = clip.load_tokenizer('m/tokenizer')
    assert len(tokenizer) == 49408
    seeds = range(len(captions))
    pixels = torch.stack([clip.preprocess(images[s], 32) for s in seeds])
    ids = clip.tokenize(tokenizer, captions, 20)
    assert np.array_equal(ids.numpy(), peer['ids'])                          # incl. truncation, ftfy, HTML
    assert np.abs(pixels.numpy() - peer['pixels']).max() <= 1e-5
    with torch.no_grad():
        img, txt = net.encode_image(torch.from_numpy(peer['pixels'])).numpy(), net.encode_text(ids).numpy()
    assert np.abs(img).max() > 0.5 and np.abs(txt).max() > 0.5              # not a comparison of near-zeros
    assert np.abs(img - peer['image']).max() <= 1e-4 * np.abs(peer['image']).max()
    assert np.abs(txt - peer['text']).max() <= 1e-4 * np.abs(peer['text']).max()
    code, out, _ = run(['--images=samples', '--prompt_path=captions.csv', '--model=m/config.json',
                        '--weights=m/weights.pt', '--batch=4', '--workers=0', '--no-progress'])
    assert code == 0, out
    value = json.loads(open('samples/metrics.jsonl').read().splitlines()[-1])['value']
    assert abs(float(peer['score'])) > 1                                     # the score itself is not ~0
    assert abs(value - float(peer['score'])) <= 1e-4, (value, float(peer['score']))
