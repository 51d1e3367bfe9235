"""Checkpoints, exact resume, signals, non-finite loss, --eval_only."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, TINY, read_metrics, run_main, signal_after_first_epoch, write_folder_dataset

TIME_COLUMNS = ('epoch_time_s', 'train_images_per_s')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    # enough images that an epoch lasts a second or two on a CPU, so a signal sent after epoch 1 lands in epoch 2
    return write_folder_dataset(tmp_path_factory.mktemp('resume') / 'data', classes=('a', 'b', 'c', 'd'),
                                train_per_class=300, test_per_class=25)


def flags(dataset, log_dir, name, epochs=2):
    return [*TINY, '--patch_size', 8, '--dataset', dataset, '--epoch', epochs, '--batch_size', 32, '--prompt_dropout', 0.1,
            '--log_dir', log_dir, '--name', name]


def start(argv):
    return subprocess.Popen([sys.executable, os.path.join(REPO, 'main.py'), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))


def without_time(rows):
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]


def test_interrupt_and_resume_equals_uninterrupted_run(dataset, tmp_path, capsys):
    interrupted = start(flags(dataset, tmp_path, 'interrupted'))
    watcher = signal_after_first_epoch(interrupted, tmp_path / 'interrupted', signal.SIGINT)
    code, _, err = run_main(flags(dataset, tmp_path, 'straight'), capsys)  # the reference, meanwhile, in-process
    assert code == 0, err
    watcher.join()
    out, err = interrupted.communicate(timeout=240)
    assert interrupted.returncode == 130, err
    assert 'Traceback' not in err
    assert f"python main.py --resume {tmp_path / 'interrupted'}" in err
    assert len(read_metrics(tmp_path / 'interrupted')) == 1  # epoch 2 was cut short; epoch 1 is kept

    code, out, err = run_main(['--resume', tmp_path / 'interrupted'], capsys)
    assert code == 0, err
    resumed, straight = read_metrics(tmp_path / 'interrupted'), read_metrics(tmp_path / 'straight')
    assert len(resumed) == 2
    assert without_time(resumed) == without_time(straight)  # bit-for-bit the same run, as printed


def test_sigterm_keeps_last_epoch_and_eval_only_reproduces_it(dataset, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    process = start(flags(dataset, tmp_path, 'run', epochs=3))
    signal_after_first_epoch(process, run_dir, signal.SIGTERM).join()
    out, err = process.communicate(timeout=240)
    assert process.returncode == 143, err
    assert f"main.py --resume {run_dir}" in err and 'Traceback' not in err
    rows = read_metrics(run_dir)
    assert len(rows) == 1
    assert torch.load(run_dir / 'state.pt', weights_only=False)['epoch'] == 1
    with safe_open(run_dir / 'trainable.safetensors', 'pt') as f:
        assert f.metadata()['epoch'] == '1'
        assert set(f.keys()) == {'prompts.tokens', 'vit.head.weight', 'vit.head.bias'}  # P mode ships only these
    assert not [f for f in os.listdir(run_dir) if f.endswith('.tmp')]
    # the base model (rebuilt from config.json) + the saved prompts and head give the logged test accuracy exactly
    code, out, err = run_main(['--eval_only', '--resume', run_dir], capsys)
    assert code == 0, err
    assert f"test accuracy {rows[0]['test_acc']}%" in out
    assert f"test loss {rows[0]['test_loss']}" in out
    assert len(read_metrics(run_dir)) == 1  # evaluating writes nothing


def test_non_finite_loss_stops_with_one_line_and_keeps_checkpoint(tiny_dataset, tmp_path, capsys):
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8, '--lr', '1e30',
                               '--warmup_epochs', 0, '--log_dir', tmp_path, '--name', 'nan'], capsys)
    assert code != 0
    line = err.strip().splitlines()[-1]
    assert 'non-finite training loss at epoch 1, step' in line and 'lower --lr' in line
    step = int(line.split('step ')[1].split(';')[0])
    assert 1 <= step <= 6
    assert torch.load(tmp_path / 'nan' / 'state.pt', weights_only=False)['epoch'] == 0  # the last good checkpoint
    assert read_metrics(tmp_path / 'nan') == []


def test_resume_refuses_a_contradicting_flag(tiny_dataset, tmp_path, capsys):
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8, '--log_dir', tmp_path,
                             '--name', 'r'], capsys)
    assert code == 0, err
    before = (tmp_path / 'r' / 'metrics.csv').read_text()
    code, _, err = run_main(['--resume', tmp_path / 'r', '--lr', '0.5'], capsys)
    assert code == 2 and '--lr 0.5 contradicts' in err and err.count('\n') == 1
    code, _, err = run_main(['--resume', tmp_path / 'r', '--prompts', '4', '--epoch', '2'], capsys)  # agrees: fine
    assert code == 0, err
    rows = read_metrics(tmp_path / 'r')
    assert len(rows) == 2 and (tmp_path / 'r' / 'metrics.csv').read_text().startswith(before)
    assert json.loads((tmp_path / 'r' / 'config.json').read_text())['epoch'] == 2
