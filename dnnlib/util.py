"""Miscellaneous utilities: EasyDict, lookup of objects by dotted name, and open_url."""

import errno
import hashlib
import io
import os
import re
import sys
import tempfile
import time
import urllib.parse
import urllib.request


class EasyDict(dict):
    """A dict whose items can also be read and written as attributes.

    `d.key` is `d['key']`; a missing key raises AttributeError (so `hasattr`,
    `getattr(d, k, default)` and pickling behave as for ordinary objects).
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------
# Looking up objects by their dotted name.


#: The largest settings file (solver card, manifest, training_options.json, schedule) read: each
#: holds at most a few thousand numbers, so a larger file is not one of them.
MAX_SETTINGS_BYTES = 1 << 24


def read_settings_text(path, what):
    """The text of the settings file ``path`` (a ``what``: 'solver card', 'sample manifest', ...);
    ValueError (one line naming the file) when it is larger than :data:`MAX_SETTINGS_BYTES`, so
    that a wrong or damaged file is never read whole into memory. OSError passes through."""
    size = os.path.getsize(path)
    if size > MAX_SETTINGS_BYTES:
        raise ValueError(f'{path}: {size} bytes, more than the {MAX_SETTINGS_BYTES} a {what} can need: '
                         f'not a {what}')
    with open(path, encoding='utf-8') as f:
        return f.read()


def sha256_file(path, chunk=1 << 24):
    """Hex sha256 of a local file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_identity(spec):
    """Where a path or URL is read from and what it holds: ``{'path': spec, 'file': the local file
    (a URL's copy in the download cache, fetched if needed), 'sha256': ...}``."""
    local = os.path.abspath(open_url(spec, return_filename=True, verbose=False))
    return dict(path=str(spec), file=local, sha256=sha256_file(local))


def create_temp(folder, prefix, suffix=''):
    """``tempfile.mkstemp`` whose file gets the mode a plain ``open(path, 'w')`` would give (0666
    less the umask) instead of mkstemp's 0600, so files written through it follow the umask.
    Returns ``(fd, path)``."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def get_obj_by_name(name):
    """Return the object with the dotted name ``name``, importing modules as needed.

    The longest importable module prefix of ``name`` is imported and the rest
    is resolved with ``getattr``, so ``'torch.nn.Linear'``,
    ``'training.networks.AMED_predictor'`` and ``'os.path.join'`` all work.

    Raises:
        ImportError: no prefix of ``name`` is an importable module.
        AttributeError: the module exists but lacks the remaining attributes.
        Errors raised while importing an existing module propagate unchanged.
    """
    import importlib  # pylint: disable=import-outside-toplevel

    assert isinstance(name, str) and name, 'get_obj_by_name() expects a non-empty dotted name'
    parts = name.split('.')
    for split in range(len(parts), 0, -1):
        module_name = '.'.join(parts[:split])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only "this prefix does not exist" means: try a shorter one.
            missing = err.name or ''
            if module_name == missing or module_name.startswith(missing + '.'):
                continue
            raise
        obj = module
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f'cannot import {name!r}: no importable module prefix')


def call_func_by_name(*args, func_name=None, **kwargs):
    """Call the function (or class) with the dotted name ``func_name``."""
    assert func_name is not None, 'call_func_by_name() needs func_name'
    func = get_obj_by_name(func_name)
    assert callable(func), f'{func_name!r} is not callable'
    return func(*args, **kwargs)


def construct_class_by_name(*args, class_name=None, **kwargs):
    """Instantiate the class with the dotted name ``class_name`` (EDM-style configs)."""
    return call_func_by_name(*args, func_name=class_name, **kwargs)


# ----------------------------------------------------------------------------
# Opening local files and cached downloads.


class DownloadError(OSError):
    """A URL could not be downloaded; the message is a single line that says what to do."""


def make_cache_dir_path(*paths):
    """Return a path inside the dnnlib cache folder (the folder is not created).

    The cache folder is ``$DNNLIB_CACHE_DIR`` when that is set and non-empty,
    otherwise ``$XDG_CACHE_HOME/dnnlib``, otherwise ``~/.cache/dnnlib``.
    """
    root = os.environ.get('DNNLIB_CACHE_DIR')
    if root:
        return os.path.join(root, *paths)
    user_cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(user_cache, 'dnnlib', *paths)


def _is_url(text):
    """True if ``text`` starts with a URL scheme such as ``http://`` or ``file://``."""
    return re.match(r'^[A-Za-z][A-Za-z0-9+.-]*://', text) is not None


def _url_to_cache_name(url):
    """Cache file name for ``url``: ``<md5 of url>_<sanitised basename>``."""
    digest = hashlib.md5(url.encode('utf-8'), usedforsecurity=False).hexdigest()
    basename = urllib.parse.unquote(os.path.basename(urllib.parse.urlparse(url).path))
    basename = re.sub(r'[^0-9A-Za-z._-]', '_', basename).lstrip('.')[:128] or 'download'
    return f'{digest}_{basename}'


def _short_reason(err):
    """One-line, human-sized description of a failed download attempt."""
    import requests  # pylint: disable=import-outside-toplevel

    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f'HTTP {err.response.status_code} {err.response.reason or ""}'.strip()
    text = str(err)
    lowered = text.lower()
    if isinstance(err, requests.Timeout):
        return 'timed out'
    if 'nameresolution' in lowered or 'name or service not known' in lowered \
            or 'temporary failure in name resolution' in lowered or 'nodename nor servname' in lowered \
            or 'getaddrinfo failed' in lowered:
        return 'DNS lookup failed'
    if 'connection refused' in lowered:
        return 'connection refused'
    if 'network is unreachable' in lowered:
        return 'network is unreachable'
    if isinstance(err, requests.ConnectionError):
        return 'connection failed'
    text = ' '.join(text.split())
    return f'{type(err).__name__}: {text[:120]}' if text else type(err).__name__


def _download(url, dst, verbose, timeout=(15, 60)):
    """Stream ``url`` into the binary file object ``dst``; raise requests/OS errors."""
    import requests  # pylint: disable=import-outside-toplevel
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    with requests.get(url, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        total = response.headers.get('Content-Length')
        total = int(total) if total and total.isdigit() else None
        name = os.path.basename(urllib.parse.urlparse(url).path) or url
        with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=f'Downloading {name}',
                  file=sys.stderr, disable=not verbose, leave=False) as bar:
            for chunk in response.iter_content(chunk_size=1 << 20):
                if chunk:
                    dst.write(chunk)
                    bar.update(len(chunk))


def open_url(url, cache_dir=None, cache=True, num_attempts=3, verbose=True, return_filename=False):
    """Open a local file or a (cached) download, as a binary file object.

    Args:
        url: a local path, a ``file://`` URL, or an ``http://``/``https://`` URL.
        cache_dir: download cache folder; default ``make_cache_dir_path('downloads')``.
        cache: keep downloads in ``cache_dir`` and reuse them without network
            access; with ``cache=False`` the download is held in memory.
        num_attempts: tries for transient failures (connection errors,
            timeouts, HTTP 5xx/429); other HTTP errors fail at once.
        verbose: show a tqdm progress bar on stderr while downloading.
        return_filename: return the local path instead of an open file
            (requires ``cache=True`` for URLs).

    A download is cached as ``<cache_dir>/<md5 of url>_<sanitised basename>``;
    it is written to a temporary file in the same folder and moved into place
    with ``os.replace``, so the cache never holds a half-written file.

    Returns:
        An open binary file object (the caller closes it), or a path.

    Raises:
        FileNotFoundError: a local path or ``file://`` URL that does not exist or is a folder.
        DownloadError (an OSError): the download failed; the one-line message
            names the URL, the reason and where to put the file by hand.
        ValueError: unsupported URL scheme, or ``return_filename`` without cache.
    """
    url = os.fspath(url)
    assert num_attempts >= 1, 'num_attempts must be at least 1'

    # Local files.
    if not _is_url(url) or url.lower().startswith('file://'):
        if _is_url(url):
            path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        else:
            path = os.path.expanduser(url)
        if os.path.isdir(path):
            raise FileNotFoundError(errno.EISDIR, 'a folder, not a file', path)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, 'no such file', path)
        return path if return_filename else open(path, 'rb')  # pylint: disable=consider-using-with

    scheme = url.split('://', 1)[0].lower()
    if scheme not in ('http', 'https'):
        raise ValueError(f'open_url: unsupported URL scheme {scheme!r} in {url}')
    if return_filename and not cache:
        raise ValueError('open_url: return_filename=True requires cache=True for URLs')

    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    cache_file = os.path.join(cache_dir, _url_to_cache_name(url))
    if cache and os.path.isfile(cache_file):
        return cache_file if return_filename else open(cache_file, 'rb')  # pylint: disable=consider-using-with

    import requests  # pylint: disable=import-outside-toplevel

    reason = 'unknown error'
    for attempt in range(num_attempts):
        tmp_path = None
        try:
            if cache:
                os.makedirs(cache_dir, exist_ok=True)
                fd, tmp_path = create_temp(cache_dir, '.tmp_' + os.path.basename(cache_file) + '.')
                with os.fdopen(fd, 'wb') as tmp:
                    _download(url, tmp, verbose)
                os.replace(tmp_path, cache_file)
                tmp_path = None
                return cache_file if return_filename else open(cache_file, 'rb')  # pylint: disable=consider-using-with
            buffer = io.BytesIO()
            _download(url, buffer, verbose)
            buffer.seek(0)
            return buffer
        except (requests.RequestException, OSError) as err:
            if cache and isinstance(err, OSError) and not isinstance(err, requests.RequestException) \
                    and not os.path.isdir(cache_dir):
                raise  # cannot create the cache folder: report that error as it is
            reason = _short_reason(err)
            status = getattr(getattr(err, 'response', None), 'status_code', None)
            transient = isinstance(err, requests.RequestException) and (status is None or status >= 500 or status == 429)
            if not transient or attempt + 1 >= num_attempts:
                break
            time.sleep(min(0.5 * 2 ** attempt, 4.0))
        finally:
            if tmp_path is not None and os.path.exists(tmp_path):
                os.remove(tmp_path)

    raise DownloadError(f'could not download {url} ({reason}); download it by hand and pass the local path, '
                        f'or put it at {cache_file}')

# ----------------------------------------------------------------------------
