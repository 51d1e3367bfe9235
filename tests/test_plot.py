"""plot.py: run discovery, the summary table, the figure, and one-line errors/warnings for bad inputs."""
import json
import os
import subprocess
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import plot  # noqa: E402

HEADER = 'epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_time_s,train_images_per_s'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

# name -> (mode, trainable params, [(train_acc, test_acc, epoch_time_s) per epoch])
RUNS = {
    'F_run': ('F', 85806346, [(60.5, 75.25, 100.0), (82.3, 88.5, 70.0), (95.4, 87.75, 75.0)]),  # best before the end
    'PF_run': ('P+F', 85844746, [(65.0, 78.8, 1800.0), (85.1, 87.7, 1800.0), (92.3, 90.5, 125.0)]),
    'P_run': ('P', 92170, [(70.1, 80.3, 4.1), (84.2, 86.9, 4.1), (88.0, 89.4, 4.1)]),
}
# what the table must say: epochs, best test acc, best epoch, final test acc, train time, trainable params
EXPECTED = {
    'F_run': ('F', '3', '88.50%', '2', '87.75%', '4m05s', '85,806,346'),
    'PF_run': ('P+F', '3', '90.50%', '3', '90.50%', '1h02m05s', '85,844,746'),
    'P_run': ('P', '3', '89.40%', '3', '89.40%', '12.3s', '92,170'),
}


def write_run(root, name, mode='P', params=92170, epochs=((70.1, 80.3, 4.1), (84.2, 86.9, 4.1)), config=True):
    run_dir = os.path.join(str(root), name)
    os.makedirs(run_dir)
    if config:
        with open(os.path.join(run_dir, 'config.json'), 'w') as f:
            json.dump(dict(name=name, mode=mode, trainable_params=params, total_params=85844746,
                           model='vit_base_patch16_224.augreg_in21k', epoch=5), f, indent=2)
    lines = [HEADER] + [f'{i},{1.5 / i:.6f},{train:.4f},{1.2 / i:.6f},{test:.4f},0.001,{seconds:.3f},{50000 / seconds:.1f}'
                        for i, (train, test, seconds) in enumerate(epochs, start=1)]
    with open(os.path.join(run_dir, 'metrics.csv'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return run_dir


@pytest.fixture
def logs(tmp_path):
    root = tmp_path / 'logs'
    root.mkdir()
    for name, (mode, params, epochs) in RUNS.items():
        write_run(root, name, mode, params, epochs)
    (root / 'accuracy_old.png').write_bytes(b'not a run')  # stray files next to the runs are ignored
    (root / 'notes').mkdir()  # and so are directories that are not runs
    return str(root)


def run_plot(argv, capsys):
    """plot.main(argv) in this process -> (exit code, stdout, stderr)."""
    code = 0
    try:
        plot.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(out):
    """stdout -> {run: (mode, epochs, best, best epoch, final, time, params)}, checking the header is there."""
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ['run', 'mode', 'epochs'] and 'trainable params' in lines[0]
    assert lines[-1].startswith('wrote ')
    rows = {}
    for line in lines[1:-1]:
        cells = line.split()
        assert len(cells) == 8, line
        rows[cells[0]] = tuple(cells[1:])
    return rows


def assert_png(path, min_width=1000):
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] >= min_width  # dpi ~150: report-sized


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


# ---------------------------------------------------------------- the happy path


def test_table_and_default_png(logs, capsys):
    code, out, err = run_plot([logs], capsys)
    assert code == 0 and err == ''
    assert table(out) == EXPECTED
    runs = [line.split()[0] for line in out.strip().splitlines()[1:-1]]
    assert runs == sorted(RUNS)  # sorted by name
    png = os.path.join(logs, 'accuracy.png')
    assert out.strip().splitlines()[-1] == f'wrote {png}'
    assert_png(png)


def test_columns_are_aligned(logs, capsys):
    _, out, _ = run_plot([logs], capsys)
    header, *rows = out.strip().splitlines()[:-1]
    start = header.index('mode')  # text columns left-aligned: every mode starts under the header
    assert all(row[start - 2:start] == '  ' and row[start] != ' ' for row in rows), out
    for column in ('epochs', 'best test acc', 'final test acc', 'train time', 'trainable params'):
        end = header.index(column) + len(column)  # numbers right-aligned: every cell ends under the header's end
        assert all(row[end - 1] != ' ' and row[end:end + 1] in ('', ' ') for row in rows), (column, out)


def test_out_creates_missing_parent(logs, tmp_path, capsys):
    out_path = tmp_path / 'report' / 'figures' / 'acc.png'
    code, out, err = run_plot([logs, '--out', out_path], capsys)
    assert code == 0 and err == ''
    assert_png(out_path)
    assert not os.path.exists(os.path.join(logs, 'accuracy.png'))  # --out replaces the default, not adds to it
    assert f'wrote {out_path}' in out


def test_figure_shows_train_and_test_of_each_run(logs, tmp_path, capsys, monkeypatch):
    figures = []
    monkeypatch.setattr(plot.plt, 'close', figures.append)  # keep the figure to look inside it
    code, _, _ = run_plot([logs, '--out', tmp_path / 'f.png'], capsys)
    assert code == 0 and len(figures) == 1
    train_ax, test_ax = figures[0].axes
    assert 'train' in train_ax.get_title() and 'test' in test_ax.get_title()
    assert train_ax.get_ylabel() == 'accuracy (%)' and train_ax.get_xlabel() == test_ax.get_xlabel() == 'epoch'
    labels = [f'{name} ({RUNS[name][0]})' for name in sorted(RUNS)]
    for ax, column in ((train_ax, 0), (test_ax, 1)):
        assert [line.get_label() for line in ax.get_lines()] == labels
        for line, name in zip(ax.get_lines(), sorted(RUNS)):
            assert list(line.get_xdata()) == [1, 2, 3]
            assert list(line.get_ydata()) == pytest.approx([epoch[column] for epoch in RUNS[name][2]])
    for train_line, test_line in zip(train_ax.get_lines(), test_ax.get_lines()):  # one colour per run
        assert train_line.get_color() == test_line.get_color()
    assert len({line.get_color() for line in train_ax.get_lines()}) == len(RUNS)
    legends = figures[0].legends
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == labels
    assert train_ax.get_legend() is None and test_ax.get_legend() is None  # none drawn over the curves
    plt.close(figures[0])


def test_run_directory_directly(logs, capsys):
    run_dir = os.path.join(logs, 'P_run')
    code, out, err = run_plot([run_dir], capsys)
    assert code == 0 and err == ''
    assert table(out) == {'P_run': EXPECTED['P_run']}
    assert_png(os.path.join(run_dir, 'accuracy.png'))


def test_several_directories(logs, tmp_path, capsys):
    other = tmp_path / 'other_logs'
    other.mkdir()
    write_run(other, 'linear_run', 'linear', 7690, [(50.0, 55.0, 2.0), (60.0, 61.5, 2.0)])
    # a log directory, a second one, and a run already under the first (listed once)
    code, out, err = run_plot([logs, other, os.path.join(logs, 'F_run')], capsys)
    assert code == 0 and err == ''
    assert table(out) == {**EXPECTED, 'linear_run': ('linear', '2', '61.50%', '2', '61.50%', '4.0s', '7,690')}
    assert_png(os.path.join(logs, 'accuracy.png'))  # default: under the first path
    assert not os.path.exists(other / 'accuracy.png')


def test_format_time():
    assert plot.format_time(12.34) == '12.3s'
    assert plot.format_time(245) == '4m05s'
    assert plot.format_time(59.97) == '1m00s'
    assert plot.format_time(3725.2) == '1h02m05s'


# ---------------------------------------------------------------- errors: exit 2, one line, nothing written


def test_missing_path(tmp_path, capsys):
    missing = tmp_path / 'no_such_logs'
    code, out, err = run_plot([missing], capsys)
    assert code == 2 and out == ''
    line = one_line(err)
    assert line.startswith('plot.py: error:') and str(missing) in line and 'does not exist' in line
    assert 'run directory' in line  # says what to pass instead
    assert files_under(tmp_path) == []


def test_missing_path_among_good_ones_writes_nothing(logs, tmp_path, capsys):
    code, out, err = run_plot([logs, tmp_path / 'typo'], capsys)
    assert code == 2 and out == '' and 'typo' in one_line(err)
    assert not os.path.exists(os.path.join(logs, 'accuracy.png'))


def test_empty_directory(tmp_path, capsys):
    empty = tmp_path / 'logs'
    empty.mkdir()
    (empty / 'accuracy.png').write_bytes(b'x')
    (empty / 'not_a_run').mkdir()
    code, out, err = run_plot([empty], capsys)
    assert code == 2 and out == ''
    assert one_line(err).startswith(f'plot.py: error: no runs found under {empty} (a run directory holds metrics.csv)')
    assert files_under(tmp_path) == ['logs/accuracy.png']


def test_unwritable_out(logs, tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    code, out, err = run_plot([logs, '--out', blocker / 'acc.png'], capsys)
    assert code == 2 and out == ''
    line = one_line(err)
    assert line.startswith('plot.py: error: cannot write') and str(blocker / 'acc.png') in line


def test_unknown_format_creates_nothing(logs, tmp_path, capsys):
    code, out, err = run_plot([logs, '--out', tmp_path / 'new_dir' / 'acc.xyz'], capsys)
    assert code == 2 and out == '' and 'acc.xyz' in one_line(err) and 'format' in err
    assert not os.path.exists(tmp_path / 'new_dir')


def test_out_without_extension_is_png(logs, tmp_path, capsys):
    code, _, _ = run_plot([logs, '--out', tmp_path / 'figure'], capsys)
    assert code == 0
    assert_png(tmp_path / 'figure')


def test_bad_flag_is_one_line(logs, capsys):
    code, _, err = run_plot([logs, '--outt', 'x.png'], capsys)
    assert code == 2 and '--outt' in one_line(err)


# ---------------------------------------------------------------- bad runs: skipped with one warning each


BAD_METRICS = {
    'empty': ('', 'empty'),
    'header_only': (HEADER + '\n', 'only the header'),
    'wrong_header': ('epoch,acc\n1,50.0\n', 'header'),
    'non_numeric': (HEADER + '\n1,0.5,abc,0.6,50.0,0.001,3.0,100.0\n', 'non-numeric'),
    'too_few_columns': (HEADER + '\n1,0.5,50.0,0.6,50.0,0.001,3.0\n', '7 columns'),
    'too_many_columns': (HEADER + '\n1,0.5,50.0,0.6,50.0,0.001,3.0,100.0,9\n', '9 columns'),
    'nan_accuracy': (HEADER + '\n1,0.5,50.0,0.6,nan,0.001,3.0,100.0\n', 'test_acc'),
    'fractional_epoch': (HEADER + '\n1.5,0.5,50.0,0.6,50.0,0.001,3.0,100.0\n', 'epoch'),
    'epochs_out_of_order': (HEADER + '\n2,0.5,50.0,0.6,50.0,0.001,3.0,100.0\n1,0.5,50.0,0.6,50.0,0.001,3.0,100.0\n',
                            'does not follow'),
    'binary': (b'\xff\xfe\x00garbage', 'cannot read'),
}


@pytest.mark.parametrize('case', sorted(BAD_METRICS))
def test_bad_metrics_run_is_skipped(case, logs, capsys):
    content, reason = BAD_METRICS[case]
    bad_dir = write_run(logs, 'bad_run')
    with open(os.path.join(bad_dir, 'metrics.csv'), 'wb') as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    code, out, err = run_plot([logs], capsys)
    assert code == 0
    line = one_line(err)
    assert line.startswith('plot.py: warning: skipping run') and bad_dir in line and reason in line
    assert table(out) == EXPECTED  # the good runs are all still there, the bad one is not
    assert_png(os.path.join(logs, 'accuracy.png'))


def test_broken_config_skips_run(logs, capsys):
    bad_dir = write_run(logs, 'bad_run')
    with open(os.path.join(bad_dir, 'config.json'), 'w') as f:
        f.write('{"mode": "P", ')
    code, out, err = run_plot([logs], capsys)
    assert code == 0
    line = one_line(err)
    assert line.startswith('plot.py: warning: skipping run') and bad_dir in line and 'config.json' in line
    assert table(out) == EXPECTED


def test_missing_config_still_plotted_with_unknown_mode(logs, capsys):
    run_dir = write_run(logs, 'Z_run', epochs=[(40.0, 45.0, 1.0)], config=False)
    code, out, err = run_plot([logs], capsys)
    assert code == 0
    line = one_line(err)
    assert line.startswith('plot.py: warning:') and run_dir in line and 'config.json' in line
    assert table(out)['Z_run'] == ('?', '1', '45.00%', '1', '45.00%', '1.0s', '?')


def test_started_run_without_metrics_warns(logs, capsys):
    run_dir = os.path.join(logs, 'just_started')
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
        json.dump(dict(name='just_started', mode='P'), f)
    code, out, err = run_plot([logs], capsys)
    assert code == 0 and run_dir in one_line(err) and 'no metrics.csv' in err
    assert table(out) == EXPECTED


def test_all_runs_bad(tmp_path, capsys):
    root = tmp_path / 'logs'
    root.mkdir()
    bad = [write_run(root, name) for name in ('a_run', 'b_run')]
    with open(os.path.join(bad[0], 'metrics.csv'), 'w') as f:
        f.write(HEADER + '\n')
    with open(os.path.join(bad[1], 'metrics.csv'), 'w') as f:
        f.write('garbage\n')
    code, out, err = run_plot([root], capsys)
    assert code == 2 and out == ''
    lines = err.strip().splitlines()
    assert len(lines) == 3  # a warning per run, then the error
    assert bad[0] in lines[0] and 'only the header' in lines[0]
    assert bad[1] in lines[1] and 'header' in lines[1]
    assert lines[2].startswith(f'plot.py: error: no runs found under {root} (a run directory holds metrics.csv)')
    assert not os.path.exists(root / 'accuracy.png')


# ---------------------------------------------------------------- the real entry point


def test_command_line(logs, tmp_path):
    out_path = tmp_path / 'fig' / 'accuracy.png'
    result = subprocess.run([sys.executable, 'plot.py', logs, '--out', str(out_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    assert table(result.stdout) == EXPECTED
    assert_png(out_path)
    result = subprocess.run([sys.executable, 'plot.py', str(tmp_path / 'nowhere')], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and 'Traceback' not in result.stderr and 'does not exist' in one_line(result.stderr)
