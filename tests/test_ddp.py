"""torchrun/DDP on CPU with gloo: two processes train exactly what one process trains with the same global batch."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import REPO, TINY, read_metrics, run_main, signal_after_first_epoch, write_folder_dataset


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp('ddp') / 'data', classes=('a', 'b', 'c', 'd'),
                                train_per_class=256, test_per_class=25)


@pytest.fixture(autouse=True)
def torchrun_temp_dir(tmp_path_factory, monkeypatch):
    """torchrun leaves a torchelastic_* folder in the temp directory at every launch: pytest's, not /tmp."""
    monkeypatch.setenv('TMPDIR', str(tmp_path_factory.mktemp('torchrun')))


def flags(dataset, log_dir, name, full):
    # 99 test images: shards of 49 and 50 (uneven), each ending in a padded batch; a 10% val split is evaluated too
    return [*TINY, '--patch_size', 8, '--full', full, '--prompts', 0 if full else 4, '--dataset', dataset,
            '--test_samples', 99, '--val_split', 0.1, '--epoch', 2, '--batch_size', 32, '--log_dir', log_dir,
            '--name', name]


def torchrun(argv, **kwargs):
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             os.path.join(REPO, 'main.py'), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def assert_same_metrics(two, one):
    assert [r['epoch'] for r in two] == [r['epoch'] for r in one] == ['1', '2']
    for a, b in zip(two, one):
        for column in ('train_loss', 'val_loss', 'test_loss', 'lr'):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4), column
        for column in ('train_acc', 'val_acc', 'test_acc'):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-6), column


@pytest.mark.parametrize('full', [False, True], ids=['P', 'F'])
def test_two_processes_match_one(dataset, tmp_path, capsys, full, one_torch_thread):
    two = torchrun(flags(dataset, tmp_path, 'two', full))
    # meanwhile, one process with one thread, as each of the two (torchrun's OMP_NUM_THREADS=1)
    code, out, err = run_main(flags(dataset, tmp_path, 'one', full), capsys)
    assert code == 0, err
    out, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    assert out.count('run directory:') == 1 and 'device cpu x2' in out  # only rank 0 reports and writes
    assert sorted(os.listdir(tmp_path)) == ['one', 'two']
    assert_same_metrics(read_metrics(tmp_path / 'two'), read_metrics(tmp_path / 'one'))
    for run in ('one', 'two'):  # each test image counted once, not once per process
        with open(tmp_path / run / 'confusion.csv') as f:
            assert sum(int(count) for row in list(csv.reader(f))[1:] for count in row[1:]) == 99
    per_image = {}
    for run in ('one', 'two'):  # the last epoch's predictions: the processes' shards gathered in the split's order
        with open(tmp_path / run / 'test_predictions.csv') as f:
            per_image[run] = list(csv.DictReader(f))
    assert len(per_image['two']) == 99 and len({row['image'] for row in per_image['two']}) == 99
    for a, b in zip(per_image['two'], per_image['one']):
        assert (a['image'], a['label'], a['prediction'], a['epoch']) == (b['image'], b['label'], b['prediction'], '2')
        assert float(a['probability']) == pytest.approx(float(b['probability']), abs=2e-4)
    with open(tmp_path / 'two' / 'config.json') as f:  # the record says how to run it again
        assert json.load(f)['command'].startswith('torchrun --nproc_per_node=2 main.py --model test_vit ')


def test_eval_only_under_two_processes_writes_each_test_image_once_in_order(dataset, tmp_path, capsys,
                                                                           one_torch_thread):
    """Each process evaluates its own shard of the test split (49 and 50 of 99 images, each ending in a padded
    batch): test_predictions.csv gathers them in the split's order, as one process writes it."""
    code, _, err = run_main([*flags(dataset, tmp_path, 'r', False), '--epoch', 1], capsys)
    assert code == 0, err

    def per_image():
        with open(tmp_path / 'r' / 'test_predictions.csv') as f:
            return list(csv.DictReader(f))
    code, _, err = run_main(['--eval_only', '--resume', tmp_path / 'r'], capsys)
    assert code == 0, err
    one = per_image()
    out, err = torchrun(['--eval_only', '--resume', tmp_path / 'r']).communicate(timeout=300)
    assert 'test accuracy' in out, err[-3000:]
    two = per_image()
    assert len(one) == len(two) == 99 and len({row['image'] for row in two}) == 99
    for a, b in zip(two, one):
        assert (a['image'], a['label'], a['prediction']) == (b['image'], b['label'], b['prediction'])
        assert float(a['probability']) == pytest.approx(float(b['probability']), abs=2e-4)


def test_interrupted_two_process_run_resumes_exactly_under_two_processes(dataset, tmp_path):
    """With prompt dropout every rank draws its own masks: each must resume its own RNG stream, not rank 0's."""
    with_dropout = lambda name: flags(dataset, tmp_path, name, False) + ['--prompt_dropout', 0.2]
    run_dir = tmp_path / 'two'
    two = torchrun(with_dropout('two'))
    watcher = signal_after_first_epoch(two, run_dir, signal.SIGINT, group=True)  # Ctrl-C to torchrun and workers
    straight = torchrun(with_dropout('straight'))
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]
    watcher.join()
    out, err = two.communicate(timeout=300)
    assert two.returncode != 0
    assert f'torchrun --nproc_per_node=2 main.py --resume {run_dir}' in err
    assert len(read_metrics(run_dir)) == 1
    ranks = train.load_state(run_dir)['rng']['ranks']  # each process drew its own masks from its own stream
    assert len(ranks) == 2 and not torch.equal(ranks[0]['torch'], ranks[1]['torch'])
    resumed = torchrun(['--resume', run_dir])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    time_columns = ('epoch_time_s', 'train_images_per_s')
    assert ([{k: v for k, v in row.items() if k not in time_columns} for row in read_metrics(run_dir)] ==
            [{k: v for k, v in row.items() if k not in time_columns} for row in read_metrics(tmp_path / 'straight')])


def test_global_batch_must_divide_by_world_size(tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--batch_size', 8, '--log_dir', tmp_path], capsys)
    assert code == 1 and '--batch_size 8 does not divide by the 3 processes' in err and 'global batch' in err
    assert os.listdir(tmp_path) == []


def test_a_mistake_every_process_makes_is_said_once(dataset, tmp_path):
    process = torchrun([*flags(dataset, tmp_path, 'odd', False)[:-6], '--batch_size', 7, '--log_dir', tmp_path])
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert err.count('error: --batch_size 7 does not divide by the 2 processes') == 1, err  # (torchrun adds its own report)


def test_a_data_problem_under_torchrun_is_said_once(tmp_path):
    """An unreadable image failed only the first process, and the other died on its barrier with a gloo traceback."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=8, test_per_class=2, size=16)
    (tmp_path / 'ds' / 'train' / 'b' / '0003.png').write_bytes(b'not an image')
    process = torchrun([*TINY, '--patch_size', 8, '--dataset', root, '--batch_size', 4, '--log_dir', tmp_path / 'logs'])
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert err.count('error: cannot read 1 of 16 images') == 1, err
    assert 'Traceback' not in err.split('error: cannot read')[0] and 'Connection closed' not in err, err
    assert not os.path.exists(tmp_path / 'logs') or os.listdir(tmp_path / 'logs') == []


def test_an_error_of_the_first_process_alone_is_said_once(dataset, tmp_path, capsys, one_torch_thread):
    """Only the first process takes the run's lock (or writes): when it stops on a user error, the others lost it
    at their next collective and each printed a gloo traceback; an existing --name was said by every process."""
    import fcntl
    code, _, err = run_main([*flags(dataset, tmp_path, 'r', False)[:-8], '--epoch', 1, '--batch_size', 32,
                             '--log_dir', tmp_path, '--name', 'r'], capsys)
    assert code == 0, err
    descriptor = os.open(tmp_path / 'r', os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # as a process training the run holds it
    try:
        process = torchrun(['--resume', tmp_path / 'r', '--epoch', 2])
        out, err = process.communicate(timeout=120)
    finally:
        os.close(descriptor)
    assert process.returncode != 0
    assert err.count('error: ') == 1 and f"error: {tmp_path / 'r'} is being trained by another process" in err, err
    assert '[rank1]' not in err and 'Connection closed' not in err, err
    process = torchrun(flags(dataset, tmp_path, 'r', False))  # the name exists: found by every process
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0 and err.count(f"error: run {tmp_path / 'r'} already exists") == 1, err


def test_an_error_of_one_process_alone_is_said_by_it(tiny_dataset, tmp_path, capsys, monkeypatch):
    """torchrun with more processes per node than GPUs: only the processes without a GPU fail, and they must say why
    (errors every process meets alike are said by the first process of each machine only)."""
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    for name, value in dict(WORLD_SIZE='2', RANK='1', LOCAL_RANK='1').items():
        monkeypatch.setenv(name, value)
    code, _, err = run_main([*TINY, '--device', 'cuda', '--dataset', tiny_dataset, '--batch_size', 8,
                             '--log_dir', tmp_path], capsys)
    assert code == 1 and err.strip() == 'error: --device cuda but only 1 CUDA device(s) exist', err


def test_an_error_every_process_meets_is_said_when_the_first_process_is_slow(dataset, tmp_path):
    """On a loaded machine the first process may reach an error after the others: they exited at once, torchrun
    stopped it before it could say why, and only torchrun's report was left. The others now wait for it."""
    (tmp_path / 'slow').mkdir()  # imported by every process as Python starts: the first one is 3 s late
    (tmp_path / 'slow' / 'sitecustomize.py').write_text(
        "import os, time\nif os.environ.get('LOCAL_RANK') == '0':\n    time.sleep(3)\n")
    process = torchrun(['--epoch', 0], env=dict(os.environ, PYTHONPATH=str(tmp_path / 'slow')))
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and err.count("main.py: error: argument --epoch: must be at least 1") == 1, err


def test_errors_of_every_process_are_said_once(dataset, tmp_path, capsys, one_torch_thread):
    """No CUDA, a damaged checkpoint for --eval_only, a damaged config.json: every process meets them alike."""
    process = torchrun([*flags(dataset, tmp_path, 'gpu', False), '--device', 'cuda'])
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0 and err.count('error: --device cuda but CUDA is not available') == 1, err
    code, _, err = run_main([*flags(dataset, tmp_path, 'r', False)[:-8], '--epoch', 1, '--batch_size', 32,
                             '--log_dir', tmp_path, '--name', 'r'], capsys)
    assert code == 0, err
    (tmp_path / 'r' / 'trainable.safetensors').write_bytes(b'garbage')
    process = torchrun(['--resume', tmp_path / 'r', '--eval_only'])
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0 and err.count('error: cannot read') == 1, err
    (tmp_path / 'r' / 'config.json').write_text('{')
    process = torchrun(['--resume', tmp_path / 'r', '--epoch', 2])
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0 and err.count('error: cannot read') == 1, err


def test_a_process_killed_during_training_leaves_one_line_and_a_resumable_run(tmp_path):
    """kill -9 of a worker (the out-of-memory killer): the first process lost it at its next collective and printed
    a gloo traceback; now one line that says so and how to resume, and the run resumes."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=12, test_per_class=3, size=16)
    run_dir = tmp_path / 'r'
    # 40 epochs: seconds of training left to kill a worker in once epoch 1 is saved (0.05 s each: 10 left under 1 s)
    process = torchrun([*TINY, '--img_size', 16, '--patch_size', 8, '--dataset', root, '--batch_size', 6,
                        '--epoch', 40, '--log_dir', tmp_path, '--name', 'r'])
    deadline = time.time() + 240
    while not (os.path.exists(run_dir / 'metrics.csv') and len(read_metrics(run_dir)) >= 1):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    children = subprocess.run(['pgrep', '-P', str(process.pid)], capture_output=True, text=True).stdout.split()
    second = [pid for pid in children if b'\0RANK=1\0' in b'\0' + open(f'/proc/{pid}/environ', 'rb').read()]
    os.kill(int(second[0]), signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0 and 'main.py", line' not in err, err[-3000:]  # (torchrun's own traceback follows)
    assert err.count('error: process 0 lost another process') == 1, err[-3000:]
    assert 'keeps its last finished epoch: torchrun --nproc_per_node=2 ' in err, err[-3000:]
    assert f'main.py --resume {run_dir}' in err, err[-3000:]
    resumed = torchrun(['--resume', run_dir])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]


def test_a_lost_process_gets_a_resume_command_only_for_a_run_that_trains(tmp_path, capsys, monkeypatch):
    """The first process's line when another went away: resuming the run is the way on for training, not for
    --eval_only, which trains nothing and is run again as it was."""
    import main
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=4, test_per_class=2, size=16)
    run_dir = tmp_path / 'r'
    code, _, err = run_main([*TINY, '--img_size', 16, '--patch_size', 8, '--dataset', root, '--batch_size', 4,
                             '--epoch', 1, '--log_dir', tmp_path, '--name', 'r'], capsys)
    assert code == 0, err

    def lost_peer(*args):
        raise RuntimeError('[gloo] Connection reset by peer')
    monkeypatch.setattr(main, 'run', lost_peer)
    lost = ("error: process 0 lost another process ([gloo] Connection reset by peer); its error above says why, else "
            "it was killed (out of memory?)")
    for action, then in ((['--eval_only'], ''), (['--predict', root], ''), (
            ['--epoch', 2], f"; {run_dir} keeps its last finished epoch: {train.resume_command(run_dir, 1)}")):
        code, _, err = run_main(['--resume', run_dir, *action], capsys)
        assert code == 1 and err.strip() == lost + then, err
    # a new run lost before its first checkpoint: its directory is removed, nothing to resume
    code, _, err = run_main([*TINY, '--img_size', 16, '--patch_size', 8, '--dataset', root, '--batch_size', 4,
                             '--epoch', 1, '--log_dir', tmp_path, '--name', 'new'], capsys)
    assert code == 1 and err.strip() == lost, err


def test_error_and_stop_messages_reach_stderr_in_one_write(monkeypatch, tmp_path):
    """torchrun starts its workers with python -u, where print wrote a message and its newline apart: torchrun's own
    log line landed in between, glued to the error ('... lists the flags)W1127 10:46:27.524000 ... closing signal')."""
    import io
    import main
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return len(text)
    monkeypatch.setattr(sys, 'stderr', Recorder())
    with pytest.raises(SystemExit):
        main.main(['--val_split', '1.5'])
    with pytest.raises(SystemExit):
        train.stopped(signal.SIGINT, tmp_path, 3, 0, 2)
    assert len(writes) == 2 and all(text.endswith('\n') for text in writes), writes
    assert 'error: argument --val_split' in writes[0] and 'Resume with:\n  torchrun --nproc_per_node=2 ' in writes[1]
