"""Checkpoints, exact resume, signals, non-finite loss, --eval_only."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import main
from conftest import (REPO, TINY, read_metrics, run_main, signal_after_first_epoch, signal_on_import,
                      write_folder_dataset)

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
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1',
                                                                        OMP_NUM_THREADS='1'))


def without_time(rows):
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]


def test_interrupt_and_resume_equals_uninterrupted_run(dataset, tmp_path, capsys, one_torch_thread):
    """Data order, augmentation, prompt-dropout masks, optimizer and schedule all continue: the same metrics and the
    same weights, bit for bit, last and best (--val_split) alike."""
    interrupted = start(flags(dataset, tmp_path, 'interrupted') + ['--val_split', 0.1])
    watcher = signal_after_first_epoch(interrupted, tmp_path / 'interrupted', signal.SIGINT)
    code, _, err = run_main(flags(dataset, tmp_path, 'straight') + ['--val_split', 0.1], capsys)  # meanwhile
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
    for checkpoint in ('trainable.safetensors', 'best.safetensors'):
        weights, expected = (load_file(tmp_path / run / checkpoint) for run in ('interrupted', 'straight'))
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[name], expected[name]) for name in expected), checkpoint
    (resume,) = json.loads((tmp_path / 'interrupted' / 'config.json').read_text())['resumed']
    assert resume['from_epoch'] == 1 and 'epoch_before' not in resume and 'amp_before' not in resume  # one plan


def test_epochs_that_compile_are_marked_and_left_out_of_the_time_per_epoch(tiny_dataset, tmp_path, capsys,
                                                                             monkeypatch):
    # a compiling epoch took 30-60 s against 4-5 s for the next on an H100: in a mean over a short run it swamped the
    # comparison of P and F. Compiling itself is test_gpu.py's (a minute here); this checks the bookkeeping only.
    import plot
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, *args, **kwargs: None)
    run_dir = tmp_path / 'run'
    code, out, err = run_main([*TINY, '--patch_size', 8, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 16,
                               '--compile', True, '--log_dir', tmp_path, '--name', 'run'], capsys)
    assert code == 0, err
    epoch_lines = [line for line in out.splitlines() if line.startswith('epoch ')]
    assert ['(includes compiling)' in line for line in epoch_lines] == [True, False]
    code, out, err = run_main(['--resume', run_dir, '--epoch', 3], capsys)  # a new process compiles again
    assert code == 0, err
    rows = read_metrics(run_dir)
    assert [row['includes_compile'] for row in rows] == ['1', '0', '1']
    summary = json.loads((run_dir / 'summary.json').read_text())
    times = [float(row['epoch_time_s']) for row in rows]
    assert summary['mean_epoch_time_s'] == pytest.approx(times[1], abs=1e-3)  # epoch 2 alone
    assert summary['total_time_s'] == pytest.approx(sum(times), abs=3e-3)  # everything the run took
    run = plot.load_run(str(run_dir))
    assert run['epoch_time_s'] == pytest.approx(times[1]) and run['time_s'] == pytest.approx(sum(times))


def test_sigterm_keeps_last_epoch_and_eval_only_reproduces_it(dataset, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    process = start(flags(dataset, tmp_path, 'run', epochs=20))  # still training after a lock's short wait
    signal_after_first_epoch(process, run_dir, signal.SIGTERM).join()
    out, err = process.communicate(timeout=240)
    assert process.returncode == 143, err
    assert f"main.py --resume {run_dir}" in err and 'Traceback' not in err
    assert f"SIGTERM: stopped; {run_dir} keeps the checkpoint and metrics of epoch 1. Resume with:" in err
    rows = read_metrics(run_dir)
    assert len(rows) == 1
    assert torch.load(run_dir / 'state.pt', weights_only=False)['epoch'] == 1
    with safe_open(run_dir / 'trainable.safetensors', 'pt') as f:
        assert f.metadata()['epoch'] == '1'
        assert set(f.keys()) == {'prompts.tokens', 'vit.head.weight', 'vit.head.bias'}  # P mode ships only these
    assert not [f for f in os.listdir(run_dir) if '.tmp' in f]
    # the base model (rebuilt from config.json) + the saved prompts and head give the logged test accuracy exactly
    code, out, err = run_main(['--eval_only', '--resume', run_dir], capsys)
    assert code == 0, err
    assert f"test accuracy {rows[0]['test_acc']}%" in out
    assert f"test loss {rows[0]['test_loss']}" in out
    assert len(read_metrics(run_dir)) == 1  # evaluating writes nothing


def test_non_finite_loss_stops_with_one_line_and_keeps_checkpoint(tiny_dataset, tmp_path, capsys):
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8, '--lr', '1e30',
                               '--warmup_epochs', 0, '--log_dir', tmp_path, '--name', 'nan'], capsys)
    assert code == 3  # main.EXIT_DIVERGED: sweep.py records the settings as diverged instead of retrying them
    line = err.strip().splitlines()[-1]
    assert 'non-finite training loss at epoch 1, step' in line
    assert 'start a new run with a lower --lr' in line and 'a resume keeps it' in line  # it cannot change on resume
    assert '--amp False' not in line  # fp32 on the CPU: the precision is not the cause
    assert 'the checkpoint of epoch 0 is intact' in line  # the one before the epoch that diverged
    step = int(line.split('step ')[1].split(';')[0])
    assert 1 <= step <= 6
    assert torch.load(tmp_path / 'nan' / 'state.pt', weights_only=False)['epoch'] == 0  # the last good checkpoint
    summary = json.loads((tmp_path / 'nan' / 'summary.json').read_text())
    assert summary['diverged'] == dict(epoch=1, step=step) and summary['finished'] is False  # for plot.py
    assert read_metrics(tmp_path / 'nan') == []


def test_an_epoch_whose_last_update_breaks_the_weights_diverges(tiny_dataset, tmp_path, capsys):
    """One step an epoch: its loss is finite (the weights before it), the update leaves weights whose logits are
    non-finite; their argmax, class 0, gave a 33.33% test accuracy beside a nan test loss, and exit 0."""
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--patch_size', 8, '--full', True, '--prompts', 0,
                               '--epoch', 1, '--batch_size', 48, '--lr', '1e30', '--warmup_epochs', 0,
                               '--log_dir', tmp_path, '--name', 'nan'], capsys)
    assert code == 3, err
    line = err.strip().splitlines()[-1]
    assert line.startswith('error: non-finite test loss after the update at epoch 1, step 1; start a new run with a '
                           'lower --lr'), line
    assert 'the checkpoint of epoch 0 is intact' in line
    assert read_metrics(tmp_path / 'nan') == []
    summary = json.loads((tmp_path / 'nan' / 'summary.json').read_text())
    assert summary['diverged'] == dict(epoch=1, step=1) and summary['finished'] is False
    assert not (tmp_path / 'nan' / 'confusion.csv').exists()


# a value for every main.py flag that differs from the run tiny_run makes; all but RESUME_MAY_CHANGE's are refused
OTHER_VALUES = dict(batch_size=16, full=True, prompts=2, deep=False, prompt_dropout=0.3, prompt_impl='naive',
                    optimizer='sgd', lr=0.5, weight_decay=0.5, warmup_epochs=0.5, unfreeze='pos_embed', augment=False,
                    val_split=0.2, test_split=0.2, seed=3, data_seed=3, model='vit_tiny_patch16_224', pretrained=True,
                    weights='other.safetensors', img_size=64, patch_size=8, train_samples=10, test_samples=5,
                    log_dir='elsewhere', name='other', epoch=7, device='cuda', dataset='cifar10', data_dir='d',
                    compile=True, amp=False, tensorboard=True)


def test_only_the_flags_that_cannot_change_the_result_may_change_on_resume(tiny_dataset, tmp_path, capsys):
    """A resume that took --weight_decay 0.5 or --augment False would change a run half way through and record the
    new value as if it had held throughout."""
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    flags = {action.dest for action in main.make_parser()._actions} - {'help'} - main.ACTIONS
    assert set(OTHER_VALUES) == flags  # a new flag gets a value here, and a decision
    assert main.RESUME_MAY_CHANGE - main.ACTIONS == {'epoch', 'device', 'dataset', 'data_dir', 'compile', 'amp',
                                                     'tensorboard'}
    for flag in sorted(flags - main.RESUME_MAY_CHANGE):
        with pytest.raises(SystemExit) as stop:
            main.parse_args(['--resume', str(tmp_path / 'r'), f'--{flag}', str(OTHER_VALUES[flag])])
        assert stop.value.code == 2 and f"--{flag} {OTHER_VALUES[flag]} contradicts" in capsys.readouterr().err, flag


def test_resume_refuses_a_contradicting_flag(tiny_dataset, tmp_path, capsys):
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8, '--log_dir', tmp_path,
                             '--name', 'r'], capsys)
    assert code == 0, err
    before = (tmp_path / 'r' / 'metrics.csv').read_text()
    code, _, err = run_main(['--resume', tmp_path / 'r', '--lr', '0.5'], capsys)
    assert code == 2 and '--lr 0.5 contradicts' in err and err.count('\n') == 1
    code, out, err = run_main(['--resume', tmp_path / 'r', '--prompts', '4', '--epoch', '2'], capsys)  # agrees: fine
    assert code == 0, err
    assert f"run directory: {tmp_path / 'r'} (resumed after epoch 1 of 2)\n" in out  # where it goes on from
    rows = read_metrics(tmp_path / 'r')
    assert len(rows) == 2 and (tmp_path / 'r' / 'metrics.csv').read_text().startswith(before)
    assert json.loads((tmp_path / 'r' / 'config.json').read_text())['epoch'] == 2


def tiny_run(tiny_dataset, log_dir, name, *extra, epochs=1):
    return [*TINY, '--dataset', tiny_dataset, '--epoch', epochs, '--batch_size', 8, '--log_dir', log_dir,
            '--name', name, *extra]


def files(run_dir):
    return {name: (run_dir / name).read_bytes() for name in sorted(os.listdir(run_dir))}


def test_refused_resume_writes_nothing_and_the_run_still_resumes(tiny_dataset, tmp_path, capsys):
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r', epochs=2), capsys)
    assert code == 0, err
    before = files(tmp_path / 'r')
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 1], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: {tmp_path / 'r'} has already finished 2 epochs; --epoch 1 cannot undo them: pass --epoch 3 or more "
        f"to train further"]
    assert files(tmp_path / 'r') == before  # config.json untouched: no 'epoch': 1, no 'resumed' entry
    for resume in (['--resume', tmp_path / 'r'], ['--resume', tmp_path / 'r', '--tensorboard', True, '--compile', True]):
        code, out, err = run_main(resume, capsys)
        assert code == 0 and f"{tmp_path / 'r'} has finished all 2 epochs" in out, err
        # nothing trained, nothing changed: not a 'resumed' entry, nor compile/tensorboard for every later resume
        assert files(tmp_path / 'r') == before
    # a checkpoint from another epoch than state.pt (killed while saving) is refused before anything is written too
    before = files(tmp_path / 'r')
    with safe_open(tmp_path / 'r' / 'trainable.safetensors', 'pt') as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / 'r' / 'trainable.safetensors', metadata={'epoch': '1'})
    before['trainable.safetensors'] = (tmp_path / 'r' / 'trainable.safetensors').read_bytes()
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 3], capsys)
    assert code == 1 and ('trainable.safetensors is from epoch 1 but state.pt is from epoch 2 (killed while saving?); '
                          'start a new run') in err
    assert files(tmp_path / 'r') == before


def test_resuming_a_finished_run_writes_again_the_files_that_lag_its_state(tiny_dataset, tmp_path, capsys):
    """A crash between write_files' renames after the last epoch (state.pt goes before metrics.csv and summary.json),
    or a deleted summary.json, left a finished run that sweep.py took for an unfinished one and launched again on
    every relaunch, main.py saying 'finished' and changing nothing. A resume writes them again from state.pt, equal
    to what the run wrote; a damaged summary.json is left as it is."""
    import train
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r', '--val_split', 0.25, epochs=2), capsys)
    assert code == 0, err
    finished = files(run_dir)
    config = json.loads(finished['config.json'])
    history = torch.load(run_dir / 'state.pt', weights_only=False)['history']
    # the epoch-1 files that fit had written, as a crash before their renames leaves them
    stale_summary = train.json_bytes(train.summarize(history[:1], 2, 0.25, config['test_images']))
    for lagging in ({'summary.json': stale_summary, 'metrics.csv': train.metrics_bytes(history[:1])},
                    {'summary.json': None},
                    {'summary.json': b'{"per_class_acc": {}}'}):  # as --eval_only wrote it where none was
        for name, content in lagging.items():
            (run_dir / name).unlink()
            if content is not None:
                (run_dir / name).write_bytes(content)
        code, out, err = run_main(['--resume', run_dir], capsys)
        assert code == 0 and f"{run_dir} has finished all 2 epochs" in out, err
        assert f"({' and '.join(lagging)} written again from its state.pt" in out
        assert files(run_dir) == finished  # per_class_acc from confusion.csv, as the run wrote it
    code, out, _ = run_main(['--resume', run_dir], capsys)
    assert code == 0 and 'written again' not in out and files(run_dir) == finished
    # damaged, or edited (a spreadsheet saving the CSV with CRLF ends): not replaced
    (run_dir / 'summary.json').write_text('{"epochs_done": 1')
    (run_dir / 'metrics.csv').write_bytes(finished['metrics.csv'].replace(b'\n', b'\r\n'))
    edited = files(run_dir)
    code, out, _ = run_main(['--resume', run_dir], capsys)
    assert code == 0 and 'written again' not in out and files(run_dir) == edited


def test_resuming_a_finished_run_beside_damaged_csv_files_is_no_traceback(tiny_dataset, tmp_path, capsys):
    """A finished run whose summary.json is rewritten beside a confusion.csv with a blank line (an editor's), or
    whose metrics.csv holds a field past csv's size limit (a file of no newline): an IndexError or csv.Error
    traceback. The damaged file is read as none: summary.json is written without per_class_acc, metrics.csv is left."""
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    (run_dir / 'summary.json').unlink()
    with open(run_dir / 'confusion.csv', 'a') as f:
        f.write('\n')
    code, out, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and '(summary.json written again from its state.pt' in out, err
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['finished'] is True and 'per_class_acc' not in summary
    (run_dir / 'metrics.csv').write_text('x' * 200_000)
    code, out, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and 'written again' not in out, err
    assert (run_dir / 'metrics.csv').read_text() == 'x' * 200_000


@pytest.mark.parametrize('damaged', ['"finished"', '{"epochs_done": 1', '[{"finished": true}]'])
def test_resuming_a_finished_run_whose_summary_is_damaged_says_how_to_mend_it(tiny_dataset, tmp_path, capsys,
                                                                                damaged):
    """A finished run's summary.json that is no JSON object (damaged, or edited by hand) is left as it is, and
    sweep.py and plot.py take the run for unfinished: a sweep resumed it on every re-launch and never got past it,
    while main.py said 'has finished its 1 epoch' and no more. It says why, and how to have it written again."""
    import sweep
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    (run_dir / 'summary.json').write_text(damaged)
    before = files(run_dir)
    code, out, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and f"{run_dir} has finished its 1 epoch; pass --epoch N" in out and files(run_dir) == before, err
    assert err.strip() == (f"note: {run_dir / 'summary.json'} is no summary vpt can read (damaged, or edited by "
                           f"hand), so sweep.py and plot.py take the run for unfinished; it is left as it is: remove "
                           f"it and resume the run again to write it from its state.pt")
    (run_dir / 'summary.json').unlink()
    code, out, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and '(summary.json written again' in out and 'note:' not in err, err
    assert sweep.read_json(run_dir / 'summary.json')['finished'] is True


def test_a_resume_whose_data_cannot_go_onto_the_device_writes_nothing(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Out of GPU memory moving the images to the device refuses a resume like any other check: before config.json
    gains a 'resumed' entry for a resume that never trained."""
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    before = files(tmp_path / 'r')
    tensor_to = torch.Tensor.to

    def to(tensor, *args, **kwargs):  # the images are the only uint8 tensors that go to the device
        if tensor.dtype == torch.uint8:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 150.00 MiB')
        return tensor_to(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, 'to', to)
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
    assert code == 1 and err.strip().splitlines() == [
        'error: out of GPU memory moving the dataset (0 MiB of uint8 images) onto the device; a new run can keep '
        'fewer images (--train_samples/--test_samples) or a smaller --img_size (a folder\'s larger images are shrunk '
        'as decoded); a run resumed or evaluated needs a GPU with more free memory, or --device cpu'], err
    assert files(tmp_path / 'r') == before
    monkeypatch.setattr(torch.Tensor, 'to', tensor_to)
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
    assert code == 0, err


def test_first_sentence_of_an_error():
    import train
    assert train.first_sentence(RuntimeError('failed finding central directory. This is an internal error. If you '
                                             'are seeing this')) == 'failed finding central directory'
    assert train.first_sentence(OSError('no such file: a.b.c')) == 'no such file: a.b.c'  # no sentence end in it
    assert train.first_sentence(EOFError()) == 'no message'
    long = train.first_sentence(ValueError('word ' * 100), limit=30)
    assert long == 'word word word word word word ...'


def test_a_state_the_user_may_not_read_is_said_so_not_called_damaged(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Another user's run (chmod 600 state.pt): a resume called its state damaged and sent the user to --eval_only
    or a new run. Denial is played (the tests run as root, whom chmod denies nothing)."""
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    path = str(tmp_path / 'r' / 'state.pt')
    access, load = os.access, torch.load
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: access(p, mode, **kw) and str(p) != path)

    def loading(file, *args, **kwargs):
        if str(file) == path:
            raise PermissionError(13, 'Permission denied', path)
        return load(file, *args, **kwargs)
    monkeypatch.setattr(torch, 'load', loading)
    before = files(tmp_path / 'r')
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
    assert code == 1 and err.strip() == (f"error: cannot read {path} (permission denied); make it readable (chmod "
                                         f"u+r, or ask its owner)"), err
    assert files(tmp_path / 'r') == before


def test_damaged_run_files_are_one_line(tiny_dataset, tmp_path, capsys):
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    state = (tmp_path / 'r' / 'state.pt').read_bytes()
    (tmp_path / 'r' / 'state.pt').write_bytes(state[:100])  # a copy cut short
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
    # torch's message goes on for three sentences of advice; the line keeps what went wrong, whole
    assert code == 1 and re.fullmatch(rf"error: cannot read {re.escape(str(tmp_path / 'r' / 'state.pt'))} "
                                      rf"\(RuntimeError: [^.()]+\); the run's state is damaged: .+", err.strip()), err
    (tmp_path / 'r' / 'state.pt').write_bytes(b'file,prediction\n')
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
    assert code == 1 and 'Traceback' not in err and len(err.strip().splitlines()) == 1
    assert f"cannot read {tmp_path / 'r' / 'state.pt'}" in err and '--eval_only' in err
    code, _, err = run_main(['--resume', tmp_path / 'r', '--eval_only'], capsys)  # as the message says
    assert code == 0, err
    torch.save({'foo': 1}, tmp_path / 'r' / 'state.pt')  # another tool's file
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
    assert code == 1 and err.strip() == (f"error: {tmp_path / 'r' / 'state.pt'} is not a vpt run's state (epoch, "
                                         f"history, optimizer, scheduler and rng); the run directory is damaged: "
                                         f"--eval_only still evaluates its trainable.safetensors, or start a new run")
    (tmp_path / 'r' / 'config.json').write_text('{"epoch": ')
    code, _, err = run_main(['--resume', tmp_path / 'r', '--eval_only'], capsys)
    assert code == 1 and err.strip().startswith(f"error: cannot read {tmp_path / 'r' / 'config.json'}")
    assert len(err.strip().splitlines()) == 1
    (tmp_path / 'r' / 'config.json').write_text('[1, 2]')
    code, _, err = run_main(['--resume', tmp_path / 'r', '--eval_only'], capsys)
    assert code == 2 and "its config.json is not a vpt run's" in err and len(err.strip().splitlines()) == 1
    for text in ('[' * 100000 + ']' * 100000, '{"epoch": 1' + '0' * 5000 + '}'):  # JSON too deep, a number too long
        (tmp_path / 'r' / 'config.json').write_text(text)
        code, _, err = run_main(['--resume', tmp_path / 'r', '--eval_only'], capsys)
        assert code == 1 and err.strip().startswith(f"error: cannot read {tmp_path / 'r' / 'config.json'}")
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('key, value', [('batch_size', 'big'), ('epoch', None), ('full', 'maybe'), ('lr', 'fast'),
                                        ('optimizer', 'lion'), ('model', 7), ('val_split', [0.1]), ('prompts', 2.5),
                                        ('lr', float('nan')), ('warmup_epochs', float('inf')),
                                        ('folder_reading', None), ('dataset_images', [48, 18]), ('classes', 'abc'),
                                        ('dataset_images', {'train': '48', 'test': 18}), ('classes', [1, 2, 3]),
                                        ('full', 1), ('resumed', {'from_epoch': 1}), ('val_images', '0'),
                                        ('dataset', 7), ('log_dir', ['logs']), ('data_sha256', ['abc']),
                                        ('data_sha256', {'train': 7})])
def test_a_hand_edited_config_value_is_one_line(tiny_dataset, tmp_path, capsys, key, value):
    """A value the flag would not take, or a record main.py reads back in another form, came out as a TypeError
    from deep inside ('big' % world_size, None < 3)."""
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'r' / 'config.json').read_text())
    (tmp_path / 'r' / 'config.json').write_text(json.dumps(dict(config, **{key: value})))
    before = files(tmp_path / 'r')
    for action in [['--eval_only']] + ([['--epoch', 2]] if key != 'epoch' else []):  # a given --epoch replaces it
        code, _, err = run_main(['--resume', tmp_path / 'r', *action], capsys)
        what = (f"which --{key} does not take" if key not in main.RECORDED else "not what main.py records there")
        assert code == 2 and err.strip().splitlines() == [
            f"main.py: error: --resume {tmp_path / 'r'}: its config.json holds {key}={json.dumps(value)}, {what}; the "
            f"run directory is damaged: restore its config.json, or start a new run (python main.py --help lists the "
            f"flags)"], err
    assert files(tmp_path / 'r') == before


@pytest.mark.parametrize('dropped', [['classes'], ['model', 'dataset', 'full', 'prompts', 'epoch', 'classes']])
def test_a_config_without_what_every_run_records_is_one_line(tiny_dataset, tmp_path, capsys, dropped):
    """config.json cut down to {} took today's defaults for the run's flags: --eval_only tried to download CIFAR-10
    for a folder run, and --predict was a KeyError traceback."""
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'r' / 'config.json').read_text())
    (tmp_path / 'r' / 'config.json').write_text(json.dumps({k: v for k, v in config.items() if k not in dropped}))
    before = files(tmp_path / 'r')
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    for action in (['--eval_only'], ['--predict', image], ['--epoch', 2]):
        code, _, err = run_main(['--resume', tmp_path / 'r', *action], capsys)
        assert code == 2 and err.strip() == (
            f"main.py: error: --resume {tmp_path / 'r'}: its config.json lacks {', '.join(dropped)}, which every vpt "
            f"run records; the run directory is damaged: restore its config.json, or start a new run (python main.py "
            f"--help lists the flags)"), err
    assert files(tmp_path / 'r') == before


def test_values_an_older_vpt_accepted_still_resume(tiny_dataset, tmp_path, capsys):
    """Flags are checked for their kind, not today's range: runs recorded with --lr 0 or a negative --seed (accepted
    before those checks existed) still evaluate and resume."""
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'r' / 'config.json').read_text())
    (tmp_path / 'r' / 'config.json').write_text(json.dumps(dict(config, lr=0, seed=-1, epoch=1.0, batch_size=8.0)))
    code, out, err = run_main(['--resume', tmp_path / 'r', '--eval_only'], capsys)
    assert code == 0 and 'test accuracy' in out, err
    code, out, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)  # 8.0 is the count 8
    assert code == 0 and len(read_metrics(tmp_path / 'r')) == 2, err


@pytest.mark.parametrize('dropout, prompts', [(0.2, 4), (0.0, 4), (0.2, 0)])
def test_a_resume_in_another_number_of_processes_says_what_stays_exact(tiny_dataset, tmp_path, capsys, monkeypatch,
                                                                      dropout, prompts):
    """Data order is the same under any number of processes; prompt-dropout masks are drawn per process."""
    stopped_run(tiny_run(tiny_dataset, tmp_path, 'r', '--prompt_dropout', dropout, '--prompts', prompts, epochs=2), 1,
                capsys, monkeypatch)
    config = json.loads((tmp_path / 'r' / 'config.json').read_text())
    (tmp_path / 'r' / 'config.json').write_text(json.dumps(dict(config, world_size=2)))  # as a 2-process torchrun
    code, _, err = run_main(['--resume', tmp_path / 'r'], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith('note:')]
    assert notes == ([f"note: {tmp_path / 'r'} ran in 2 process(es), now in 1: the data order is the same, but each "
                      f"process draws its own prompt-dropout masks, so the run goes on as it could have, not bit for "
                      f"bit as it would have"] if dropout and prompts else [])
    assert 'warning: --prompt_dropout' not in err  # said when the run was made, not again on each resume


def test_a_checkpoint_of_another_shape_is_one_line(tiny_dataset, tmp_path, capsys):
    """trainable.safetensors from another model (or a config.json whose --model was edited): torch's size-mismatch
    RuntimeError came out as a traceback from --resume, --eval_only and --predict alike."""
    from safetensors.torch import save_file
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    path = tmp_path / 'r' / 'trainable.safetensors'
    with safe_open(str(path), 'pt') as f:
        metadata = f.metadata()
    tensors = load_file(path)
    shape = tuple(tensors['prompts.tokens'].shape)
    tensors['prompts.tokens'] = torch.zeros(shape[0], shape[1] + 3, shape[2])
    save_file(tensors, path, metadata=metadata)
    before = files(tmp_path / 'r')
    for action in (['--epoch', 2], ['--eval_only'], ['--predict', os.path.join(tiny_dataset, 'test')]):
        code, out, err = run_main(['--resume', tmp_path / 'r', *action], capsys)
        assert code == 1 and err.strip().splitlines() == [
            f"error: {path} does not match this run's model (prompts.tokens {(shape[0], shape[1] + 3, shape[2])} where "
            f"the model has {shape}): the file comes from another run, or the run's config.json was edited"], \
            (action, err)
    assert files(tmp_path / 'r') == before


def test_eval_and_predict_take_another_batch_size(tiny_dataset, tmp_path, capsys):
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    code, out, err = run_main(['--resume', tmp_path / 'r', '--eval_only', '--batch_size', 5], capsys)
    assert code == 0, err
    assert f"test accuracy {read_metrics(tmp_path / 'r')[0]['test_acc']}%" in out  # the same number in other batches
    code, out, err = run_main(['--resume', tmp_path / 'r', '--eval_only', '--batch_size', 1000], capsys)  # > 48 train
    assert code == 0 and f"test accuracy {read_metrics(tmp_path / 'r')[0]['test_acc']}%" in out, err
    code, out, err = run_main(['--resume', tmp_path / 'r', '--predict', os.path.join(tiny_dataset, 'test'),
                               '--batch_size', 1000], capsys)
    assert code == 0 and '18 images classified' in out, err
    code, _, err = run_main(['--resume', tmp_path / 'r', '--batch_size', 5, '--epoch', 2], capsys)  # training: no
    assert code == 2 and '--batch_size 5 contradicts' in err


def test_log_dir_and_name_that_locate_the_run_are_no_contradiction(tiny_dataset, tmp_path, capsys, monkeypatch):
    """--log_dir ./logs for a run made with --log_dir logs, or the folder a run was moved to, and --name as the run's
    folder is called: they name the run being resumed, so they are accepted; another place is refused. --eval_only
    and --predict say that they take the run as it was trained, not how to resume it."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(tiny_run(tiny_dataset, 'logs', 'r'), capsys)
    assert code == 0, err
    code, out, err = run_main(['--resume', 'logs/r', '--eval_only', '--log_dir', './logs', '--name', 'r'], capsys)
    assert code == 0, err
    shutil.move('logs', 'moved')
    os.rename('moved/r', 'moved/r2')
    code, _, err = run_main(['--resume', 'moved/r2', '--log_dir', tmp_path / 'moved', '--name', 'r2', '--epoch', 2],
                            capsys)
    assert code == 0 and len(read_metrics('moved/r2')) == 2, err
    config = json.loads((tmp_path / 'moved' / 'r2' / 'config.json').read_text())
    assert (config['log_dir'], config['name']) == ('logs', 'r')  # as it was made
    code, _, err = run_main(['--resume', 'moved/r2', '--log_dir', 'elsewhere', '--epoch', 3], capsys)
    assert code == 2 and "drop --log_dir to resume moved/r2, or start a new run" in err, err
    for action in (['--eval_only'], ['--predict', os.path.join(tiny_dataset, 'test')]):
        code, _, err = run_main(['--resume', 'moved/r2', '--test_samples', 5, *action], capsys)
        assert code == 2 and (f"--test_samples 5 contradicts the run's config (test_samples=0); drop --test_samples: "
                              f"{action[0]} takes the run as it was trained (") in err, err


def test_a_run_directory_typed_with_a_trailing_slash_is_named_without_it(tiny_dataset, tmp_path, capsys):
    """Tab completion types logs/r/: what the run prints and records names it logs/r, as it was made."""
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    code, out, err = run_main(['--resume', f"{tmp_path / 'r'}/", '--eval_only'], capsys)
    assert code == 0 and f"{tmp_path / 'r'} (last, epoch 1): test accuracy" in out, err


def test_run_with_relative_paths_resumes_from_anywhere(tiny_dataset, tmp_path, capsys, monkeypatch):
    import shutil
    shutil.copytree(tiny_dataset, tmp_path / 'project' / 'data')
    monkeypatch.chdir(tmp_path / 'project')
    code, _, err = run_main(tiny_run('data', 'logs', 'r'), capsys)
    assert code == 0, err
    run_dir = tmp_path / 'project' / 'logs' / 'r'
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['dataset'] == str(tmp_path / 'project' / 'data')
    assert config['data_dir'] == str(tmp_path / 'project' / 'data')  # the default ./data, where CIFAR would be
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(['--resume', run_dir, '--eval_only'], capsys)
    assert code == 0 and 'test accuracy' in out, err
    code, out, err = run_main(['--resume', run_dir, '--epoch', 2, '--dataset', 'project/data'], capsys)  # same folder
    assert code == 0 and len(read_metrics(run_dir)) == 2, err


def test_a_relative_weights_path_is_recorded_absolute_and_resumes_from_anywhere(tiny_dataset, tmp_path, capsys,
                                                                                monkeypatch):
    """As with --dataset: a --weights file named relative to where the run started is found from anywhere later."""
    import timm
    torch.manual_seed(0)
    os.makedirs(tmp_path / 'project')
    torch.save(timm.create_model('test_vit', num_classes=5).state_dict(), tmp_path / 'project' / 'w.pth')
    monkeypatch.chdir(tmp_path / 'project')
    run = [arg for arg in tiny_run(tiny_dataset, 'logs', 'r') if arg not in ('--pretrained', 'False')]
    code, _, err = run_main([*run, '--weights', 'w.pth'], capsys)
    assert code == 0, err
    run_dir = tmp_path / 'project' / 'logs' / 'r'
    assert json.loads((run_dir / 'config.json').read_text())['weights'] == str(tmp_path / 'project' / 'w.pth')
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(['--resume', run_dir, '--eval_only'], capsys)
    assert code == 0 and f"test accuracy {read_metrics(run_dir)[0]['test_acc']}%" in out, err


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize('module, step', [('main', 'parse_args'), ('model', 'check_model_args'),
                                          ('main', 'provenance'), ('train', 'make_optimizer')])
def test_a_signal_before_training_is_one_line_and_leaves_no_directory(tiny_dataset, tmp_path, capsys, monkeypatch,
                                                                      module, step, signum):
    def interrupted(*args, **kwargs):
        if signal.getsignal(signum) in (signal.SIG_DFL, previous) and signum == signal.SIGTERM:
            raise AssertionError("SIGTERM has its default action here: it would kill the process (and pytest)")
        os.kill(os.getpid(), signum)  # Ctrl-C or a scheduler's SIGTERM while torch loads, config.json is written, fit starts
        time.sleep(5)  # the handler runs at once; reaching the end of this would fail the test
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(__import__(module), step, interrupted)
    # SIGINT ignored, as a shell script's background job inherits it: main.py still stops, as it does in training
    int_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code, _, err = run_main(tiny_run(tiny_dataset, tmp_path / 'logs', 'r'), capsys)
        assert code == 128 + signum and err.strip() == f'{signal.Signals(signum).name}: stopped'
        assert list((tmp_path / 'logs').glob('*')) == []  # no config.json-only directory that --resume would refuse
        assert signal.getsignal(signal.SIGTERM) is previous  # main() gives the handlers back
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        code, _, err = run_main(tiny_run(tiny_dataset, tmp_path / 'logs', 'r'), capsys)  # the name is free again
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main(): the user gets a traceback")
    finally:
        signal.signal(signal.SIGINT, int_handler)
    assert code == 128 + signum


def test_a_signal_before_training_is_said_by_the_first_process_of_a_machine_only(tiny_dataset, tmp_path, capsys,
                                                                                  monkeypatch):
    """torchrun passes Ctrl-C to every process: 'SIGINT: stopped' came once per process."""
    import main

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    monkeypatch.setattr(main, 'provenance', interrupted)
    for local_rank, said in (('1', ''), ('0', 'SIGINT: stopped')):
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        code, _, err = run_main(tiny_run(tiny_dataset, tmp_path / 'logs', 'r'), capsys)
        assert code == 130 and err.strip() == said


def test_a_keyboard_interrupt_without_a_signal_number_is_said_as_sigint(tiny_dataset, tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt raised by Python or a library (not main.py's handler, which passes the signal) is Ctrl-C."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, 'provenance', interrupted)
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path / 'logs', 'r'), capsys)
    assert code == 130 and err.strip() == 'SIGINT: stopped'
    assert list((tmp_path / 'logs').glob('*')) == []


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_main_imports_its_modules_is_one_line(tiny_dataset, tmp_path, signum):
    """Ctrl-C or SIGTERM in the tenth of a second main.py spends importing argparse and the rest, before main() sets
    its handlers: a KeyboardInterrupt traceback, or a kill without a word (found by a fuzz). Sent as argparse, main.py's
    first import after its handlers are set, is looked up."""
    result = signal_on_import('main.py', tiny_run(tiny_dataset, tmp_path / 'logs', 'r'), signum, 'argparse')
    assert result.returncode == 128 + signum and result.stderr.strip() == f'{signal.Signals(signum).name}: stopped'
    assert not os.path.exists(tmp_path / 'logs')


def test_a_signal_while_main_imports_is_said_by_the_first_process_only(tiny_dataset, tmp_path, monkeypatch):
    """torchrun signals every process: as say_once, only the first on each machine says it stopped."""
    monkeypatch.setenv('LOCAL_RANK', '1')
    result = signal_on_import('main.py', tiny_run(tiny_dataset, tmp_path / 'logs', 'r'), signal.SIGTERM, 'argparse')
    assert result.returncode == 128 + signal.SIGTERM and result.stderr == ''


def test_a_second_signal_while_main_says_it_stopped_during_its_imports_is_one_line(tiny_dataset, tmp_path):
    """sweep.py passes a terminal's Ctrl-C on to a trial the terminal signalled too: the second arrives as the first's
    line is written, and must not write it again."""
    result = signal_on_import('main.py', tiny_run(tiny_dataset, tmp_path / 'logs', 'r'), signal.SIGINT, 'argparse',
                              again=True)
    assert result.returncode == 128 + signal.SIGINT and result.stderr.strip() == 'SIGINT: stopped', result.stderr


def test_a_second_signal_while_main_says_it_stopped_is_one_line(tiny_dataset, tmp_path, monkeypatch):
    """As above, once main() has taken the signals over: the second arrived as the line was written, a
    KeyboardInterrupt traceback."""
    import io

    class SignalAgain(io.StringIO):
        def write(self, text):
            super().write(text)
            if text.strip() == 'SIGINT: stopped':  # once: pytest's own handler is back after main()
                os.kill(os.getpid(), signal.SIGINT)
            return len(text)
    monkeypatch.setattr(main, 'check_log_dir', lambda args: os.kill(os.getpid(), signal.SIGINT))  # the first
    monkeypatch.setattr(sys, 'stderr', SignalAgain())
    try:
        with pytest.raises(SystemExit) as stopped:
            main.main(tiny_run(tiny_dataset, tmp_path, 'r'))
    except KeyboardInterrupt:
        pytest.fail('the second SIGINT broke into the first one\'s exit')
    assert stopped.value.code == 128 + signal.SIGINT and sys.stderr.getvalue() == '\nSIGINT: stopped\n'


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_whose_exception_c_code_swallows_while_torch_loads_still_stops(tiny_dataset, tmp_path, signum):
    """Ctrl-C or SIGTERM as an extension module imports another while torch, timm and torchvision load (triton's
    rocm_sdk, ElementTree's pyexpat): that C code clears the KeyboardInterrupt main.py's handler raised, and the run
    trained to the end and exited 0 without a word (found by an import-hook fuzz). Swallowed here as timm is looked
    up, the first of them."""
    result = signal_on_import('main.py', tiny_run(tiny_dataset, tmp_path / 'logs', 'r'), signum, 'timm', swallowed=True)
    assert result.returncode == 128 + signum and result.stderr.strip() == f'{signal.Signals(signum).name}: stopped'
    assert not os.path.exists(tmp_path / 'logs')


def test_a_signal_swallowed_after_the_imports_stops_before_training(tiny_dataset, tmp_path, capsys, monkeypatch):
    """As above, where C code swallows the exception later (a module loaded with the data or the model): the run
    stops before training, with its one line, and leaves no directory."""
    build_model = main.build_model

    def swallowed(*args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        return build_model(*args)
    monkeypatch.setattr(main, 'build_model', swallowed)
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path / 'logs', 'r'), capsys)
    assert code == 143 and err.strip() == 'SIGTERM: stopped'
    assert list((tmp_path / 'logs').glob('*')) == []


def test_a_second_signal_while_a_stopped_run_exits_changes_nothing(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Ctrl-C stops training at its next step; a second signal as the process winds down (torchrun passes the
    terminal's Ctrl-C on, then may send SIGTERM; a user presses Ctrl-C again) met main()'s start-up handler again,
    which training had given back: a second line, 'SIGTERM: stopped', and exit 143 for the run stopped by SIGINT."""
    import train
    evaluate_split, close_distributed = train.evaluate_split, train.close_distributed

    def evaluate_then_signal(model, split, *args):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate_split(model, split, *args)

    def close_then_signal():
        os.kill(os.getpid(), signal.SIGTERM)
        return close_distributed()
    monkeypatch.setattr(train, 'evaluate_split', evaluate_then_signal)
    monkeypatch.setattr(train, 'close_distributed', close_then_signal)
    int_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # main() sets its own, and gives this one back
    try:
        code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r', epochs=3), capsys)
    finally:
        signal.signal(signal.SIGINT, int_handler)
    assert code == 130 and err.strip().splitlines() == [
        f"SIGINT: stopped; {tmp_path / 'r'} keeps the checkpoint and metrics of epoch 1. Resume with:",
        f"  python main.py --resume {tmp_path / 'r'}"], err


@pytest.mark.parametrize('resumed', [False, True])
def test_signal_as_a_run_is_set_up_keeps_its_checkpoint_and_says_how_to_resume(tiny_dataset, tmp_path, capsys,
                                                                               monkeypatch, resumed):
    """A signal after a new run's epoch-0 checkpoint is written, or as a resume writes its summary.json and sets aside
    a finished run's confusion.csv, and before the first step (opening TensorBoard, compiling, wrapping in DDP): the
    files are written whole, the run stops before training with the resume command, and the resume trains it. It
    used to stop with 'SIGINT: stopped' alone, the run directory left with its checkpoint and no word of it."""
    import train
    run_dir = tmp_path / 'r'
    if resumed:
        code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
        assert code == 0, err
    # the signal comes as epoch 0's checkpoint, or the resume's set-aside of confusion.csv, is about to be written
    name = 'keep_as_epoch' if resumed else 'save_checkpoint'
    original = getattr(train, name)

    def signal_then_write(*args):
        if resumed or args[6] == 0:  # save_checkpoint(run_dir, model, optimizer, scheduler, scaler, generator, epoch
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)
    monkeypatch.setattr(train, name, signal_then_write)
    argv = ['--resume', run_dir, '--epoch', 2] if resumed else tiny_run(tiny_dataset, tmp_path, 'r')
    code, _, err = run_main(argv, capsys)
    done = 1 if resumed else 0
    assert code == 130 and err.strip().splitlines() == [
        f"SIGINT: stopped; {run_dir} keeps the checkpoint and metrics of epoch {done}. Resume with:",
        f"  python main.py --resume {run_dir}"], err
    assert torch.load(run_dir / 'state.pt', weights_only=False)['epoch'] == done
    assert (run_dir / 'confusion_epoch1.csv').exists() == resumed and not (run_dir / 'confusion.csv').exists()
    monkeypatch.undo()
    code, _, err = run_main(['--resume', run_dir], capsys)
    assert code == 0, err
    assert json.loads((run_dir / 'summary.json').read_text())['finished'] is True


def test_signal_during_the_last_evaluation_finishes_the_run(tiny_dataset, tmp_path, capsys, monkeypatch):
    import train
    evaluate_split = train.evaluate_split

    def evaluate_then_signal(model, split, *args):
        os.kill(os.getpid(), signal.SIGINT)  # caught by the training loop's handler: a stop is requested
        return evaluate_split(model, split, *args)
    monkeypatch.setattr(train, 'evaluate_split', evaluate_then_signal)
    code, out, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    assert err.strip().splitlines()[-1] == f"SIGINT came after the last epoch was saved: {tmp_path / 'r'} is finished"
    assert json.loads((tmp_path / 'r' / 'summary.json').read_text())['finished'] is True


def test_signal_after_the_last_epoch_finishes_the_run(tiny_dataset, tmp_path, capsys, monkeypatch):
    """After training, as the process group closes or the interpreter shuts down (torch's takes a while), a signal
    leaves a finished run's exit status 0: a script that checks it must not resume a run that is done."""
    import train
    close_distributed = train.close_distributed

    def signal_then_close():
        os.kill(os.getpid(), signal.SIGINT)
        close_distributed()
    monkeypatch.setattr(train, 'close_distributed', signal_then_close)
    before = signal.getsignal(signal.SIGINT)
    code, out, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0 and 'stopped' not in err, err
    assert json.loads((tmp_path / 'r' / 'summary.json').read_text())['finished'] is True
    assert signal.getsignal(signal.SIGINT) is before  # main() gives its caller's handler back

    summarize, calls = train.summarize, []

    def summarize_then_signal(history, *args):  # its second call for the whole history: the summary after the loop
        calls.append(len(history))
        if calls.count(1) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return summarize(history, *args)
    monkeypatch.setattr(train, 'summarize', summarize_then_signal)
    code, out, err = run_main(tiny_run(tiny_dataset, tmp_path, 'q', '--val_split', 0.25), capsys)
    assert code == 0 and calls.count(1) == 2 and 'stopped' not in err, err
    assert 'best val epoch 1: ' in out
    monkeypatch.setattr(train, 'summarize', summarize)

    fit = train.fit

    def fit_then_signal(*args):  # as fit returns: its StopRequest had put back main()'s handler, which raised
        fit(*args)
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train, 'fit', fit_then_signal)
    code, out, err = run_main(tiny_run(tiny_dataset, tmp_path, 'p'), capsys)
    assert code == 0 and 'stopped' not in err, err

    # and in an exit handler of a library, here a slow one: the process ends at once, with the run's exit status
    late = ("import atexit, os, runpy, signal, sys, time; sys.path.insert(0, sys.argv[1])\n"
            "sys.argv = sys.argv[1:]; sys.argv[0] = os.path.join(sys.argv[0], 'main.py')\n"
            "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"  # main.py's exit handler runs last
            "finally: atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(120)))")
    for argv, status in ((tiny_run(tiny_dataset, tmp_path, 's'), 0), (['--resume', tmp_path / 'nowhere'], 2)):
        done = subprocess.run([sys.executable, '-c', late, REPO, *map(str, argv)], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=100)
        assert done.returncode == status and 'KeyboardInterrupt' not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().startswith('main.py: error: --resume')  # said before the signal


def test_a_signal_as_a_finished_run_exits_leaves_its_status_0(tiny_dataset, tmp_path):
    """Python's shutdown frees torch's modules (0.8 s on a CPU) with SIGINT back at its default action: a Ctrl-C
    sent 0.05-0.4 s after the run's last line killed it (status -2), and a script took the run for stopped."""
    def signal_after_the_last_line(process, delay):
        for line in process.stdout:
            if line.startswith('final test acc'):  # the run's last line: it is saved
                time.sleep(delay)
                process.send_signal(signal.SIGINT)
                break

    # the three runs at once, each with its own watcher: one-thread processes, one after another, left a core idle
    processes = {delay: subprocess.Popen([sys.executable, os.path.join(REPO, 'main.py'),
                                          *map(str, tiny_run(tiny_dataset, tmp_path, f'{delay}'))],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1'))
                 for delay in (0, 0.05, 0.2)}
    watchers = [threading.Thread(target=signal_after_the_last_line, args=(process, delay))
                for delay, process in processes.items()]
    for watcher in watchers:
        watcher.start()
    for watcher in watchers:
        watcher.join(timeout=100)
    for delay, process in processes.items():
        out, err = process.communicate(timeout=100)
        assert process.returncode == 0, (delay, process.returncode, err[-2000:])


def test_a_resume_removes_the_files_of_the_checkpoints_it_replaces(tiny_dataset, tmp_path, capsys, monkeypatch):
    """--eval_only's confusion_best.csv, test_predictions_best.csv and per_class_acc_best describe best.safetensors:
    they stay while its epoch stays the best and go when a resumed run saves a better one; confusion.csv of a finished
    run (with plot.py's figure of it and test_predictions.csv) becomes confusion_epoch<N> once a resume trains past
    that epoch, and both come back with the new last epoch."""
    import train
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r', '--val_split', 0.25), capsys)
    assert code == 0, err
    code, _, err = run_main(['--resume', run_dir, '--eval_only'], capsys)
    assert code == 0, err
    final, per_image = (run_dir / 'confusion.csv').read_bytes(), (run_dir / 'test_predictions.csv').read_bytes()
    (run_dir / 'confusion.png').write_bytes(b'as plot.py --confusion draws it')
    code, _, err = run_main(['--resume', run_dir, '--eval_only', '--checkpoint', 'best'], capsys)
    assert code == 0 and (run_dir / 'confusion_best.csv').exists() and (run_dir / 'confusion.csv').exists(), err
    best_view = json.loads((run_dir / 'summary.json').read_text())['per_class_acc_best']

    evaluate_split = train.evaluate_split

    def stop_in_epoch_2(model, split, *args):
        if len(read_metrics(run_dir)) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the loop stops once epoch 2 is saved
        return evaluate_split(model, split, *args)
    monkeypatch.setattr(train, 'evaluate_split', stop_in_epoch_2)
    monkeypatch.setattr(train, 'best_val_epoch', lambda history: 1)  # epoch 2 is no better than epoch 1
    code, _, err = run_main(['--resume', run_dir, '--epoch', 3], capsys)
    assert code == 130 and len(read_metrics(run_dir)) == 2, err
    assert (run_dir / 'confusion_best.csv').exists() and (run_dir / 'test_predictions_best.csv').exists()
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['per_class_acc_best'] == best_view
    assert 'per_class_acc' not in summary  # the per-class view of a finished run's last epoch: this one is unfinished
    assert not (run_dir / 'confusion.csv').exists()  # epoch 1's matrix: no longer the run's last epoch
    assert (run_dir / 'confusion_epoch1.csv').read_bytes() == final
    assert (run_dir / 'confusion_epoch1.png').read_bytes() == b'as plot.py --confusion draws it'
    assert not (run_dir / 'confusion.png').exists()
    assert (run_dir / 'test_predictions_epoch1.csv').read_bytes() == per_image
    assert not (run_dir / 'test_predictions.csv').exists()

    monkeypatch.setattr(train, 'evaluate_split', evaluate_split)
    monkeypatch.setattr(train, 'best_val_epoch', lambda history: len(history))  # epoch 3 is the new best
    code, _, err = run_main(['--resume', run_dir, '--epoch', 3], capsys)
    assert code == 0, err
    assert not (run_dir / 'confusion_best.csv').exists() and not (run_dir / 'test_predictions_best.csv').exists()
    assert 'per_class_acc_best' not in json.loads((run_dir / 'summary.json').read_text())
    assert (run_dir / 'confusion.csv').exists()
    with open(run_dir / 'test_predictions.csv') as f:  # the new last epoch's, as the run finishes again
        assert {(row['checkpoint'], row['epoch']) for row in csv.DictReader(f)} == {('last', '3')}


def test_a_better_epoch_removes_the_figure_of_the_former_best_too(tiny_dataset, tmp_path, capsys, monkeypatch):
    """plot.py --confusion draws confusion_best.csv into confusion_best.png, titled with summary.json's best val
    epoch: once a resume saves a better epoch, the figure of the former best goes with its matrix."""
    import train
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r', '--val_split', 0.25), capsys)
    assert code == 0, err
    code, _, err = run_main(['--resume', run_dir, '--eval_only', '--checkpoint', 'best'], capsys)
    assert code == 0 and (run_dir / 'confusion_best.csv').exists(), err
    (run_dir / 'confusion_best.png').write_bytes(b'as plot.py --confusion draws it')
    (run_dir / 'mistakes_best.png').write_bytes(b'as plot.py --mistakes draws it')
    monkeypatch.setattr(train, 'best_val_epoch', lambda history: len(history))  # epoch 2 is the new best
    code, _, err = run_main(['--resume', run_dir, '--epoch', 2], capsys)
    assert code == 0, err
    assert not (run_dir / 'confusion_best.csv').exists() and not (run_dir / 'confusion_best.png').exists()
    assert not (run_dir / 'mistakes_best.png').exists()  # drawn from test_predictions_best.csv, gone with it


def test_one_more_epoch_sets_the_former_result_aside_too(tiny_dataset, tmp_path, capsys):
    """--epoch N+1 trains a single epoch that is also the new last one: the former confusion.csv and its figure are
    kept as confusion_epoch<N>, not overwritten (csv) or left beside the new result (png)."""
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    former = (run_dir / 'confusion.csv').read_bytes()
    (run_dir / 'confusion.png').write_bytes(b'as plot.py --confusion draws it')
    (run_dir / 'mistakes.png').write_bytes(b'as plot.py --mistakes draws it')
    code, _, err = run_main(['--resume', run_dir, '--epoch', 2, '--amp', False], capsys)
    assert code == 0, err
    assert (run_dir / 'confusion_epoch1.csv').read_bytes() == former
    assert (run_dir / 'confusion_epoch1.png').read_bytes() == b'as plot.py --confusion draws it'
    assert (run_dir / 'confusion.csv').exists() and not (run_dir / 'confusion.png').exists()
    # test_predictions.csv is epoch 2's now: epoch 1's mistakes figure goes beside test_predictions_epoch1.csv
    assert (run_dir / 'mistakes_epoch1.png').read_bytes() == b'as plot.py --mistakes draws it'
    assert not (run_dir / 'mistakes.png').exists()
    (resume,) = json.loads((run_dir / 'config.json').read_text())['resumed']
    assert (resume['from_epoch'], resume['epoch_before']) == (1, 1)  # the lr schedule was re-laid from epoch 2 on
    assert resume['amp_before'] is True  # and --amp changed (on CUDA, the precision of the epochs from here on)


def test_a_resumed_run_keeps_its_first_command_and_commit_and_lists_every_resume(tiny_dataset, tmp_path, capsys,
                                                                                monkeypatch):
    """config.json's command and git_commit stay those that made the run; each resume adds its own command, commit,
    from_epoch and (--epoch changed) epoch_before to 'resumed', after the earlier resumes."""
    import shlex
    run_dir = tmp_path / 'r'
    monkeypatch.setattr(main, 'git_commit', lambda: 'a' * 40)
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    first = json.loads((run_dir / 'config.json').read_text())
    for epoch, commit in ((2, 'b' * 40), (3, 'c' * 40)):
        monkeypatch.setattr(main, 'git_commit', lambda commit=commit: commit)
        code, _, err = run_main(['--resume', run_dir, '--epoch', epoch], capsys)
        assert code == 0, err
    config = json.loads((run_dir / 'config.json').read_text())
    assert (config['command'], config['git_commit']) == (first['command'], 'a' * 40) and config['epoch'] == 3
    assert [(entry['git_commit'], entry['from_epoch'], entry['epoch_before']) for entry in config['resumed']] == [
        ('b' * 40, 1, 1), ('c' * 40, 2, 2)]
    assert [entry['command'].endswith(' ' + shlex.join(['--resume', str(run_dir), '--epoch', str(epoch)]))
            for entry, epoch in zip(config['resumed'], (2, 3))] == [True, True]


def test_a_resume_records_its_machine_and_says_when_cpu_threads_change(tiny_dataset, tmp_path, capsys, monkeypatch):
    """CPU kernels add up in an order that depends on torch's thread count, so a run's numbers depend on it:
    config.json keeps the first process's device, threads and versions, each resume adds its own to 'resumed', and a
    CPU resume with another thread count than the last process says it goes on equal only to rounding."""
    import PIL
    threads = torch.get_num_threads()
    run_dir = tmp_path / 'r'
    note = (f"note: {run_dir} trained on the CPU with 1 thread, now 2: CPU kernels add up in another order, so the "
            f"run goes on equal to rounding, not bit for bit; OMP_NUM_THREADS=1 before the command continues it "
            f"exactly")
    try:
        torch.set_num_threads(1)
        code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
        assert code == 0, err
        first = json.loads((run_dir / 'config.json').read_text())
        assert first['cpu_threads'] == 1 and first['device_name'].startswith('cpu')
        torch.set_num_threads(2)
        monkeypatch.setattr(PIL, '__version__', '0.1')  # another Pillow decodes and resizes the images its own way
        code, _, err = run_main(['--resume', run_dir, '--epoch', 2], capsys)
        assert code == 0 and [line for line in err.splitlines() if line.startswith('note:')] == [note], err
        code, _, err = run_main(['--resume', run_dir, '--epoch', 3], capsys)  # the last process had 2 threads too
        assert code == 0 and 'note:' not in err, err
    finally:
        torch.set_num_threads(threads)
    config = json.loads((run_dir / 'config.json').read_text())
    assert {key: config[key] for key in main.MACHINE} == {key: first[key] for key in main.MACHINE}
    assert [entry['cpu_threads'] for entry in config['resumed']] == [2, 2]
    assert all(entry['device_name'] == first['device_name'] and entry['torch_version'] == torch.__version__
               for entry in config['resumed'])
    assert config['pillow_version'] == first['pillow_version'] != '0.1'
    assert [entry['pillow_version'] for entry in config['resumed']] == ['0.1', '0.1']

    for key in main.MACHINE:  # a run an older vpt made: its machine is not known, nothing to compare
        del config[key]
    del config['resumed']
    (run_dir / 'config.json').write_text(json.dumps(config))
    code, _, err = run_main(['--resume', run_dir, '--epoch', 4], capsys)
    assert code == 0 and 'note:' not in err, err
    config = json.loads((run_dir / 'config.json').read_text())
    assert [config[key] for key in main.MACHINE] == [None] * len(main.MACHINE)
    assert config['resumed'][0]['cpu_threads'] == torch.get_num_threads()


def test_a_cpu_run_that_recorded_no_thread_count_gets_no_thread_note(capsys):
    """A run whose config.json names its CPU but not its thread count (as a vpt before cpu_threads recorded it): there
    is nothing to compare, so no note ('trained on the CPU with None threads')."""
    import argparse
    machine = dict(device_name='cpu (x86_64)', cpu_threads=2, torch_version='2', timm_version='1', pillow_version='12',
                   cuda_version=None,
                   cudnn_version=None, amp_dtype=None)
    config = dict(machine, command='python main.py --resume r', git_commit='b' * 40, world_size=1, epoch=2)
    previous = dict(machine, cpu_threads=None, command='python main.py', git_commit='a' * 40, world_size=1, epoch=1)
    args = argparse.Namespace(resume='r', epoch=2, amp=True, prompt_dropout=0.0, prompts=4)
    merged = main.resumed_config(config, previous, args, 1)
    assert capsys.readouterr().err == ''
    assert merged['cpu_threads'] is None and merged['resumed'][-1]['cpu_threads'] == 2
    main.resumed_config(config, dict(previous, cpu_threads=1), args, 1)  # a known other count is said
    assert capsys.readouterr().err.startswith('note: r trained on the CPU with 1 thread, now 2: ')


def test_eval_only_beside_the_training_keeps_its_per_class_view(tiny_dataset, tmp_path, capsys, monkeypatch):
    """--eval_only --checkpoint best takes no lock: run beside the training, the next epoch's summary.json dropped
    its per_class_acc_best while confusion_best.csv stayed."""
    import train
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r', '--val_split', 0.25), capsys)
    assert code == 0, err
    evaluate_split = train.evaluate_split

    def eval_only_meanwhile(model, split, *args):
        summary = json.loads((run_dir / 'summary.json').read_text())
        (run_dir / 'summary.json').write_text(json.dumps(dict(summary, per_class_acc_best={'cat': 50.0})))
        return evaluate_split(model, split, *args)
    monkeypatch.setattr(train, 'evaluate_split', eval_only_meanwhile)
    monkeypatch.setattr(train, 'best_val_epoch', lambda history: 1)  # epoch 2 is no better
    code, _, err = run_main(['--resume', run_dir, '--epoch', 2], capsys)
    assert code == 0, err
    assert json.loads((run_dir / 'summary.json').read_text())['per_class_acc_best'] == {'cat': 50.0}


def test_a_resume_to_more_epochs_makes_the_run_unfinished_at_once(tiny_dataset, tmp_path, capsys, monkeypatch):
    """config.json plans the new --epoch from the start of the resume: summary.json (what plot.py and sweep.py read)
    must not go on calling the run finished when the resume stops before its first new epoch."""
    import data
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0 and json.loads((tmp_path / 'r' / 'summary.json').read_text())['finished'] is True, err
    train_batches = data.train_batches

    def stop_at_once(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the loop stops at its first step, before epoch 2 is done
        return train_batches(*args, **kwargs)
    monkeypatch.setattr(data, 'train_batches', stop_at_once)
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 3], capsys)
    assert code == 130 and len(read_metrics(tmp_path / 'r')) == 1, err
    summary = json.loads((tmp_path / 'r' / 'summary.json').read_text())
    assert (summary['finished'], summary['epochs_done'], summary['epochs']) == (False, 1, 3)


def test_a_run_stopped_in_its_first_epoch_resumes_from_epoch_0(tiny_dataset, tmp_path, capsys, monkeypatch):
    """The checkpoint of epoch 0, written before the first step, is what the stop message offers to resume."""
    import data
    train_batches = data.train_batches

    def stop_at_once(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the loop stops at its first step
        return train_batches(*args, **kwargs)
    monkeypatch.setattr(data, 'train_batches', stop_at_once)
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 130 and f"{tmp_path / 'r'} keeps the checkpoint and metrics of epoch 0. Resume with:" in err, err
    assert read_metrics(tmp_path / 'r') == []
    assert json.loads((tmp_path / 'r' / 'summary.json').read_text())['epochs_done'] == 0
    monkeypatch.setattr(data, 'train_batches', train_batches)
    code, _, err = run_main(['--resume', tmp_path / 'r'], capsys)
    assert code == 0 and len(read_metrics(tmp_path / 'r')) == 1, err


def fill_the_disk_at_epoch_2(monkeypatch):
    """os.fsync fails with ENOSPC on the third state.pt written (epochs 0 and 1 fit); -> the real os.fsync."""
    import errno
    fsync, state_writes = os.fsync, []

    def disk_full_at_epoch_2(descriptor):
        if 'state.pt.tmp' in os.readlink(f'/proc/self/fd/{descriptor}'):
            state_writes.append(descriptor)
            if len(state_writes) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(descriptor)
    monkeypatch.setattr(os, 'fsync', disk_full_at_epoch_2)
    return fsync


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(tiny_dataset, tmp_path, capsys, monkeypatch):
    """state.pt failing to fit on the disk used to leave trainable.safetensors of the new epoch beside state.pt of
    the old one, which --resume refuses, and a traceback. All of an epoch's files are written, then renamed."""
    fsync = fill_the_disk_at_epoch_2(monkeypatch)
    run_dir = tmp_path / 'my runs' / 'r'  # a space: the printed command quotes it
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path / 'my runs', 'r', '--val_split', 0.25, epochs=3), capsys)
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: cannot write {run_dir / 'state.pt'} (No space left on device); the files already there are "
        f"unchanged: free disk space or make {run_dir} writable, then resume it, from epoch 1: python main.py "
        f"--resume '{run_dir}'"), err
    assert not [name for name in os.listdir(run_dir) if '.tmp' in name]
    with safe_open(str(run_dir / 'trainable.safetensors'), 'pt') as f:
        assert f.metadata()['epoch'] == '1'
    monkeypatch.setattr(os, 'fsync', fsync)
    code, _, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and len(read_metrics(run_dir)) == 3, err


def test_a_full_disk_at_the_last_epoch_writes_none_of_its_results(tiny_dataset, tmp_path, capsys, monkeypatch):
    """confusion.csv and test_predictions.csv are the finished run's: saved with the last epoch's checkpoint, all or
    none. A disk that fills while that checkpoint is written leaves the run at epoch 1, with neither of them (a resume
    would set them aside as epoch 1's); the resume that finishes it writes both."""
    fsync = fill_the_disk_at_epoch_2(monkeypatch)
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r', epochs=2), capsys)
    assert code == 1 and 'No space left on device' in err and len(read_metrics(run_dir)) == 1, err
    assert [name for name in os.listdir(run_dir) if name.startswith(('confusion', 'test_predictions'))] == []
    monkeypatch.setattr(os, 'fsync', fsync)
    code, _, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and len(read_metrics(run_dir)) == 2, err
    with open(run_dir / 'test_predictions.csv') as f:
        assert {(row['checkpoint'], row['epoch']) for row in csv.DictReader(f)} == {('last', '2')}
    assert (run_dir / 'confusion.csv').is_file() and not (run_dir / 'test_predictions_epoch1.csv').exists()


def killed_at_rename(tmp_path, argv, name, count):
    """`python main.py ARGV` killed (os._exit(137), as kill -9 or the out-of-memory killer) as it is about to rename
    its temp file over `name` for the `count`th time -> CompletedProcess."""
    site = tmp_path / 'kill-site'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(
        f"import os\nreplace, seen = os.replace, []\n"
        f"def replace_or_die(src, dst):\n"
        f"    if os.path.basename(dst) == {name!r}:\n"
        f"        seen.append(dst)\n"
        f"        if len(seen) == {count}:\n"
        f"            os._exit(137)\n"
        f"    return replace(src, dst)\n"
        f"os.replace = replace_or_die\n")
    return subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *map(str, argv)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS='1'))


def test_a_run_killed_between_the_renames_of_a_save_resumes_as_if_it_had_not_been(tiny_dataset, tmp_path, capsys):
    """kill -9 after the last epoch's trainable.safetensors was renamed, before its confusion.csv, state.pt... were:
    the resume said 'start a new run' (trainable.safetensors newer than state.pt), losing every epoch. The save's
    other files wait whole in their temps: the resume renames them, and the run is the one never killed."""
    argv = ['--val_split', 0.25]
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'straight', *argv, epochs=2), capsys)
    assert code == 0, err
    killed = killed_at_rename(tmp_path, tiny_run(tiny_dataset, tmp_path, 'killed', *argv, epochs=2), 'confusion.csv', 1)
    assert killed.returncode == 137, killed.stderr
    run_dir = tmp_path / 'killed'
    with safe_open(str(run_dir / 'trainable.safetensors'), 'pt') as f:
        assert f.metadata()['epoch'] == '2' and torch.load(run_dir / 'state.pt', weights_only=False)['epoch'] == 1
    code, out, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and 'the save of epoch 2 was cut short' in err and 'has finished all 2 epochs' in out, err
    assert without_time(read_metrics(run_dir)) == without_time(read_metrics(tmp_path / 'straight'))
    assert not [name for name in os.listdir(run_dir) if '.tmp' in name]
    for name in ('trainable.safetensors', 'best.safetensors', 'confusion.csv', 'test_predictions.csv'):
        assert (run_dir / name).read_bytes() == (tmp_path / 'straight' / name).read_bytes(), name
    summary, expected = (json.loads((tmp_path / run / 'summary.json').read_text()) for run in ('killed', 'straight'))
    assert {**summary, 'total_time_s': 0, 'mean_epoch_time_s': 0} == {**expected, 'total_time_s': 0,
                                                                        'mean_epoch_time_s': 0}


def test_the_temps_of_a_save_killed_before_its_renames_are_removed_by_the_resume(tiny_dataset, tmp_path, capsys):
    """kill -9 as a save's temps were written, before its first rename: the temps (a full model's state.pt, hundreds
    of MB) stayed in the run directory for ever. The resume removes them and says so; the temps --eval_only and
    --predict write without the run's lock are not a save's, and stay."""
    run_dir = tmp_path / 'r'
    killed = killed_at_rename(tmp_path, tiny_run(tiny_dataset, tmp_path, 'r', epochs=2), 'trainable.safetensors', 3)
    assert killed.returncode == 137, killed.stderr
    left = sorted(name for name in os.listdir(run_dir) if '.tmp' in name)
    assert {name.rpartition('.tmp')[0] for name in left} >= {'trainable.safetensors', 'state.pt', 'metrics.csv'}
    others = ['confusion_epoch1.csv.tmp4242', 'predictions.csv.tmp4242']
    for name in others:
        (run_dir / name).write_text('another process is writing this')
    code, out, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and f"note: {run_dir}: removed {len(left)} temp files of saves a kill cut short " \
                         f"({', '.join(left)})" in err, err
    assert sorted(name for name in os.listdir(run_dir) if '.tmp' in name) == others
    assert [row['epoch'] for row in read_metrics(run_dir)] == ['1', '2']


def test_the_temps_of_every_file_a_save_writes_are_removed_and_no_other_file(tmp_path):
    """Each of the seven files a save writes may be left as a dead save's temp (best.safetensors, a full model's
    trainable tensors, only in an epoch with a new best); a file of another name, or the user's own copy named like a
    temp, is not a save's."""
    import train
    saved = ['best.safetensors', 'confusion.csv', 'metrics.csv', 'state.pt', 'summary.json', 'test_predictions.csv',
             'trainable.safetensors']
    others = ['confusion_epoch1.csv.tmp4242', 'summary.json.tmp-old', 'state.pt.tmp', 'notes.tmp7', 'metrics.csv']
    for name in [f'{name}.tmp123' for name in saved] + others:
        (tmp_path / name).write_text('x')
    assert train.remove_dead_save_temps(tmp_path) == [f'{name}.tmp123' for name in saved]
    assert sorted(os.listdir(tmp_path)) == sorted(others)


def test_a_save_cut_short_at_its_new_best_checkpoint_keeps_it(tiny_dataset, tmp_path, capsys):
    """kill -9 after an epoch's trainable.safetensors was renamed, before its new best.safetensors was: the resume
    finishes the save with it, rather than removing it as a dead save's temp (best.safetensors missing, --eval_only
    --checkpoint best refused)."""
    run_dir = tmp_path / 'r'
    killed = killed_at_rename(tmp_path, tiny_run(tiny_dataset, tmp_path, 'r', '--val_split', 0.25), 'best.safetensors',
                              1)
    assert killed.returncode == 137, killed.stderr
    assert any(name.startswith('best.safetensors.tmp') for name in os.listdir(run_dir))
    code, out, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and 'the save of epoch 1 was cut short' in err and 'has finished its 1 epoch;' in out, err
    assert not [name for name in os.listdir(run_dir) if '.tmp' in name]
    with safe_open(str(run_dir / 'best.safetensors'), 'pt') as f:
        assert f.metadata()['epoch'] == '1'


def test_a_resume_refused_for_a_damaged_state_keeps_the_temps_of_a_save_cut_short(tiny_dataset, tmp_path, capsys):
    """kill -9 between a save's renames, and state.pt then damaged (a disk error): the save's temps hold the run's one
    whole state.pt. The resume, refused, removed them as 'temp files of saves a kill cut short'; it now leaves them."""
    run_dir = tmp_path / 'r'
    killed = killed_at_rename(tmp_path, tiny_run(tiny_dataset, tmp_path, 'r', epochs=2), 'confusion.csv', 1)
    assert killed.returncode == 137, killed.stderr
    (run_dir / 'state.pt').write_bytes(b'damaged')
    before = files(run_dir)
    assert any(name.startswith('state.pt.tmp') for name in before)
    code, _, err = run_main(['--resume', run_dir], capsys)
    assert code == 1 and err.strip().splitlines()[-1].startswith(f"error: cannot read {run_dir / 'state.pt'}"), err
    assert 'removed' not in err and files(run_dir) == before


@pytest.fixture(scope='module')
def killed_before_its_first_checkpoint(tiny_dataset, tmp_path_factory):
    """A tiny run killed (kill -9) as it renamed its first state.pt -> (CompletedProcess, its directory): one main.py
    process for the tests that copy it. What main.py makes of the directory is its file names and its lock."""
    log_dir = tmp_path_factory.mktemp('killed')
    return killed_at_rename(log_dir, tiny_run(tiny_dataset, log_dir, 'r'), 'state.pt', 1), log_dir / 'r'


def run_killed_before_its_first_checkpoint(killed, log_dir):
    """A copy of that killed run as log_dir/r, as `python main.py ... --log_dir log_dir --name r` left it."""
    killed_process, killed_dir = killed
    assert killed_process.returncode == 137, killed_process.stderr
    shutil.copytree(killed_dir, log_dir / 'r')


def test_a_run_killed_before_its_first_checkpoint_says_how_to_start_it_again(tiny_dataset, tmp_path, capsys,
                                                                              killed_before_its_first_checkpoint):
    """kill -9 before a new run's first state.pt leaves its directory: --resume says there is no checkpoint, start a new
    run; the same command again said 'already exists; pick another --name, or continue it with --resume', back to
    where it began. It says the directory holds nothing to resume and to remove it; a folder of other files keeps the
    old line."""
    argv = tiny_run(tiny_dataset, tmp_path, 'r')
    run_killed_before_its_first_checkpoint(killed_before_its_first_checkpoint, tmp_path)
    run_dir = tmp_path / 'r'
    code, _, err = run_main(argv, capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: run {run_dir} already exists but holds no checkpoint: it was killed before its first, so there is "
        f"nothing to resume; remove it (rm -r {run_dir}) and run the command again, or pick another --name"]
    shutil.rmtree(run_dir)
    code, _, err = run_main(argv, capsys)
    assert code == 0 and (run_dir / 'state.pt').is_file(), err
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('mine')
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'mine'), capsys)
    assert code == 1 and 'already exists; pick another --name, or continue it with --resume' in err


def test_a_killed_run_checked_as_another_process_checks_it_too_is_said_alike(tiny_dataset, tmp_path, capsys,
                                                                              monkeypatch,
                                                                              killed_before_its_first_checkpoint):
    """Under torchrun every process checks a killed run's directory, each taking its lock for a moment: the first
    process, finding it held by another's check, took it for a run in training and said 'already exists; ... continue
    it with --resume', which has nothing to resume. It waits that moment out."""
    import fcntl
    argv = tiny_run(tiny_dataset, tmp_path, 'r')
    run_killed_before_its_first_checkpoint(killed_before_its_first_checkpoint, tmp_path)
    held = [os.open(tmp_path / 'r', os.O_RDONLY)]
    fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's check, released as this one waits
    sleep = time.sleep

    def release_then_sleep(seconds):
        if held:
            os.close(held.pop())
        sleep(seconds)
    monkeypatch.setattr(main.time, 'sleep', release_then_sleep)
    code, _, err = run_main(argv, capsys)
    assert code == 1 and err.startswith(f"error: run {tmp_path / 'r'} already exists but holds no checkpoint"), err


def test_write_files_changes_all_or_nothing(tmp_path):
    """A payload that fails (a signal, memory) or a write that fails leaves the old files and no temp file."""
    import train
    for name in ('a', 'b'):
        (tmp_path / name).write_text('old')

    def failing():
        raise MemoryError
    with pytest.raises(MemoryError):
        train.write_files({tmp_path / 'a': b'new', tmp_path / 'b': failing})
    assert sorted(os.listdir(tmp_path)) == ['a', 'b']  # a's temp file gone too (the next call, same name, hid it)
    with pytest.raises(SystemExit, match=r"cannot write .*missing/c \(No such file or directory\); the files already"):
        train.write_files({tmp_path / 'a': b'new', tmp_path / 'missing' / 'c': b'new'})
    assert sorted(os.listdir(tmp_path)) == ['a', 'b'] and (tmp_path / 'a').read_text() == 'old'
    train.write_files({tmp_path / 'a': b'new', tmp_path / 'b': lambda: b'new'})
    assert (tmp_path / 'a').read_text() == (tmp_path / 'b').read_text() == 'new'


def test_an_unwritable_run_is_refused_before_any_work(tiny_dataset, tmp_path, capsys, monkeypatch):
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    before = files(tmp_path / 'r')
    access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode: False if str(path) == str(tmp_path / 'r') else access(path, mode))
    for action, writes in ((['--epoch', 2], 'its checkpoints'),
                           (['--eval_only'], "its confusion matrix, per-class accuracy and each test image's prediction"),
                           (['--predict', tiny_dataset], 'its predictions')):
        code, _, err = run_main(['--resume', tmp_path / 'r', *action], capsys)
        assert code == 1 and err.strip().startswith(f"error: cannot write to {tmp_path / 'r'} ({writes} go there)"), err
        assert err.strip().endswith(', or pass --out FILE') == ('--predict' in action), err  # predictions go elsewhere
    code, _, err = run_main(['--resume', tmp_path / 'r', '--predict', tiny_dataset, '--out', tmp_path / 'p.csv'], capsys)
    assert code == 0 and (tmp_path / 'p.csv').exists(), err  # --out elsewhere needs nothing of the run directory
    assert files(tmp_path / 'r') == before


def test_weights_changed_under_a_run_are_refused(tiny_dataset, tmp_path, capsys):
    """--weights is compared by path on resume: a file replaced at that path would give another frozen backbone
    (and overwrite the recorded sha256) without a word."""
    import timm
    torch.manual_seed(0)
    torch.save(timm.create_model('test_vit', num_classes=5).state_dict(), tmp_path / 'w.pth')
    run = [arg for arg in tiny_run(tiny_dataset, tmp_path, 'r') if arg not in ('--pretrained', 'False')]
    code, _, err = run_main([*run, '--weights', tmp_path / 'w.pth'], capsys)
    assert code == 0, err
    config = (tmp_path / 'r' / 'config.json').read_text()
    torch.save(timm.create_model('test_vit', num_classes=5).state_dict(), tmp_path / 'w.pth')  # other tensors
    for action in (['--epoch', 2], ['--eval_only'], ['--predict', tiny_dataset]):
        code, _, err = run_main(['--resume', tmp_path / 'r', *action], capsys)
        assert code == 1 and err.strip().startswith(f"error: --weights {tmp_path / 'w.pth'} is not the file "
                                                    f"{tmp_path / 'r'} was trained from"), err
    assert (tmp_path / 'r' / 'config.json').read_text() == config and len(read_metrics(tmp_path / 'r')) == 1


def test_a_weights_file_that_moved_is_passed_again(tiny_dataset, tmp_path, capsys):
    """As a moved dataset folder is given with --dataset NEW_PATH, a moved --weights file is given with --weights
    NEW_PATH: accepted when it is the same file (sha256), refused otherwise."""
    import timm
    torch.manual_seed(0)
    torch.save(timm.create_model('test_vit', num_classes=5).state_dict(), tmp_path / 'w.pth')
    run = [arg for arg in tiny_run(tiny_dataset, tmp_path, 'r') if arg not in ('--pretrained', 'False')]
    code, out, err = run_main([*run, '--weights', tmp_path / 'w.pth'], capsys)
    assert code == 0, err
    logged = read_metrics(tmp_path / 'r')[-1]['test_acc']
    os.makedirs(tmp_path / 'moved')
    os.rename(tmp_path / 'w.pth', tmp_path / 'moved' / 'w.pth')
    code, _, err = run_main(['--resume', tmp_path / 'r', '--eval_only'], capsys)
    assert code == 2 and err.strip() == (f"main.py: error: the run's --weights file {tmp_path / 'w.pth'} is gone; if it "
                                         f"moved, pass --weights NEW_PATH (it must be the same file: its sha256 is "
                                         f"checked) (python main.py --help lists the flags)"), err
    code, _, err = run_main(['--resume', tmp_path / 'r', '--eval_only', '--weights', tmp_path / 'moved' / 'w.pt'],
                            capsys)  # a typo in the new path is said as such
    assert code == 2 and f"--weights {tmp_path / 'moved' / 'w.pt'}: no such file" in err, err
    code, out, err = run_main(['--resume', tmp_path / 'r', '--eval_only', '--weights', tmp_path / 'moved' / 'w.pth'],
                              capsys)
    assert code == 0 and f"test accuracy {logged}%" in out, out + err
    torch.save(timm.create_model('test_vit', num_classes=5).state_dict(), tmp_path / 'other.pth')
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2, '--weights', tmp_path / 'other.pth'], capsys)
    assert code == 1 and 'is not the file' in err and err.strip().endswith('pass --weights with the file it was trained '
                                                                           'from'), err
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2, '--weights', tmp_path / 'moved' / 'w.pth'],
                            capsys)
    assert code == 0 and len(read_metrics(tmp_path / 'r')) == 2, err


def test_eval_only_writes_nothing_that_a_training_process_could_make_stale(tiny_dataset, tmp_path, capsys,
                                                                             monkeypatch):
    """--eval_only beside a training process (which replaces best.safetensors, or extends a finished run) shows the
    accuracy but writes no confusion_best.csv / per_class_acc_best that would outlive the checkpoint they describe;
    nor when the checkpoint changed while it evaluated. Otherwise it writes them, holding the run's lock."""
    import train
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r', '--val_split', 0.25, epochs=2), capsys)
    assert code == 0, err
    before = files(run_dir)
    training = main.lock_run(run_dir)  # as a training process holds it
    try:
        for checkpoint, suffix in (('best', '_best'), ('last', '')):
            code, out, err = run_main(['--eval_only', '--resume', run_dir, '--checkpoint', checkpoint], capsys)
            assert code == 0 and f'({checkpoint}, epoch ' in out and 'test accuracy' in out, err
            assert err.strip() == (f"note: {run_dir} is being trained by another process: confusion{suffix}.csv, "
                                   f"test_predictions{suffix}.csv and per_class_acc{suffix} would not describe its "
                                   f"{checkpoint} checkpoint, so they are not written; evaluate again once it has "
                                   f"stopped")
            assert files(run_dir) == before
    finally:
        os.close(training)

    evaluate_split, best = train.evaluate_split, run_dir / 'best.safetensors'
    epoch = train.checkpoint_epoch(best)

    def evaluate_as_training_saves_a_better_epoch(*args):
        from safetensors.torch import save_file
        save_file(load_file(best), best, metadata={'epoch': '7'})
        return evaluate_split(*args)
    monkeypatch.setattr(train, 'evaluate_split', evaluate_as_training_saves_a_better_epoch)
    code, out, err = run_main(['--eval_only', '--resume', run_dir, '--checkpoint', 'best'], capsys)
    assert code == 0 and err.strip().startswith(f"note: {best} changed while this evaluated its epoch {epoch} (now: 7)")
    assert not (run_dir / 'confusion_best.csv').exists() and not (run_dir / 'test_predictions_best.csv').exists()
    monkeypatch.setattr(train, 'evaluate_split', evaluate_split)
    code, out, err = run_main(['--eval_only', '--resume', run_dir, '--checkpoint', 'best'], capsys)
    assert code == 0 and (run_dir / 'confusion_best.csv').is_file(), err
    assert (run_dir / 'test_predictions_best.csv').is_file()
    assert 'per_class_acc_best' in json.loads((run_dir / 'summary.json').read_text())
    code, _, err = run_main(['--resume', run_dir, '--epoch', 3], capsys)  # eval_only let go of the lock
    assert code == 0, err

    try_lock_run, os_open = main.try_lock_run, os.open  # another --eval_only writing: a short wait, not a refusal

    def held_for_a_moment(path, *args):
        threading.Timer(0.3, os.close, [try_lock_run(path, 0)]).start()
        return try_lock_run(path, *args)
    monkeypatch.setattr(main, 'try_lock_run', held_for_a_moment)
    os.remove(run_dir / 'confusion_best.csv')
    code, _, err = run_main(['--eval_only', '--resume', run_dir, '--checkpoint', 'best'], capsys)
    assert code == 0 and (run_dir / 'confusion_best.csv').is_file() and 'note' not in err, err
    monkeypatch.setattr(main, 'try_lock_run', try_lock_run)

    def unreadable(path, *args):  # a directory without read permission, which root (the tests' user here) ignores
        if str(path) == str(run_dir):
            raise PermissionError(13, 'Permission denied')
        return os_open(path, *args)
    monkeypatch.setattr(os, 'open', unreadable)
    code, _, err = run_main(['--eval_only', '--resume', run_dir, '--checkpoint', 'best'], capsys)
    assert code == 1 and err.strip() == f"error: cannot open {run_dir} to lock it (Permission denied); make it " \
                                        f"readable (chmod u+r)"


def test_a_run_in_training_cannot_be_resumed_twice(dataset, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    process = start(flags(dataset, tmp_path, 'run', epochs=3))
    deadline = time.time() + 120
    while not (run_dir / 'state.pt').exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)  # the epoch-0 checkpoint: from here a --resume would find something to resume
    code, _, err = run_main(['--resume', run_dir], capsys)
    assert code == 1 and err.strip() == (f"error: {run_dir} is being trained by another process; let it finish, or "
                                         f"stop it (it keeps its last epoch) and --resume {run_dir}")
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=240)
    assert process.returncode == 130
    assert not [name for name in os.listdir(run_dir) if 'lock' in name]  # the lock was on the directory itself
    epochs = max(len(read_metrics(run_dir)) + 1, 3)  # past its warmup (2 epochs)
    code, _, err = run_main(['--resume', run_dir, '--epoch', epochs], capsys)  # the lock went with the process
    assert code == 0 and len(read_metrics(run_dir)) == epochs, err


def test_a_changed_dataset_is_refused_and_a_moved_one_accepted(tmp_path, capsys):
    """A renamed class folder reassigned the labels by sorted order and added images changed the counts, both
    without a word, and --eval_only then rewrote confusion.csv under the wrong names; a moved copy is the run's."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('cat', 'dog', 'frog'), train_per_class=4, test_per_class=2,
                                size=16)
    code, _, err = run_main(tiny_run(root, tmp_path / 'logs', 'r', '--patch_size', 8, '--val_split', 0.25), capsys)
    assert code == 0, err
    run_dir = tmp_path / 'logs' / 'r'
    before = files(run_dir)
    for split in ('train', 'test'):
        os.rename(tmp_path / 'ds' / split / 'cat', tmp_path / 'ds' / split / 'tiger')
    for action in (['--eval_only'], ['--epoch', 2]):
        code, _, err = run_main(['--resume', run_dir, *action], capsys)
        assert code == 1 and err.strip().splitlines() == [
            f"error: --dataset {root} is not the data {run_dir} was trained on: classes 'cat' gone and 'tiger' new; "
            f"restore it (or pass --dataset with the run's copy), or train a new run on this data"], err
    for split in ('train', 'test'):
        os.rename(tmp_path / 'ds' / split / 'tiger', tmp_path / 'ds' / split / 'cat')
    shutil.copy(tmp_path / 'ds' / 'test' / 'dog' / '0000.png', tmp_path / 'ds' / 'test' / 'dog' / 'extra.png')
    code, _, err = run_main(['--resume', run_dir, '--eval_only'], capsys)
    assert code == 1 and 'its test split holds 7 images where it held 6; restore it' in err, err
    assert files(run_dir) == before
    os.remove(tmp_path / 'ds' / 'test' / 'dog' / 'extra.png')
    os.rename(tmp_path / 'ds', tmp_path / 'moved')
    code, _, err = run_main(['--resume', run_dir, '--eval_only'], capsys)
    assert code == 1 and err.strip() == (f"error: the dataset folder of {run_dir}, {root}, is gone; if it moved, pass "
                                         f"--dataset NEW_PATH (or, for a sweep's runs, link the old path to it)")
    code, out, err = run_main(['--resume', run_dir, '--epoch', 2, '--dataset', tmp_path / 'moved'], capsys)
    assert code == 0 and 'epoch 2/2' in out, err
    assert json.loads((run_dir / 'config.json').read_text())['dataset'] == str(tmp_path / 'moved')


def test_a_resume_on_fewer_images_says_the_data_changed_not_what_the_counts_imply(tmp_path, capsys):
    """Resumed on a folder with fewer images, the run was told to lower --batch_size (which a resume refuses),
    after warnings about --train_samples and empty classes: the cause, other data, comes first and alone."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('cat', 'dog', 'frog'), train_per_class=4, test_per_class=2,
                                size=16)
    code, _, err = run_main(tiny_run(root, tmp_path / 'logs', 'r', '--patch_size', 8, '--train_samples', 12), capsys)
    assert code == 0, err
    for name in ('dog/0000.png', 'dog/0001.png', 'dog/0002.png', 'frog/0000.png', 'frog/0001.png', 'frog/0002.png'):
        os.remove(tmp_path / 'ds' / 'train' / name)  # 6 training images left, fewer than the batch of 8
    code, _, err = run_main(['--resume', tmp_path / 'logs' / 'r', '--epoch', 2], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: --dataset {root} is not the data {tmp_path / 'logs' / 'r'} was trained on: its train split holds 6 "
        f"images where it held 12; restore it (or pass --dataset with the run's copy), or train a new run on this "
        f"data"], err


def test_classes_in_another_order_are_refused(tiny_dataset, tmp_path, capsys):
    """The labels are indices into the class list: the same names in another order (another sorting rule, an edited
    config.json) would reassign them, so the order is compared too."""
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'r' / 'config.json').read_text())
    (tmp_path / 'r' / 'config.json').write_text(json.dumps(dict(config, classes=config['classes'][::-1])))
    code, _, err = run_main(['--resume', tmp_path / 'r', '--eval_only'], capsys)
    assert code == 1 and err.strip() == (f"error: --dataset {tiny_dataset} is not the data {tmp_path / 'r'} was "
                                         f"trained on: the classes are in another order; restore it (or pass --dataset "
                                         f"with the run's copy), or train a new run on this data"), err


def test_a_run_recorded_without_dataset_images_is_checked_by_the_counts_it_used(tmp_path, capsys):
    """Runs made before dataset_images was recorded: an image added to the folder is found by the train/val/test
    counts the run used."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('cat', 'dog'), train_per_class=4, test_per_class=2, size=16)
    code, _, err = run_main(tiny_run(root, tmp_path / 'logs', 'r', '--patch_size', 8), capsys)
    assert code == 0, err
    run_dir = tmp_path / 'logs' / 'r'
    config = json.loads((run_dir / 'config.json').read_text())
    del config['dataset_images']
    (run_dir / 'config.json').write_text(json.dumps(config))
    shutil.copy(tmp_path / 'ds' / 'test' / 'dog' / '0000.png', tmp_path / 'ds' / 'test' / 'dog' / 'extra.png')
    code, _, err = run_main(['--resume', run_dir, '--eval_only'], capsys)
    assert code == 1 and 'test has 5 images where the run had 4; restore it' in err, err


def test_images_added_to_a_subset_run_dataset_are_found(tmp_path, capsys):
    """With --train_samples/--test_samples the counts a run used stay the same whatever the folder holds, while the
    images the subset keeps (and the val split of them) change: the dataset's own counts are recorded and compared."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('cat', 'dog', 'frog'), train_per_class=6, test_per_class=3,
                                size=16)
    code, _, err = run_main(tiny_run(root, tmp_path / 'logs', 'r', '--patch_size', 8, '--val_split', 0.25,
                                     '--train_samples', 12, '--test_samples', 6), capsys)
    assert code == 0, err
    run_dir = tmp_path / 'logs' / 'r'
    assert json.loads((run_dir / 'config.json').read_text())['dataset_images'] == dict(train=18, test=9)
    before = files(run_dir)
    write_folder_dataset(tmp_path / 'more', classes=('cat', 'dog', 'frog'), train_per_class=2, test_per_class=1,
                         size=16, seed=1)
    for split in ('train', 'test'):
        for name in ('cat', 'dog', 'frog'):
            for image in os.listdir(tmp_path / 'more' / split / name):
                shutil.copy(tmp_path / 'more' / split / name / image, tmp_path / 'ds' / split / name / f'new_{image}')
    for action in (['--eval_only'], ['--epoch', 2]):
        code, _, err = run_main(['--resume', run_dir, *action], capsys)
        assert code == 1 and err.strip() == (
            f"error: --dataset {root} is not the data {run_dir} was trained on: its train split holds 24 images where "
            f"it held 18; its test split holds 12 images where it held 9; restore it (or pass --dataset with the "
            f"run's copy), or train a new run on this data"), err
    assert files(run_dir) == before


def test_a_test_split_run_resumes_and_evaluates_on_its_own_test_images(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=8, test_per_class=1, size=8)
    shutil.rmtree(os.path.join(root, 'test'))
    code, _, err = run_main(tiny_run(root, tmp_path / 'logs', 'r', '--patch_size', 4, '--img_size', 8,
                                     '--test_split', 0.25, epochs=2), capsys)
    assert code == 0, err
    run_dir = tmp_path / 'logs' / 'r'
    config = json.loads((run_dir / 'config.json').read_text())
    assert (config['test_split'], config['test_images'], config['train_images']) == (0.25, 4, 12)
    final = read_metrics(run_dir)[-1]
    code, out, err = run_main(['--eval_only', '--resume', run_dir], capsys)
    assert code == 0 and f"test accuracy {float(final['test_acc']):.4f}% test loss {float(final['test_loss']):.6f} " \
                         f"on 4 images" in out, err
    code, _, err = run_main(['--resume', run_dir, '--epoch', 3, '--test_split', 0.5], capsys)
    assert code == 2 and '--test_split 0.5 contradicts the run\'s config (test_split=0.25)' in err
    shutil.copytree(os.path.join(root, 'train'), os.path.join(root, 'test'))  # a test/ folder appeared since
    code, _, err = run_main(['--eval_only', '--resume', run_dir], capsys)
    assert code == 1 and err.strip() == (
        f"error: {run_dir} held out its test set from train/ (--test_split 0.25), but {root} now has a test/ folder; "
        f"pass --dataset with the run's own copy, or move test/ away")


def test_a_class_too_small_for_the_test_split_is_said_with_the_reason(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b', 'c'), train_per_class=8, test_per_class=1, size=8)
    shutil.rmtree(os.path.join(root, 'test'))
    for name in sorted(os.listdir(os.path.join(root, 'train', 'c')))[1:]:  # c keeps one image: it stays in train
        os.remove(os.path.join(root, 'train', 'c', name))
    code, _, err = run_main(tiny_run(root, tmp_path / 'logs', 'r', '--patch_size', 4, '--img_size', 8,
                                     '--test_split', 0.25, '--test_samples', 100), capsys)
    assert code == 0 and (
        "warning: 1 of 3 classes have no test images (c); test accuracy leaves them out (--test_split 0.25 holds out "
        "round(0.25 x its images) of a class, keeping one to train on: none of a class this small; raise "
        "--test_split, or add images)") in err, err


def test_runs_made_before_folder_reading_2_read_their_folder_as_they_did(tmp_path, capsys, monkeypatch):
    """Folder reading 2 searches subfolders and shrinks images larger than --img_size as decoded; a run recorded
    without 'folder_reading' was read by 1 (one level, own size), and must still resume and evaluate on exactly that."""
    import data
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=4, test_per_class=2, size=64)
    code, _, err = run_main(tiny_run(root, tmp_path / 'logs', 'old', '--patch_size', 8), capsys)
    assert code == 0, err
    run_dir = tmp_path / 'logs' / 'old'
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['folder_reading'] == data.FOLDER_READING == 6
    del config['folder_reading'], config['data_sha256']  # as a run written before either was recorded
    (run_dir / 'config.json').write_text(json.dumps(config))
    os.makedirs(tmp_path / 'ds' / 'train' / 'a' / 'later')
    shutil.copy(tmp_path / 'ds' / 'train' / 'a' / '0000.png', tmp_path / 'ds' / 'train' / 'a' / 'later' / 'x.png')
    loaded, load = [], data.load_dataset
    monkeypatch.setattr(data, 'load_dataset', lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    code, _, err = run_main(['--resume', run_dir, '--epoch', 2], capsys)
    assert code == 0, err
    train_images, train_labels = loaded[-1][:2]
    assert train_images.shape == (8, 3, 64, 64) and len(train_labels) == 8  # own size, one level: as it was trained
    assert json.loads((run_dir / 'config.json').read_text())['folder_reading'] == 1  # and stays on record
    code, _, err = run_main(tiny_run(root, tmp_path / 'logs', 'new', '--patch_size', 8), capsys)
    assert code == 0, err
    assert loaded[-1][0].shape == (9, 3, 32, 32)  # a new run reads by 2: the subfolder's image, shrunk to 32


def test_resumed_run_keeps_the_best_checkpoint_of_before_the_interruption(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Val 90 at epoch 1, then (resumed) 50 at epoch 2: best.safetensors and summary.json stay at epoch 1."""
    import train
    evaluate_split = train.evaluate_split
    val_acc = {1: 90.0, 2: 50.0}

    def fixed_val(model, split, *args):
        loss, acc, *rest = evaluate_split(model, split, *args)  # rest: the confusion, and the test's per-image view
        epoch = len(read_metrics(tmp_path / 'r')) + 1 if (tmp_path / 'r' / 'metrics.csv').exists() else 1
        is_val = len(split[1]) == 12  # 25% of the 48 training images; the test split has 18
        return (loss, val_acc[epoch], *rest) if is_val else (loss, acc, *rest)
    monkeypatch.setattr(train, 'evaluate_split', fixed_val)
    argv = [*TINY, '--dataset', tiny_dataset, '--val_split', 0.25, '--epoch', 1, '--batch_size', 8,
            '--log_dir', tmp_path, '--name', 'r']
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
    assert code == 0, err
    with safe_open(str(tmp_path / 'r' / 'best.safetensors'), 'pt') as f:
        assert f.metadata()['epoch'] == '1'
    assert json.loads((tmp_path / 'r' / 'summary.json').read_text())['best_val_epoch'] == 1


def stopped_run(argv, epochs_done, capsys, monkeypatch):
    """Run main.py (no val split) and SIGINT it in its evaluation of epoch `epochs_done`: it keeps that epoch."""
    import train
    evaluate_split, evaluations = train.evaluate_split, []

    def stop_in_the_last_evaluation(model, split, *args):
        evaluations.append(1)
        if len(evaluations) == epochs_done:
            os.kill(os.getpid(), signal.SIGINT)  # the loop stops once this epoch is saved
        return evaluate_split(model, split, *args)
    monkeypatch.setattr(train, 'evaluate_split', stop_in_the_last_evaluation)
    code, _, err = run_main(argv, capsys)
    monkeypatch.setattr(train, 'evaluate_split', evaluate_split)
    assert code == 130, err


@pytest.mark.parametrize('warmup, done, epoch, expect, smallest', [
    (3.5, 1, 2, "--epoch 2 would end {run} within its 3.5 warmup epochs: the lr would never reach --lr nor decay; "
                "pass --epoch 4 or more", 4),
    (2, 1, 2, "--epoch 2 would end {run} within its 2 warmup epochs: the lr would never reach --lr nor decay; "
              "pass --epoch 3 or more", 3),  # a whole number of warmup epochs: not 2 again
    (2.9, 1, 2, "--epoch 2 would end {run} within its 2.9 warmup epochs: the lr would never reach --lr nor decay; "
                "pass --epoch 4 or more", 4),  # not 3: 17 warmup steps of 18 would leave no step to decay
    (1, 2, 1, "{run} has already finished 2 epochs; --epoch 1 cannot undo them: pass --epoch 3 or more to train "
              "further", 3),
    (1.9, 1, 2, "--epoch 2 would end {run} inside its warmup (1.9 epochs, 11 of the 12 steps (6 per epoch): the lr "
                "would never decay); pass --epoch 3 or more", 3)],
    ids=['inside-the-warmup', 'inside-a-whole-warmup', 'inside-the-warmup-counted-in-steps',
         'below-the-epochs-trained', 'inside-the-warmup-in-steps'])
def test_a_resume_below_what_it_can_train_to_is_refused_with_an_epoch_that_works(
        tiny_dataset, tmp_path, capsys, monkeypatch, warmup, done, epoch, expect, smallest):
    """A resume may lower --epoch, but neither below the epochs trained nor into the run's warmup (the lr would still
    be rising at the last step; in whole steps, 6 an epoch here, 1.9 warmup epochs leave 2 epochs no step of decay).
    Refused before anything is rewritten, and the --epoch suggested works: it is above the epochs trained as well
    as past the warmup."""
    run_dir = tmp_path / 'r'
    stopped_run(tiny_run(tiny_dataset, tmp_path, 'r', '--warmup_epochs', warmup, epochs=5), done, capsys,
                monkeypatch)
    before = files(run_dir)
    code, out, err = run_main(['--resume', run_dir, '--epoch', epoch], capsys)
    assert code == 1 and err.strip().splitlines() == ['error: ' + expect.format(run=run_dir)], (out, err)
    assert files(run_dir) == before
    code, _, err = run_main(['--resume', run_dir, '--epoch', smallest], capsys)
    assert code == 0 and len(read_metrics(run_dir)) == smallest, err
    for action in (['--eval_only'], ['--predict', os.path.join(tiny_dataset, 'test')]):  # nothing trains: any --epoch
        code, _, err = run_main(['--resume', run_dir, *action, '--epoch', epoch], capsys)
        assert code == 0, err


def test_the_epoch_suggested_for_a_run_that_recorded_no_image_count_is_past_its_warmup():
    """A run whose config.json holds no train_images (an older vpt) is judged in epochs: with 2.5 warmup epochs the
    smallest --epoch that can decay is 3 (2 would still end inside the warmup, and be refused again)."""
    import argparse
    args = argparse.Namespace(warmup_epochs=2.5, batch_size=8)
    assert main.smallest_resume_epoch(args, 1) == 3
    assert main.smallest_resume_epoch(argparse.Namespace(warmup_epochs=2.0, batch_size=8), 1) == 3
    assert main.smallest_resume_epoch(args, 4) == 5  # past the epochs trained


def test_ending_an_unfinished_run_where_it_stopped_is_refused(tiny_dataset, tmp_path, capsys, monkeypatch):
    """--epoch N at the epoch an unfinished run stopped would train nothing and leave it unfinished (no
    confusion.csv, summary 'finished': false), not 'finished all N epochs'."""
    run_dir = tmp_path / 'r'
    stopped_run(tiny_run(tiny_dataset, tmp_path, 'r', epochs=3), 1, capsys, monkeypatch)
    before = files(run_dir)
    code, out, err = run_main(['--resume', run_dir, '--epoch', 1], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: {run_dir} stopped after 1 of its 3 epochs; --epoch 1 would end it untrained and still unfinished: "
        f"drop --epoch to resume it, or evaluate it as it is with --eval_only"], (out, err)
    assert files(run_dir) == before
    code, _, err = run_main(['--resume', run_dir], capsys)
    assert code == 0 and len(read_metrics(run_dir)) == 3, err


def test_ranks_a_resume_adds_draw_their_own_random_streams(monkeypatch):
    """A 1-process run resumed under torchrun with 2: rank 1 has no saved stream; it must not copy rank 0's (the
    same prompt-dropout masks on both halves of the batch), but start its own, as a new run's rank 1 does."""
    import train
    torch.manual_seed(123)
    saved = train.rng_states(torch.Generator().manual_seed(0))  # one process saved the run
    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr(train, 'rank_and_world_size', lambda rank=rank: (rank, 2))
        torch.manual_seed(999)
        train.restore_rng(saved, torch.Generator(), seed=7)
        draws[rank] = torch.rand(8)
    torch.manual_seed(123)
    assert torch.equal(draws[0], torch.rand(8))  # rank 0 continues the saved stream
    torch.manual_seed(7 + 1)
    assert torch.equal(draws[1], torch.rand(8))  # rank 1: --seed + its rank
    assert not torch.equal(draws[0], draws[1])


def test_two_processes_writing_the_same_file_do_not_trip_over_each_other(tmp_path):
    """--eval_only beside a training run: both rewrite summary.json; a shared temp name made one process rename the
    other's temp file away (FileNotFoundError, the training killed by a traceback)."""
    code = ("import sys, train\n"
            "for i in range(300):\n"
            "    train.write_json(sys.argv[1], dict(writer=sys.argv[2], i=i))\n")
    target = tmp_path / 'summary.json'
    writers = [subprocess.Popen([sys.executable, '-c', code, str(target), name], cwd=REPO, stderr=subprocess.PIPE,
                                text=True) for name in ('a', 'b')]
    results = [(writer.wait(timeout=120), writer.stderr.read()) for writer in writers]
    assert results == [(0, ''), (0, '')]
    assert json.loads(target.read_text())['i'] == 299
    assert os.listdir(tmp_path) == ['summary.json']


def test_a_resume_seeds_the_ranks_it_adds_from_the_runs_seed(tiny_dataset, tmp_path, capsys, monkeypatch):
    """fit hands the run's --seed (from config.json) to restore_rng, which seeds the ranks a resume adds with it."""
    import train
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r', '--seed', 11, epochs=1), capsys)
    assert code == 0, err
    seeds, restore_rng = [], train.restore_rng

    def spy(rng, generator, seed):
        seeds.append(seed)
        return restore_rng(rng, generator, seed)
    monkeypatch.setattr(train, 'restore_rng', spy)
    code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
    assert code == 0 and seeds == [11], (seeds, err)


def test_a_non_finite_loss_in_fp16_also_names_fp32(tiny_dataset, tmp_path, capsys, monkeypatch):
    """A GPU without bf16 units trains in fp16 (train.amp_name), whose range overflows where bf16's would not."""
    import train
    monkeypatch.setattr(train, 'amp_name', lambda device, amp: 'float16' if amp else None)
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8, '--lr', '1e30',
                               '--warmup_epochs', 0, '--log_dir', tmp_path, '--name', 'nan'], capsys)
    assert code == 3
    line = err.strip().splitlines()[-1]
    assert ('start a new run with a lower --lr (it is 1e+30: a resume keeps it and would diverge again) or with '
            '--amp False (this GPU has no bf16 units, so --amp trains in fp16, whose range is narrow); the checkpoint '
            'of epoch 0 is intact') in line, line


def test_a_resumed_fp16_run_keeps_its_loss_scale(tiny_dataset, tmp_path, capsys, monkeypatch):
    """On a GPU without bf16 units --amp trains in fp16 with a loss scale that adapts to overflows; state.pt keeps it,
    so a resumed run goes on with the scale it had (a fresh one would skip steps, unlike the uninterrupted run).
    That path, on the CPU: train.amp_name says fp16, so make_scaler scales (autocast itself stays off here)."""
    import train
    monkeypatch.setattr(train, 'amp_name', lambda device, amp: 'float16' if amp else None)
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    assert json.loads((run_dir / 'config.json').read_text())['amp_dtype'] == 'float16'
    state = torch.load(run_dir / 'state.pt', weights_only=False)
    assert state['scaler']['scale'] == 2.0 ** 16  # torch's initial scale: no overflow in these 6 steps
    state['scaler']['scale'] = 2.0 ** 20  # as if overflows had moved it
    torch.save(state, run_dir / 'state.pt')
    code, _, err = run_main(['--resume', run_dir, '--epoch', 2], capsys)
    assert code == 0, err
    assert torch.load(run_dir / 'state.pt', weights_only=False)['scaler']['scale'] == 2.0 ** 20
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'fp32', '--amp', False), capsys)
    assert code == 0, err
    assert torch.load(tmp_path / 'fp32' / 'state.pt', weights_only=False)['scaler'] == {}  # fp32: no scaling


def test_a_non_finite_loss_with_amp_off_does_not_suggest_turning_it_off(tiny_dataset, tmp_path, capsys, monkeypatch):
    """On a GPU without bf16 units --amp False trains in fp32: fp16's range is not the cause, so only --lr is named."""
    import train
    monkeypatch.setattr(train, 'amp_name', lambda device, amp: 'float16' if amp else None)
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8, '--lr', '1e30',
                               '--warmup_epochs', 0, '--amp', False, '--log_dir', tmp_path, '--name', 'nan'], capsys)
    assert code == 3
    line = err.strip().splitlines()[-1]
    assert 'a resume keeps it and would diverge again); the checkpoint of epoch 0 is intact' in line, line


def test_the_fp16_loss_scale_goes_on_from_epoch_to_epoch_and_across_a_resume(tiny_dataset, tmp_path, capsys,
                                                                              monkeypatch):
    """The scale adapts over the whole run, not afresh each epoch: here it doubles after every step (growth interval
    1), so state.pt holds 2^16 x 2^steps, 2 epochs in one process and a third resumed."""
    import train
    monkeypatch.setattr(train, 'amp_name', lambda device, amp: 'float16' if amp else None)
    make_scaler = train.make_scaler

    def growing(device, amp):
        scaler = make_scaler(device, amp)
        scaler.load_state_dict(dict(scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=1,
                                    _growth_tracker=0))
        return scaler
    monkeypatch.setattr(train, 'make_scaler', growing)
    run_dir = tmp_path / 'r'
    for argv in (tiny_run(tiny_dataset, tmp_path, 'r', epochs=2), ['--resume', run_dir, '--epoch', 3]):
        code, _, err = run_main(argv, capsys)
        assert code == 0, err
        state = torch.load(run_dir / 'state.pt', weights_only=False)
        assert state['scaler']['scale'] == 2.0 ** (16 + state['scheduler']['last_epoch']), state['scheduler']
    assert len(read_metrics(run_dir)) == 3


def test_a_run_saved_without_a_loss_scale_resumes_in_fp16_with_a_fresh_one(tiny_dataset, tmp_path, capsys,
                                                                           monkeypatch):
    """A bf16 or fp32 run (its state.pt holds an empty scaler), or one of a vpt from before fp16 (no scaler at all),
    resumed on a GPU without bf16 units: it goes on in fp16 from torch's initial scale, not a crash."""
    import train
    run_dir = tmp_path / 'r'
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    assert torch.load(run_dir / 'state.pt', weights_only=False)['scaler'] == {}  # the CPU: fp32
    monkeypatch.setattr(train, 'amp_name', lambda device, amp: 'float16' if amp else None)
    code, _, err = run_main(['--resume', run_dir, '--epoch', 2], capsys)
    assert code == 0, err
    state = torch.load(run_dir / 'state.pt', weights_only=False)
    assert state['scaler']['scale'] == 2.0 ** 16
    del state['scaler']  # as a vpt from before fp16 saved it
    torch.save(state, run_dir / 'state.pt')
    code, _, err = run_main(['--resume', run_dir, '--epoch', 3], capsys)
    assert code == 0, err
    assert torch.load(run_dir / 'state.pt', weights_only=False)['scaler']['scale'] == 2.0 ** 16


@pytest.mark.parametrize('damaged', ['{"epochs_done": ', '', '[1, 2]'])
def test_eval_only_on_a_damaged_summary_writes_nothing(tiny_dataset, tmp_path, capsys, damaged):
    """--eval_only wrote confusion.csv and test_predictions.csv, then failed on summary.json: its refusal had
    replaced the run's files (or, for JSON other than an object, was a TypeError traceback)."""
    code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, 'r'), capsys)
    assert code == 0, err
    (tmp_path / 'r' / 'summary.json').write_text(damaged)
    (tmp_path / 'r' / 'confusion.csv').write_text('kept\n')
    before = files(tmp_path / 'r')
    for checkpoint in ('last', 'best'):
        if checkpoint == 'best':
            shutil.copy(tmp_path / 'r' / 'trainable.safetensors', tmp_path / 'r' / 'best.safetensors')
            before = files(tmp_path / 'r')
        code, _, err = run_main(['--resume', tmp_path / 'r', '--eval_only', '--checkpoint', checkpoint], capsys)
        assert code == 1 and 'Traceback' not in err, err
        assert len(err.strip().splitlines()) == 1 and err.startswith('error: ') and 'summary.json' in err, err
        assert files(tmp_path / 'r') == before


def test_images_replaced_renamed_or_moved_to_another_class_are_refused(tmp_path, capsys):
    """As many images, so the counts agreed, yet other data: a resume trained on the new pixels (or in another
    order, or with an image under another label), and --eval_only reported the accuracy of other test images."""
    from PIL import Image
    root = write_folder_dataset(tmp_path / 'ds', classes=('cat', 'dog'), train_per_class=8, test_per_class=2, size=16)
    pristine = tmp_path / 'pristine'
    shutil.copytree(root, pristine)
    code, _, err = run_main(tiny_run(root, tmp_path / 'logs', 'r', '--patch_size', 8, '--val_split', 0.25), capsys)
    assert code == 0, err
    run_dir = tmp_path / 'logs' / 'r'
    before = files(run_dir)
    train, test = tmp_path / 'ds' / 'train', tmp_path / 'ds' / 'test'
    changes = [  # each one keeps every count the run recorded
        ('train', lambda: Image.new('RGB', (16, 16), 'white').save(train / 'cat' / '0002.png')),
        ('train, val', lambda: os.rename(train / 'dog' / '0000.png', train / 'dog' / 'zz.png')),
        ('test', lambda: (os.rename(test / 'cat' / '0000.png', test / 'x.png'),
                          os.rename(test / 'dog' / '0000.png', test / 'cat' / '0000.png'),
                          os.rename(test / 'x.png', test / 'dog' / '0000.png'))),
        # the last cat, now the first dog: the same pixels in the same order, one label other
        ('test', lambda: os.rename(test / 'cat' / '0001.png', test / 'dog' / '0.png'))]
    for splits, change in changes:
        change()
        differences = '; '.join(f"its {split} images are not the run's (as many, but other pixels, another order or "
                                f"other classes: an image replaced, renamed or moved)" for split in splits.split(', '))
        for action in (['--eval_only'], ['--epoch', 2]):
            code, _, err = run_main(['--resume', run_dir, *action], capsys)
            assert code == 1 and err.strip() == (
                f"error: --dataset {root} is not the data {run_dir} was trained on: {differences}; restore it (or "
                f"pass --dataset with the run's copy), or train a new run on this data"), err
            assert files(run_dir) == before
        shutil.rmtree(root)
        shutil.copytree(pristine, root)
    code, out, err = run_main(['--resume', run_dir, '--epoch', 2], capsys)  # the run's own images
    assert code == 0 and 'epoch 2/2' in out, err


def test_a_state_of_another_model_is_one_line_and_writes_nothing(tiny_dataset, tmp_path, capsys):
    """state.pt of a run with other --prompts (or with --unfreeze: more tensors) loaded into the optimizer without a
    word; the first step then failed with a RuntimeError traceback, after config.json had gained a resume entry."""
    for name, extra in (('r', []), ('prompts', ['--prompts', 2]), ('unfreeze', ['--unfreeze', 'norm.*'])):
        code, _, err = run_main(tiny_run(tiny_dataset, tmp_path, name, *extra), capsys)
        assert code == 0, err
    own = (tmp_path / 'r' / 'state.pt').read_bytes()
    for other, held in (('prompts', r"\(6, 2, 64\) where the model has \(6, 4, 64\)"),
                        ('unfreeze', r"\d+ tensors where the model trains \d+")):
        shutil.copy(tmp_path / other / 'state.pt', tmp_path / 'r' / 'state.pt')
        before = files(tmp_path / 'r')
        code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
        assert code == 1 and re.fullmatch(
            rf"error: {re.escape(str(tmp_path / 'r'))}/state.pt does not match this run's model \(its optimizer state "
            rf"holds {held}\): the file comes from another run, or the run's config.json was edited; restore it, or "
            rf"--eval_only still evaluates its trainable.safetensors", err.strip()), err
        assert files(tmp_path / 'r') == before
    (tmp_path / 'r' / 'state.pt').write_bytes(own)
    state = torch.load(tmp_path / 'r' / 'state.pt', weights_only=False)
    for optimizer in ('adamw', {'state': [], 'param_groups': [{'params': [0]}]}):  # another tool's, hand-made
        torch.save(dict(state, optimizer=optimizer), tmp_path / 'r' / 'state.pt')
        code, _, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
        assert code == 1 and err.strip().startswith(
            f"error: {tmp_path / 'r'}/state.pt does not match this run's model (its optimizer state holds a form "
            f"torch does not write): "), err
    (tmp_path / 'r' / 'state.pt').write_bytes(own)
    code, out, err = run_main(['--resume', tmp_path / 'r', '--epoch', 2], capsys)
    assert code == 0 and 'epoch 2/2' in out, err
