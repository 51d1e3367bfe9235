"""CUDA faults found without a GPU: device selection, out-of-memory, --eval_only backends, 224 px data, bench.py
under a signal. The GPU itself is exercised by tests/test_gpu.py."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import REPO, TINY, read_metrics, run_main


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices as far as setup_distributed can tell; records what set_device receives."""
    received = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'set_device', received.append)
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    return received


@pytest.mark.parametrize('flag,index', [('auto', 0), ('cuda', 0), ('cuda:1', 1)])
def test_single_process_sets_an_indexed_device(fake_cuda, flag, index):
    """torch.cuda.set_device rejects an index-less torch.device('cuda'): the default run crashed there."""
    rank, world_size, device = train.setup_distributed(flag)
    assert (rank, world_size) == (0, 1)
    assert device == torch.device('cuda', index) and fake_cuda == [torch.device('cuda', index)]


def test_torchrun_rank_uses_its_local_device(fake_cuda, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda backend: None)
    _, world_size, device = train.setup_distributed('cuda')
    assert world_size == 2 and device == torch.device('cuda', 1) and fake_cuda == [device]


@pytest.mark.parametrize('flag', ['cuda:5', 'cuda:2'])  # cuda:2 of cuda:0 and cuda:1: the first index past them
def test_missing_device_index_is_one_line(fake_cuda, capsys, flag):
    with pytest.raises(SystemExit) as error:  # printed by the process itself: under torchrun only some processes lack one
        train.setup_distributed(flag)
    assert error.value.code == 1
    assert capsys.readouterr().err == f'error: --device {flag} but only 2 CUDA device(s) exist\n'


def test_out_of_memory_names_the_batch_size_and_keeps_the_checkpoint(tiny_dataset, tmp_path, capsys, monkeypatch):
    import model
    forward, calls = model.PromptedViT.forward, []

    def forward_then_oom(self, images):  # epoch 1 trains (4 steps) and evaluates (3 batches); epoch 2 runs out
        calls.append(1)
        if len(calls) > 7:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, images)
    monkeypatch.setattr(model.PromptedViT, 'forward', forward_then_oom)
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 3, '--batch_size', 12, '--log_dir', tmp_path,
                               '--name', 'oom'], capsys)
    lines = [line for line in err.replace('\r', '\n').splitlines() if line.strip() and '|' not in line]
    assert code == 1 and len(lines) == 1 and lines[0].startswith('error: '), err
    assert 'out of GPU memory in training epoch 2 at --batch_size 12' in lines[0] and '--batch_size (e.g. 6)' in lines[0]
    assert len(read_metrics(tmp_path / 'oom')) == 1  # epoch 1's checkpoint and metrics are intact
    state = torch.load(tmp_path / 'oom' / 'state.pt', weights_only=False)
    assert state['epoch'] == 1


@pytest.mark.parametrize('amp', [True, False])
def test_out_of_memory_suggests_bf16_only_where_it_is_off(amp):
    with pytest.raises(SystemExit) as error:
        with train.explain_out_of_memory(1, amp, 'predicting'):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert str(error.value) == ("error: out of GPU memory predicting at --batch_size 1; lower --batch_size (e.g. 1)"
                                + ('' if amp else ' or --amp True (mixed precision halves the activations)'))


def test_eval_only_configures_the_backends_as_training_does(tiny_dataset, tmp_path, capsys, monkeypatch):
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 16, '--log_dir', tmp_path,
                             '--name', 'run'], capsys)
    assert code == 0, err
    configured = []
    monkeypatch.setattr(train, 'configure_backends', configured.append)
    code, out, err = run_main(['--eval_only', '--resume', tmp_path / 'run'], capsys)
    assert code == 0, err
    assert configured == [torch.device('cpu')]  # TF32 on CUDA for evaluation exactly as for training
    logged = float(read_metrics(tmp_path / 'run')[-1]['test_acc'])
    assert f"test accuracy {logged:.4f}%" in out


def test_224px_run_keeps_the_images_at_their_own_size(tiny_dataset, tmp_path, capsys, monkeypatch):
    """VPT's 224 px protocol on 32 px images: the data stays 32 px uint8 on the host, batches are resized on the
    device. Without that, CIFAR-10 at 224 px was built in float32 on the host (~90 GB)."""
    import data
    seen = []
    load = data.load_dataset
    monkeypatch.setattr(data, 'load_dataset', lambda *a, **k: seen.append(load(*a, **k)) or seen[-1])
    code, out, err = run_main([*TINY, '--img_size', 224, '--patch_size', 32, '--dataset', tiny_dataset, '--epoch', 1,
                               '--batch_size', 16, '--log_dir', tmp_path, '--name', 'big'], capsys)
    assert code == 0, err
    train_images, _, test_images, *_ = seen[0]
    assert train_images.shape[1:] == (3, 32, 32) and test_images.dtype == torch.uint8
    assert len(read_metrics(tmp_path / 'big')) == 1


def test_bench_stopped_by_a_signal_reports_what_it_measured(tmp_path):
    argv = ['--device', 'cpu', '--model', 'test_vit', '--batch_size', 8, '--steps', 3, '--warmup', 1, '--eval_steps', 2,
            '--modes', 'P,F', '--baseline_steps', 5000, '--baseline_batch_size', 8, '--json', tmp_path / 'bench.json']
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'bench.py'), *map(str, argv)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED='1'))
    deadline = time.time() + 240
    err = ''
    while time.time() < deadline and 'running the baseline' not in err:  # P and F are measured by then
        err += process.stderr.readline()
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    out, rest = process.communicate(timeout=120)
    err += rest
    assert process.returncode == 130, err[-2000:]
    assert 'Traceback' not in err and 'SIGINT: stopped; reporting the 2 mode(s) measured so far, no baseline' in err
    rows = [line.split()[0] for line in out.splitlines()[-8:] if line[:2] in ('P ', 'F ')]
    assert rows == ['P', 'F']
    assert (tmp_path / 'bench.json').is_file()


def test_a_dataset_too_large_for_the_gpu_is_one_line():
    """The whole dataset goes onto the device once; when that runs out of memory the fix is fewer or smaller images,
    not --batch_size."""
    class HostTensor:  # stands for a split whose copy to the GPU runs out of memory
        def __init__(self, nbytes):
            self.nbytes = nbytes

        def numel(self):
            return self.nbytes

        def element_size(self):
            return 1

        def to(self, device):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")
    splits = dict(train=(HostTensor(30 * 2**30), HostTensor(8)), val=None, test=(HostTensor(3 * 2**30), HostTensor(8)))
    with pytest.raises(SystemExit) as error:
        train.splits_to_device(splits, torch.device('cuda'))
    assert str(error.value).startswith('error: out of GPU memory moving the dataset (33,792 MiB of uint8 images) '
                                       'onto the device; a new run can keep fewer images (--train_samples/')
    assert str(error.value).endswith('a run resumed or evaluated needs a GPU with more free memory, or --device cpu')
