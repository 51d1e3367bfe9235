"""sweep.py: input checks, grid + seeds end to end, interruption and re-launch, scheduler commands, --collect."""
import contextlib
import csv
import fcntl
import gc
import io
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest

import main
import sweep
from conftest import (REPO, TINY, read_metrics, run_cli, run_main, signal_after_first_epoch, signal_on_import,
                      stderr_when_the_reader_goes_away, write_folder_dataset)

# one torch thread per trial: two trials at a time (or other tests beside these) on a small CPU otherwise slow each
# other down many times over, OpenMP threads spinning while they wait for a core
ENV = {'OMP_NUM_THREADS': '1'}


def run_sweep(argv, **kwargs):
    return run_cli(argv, script='sweep.py', env=ENV, **kwargs)


def check_models_here(names):
    """sweep.check_models' check (main.py's check_model_args) in this process, where timm is imported once, instead of
    in a child process that imports torch and timm afresh (seconds) for each sweep a test makes."""
    from model import check_model_args
    for name in names:
        try:
            check_model_args(name)
        except SystemExit as e:
            sweep.fail(str(e.code).removeprefix('error: '), 2)


def sweep_in_this_process(monkeypatch):
    """sweep.py's process-wide state made fresh for a sweep run in this process, whose signal handlers stay pytest's."""
    monkeypatch.setattr(sweep, 'CHILDREN', {})
    monkeypatch.setattr(sweep, 'STOP', [])
    monkeypatch.setattr(sweep.signal, 'signal', lambda signum, handler: None)


def sweep_here(argv, monkeypatch, cwd=None):
    """python sweep.py ARGV in this process -> (exit code, stdout, stderr): the same parsing, checks, trials (main.py
    child processes) and messages as run_sweep, without a sweep.py process and its --model check child importing
    torch and timm (seconds). For tests that are not about sweep.py's own process (its signals, its pipes)."""
    import contextlib
    import io
    sweep_in_this_process(monkeypatch)
    monkeypatch.setattr(sweep, 'check_models', check_models_here)
    monkeypatch.setattr(sys, 'argv', [os.path.join(REPO, 'sweep.py'), *map(str, argv)])
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    if cwd is not None:
        monkeypatch.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sweep.run_cli()
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def tiny(dataset, epochs=2):
    return [*TINY, '--dataset', dataset, '--epoch', epochs, '--batch_size', 8]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def at_best_val(run_dir):
    """(test acc at the first epoch of highest val acc, final test acc) from a run's own metrics.csv."""
    rows = read_metrics(run_dir)
    best = max(rows, key=lambda row: float(row['val_acc']))  # max keeps the first of equal values
    return float(best['test_acc']), float(rows[-1]['test_acc'])


# ---------------------------------------------------------------- mistakes: one line, nothing created


@pytest.mark.parametrize('argv,expected', [
    (['--grid', 'lrr=1e-3,1e-2', '--val_split', 0.1], 'main.py has no flag --lrr; did you mean lr?'),
    (['--grid', 'lr=1e-3,1e-2', '--val_split', 0.1, '--', '--lr', '1e-3'], '--lr is both in --grid and after --'),
    (['--grid', 'seed=1,2', '--val_split', 0.1], 'sweep.py sets the seeds'),
    (['--grid', 'val_split=0.1,0.2', '--val_split', 0.1], 'pass --val_split to sweep.py itself'),
    (['--grid', 'data_seed=0,1', '--val_split', 0.1], '--data_seed chooses the images, and the grid points must be'),
    (['--grid', 'train_samples=100,200', '--val_split', 0.1], 'pass one --train_samples after --'),
    (['--grid', 'test_split=0.1,0.2', '--val_split', 0.1], 'pass one --test_split after --'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--log_dir', 'x'], 'pass --log_dir to sweep.py itself'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--resume', 'x'], 'sweep.py resumes its runs itself'),
    (['--grid', 'lr=1e-3,1e-2'], '--val_split F with 0 < F < 1 is required'),
    # typed after --: misplaced, not missing ("required" sent a user who had typed it looking for a typo)
    (['--grid', 'lr=1e-3,1e-2', '--', '--val_split', 0.1], '--val_split after --: pass --val_split to sweep.py itself'),
    (['--grid', 'lr=1e-3,1e-2', '--val_split', 1], '--val_split F with 0 < F < 1 is required'),
    # no val split: every grid run would lack a val score, so nothing could win
    (['--grid', 'lr=1e-3,1e-2', '--val_split', 0], '--val_split F with 0 < F < 1 is required'),
    (['--grid', 'lr=1e-3,abc', '--val_split', 0.1], "grid point lr=abc: argument --lr: invalid"),
    (['--grid', 'img_size=30', '--val_split', 0.1], 'grid point img_size=30: --img_size 30 is not divisible'),
    (['--grid', 'lr', '--val_split', 0.1], 'write FLAG=V1,V2,...'),
    (['--grid', 'lr=1e-3,1e-3', '--val_split', 0.1], 'a repeated value'),
    (['--grid', 'lr=1e-3,0.001', '--val_split', 0.1], 'a repeated value (main.py reads two of them alike)'),
    (['--grid', 'lr=1e-3,', '--val_split', 0.1], 'an empty value'),
    (['--grid', 'lr=1e-3', '--grid', 'lr=1e-2', '--val_split', 0.1], 'names lr twice'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--seed', 4294967295], 'leaves no room for stage 2'),
    (['--grid', 'lr=1e-3', 'lr=1e-2', '--val_split', 0.1], 'names lr twice'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--seeds', 0], 'stage 2 needs at least 1 seed'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--full', 'False'], "--full is a main.py flag: put it after the --"),
    # argparse would read --seed as an abbreviation of --seeds: 7 stage-2 seeds instead of seeds from 7
    (['--grid', 'lr=1e-3', '--seeds', 3, '--seed', 7, '--val_split', 0.1], "--seed is a main.py flag: put it after"),
    (['--grid', 'lr=1e-3', '--seed=7', '--val_split', 0.1], "--seed is a main.py flag: put it after the --"),
    (['--grid', 'lr=1e-3', '--val', 0.1], 'unrecognized arguments: --val 0.1'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--sedes', 2], 'unrecognized arguments: --sedes 2; did you mean --seeds?'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--bogus', '1'], 'unrecognized arguments: --bogus'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--epochs', '1'], '--epochs 1; did you mean --epoch?'),
    (['--val_split', 0.1, '--', '--lr', '1e-3'], '--grid is required'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--epoch', '2', '--print_commands'],
     "--print_commands is sweep.py's own flag: put it before the --"),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--seeds=2'], "--seeds is sweep.py's own flag"),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--gpus', '0,,1'], '--gpus'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--dataset', 'nowhere'], "--dataset 'nowhere' is neither"),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--weights', 'ViT-B_16.npz'], '--weights ViT-B_16.npz: no such'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--', '--model', 'test_vitt'], "unknown --model 'test_vitt'"),
    (['--grid', 'model=test_vit,vit_small_r26_s32_224', '--val_split', 0.1], 'vit_small_r26_s32_224 is a hybrid ViT'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--name', 'a/b'], "--name 'a/b' must be a plain directory name"),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--gpus', '0,0'], "--gpus '0,0': list distinct GPU ids"),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--gpus', '0,1', '--print_commands'],
     '--print_commands leaves GPUs to your scheduler; drop --gpus'),
    (['--grid', 'lr=1e-3', '--val_split', 0.1, '--collect', 'logs/s'], '--collect takes only the sweep directory'),
])
def test_mistakes_get_one_line_and_create_nothing(tmp_path, argv, expected):
    split = argv.index('--') if '--' in argv else len(argv)
    result = run_sweep([*argv[:split], '--log_dir', tmp_path / 'logs', *argv[split:]], cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('sweep.py: error: ') and expected in lines[0], result.stderr
    assert result.stdout == ''
    assert os.listdir(tmp_path) == []


def test_gpus_where_torch_sees_none_are_refused_before_anything_runs(tmp_path):
    """--gpus gives each trial --device cuda: without a GPU every trial would fail in turn."""
    argv = ['--grid', 'lr=1e-3', '--val_split', 0.1, '--gpus', '0', '--log_dir', tmp_path, '--', '--dataset', 'cifar10']
    result = run_cli(argv, script='sweep.py', env=dict(ENV, CUDA_VISIBLE_DEVICES=''))  # no GPU, on any machine
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert '--gpus 0: torch sees no CUDA GPU here' in result.stderr and 'drop --gpus' in result.stderr
    assert os.listdir(tmp_path) == []


def test_grid_entries_add_up_and_a_comma_can_be_escaped():
    args = sweep.make_parser().parse_args(['--grid', 'lr=1e-3, 1e-2', '--grid', r'unfreeze=pos_embed,cls_token\,pos_embed'])
    assert sweep.parse_grid(args.grid, {}) == {'lr': ['1e-3', '1e-2'], 'unfreeze': ['pos_embed', 'cls_token,pos_embed']}



def test_a_tilde_in_sweep_paths_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))  # the shell leaves ~ after --log_dir= alone
    args = sweep.make_parser().parse_args(['--log_dir=~/logs', '--collect=~/logs/s', '--compare=~/a'])
    assert (args.log_dir, args.collect, args.compare) == (
        str(tmp_path / 'logs'), str(tmp_path / 'logs' / 's'), [str(tmp_path / 'a')])


def test_a_system_without_fcntl_is_one_line_naming_wsl(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'fcntl', None)  # `import fcntl` raises ImportError, as on Windows
    with pytest.raises(SystemExit) as error:
        sweep.main(['--grid', 'lr=1e-3,1e-2', '--log_dir', str(tmp_path), '--', '--model', 'test_vit'])
    assert error.value.code == 1 and 'run it in WSL2' in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_folder_without_sweep_json_names_only_the_sweeps_in_it(tmp_path, capsys):
    """--collect/--compare given the --log_dir a sweep is in: the hint names its sweeps (one is 'the sweep', past
    five the rest are counted), not main.py's runs beside them; a missing path or a file is one line too."""
    logs = tmp_path / 'logs'
    os.makedirs(logs / 'run_P')  # a main.py run in the same --log_dir
    (logs / 'run_P' / 'config.json').write_text('{}')

    def error(*argv):
        with pytest.raises(SystemExit) as stopped:
            sweep.main([str(a) for a in argv])
        assert stopped.value.code == 1
        return capsys.readouterr().err
    os.makedirs(logs / 'sweep_a')
    (logs / 'sweep_a' / 'sweep.json').write_text('{}')
    assert error('--collect', logs) == (
        f"sweep.py: error: {logs} has no readable sweep.json; --collect reads a directory that sweep.py made; it holds "
        f"the sweep sweep_a: pass one, such as {logs / 'sweep_a'}\n")
    for name in 'bcdef':
        os.makedirs(logs / f'sweep_{name}')
        (logs / f'sweep_{name}' / 'sweep.json').write_text('{}')
    assert error('--compare', logs).endswith(
        f"; it holds the sweeps sweep_a, sweep_b, sweep_c, sweep_d, sweep_e and 1 more: pass their directories, such "
        f"as {logs / 'sweep_a'}\n")
    for path in (tmp_path / 'nowhere', logs / 'run_P' / 'config.json'):
        assert error('--collect', path) == (f"sweep.py: error: {path} has no readable sweep.json; --collect reads a "
                                            f"directory that sweep.py made\n")


def test_sweep_starts_without_torch():
    code = "import sys; import sweep; assert 'torch' not in sys.modules, 'sweep.py imported torch'"
    subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_trial_commands_on_gpus_and_resume(tmp_path):
    trial = dict(name='grid_lr=1e-3', argv=['--lr', '1e-3', '--seed', '0', '--log_dir', str(tmp_path), '--name',
                                             'grid_lr=1e-3'])
    run_dir = str(tmp_path / 'grid_lr=1e-3')
    command, env, _ = sweep.child_command(trial, run_dir, '3', add_device=True)
    assert command == [sys.executable, sweep.MAIN_PY, *trial['argv'], '--device', 'cuda']
    assert env['CUDA_VISIBLE_DEVICES'] == '3'
    command, env, _ = sweep.child_command(trial, run_dir, '3', add_device=False)  # the user chose --device
    assert command[-2:] == ['--name', 'grid_lr=1e-3'] and env['CUDA_VISIBLE_DEVICES'] == '3'
    command, env, _ = sweep.child_command(trial, run_dir, None, add_device=True)  # no --gpus: the environment as is
    assert command[2:] == trial['argv'] and env.get('CUDA_VISIBLE_DEVICES') == os.environ.get('CUDA_VISIBLE_DEVICES')
    os.makedirs(run_dir)
    open(os.path.join(run_dir, 'state.pt'), 'w').close()
    command, _, what = sweep.child_command(trial, run_dir, '1', add_device=True)
    assert command[2:] == ['--resume', run_dir, '--device', 'cuda'] and what.startswith('resume')


def test_run_without_checkpoint_is_moved_aside_not_deleted(tmp_path, monkeypatch):
    launched = []

    class FakeChild:
        def __init__(self, command, **kwargs):
            launched.append(command)
    monkeypatch.setattr(sweep.subprocess, 'Popen', FakeChild)
    monkeypatch.setattr(sweep, 'CHILDREN', {})
    trial = dict(name='grid_lr=1e-3', argv=['--lr', '1e-3'])
    for attempt in (1, 2):
        os.makedirs(tmp_path / 'grid_lr=1e-3')
        (tmp_path / 'grid_lr=1e-3' / 'config.json').write_text(f'{{"attempt": {attempt}}}')
        assert sweep.start_trial(str(tmp_path), trial, None, add_device=False) is not None
        assert json.loads((tmp_path / f'grid_lr=1e-3.failed-{attempt}' / 'config.json').read_text()) == {
            'attempt': attempt}
        assert not (tmp_path / 'grid_lr=1e-3').exists() and launched[-1][2:] == ['--lr', '1e-3']
    assert 'moved it to grid_lr=1e-3.failed-2' in (tmp_path / 'sweep.log').read_text()


def test_a_run_is_moved_aside_past_a_dangling_link_of_its_new_name(tmp_path):
    """A link to a missing file named <run>.failed-1 passed for a free name: the rename onto it stopped the sweep with
    'Not a directory ... mend that', on every re-launch."""
    (tmp_path / 'grid_lr=1e-3').mkdir()
    (tmp_path / 'grid_lr=1e-3.failed-1').symlink_to(tmp_path / 'nowhere')
    assert sweep.move_aside(str(tmp_path / 'grid_lr=1e-3'), 'failed') == 'grid_lr=1e-3.failed-2'
    assert (tmp_path / 'grid_lr=1e-3.failed-2').is_dir() and os.readlink(tmp_path / 'grid_lr=1e-3.failed-1') == str(
        tmp_path / 'nowhere')


# ---------------------------------------------------------------- a whole sweep, two trials at a time

def test_model_is_checked_when_the_sweep_is_made_not_on_every_launch(tmp_path, monkeypatch, capsys):
    """The --model check (a child process importing torch and timm: seconds) runs before sweep.json is written;
    a re-launch of the same sweep (after a stop, or for --print_commands' stage 2) does not pay for it again."""
    checked = []
    monkeypatch.setattr(sweep, 'check_models', checked.append)
    argv = ['--grid', 'lr=1e-3,1e-2', '--val_split', 0.25, '--log_dir', tmp_path, '--name', 's', '--print_commands',
            '--', '--model', 'test_vit', '--dataset', 'cifar10']
    for _ in range(2):
        sweep.main(list(map(str, argv)))
        assert len(capsys.readouterr().out.splitlines()) == 2  # the two stage-1 commands
    assert checked == [['test_vit']]
    monkeypatch.setattr(sweep, 'check_models', lambda names: sweep.fail(f"unknown --model {names[0]!r}", 2))
    with pytest.raises(SystemExit):  # another sweep (here: another model) is checked before it is written
        sweep.main(list(map(str, argv[:5] + ['--name', 't', *argv[7:-1], 'test_vitt'])))
    assert not os.path.exists(tmp_path / 't')



@pytest.fixture(scope='module')
def finished_sweep(tmp_path_factory, tiny_dataset):
    """3 grid points (one diverges) x 2 seeds, on two 'GPU' slots (CPU runs: --device cpu is given)."""
    root = tmp_path_factory.mktemp('sweep')
    with pytest.MonkeyPatch.context() as monkeypatch:  # sweep.py in this process, its trials child processes
        code, out, err = sweep_here(['--grid', 'lr=3e-4,1e-3,1e30', '--seeds', 2, '--val_split', 0.25, '--gpus', '0,1',
                                     '--log_dir', root, '--name', 'sweep', '--', *tiny(tiny_dataset),
                                     '--warmup_epochs', 0], monkeypatch)
    return root / 'sweep', subprocess.CompletedProcess('sweep.py', code, out, err)


def test_sweep_selects_on_val_and_reports_seed_mean_and_std(finished_sweep):
    sweep_dir, result = finished_sweep
    assert 'Traceback' not in result.stdout + result.stderr
    # a diverging grid point is a result of its settings (ranked last, not retried), not a failure of the sweep
    assert result.returncode == 0, result.stderr
    grid = ['grid_lr=3e-4', 'grid_lr=1e-3', 'grid_lr=1e30']
    assert sorted(os.listdir(sweep_dir)) == sorted([*grid, 'final_seed=1', 'final_seed=2', 'logs', 'sweep.csv',
                                                    'sweep.json', 'sweep.lock', 'sweep.log', 'sweep.md'])
    assert sorted(os.listdir(sweep_dir / 'logs')) == sorted(f'{run}.log' for run in [*grid, 'final_seed=1',
                                                                                    'final_seed=2'])
    definition = json.loads((sweep_dir / 'sweep.json').read_text())
    assert definition['grid'] == {'lr': ['3e-4', '1e-3', '1e30']} and definition['seeds'] == 2
    assert definition['val_split'] == 0.25 and definition['main_flags'][:2] == ['--model', 'test_vit']

    # the winner: the highest best_val_acc in the grid runs' own summary.json (the first of equal ones)
    summaries = {run: json.loads((sweep_dir / run / 'summary.json').read_text()) for run in grid}
    winner = max(grid[:2], key=lambda run: summaries[run]['best_val_acc'])
    winning_lr = float(winner.split('=')[1])
    for seed in (1, 2):
        config = json.loads((sweep_dir / f'final_seed={seed}' / 'config.json').read_text())
        assert (config['lr'], config['seed'], config['val_split']) == (winning_lr, seed, 0.25)
    assert json.loads((sweep_dir / 'grid_lr=1e-3' / 'config.json').read_text())['seed'] == 0

    rows = read_csv(sweep_dir / 'sweep.csv')
    assert [(r['run'], r['stage'], r['seed'], r['lr'], r['status']) for r in rows] == [
        ('grid_lr=3e-4', 'grid', '0', '3e-4', 'finished'), ('grid_lr=1e-3', 'grid', '0', '1e-3', 'finished'),
        ('grid_lr=1e30', 'grid', '0', '1e30', 'diverged'),
        ('final_seed=1', 'final', '1', winner.split('=')[1], 'finished'),
        ('final_seed=2', 'final', '2', winner.split('=')[1], 'finished')]
    diverged = rows[2]
    assert diverged['exit_code'] == '3' and 'non-finite training loss' in diverged['message']
    for row in rows[:2]:
        assert float(row['best_val_acc']) == summaries[row['run']]['best_val_acc']
        assert row['epochs_done'] == row['epochs'] == '2'

    # mean ± sample std of the seeds' test accuracy at their best val epoch, recomputed from metrics.csv
    at_best, final = zip(*(at_best_val(sweep_dir / f'final_seed={seed}') for seed in (1, 2)))
    for row, value in zip(rows[3:], at_best):
        assert float(row['test_acc_at_best_val']) == pytest.approx(value, abs=1e-3)
    report = (sweep_dir / 'sweep.md').read_text()
    assert f"**Test accuracy {statistics.mean(at_best):.2f} ± {statistics.stdev(at_best):.2f} %**" in report
    assert f"over n = 2 seeds, min {min(at_best):.2f}, max {max(at_best):.2f})" in report
    assert f"Final-epoch test accuracy: {statistics.mean(final):.2f} ± {statistics.stdev(final):.2f} %" in report
    assert re.search(rf"^\| \*\*winner\*\* \| {re.escape(winner)} \|", report, re.M)
    # the grid table is sorted by val accuracy, the failed point last
    order = [line.split(' | ')[1] for line in report.splitlines() if line.startswith('| ') and 'grid_lr=' in line]
    assert order[-1] == 'grid_lr=1e30' and order[0] == winner
    # the recipe is a command main.py accepts, with the winning flags and the first fresh seed
    recipe = [line.strip() for line in report.splitlines() if line.startswith('    python ')][-1]
    args = main.parse_args(shlex.split(recipe)[2:])
    assert (args.lr, args.seed, args.val_split, args.model) == (winning_lr, 1, 0.25, 'test_vit')
    assert result.stdout.endswith(report)  # the report is printed at the end
    # two trials ran at a time, one per GPU slot; --device cpu was given, so no --device cuda was added
    logs = ''.join((sweep_dir / 'logs' / name).read_text() for name in os.listdir(sweep_dir / 'logs'))
    assert 'CUDA_VISIBLE_DEVICES=0:' in logs and 'CUDA_VISIBLE_DEVICES=1:' in logs and '--device cuda' not in logs


def test_collect_and_print_commands_on_a_finished_sweep(finished_sweep):
    sweep_dir, _ = finished_sweep
    report, table = (sweep_dir / 'sweep.md').read_text(), (sweep_dir / 'sweep.csv').read_text()
    os.remove(sweep_dir / 'sweep.md')
    result = run_sweep(['--collect', sweep_dir])
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / 'sweep.md').read_text() == report == result.stdout
    assert (sweep_dir / 'sweep.csv').read_text() == table
    # everything has run: stage 2 is complete, there is nothing left to print
    definition = json.loads((sweep_dir / 'sweep.json').read_text())
    command = shlex.split(definition['command'])
    command.remove('--gpus')
    command.remove('0,1')
    result = run_sweep([*command[2:command.index('--')], '--print_commands', *command[command.index('--'):]])
    assert result.returncode == 0 and result.stdout == '', result.stderr
    assert 'has finished or diverged: nothing to run' in result.stderr
    # the same sweep again runs nothing: the diverged point is not retried
    result = run_sweep(command[2:])
    assert result.returncode == 0, result.stderr
    assert 'skip   grid_lr=1e30: diverged' in result.stdout and '] start ' not in result.stdout  # no trial launched


def test_a_grid_that_only_diverges_says_so(tiny_dataset, tmp_path, monkeypatch):
    argv = ['--grid', 'lr=1e30,1e31', '--seeds', 1, '--val_split', 0.25, '--log_dir', tmp_path, '--name', 's', '--',
            *tiny(tiny_dataset), '--warmup_epochs', 0]
    code, out, err = sweep_here(argv, monkeypatch, cwd=tmp_path)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(
        'sweep.py: error: every grid point diverged (a non-finite loss), so there is nothing to select')
    assert 'No grid point finished (2 diverged): nothing to select.' in (tmp_path / 's' / 'sweep.md').read_text()
    # the printed report names each failed run's log by a path that opens from where the sweep was launched
    logs = re.findall(r'\(log ([^)]+)\)', out)
    assert len(logs) == 4 and all((tmp_path / log).is_file() for log in logs), out  # launched, failed
    assert not [log for log in logs if os.path.isabs(log)], out  # below the launch directory: relative
    print_commands = [*argv[:argv.index('--')], '--print_commands', *argv[argv.index('--'):]]
    result = run_sweep(print_commands)
    assert result.returncode == 0 and result.stdout == ''  # a scheduler would only diverge again
    assert result.stderr.count('diverged (a non-finite loss): not printed again') == 2
    # runs started from printed commands leave no exit code in the sweep's logs: their summary.json says it
    shutil.rmtree(tmp_path / 's' / 'logs')
    result = run_sweep(print_commands)
    assert result.returncode == 0 and result.stdout == '', result.stdout
    assert result.stderr.count('diverged (a non-finite loss): not printed again') == 2
    result = run_sweep(['--collect', tmp_path / 's'])
    assert 'No grid point finished (2 diverged): nothing to select.' in result.stdout
    assert 'non-finite loss at epoch 1, step' in result.stdout


def test_the_winner_is_chosen_on_val_never_on_test(tmp_path):
    """The grid point with the best val accuracy wins, even where another has a far better test accuracy (on the tiny
    data of the end-to-end sweep the two rankings agree, so that test could not tell)."""
    sweep_dir = tmp_path / 's'
    meta = dict(grid={'lr': ['1e-3', '5e-3']}, seeds=1, val_split=0.25, command='python sweep.py ...',
                main_flags=['--model', 'test_vit'])
    for name, val, test in (('grid_lr=1e-3', 50.0, 90.0), ('grid_lr=5e-3', 60.0, 45.0)):
        os.makedirs(sweep_dir / name)
        (sweep_dir / name / 'summary.json').write_text(json.dumps(dict(
            finished=True, epochs_done=2, epochs=2, best_val_acc=val, best_val_epoch=2, test_acc_at_best_val=test,
            final_test_acc=test)))
    assert sweep.sweep_state(str(sweep_dir), meta, 0)[2]['run'] == 'grid_lr=5e-3'
    assert re.search(r"^\| \*\*winner\*\* \| grid_lr=5e-3 \|", sweep.write_reports(str(sweep_dir), meta, 0), re.M)


@pytest.mark.parametrize('flag, values', [('lr', ['1e-3', '5e-3']), ('data_dir', ['d1', 'd2'])])
def test_finals_that_trained_another_grid_point_are_stale_and_not_counted(tmp_path, monkeypatch, flag, values):
    """A grid run that failed, was retried and then won: the finals trained for the former winner are marked stale
    in sweep.csv (with the values they trained) and left out of the result. Runs are compared by their config.json,
    as main.py resolved them (a path typed relative is stored absolute), so the report is the same from any
    directory; --dataset 'data' (relative, not here) is not checked again."""
    sweep_dir = tmp_path / 's'
    meta = dict(grid={flag: values}, seeds=2, val_split=0.25, command='python sweep.py ...',
                main_flags=['--model', 'test_vit', '--dataset', 'data', '--epoch', '2'])
    resolved = {'1e-3': 1e-3, '5e-3': 5e-3, 'd1': str(tmp_path / 'd1'), 'd2': str(tmp_path / 'd2')}

    def run(name, value, best_val_acc, test_acc):
        os.makedirs(sweep_dir / name)
        config = {flag: resolved[value], 'dataset': str(tmp_path / 'data')}
        (sweep_dir / name / 'config.json').write_text(json.dumps(config))
        (sweep_dir / name / 'summary.json').write_text(json.dumps(dict(
            finished=True, epochs_done=2, epochs=2, best_val_acc=best_val_acc, best_val_epoch=2,
            test_acc_at_best_val=test_acc, final_test_acc=test_acc)))
    run(f'grid_{flag}={values[0]}', values[0], 50.0, 40.0)
    run(f'grid_{flag}={values[1]}', values[1], 60.0, 45.0)  # the winner
    run('final_seed=1', values[0], 55.0, 41.0)  # trained when the first grid point led
    run('final_seed=2', values[1], 61.0, 47.0)
    monkeypatch.chdir(tmp_path / 's')  # not where the sweep was launched
    report = sweep.write_reports(str(sweep_dir), meta, 0)
    rows = read_csv(sweep_dir / 'sweep.csv')
    assert [(row['run'], row[flag], row['status']) for row in rows[2:]] == [
        ('final_seed=1', str(resolved[values[0]]), 'stale'), ('final_seed=2', values[1], 'finished')]
    assert ('**Test accuracy 47.00 %** (n = 1 seed, so no std; 1 of 2 seeds trained otherwise than the sweep asks '
            '(stale)') in report
    assert '**Warning**: final_seed=1 trained another grid point than the winner' in report


def test_collect_waits_for_a_running_sweep(finished_sweep):
    import fcntl
    sweep_dir, _ = finished_sweep
    before = (sweep_dir / 'sweep.md').read_text()
    with open(sweep_dir / 'sweep.lock', 'w') as lock:  # as a running sweep.py holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_sweep(['--collect', sweep_dir])
    assert result.returncode == 1 and result.stderr.strip() == (
        f"sweep.py: error: another sweep.py is running on {sweep_dir}; let it finish or stop it first")
    assert (sweep_dir / 'sweep.md').read_text() == before


# ---------------------------------------------------------------- interrupted, then re-launched


@pytest.fixture(scope='module')
def slower_dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp('sweep_data') / 'data', train_per_class=48, test_per_class=8)


def child_pids(pid, script):
    """The processes that `pid` started to run `script` (Linux /proc), not the git or other helpers it runs."""
    children = []
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                parent = int(f.read().rsplit(') ', 1)[1].split()[1])
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                command = f.read().split(b'\0')
        except (OSError, IndexError, ValueError):  # not a process, or one that just ended
            continue
        if parent == pid and any(os.path.basename(arg) == script.encode() for arg in command):
            children.append(int(entry))
    return children


def handles_sigterm(pids):
    """Whether one of these processes has its own SIGTERM handler (Linux: the SigCgt mask of /proc/PID/status)."""
    for pid in pids:
        try:
            with open(f'/proc/{pid}/status') as f:
                caught = int(re.search(r'^SigCgt:\s*([0-9a-f]+)$', f.read(), re.M).group(1), 16)
        except (OSError, AttributeError):
            continue
        if caught & 1 << (signal.SIGTERM - 1):
            return True
    return False


def test_a_trial_stopped_before_its_first_checkpoint_is_not_called_resumable(tiny_dataset, tmp_path):
    """Ctrl-C while a trial still imports torch: it has nothing to resume, and its end line says so."""
    import time
    argv = ['--grid', 'lr=1e-3', '--seeds', 1, '--val_split', 0.25, '--log_dir', tmp_path, '--name', 's', '--',
            *tiny(tiny_dataset)]
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'sweep.py'), *map(str, argv)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, PYTHONUNBUFFERED='1', **ENV))
    log = tmp_path / 's' / 'sweep.log'
    while not handles_sigterm(child_pids(process.pid, 'main.py')) and process.poll() is None:
        time.sleep(0.005)
    # main.py takes SIGINT and SIGTERM over first thing, before it imports torch (a second or more) on the way to its
    # first checkpoint: a signal now finds its handler and no checkpoint (a fixed wait raced the import)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert not os.path.exists(tmp_path / 's' / 'grid_lr=1e-3' / 'state.pt')
    assert ('end    grid_lr=1e-3: missing, stopped before its first checkpoint, starts afresh on a re-launch'
            in log.read_text()), log.read_text()
    assert f"sweep {tmp_path / 's'}: stage 1, 1 grid point; then stage 2, 1 seed\n" in log.read_text()


def test_a_sweep_mixing_old_and_new_folder_reading_says_so(tiny_dataset, tmp_path, monkeypatch, capsys,
                                                           one_torch_thread):
    """A sweep begun by an older vpt (another folder_reading), re-launched now: its new trials may read other images."""
    argv = ['--grid', 'lr=1e-3', '--seeds', 1, '--val_split', 0.25, '--log_dir', tmp_path, '--name', 's', '--',
            *tiny(tiny_dataset, epochs=1)]
    print_commands = [*argv[:argv.index('--')], '--print_commands', *argv[argv.index('--'):]]
    for stage in (1, 2):  # both stages run from printed commands in this process, not as two trials importing torch
        code, out, err = sweep_here(print_commands, monkeypatch)
        assert code == 0 and len(out.splitlines()) == 1, err
        code, _, err = run_main(shlex.split(out)[2:], capsys)
        assert code == 0, err
    config_path = tmp_path / 's' / 'grid_lr=1e-3' / 'config.json'
    config = json.loads(config_path.read_text())
    assert config['folder_reading'] == sweep.FOLDER_READING  # sweep.py's copy of data.FOLDER_READING
    config['folder_reading'] = 2  # as main.py wrote it before linked folders beside their target were read once
    config['dataset_images']['train'] += 1  # a linked folder beside its target, read twice then: not other data
    config_path.write_text(json.dumps(config))
    result = run_sweep(argv)  # everything finished: nothing new starts, nothing to say
    assert result.returncode == 0 and 'warning' not in result.stdout
    shutil.rmtree(tmp_path / 's' / 'final_seed=1')
    result = run_sweep(argv)
    assert result.returncode == 0, result.stderr
    assert ('warning: grid_lr=1e-3 (folder_reading 2) read the dataset folder as an older vpt did; a trial started '
            'now reads it as main.py does today (folder_reading 6)' in result.stdout), result.stdout
    assert not os.path.exists(tmp_path / 's' / 'set-aside')  # warned about, not taken for a changed dataset


def test_interrupted_sweep_relaunched_skips_finished_and_resumes(slower_dataset, tmp_path, monkeypatch):
    argv = ['--grid', 'prompt_dropout=0.1', '--seeds', 1, '--val_split', 0.25, '--log_dir', tmp_path, '--name', 's',
            '--', *tiny(slower_dataset, epochs=3)]
    sweep_dir = tmp_path / 's'
    # the sweep made (and its --model checked) here first, as --print_commands makes it: the launch below then skips
    # the check's child process (seconds), which test_model_is_checked_when_the_sweep_is_made_not_on_every_launch covers
    code, out, err = sweep_here([*argv[:argv.index('--')], '--print_commands', *argv[argv.index('--'):]],
                                monkeypatch)
    assert code == 0 and len(out.splitlines()) == 1, err
    assert sorted(os.listdir(sweep_dir)) == ['sweep.json', 'sweep.lock']
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'sweep.py'), *map(str, argv)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, PYTHONUNBUFFERED='1', **ENV))
    # Ctrl-C, as a terminal sends it to the whole process group, once the final run has finished its epoch 1
    watcher = signal_after_first_epoch(process, sweep_dir / 'final_seed=1', signal.SIGINT, group=True)
    out, err = process.communicate(timeout=300)
    watcher.join()
    assert process.returncode == 130, err
    assert 'Traceback' not in out + err
    relaunch = shlex.join(['python', main.script_path(os.path.join(REPO, 'sweep.py')), *map(str, argv)])
    assert err.strip().splitlines()[-1].strip() == relaunch
    rows = {row['run']: row for row in read_csv(sweep_dir / 'sweep.csv')}
    assert rows['grid_prompt_dropout=0.1']['status'] == 'finished'
    assert rows['final_seed=1']['status'] == 'interrupted' and rows['final_seed=1']['epochs_done'] == '1'
    assert 'Stage 2: grid_prompt_dropout=0.1' in out
    grid_metrics = sweep_dir / 'grid_prompt_dropout=0.1' / 'metrics.csv'
    grid_before, grid_mtime = grid_metrics.read_text(), os.stat(grid_metrics).st_mtime_ns
    (epoch1,) = read_metrics(sweep_dir / 'final_seed=1')

    result = run_sweep(argv)  # the same command again
    assert result.returncode == 0, result.stderr
    assert 'skip   grid_prompt_dropout=0.1: finished (3 epochs)' in result.stdout
    assert 'resume final_seed=1 after epoch 1' in result.stdout
    assert grid_metrics.read_text() == grid_before and os.stat(grid_metrics).st_mtime_ns == grid_mtime
    resumed = read_metrics(sweep_dir / 'final_seed=1')
    assert len(resumed) == 3 and resumed[0] == epoch1
    assert [row['status'] for row in read_csv(sweep_dir / 'sweep.csv')] == ['finished', 'finished']
    log = (sweep_dir / 'logs' / 'final_seed=1.log').read_text()
    assert log.count('[sweep]') == 4 and 'exit code 130' in log and '--resume' in log  # both attempts kept
    assert 'skip   grid_prompt_dropout=0.1' in (sweep_dir / 'sweep.log').read_text()


# ---------------------------------------------------------------- beyond one machine: commands for a scheduler


def test_print_commands_for_a_scheduler_then_collect(tiny_dataset, tmp_path, capsys, monkeypatch, one_torch_thread):
    sweep_argv = ['--grid', 'lr=3e-4,1e-3', '--seeds', 1, '--val_split', 0.25, '--log_dir', tmp_path, '--name', 's']
    main_argv = ['--', *tiny(tiny_dataset)]
    code, out, err = sweep_here([*sweep_argv, '--print_commands', *main_argv], monkeypatch)
    assert code == 0, err
    commands = out.splitlines()
    assert len(commands) == 2 and '2 stage 1 commands' in err
    assert sorted(os.listdir(tmp_path / 's')) == ['sweep.json', 'sweep.lock']  # nothing ran
    for command, lr in zip(commands, ('3e-4', '1e-3')):
        words = shlex.split(command)
        assert words[0] == 'python' and os.path.samefile(words[1], os.path.join(REPO, 'main.py'))
        args = main.parse_args(words[2:])
        assert (args.lr, args.seed, args.val_split, args.name) == (float(lr), 0, 0.25, f'grid_lr={lr}')
        assert args.log_dir == str(tmp_path / 's')

    # the same --name with another definition is refused before anything changes
    refused = run_sweep([*sweep_argv[:1], 'lr=1e-2', *sweep_argv[2:], '--print_commands', *main_argv])
    assert refused.returncode != 0 and 'holds another sweep (its grid differ)' in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.strip().endswith(f"none of its runs has started: if its printed commands will never run, "
                                           f"remove {tmp_path / 's'}")  # a typo in a dry run: the way out

    # a scheduler runs them (here: both at once, the second in this process while the first runs)
    child = subprocess.Popen([sys.executable, *shlex.split(commands[0])[1:]], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, **ENV))
    code, _, err = run_main(shlex.split(commands[1])[2:], capsys)
    assert code == 0, err
    assert child.wait(timeout=300) == 0, child.stderr.read()

    # stage 1 is complete: now the stage-2 command of the val winner
    result = run_sweep([*sweep_argv, '--print_commands', *main_argv])
    assert result.returncode == 0
    assert '1 stage 2 command to run from this directory; once it has finished' in result.stderr
    summaries = {lr: json.loads((tmp_path / 's' / f'grid_lr={lr}' / 'summary.json').read_text())
                 for lr in ('3e-4', '1e-3')}
    winner = max(summaries, key=lambda lr: summaries[lr]['best_val_acc'])
    (command,) = result.stdout.splitlines()
    args = main.parse_args(shlex.split(command)[2:])
    assert (args.lr, args.seed, args.name) == (float(winner), 1, 'final_seed=1')

    result = run_sweep(['--collect', tmp_path / 's'])
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^\| \*\*winner\*\* \| grid_lr={winner} \|", result.stdout, re.M)
    assert '| final_seed=1 | 1 | missing |' in result.stdout and 'No stage-2 seed has finished yet.' in result.stdout
    assert [row['status'] for row in read_csv(tmp_path / 's' / 'sweep.csv')] == ['finished', 'finished', 'missing']


def test_a_sweep_never_mixes_two_datasets(tiny_dataset, tmp_path, capsys, monkeypatch, one_torch_thread):
    """A relative --dataset resolves against the working directory, which the sweep's name does not hold, and a
    folder may change between launches: a launch that would train on other data than the sweep's runs is refused."""
    for project in ('a', 'b'):
        shutil.copytree(tiny_dataset, tmp_path / project / 'data')
    argv = ['--grid', 'lr=3e-4,1e-3', '--seeds', 1, '--val_split', 0.25, '--log_dir', tmp_path / 'sweeps', '--name',
            's', '--', *tiny('data', epochs=1)]
    code, out, err = sweep_here(['--print_commands', *argv], monkeypatch, cwd=tmp_path / 'a')  # stays in a
    assert code == 0, err
    first = shlex.split(out.splitlines()[0])  # a scheduler runs one trial in project a (here: in this process)
    assert os.path.samefile(first[1], os.path.join(REPO, 'main.py'))
    code, _, err = run_main(first[2:], capsys)
    assert code == 0, err

    refused = run_sweep(argv, cwd=tmp_path / 'b')  # the same command in project b
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (f"grid_lr=3e-4 of {tmp_path / 'sweeps' / 's'} trained on --dataset {tmp_path / 'a' / 'data'}, but this "
            f"launch reads --dataset as {tmp_path / 'b' / 'data'}: re-launch from the directory the sweep was started "
            f"in") in refused.stderr
    assert sorted(os.listdir(tmp_path / 'sweeps' / 's')) == ['grid_lr=3e-4', 'sweep.json', 'sweep.lock']

    sweep_dir, new_image = tmp_path / 'sweeps' / 's', tmp_path / 'a' / 'data' / 'train' / 'cat' / 'new.png'

    def launch_with_an_image_more(stage_trial):
        """Project a's data gains an image; the trial that starts on it is stopped and moved aside, not counted."""
        shutil.copy(tmp_path / 'a' / 'data' / 'train' / 'cat' / '0000.png', new_image)
        changed = run_sweep(argv, cwd=tmp_path / 'a')
        # the trial is stopped either after its first checkpoint (moved aside) or before it (it removed itself)
        moved = os.path.isdir(sweep_dir / 'set-aside' / f'{stage_trial}.other-data-1')
        assert changed.returncode == 1 and changed.stderr.strip().splitlines()[-1] == (
            f"sweep.py: error: the dataset changed while the sweep ran: grid_lr=3e-4 and {stage_trial} of {sweep_dir} "
            f"read different data from {tmp_path / 'a' / 'data'} (images per split {{'train': 48, 'test': 18}} "
            f"against {{'train': 49, 'test': 18}}); stopped the sweep"
            f"{f' and moved {stage_trial} to set-aside/{stage_trial}.other-data-1' if moved else ''} before a number "
            f"of other data could "
            f"count; restore the data and re-launch, or sweep the data as it is now under another --name"), \
            changed.stderr
        assert not os.path.exists(sweep_dir / stage_trial)
        if moved:  # its log too: an exit status there would still count for the trial
            assert os.path.isfile(sweep_dir / 'set-aside' / f'{stage_trial}.other-data-1.log')
            assert not os.path.exists(sweep_dir / 'logs' / f'{stage_trial}.log')
        os.remove(new_image)  # restored, as the message says

    launch_with_an_image_more('grid_lr=1e-3')  # stage 1
    result = run_sweep(['--print_commands', *argv], cwd=tmp_path / 'a')
    (second,) = [shlex.split(line) for line in result.stdout.splitlines() if 'grid_lr=1e-3' in line]
    assert os.path.samefile(second[1], os.path.join(REPO, 'main.py'))
    code, _, err = run_main(second[2:], capsys)  # in project a, as the first
    assert code == 0, err
    launch_with_an_image_more('final_seed=1')  # stage 2, once stage 1 has finished on the sweep's data
    result = run_sweep(argv, cwd=tmp_path / 'a')
    assert result.returncode == 0, result.stderr
    assert [row['status'] for row in read_csv(sweep_dir / 'sweep.csv')] == ['finished'] * 3
    assert run_sweep(['--collect', sweep_dir]).returncode == 0


def fake_sweep(root, seeds, finals, base_seed=0, grid=(('grid_lr=1e-3', 50.0, 80.0),), main_flags=()):
    """A sweep directory with finished grid runs and final runs written from summaries:
    finals = [(seed, summary overrides)]."""
    meta = dict(grid={'lr': [name.split('=')[1] for name, _, _ in grid]}, seeds=seeds, val_split=0.25,
                command='python sweep.py ...', main_flags=['--model', 'test_vit', *main_flags])
    os.makedirs(root)
    with open(os.path.join(root, 'sweep.json'), 'w') as f:
        json.dump(meta, f)

    def write(name, **summary):
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, 'summary.json'), 'w') as f:
            json.dump(dict(dict(finished=True, epochs_done=2, epochs=2, best_val_epoch=1), **summary), f)
    for name, val, test in grid:
        write(name, best_val_acc=val, test_acc_at_best_val=test, final_test_acc=test)
    for seed, summary in finals:
        write(f'final_seed={seed}', **summary)
    return meta


def test_report_numbers_are_those_of_the_seeds(tmp_path):
    root = str(tmp_path / 's')
    meta = fake_sweep(root, 3, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0)),
                                (2, dict(best_val_acc=60, test_acc_at_best_val=74.0, final_test_acc=62.0)),
                                (3, dict(best_val_acc=60, test_acc_at_best_val=78.0, final_test_acc=67.0))])
    report = sweep.write_reports(root, meta, 0)
    assert '**Test accuracy 74.00 ± 4.00 %** (mean ± sample std over n = 3 seeds, min 70.00, max 78.00)' in report
    assert 'Final-epoch test accuracy: 63.00 ± 3.61 %.' in report


def test_a_diverged_seed_is_left_out_of_the_mean(tmp_path):
    root = str(tmp_path / 's')
    meta = fake_sweep(root, 2, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0)),
                                (2, dict(finished=False, epochs_done=1, best_val_acc=60, test_acc_at_best_val=10.0,
                                         final_test_acc=10.0, diverged=dict(epoch=2, step=3)))])
    report = sweep.write_reports(root, meta, 0)
    assert '**Test accuracy 70.00 %** (n = 1 seed, so no std; 1 of 2 seeds diverged' in report


def test_collect_uses_the_sweeps_own_base_seed(tmp_path, capsys):
    root = str(tmp_path / 's')
    fake_sweep(root, 2, [(6, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0)),
                         (7, dict(best_val_acc=60, test_acc_at_best_val=74.0, final_test_acc=62.0))],
               main_flags=('--seed', '5'))
    sweep.collect(root)
    out = capsys.readouterr().out
    assert '**Test accuracy 72.00 ± 2.83 %**' in out and 'seeds 6..7' in out



@pytest.mark.parametrize('damaged', ['[' * 100000 + ']' * 100000, '"finished"', '[1]'])
def test_a_summary_json_that_holds_no_object_is_no_summary_not_a_traceback(tmp_path, capsys, damaged):
    """JSON nested deeper than the decoder goes (a damaged or hand-edited file) raised RecursionError, not the
    ValueError of other damage, and a string or a list had no .get: --collect (and a re-launch) stopped with a
    traceback instead of reporting the run as unfinished."""
    root = str(tmp_path / 's')
    fake_sweep(root, 1, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))])
    with open(os.path.join(root, 'final_seed=1', 'summary.json'), 'w') as f:
        f.write(damaged)
    sweep.collect(root)
    assert 'No stage-2 seed has finished yet.' in capsys.readouterr().out

def test_collect_into_a_sweep_the_user_may_not_write_names_the_way_out(tmp_path, capsys, monkeypatch):
    """Another user's sweep (its directory 755): the error named the directory, not what to do. Denial is played (the
    tests run as root, whom chmod denies nothing)."""
    root = str(tmp_path / 's')
    fake_sweep(root, 1, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))])

    def denied(sweep_dir, *args):
        raise PermissionError(13, 'Permission denied', os.path.join(sweep_dir, 'sweep.csv'))
    monkeypatch.setattr(sweep, 'write_reports', denied)
    with pytest.raises(SystemExit) as e:
        sweep.collect(root)
    assert e.value.code == 1 and capsys.readouterr().err == (
        f"sweep.py: error: cannot write the reports into {root} (Permission denied); make it writable (chmod u+w, or "
        f"ask its owner), or --collect a copy of it\n")


def deny(monkeypatch, *paths, mode=os.R_OK | os.W_OK | os.X_OK):
    """os.access and sweep.py's open as for a user who may not read (os.R_OK) or write (os.W_OK) `paths`: the tests
    run as root, whom chmod denies nothing."""
    denied = {str(path) for path in paths}
    access, builtin_open = os.access, open
    monkeypatch.setattr(os, 'access', lambda path, asked, **kwargs: not (str(path) in denied and asked & mode)
                        and access(path, asked, **kwargs))

    def opens(path, flags='r', *args, **kwargs):
        if str(path) in denied and mode & (os.R_OK if flags.startswith('r') else os.W_OK):
            raise PermissionError(13, 'Permission denied', str(path))
        return builtin_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(sweep, 'open', opens, raising=False)


def relaunch_fake_sweep(tmp_path, monkeypatch, *extra):
    """sweep.main on fake_sweep(tmp_path / 's', 1 seed) -> (exit code, stderr, the trials it would have run)."""
    launched = []
    gc.collect()  # the lock of a sweep.py that failed in this process is released with its frames
    sweep_in_this_process(monkeypatch)
    monkeypatch.setattr(sweep, 'run_trials', lambda sweep_dir, meta, base_seed, trials, *args: launched.extend(
        trial['name'] for trial in trials))
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            sweep.main(['--grid', 'lr=1e-3', '--seeds', '1', '--val_split', '0.25', '--log_dir', str(tmp_path),
                        '--name', 's', *extra, '--', '--model', 'test_vit'])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue(), launched


def test_a_run_the_user_may_not_read_is_said_not_resumed_nor_miscounted(tmp_path, monkeypatch, capsys):
    """A finished seed's summary.json without read permission looked missing: the run was called interrupted,
    resumed (main.py said it had finished) and the sweep ended 'did not finish'; --collect reported it interrupted."""
    root = tmp_path / 's'
    fake_sweep(str(root), 1, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))])
    summary = root / 'final_seed=1' / 'summary.json'
    deny(monkeypatch, summary, mode=os.R_OK)
    expected = (f"sweep.py: error: cannot read {summary} (permission denied), where sweep.py learns how a run ended; "
                f"make it readable (chmod u+r, or ask its owner) and ")
    code, err, launched = relaunch_fake_sweep(tmp_path, monkeypatch)
    assert (code, err, launched) == (1, expected + "re-launch the same command\n", [])
    for action in (sweep.collect, lambda root: sweep.compare([root])):
        gc.collect()
        with pytest.raises(SystemExit):
            action(str(root))
        assert capsys.readouterr().err == expected + "run the same command again\n"
    assert not (root / 'sweep.csv').exists()



@pytest.mark.parametrize('denied, mode, chmod', [('logs', os.R_OK, 'u+rx'), ('logs/final_seed=1.log', os.R_OK, 'u+r'),
                                                 ('final_seed=1/config.json', os.R_OK, 'u+r'),
                                                 ('final_seed=1', os.R_OK, 'u+rx'), ('final_seed=1', os.X_OK, 'u+rx')])
def test_every_file_a_relaunch_learns_a_run_s_end_from_is_said_when_the_user_may_not_read_it(tmp_path, monkeypatch,
                                                                                              denied, mode, chmod):
    """The logs (the trials' exit codes), a run's config.json (what it trained) and its directory, which looks empty
    when it may be listed but not entered (chmod 644), are read as summary.json is: said before any is read."""
    root = tmp_path / 's'
    fake_sweep(str(root), 1, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))])
    os.makedirs(root / 'logs')
    (root / 'logs' / 'final_seed=1.log').write_text('[sweep] x exit code 0\n')
    (root / 'final_seed=1' / 'config.json').write_text('{}')
    deny(monkeypatch, root / denied, mode=mode)
    code, err, launched = relaunch_fake_sweep(tmp_path, monkeypatch)
    assert (code, err, launched) == (1, f"sweep.py: error: cannot read {root / denied} (permission denied), where "
                                        f"sweep.py learns how a run ended; make it readable (chmod {chmod}, or ask its "
                                        f"owner) and re-launch the same command\n", [])


def test_a_finished_run_s_log_the_user_may_not_write_stops_nothing(tmp_path, monkeypatch):
    """A re-launch appends to the logs of the runs it starts or resumes only: a finished run's read-only log (a sweep
    copied from another user) is no reason to refuse it."""
    root = tmp_path / 's'
    fake_sweep(str(root), 1, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))])
    os.makedirs(root / 'logs')
    (root / 'logs' / 'final_seed=1.log').write_text('[sweep] x exit code 0\n')
    deny(monkeypatch, root / 'logs' / 'final_seed=1.log', mode=os.W_OK)
    code, err, launched = relaunch_fake_sweep(tmp_path, monkeypatch)
    assert code == 0 and 'cannot write' not in err, err

def test_a_sweep_json_the_user_may_not_read_is_not_called_damaged(tmp_path, monkeypatch, capsys):
    """'repair or remove it' was the advice: removing a sweep's definition is no fix for a permission."""
    root = tmp_path / 's'
    fake_sweep(str(root), 1, [])
    deny(monkeypatch, root / 'sweep.json', mode=os.R_OK)
    code, err, launched = relaunch_fake_sweep(tmp_path, monkeypatch)
    assert (code, err, launched) == (1, f"sweep.py: error: cannot read {root / 'sweep.json'} (permission denied); "
                                        f"make it readable (chmod u+r, or ask its owner) and re-launch the same "
                                        f"command\n", [])
    with pytest.raises(SystemExit):
        sweep.collect(str(root))
    assert 'sweep.json (permission denied); make it readable (chmod u+r' in capsys.readouterr().err


def test_a_sweep_the_user_may_not_write_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """A re-launch in a read-only sweep directory planned, logged, then stopped on sweep.csv.tmp with 'mend that
    (free space, permissions)'."""
    root = tmp_path / 's'
    fake_sweep(str(root), 1, [])
    deny(monkeypatch, root, mode=os.W_OK)
    code, err, launched = relaunch_fake_sweep(tmp_path, monkeypatch)
    assert (code, err, launched) == (1, f"sweep.py: error: cannot write into {root} (permission denied); make it "
                                        f"writable (chmod u+w, or ask its owner) and re-launch the same command\n", [])
    assert not (root / 'sweep.log').exists()
    code, err, launched = relaunch_fake_sweep(tmp_path, monkeypatch, '--print_commands')  # writes nothing: allowed
    assert (code, launched) == (0, []) and 'stage 2 command to run' in err
    # on a file system mounted read-only, access() says no to root too, and chmod cannot help
    statvfs = os.statvfs
    monkeypatch.setattr(os, 'statvfs', lambda path: SimpleNamespace(f_flag=os.ST_RDONLY) if str(path) == str(root)
                        else statvfs(path))
    code, err, launched = relaunch_fake_sweep(tmp_path, monkeypatch)
    assert (code, err, launched) == (1, f"sweep.py: error: cannot write into {root} (read-only file system); mount it "
                                        f"writable and re-launch the same command\n", [])


def test_a_dangling_link_among_the_files_a_launch_writes_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """sweep.log or a run's log that is a link to a missing file was appended to through the link (a file made
    elsewhere) or, its folder missing, stopped the sweep midway with 'No such file or directory ... mend that (free
    space, permissions)'; a run directory that is one was started and failed 'already exists; pick another --name'."""
    root = tmp_path / 's'
    fake_sweep(str(root), 1, [])
    for link in (root / 'sweep.log', root / 'logs' / 'final_seed=1.log', root / 'final_seed=1'):
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(tmp_path / 'gone' / 'x')
        code, err, launched = relaunch_fake_sweep(tmp_path, monkeypatch)
        assert (code, err, launched) == (1, f"sweep.py: error: {link} is a link to a missing file "
                                            f"({tmp_path / 'gone' / 'x'}); remove the link, or restore what it names, "
                                            f"and re-launch the same command\n", [])
        link.unlink()
    (root / 'sweep.lock').unlink()  # made by the launches above
    (root / 'sweep.lock').symlink_to(tmp_path / 'gone' / 'x')
    code, err, launched = relaunch_fake_sweep(tmp_path, monkeypatch)
    assert (code, launched) == (1, []) and err.endswith(
        f"; it is a link to a missing file ({tmp_path / 'gone' / 'x'}): remove the link\n")
    assert not (tmp_path / 'gone').exists()


def test_a_read_only_sweep_lock_is_named_not_its_directory(tmp_path, monkeypatch, capsys):
    """'cannot write into DIR ...; choose a writable --log_dir' blamed the directory, and another --log_dir is
    another sweep."""
    deny(monkeypatch, tmp_path / 'sweep.lock', mode=os.W_OK)
    (tmp_path / 'sweep.lock').write_text('')
    with pytest.raises(SystemExit):
        sweep.lock_sweep(str(tmp_path))
    assert capsys.readouterr().err == (f"sweep.py: error: cannot write {tmp_path / 'sweep.lock'} (Permission denied); "
                                       f"make it writable (chmod u+w, or ask its owner)\n")


def test_data_difference_compares_classes_always_and_counts_only_where_comparable():
    counts, more = {'train': 48, 'test': 18}, {'train': 49, 'test': 18}
    read = lambda classes, images, rule: (classes, images, rule, (), None)  # data_read's, no data_sha256
    assert sweep.data_difference(read(['a', 'b'], counts, 3), read(['a', 'c'], counts, 3)) == 'other classes'  # renamed
    assert sweep.data_difference(read(['a', 'b'], counts, 1), read(['a', 'c'], more, 3)) == 'other classes'
    assert sweep.data_difference(read(['a'], counts, 3), read(['a'], more, 3)).startswith('images per split')
    assert sweep.data_difference(read(['a'], counts, 2), read(['a'], more, 3)) == ''  # another rule: warned at launch
    assert sweep.data_difference(read(['a'], None, 3), read(['a'], counts, 3)) == ''  # no counts: an old vpt


def test_runs_that_chose_their_splits_alike_must_have_read_the_same_images():
    """An image replaced, or moved to another class, while a sweep ran keeps every count: config.json's data_sha256
    finds it where the runs chose their images alike (SELECTION); runs of another --val_split or --train_samples, or
    a run recorded before data_sha256, are compared by their counts only."""
    config = dict(dataset='/data/folder', classes=['cat', 'dog'], dataset_images={'train': 48, 'test': 18},
                  folder_reading=sweep.FOLDER_READING, val_split=0.25, data_seed=0, img_size=32, pillow_version='12.0',
                  data_sha256=dict(train='1' * 64, val='2' * 64, test='3' * 64))
    moved = dict(config, data_sha256=dict(config['data_sha256'], train='4' * 64, test='5' * 64))
    assert sweep.data_difference(sweep.data_read(config), sweep.data_read(moved)) == (
        "other images in the train and test splits though the counts agree, by config.json's data_sha256")
    assert sweep.data_difference(sweep.data_read(config), sweep.data_read(dict(config))) == ''
    for other_choice in (dict(moved, val_split=0.1), dict(moved, train_samples=20), dict(moved, img_size=64),
                         dict(moved, pillow_version='11.3'), dict(moved, folder_reading=5),
                         {key: value for key, value in moved.items() if key != 'data_sha256'}):
        assert sweep.data_difference(sweep.data_read(config), sweep.data_read(other_choice)) == ''


def test_a_tie_for_the_best_val_score_is_reported(tmp_path):
    """Small val splits tie often (10.00% each); the first in grid order wins, and the report says so."""
    root = str(tmp_path / 's')
    grid = (('grid_lr=1e-3', 50.0, 80.0), ('grid_lr=5e-3', 40.0, 90.0), ('grid_lr=1e-2', 50.0, 70.0))
    meta = fake_sweep(root, 1, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))],
                      grid=grid)
    report = sweep.write_reports(root, meta, 0)
    assert ("grid_lr=1e-3 ties grid_lr=1e-2 at 50.00% best val accuracy: the first in grid order won. A larger "
            "--val_split (more val images) can tell them apart.") in report
    meta = fake_sweep(str(tmp_path / 'no_tie'), 1, [], grid=grid[:2])
    assert 'ties' not in sweep.write_reports(str(tmp_path / 'no_tie'), meta, 0)
    unfinished = str(tmp_path / 'unfinished')  # a tied score of a run that has not finished is no tie, yet
    meta = fake_sweep(unfinished, 1, [], grid=grid)
    with open(os.path.join(unfinished, 'grid_lr=1e-2', 'summary.json')) as f:
        summary = json.load(f)
    with open(os.path.join(unfinished, 'grid_lr=1e-2', 'summary.json'), 'w') as f:
        json.dump(dict(summary, finished=False, epochs_done=1), f)
    assert 'ties' not in sweep.write_reports(unfinished, meta, 0)
    meta['grid']['lr'].append('2e-2')  # a grid point still to run: the tied leader leads, it has not won
    assert 'grid_lr=1e-3 ties grid_lr=1e-2 at 50.00% best val accuracy: the first in grid order leads' in \
        sweep.write_reports(root, meta, 0)


def test_an_unfinished_grid_run_cannot_win(tmp_path):
    root = str(tmp_path / 's')
    meta = fake_sweep(root, 1, [], grid=(('grid_lr=1e-3', 50.0, 80.0),))
    meta['grid']['lr'].append('5e-3')
    os.makedirs(os.path.join(root, 'grid_lr=5e-3'))  # stopped after epoch 1 of 2, with a higher val score so far
    with open(os.path.join(root, 'grid_lr=5e-3', 'summary.json'), 'w') as f:
        json.dump(dict(finished=False, epochs_done=1, epochs=2, best_val_acc=99.0, best_val_epoch=1,
                       test_acc_at_best_val=90.0, final_test_acc=90.0), f)
    assert sweep.sweep_state(root, meta, 0)[2]['run'] == 'grid_lr=1e-3'


@pytest.mark.parametrize('code,status', [(130, 'interrupted'), (-9, 'failed'), (-37, 'failed')])
def test_a_trial_stopped_by_a_signal_is_interrupted_unless_it_did_not_handle_it(tmp_path, code, status):
    """main.py's own exit after Ctrl-C (130) leaves a run to resume; Popen reports a child killed by SIGKILL (the
    kernel's OOM killer) as exit code -9: a failure the report names as a kill, not an interruption to resume."""
    root = str(tmp_path / 's')
    os.makedirs(os.path.join(root, 'logs'))
    os.makedirs(os.path.join(root, 'grid_lr=1e-3'))
    with open(os.path.join(root, 'logs', 'grid_lr=1e-3.log'), 'w') as f:
        f.write(f'[sweep] start: ...\nepoch 1/2 ...\n\n[sweep] 2024-01-01 00:00:00 exit code {code}\n')
    row = sweep.trial_row(root, dict(name='grid_lr=1e-3', stage='grid', seed=0, values={'lr': '1e-3'}))
    assert row['status'] == status
    killed = "SIGKILL (as the kernel's out-of-memory killer does)" if code == -9 else 'signal 37'
    assert (row['exit_code'], row['message']) == ((None, '') if status == 'interrupted' else (
        code, f"killed by {killed} after: epoch 1/2 ..."))


def test_every_trial_gets_the_data_seed_and_val_split(tmp_path):
    definition = dict(grid={'lr': ['1e-3']}, seeds=2, val_split=0.2,
                      main_flags=['--data_seed', '3', '--seed', '5', '--epoch', '2'])
    trials = sweep.grid_trials(definition, 5, str(tmp_path))
    trials += sweep.final_trials(definition, 5, dict(trials[0], run=trials[0]['name']), str(tmp_path))
    for trial, seed in zip(trials, (5, 6, 7)):
        args = main.parse_args(trial['argv'])
        assert (args.data_seed, args.seed, args.val_split, args.epoch) == (3, seed, 0.2, 2)


def test_a_failed_trial_is_retried(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(sweep.subprocess, 'Popen', lambda command, **kwargs: launched.append(command) or object())
    monkeypatch.setattr(sweep, 'CHILDREN', {})
    os.makedirs(tmp_path / 'logs')
    (tmp_path / 'logs' / 'grid_lr=1e-3.log').write_text('Traceback ...\nRuntimeError: boom\n\n[sweep] x exit code 1\n')
    assert sweep.start_trial(str(tmp_path), dict(name='grid_lr=1e-3', argv=['--lr', '1e-3']), None, False) is not None
    assert launched


def test_a_diverged_trial_is_not_started_again(tmp_path, monkeypatch, capsys):
    """A non-finite loss is a result of the settings: a re-launch skips the trial instead of training it again."""
    launched = []
    monkeypatch.setattr(sweep.subprocess, 'Popen', lambda command, **kwargs: launched.append(command) or object())
    monkeypatch.setattr(sweep, 'CHILDREN', {})
    os.makedirs(tmp_path / 'logs')
    os.makedirs(tmp_path / 'grid_lr=1e-3')
    (tmp_path / 'grid_lr=1e-3' / 'state.pt').write_bytes(b'')
    (tmp_path / 'logs' / 'grid_lr=1e-3.log').write_text('FloatingPointError ...\n\n[sweep] x exit code 3\n')
    assert sweep.start_trial(str(tmp_path), dict(name='grid_lr=1e-3', argv=['--lr', '1e-3']), None, False) is None
    assert launched == [] and 'skip   grid_lr=1e-3: diverged (a non-finite loss)' in capsys.readouterr().out


def test_collect_into_a_pipe_nobody_reads_is_no_traceback(tmp_path):
    root = str(tmp_path / 's')
    fake_sweep(root, 1, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))])
    code, err = stderr_when_the_reader_goes_away(['--collect', root], 'sweep.py')
    assert code == 1 and err == '', err


def test_a_closed_pipe_stops_the_running_trial_too(tmp_path):
    """sweep.py | head: when head has gone, the sweep stops quietly, and so does the trial it had just launched
    (left running, it trained on unseen and held its run's lock, so a re-launch reported it failed)."""
    code = ("import subprocess, sys\n"
            "import sweep\n"
            "trial = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.05)'])\n"
            "sweep.CHILDREN['grid_lr=1e-3'] = trial\n"
            "def reader_gone():\n"
            "    raise BrokenPipeError\n"
            "sweep.main = reader_gone\n"
            "try:\n"
            "    sweep.run_cli()\n"
            "finally:\n"
            "    print('trial', trial.poll(), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == f'trial {-signal.SIGTERM}', result.stderr


def test_a_full_disk_while_the_sweep_runs_is_one_line_and_stops_the_trial(tmp_path):
    """A write of the sweep's own files (sweep.log, sweep.csv, sweep.md) that fails mid-sweep was a traceback that
    left the running trial training on, orphaned."""
    code = ("import errno, subprocess, sys\n"
            "import sweep\n"
            "trial = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.05)'])\n"
            "sweep.CHILDREN['grid_lr=1e-3'] = trial\n"
            "def disk_full():\n"
            "    sweep.write_atomic('sweep.csv', 'run,status\\n')\n"
            "sweep.main = disk_full\n"
            "try:\n"
            "    sweep.run_cli()\n"
            "finally:\n"
            "    print('trial', trial.poll(), file=sys.stderr)\n")
    (tmp_path / 'sweep.csv').write_text('kept\n')
    preload = ("import os, errno\n"  # the disk fills up as the temp file is synced
               "def fsync(fd):\n"
               "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
               "os.fsync = fsync\n")
    result = subprocess.run([sys.executable, '-c', preload + code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        'sweep.py: error: No space left on device: stopped the sweep, its runs keep their last finished epoch; mend '
        'that (free space, permissions) and re-launch the same command', f'trial {-signal.SIGTERM}'], result.stderr
    assert os.listdir(tmp_path) == ['sweep.csv'] and (tmp_path / 'sweep.csv').read_text() == 'kept\n'


def test_the_same_sweep_typed_differently_is_not_started_afresh(tiny_dataset, tmp_path, monkeypatch):
    """A sweep's name hashes its command as typed: re-typing the main.py flags in another order, 0.01 for 1e-2 or
    false for False started the whole sweep again under a new name, without a word."""
    def run(argv):
        return sweep_here(argv, monkeypatch)
    first = ['--grid', 'lr=1e-3,1e-2', '--val_split', 0.25, '--log_dir', tmp_path, '--print_commands', '--',
             *tiny(tiny_dataset), '--full', 'False']
    assert run(first)[0] == 0
    (name,) = os.listdir(tmp_path)
    command = json.loads((tmp_path / name / 'sweep.json').read_text())['command']
    retyped = ['--print_commands', '--log_dir', tmp_path, '--val_split', '0.25', '--grid', 'lr=0.01,0.001', '--',
               '--full', 'false', *tiny(str(tiny_dataset) + '/')]
    code, _, err = run(retyped)
    assert code == 2 and err.strip().splitlines() == [
        f"sweep.py: error: {tmp_path / name} is a sweep of these settings, typed differently; continue it with its "
        f"own command ({command}), or pass --name to start a second one"], err
    assert os.listdir(tmp_path) == [name]
    assert run(first)[0] == 0  # its own command goes on with it
    assert run(['--name', 'second', *retyped])[0] == 0  # a second sweep, asked for by name
    assert sorted(os.listdir(tmp_path)) == sorted([name, 'second'])
    other = ['--grid', 'lr=1e-3,1e-2', '--val_split', 0.25, '--log_dir', tmp_path, '--print_commands', '--',
             *tiny(tiny_dataset), '--full', 'False', '--prompts', 8]  # other settings: a new sweep
    assert run(other)[0] == 0 and len(os.listdir(tmp_path)) == 3


def test_settings_ignore_how_a_sweep_was_typed_but_not_what_it_trains():
    """Two commands for the same sweep (flag order, 0.01 for 1e-2, false for False, a folder with a trailing /) have
    the same settings; another grid, seed count or val split is another sweep, not one to refuse as a retyped twin."""
    base = dict(grid={'lr': ['1e-3', '1e-2']}, seeds=3, val_split=0.1,
                main_flags=['--dataset', 'cifar10', '--data_dir', 'data', '--weights', 'w.npz', '--full', 'False'])
    retyped = dict(grid={'lr': ['0.01', '0.001']}, seeds=3, val_split=0.1,
                   main_flags=['--full', 'false', '--weights', './w.npz', '--data_dir', 'data/',
                               '--dataset', 'cifar10'])
    assert sweep.settings(base) == sweep.settings(retyped)
    for change in (dict(seeds=4), dict(val_split=0.2), dict(grid={'lr': ['1e-3']}),
                   dict(grid={'weight_decay': ['1e-3', '1e-2']}),
                   dict(main_flags=[*base['main_flags'], '--prompts', '8'])):
        assert sweep.settings(dict(base, **change)) != sweep.settings(base), change


def test_a_sweep_json_main_py_no_longer_reads_is_another_sweep(tmp_path, capsys):
    """Looking for a retyped twin reads every sweep.json in --log_dir; one whose main.py flags main.py now refuses
    (a flag since removed) is skipped quietly, and the search goes on to the twin after it."""
    definition = dict(grid={'lr': ['1e-3', '1e-2']}, seeds=3, val_split=0.1, main_flags=['--full', 'False'])
    for name, main_flags in (('a_old', ['--flag_since_removed', '1']), ('b_twin', ['--full', 'false'])):
        os.makedirs(tmp_path / name)
        (tmp_path / name / 'sweep.json').write_text(json.dumps(dict(definition, main_flags=main_flags,
                                                                    command=f'python sweep.py {name}')))
    assert sweep.same_settings_elsewhere(str(tmp_path), definition) == (str(tmp_path / 'b_twin'),
                                                                        'python sweep.py b_twin')
    assert capsys.readouterr().err == ''


FAKE_MAIN = r'''
import json, os, signal, sys, time
argv = sys.argv[1:]
run_dir = os.path.join(argv[argv.index('--log_dir') + 1], argv[argv.index('--name') + 1])
os.makedirs(run_dir)
def stopped(signum, frame):
    open(os.path.join(run_dir, 'got-SIGTERM'), 'w').close()
    time.sleep(1 if run_dir.endswith('same') else 0)  # finishing its checkpoint: the other slot frees first
    sys.exit(143)
signal.signal(signal.SIGTERM, stopped)
classes = json.loads(os.environ['FAKE_CLASSES'])[os.path.basename(run_dir)]
while run_dir.endswith('other') and not os.path.exists(os.path.join(run_dir, '..', 'same', 'config.json')):
    time.sleep(0.01)  # 'same' is training (its SIGTERM handler set) before 'other' shows its data
config = dict(dataset='/data/folder', classes=classes, dataset_images=dict(train=10, test=4), folder_reading=2)
with open(os.path.join(run_dir, 'config.tmp'), 'w') as f:
    json.dump(config, f)
os.replace(os.path.join(run_dir, 'config.tmp'), os.path.join(run_dir, 'config.json'))
time.sleep(20)  # a trial in training, until the sweep stops it
'''


def test_a_fresh_trial_on_changed_data_stops_every_trial_and_only_it_is_set_aside(tmp_path, monkeypatch, capsys):
    """run_trials with two GPU slots and stand-in trials (a script that writes config.json as main.py does once it
    has read the data, then trains until stopped): when one trial started afresh reads other data than the sweep's
    earlier runs, the trial beside it is stopped too, no pending trial starts in the slot freed while that one is still
    stopping, and only the trial of other data moves to set-aside/ (with its log); the one that read the sweep's data
    stays to be resumed."""
    sweep_dir = tmp_path / 'sweep'
    (sweep_dir / 'earlier').mkdir(parents=True)
    config = dict(dataset='/data/folder', classes=['cat', 'dog'], dataset_images=dict(train=10, test=4),
                  folder_reading=2)
    (sweep_dir / 'earlier' / 'config.json').write_text(json.dumps(config))
    (tmp_path / 'fake_main.py').write_text(FAKE_MAIN)
    monkeypatch.setattr(sweep, 'MAIN_PY', str(tmp_path / 'fake_main.py'))
    monkeypatch.setattr(sweep, 'CHILDREN', {})
    monkeypatch.setattr(sweep, 'STOP', [])
    monkeypatch.setattr(sweep, 'write_reports', lambda *args: None)  # the report is not what this test is about
    monkeypatch.setenv('FAKE_CLASSES', json.dumps(dict(same=['cat', 'dog'], other=['cat', 'dog', 'owl'],
                                                       pending=['cat', 'dog'])))
    trials = [dict(name=name, stage='grid', seed=0, values={}, argv=['--log_dir', str(sweep_dir), '--name', name])
              for name in ('same', 'other', 'pending')]
    earlier = dict(name='earlier', stage='grid', seed=0, values={}, argv=[])
    with pytest.raises(SystemExit) as stop:
        sweep.run_trials(str(sweep_dir), {}, 0, trials, ['0', '1'], False, [earlier] + trials)
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert f"earlier and other of {sweep_dir} read different data from /data/folder (other classes)" in error
    assert 'moved other to set-aside/other.other-data-1' in error and 'same to' not in error
    assert (sweep_dir / 'same' / 'got-SIGTERM').exists()  # stopped although its own data was the sweep's
    assert (sweep_dir / 'same' / 'config.json').exists() and (sweep_dir / 'logs' / 'same.log').exists()
    assert (sweep_dir / 'set-aside' / 'other.other-data-1' / 'got-SIGTERM').exists()
    assert (sweep_dir / 'set-aside' / 'other.other-data-1.log').exists() and not (sweep_dir / 'other').exists()
    assert not (sweep_dir / 'pending').exists() and not (sweep_dir / 'logs' / 'pending.log').exists()
    log = (sweep_dir / 'sweep.log').read_text()
    assert 'start  same on GPU 0' in log and 'start  other on GPU 1' in log and 'pending' not in log


# ---------------------------------------------------------------- from a mutation round over sweep.py


def test_the_largest_base_seed_that_leaves_room_for_stage_2_is_accepted():
    """main.py takes seeds up to SEED_MAX: --seed SEED_MAX-3 with --seeds 3 has room for stage 2's last seed."""
    args = sweep.make_parser().parse_args(['--grid', 'lr=1e-3', '--val_split', '0.1', '--seeds', '3'])
    definition, base_seed, _, _ = sweep.check_command_line(args, ['--seed', str(main.SEED_MAX - 3)])
    assert base_seed == main.SEED_MAX - 3
    winner = dict(sweep.grid_trials(definition, base_seed, 'logs/s')[0], run='grid_lr=1e-3')
    last = sweep.final_trials(definition, base_seed, winner, 'logs/s')[-1]
    assert main.parse_args(last['argv']).seed == main.SEED_MAX


def test_a_grid_over_device_is_not_overridden_by_gpus(monkeypatch):
    """--gpus adds --device cuda to each trial only where no --device was chosen: a grid over --device is a choice,
    so no trial gets --device cuda on top of its own, and torch is not asked for GPUs."""
    checked = []
    monkeypatch.setattr(sweep, 'check_cuda', checked.append)
    args = sweep.make_parser().parse_args(['--grid', 'device=cpu,cuda:0', '--val_split', '0.1', '--gpus', '0,1'])
    _, _, device_given, _ = sweep.check_command_line(args, [])
    assert device_given and checked == []


def test_only_a_model_the_user_names_is_checked():
    """main.py's default model needs no check (a child process importing torch and timm: seconds per new sweep)."""
    args = sweep.make_parser().parse_args(['--grid', 'lr=1e-3', '--val_split', '0.1'])
    assert sweep.check_command_line(args, ['--epoch', '2'])[3] == []
    args = sweep.make_parser().parse_args(['--grid', 'model=test_vit', '--val_split', '0.1'])
    assert sweep.check_command_line(args, [])[3] == ['test_vit']


def test_a_sweep_directory_is_only_ever_a_sweeps_own(tmp_path, capsys):
    """--name/--log_dir pointing at a folder that is not this sweep is refused, and a folder whose runs have started is
    never one the message suggests removing."""
    definition = dict(grid={'lr': ['1e-3']}, seeds=1, val_split=0.1, main_flags=[])
    runs = tmp_path / 'runs'  # a folder of the user's own, not a sweep
    os.makedirs(runs / 'my_run')
    with pytest.raises(SystemExit):
        sweep.open_sweep(str(runs), definition, 'python sweep.py ...', [])
    assert f"{runs} exists and is not a sweep (no sweep.json)" in capsys.readouterr().err
    assert os.listdir(runs) == ['my_run']
    (runs / 'sweep.json').write_text('{"grid": ')  # cut short: not another sweep, nor no sweep
    with pytest.raises(SystemExit):
        sweep.open_sweep(str(runs), definition, 'python sweep.py ...', [])
    assert f"cannot read {runs / 'sweep.json'}; repair or remove it" in capsys.readouterr().err

    started = tmp_path / 'started'
    sweep.open_sweep(str(started), definition, 'python sweep.py first', [])
    os.makedirs(started / 'grid_lr=1e-3')
    with pytest.raises(SystemExit):
        sweep.open_sweep(str(started), dict(definition, seeds=2), 'python sweep.py second', [])
    error = capsys.readouterr().err
    assert 'holds another sweep (its seeds differ); re-launch it with its own command (python sweep.py first)' in error
    assert 'remove' not in error and os.path.isdir(started / 'grid_lr=1e-3')

    reported = tmp_path / 'reported'  # stopped after its report, before any trial had a log: no logs to point to
    sweep.open_sweep(str(reported), definition, 'python sweep.py first', [])
    (reported / 'sweep.md').write_text('')
    with pytest.raises(SystemExit):
        sweep.open_sweep(str(reported), dict(definition, seeds=2), 'python sweep.py second', [])
    assert capsys.readouterr().err.strip().endswith(f"none of its runs has trained: to run this one in its place, "
                                                    f"remove {reported}")


def test_a_grid_flag_may_be_written_with_its_dashes():
    assert sweep.parse_grid(['--lr=1e-3,1e-2'], {}) == {'lr': ['1e-3', '1e-2']}


def test_trial_names_and_commands_hold_any_grid_value(tmp_path):
    """Values become run directory names (no '/', distinct even where only such characters differ) and main.py
    flags (a value that starts with '-' stays the flag's value)."""
    definition = dict(grid={'weights': ['a/w.npz', 'a-w.npz'], 'unfreeze': ['-blocks']}, seeds=1, val_split=0.2,
                      main_flags=[])
    trials = sweep.grid_trials(definition, 0, str(tmp_path))
    names = [trial['name'] for trial in trials]
    assert len(set(names)) == 2 and not [name for name in names if os.sep in name]
    assert all(name.startswith('grid_weights=a-w.npz_unfreeze=-blocks') for name in names)
    args = main.make_parser().parse_args(trials[0]['argv'])
    assert (args.weights, args.unfreeze, args.name) == ('a/w.npz', '-blocks', names[0])


FAKE_TRAIN = r'''
import json, os, sys, time
argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1]
run_dir = os.path.join(flag('--log_dir'), flag('--name'))
lr, seed = float(flag('--lr')), int(flag('--seed'))
if os.environ.get('FAKE_FAIL_GPU') == os.environ.get('CUDA_VISIBLE_DEVICES', 'none'):
    sys.exit('RuntimeError: CUDA error: uncorrectable ECC error encountered')
if str(lr) in os.environ.get('FAKE_FAIL', '0.01').split(','):
    if os.environ.get('FAKE_CHECKPOINT'):  # it failed after its first epoch
        os.makedirs(run_dir)
        open(os.path.join(run_dir, 'state.pt'), 'w').close()
    sys.exit(os.environ.get('FAKE_MESSAGE', 'RuntimeError: boom').format(lr=lr))
os.makedirs(run_dir)
with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump(dict(dataset='cifar10', classes=['a', 'b'], lr=lr, seed=seed, trainable_params=7690,
                   mode=os.environ.get('FAKE_MODE', 'P')), f)
if seed > 0 and os.environ.get('FAKE_DIVERGE'):
    sys.exit(3)  # main.py's exit after a non-finite loss, which leaves the run's directory (it has a checkpoint)
time.sleep(json.loads(os.environ.get('FAKE_SLOW', '{}')).get(str(lr), 0))
with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
    json.dump(dict(finished=True, epochs_done=1, epochs=1, best_val_acc={0.001: 50.0, 0.005: 60.0, 0.01: 70.0, 0.02: 40.0}[lr],
                   best_val_epoch=1, test_acc_at_best_val=70.0 + seed, final_test_acc=70.0, mean_epoch_time_s=2.5), f)
'''


@pytest.fixture
def fake_training(tmp_path, monkeypatch):
    """sweep.main in this process, its trials a stand-in for main.py: a run that finishes at once, except the lr in
    $FAKE_FAIL (default 1e-2), which fails with $FAKE_MESSAGE ({lr} filled in), after a checkpoint with
    $FAKE_CHECKPOINT; every trial on GPU $FAKE_FAIL_GPU fails; $FAKE_DIVERGE: every stage-2 seed diverges;
    $FAKE_SLOW: {lr: seconds}."""
    (tmp_path / 'fake_main.py').write_text(FAKE_TRAIN)
    monkeypatch.setattr(sweep, 'MAIN_PY', str(tmp_path / 'fake_main.py'))
    sweep_in_this_process(monkeypatch)

    def run(*argv):
        sweep.main(['--val_split', '0.25', '--log_dir', str(tmp_path), '--name', 's', *map(str, argv)])
    return run, tmp_path / 's'


def test_a_sweep_whose_runs_all_failed_before_training_says_it_can_be_removed(fake_training, capsys, monkeypatch):
    """A sweep whose every run failed at setup (a --batch_size larger than the data): --compare says no grid point
    finished, not that stage 1 is under way; re-launched with a fix under the same --name, it is refused, as its
    definition differs, with the way out, as nothing trained; not while a sweep.py holds it or once one of its runs
    has a directory."""
    run, sweep_dir = fake_training
    monkeypatch.setenv('FAKE_FAIL', '0.001,0.005')
    with pytest.raises(SystemExit):
        run('--grid', 'lr=1e-3,5e-3', '--seeds', 1)
    capsys.readouterr()
    sweep.main(['--compare', str(sweep_dir)])  # its row says it failed, not that it is under way
    assert capsys.readouterr().out.splitlines()[2].endswith('| 0 |  |  | no grid point finished: see its sweep.md |')
    with pytest.raises(SystemExit) as refused:
        run('--grid', 'lr=1e-3,5e-3', '--seeds', 1, '--', '--batch_size', 4)
    error = capsys.readouterr().err.strip()
    assert refused.value.code != 0 and len(error.splitlines()) == 1 and 'holds another sweep' in error
    assert error.endswith(f"none of its runs has trained (their logs in {sweep_dir / 'logs'} say why): to run this one "
                          f"in its place, remove {sweep_dir}"), error
    with open(sweep_dir / 'sweep.lock') as held:  # a sweep.py at work on it (a trial starting): not to be removed
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit):
            run('--grid', 'lr=1e-3,5e-3', '--seeds', 1, '--', '--batch_size', 4)
    error = capsys.readouterr().err.strip()
    assert 'holds another sweep' in error and 'remove' not in error
    os.makedirs(sweep_dir / 'grid_lr=1e-3')  # a run that got past its setup (or is in it, run by a scheduler)
    with pytest.raises(SystemExit):
        run('--grid', 'lr=1e-3,5e-3', '--seeds', 1, '--', '--batch_size', 4)
    error = capsys.readouterr().err.strip()
    assert 'holds another sweep' in error and 'remove' not in error


def test_a_failed_grid_point_does_not_hold_up_stage_2_but_fails_the_sweep(fake_training, capsys):
    run, sweep_dir = fake_training
    with pytest.raises(SystemExit) as stopped:
        run('--grid', 'lr=1e-3,5e-3,1e-2', '--seeds', 2)
    assert stopped.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith('sweep.py: error: 1 run did not finish: grid_lr=1e-2 (failed, exit 1); see '), error
    assert 're-launch the same command to resume or retry them' in error
    rows = read_csv(sweep_dir / 'sweep.csv')
    assert [(row['run'], row['status']) for row in rows] == [
        ('grid_lr=1e-3', 'finished'), ('grid_lr=5e-3', 'finished'), ('grid_lr=1e-2', 'failed'),
        ('final_seed=1', 'finished'), ('final_seed=2', 'finished')]
    assert json.loads((sweep_dir / 'final_seed=2' / 'config.json').read_text())['lr'] == 5e-3
    report = (sweep_dir / 'sweep.md').read_text()
    assert '**Test accuracy 71.50 ± 0.71 %**' in report
    assert '- grid_lr=1e-2 (failed): exit 1: RuntimeError: boom (log ' in report
    assert 'Winning flags: --lr 5e-3 (best val acc 60.00% with seed 0).' in report
    # the failed point may win once retried (here it would): the headline is not final
    assert ('**Provisional**: grid_lr=1e-2 (failed) did not finish, so grid_lr=5e-3 won among the other grid points; '
            're-launching the same command retries or resumes it, and a new winner\'s seeds replace these.') in report
    ranked = [line.split(' | ')[1] for line in report.splitlines() if line.startswith('| ') and 'grid_lr=' in line]
    assert ranked == ['grid_lr=5e-3', 'grid_lr=1e-3', 'grid_lr=1e-2']  # by val accuracy, the failed point last



def test_a_relaunch_after_the_dataset_folder_moved_says_to_link_it(fake_training, tmp_path, capsys):
    """A sweep is its flags: --dataset NEW_PATH is another sweep, so the way on is a link at the old path, as the
    README says; the error says so, not that the path names no folder as a typo would be told."""
    run, sweep_dir = fake_training
    os.makedirs(tmp_path / 'photos' / 'train')
    argv = ['--grid', 'lr=1e-3,5e-3', '--seeds', 1, '--', '--dataset', tmp_path / 'photos']
    run(*argv)
    capsys.readouterr()
    os.rename(tmp_path / 'photos', tmp_path / 'moved')
    with pytest.raises(SystemExit) as stopped:
        run(*argv)
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"sweep.py: error: the dataset folder of {sweep_dir}, {tmp_path / 'photos'}, is gone; if it moved, link the "
        f"old path to it (ln -s NEW_PATH {tmp_path / 'photos'}) and re-launch the same command")
    os.symlink(tmp_path / 'moved', tmp_path / 'photos')
    run(*argv)  # every run finished: nothing to train, the report again

def test_two_trials_that_fail_alike_before_a_checkpoint_stop_the_sweep(fake_training, capsys, monkeypatch):
    """Data that cannot be downloaded fails every trial the same way: each of a 25-point grid tried it again."""
    run, sweep_dir = fake_training
    monkeypatch.setenv('FAKE_FAIL', '0.001,0.005,0.01,0.02')
    monkeypatch.setenv('FAKE_MESSAGE', 'error: could not download cifar10')
    with pytest.raises(SystemExit) as stopped:
        run('--grid', 'lr=1e-3,5e-3,1e-2,2e-2', '--seeds', 2)
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sweep.py: error: grid_lr=1e-3 and grid_lr=5e-3 failed alike before their first checkpoint (error: could not "
        "download cifar10); the 2 trials after them would fail the same way and did not start: mend that and "
        "re-launch the same command, or, if a flag after -- was the cause, launch the mended command (a new sweep)")
    assert [(row['run'], row['status']) for row in read_csv(sweep_dir / 'sweep.csv')] == [
        ('grid_lr=1e-3', 'failed'), ('grid_lr=5e-3', 'failed'), ('grid_lr=1e-2', 'missing'),
        ('grid_lr=2e-2', 'missing')]
    assert sorted(os.listdir(sweep_dir / 'logs')) == ['grid_lr=1e-3.log', 'grid_lr=5e-3.log']


def test_one_bad_gpu_does_not_stop_the_trials_of_the_others(fake_training, capsys, monkeypatch):
    """With --gpus, trials that fail alike on one GPU say nothing of the other GPUs: the bad one takes no further
    trial (it would fail the rest of the grid in seconds), the others take them."""
    run, sweep_dir = fake_training
    monkeypatch.setenv('FAKE_FAIL', '')
    monkeypatch.setenv('FAKE_FAIL_GPU', '1')
    monkeypatch.setenv('FAKE_SLOW', json.dumps({'0.001': 1.5}))  # GPU 0 busy while GPU 1 fails twice
    with pytest.raises(SystemExit) as stopped:
        run('--grid', 'lr=1e-3,5e-3,1e-2,2e-2', '--seeds', 1, '--gpus', '0,1', '--', '--device', 'cpu')
    assert stopped.value.code == 1
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith('sweep.py: error: 2 runs did not finish: ')
    assert ('note   GPU 1: grid_lr=5e-3 and grid_lr=1e-2 failed alike on it before their first checkpoint; it takes '
            'no further trial') in out
    assert [(row['run'], row['status']) for row in read_csv(sweep_dir / 'sweep.csv')] == [
        ('grid_lr=1e-3', 'finished'), ('grid_lr=5e-3', 'failed'), ('grid_lr=1e-2', 'failed'),
        ('grid_lr=2e-2', 'finished'), ('final_seed=1', 'finished')]
    assert 'CUDA_VISIBLE_DEVICES=0' in (sweep_dir / 'logs' / 'grid_lr=2e-2.log').read_text()


@pytest.mark.parametrize('why', ['messages differ', 'after a checkpoint'])
def test_trials_that_fail_otherwise_do_not_stop_the_others(fake_training, capsys, monkeypatch, why):
    """A failure that names its own settings, or one after an epoch that trained, says nothing of the next trial."""
    run, sweep_dir = fake_training
    monkeypatch.setenv('FAKE_FAIL', '0.001,0.005')
    if why == 'messages differ':
        monkeypatch.setenv('FAKE_MESSAGE', 'error: --lr {lr} is refused')
    else:
        monkeypatch.setenv('FAKE_CHECKPOINT', '1')
    with pytest.raises(SystemExit) as stopped:
        run('--grid', 'lr=1e-3,5e-3,1e-2', '--seeds', 1)
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith('sweep.py: error: 2 runs did not finish: ')
    assert [(row['run'], row['status']) for row in read_csv(sweep_dir / 'sweep.csv')] == [
        ('grid_lr=1e-3', 'failed'), ('grid_lr=5e-3', 'failed'), ('grid_lr=1e-2', 'finished'),
        ('final_seed=1', 'finished')]


@pytest.mark.parametrize('grid, note', [
    ('lr=1e-3,5e-3,1e-2', "Note: --lr 1e-2 is the grid's largest value: the best may lie beyond it; a sweep whose grid "
                          "extends above it tells."),
    ('lr=1e-3,5e-3,2e-2', None),  # 5e-3 wins, inside the grid
    ('lr=1e-3,1e-2', None),  # two values: a winner is always at an end, which says nothing
    ('weight_decay=0,1e-4,1e-3', None),  # 0 wins (the first of equal scores): there is nothing below it to try
])
def test_a_winner_at_the_end_of_the_grid_is_noted(fake_training, monkeypatch, grid, note):
    """The best lr of a grid is often its largest or smallest: then the grid did not bracket the optimum."""
    run, sweep_dir = fake_training
    monkeypatch.setenv('FAKE_FAIL', '')
    run('--grid', grid, '--seeds', 1, *(['--', '--lr', '5e-3'] if grid.startswith('weight_decay') else []))
    report = (sweep_dir / 'sweep.md').read_text()
    assert (note in report) if note else "is the grid's" not in report, report


def test_compare_puts_several_sweeps_side_by_side(fake_training, capsys, monkeypatch):
    """The headline use: P against F, each the mean ± std of its own sweep's seeds, in one table."""
    run, _ = fake_training
    log_dir = fake_training[1].parent
    sweep.main(['--val_split', '0.25', '--log_dir', str(log_dir), '--name', 'sweep_P', '--grid', 'lr=1e-3,5e-3',
                '--seeds', '2'])
    monkeypatch.setenv('FAKE_MODE', 'F')
    with pytest.raises(SystemExit):  # its grid point 1e-2 fails: its result is provisional
        sweep.main(['--val_split', '0.25', '--log_dir', str(log_dir), '--name', 'sweep_F', '--grid',
                    'lr=1e-3,5e-3,1e-2', '--seeds', '3'])
    capsys.readouterr()
    sweep.main(['--compare', str(log_dir / 'sweep_P'), str(log_dir / 'sweep_F')])
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith('| sweep_')]
    assert rows == ['| sweep_P | P | 7,690 | --lr 5e-3 |  | 71.50 ± 0.71 | 2 | 70.00 ± 0.00 | 2.5 | final |',
                    '| sweep_F | F | 7,690 | --lr 5e-3 |  | 72.00 ± 1.00 | 3 | 70.00 ± 0.00 | 2.5 | provisional (a grid '
                    'point failed) |'] and err == ''
    config = log_dir / 'sweep_F' / 'final_seed=1' / 'config.json'
    config.write_text(json.dumps(dict(json.loads(config.read_text()), classes=['a', 'b', 'c'])))
    sweep.main(['--compare', str(log_dir / 'sweep_P'), str(log_dir / 'sweep_F')])
    assert capsys.readouterr().err == ("sweep.py: warning: sweep_F and sweep_P did not train on the same data and "
                                       "model (other classes): their numbers do not compare\n")
    config = log_dir / 'sweep_F' / 'final_seed=1' / 'config.json'  # --train_samples chooses the images too
    config.write_text(json.dumps(dict(json.loads(config.read_text()), classes=['a', 'b'], train_samples=3000)))
    sweep.main(['--compare', str(log_dir / 'sweep_P'), str(log_dir / 'sweep_F')])
    assert 'sweep_F and sweep_P did not train on the same data and model (train_samples 3000 against None)' in \
        capsys.readouterr().err
    monkeypatch.setenv('FAKE_DIVERGE', '1')
    with pytest.raises(SystemExit):
        sweep.main(['--val_split', '0.25', '--log_dir', str(log_dir), '--name', 'sweep_PF', '--grid', 'lr=1e-3,5e-3',
                    '--seeds', '2'])
    capsys.readouterr()
    sweep.main(['--compare', str(log_dir / 'sweep_PF')])
    assert '| 0 |  |  | every seed diverged: no result |' in capsys.readouterr().out  # not 'no seed finished yet'
    with pytest.raises(SystemExit) as stopped:
        sweep.main(['--compare', str(log_dir / 'sweep_P'), str(log_dir)])
    assert stopped.value.code == 1 and capsys.readouterr().err == (
        f"sweep.py: error: {log_dir} has no readable sweep.json; --compare reads a directory that sweep.py made; it "
        f"holds the sweeps sweep_F, sweep_P, sweep_PF: pass their directories, such as {log_dir / 'sweep_F'}\n")
    with pytest.raises(SystemExit) as stopped:
        sweep.main(['--collect', str(log_dir)])
    assert stopped.value.code == 1 and capsys.readouterr().err.endswith(
        f"sweep_PF: pass one, such as {log_dir / 'sweep_F'}\n")
    with pytest.raises(SystemExit) as stopped:
        sweep.main(['--collect', str(log_dir / 'sweep_P' / 'logs')])  # no sweep inside either: no hint
    assert stopped.value.code == 1 and capsys.readouterr().err == (
        f"sweep.py: error: {log_dir / 'sweep_P' / 'logs'} has no readable sweep.json; --collect reads a directory that "
        f"sweep.py made\n")


def test_a_grid_point_retried_after_stage_2_keeps_the_result_provisional(fake_training, capsys):
    """A failed grid point being retried (or its retry stopped) may yet win: the result is not final meanwhile."""
    run, sweep_dir = fake_training
    run('--grid', 'lr=1e-3,5e-3', '--seeds', 1)
    summary = sweep_dir / 'grid_lr=1e-3' / 'summary.json'
    summary.write_text(json.dumps(dict(json.loads(summary.read_text()), finished=False)))
    with open(sweep_dir / 'logs' / 'grid_lr=1e-3.log', 'a') as log:
        log.write('[sweep] 2024-01-01 00:00:00 start: python main.py --resume ...\n')  # then the sweep was stopped
    sweep.main(['--collect', str(sweep_dir)])
    assert '**Provisional**: grid_lr=1e-3 (interrupted) did not finish' in (sweep_dir / 'sweep.md').read_text()
    capsys.readouterr()
    sweep.main(['--compare', str(sweep_dir)])
    assert capsys.readouterr().out.splitlines()[2].endswith('| --lr 5e-3 (leading) |  | 71.00 | 1 | 70.00 | 2.5 | '
                                                           'stage 1 not finished |')


def test_print_commands_of_a_finished_sweep_says_it_has_finished(fake_training, capsys):
    run, sweep_dir = fake_training
    run('--grid', 'lr=1e-3,5e-3', '--seeds', 1)
    assert '**Provisional**' not in (sweep_dir / 'sweep.md').read_text()  # every grid point finished
    capsys.readouterr()
    run('--grid', 'lr=1e-3,5e-3', '--seeds', 1, '--print_commands')
    out, err = capsys.readouterr()
    assert out == '' and err == (f"sweep.py: every run of {sweep_dir} has finished or diverged: nothing to run; "
                                 f"python sweep.py --collect {sweep_dir} writes its report\n")


def test_print_commands_names_a_failed_grid_point_that_a_relaunch_retries(fake_training, capsys):
    run, sweep_dir = fake_training
    with pytest.raises(SystemExit):
        run('--grid', 'lr=1e-3,5e-3,1e-2', '--seeds', 1)  # 1e-2 fails
    capsys.readouterr()
    run('--grid', 'lr=1e-3,5e-3,1e-2', '--seeds', 1, '--print_commands')
    assert capsys.readouterr().err == (
        f"sweep.py: grid_lr=1e-2 failed, and the sweep retries it when re-launched without --print_commands; every "
        f"other run of {sweep_dir} has finished or diverged: nothing to run; python sweep.py --collect {sweep_dir} "
        f"writes its report\n")


def test_a_sweep_made_by_print_commands_records_the_command_that_runs_it(fake_training):
    """sweep.json's command (shown to re-launch the sweep, and atop its report) is the sweep's, not a dry run's."""
    run, sweep_dir = fake_training
    run('--grid', 'lr=1e-3', '--seeds', 1, '--print_commands')
    command = shlex.split(json.loads((sweep_dir / 'sweep.json').read_text())['command'])
    assert '--print_commands' not in command and command[command.index('--grid') + 1] == 'lr=1e-3'


def test_a_second_sweep_py_on_a_running_sweep_is_refused(fake_training, capsys):
    import fcntl
    run, sweep_dir = fake_training
    run('--grid', 'lr=1e-3', '--seeds', 1, '--print_commands')
    capsys.readouterr()
    with open(sweep_dir / 'sweep.lock', 'w') as lock:  # as a running sweep.py holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for print_only in ([], ['--print_commands']):
            with pytest.raises(SystemExit) as stopped:
                run('--grid', 'lr=1e-3', '--seeds', 1, *print_only)
            assert stopped.value.code == 1 and capsys.readouterr().err == (
                f"sweep.py: error: another sweep.py is running on {sweep_dir}; let it finish or stop it first\n")
    assert sorted(os.listdir(sweep_dir)) == ['sweep.json', 'sweep.lock']  # nothing started


def test_a_retried_trial_reads_as_its_latest_attempt(tmp_path, monkeypatch):
    """A trial's log keeps every attempt: one that failed, was started again and is running (or whose sweep died
    under it) is not reported with the exit code of the attempt before."""
    os.makedirs(tmp_path / 'logs')
    os.makedirs(tmp_path / 'grid_lr=1e-3')
    log = tmp_path / 'logs' / 'grid_lr=1e-3.log'
    log.write_text('[sweep] 2024-01-01 00:00:00 start: python main.py\nRuntimeError: boom\n\n'
                   '[sweep] 2024-01-01 00:00:01 exit code 1\n')
    assert sweep.last_exit(str(log)) == (1, 'RuntimeError: boom')
    with open(log, 'a') as f:
        f.write('[sweep] 2024-01-01 00:01:00 start: python main.py\nepoch 1/2 ...\n')
    assert sweep.last_exit(str(log)) == (None, '')
    trial = dict(name='grid_lr=1e-3', stage='grid', seed=0, values={'lr': '1e-3'})
    assert sweep.trial_row(str(tmp_path), trial)['status'] == 'interrupted'  # its sweep died under it
    monkeypatch.setattr(sweep, 'CHILDREN', {'grid_lr=1e-3': None})
    assert sweep.trial_row(str(tmp_path), trial)['status'] == 'running'  # as the reports written mid-sweep say


def test_a_log_outside_the_working_directory_is_shown_absolute(tmp_path, monkeypatch):
    os.makedirs(tmp_path / 'here')
    monkeypatch.chdir(tmp_path / 'here')
    assert sweep.shown_path(str(tmp_path / 'here' / 'logs' / 'a.log')) == os.path.join('logs', 'a.log')
    assert sweep.shown_path(str(tmp_path / 'logs' / 'a.log')) == str(tmp_path / 'logs' / 'a.log')


def test_the_report_while_stage_1_is_incomplete(tmp_path):
    """Before stage 1 has finished, the leader is only leading and stage 2 waits; final runs already on disk (trained
    before a failed grid run was retried) stay in the report meanwhile."""
    root = str(tmp_path / 's')
    meta = fake_sweep(root, 1, [], grid=(('grid_lr=1e-3', 50.0, 80.0),))
    meta['grid']['lr'].append('5e-3')  # its run is still to come
    report = sweep.write_reports(root, meta, 0)
    assert re.search(r"^\| leading \| grid_lr=1e-3 \|", report, re.M) and '**winner**' not in report
    assert 'Stage 2 waits for stage 1: 1 of 2 grid runs finished.' in report and '## Stage 2' not in report
    assert [row['run'] for row in read_csv(os.path.join(root, 'sweep.csv'))] == ['grid_lr=1e-3', 'grid_lr=5e-3']
    os.makedirs(os.path.join(root, 'final_seed=1'))
    with open(os.path.join(root, 'final_seed=1', 'summary.json'), 'w') as f:
        json.dump(dict(finished=True, epochs_done=2, epochs=2, best_val_acc=55.0, best_val_epoch=2,
                       test_acc_at_best_val=75.0, final_test_acc=74.0), f)
    report = sweep.write_reports(root, meta, 0)
    assert '## Stage 2: grid_lr=1e-3, seed 1' in report and '**Test accuracy 75.00 %**' in report


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_model_check_stops_in_one_line(tiny_dataset, tmp_path, signum):
    """A new sweep with --model checks it in a child process that imports torch (seconds) before any trial starts: a
    Ctrl-C then was a KeyboardInterrupt traceback (found by a fuzz), a SIGTERM a kill without a word."""
    import time
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'sweep.py'), '--grid', 'lr=1e-3', '--seeds', '1', '--val_split', '0.25',
         '--log_dir', str(tmp_path), '--', *map(str, tiny(tiny_dataset, 1))], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, **ENV), start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not subprocess.run(['ps', '-o', 'pid=', '--ppid', str(process.pid)],
                                                         capture_output=True, text=True).stdout.strip():
        time.sleep(0.02)  # the --model check's child process
    os.killpg(process.pid, signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert err == (f"sweep.py: error: {signal.Signals(signum).name}: stopped before any trial started; run the same "
                   f"command again to go on\n")
    assert not any(os.scandir(tmp_path))  # no sweep.json: the same command starts it afresh


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_sweep_imports_its_modules_stops_in_one_line(tiny_dataset, tmp_path, signum):
    """Ctrl-C or SIGTERM while sweep.py imports argparse and the rest (main.py's too), before run_cli() sets its
    handlers: a KeyboardInterrupt traceback, or a kill without a word (found by a fuzz). Sent as argparse, sweep.py's
    first import after its handlers are set, is looked up."""
    result = signal_on_import('sweep.py', ['--grid', 'lr=1e-3', '--seeds', '1', '--val_split', '0.25', '--log_dir',
                                           tmp_path / 'sweep', '--', *tiny(tiny_dataset, 1)], signum, 'argparse')
    assert result.returncode == 128 + signum and result.stderr == (
        f"sweep.py: error: {signal.Signals(signum).name}: stopped before any trial started; run the same command "
        f"again to go on\n")
    assert not os.path.exists(tmp_path / 'sweep')


def test_a_trial_that_hears_a_signal_twice_while_it_starts_stops_in_one_line(tiny_dataset, tmp_path):
    """sweep.py passes a terminal's Ctrl-C on to its trials, which the terminal signalled too: a trial still starting
    (importing torch) heard the second while it handled the first, a traceback and exit 1 that the sweep reported as a
    failed run (found by a fuzz). Both made to wait for its handler at once: the process stopped, then continued."""
    import time
    for attempt in range(10):  # where the pair lands in the start-up varies
        process = subprocess.Popen([sys.executable, os.path.join(REPO, 'main.py'), *map(str, tiny(tiny_dataset, 1)),
                                    '--val_split', '0.25', '--log_dir', str(tmp_path)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=dict(os.environ, **ENV))
        deadline = time.time() + 60
        while time.time() < deadline:  # main() has set its handlers: SIGTERM is caught (it is ignored before)
            with open(f"/proc/{process.pid}/status") as f:
                caught = int(next(line for line in f if line.startswith('SigCgt:')).split()[1], 16)
            if caught & 1 << signal.SIGTERM - 1:
                break
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGSTOP)
        os.kill(process.pid, signal.SIGTERM)
        os.kill(process.pid, signal.SIGINT)
        os.kill(process.pid, signal.SIGCONT)
        out, err = process.communicate(timeout=60)
        assert process.returncode in (130, 143) and 'Traceback' not in err and 'Exception' not in err, err
        assert err.strip() in ('SIGINT: stopped', 'SIGTERM: stopped')


def test_a_signal_that_comes_as_a_trial_launches_reaches_it(tmp_path, monkeypatch):
    sent = []

    class FakeChild:
        def __init__(self, command, **kwargs):
            pass

        def send_signal(self, signum):
            sent.append(signum)
    monkeypatch.setattr(sweep.subprocess, 'Popen', FakeChild)
    monkeypatch.setattr(sweep, 'CHILDREN', {})
    monkeypatch.setattr(sweep, 'STOP', [signal.SIGTERM])
    assert sweep.start_trial(str(tmp_path), dict(name='grid_lr=1e-3', argv=['--lr', '1e-3']), None, False)
    assert sent == [signal.SIGTERM]


def test_the_result_counts_unfinished_seeds_and_its_recipe_runs_anywhere(tmp_path):
    """The recipe is main.py's command for the first seed without the sweep's --log_dir/--name: run as printed, it
    goes to the user's own logs/, not into the sweep's run (which main.py would refuse to start in)."""
    root = str(tmp_path / 's')
    meta = fake_sweep(root, 2, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))])
    report = sweep.write_reports(root, meta, 0)
    assert '**Test accuracy 70.00 %** (n = 1 seed, so no std; 1 of 2 seeds not finished)' in report
    recipe = [line.strip() for line in report.splitlines() if line.startswith('    python ')][-1]
    args = main.parse_args(shlex.split(recipe)[2:])
    assert (args.lr, args.seed, args.val_split, args.log_dir, args.name) == (1e-3, 1, 0.25, 'logs', None)


def test_print_commands_leaves_out_runs_it_cannot_start(tmp_path, capsys):
    """A run directory without a checkpoint (starting, or died before its first) gets no command: main.py would
    refuse to start in it; finals that trained another grid point stop the commands altogether."""
    root = str(tmp_path / 's')
    meta = fake_sweep(root, 1, [], grid=(('grid_lr=1e-3', 50.0, 80.0),))
    meta['grid']['lr'].append('5e-3')
    os.makedirs(os.path.join(root, 'grid_lr=5e-3'))
    sweep.print_commands(root, meta, 0)
    out, err = capsys.readouterr()
    assert out == '' and f"{os.path.join(root, 'grid_lr=5e-3')} has no checkpoint yet" in err
    assert '0 stage 1 commands to run' in err

    stale = str(tmp_path / 'stale')
    meta = fake_sweep(stale, 2, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))],
                      grid=(('grid_lr=1e-3', 50.0, 80.0), ('grid_lr=5e-3', 60.0, 80.0)))
    for run, lr in (('grid_lr=5e-3', 5e-3), ('final_seed=1', 1e-3)):  # trained when grid_lr=1e-3 led
        with open(os.path.join(stale, run, 'config.json'), 'w') as f:
            json.dump(dict(lr=lr), f)
    with pytest.raises(SystemExit):
        sweep.print_commands(stale, meta, 0)
    out, err = capsys.readouterr()
    assert out == '' and ('final_seed=1 in ' in err and 'trained another grid point than the winner grid_lr=5e-3 (a '
                                                       'grid run that failed before has finished since); move it '
                                                       'aside first' in err)


def test_a_run_resumed_by_hand_with_another_epoch_is_stale(tmp_path, capsys):
    """README lets any run be resumed with a new --epoch: a sweep's run so extended trained other settings than its
    trial. It is stale: a grid run leaves the grid undecided (its longer training would win it, and the seeds trained
    for it are not judged), a final run is left out of the seeds' mean; the report says what it trained, and the sweep
    stops until it is moved aside."""
    root = str(tmp_path / 's')
    meta = fake_sweep(root, 2, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0)),
                                (2, dict(best_val_acc=60, test_acc_at_best_val=90.0, final_test_acc=90.0))],
                      grid=(('grid_lr=1e-3', 50.0, 80.0), ('grid_lr=5e-3', 60.0, 80.0)), main_flags=('--epoch', '2'))

    def configs(**epochs):
        for run, lr in (('grid_lr=1e-3', 1e-3), ('grid_lr=5e-3', 5e-3), ('final_seed=1', 5e-3), ('final_seed=2', 5e-3)):
            with open(os.path.join(root, run, 'config.json'), 'w') as f:
                json.dump(dict(lr=lr, epoch=epochs.get(run.replace('=', '_').replace('-', '_'), 2), amp=True), f)
    configs(**{'grid_lr_5e_3': 3})  # the winner, resumed by hand after its seeds were trained
    assert sweep.sweep_state(root, meta, 0)[2] is None
    report = sweep.write_reports(root, meta, 0)
    assert 'Stage 2 waits for stage 1: 1 of 2 grid runs finished.' in report and 'final_seed' not in report
    assert report.count('**Warning**') == 1 and (
        "**Warning**: grid_lr=5e-3 was resumed with --epoch 3 (the sweep's runs train with --epoch 2); it counts for "
        "nothing until moved aside and the sweep re-launched.") in report
    with pytest.raises(SystemExit):
        sweep.print_commands(root, meta, 0)
    assert capsys.readouterr().err.strip() == (
        f"sweep.py: error: grid_lr=5e-3 in {root} was resumed with --epoch 3 (the sweep's runs train with --epoch 2); "
        f"move it aside first")

    configs(final_seed_2=3)
    report = sweep.write_reports(root, meta, 0)
    assert '**Test accuracy 70.00 %** (n = 1 seed, so no std; 1 of 2 seeds trained otherwise than the sweep asks ' \
           '(stale)' in report
    assert ("**Warning**: final_seed=2 was resumed with --epoch 3 (the sweep's runs train with --epoch 2); it counts "
            "for nothing until moved aside and the sweep re-launched.") in report
    rows = {row['run']: row for row in read_csv(os.path.join(root, 'sweep.csv'))}
    assert [rows[run]['status'] for run in ('grid_lr=1e-3', 'grid_lr=5e-3', 'final_seed=1', 'final_seed=2')] == [
        'finished', 'finished', 'finished', 'stale']
    with pytest.raises(SystemExit):
        sweep.print_commands(root, meta, 0)
    assert capsys.readouterr().err.strip() == (
        f"sweep.py: error: final_seed=2 in {root} was resumed with --epoch 3 (the sweep's runs train with --epoch 2); "
        f"move it aside first")

    with open(os.path.join(root, 'final_seed=2', 'config.json'), 'w') as f:  # --amp, and a grid of --epoch values
        json.dump(dict(lr=5e-3, epoch=2, amp=False), f)
    assert sweep.sweep_state(root, meta, 0)[4][1]['message'] == (
        "was resumed with --amp False (the sweep's runs train with --amp True)")
    with open(os.path.join(root, 'final_seed=2', 'config.json'), 'w') as f:  # changed, trained, and set back
        json.dump(dict(lr=5e-3, epoch=2, amp=True, resumed=[dict(from_epoch=1, epoch_before=2),
                                                            dict(from_epoch=2, epoch_before=4)]), f)
    assert sweep.sweep_state(root, meta, 0)[4][1]['message'] == (
        "was resumed with another --epoch and then set back (config.json's resumed entries record the changes)")
    meta = dict(meta, grid={'epoch': ['2', '3']}, main_flags=['--model', 'test_vit'])
    for run, epoch in (('grid_epoch=2', 2), ('grid_epoch=3', 5)):
        os.makedirs(os.path.join(root, run))
        with open(os.path.join(root, run, 'config.json'), 'w') as f:
            json.dump(dict(epoch=epoch), f)
    assert [row['status'] for row in sweep.sweep_state(root, meta, 0)[1]] == ['interrupted', 'stale']


def test_collect_refuses_runs_of_different_data(tmp_path, capsys):
    root = str(tmp_path / 's')
    fake_sweep(root, 1, [(1, dict(best_val_acc=60, test_acc_at_best_val=70.0, final_test_acc=60.0))])
    for run, classes in (('grid_lr=1e-3', ['cat', 'dog']), ('final_seed=1', ['cat', 'owl'])):
        with open(os.path.join(root, run, 'config.json'), 'w') as f:
            json.dump(dict(dataset='/data/folder', classes=classes, lr=1e-3), f)
    with pytest.raises(SystemExit):
        sweep.collect(root)
    assert (f"grid_lr=1e-3 and final_seed=1 of {root} read different data from /data/folder (other classes)"
            in capsys.readouterr().err)
    assert not os.path.exists(os.path.join(root, 'sweep.md'))


def test_a_run_that_recorded_no_folder_reading_read_the_folder_the_oldest_way():
    """config.json without folder_reading was written before vpt recorded it (rule 1): its image counts are not
    compared with a run of today's rule, which may count a linked folder's images otherwise."""
    old = dict(dataset='/data/folder', classes=['cat', 'dog'], dataset_images={'train': 49, 'test': 18})
    new = dict(old, dataset_images={'train': 48, 'test': 18}, folder_reading=sweep.FOLDER_READING)
    assert sweep.data_read(old)[2] == 1
    assert sweep.data_difference(sweep.data_read(old), sweep.data_read(new)) == ''


def test_finals_of_a_former_winner_stop_the_sweep_before_stage_2_goes_on(fake_training, monkeypatch, capsys):
    """A failed grid point retried on a re-launch now wins: the final run trained for the former winner is stale,
    and no more final runs start (they would mix two grid points) until it is moved aside."""
    run, sweep_dir = fake_training
    with pytest.raises(SystemExit):
        run('--grid', 'lr=1e-3,1e-2', '--seeds', 2)  # 1e-2 fails: 1e-3 wins, both finals run
    shutil.rmtree(sweep_dir / 'final_seed=2')
    os.remove(sweep_dir / 'logs' / 'final_seed=2.log')
    monkeypatch.setenv('FAKE_FAIL', '')
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run('--grid', 'lr=1e-3,1e-2', '--seeds', 2)  # 1e-2 now finishes, and wins
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sweep.py: error: final_seed=1 in {sweep_dir} trained another grid point than the winner grid_lr=1e-2 (a grid "
        f"run that failed before has finished since); move it aside and re-launch")
    assert not os.path.exists(sweep_dir / 'final_seed=2')
    assert 'No result: the stage-2 runs trained otherwise than the sweep asks (stale).' in (
        sweep_dir / 'sweep.md').read_text()


def test_a_sweep_with_a_run_resumed_by_hand_stops_before_running_anything(fake_training, capsys, monkeypatch):
    """An interrupted run resumed by hand with another --epoch is not resumed by the sweep as it now is."""
    run, sweep_dir = fake_training
    run('--grid', 'lr=1e-3,5e-3', '--seeds', 1)
    config = json.loads((sweep_dir / 'grid_lr=5e-3' / 'config.json').read_text())
    (sweep_dir / 'grid_lr=5e-3' / 'config.json').write_text(json.dumps(dict(config, epoch=9)))  # main.py's: 5
    (sweep_dir / 'grid_lr=5e-3' / 'summary.json').write_text(json.dumps(dict(finished=False, epochs_done=3)))
    (sweep_dir / 'grid_lr=5e-3' / 'state.pt').write_bytes(b'')
    shutil.rmtree(sweep_dir / 'final_seed=1')
    before = (sweep_dir / 'sweep.log').read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run('--grid', 'lr=1e-3,5e-3', '--seeds', 1)
    assert stopped.value.code == 1 and capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sweep.py: error: grid_lr=5e-3 in {sweep_dir} was resumed with --epoch 9 (the sweep's runs train with --epoch "
        f"5); move it aside and re-launch")
    assert (sweep_dir / 'sweep.log').read_text() == before  # nothing ran, nothing was resumed
    assert not os.path.exists(sweep_dir / 'final_seed=1')
    # the reports say so, as README has it (and --compare sends a user to sweep.md): not the last launch's 'finished'
    rows = {row['run']: row for row in read_csv(sweep_dir / 'sweep.csv')}
    assert (rows['grid_lr=5e-3']['status'], rows['grid_lr=5e-3']['message']) == (
        'stale', "was resumed with --epoch 9 (the sweep's runs train with --epoch 5)")
    assert ("**Warning**: grid_lr=5e-3 was resumed with --epoch 9 (the sweep's runs train with --epoch 5); it counts "
            "for nothing until moved aside and the sweep re-launched.") in (sweep_dir / 'sweep.md').read_text()

    def disk_full(*args):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(sweep, 'write_reports', disk_full)  # the reports cannot be written: the stale line still is
    with pytest.raises(SystemExit) as stopped:
        run('--grid', 'lr=1e-3,5e-3', '--seeds', 1)
    assert stopped.value.code == 1 and capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"sweep.py: error: grid_lr=5e-3 in {sweep_dir} was resumed with --epoch 9")


def test_a_relaunch_says_each_finished_trial_it_skips(fake_training, capsys):
    run, sweep_dir = fake_training
    run('--grid', 'lr=1e-3', '--seeds', 1)
    capsys.readouterr()
    run('--grid', 'lr=1e-3', '--seeds', 1)
    out = capsys.readouterr().out
    assert 'skip   grid_lr=1e-3: finished (1 epoch)\n' in out and 'skip   final_seed=1: finished (1 epoch)\n' in out


def test_a_winner_whose_every_seed_diverges_has_no_result(fake_training, monkeypatch, capsys):
    run, sweep_dir = fake_training
    monkeypatch.setenv('FAKE_DIVERGE', '1')
    with pytest.raises(SystemExit) as stopped:
        run('--grid', 'lr=1e-3', '--seeds', 2)
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sweep.py: error: every stage-2 seed of grid_lr=1e-3 diverged (a non-finite loss): no result; its settings "
        f"are unstable (see {sweep_dir / 'sweep.md'})")
    assert 'Every stage-2 seed diverged (non-finite loss): no result.' in (sweep_dir / 'sweep.md').read_text()


def test_a_winner_with_one_seed_diverged_still_has_a_result(fake_training, capsys):
    """One diverged seed of two is left out of the mean (the report counts it): the sweep has a result and exits 0."""
    run, sweep_dir = fake_training
    fake = sweep_dir.parent / 'fake_main.py'
    fake.write_text(FAKE_TRAIN.replace("if seed > 0 and os.environ.get('FAKE_DIVERGE'):", "if seed == 2:"))
    run('--grid', 'lr=1e-3', '--seeds', 2)  # no SystemExit
    assert 'error' not in capsys.readouterr().err
    assert [row['status'] for row in read_csv(sweep_dir / 'sweep.csv')] == ['finished', 'finished', 'diverged']
    assert '**Test accuracy 71.00 %** (n = 1 seed, so no std; 1 of 2 seeds diverged' in (
        sweep_dir / 'sweep.md').read_text()


def test_a_stale_seed_that_diverged_runs_again_once_moved_aside(fake_training, monkeypatch, capsys):
    """A grid run failed, seed 2 of the provisional winner diverged, the retried grid run won: the seeds are stale and
    the sweep asks to move them aside. The diverged one's exit status stays in its log, which then made the new
    winner's seed 2 'diverged' without training it (found by a fuzz)."""
    run, sweep_dir = fake_training
    fake = sweep_dir.parent / 'fake_main.py'
    fake.write_text(FAKE_TRAIN.replace("if seed > 0 and os.environ.get('FAKE_DIVERGE'):",
                                       "if (seed, lr) == (2, 5e-3):"))
    with pytest.raises(SystemExit):
        run('--grid', 'lr=1e-3,5e-3,1e-2', '--seeds', 2)  # grid_lr=1e-2 fails: grid_lr=5e-3 leads
    assert [row['status'] for row in read_csv(sweep_dir / 'sweep.csv')][2:] == ['failed', 'finished', 'diverged']
    monkeypatch.setenv('FAKE_FAIL', '')
    with pytest.raises(SystemExit):
        run('--grid', 'lr=1e-3,5e-3,1e-2', '--seeds', 2)  # grid_lr=1e-2 finishes and wins: both seeds stale
    assert 'move them aside and re-launch' in capsys.readouterr().err
    for name in ('final_seed=1', 'final_seed=2'):
        shutil.move(sweep_dir / name, sweep_dir.parent / name)
    run('--grid', 'lr=1e-3,5e-3,1e-2', '--seeds', 2)
    assert [row['status'] for row in read_csv(sweep_dir / 'sweep.csv')][3:] == ['finished', 'finished']
    assert json.loads((sweep_dir / 'final_seed=2' / 'config.json').read_text())['lr'] == 1e-2


def test_no_trial_starts_after_a_signal_while_another_still_stops(fake_training, monkeypatch, capsys):
    """Two slots: Ctrl-C arrives as one trial ends while the other is still running; the freed slot takes no new
    trial, and the sweep exits 130 with the command to re-launch."""
    run, sweep_dir = fake_training
    monkeypatch.setenv('FAKE_SLOW', json.dumps({'0.005': 1.5}))
    end_trial = sweep.end_trial

    def ctrl_c_as_the_first_ends(*args):
        row = end_trial(*args)
        sweep.STOP.append(signal.SIGINT)
        return row
    monkeypatch.setattr(sweep, 'end_trial', ctrl_c_as_the_first_ends)
    with pytest.raises(SystemExit) as stopped:
        run('--grid', 'lr=1e-3,5e-3,1e-2', '--gpus', '0,1', '--', '--device', 'cpu')
    assert stopped.value.code == 130
    assert 'SIGINT: stopped; the runs keep their last finished epoch. Re-launch with:' in capsys.readouterr().err
    assert sorted(os.listdir(sweep_dir / 'logs')) == ['grid_lr=1e-3.log', 'grid_lr=5e-3.log']


def test_the_reports_follow_each_trial_as_it_ends(fake_training, monkeypatch):
    """sweep.csv and sweep.md are rewritten as each trial ends: a long sweep can be watched, and a sweep killed
    outright (kill -9, a lost node) leaves reports of what had finished."""
    run, sweep_dir = fake_training
    seen = {}
    start_trial = sweep.start_trial

    def start_and_look(sweep_dir, trial, *args):
        csv_path = os.path.join(sweep_dir, 'sweep.csv')
        seen[trial['name']] = [(row['run'], row['status']) for row in read_csv(csv_path)] if os.path.exists(
            csv_path) else None
        return start_trial(sweep_dir, trial, *args)
    monkeypatch.setattr(sweep, 'start_trial', start_and_look)
    run('--grid', 'lr=1e-3,5e-3', '--seeds', 1)
    assert seen['grid_lr=5e-3'] == [('grid_lr=1e-3', 'finished'), ('grid_lr=5e-3', 'missing')]
    assert seen['final_seed=1'][-1] == ('final_seed=1', 'missing')


def test_a_trial_that_shows_other_data_as_it_ends_is_still_set_aside(tmp_path, monkeypatch, capsys):
    """run_trials looks at a fresh trial's config.json, then at whether it has ended: a trial that wrote its
    config.json in between and ended is checked once more after the last one ends."""
    sweep_dir = tmp_path / 'sweep'
    (sweep_dir / 'earlier').mkdir(parents=True)
    config = dict(dataset='/data/folder', classes=['cat', 'dog'], dataset_images=dict(train=10, test=4),
                  folder_reading=2)
    (sweep_dir / 'earlier' / 'config.json').write_text(json.dumps(config))

    class ShowsItsDataAsItEnds:
        returncode = None

        def __init__(self, command, **kwargs):
            pass

        def poll(self):
            if self.returncode is None:
                (sweep_dir / 'last').mkdir()
                (sweep_dir / 'last' / 'config.json').write_text(json.dumps(dict(config, classes=['cat', 'owl'])))
                self.returncode = 1
            return self.returncode
    monkeypatch.setattr(sweep.subprocess, 'Popen', ShowsItsDataAsItEnds)
    monkeypatch.setattr(sweep, 'CHILDREN', {})
    monkeypatch.setattr(sweep, 'STOP', [])
    monkeypatch.setattr(sweep, 'write_reports', lambda *args: None)
    last = dict(name='last', stage='grid', seed=0, values={}, argv=[])
    with pytest.raises(SystemExit):
        sweep.run_trials(str(sweep_dir), {}, 0, [last], None, False, [dict(last, name='earlier'), last])
    error = capsys.readouterr().err
    assert 'earlier and last of' in error and 'moved last to set-aside/last.other-data-1' in error
