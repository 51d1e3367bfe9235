"""The command line end to end on a tiny model: flags, run directory, config.json, metrics.csv, checkpoints, plot."""
import json
import os
import shlex

import pytest
from safetensors.torch import load_file

import main
from conftest import REPO, TINY, read_metrics, run_cli, run_main

# today's columns, then the ones added later (appended, so readers by column name keep working)
HEADER = ('epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_time_s,train_images_per_s,'
          'val_loss,val_acc,peak_mem_gib,includes_compile')


@pytest.mark.parametrize('text,value', [('False', False), ('false', False), ('0', False), ('no', False),
                                        ('True', True), ('true', True), ('1', True), ('yes', True)])
def test_boolean_flags_mean_what_they_say(text, value):
    assert main.parse_args(['--full', text]).full is value
    assert main.parse_args(['--pretrained', text]).pretrained is value


def test_seed_command_line_parses():
    args = main.parse_args(['--epoch', '50', '--full', 'False', '--batch_size', '256'])
    assert (args.epoch, args.full, args.batch_size, args.prompts) == (50, False, 256, 50)
    assert main.mode_of(args) == 'P' and args.lr == 5e-3


def test_defaults():
    args = main.parse_args([])
    assert (args.epoch, args.batch_size, args.full, args.prompts, args.seed) == (5, 128, False, 50, 0)
    assert args.model == 'vit_base_patch16_224.augreg_in21k' and args.dataset == 'cifar10'
    assert (args.img_size, args.patch_size, args.log_dir, args.prompt_impl) == (32, 4, 'logs', 'kv')
    assert main.parse_args(['--full', 'True']).lr == 1e-4  # full fine-tuning gets a far smaller default lr
    assert (args.lr, args.weight_decay, args.optimizer) == (5e-3, 1e-4, 'adamw')  # README's P defaults
    assert main.parse_args(['--full', 'True', '--prompts', '0']).weight_decay == 0.05
    assert main.parse_args(['--epoch', '20']).warmup_epochs == pytest.approx(2.0)
    # 10% of --epoch as config.json records it and a user reads it: 0.3, not 0.1 * 3 = 0.30000000000000004
    assert [json.dumps(main.parse_args(['--epoch', str(n)]).warmup_epochs) for n in (3, 7, 9)] == ['0.3', '0.7', '0.9']
    # README's defaults: hub weights, VPT-deep, augmentation and bf16 autocast on, no compile, no val split
    assert (args.pretrained, args.deep, args.augment, args.amp, args.compile, args.tensorboard) == (
        True, True, True, True, False, False)
    assert (args.val_split, args.prompt_dropout, args.train_samples, args.checkpoint) == (0, 0, 0, 'last')


def test_a_flag_given_as_0_is_kept_not_taken_for_its_default():
    """README's seed recipe passes --warmup_epochs 0: no warmup, not 10% of --epoch; --weight_decay 0 is no decay, not
    the mode's default. config.json records the 0 asked for."""
    args = main.parse_args(['--epoch', '20', '--warmup_epochs', '0', '--weight_decay', '0'])
    assert (args.warmup_epochs, args.weight_decay) == (0, 0)


def test_a_tilde_in_a_path_flag_is_the_home_folder(tiny_dataset, tmp_path, monkeypatch):
    """The shell expands ~ at the start of a word, not after --dataset=; main.py does it for every path flag."""
    monkeypatch.setenv('HOME', str(tmp_path))
    os.symlink(tiny_dataset, tmp_path / 'pets')
    (tmp_path / 'vit.safetensors').write_bytes(b'')  # parse_args only checks that the file is there
    args = main.parse_args(['--dataset=~/pets', '--data_dir=~/cifar', '--log_dir=~/logs',
                            '--weights=~/vit.safetensors'])
    assert (args.dataset, args.data_dir, args.log_dir, args.weights) == (
        str(tmp_path / 'pets'), str(tmp_path / 'cifar'), str(tmp_path / 'logs'), str(tmp_path / 'vit.safetensors'))


@pytest.mark.parametrize('full,prompts,mode', [(False, 4, 'P'), (True, 0, 'F'), (True, 4, 'P+F'), (False, 0, 'linear')])
def test_run_writes_config_metrics_and_checkpoint(tiny_dataset, tmp_path, capsys, full, prompts, mode):
    log_dir = tmp_path / 'logs'
    code, out, err = run_main([*TINY, '--prompts', prompts, '--full', full, '--dataset', tiny_dataset, '--epoch', 2,
                               '--batch_size', 8, '--log_dir', log_dir], capsys)
    assert code == 0, err
    (run,) = os.listdir(log_dir)
    assert run.startswith(f'{mode}_test_vit_')
    run_dir = log_dir / run
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['mode'] == mode and config['name'] == run and config['full'] is full
    assert not set(config) & main.ACTIONS  # --resume, --eval_only, --predict...: acts on a run, not part of it
    assert config['prompts'] == prompts and config['batch_size'] == 8 and config['lr'] == (1e-4 if full else 5e-3)
    for key in ('trainable_params', 'total_params', 'device_name', 'torch_version', 'timm_version', 'pillow_version',
                'seed', 'model',
                'dataset', 'weight_decay', 'warmup_epochs', 'prompt_dropout', 'img_size', 'patch_size'):
        assert key in config
    assert config['command'].startswith(f"python {main.script_path(os.path.join(REPO, 'main.py'))} --model test_vit ")
    assert '--epoch 2' in config['command']
    assert config['weights_id'] == 'random init (--pretrained False)' and 'cuda_version' in config
    assert config['git_commit'] is None or len(config['git_commit'].split('-')[0]) == 40
    assert config['train_images'] == 48 and config['val_images'] == 0 and config['test_images'] == 18
    assert f"{config['trainable_params']:,} trainable parameters" in out
    lines = (run_dir / 'metrics.csv').read_text().splitlines()
    assert lines[0] == HEADER and len(lines) == 3
    rows = read_metrics(run_dir)
    assert [r['epoch'] for r in rows] == ['1', '2']
    for row in rows:
        assert 0 <= float(row['train_acc']) <= 100 and 0 <= float(row['test_acc']) <= 100
        assert 0 < float(row['train_loss']) < 5 and 0 < float(row['test_loss']) < 5  # cross-entropy, 3 classes: ~1.1
        assert float(row['train_images_per_s']) > 0 and float(row['epoch_time_s']) > 0
        assert row['val_acc'] == row['val_loss'] == '' and row['peak_mem_gib'] == ''  # no val split, no GPU
        assert row['includes_compile'] == '0'  # --compile False
    assert float(rows[1]['lr']) < float(rows[0]['lr'])  # cosine decay
    tensors = load_file(run_dir / 'trainable.safetensors')
    assert sum(t.numel() for t in tensors.values()) == config['trainable_params']
    if not full:
        assert set(tensors) == {'vit.head.weight', 'vit.head.bias'} | ({'prompts.tokens'} if prompts else set())
    assert 'epoch 2/2' in out and 'test loss' in out


def test_images_per_second_time_the_training_alone(tiny_dataset, tmp_path, capsys, monkeypatch):
    """metrics.csv: train_images_per_s divides the epoch's training images by the training time alone, epoch_time_s
    includes the evaluation. A fake clock: each training batch takes 1 s, each evaluation 100 s."""
    import types
    import data
    import train
    clock = [0.0]
    monkeypatch.setattr(train, 'time', types.SimpleNamespace(perf_counter=lambda: clock[0]))
    batches, evaluate_split = data.train_batches, train.evaluate_split

    def one_second_each(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            clock[0] += 1.0
            yield batch

    def hundred_seconds(*args, **kwargs):
        clock[0] += 100.0
        return evaluate_split(*args, **kwargs)
    monkeypatch.setattr(data, 'train_batches', one_second_each)
    monkeypatch.setattr(train, 'evaluate_split', hundred_seconds)
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8, '--log_dir', tmp_path,
                             '--name', 'r'], capsys)
    assert code == 0, err
    (row,) = read_metrics(tmp_path / 'r')  # 48 training images: 6 batches of 8, then one test evaluation
    assert (float(row['train_images_per_s']), float(row['epoch_time_s'])) == (8.0, 106.0)


def test_runs_never_share_a_directory(tiny_dataset, tmp_path, capsys):
    argv = [*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 16, '--log_dir', tmp_path]
    assert run_main(argv, capsys)[0] == 0
    assert run_main(argv, capsys)[0] == 0  # same second, same generated name: a fresh directory, nothing overwritten
    assert len(os.listdir(tmp_path)) == 2


def test_generated_run_names_say_the_mode_model_and_time_then_count_up(tmp_path, monkeypatch):
    """<mode>_<model>_<YYYYmmdd-HHMMSS>; runs started in the same second get -2, -3, ... and nothing is reused."""
    import datetime
    import types
    now = datetime.datetime(2024, 1, 2, 3, 4, 5)
    monkeypatch.setattr(main, 'datetime', types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda: now)))
    args = main.parse_args([*map(str, TINY), '--log_dir', str(tmp_path)])
    paths = [main.make_run_dir(args, 'P+F') for _ in range(3)]
    name = os.path.join(str(tmp_path), 'P+F_test_vit_20240102-030405')
    assert paths == [name, f'{name}-2', f'{name}-3']
    assert all(os.path.isdir(path) for path in paths)


def test_learns_the_tiny_dataset(tiny_dataset, tmp_path, capsys):
    # 6 epochs: after 4, one seed stayed at 66.67% under torch 2.4.1 and timm 1.0.16 (the requirements' floor)
    code, _, err = run_main([*TINY, '--prompts', 0, '--full', True, '--dataset', tiny_dataset, '--epoch', 6,
                             '--batch_size', 8, '--lr', 2e-3, '--log_dir', tmp_path, '--name', 'learn'], capsys)
    assert code == 0, err
    assert float(read_metrics(tmp_path / 'learn')[-1]['test_acc']) >= 80  # three colour-coded classes


def test_command_line_then_plot(tiny_dataset, tmp_path):
    """The real entry points: main.py trains and logs, plot.py draws every run under logs/ and prints the table."""
    log_dir = tmp_path / 'logs'
    result = run_cli([*TINY, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 16, '--log_dir', log_dir,
                      '--name', 'cli'])
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    assert len(read_metrics(log_dir / 'cli')) == 2
    result = run_cli([log_dir], script='plot.py')
    assert result.returncode == 0, result.stderr
    png = log_dir / 'accuracy.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    row = next(line for line in result.stdout.splitlines() if line.startswith('cli'))
    assert ' P ' in f' {row} ' and '2' in row.split()


def test_recorded_command_and_resume_hint_work_from_any_directory(tiny_dataset, tmp_path, capsys, monkeypatch):
    """config.json's command and the resume hint name main.py as the user would type it where they are: relative
    below the current directory, absolute elsewhere; under torchrun with its process layout."""
    import train
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8, '--log_dir', 'logs',
                             '--name', 'r'], capsys)
    assert code == 0, err
    command = shlex.split(json.loads((tmp_path / 'logs' / 'r' / 'config.json').read_text())['command'])
    assert command[:2] == ['python', os.path.join(REPO, 'main.py')] and command[2:4] == ['--model', 'test_vit']
    assert train.resume_command('logs/r', 1) == f"python {os.path.join(REPO, 'main.py')} --resume logs/r"
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert train.resume_command('logs/r', 8) == (f"torchrun --nnodes=2 --nproc_per_node=4 "
                                                 f"{os.path.join(REPO, 'main.py')} --resume logs/r  # on each of "
                                                 f"the 2 machines, with the rendezvous flags it was started with")
    monkeypatch.chdir(REPO)
    assert train.resume_command('logs/r', 4) == "torchrun --nproc_per_node=4 main.py --resume logs/r"


def test_recorded_commands_name_main_py_by_a_path_that_works_wherever_they_are_read(tmp_path, monkeypatch):
    """config.json's command (and sweep.json's) is kept without its working directory: from below the repository's
    parent, a relative 'main/main.py' only worked from that one directory."""
    script = os.path.join(REPO, 'main.py')
    monkeypatch.chdir(REPO)
    assert main.script_path(script) == 'main.py'  # as typed there
    for elsewhere in (os.path.dirname(REPO), tmp_path, os.path.join(REPO, 'tests')):
        monkeypatch.chdir(elsewhere)
        assert main.script_path(script) == script


@pytest.mark.parametrize('flags, warned', [(['--prompts', '0', '--prompt_dropout', '0.1'], True),
                                           (['--prompts', '4', '--prompt_dropout', '0.1'], False),
                                           (['--prompts', '0'], False)])
def test_prompt_dropout_without_prompts_is_said(capsys, flags, warned):
    """It drops nothing; a warning rather than an error, as a sweep's grid over prompts=0,50 sets it for both."""
    main.parse_args(flags)
    err = capsys.readouterr().err
    assert err == ("warning: --prompt_dropout 0.1 does nothing with --prompts 0: there are no prompts to drop\n"
                   if warned else '')


def test_the_prompt_dropout_warning_comes_from_the_first_process_of_a_machine(capsys, monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', '1')  # torchrun's other processes
    main.parse_args(['--prompts', '0', '--prompt_dropout', '0.1'])
    assert capsys.readouterr().err == ''


def test_git_commit_is_dirty_when_the_code_differs_not_when_other_files_do(tmp_path):
    """Deleting the old docs/bench-h100.json so that bench.py may write the new one (it never replaces a file) made
    that run's JSON say '-dirty' though no code differed; an edited README likewise. Code and requirements do."""
    import subprocess
    git = lambda *args: subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=tmp_path,
                                       check=True, capture_output=True)
    for name in ('main.py', 'requirements.txt', 'README.md', 'docs/bench.json'):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('x\n')
    git('init', '-q')
    git('add', '.')
    git('commit', '-q', '-m', 'c')
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / 'docs/bench.json').unlink()
    (tmp_path / 'README.md').write_text('edited\n')
    assert main.git_commit(tmp_path) == head
    for name in ('main.py', 'requirements.txt'):
        (tmp_path / name).write_text('changed\n')
        assert main.git_commit(tmp_path) == head + '-dirty'
        git('checkout', '--', name)


def test_git_commit_names_the_code_and_whether_tracked_files_changed(monkeypatch):
    """config.json's and bench.py's git_commit: the commit, '-dirty' when a tracked file differs from it; files git
    does not track (a dataset, logs/) leave it clean."""
    import subprocess
    calls = []

    def fake_git(status):
        def run(command, **kwargs):
            calls.append(command)
            out = 'a' * 40 + '\n' if command[1] == 'rev-parse' else status
            return subprocess.CompletedProcess(command, 0, stdout=out, stderr='')
        return run
    for status, expected in ((' M main.py\n', 'a' * 40 + '-dirty'), ('', 'a' * 40)):
        monkeypatch.setattr(main.subprocess, 'run', fake_git(status))
        assert main.git_commit() == expected
    assert all('--untracked-files=no' in command for command in calls if command[1] == 'status')
    monkeypatch.undo()
    if os.path.isdir(os.path.join(REPO, '.git')):  # a checkout: the real commit
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()
        assert main.git_commit().startswith(head)
