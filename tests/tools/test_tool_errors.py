"""Bad input to the tools is named clearly, before anything is built or written."""
import subprocess

from conftest import REPO, TOY_BN_CONFIG, run_tool

TYPO = ['--cfg-options', 'model.backbone.norm_cfg.type=EvalBn']


def test_inspect_and_convert_name_a_norm_type_typo(trained_toy, tmp_path):
    _, _, checkpoint = trained_toy
    for args in (['tools/inspect_norms.py', TOY_BN_CONFIG, *TYPO],
                 ['tools/convert_checkpoint.py', checkpoint, str(tmp_path / 'out.pth'),
                  '--to', 'EvalBN', '--config', TOY_BN_CONFIG, *TYPO]):
        result = run_tool(args, timeout=300)
        assert result.returncode != 0
        assert "model.backbone.norm_cfg.type='EvalBn' is not a registered norm layer" in \
            result.stderr and 'Did you mean EvalBN' in result.stderr
        assert 'Cannot find None' not in result.stderr
    assert not (tmp_path / 'out.pth').exists()


def test_dist_scripts_without_arguments_print_their_usage():
    for script, usage in (('tools/dist_train.sh', 'CONFIG NPROC'),
                          ('tools/dist_test.sh', 'CONFIG CHECKPOINT NPROC'),
                          ('tools/dist_run.sh', 'SCRIPT NPROC')):
        result = subprocess.run(['bash', script], cwd=REPO, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2 and f'usage: {script} {usage}' in result.stderr
        assert 'unbound variable' not in result.stderr
    result = subprocess.run(['bash', 'tools/dist_train.sh', TOY_BN_CONFIG, 'two'], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and 'NPROC: a positive integer' in result.stderr
