"""Tests for dnnlib.util.open_url and friends (offline: only a loopback HTTP server)."""

import http.server
import os
import socket
import threading

import pytest

from dnnlib import util


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """Point DNNLIB_CACHE_DIR at a fresh folder under tmp_path."""
    cache = tmp_path / 'cache'
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(cache))
    return cache


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves /data.pkl with fixed bytes, 404 for everything else; counts requests."""
    payload = b'\x80\x04payload-bytes' * 1000
    hits = []

    def do_GET(self):  # noqa: N802 (http.server API)
        self.hits.append(self.path)
        if self.path == '/dir/data.pkl':
            self.send_response(200)
            self.send_header('Content-Length', str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload)
        else:
            self.send_error(404, 'Not Found')

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server():
    """A loopback HTTP server in a thread; yields (base_url, stop)."""
    _Handler.hits = []
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=10)
            stopped.append(True)

    yield f'http://127.0.0.1:{httpd.server_address[1]}', stop
    stop()


def _closed_port():
    """A loopback port with nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_local_path_and_file_url(tmp_path):
    path = tmp_path / 'some file.bin'
    path.write_bytes(b'abc')
    with util.open_url(str(path)) as f:
        assert f.read() == b'abc'
    with util.open_url(path) as f:  # PathLike
        assert f.read() == b'abc'
    with util.open_url(path.as_uri()) as f:  # file:// with a quoted space
        assert f.read() == b'abc'
    assert util.open_url(str(path), return_filename=True) == str(path)


def test_missing_local_file_names_path(tmp_path):
    missing = tmp_path / 'nope.pkl'
    for target in (str(missing), missing.as_uri()):
        with pytest.raises(FileNotFoundError) as info:
            util.open_url(target)
        msg = str(info.value)
        assert str(missing) in msg and '\n' not in msg


def test_make_cache_dir_path(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'c'))
    assert util.make_cache_dir_path('downloads') == os.path.join(str(tmp_path / 'c'), 'downloads')
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert util.make_cache_dir_path('a', 'b') == os.path.join(str(tmp_path / 'xdg'), 'dnnlib', 'a', 'b')
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert util.make_cache_dir_path() == os.path.join(str(tmp_path / 'home'), '.cache', 'dnnlib')


def test_download_cached_then_served_offline(cache_env, server, capsys):
    base, stop = server
    url = base + '/dir/data.pkl'
    with util.open_url(url, verbose=False) as f:
        assert f.read() == _Handler.payload
    assert _Handler.hits == ['/dir/data.pkl']

    downloads = cache_env / 'downloads'
    files = os.listdir(downloads)
    assert len(files) == 1 and files[0].endswith('_data.pkl') and len(files[0]) == 32 + 1 + len('data.pkl')
    cached = util.open_url(url, return_filename=True)
    assert cached == str(downloads / files[0])

    stop()  # no server any more: the cache must be used
    with util.open_url(url) as f:
        assert f.read() == _Handler.payload
    assert _Handler.hits == ['/dir/data.pkl']
    assert capsys.readouterr().out == ''  # progress goes to stderr only


def test_download_without_cache_is_in_memory(cache_env, server):
    base, _stop = server
    with util.open_url(base + '/dir/data.pkl', cache=False, verbose=False) as f:
        assert f.read() == _Handler.payload
    assert not (cache_env / 'downloads').exists() or not os.listdir(cache_env / 'downloads')
    with pytest.raises(ValueError):
        util.open_url(base + '/dir/data.pkl', cache=False, return_filename=True)


def test_http_error_is_single_line_oserror(cache_env, server):
    base, _stop = server
    url = base + '/missing.pkl'
    with pytest.raises(OSError) as info:
        util.open_url(url, verbose=False)
    msg = str(info.value)
    assert '\n' not in msg and url in msg and '404' in msg
    assert str(cache_env / 'downloads') in msg
    assert _Handler.hits == ['/missing.pkl']  # 4xx is not retried
    assert not os.listdir(cache_env / 'downloads')  # no temp file left behind


def test_connection_failure_is_single_line_oserror(cache_env):
    url = f'http://127.0.0.1:{_closed_port()}/x.pkl'
    with pytest.raises(OSError) as info:
        util.open_url(url, num_attempts=2, verbose=False)
    err = info.value
    assert isinstance(err, util.DownloadError)
    msg = str(err)
    assert '\n' not in msg
    assert msg.startswith(f'could not download {url} (')
    assert 'download it by hand and pass the local path, or put it at ' in msg
    expected_cache = os.path.join(str(cache_env / 'downloads'), util._url_to_cache_name(url))
    assert msg.endswith(expected_cache)
    assert not os.path.exists(expected_cache)


def test_unsupported_scheme():
    with pytest.raises(ValueError):
        util.open_url('ftp://example.invalid/x.pkl')


def test_cache_name_sanitised():
    name = util._url_to_cache_name('https://example.invalid/a/b/we%20ird%3Fname.pkl?x=1')
    digest, rest = name.split('_', 1)
    assert len(digest) == 32 and rest == 'we_ird_name.pkl'
    assert util._url_to_cache_name('https://example.invalid/').endswith('_download')


def test_get_obj_and_construct_class_by_name():
    assert util.get_obj_by_name('os.path.join') is os.path.join
    assert util.get_obj_by_name('dnnlib.util.EasyDict') is util.EasyDict
    d = util.construct_class_by_name(class_name='dnnlib.util.EasyDict', a=1)
    assert d.a == 1
    with pytest.raises(ImportError):
        util.get_obj_by_name('no_such_module_xyz.thing')
    with pytest.raises(AttributeError):
        util.get_obj_by_name('os.path.no_such_attr')
