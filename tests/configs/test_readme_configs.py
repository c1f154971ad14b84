"""Every config snippet in README.md is the heart of a real file under configs/: the file
exists, contains the snippet's settings, builds and trains a few iterations."""
import os.path as osp
import re

import pytest
from mmengine.config import Config

from conftest import REPO, SHORT, data_root_options, run_tool


def readme_snippets():
    """``[(config path, snippet's model dict)]`` from the README's config block: each
    snippet is introduced by a ``# configs/....py`` comment."""
    text = open(osp.join(REPO, 'README.md')).read()
    block = text.split('## Use it from your own mmdet config', 1)[1].split('```python', 1)[1]
    block = block.split('```', 1)[0]
    snippets = []
    for part in re.split(r'\n(?=# configs/)', block)[1:]:
        path = re.match(r'# (configs/\S+\.py)', part).group(1)
        code = '\n'.join(line for line in part.splitlines() if not line.startswith('#'))
        snippets.append((path, _model(code)))
    return snippets


def _model(code):
    namespace = {}
    exec(compile(code, '<README snippet>', 'exec'), {'dict': dict}, namespace)  # plain dicts
    return namespace['model']


def _contained(snippet, cfg, where='model'):
    """Assert every key of ``snippet`` (nested) is in ``cfg`` with the same value."""
    for key, value in snippet.items():
        if key == '_delete_':
            continue
        assert key in cfg, f'{where}.{key} is in the README but not in the config'
        if isinstance(value, dict):
            _contained(value, cfg[key], f'{where}.{key}')
        else:
            got = cfg[key]
            got = list(got) if isinstance(got, (list, tuple)) else got
            want = list(value) if isinstance(value, (list, tuple)) else value
            assert got == want, f'{where}.{key}: README {value!r}, config {cfg[key]!r}'


SNIPPETS = readme_snippets()


def test_the_readme_shows_every_layer():
    assert [p for p, _ in SNIPPETS] == [
        'configs/toy/retinanet_r18_fpn_evalbn_toy.py',
        'configs/toy/retinanet_r18_fpn_mabn_2img_toy.py',
        'configs/toy/retinanet_r18_fpn_syncbn_toy.py',
        'configs/toy/retinanet_effb0_normeval_toy.py',
        'configs/toy/retinanet_r18_fpn_mabn_2img_all_toy.py']


@pytest.mark.parametrize('path, snippet', SNIPPETS, ids=[p for p, _ in SNIPPETS])
def test_snippet_is_in_its_config_file_which_trains(path, snippet, tiny_synthetic, tmp_path):
    cfg = Config.fromfile(osp.join(REPO, path))
    _contained(snippet, cfg.model)
    result = run_tool(['tools/train.py', path, '--work-dir', str(tmp_path), '--cfg-options',
                       *SHORT, *data_root_options(tiny_synthetic), 'load_from=None'],
                      timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Iter(train) [4/4]' in result.stdout and 'trained ' in result.stdout
