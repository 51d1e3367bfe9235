"""plot.py: run discovery, the summary table, the figures (accuracy, cost, confusion), and one-line errors/warnings
for bad inputs."""
import csv
import json
import math
import os
import re
import subprocess
import sys
import warnings

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import plot  # noqa: E402

HEADER = 'epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_time_s,train_images_per_s'  # before validation
NEW_HEADER = HEADER + ',val_loss,val_acc,peak_mem_gib'
COLUMNS = ['run', 'mode', 'epochs', 'test@best val', 'val epoch', 'best test (oracle)', 'best epoch', 'final test',
           'time/epoch', 'total time', 'peak mem', 'checkpoint', 'trainable params']
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
close_figure = plt.close  # the real one: tests that look inside figures replace plt.close

# name -> (mode, trainable params, [(train_acc, test_acc, epoch_time_s) per epoch])
RUNS = {
    'F_run': ('F', 85806346, [(60.5, 75.25, 100.0), (82.3, 88.5, 70.0), (95.4, 87.75, 75.0)]),  # best before the end
    'PF_run': ('P+F', 85844746, [(65.0, 78.8, 1800.0), (85.1, 87.7, 1800.0), (92.3, 90.5, 125.0)]),
    'P_run': ('P', 92170, [(70.1, 80.3, 4.1), (84.2, 86.9, 4.1), (88.0, 89.4, 4.1)]),
}
# what the table must say: mode, epochs, test@best val, its epoch, best test acc (oracle), its epoch, final test acc,
# time per epoch, total time, peak memory, checkpoint size, trainable params. These runs have the old 8-column
# metrics.csv: no validation, no memory column, and no checkpoint file.
EXPECTED = {
    'F_run': ('F', '3', '-', '-', '88.50%', '2', '87.75%', '1m22s', '4m05s', '-', '-', '85,806,346'),
    'PF_run': ('P+F', '3', '-', '-', '90.50%', '3', '90.50%', '20m42s', '1h02m05s', '-', '-', '85,844,746'),
    'P_run': ('P', '3', '-', '-', '89.40%', '3', '89.40%', '4.1s', '12.3s', '-', '-', '92,170'),
}


def write_run(root, name, mode='P', params=92170, epochs=((70.1, 80.3, 4.1), (84.2, 86.9, 4.1)), config=True,
              val=None, peak=None, checkpoint_bytes=None):
    """A run directory. With `val` or `peak` (a value or None per epoch) metrics.csv has the new 11-column header,
    None written as an empty cell; without them the old 8-column one."""
    run_dir = os.path.join(str(root), name)
    os.makedirs(run_dir)
    if config:
        with open(os.path.join(run_dir, 'config.json'), 'w') as f:
            json.dump(dict(name=name, mode=mode, trainable_params=params, total_params=85844746,
                           model='vit_base_patch16_224.augreg_in21k', epoch=5), f, indent=2)
    new = val is not None or peak is not None
    lines = [NEW_HEADER if new else HEADER]
    for i, (train, test, seconds) in enumerate(epochs, start=1):
        line = f'{i},{1.5 / i:.6f},{train:.4f},{1.2 / i:.6f},{test:.4f},0.001,{seconds:.3f},{50000 / seconds:.1f}'
        if new:
            v = val[i - 1] if val else None
            p = peak[i - 1] if peak else None
            line += ',' + ('' if v is None else f'{1.1 / i:.6f}') + ',' + ('' if v is None else f'{v:.4f}')
            line += ',' + ('' if p is None else f'{p:.3f}')
        lines.append(line)
    with open(os.path.join(run_dir, 'metrics.csv'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    if checkpoint_bytes is not None:
        with open(os.path.join(run_dir, 'trainable.safetensors'), 'wb') as f:
            f.truncate(checkpoint_bytes)  # sparse: the size is all the table reads
    return run_dir


def write_confusion(run_dir, classes, counts):
    with open(os.path.join(run_dir, 'confusion.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['true\\predicted'] + list(classes))
        for name, row in zip(classes, counts):
            writer.writerow([name] + [int(count) for count in row])


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


def cells(line):
    return re.split(r' {2,}', line.strip())  # columns are 2+ spaces apart; header cells hold single spaces


def table_lines(out):
    """stdout -> (header line, row lines, legend line, wrote lines)."""
    lines = out.strip().splitlines()
    legend = [i for i, line in enumerate(lines) if line.startswith('test@best val:')]
    assert len(legend) == 1, out
    i = legend[0]
    assert lines[i + 1:] and all(line.startswith('wrote ') for line in lines[i + 1:]), out
    return lines[0], lines[1:i], lines[i], lines[i + 1:]


def table(out):
    """stdout -> {run: (mode, epochs, test@best val, val epoch, best test, best epoch, final, time/epoch, total time,
    peak mem, checkpoint, params)}, checking the header and the legend are there."""
    header, rows, legend, _ = table_lines(out)
    assert cells(header) == COLUMNS
    assert 'best validation accuracy' in legend and 'oracle' in legend and 'chosen on the test set' in legend
    table = {}
    for line in rows:
        row = cells(line)
        assert len(row) == len(COLUMNS), line
        table[row[0]] = tuple(row[1:])
    return table


def column(out, run, name):
    return table(out)[run][COLUMNS.index(name) - 1]


def captured_figures(monkeypatch):
    """Figures plot.py closes after saving them, kept open to look inside."""
    figures = []
    monkeypatch.setattr(plot.plt, 'close', figures.append)
    return figures


def points(ax):
    """(x, y) of every scatter point of an axes, sorted, as an array for pytest.approx."""
    return np.array(sorted((float(x), float(y)) for c in ax.collections for x, y in c.get_offsets()))


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
    assert list(table(out)) == sorted(RUNS)  # sorted by name
    png = os.path.join(logs, 'accuracy.png')
    assert out.strip().splitlines()[-1] == f'wrote {png}'
    assert_png(png)


def test_columns_are_aligned(logs, capsys):
    write_run(logs, 'val_run', val=[80.0, 81.0], peak=[3.25, 12.5], checkpoint_bytes=1_874_000)  # every cell filled
    _, out, _ = run_plot([logs], capsys)
    header, rows, _, _ = table_lines(out)
    start = header.index('mode')  # text columns left-aligned: every mode starts under the header
    assert all(row[start - 2:start] == '  ' and row[start] != ' ' for row in rows), out
    for column in COLUMNS[2:]:
        end = header.index(column) + len(column)  # numbers right-aligned: every cell ends under the header's end
        assert all(row[end - 1] != ' ' and row[end:end + 1] in ('', ' ') for row in rows), (column, out)


def test_out_creates_missing_parent(logs, tmp_path, capsys):
    out_path = tmp_path / 'report' / 'figures' / 'acc.png'
    code, out, err = run_plot([logs, '--out', out_path], capsys)
    assert code == 0 and err == ''
    assert_png(out_path)
    assert not os.path.exists(os.path.join(logs, 'accuracy.png'))  # --out replaces the default, not adds to it
    assert f'wrote {out_path}' in out



def test_a_tilde_in_paths_is_the_home_folder(logs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))  # the shell leaves ~ after --out= alone
    monkeypatch.chdir(tmp_path)  # were ~ not expanded, ./~/acc.png would land here, not in the working tree
    code, out, err = run_plot(['~/logs', '--out=~/acc.png'], capsys)
    assert code == 0 and err == '', err
    assert_png(tmp_path / 'acc.png')
    assert f"wrote {tmp_path / 'acc.png'}" in out


def test_figure_shows_train_and_test_of_each_run(logs, tmp_path, capsys, monkeypatch):
    figures = captured_figures(monkeypatch)
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
    close_figure(figures[0])


def test_a_run_named_with_a_leading_underscore_is_in_the_legend(tmp_path, capsys, monkeypatch):
    """matplotlib leaves a label that starts with '_' out of a legend: a run directory named _baseline had its curves
    drawn, in a colour no legend entry named."""
    write_run(tmp_path, 'P_run')
    write_run(tmp_path, '_baseline', val=[50.0, 60.0])  # its star on the test panel is no run of the legend
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path], capsys)[0] == 0
    legend = figures[0].legends[0]
    assert [text.get_text() for text in legend.get_texts()] == ['P_run (P)', '_baseline (P)']
    assert [handle.get_color() for handle in legend.legend_handles] == [
        line.get_color() for line in figures[0].axes[0].get_lines()]
    close_figure(figures[0])


def test_the_legend_reads_across_row_by_row(tmp_path, capsys, monkeypatch):
    """Eight runs in three columns: matplotlib filled them column by column, so the runs' order (sorted by name) ran
    down the first column and on at the top of the next, where a reader reads across."""
    names = [f'P_vit_base_patch16_224.augreg_in21k_2026112{i}' for i in range(8)]
    for name in names:
        write_run(tmp_path, name)
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path], capsys)[0] == 0
    fig = figures[0]
    fig.canvas.draw()
    texts = fig.legends[0].get_texts()
    rows = sorted({round(text.get_window_extent().y0) for text in texts}, reverse=True)
    assert len(rows) > 1  # else the test proves nothing
    at = {(rows.index(round(text.get_window_extent().y0)), text.get_window_extent().x0): text.get_text()
          for text in texts}
    assert [at[place] for place in sorted(at)] == [f'{name} (P)' for name in names]
    # each entry keeps its own run's line: labels reordered without their handles named other runs' colours
    style = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()}
    legend = fig.legends[0]
    assert [(handle.get_color(), handle.get_linestyle()) for handle in legend.legend_handles] == [
        style[text.get_text()] for text in texts]
    assert len(set(style.values())) == len(names)  # else the test proves nothing
    close_figure(fig)


def panel_heights(fig):
    """Inches of each axes' height, as laid out when the figure was saved."""
    return [ax.get_position().height * fig.get_figheight() for ax in fig.axes]


@pytest.mark.parametrize('count', [8, 16])
def test_many_long_named_runs_keep_the_panels_size(count, logs, tmp_path, capsys, monkeypatch, recwarn):
    """main.py's names are ~55 characters; in a figure of fixed height the legend used to leave the panels 40% of
    it with 8 such runs, and with 16 cover the curves (matplotlib warned that constrained layout collapsed them)."""
    many = tmp_path / 'many'
    for i in range(count):
        write_run(many, f'P_vit_base_patch16_224.augreg_in21k_20261126-01{i:02d}03')
    figures = captured_figures(monkeypatch)
    assert run_plot([logs, '--out', tmp_path / 'few.png'], capsys)[0] == 0
    assert run_plot([many, '--out', tmp_path / 'many.png'], capsys)[0] == 0
    few_fig, many_fig = figures
    assert not [w for w in recwarn if 'collapsed' in str(w.message)]
    assert min(panel_heights(many_fig)) >= 0.95 * min(panel_heights(few_fig)) > 2.5  # inches, as with 3 runs
    renderer = many_fig.canvas.get_renderer()
    many_fig.draw_without_rendering()
    (legend,) = many_fig.legends
    box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == count and many_fig.bbox.contains(box.x0, box.y0) and \
        many_fig.bbox.contains(box.x1, box.y1)  # the whole legend is in the figure
    assert all(box.y1 <= ax.get_window_extent(renderer).y0 for ax in many_fig.axes)  # below the curves
    for fig in figures:
        close_figure(fig)


def test_runs_with_a_val_split_get_a_val_panel_and_their_reported_point(tmp_path, capsys, monkeypatch):
    """Val accuracy picks the epoch to report: its curve is drawn, and a star marks each run's test accuracy at its
    best val epoch on the test panel; a run without val has no val curve."""
    write_run(tmp_path, 'P_val', epochs=((70.0, 80.0, 4.0), (80.0, 86.0, 4.0), (90.0, 84.0, 4.0)),
              val=(81.0, 88.0, 87.0))
    write_run(tmp_path, 'P_noval')
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path], capsys)[0] == 0
    train_ax, val_ax, test_ax = figures[0].axes
    assert [ax.get_title() for ax in figures[0].axes] == ['train accuracy', 'val accuracy',
                                                         'test accuracy (star: at the best val epoch)']
    assert [line.get_label() for line in val_ax.get_lines()] == ['P_noval (P)', 'P_val (P)']
    noval_line, val_line = val_ax.get_lines()
    assert list(val_line.get_ydata()) == [81.0, 88.0, 87.0] and list(noval_line.get_ydata()) == []
    stars = [line for line in test_ax.get_lines() if line.get_marker() == '*']
    assert len(stars) == 1 and (list(stars[0].get_xdata()), list(stars[0].get_ydata())) == ([2], [86.0])
    assert stars[0].get_color() == val_line.get_color()
    close_figure(figures[0])


def test_runs_past_twenty_stay_distinguishable(tmp_path, capsys, monkeypatch):
    """Past tab20's 20 colours the runs used to get viridis, neighbours in near-identical colours: any two runs
    drawn in the same line style must differ clearly in colour."""
    for i in range(24):
        write_run(tmp_path, f'P_run{i:02d}')
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path], capsys)[0] == 0
    lines = figures[0].axes[1].get_lines()
    assert len(lines) == 24
    rgb = [np.array(matplotlib.colors.to_rgb(line.get_color())) for line in lines]
    style = [(line.get_linestyle(), line.get_marker()) for line in lines]
    closest = min(np.linalg.norm(rgb[i] - rgb[j]) for i in range(24) for j in range(i) if style[i] == style[j])
    assert closest > 0.09  # tab20's closest pair is 0.098 apart in RGB; 24 viridis colours came 0.043 apart
    close_figure(figures[0])


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
    assert table(out) == {**EXPECTED, 'linear_run': ('linear', '2', '-', '-', '61.50%', '2', '61.50%', '2.0s', '4.0s',
                                                     '-', '-', '7,690')}
    assert_png(os.path.join(logs, 'accuracy.png'))  # default: under the first path
    assert not os.path.exists(other / 'accuracy.png')


def test_runs_tested_on_other_images_get_one_warning(tmp_path, capsys):
    """P on one data set against F on another share the figure's axes and the table's columns; plot.py says once that
    their test accuracies do not compare. The same data at another path (another machine) is the same test set."""
    cifar = [f'class{i}' for i in range(10)]

    def tested_on(name, dataset, classes, images, **picked):
        run_dir = write_run(tmp_path / 'logs', name)
        with open(os.path.join(run_dir, 'config.json'), 'w') as f:
            json.dump(dict(mode='P', trainable_params=92170, dataset=dataset, classes=classes, test_images=images,
                           data_seed=picked.pop('data_seed', 0), test_samples=picked.get('test_samples', 0)), f)
    tested_on('P_cifar', '/home/me/cifar10-jpg', cifar, 10000)
    tested_on('F_cifar', '/scratch/me/cifar10-jpg', cifar, 10000, data_seed=3)  # picks nothing: no matter
    write_run(tmp_path / 'logs', 'no_config', config=False)  # nothing recorded: left out of the comparison
    code, out, err = run_plot([tmp_path / 'logs'], capsys)
    assert code == 0 and 'different sets of test images' not in err, err

    tested_on('P_pets', '/data/pets', ['cat', 'dog', 'fish', 'hamster', 'parrot'], 500)
    tested_on('P_cifar_1k_seed1', 'cifar10', cifar, 1000, test_samples=1000, data_seed=1)
    tested_on('P_cifar_1k_seed2', 'cifar10', cifar, 1000, test_samples=1000, data_seed=2)
    tested_on('P_edited', '/data/pets', ['cat', 'dog'], '500')  # a hand-edited count: nothing recorded, left out
    code, out, err = run_plot([tmp_path / 'logs'], capsys)
    assert code == 0 and set(table(out)) == {'P_cifar', 'F_cifar', 'no_config', 'P_pets', 'P_cifar_1k_seed1',
                                             'P_cifar_1k_seed2', 'P_edited'}
    (warning,) = [line for line in err.splitlines() if 'different sets of test images' in line]
    assert warning == (
        "plot.py: warning: these runs were tested on 4 different sets of test images, so their test accuracies do not "
        "compare across them: F_cifar, P_cifar (10 classes (class0, class1, class2, ...), 10,000 test images); "
        "P_cifar_1k_seed1 (10 classes (class0, class1, class2, ...), 1,000 test images, picked with --data_seed 1); "
        "P_cifar_1k_seed2 (10 classes (class0, class1, class2, ...), 1,000 test images, picked with --data_seed 2); "
        "P_pets (5 classes (cat, dog, fish, ...), 500 test images)")


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


def test_unwritable_out(logs, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    code, out, err = run_plot([logs, '--out', blocker / 'acc.png'], capsys)
    assert code == 2 and out == ''
    # what is in the way and what to do, before any figure is drawn; it was "[Errno 17] File exists: '.../a_file'"
    assert one_line(err) == (f"plot.py: error: cannot write {blocker / 'acc.png'} ({blocker} is not a writable "
                             f"directory); choose another --out")
    access = os.access  # another user's logs/, played (the tests run as root): the default figure cannot go there
    monkeypatch.setattr(os, 'access', lambda path, mode, **kw: access(path, mode, **kw) and (
        str(path) != str(logs) or not mode & os.W_OK))
    code, out, err = run_plot([logs], capsys)
    assert code == 2 and one_line(err) == (f"plot.py: error: cannot write {os.path.join(logs, 'accuracy.png')} ({logs} "
                                           f"is not a writable directory); pass --out FILE to write the figure "
                                           f"elsewhere")


def test_out_through_a_link_to_a_missing_folder_is_refused_before_drawing(logs, tmp_path, capsys, monkeypatch):
    """--out results/acc.png with results a link to a folder gone (a drive not mounted): the figure was drawn, then
    'cannot write results/acc.png: [Errno 17] File exists: ...results', as an --out under a file was."""
    os.symlink(tmp_path / 'unmounted' / 'results', tmp_path / 'results')
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([logs, '--out', tmp_path / 'results' / 'acc.png'], capsys)
    assert code == 2 and out == '' and figures == []
    assert one_line(err) == (f"plot.py: error: cannot write {tmp_path / 'results' / 'acc.png'} ({tmp_path / 'results'} "
                             f"is a link to a missing folder, {tmp_path / 'unmounted' / 'results'}); choose another "
                             f"--out")


def test_a_figure_it_may_not_write_names_the_way_out(logs, tmp_path, capsys, monkeypatch):
    """In another user's logs/ (or a read-only --out folder) the error was Python's '[Errno 13] Permission denied'
    with no way out. Denial is played (the tests run as root, whom chmod denies nothing)."""
    def denied(fig, out, **kwargs):
        raise PermissionError(13, 'Permission denied', str(out))
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', denied)
    for argv, out in (([logs], os.path.join(logs, 'accuracy.png')), ([logs, '--out', tmp_path / 'a.png'],
                                                                       tmp_path / 'a.png')):
        code, _, err = run_plot(argv, capsys)
        assert code == 2 and one_line(err) == (f"plot.py: error: cannot write {out} (permission denied); pass --out "
                                               f"FILE in a folder you may write to")


def test_unknown_format_creates_nothing(logs, tmp_path, capsys):
    code, out, err = run_plot([logs, '--out', tmp_path / 'new_dir' / 'acc.xyz'], capsys)
    assert code == 2 and out == '' and 'acc.xyz' in one_line(err) and 'format' in err
    assert ', jpg, ' in err and ', png, ' in err  # the formats that do work, not just three of them
    assert not os.path.exists(tmp_path / 'new_dir')


def test_out_without_extension_is_png(logs, tmp_path, capsys):
    code, _, _ = run_plot([logs, '--out', tmp_path / 'figure'], capsys)
    assert code == 0
    assert_png(tmp_path / 'figure')


@pytest.mark.parametrize('name', ['photo.jpg', 'own.png', 'own.pdf'])
def test_out_never_replaces_a_file_plot_py_did_not_write(logs, tmp_path, capsys, name):
    """--out ~/photo.jpg replaced the photo, and --out data/train/cat/0001.jpg an image of a training set."""
    from PIL import Image
    target = tmp_path / name
    if name.endswith('.jpg'):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(target)
    else:  # a figure of the user's own, made with matplotlib itself
        plt.figure().savefig(target)
        plt.close('all')
    before = target.read_bytes()
    code, out, err = run_plot([logs, '--out', target], capsys)
    assert code == 2 and out == '' and one_line(err) == (
        f"plot.py: error: {target} exists and is not a figure plot.py wrote (--out replaces only plot.py's own .png, "
        f".pdf, .svg, .ps and .eps figures, and those written since it marks them): choose another --out, or remove "
        f"that file first")
    assert target.read_bytes() == before


def test_a_dangling_link_is_no_free_name_for_a_figure(logs, tmp_path, capsys):
    """A link to a missing file passed for a free name: savefig wrote through it (making the file it names elsewhere)
    or, its folder missing, failed once drawn with 'cannot write LINK: No such file or directory: LINK'."""
    link = tmp_path / 'acc.png'
    link.symlink_to(tmp_path / 'missing' / 'acc.png')
    code, out, err = run_plot([logs, '--out', link], capsys)
    assert code == 2 and out == '' and one_line(err) == (
        f"plot.py: error: {link} is a link to a missing file ({tmp_path / 'missing' / 'acc.png'}) and plot.py writes "
        f"no new figure through a link: choose another --out, or remove the link first")
    assert os.path.islink(link) and not os.path.exists(tmp_path / 'missing')
    default = os.path.join(logs, 'accuracy.png')
    os.symlink(tmp_path / 'elsewhere.png', default)
    code, out, err = run_plot([logs], capsys)
    assert code == 2 and f"{default} is a link to a missing file" in err and 'pass --out FILE' in err
    assert not os.path.lexists(tmp_path / 'elsewhere.png')
    run_dir = folder_run(tmp_path, MIXED, name='linked')  # a run's own figure: that run is skipped, with a warning
    write_confusion(run_dir, ['a', 'b'], [[3, 1], [0, 4]])
    os.symlink(tmp_path / 'missing' / 'confusion.png', os.path.join(run_dir, 'confusion.png'))
    code, out, err = run_plot([run_dir, '--confusion'], capsys)
    assert code == 2 and out == '' and one_line(err.splitlines()[0]) == (
        f"plot.py: warning: skipping run {run_dir}: cannot write confusion.png there (a link to a missing file has its "
        f"name); pass --out FILE with this run alone to draw it elsewhere")
    assert not os.path.exists(tmp_path / 'missing')


@pytest.mark.parametrize('name', ['accuracy.png', 'cost.png'])
def test_default_figure_never_replaces_a_file_of_another_program(logs, tmp_path, capsys, name):
    """Without --out the figures go to <first PATH>/accuracy.png (cost.png): a photo of that name there was replaced
    without a word. A figure matplotlib wrote there (plot.py's own, from before it marked them) is still redrawn."""
    from PIL import Image
    target = os.path.join(logs, name)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(target)
    before = open(target, 'rb').read()
    code, out, err = run_plot([logs, '--cost'], capsys)
    assert code == 2 and out == '' and one_line(err) == (
        f"plot.py: error: {target} exists and is not a figure plot.py (or matplotlib) wrote, so it is not redrawn in "
        f"place: pass --out FILE to write the figure elsewhere, or move that file away first")
    assert open(target, 'rb').read() == before
    assert os.listdir(logs).count('accuracy.png') + os.listdir(logs).count('cost.png') == 1  # nothing drawn
    plt.figure().savefig(target)
    plt.close('all')
    code, out, err = run_plot([logs, '--cost'], capsys)
    assert code == 0 and f'wrote {target}' in out, err
    code, out, err = run_plot([logs, '--cost'], capsys)  # and its own figures, redrawn
    assert code == 0 and f'wrote {target}' in out, err


def test_default_figures_check_only_what_they_write(logs, tmp_path, capsys):
    """Without --out only <first PATH>/accuracy.png (and with --cost its cost.png) is written, so only those are
    checked: a photo named cost.png without --cost, or one named accuracy.png in another PATH, stays and stops
    nothing."""
    from PIL import Image
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(os.path.join(logs, 'cost.png'))
    code, out, err = run_plot([logs], capsys)
    assert code == 0 and f"wrote {os.path.join(logs, 'accuracy.png')}" in out, err
    other = tmp_path / 'other'
    write_run(other, 'Q_run')
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(other / 'accuracy.png')
    before = (other / 'accuracy.png').read_bytes()
    code, out, err = run_plot([logs, other], capsys)
    assert code == 0 and f"wrote {os.path.join(logs, 'accuracy.png')}" in out, err
    assert (other / 'accuracy.png').read_bytes() == before


def test_a_directory_where_the_default_figure_goes_is_named_without_out(logs, capsys):
    """A folder named accuracy.png in the first PATH: the error does not speak of an --out the user did not pass."""
    os.makedirs(os.path.join(logs, 'accuracy.png'))
    code, out, err = run_plot([logs], capsys)
    assert code == 2 and out == '' and one_line(err) == (
        f"plot.py: error: {os.path.join(logs, 'accuracy.png')} is a directory, where plot.py writes its figure; pass "
        f"--out FILE")


def test_out_to_dev_null_or_a_directory(logs, tmp_path, capsys, monkeypatch):
    """--out /dev/null (only the table) is no file to protect; a directory is named as one."""
    access = os.access  # any user but root may not write /dev: /dev/null is there already, nothing to create
    monkeypatch.setattr(os, 'access', lambda path, mode, **kw: access(path, mode, **kw) and (
        os.path.abspath(path) != os.path.dirname(os.devnull) or not mode & os.W_OK))
    code, out, err = run_plot([logs, '--out', os.devnull], capsys)
    assert code == 0 and 'test@best val' in out, err
    code, out, err = run_plot([logs, '--out', tmp_path], capsys)
    assert code == 2 and one_line(err) == (f"plot.py: error: --out {tmp_path} is a directory; pass a file name such "
                                           f"as {tmp_path / 'accuracy.png'}")


@pytest.mark.parametrize('name', ['acc.png', 'acc.pdf', 'acc.svg', 'acc'])
def test_out_redraws_its_own_figure(logs, tmp_path, capsys, name):
    target = tmp_path / name
    for _ in range(2):
        code, out, err = run_plot([logs, '--out', target], capsys)
        assert code == 0 and f'wrote {target}' in out, err
        assert os.path.getmtime(target) > 0  # written, then replaced
        os.utime(target, (0, 0))


def test_cost_figure_that_is_not_plot_pys_stops_before_anything_is_written(logs, tmp_path, capsys):
    (tmp_path / 'acc_cost.png').write_bytes(b'not a figure')
    code, _, err = run_plot([logs, '--cost', '--out', tmp_path / 'acc.png'], capsys)
    assert code == 2 and f"error: {tmp_path / 'acc_cost.png'} exists and is not a figure plot.py wrote" in err
    assert sorted(os.listdir(tmp_path)) == ['acc_cost.png', 'logs'] and 'accuracy.png' not in os.listdir(logs)


def test_bad_flag_is_one_line(logs, capsys):
    code, _, err = run_plot([logs, '--confsion'], capsys)
    assert code == 2 and one_line(err) == ('plot.py: error: unrecognized arguments: --confsion; did you mean '
                                           '--confusion? (python plot.py --help for usage)')


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
    'new_header_lacks_test_acc': (NEW_HEADER.replace('test_acc,', '') +
                                  '\n1,0.5,50.0,0.6,0.001,3.0,100.0,0.6,50.0,1.0\n', 'lacks test_acc'),
    'empty_test_acc': (NEW_HEADER + '\n1,0.5,50.0,0.6,,0.001,3.0,100.0,0.6,50.0,1.0\n', 'non-numeric test_acc'),
    'non_numeric_val_acc': (NEW_HEADER + '\n1,0.5,50.0,0.6,50.0,0.001,3.0,100.0,0.6,abc,1.0\n', 'non-numeric val_acc'),
    'nan_val_accuracy': (NEW_HEADER + '\n1,0.5,50.0,0.6,50.0,0.001,3.0,100.0,0.6,nan,1.0\n', 'val_acc is nan'),
    'new_header_short_row': (NEW_HEADER + '\n1,0.5,50.0,0.6,50.0,0.001,3.0,100.0\n', '8 columns, expected 11'),
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
    assert table(out)['Z_run'] == ('?', '1', '-', '-', '45.00%', '1', '45.00%', '1.0s', '1.0s', '-', '-', '?')


def test_started_run_without_metrics_warns(logs, capsys):
    run_dir = os.path.join(logs, 'just_started')
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
        json.dump(dict(name='just_started', mode='P'), f)
    code, out, err = run_plot([logs], capsys)
    assert code == 0 and run_dir in one_line(err) and 'no metrics.csv' in err
    assert table(out) == EXPECTED


def test_a_run_that_cannot_be_entered_is_named_not_left_out(logs, capsys, monkeypatch):
    """Another user's run in a shared logs/ (mode 700; the tests may run as root, so entering it is refused by hand)
    looked like no run at all: it was left out of the figure and the table without a word."""
    hidden = os.path.join(logs, 'P_run')
    stat = os.stat

    def refusing(path, *args, **kwargs):
        if os.fspath(path).startswith(hidden + os.sep):
            raise PermissionError(13, 'Permission denied', os.fspath(path))
        return stat(path, *args, **kwargs)
    monkeypatch.setattr(plot.os, 'stat', refusing)
    code, out, err = run_plot([logs], capsys)
    assert code == 0
    assert table(out) == {name: row for name, row in EXPECTED.items() if name != 'P_run'}
    line = one_line(err)
    assert line.startswith(f'plot.py: warning: skipping {hidden}: cannot look into it (Permission denied)'), line
    assert 'chmod' in line


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


# ---------------------------------------------------------------- metrics.csv with validation and memory columns


def test_old_and_new_metrics_headers_read_by_column_name(tmp_path):
    old = write_run(tmp_path, 'old', epochs=[(50.0, 55.0, 2.0)])
    new = write_run(tmp_path, 'new', epochs=[(50.0, 55.0, 2.0), (60.0, 65.0, 3.0)], val=[None, None],
                    peak=[None, None])  # no validation split, CPU: the three new cells are empty
    for run_dir in (old, new):
        history = plot.read_metrics(os.path.join(run_dir, 'metrics.csv'))
        assert all(row['val_acc'] is row['val_loss'] is row['peak_mem_gib'] is row['includes_compile'] is None
                   for row in history)
    assert [row['test_acc'] for row in history] == [55.0, 65.0]
    # any order of columns, unknown ones ignored
    shuffled = os.path.join(str(tmp_path), 'shuffled.csv')
    with open(shuffled, 'w') as f:
        f.write('test_acc,future_column,peak_mem_gib,epoch,val_acc,epoch_time_s,train_acc,lr,train_loss,test_loss,'
                'train_images_per_s\n71.5,whatever,7.25,1,70.0,3.5,60.0,0.001,1.0,0.9,100.0\n')
    (row,) = plot.read_metrics(shuffled)
    assert (row['epoch'], row['test_acc'], row['val_acc'], row['peak_mem_gib'], row['epoch_time_s']) == \
        (1, 71.5, 70.0, 7.25, 3.5) and 'future_column' not in row


def test_table_test_at_best_val_is_not_the_oracle(tmp_path, capsys):
    # best val at epoch 3 (first of the tie with epoch 4), best test at epoch 2, last epoch 4: three different numbers
    write_run(tmp_path, 'val_run',
              epochs=[(70.0, 80.0, 10.0), (80.0, 90.0, 12.0), (85.0, 85.0, 11.0), (90.0, 87.0, 11.0)],
              val=[82.0, 84.0, 88.0, 88.0], peak=[10.0, 12.5, None, 11.0], checkpoint_bytes=1_874_000)
    write_run(tmp_path, 'full_run', 'F', 85806346, epochs=[(70.0, 75.0, 100.0), (80.0, 74.0, 140.0)],
              val=[None, None], peak=[40.0, 40.25], checkpoint_bytes=342_400_000)
    code, out, err = run_plot([tmp_path], capsys)
    assert code == 0 and err == ''
    assert table(out) == {
        'full_run': ('F', '2', '-', '-', '75.00%', '1', '74.00%', '2m00s', '4m00s', '40.2 GiB', '342 MB', '85,806,346'),
        'val_run': ('P', '4', '85.00%', '3', '90.00%', '2', '87.00%', '11.0s', '44.0s', '12.5 GiB', '1.9 MB', '92,170'),
    }


def test_format_bytes():
    assert plot.format_bytes(512) == '512 B'
    assert plot.format_bytes(31_000) == '31 kB'
    assert plot.format_bytes(1_874_000) == '1.9 MB'
    assert plot.format_bytes(342_400_000) == '342 MB'
    assert plot.format_bytes(999_900) == '1.0 MB'
    assert plot.format_bytes(2_500_000_000) == '2.5 GB'


def test_sweep_directory_is_a_directory_of_runs(logs, capsys, monkeypatch):
    sweep = os.path.join(logs, 'lr_sweep')
    write_run(sweep, 'P_lr1e-3', epochs=[(50.0, 55.0, 2.0)])
    write_run(sweep, 'P_lr1e-2', epochs=[(60.0, 66.0, 2.0)])
    os.makedirs(os.path.join(sweep, 'logs'))  # sweep.py's layout: per-trial output logs, definition, report, lock
    for name in ('sweep.csv', 'sweep.md', 'sweep.json', 'sweep.log', 'sweep.lock', 'logs/P_lr1e-3.log'):
        with open(os.path.join(sweep, name), 'w') as f:
            f.write('name,lr\nP_lr1e-3,0.001\n' if name.endswith('csv') else '# lr sweep\n')
    # a run of other data, set aside by sweep.py: README says plot.py SWEEP_DIR leaves it out, not that it is a sweep
    write_run(os.path.join(sweep, 'set-aside'), 'P_lr1e-3.other-data-1', epochs=[(10.0, 11.0, 2.0)])
    code, out, err = run_plot([sweep], capsys)
    assert code == 0 and err == ''
    assert list(table(out)) == ['P_lr1e-2', 'P_lr1e-3']
    assert_png(os.path.join(sweep, 'accuracy.png'))
    code, out, err = run_plot([logs], capsys)  # logs/ itself: its runs, not the sweep's (one level), and says so
    assert code == 0 and list(table(out)) == sorted(RUNS)
    assert err.count('\n') == 1 and 'warning: not plotting the runs in' in err and sweep in err
    assert 'pass it as a PATH' in err
    code, out, err = run_plot([logs, sweep], capsys)  # passed as a PATH of its own, as the warning says: no warning
    assert code == 0 and err == '' and list(table(out)) == sorted(RUNS) + ['P_lr1e-2', 'P_lr1e-3']
    code, _, err = run_plot([logs + os.sep, sweep + os.sep], capsys)  # as a shell's tab completion types them
    assert code == 0 and err == ''
    monkeypatch.chdir(logs)  # and as typed from logs/ itself
    code, _, err = run_plot(['.', 'lr_sweep'], capsys)
    assert code == 0 and err == ''
    # one run of the sweep picked out: it is plotted, and the sweep is not said to be left out
    code, out, err = run_plot(['.', os.path.join('lr_sweep', 'P_lr1e-2')], capsys)
    assert code == 0 and err == '' and list(table(out)) == sorted(RUNS) + ['P_lr1e-2']


def test_a_folder_of_sweeps_names_every_one(tmp_path, capsys):
    for name in ('sweep-a', 'sweep-b'):
        write_run(tmp_path / 'sweeps' / name, 'grid_lr=1e-3', epochs=[(50.0, 55.0, 2.0)])
    code, out, err = run_plot([tmp_path / 'sweeps'], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert (f"{tmp_path / 'sweeps' / 'sweep-a'}, {tmp_path / 'sweeps' / 'sweep-b'} hold runs (sweeps?): pass one or "
            f"more of them") in err
    code, out, err = run_plot([tmp_path / 'sweeps', tmp_path / 'sweeps' / 'sweep-a'], capsys)  # one passed: plotted
    assert code == 0 and list(table(out)) == ['grid_lr=1e-3']
    assert err.strip() == f"plot.py: warning: not plotting the runs in {tmp_path / 'sweeps' / 'sweep-b'} (a sweep?): " \
                          f"pass it as a PATH of its own"


def test_unfinished_run_shows_epochs_done_of_planned(tmp_path, capsys, monkeypatch):
    figures = captured_figures(monkeypatch)
    root = tmp_path / 'logs'
    epochs = [(70.1, 80.3, 4.1), (84.2, 86.9, 4.1)]
    for name, planned in (('P_stopped', 30), ('P_done', 2)):
        run_dir = write_run(root, name, epochs=epochs)
        with open(os.path.join(run_dir, 'summary.json'), 'w') as f:  # what train.py writes after every epoch
            json.dump(dict(epochs_done=2, epochs=planned, finished=planned == 2), f)
    code, out, err = run_plot([root], capsys)
    assert code == 0
    assert column(out, 'P_stopped', 'epochs') == '2/30' and column(out, 'P_done', 'epochs') == '2'
    assert one_line(err).startswith('plot.py: warning: run') and 'P_stopped' in err and 'P_done' not in err
    assert '2 of 30 epochs' in err and 'not final' in err
    legend = [text.get_text() for text in figures[0].legends[0].get_texts()]
    assert legend == ['P_done (P)', 'P_stopped (P, 2/30 epochs)']
    with open(os.path.join(root, 'P_stopped', 'summary.json'), 'w') as f:  # as train.py writes it on a non-finite loss
        json.dump(dict(epochs_done=2, epochs=30, finished=False, diverged=dict(epoch=3, step=17)), f)
    code, out, err = run_plot([root], capsys)
    assert code == 0 and column(out, 'P_stopped', 'epochs') == '2/30'
    assert 'diverged (a non-finite loss) in epoch 3' in one_line(err) and '--resume it' not in err


def test_a_run_resumed_with_another_epoch_says_so_in_the_table(tmp_path, capsys, monkeypatch):
    """A finished 2-epoch run extended to 3 (main.py records epoch_before in config.json's resumed list) showed '3',
    as a run planned for 3 epochs, whose lr schedule differs: the table says it was extended (or shortened) from the
    plan it started with, or that its --epoch changed when it was set back to that plan since; the legend is
    unchanged."""
    figures = captured_figures(monkeypatch)
    root = tmp_path / 'logs'
    epochs = [(70.1, 80.3, 4.1), (84.2, 86.9, 4.1), (85.0, 87.5, 4.1)]
    for name, resumed, planned, done in (('P_ext', [dict(from_epoch=2, epoch_before=2), dict(from_epoch=2)], 3, 3),
                                         ('P_cut', [dict(from_epoch=1, epoch_before=6), dict(epoch_before=5)], 4, 3),
                                         ('P_plain', [dict(from_epoch=1)], 3, 3),
                                         # 3, then 5, then back to 3: the lr followed a 5-epoch plan in between
                                         ('P_back', [dict(from_epoch=1, epoch_before=3), dict(epoch_before=5)], 3, 3),
                                         # extended to 4 and stopped before its first save: summary.json still says 2
                                         ('P_more', [dict(from_epoch=2, epoch_before=2)], 4, 2)):
        run_dir = write_run(root, name, epochs=epochs[:done])
        config_path = os.path.join(run_dir, 'config.json')
        with open(config_path) as f:
            config = dict(json.load(f), epoch=planned, resumed=resumed)
        with open(config_path, 'w') as f:
            json.dump(config, f)
        with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
            saved = done if name == 'P_more' else planned
            json.dump(dict(epochs_done=done, epochs=saved, finished=done == saved), f)
    code, out, err = run_plot([root], capsys)
    assert code == 0
    assert [column(out, name, 'epochs') for name in ('P_ext', 'P_cut', 'P_plain', 'P_back', 'P_more')] == [
        '3 (extended from 2)', '3/4 (shortened from 6)', '3', '3 (--epoch changed on resume)', '2/4 (extended from 2)']
    assert 'P_more has 2 of 4 epochs' in err  # not final: --resume trains it on to 4
    legend = [text.get_text() for text in figures[0].legends[0].get_texts()]
    assert sorted(legend) == ['P_back (P)', 'P_cut (P, 3/4 epochs)', 'P_ext (P)', 'P_more (P, 2/4 epochs)',
                              'P_plain (P)']


def test_a_hand_edited_resumed_list_or_a_missing_summary_still_plots(tmp_path, capsys):
    """config.json's resumed list edited by hand (not a list, entries not objects, an epoch_before not a count), or a
    resumed run without summary.json (its plan then config.json's): the run is plotted, not a traceback."""
    root = tmp_path / 'logs'
    odd = [7, 'x', dict(epoch_before='2'), dict(epoch_before=4)]
    for name, resumed, summary in (('P_int', 5, True), ('P_odd', odd, True), ('P_nosummary', [dict(epoch_before=2)],
                                                                                           False)):
        run_dir = write_run(root, name)
        config_path = os.path.join(run_dir, 'config.json')
        with open(config_path) as f:
            config = dict(json.load(f), epoch=2, resumed=resumed)
        with open(config_path, 'w') as f:
            json.dump(config, f)
        if summary:
            with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
                json.dump(dict(epochs_done=2, epochs=2, finished=True), f)
    code, out, err = run_plot([root, '--out', tmp_path / 'acc.png'], capsys)
    assert code == 0, err
    assert [column(out, name, 'epochs') for name in ('P_int', 'P_odd', 'P_nosummary')] == [
        '2', '2 (shortened from 4)', '2 (--epoch changed on resume)']


def test_a_run_that_diverged_in_its_first_epoch_is_not_called_unfinished(tmp_path, capsys):
    """No epoch finished, so metrics.csv has only its header; 'no finished epoch yet' would invite a --resume that
    diverges again."""
    write_run(tmp_path / 'logs', 'P_ok')
    run_dir = write_run(tmp_path / 'logs', 'F_lr1e8', epochs=())
    with open(os.path.join(run_dir, 'summary.json'), 'w') as f:  # as train.py writes it on a non-finite loss
        json.dump(dict(epochs_done=0, epochs=2, finished=False, diverged=dict(epoch=1, step=3)), f)
    code, out, err = run_plot([tmp_path / 'logs'], capsys)
    assert code == 0 and list(table(out)) == ['P_ok']
    assert one_line(err) == (f"plot.py: warning: skipping run {run_dir}: it diverged (a non-finite loss) in epoch 1, "
                             f"step 3, before any epoch finished; a run with a lower --lr is the fix, not --resume")


def test_directory_holding_only_sweeps_points_at_them(tmp_path, capsys):
    write_run(tmp_path / 'logs' / 'my_sweep', 'a_run')
    code, out, err = run_plot([tmp_path / 'logs'], capsys)
    assert code == 2 and out == ''
    assert 'no runs found' in one_line(err) and str(tmp_path / 'logs' / 'my_sweep') in err


# ---------------------------------------------------------------- --cost


@pytest.fixture
def cost_logs(tmp_path):
    root = tmp_path / 'logs'
    # test@best val 85 (epoch 3), not the final 87 nor the oracle 90
    write_run(root, 'P_val', 'P', 92170, [(70.0, 80.0, 4.0), (80.0, 90.0, 4.5), (85.0, 85.0, 4.0), (90.0, 87.0, 4.5)],
              val=[82.0, 84.0, 88.0, 86.0], checkpoint_bytes=1_874_000)
    write_run(root, 'F_noval', 'F', 85806346, [(70.0, 70.0, 100.0), (80.0, 75.0, 140.0)], checkpoint_bytes=343_000_000)
    write_run(root, 'Z_noconfig', epochs=[(40.0, 45.0, 8.0)], config=False)  # no params, no checkpoint
    return str(root)


def test_cost_figure(cost_logs, capsys, monkeypatch):
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([cost_logs, '--cost'], capsys)
    assert code == 0 and 'Z_noconfig' in err and 'config.json' in err  # the usual warning, nothing else
    cost_png = os.path.join(cost_logs, 'cost.png')
    assert table_lines(out)[3] == [f"wrote {os.path.join(cost_logs, 'accuracy.png')}", f'wrote {cost_png}']
    assert_png(cost_png)
    assert len(figures) == 2
    params_ax, time_ax, size_ax = figures[1].axes
    # y: test@best val where the run has a validation split, else the final test accuracy
    assert points(params_ax).tolist() == [[92170, 85.0], [85806346, 75.0]]
    assert points(time_ax) == pytest.approx(np.array([(4.25, 85.0), (8.0, 45.0), (120.0, 75.0)]))
    assert points(size_ax) == pytest.approx(np.array([(1.874, 85.0), (343.0, 75.0)]))  # MB; Z_noconfig: no file
    assert 'parameters' in params_ax.get_xlabel() and 'epoch' in time_ax.get_xlabel() and 'MB' in size_ax.get_xlabel()
    assert params_ax.get_xscale() == time_ax.get_xscale() == size_ax.get_xscale() == 'log'  # times span 28x
    assert 'test accuracy' in params_ax.get_ylabel()
    assert sorted(t.get_text() for t in params_ax.texts) == ['F_noval', 'P_val']  # each point named
    legend = [t.get_text() for t in figures[1].legends[0].get_texts()]
    assert legend[:3] == ['P', 'F', '?'] and any('best val' in t for t in legend) and any('final' in t for t in legend)
    for ax in figures[1].axes:  # filled marker: P_val (y 85), hollow: the runs without validation
        faces = [(y, c.get_facecolors()[0][3]) for c in ax.collections for _, y in c.get_offsets()]
        assert faces and all(alpha == (1.0 if y == 85.0 else 0.0) for y, alpha in faces)
    for fig in figures:
        close_figure(fig)


def test_cost_labels_stay_in_their_panel_and_apart(tmp_path, capsys, monkeypatch):
    """main.py's ~55-character run names used to run past the panels' edges (and the figure's), and two runs at the
    same point printed their names over each other."""
    root = tmp_path / 'logs'
    costs = [(1000, 1.0, 4_000), (92170, 4.1, 1_874_000), (92170, 4.1, 1_874_000), (92170, 9.0, 1_874_000),
             (2_000_000, 30.0, 8_000_000), (85806346, 120.0, 343_000_000), (85844746, 125.0, 343_400_000),
             (85806346, 119.0, 343_000_000)]
    names = []
    for i, (params, seconds, size) in enumerate(costs):
        names.append(f'P_vit_base_patch16_224.augreg_in21k_20261126-01{i:02d}03')
        accuracy = 80.0 if i in (1, 2) else 75.0 + i  # runs 1 and 2: the same point in every panel
        write_run(root, names[-1], 'P', params, [(70.0, accuracy, seconds)], checkpoint_bytes=size)
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([root, '--cost'], capsys)
    assert code == 0, err
    fig = figures[1]
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        boxes = [label.get_window_extent(renderer) for label in ax.texts]
        assert sorted(name for label in ax.texts for name in label.get_text().split('\n')) == names
        for box in boxes:
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        for i, box in enumerate(boxes):
            assert not any(box.overlaps(other) for other in boxes[:i])
    for fig in figures:
        close_figure(fig)


def test_cost_axes_of_close_values_have_few_readable_ticks(tmp_path, capsys, monkeypatch):
    """F beside P+F on ViT-B/4: 85,152,010 against 85,612,810 parameters (0.5% apart) drew eight overlapping
    2.585x10^5-style labels on a log axis. Close values get a linear axis with a few plain ticks."""
    for name, mode, params, seconds, size in (('F', 'F', 85_152_010, 4.8, 340_608_040),
                                              ('PF', 'P+F', 85_612_810, 5.2, 342_451_240)):
        write_run(tmp_path / 'logs', name, mode, params, [(80.0, 90.0, seconds)], checkpoint_bytes=size)
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path / 'logs', '--cost'], capsys)[0] == 0
    fig = figures[1]
    fig.canvas.draw()
    for ax in fig.axes:
        assert ax.get_xscale() == 'linear'
        ticks = [t for t in ax.get_xticklabels() if t.get_text() and ax.get_xlim()[0] <= t.get_position()[0]
                 <= ax.get_xlim()[1]]
        assert 2 <= len(ticks) <= 6 and all(len(t.get_text()) <= 7 for t in ticks), [t.get_text() for t in ticks]
        boxes = [t.get_window_extent() for t in ticks]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[:i])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][1].endswith('M')  # 85.4M, not 85400000
    for fig in figures:
        close_figure(fig)


def test_a_cost_axis_where_every_run_has_one_value_names_that_value(tmp_path, capsys, monkeypatch):
    """A sweep's runs share their parameter count and checkpoint size: those panels had ticks 2,080 ... 2,320 around
    the points' 2,186, which no tick named. The one value is the one tick."""
    for name, seconds in (('grid_lr=1e-3', 1.9), ('grid_lr=5e-3', 2.3), ('final_seed=1', 3.7)):
        write_run(tmp_path / 'logs', name, 'P', 2186, [(30.0, 25.0, seconds)], checkpoint_bytes=9000)
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path / 'logs', '--cost'], capsys)[0] == 0
    fig = figures[1]
    fig.canvas.draw()
    params_ax, time_ax, size_ax = fig.axes
    assert [t.get_text() for t in params_ax.get_xticklabels()] == ['2,186']
    assert [t.get_text() for t in size_ax.get_xticklabels()] == ['0.009']
    assert len([t for t in time_ax.get_xticklabels() if t.get_text()]) >= 2  # values that differ: ticks as before
    for fig in figures:
        close_figure(fig)


def test_a_cost_panel_no_run_has_says_so(tmp_path, capsys, monkeypatch):
    """Runs without trainable.safetensors (copied without it): the checkpoint panel is empty, not a crash."""
    write_run(tmp_path / 'logs', 'a', 'P', 92170, [(80.0, 90.0, 4.0)])
    write_run(tmp_path / 'logs', 'b', 'F', 85_806_346, [(80.0, 91.0, 9.0)])
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([tmp_path / 'logs', '--cost'], capsys)
    assert code == 0, err
    assert [t.get_text() for t in figures[1].axes[2].texts] == ['no run has this']
    for fig in figures:
        close_figure(fig)


def test_cost_axis_says_which_accuracy(cost_logs, tmp_path, capsys, monkeypatch):
    figures = captured_figures(monkeypatch)
    run_plot([os.path.join(cost_logs, 'P_val'), '--cost', '--out', tmp_path / 'acc.png'], capsys)
    run_plot([os.path.join(cost_logs, 'F_noval'), '--cost', '--out', tmp_path / 'acc.png'], capsys)
    assert figures[1].axes[0].get_ylabel() == 'test accuracy at best val epoch (%)'
    assert figures[3].axes[0].get_ylabel() == 'final test accuracy (%)'
    assert figures[3].axes[1].get_xscale() == 'linear'  # one time: no span to put on a log scale
    for fig in figures:
        close_figure(fig)


def test_cost_next_to_out(cost_logs, tmp_path, capsys):
    code, out, _ = run_plot([cost_logs, '--cost', '--out', tmp_path / 'report' / 'acc.pdf'], capsys)
    assert code == 0 and out.strip().splitlines()[-1] == f"wrote {tmp_path / 'report' / 'acc_cost.pdf'}"
    with open(tmp_path / 'report' / 'acc_cost.pdf', 'rb') as f:
        assert f.read(5) == b'%PDF-'
    assert not os.path.exists(os.path.join(cost_logs, 'cost.png'))


# ---------------------------------------------------------------- --confusion


def confusion_counts(n, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, (n, n)) * (rng.random((n, n)) < 0.3)
    np.fill_diagonal(counts, rng.integers(20, 90, n))
    return counts


@pytest.mark.parametrize('n', [10, 100])
def test_confusion_heatmap_is_row_normalised(n, logs, capsys, monkeypatch):
    run_dir = os.path.join(logs, 'P_run')
    classes = ['airplane', 'car, sedan'] + [f'class_{i}' for i in range(2, n)]  # a comma: csv quoting
    counts = confusion_counts(n)
    counts[3] = 0  # a class without test images: a blank row, not a division by zero
    write_confusion(run_dir, classes, counts)
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([run_dir, '--confusion'], capsys)
    png = os.path.join(run_dir, 'confusion.png')
    assert code == 0 and err == '' and out.strip() == f'wrote {png}'  # no table, no accuracy.png
    assert not os.path.exists(os.path.join(run_dir, 'accuracy.png'))
    assert_png(png, min_width=1000 if n == 10 else 2500)  # 100 classes: a big figure to zoom into
    (fig,) = figures
    ax = fig.axes[0]
    shares = np.ma.filled(ax.images[0].get_array(), np.nan)
    assert shares.shape == (n, n) and np.isnan(shares[3]).all()
    rows = [i for i in range(n) if i != 3]
    assert shares[rows].sum(axis=1) == pytest.approx(100)
    assert shares[rows] == pytest.approx(100 * counts[rows] / counts[rows].sum(axis=1, keepdims=True))
    assert ax.get_ylabel() == 'true class' and ax.get_xlabel() == 'predicted class'
    assert 'P_run' in ax.get_title() and f'{100 * np.trace(counts) / counts.sum():.2f}% accuracy' in ax.get_title()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:2] == ['airplane', 'car, sedan'] and len(labels) == n
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert len(fig.axes) == 2  # the colorbar
    if n == 10:  # every cell says its percentage
        assert len(ax.texts) == 90 and f'{shares[0, 0]:.0f}' in [t.get_text() for t in ax.texts]
    else:
        assert len(ax.texts) == 0  # 10,000 numbers would be unreadable
    close_figure(fig)


def write_font(path, chars, family):
    """A TrueType font with a square glyph for each of `chars`, as a CJK font stands for here."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen
    names = {char: f'uni{ord(char):04X}' for char in chars}
    pen = TTGlyphPen(None)
    pen.moveTo((100, 0)), pen.lineTo((100, 700)), pen.lineTo((800, 700)), pen.lineTo((800, 0)), pen.closePath()
    square = pen.glyph()
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(['.notdef', *names.values()])
    builder.setupCharacterMap({ord(char): name for char, name in names.items()})
    builder.setupGlyf({name: square for name in ['.notdef', *names.values()]})
    builder.setupHorizontalMetrics({name: (1000, 0) for name in ['.notdef', *names.values()]})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable(dict(familyName=family, styleName='Regular'))
    builder.setupOS2()
    builder.setupPost()
    builder.save(str(path))


def only_fonts(monkeypatch, extra=()):
    """matplotlib sees its own DejaVu fonts and `extra` font files only, whatever this machine has installed."""
    from matplotlib import font_manager
    manager = font_manager.fontManager
    monkeypatch.setattr(manager, 'ttflist', [entry for entry in manager.ttflist if entry.name.startswith('DejaVu')])
    for path in extra:
        manager.addfont(str(path))


@pytest.mark.parametrize('cjk_font', [True, False])
def test_class_names_without_glyphs_in_the_default_font(cjk_font, logs, tmp_path, capsys, monkeypatch, recwarn):
    font = tmp_path / 'cjk.ttf'
    write_font(font, '猫狗', 'VPT Test CJK')
    only_fonts(monkeypatch, [font] if cjk_font else [])
    run_dir = os.path.join(logs, 'P_run')
    write_confusion(run_dir, ['猫', '狗', 'bird'], [[5, 1, 0], [2, 7, 0], [0, 0, 4]])
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([run_dir, '--confusion'], capsys)
    assert code == 0 and out.strip() == f"wrote {os.path.join(run_dir, 'confusion.png')}"
    assert not [w for w in recwarn if 'Glyph' in str(w.message)]  # not one matplotlib warning per character
    (fig,) = figures
    labels = {t.get_text(): t for t in fig.axes[0].get_yticklabels()}
    if cjk_font:  # the font that has them is the fallback of the texts that need it, and only of those
        assert err == ''
        assert labels['猫'].get_fontfamily()[-1] == 'VPT Test CJK' and labels['狗'].get_fontfamily()[-1] == 'VPT Test CJK'
        assert 'VPT Test CJK' not in labels['bird'].get_fontfamily()
    else:  # boxes, and one line that says so and what to install
        line = one_line(err)
        assert line.startswith('plot.py: warning: no installed font has 狗 猫') and 'fonts-noto-cjk' in line
        assert 'fontlist-*.json' in line
    close_figure(fig)


def test_confusion_best_is_drawn_beside_the_last_epochs(logs, tmp_path, capsys, monkeypatch):
    """--eval_only --checkpoint best writes confusion_best.csv: the matrix of the epoch a val-split run reports."""
    run_dir = os.path.join(logs, 'F_run')
    write_confusion(run_dir, ['a', 'b'], [[3, 3], [3, 3]])
    os.rename(os.path.join(run_dir, 'confusion.csv'), os.path.join(run_dir, 'confusion_best.csv'))
    write_confusion(run_dir, ['a', 'b'], [[5, 1], [2, 7]])
    figures = captured_figures(monkeypatch)
    code, out, _ = run_plot([run_dir, '--confusion'], capsys)
    assert code == 0 and out.strip().splitlines() == [f"wrote {os.path.join(run_dir, name)}"
                                                      for name in ('confusion.png', 'confusion_best.png')]
    titles = [figure.axes[0].get_title() for figure in figures]
    assert titles[0].startswith('F_run: 80.00% accuracy') and titles[1].startswith('F_run, best val epoch: 50.00%')
    with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
        json.dump(dict(best_val_epoch=2), f)  # the epoch of best.safetensors, which --eval_only evaluated
    run_plot([run_dir, '--confusion'], capsys)
    assert figures[-1].axes[0].get_title().startswith('F_run, best val epoch 2: 50.00%')
    for figure in (figures.pop(), figures.pop()):  # this redraw's two, so that the counts below stay as they were
        close_figure(figure)
    assert_png(os.path.join(run_dir, 'confusion_best.png'), min_width=500)
    code, out, _ = run_plot([run_dir, '--confusion', '--out', tmp_path / 'c.png'], capsys)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'c.png'}"  # --out: one figure, the last epoch's
    assert len(figures) == 3 and figures[2].axes[0].get_title().startswith('F_run: 80.00%')
    # an unfinished val run evaluated with --checkpoint best has confusion_best.csv alone
    os.remove(os.path.join(run_dir, 'confusion.csv'))
    code, out, _ = run_plot([run_dir, '--confusion'], capsys)
    assert code == 0 and out.strip() == f"wrote {os.path.join(run_dir, 'confusion_best.png')}"
    for figure in figures:
        close_figure(figure)


def test_confusion_for_several_runs_and_missing_csv(logs, capsys):
    write_confusion(os.path.join(logs, 'F_run'), ['a', 'b'], [[5, 1], [2, 7]])
    write_confusion(os.path.join(logs, 'P_run'), ['a', 'b'], [[3, 0], [0, 3]])
    code, out, err = run_plot([logs, '--confusion'], capsys)
    assert code == 0
    wrote = [f"wrote {os.path.join(logs, name, 'confusion.png')}" for name in ('F_run', 'P_run')]
    assert out.strip().splitlines() == wrote
    line = one_line(err)  # PF_run has none
    pf = os.path.join(logs, 'PF_run')
    assert line.startswith('plot.py: warning:') and pf in line and 'no confusion.csv' in line
    assert f'python main.py --eval_only --resume {pf}' in line and 'last epoch' in line
    for name in ('F_run', 'P_run'):
        assert_png(os.path.join(logs, name, 'confusion.png'), min_width=500)
    assert not os.path.exists(os.path.join(logs, 'accuracy.png'))


@pytest.mark.parametrize('flag', ['--confusion', '--mistakes'])
def test_a_run_that_cannot_be_listed_does_not_stop_the_others(flag, logs, capsys, monkeypatch):
    """A run directory one may enter but not list (mode 711; the tests may run as root, so listing is refused by
    hand), or one moved away as it is drawn (sweep.py's set-aside/): looking for its _epoch<N> files was a traceback
    that drew nothing for the other runs."""
    write_confusion(os.path.join(logs, 'F_run'), ['a', 'b'], [[5, 1], [2, 7]])
    write_predictions(os.path.join(logs, 'F_run'), [('0', 'a', 'b', 0.9, 0)])
    set_config(os.path.join(logs, 'F_run'), dataset='cifar10', data_dir=str(logs))
    monkeypatch.setattr(plot, 'cifar_test_images', lambda path: np.zeros((1, 32, 32, 3), np.uint8))
    hidden = os.path.join(logs, 'P_run')
    refuse_listing(monkeypatch, hidden)
    code, out, err = run_plot([logs, flag], capsys)
    assert code == 0
    figure = 'confusion.png' if flag == '--confusion' else 'mistakes.png'
    assert out.strip() == f"wrote {os.path.join(logs, 'F_run', figure)}"
    assert f'plot.py: warning: run {hidden}: cannot list it (' in err and 'Permission denied' in err
    assert 'Traceback' not in err


def test_confusion_of_the_last_epoch_names_it(logs, capsys, monkeypatch):
    """A val-split run reports its best val epoch, and a resume that trains on keeps confusion.png as
    confusion_epoch<N>.png: the last epoch's matrix says which epoch it is, as the best one's and the mistakes grid do
    (it said only 'F_run: 80.00% accuracy', beside a table whose test@best val is another number)."""
    run_dir = os.path.join(logs, 'F_run')
    write_confusion(run_dir, ['a', 'b'], [[5, 1], [2, 7]])
    with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
        json.dump(dict(epochs_done=3, epochs=3, finished=True, final_epoch=3, best_val_epoch=2), f)
    figures = captured_figures(monkeypatch)
    code, _, _ = run_plot([run_dir, '--confusion'], capsys)
    assert code == 0 and figures[0].axes[0].get_title().startswith('F_run, last epoch 3: 80.00% accuracy')
    with open(os.path.join(run_dir, 'summary.json'), 'w') as f:  # one that does not say: the name alone, as before
        json.dump(dict(finished=True, final_epoch='3'), f)
    run_plot([run_dir, '--confusion'], capsys)
    assert figures[1].axes[0].get_title().startswith('F_run: 80.00% accuracy')
    for figure in figures:
        close_figure(figure)


def test_an_unfinished_run_gets_its_newest_checkpoint_matrix(logs, capsys, monkeypatch):
    """No confusion.csv before the last epoch: --eval_only writes confusion_epoch<N>.csv, and that is what is drawn
    (plot.py used to send the user back to --eval_only in a circle)."""
    run_dir = os.path.join(logs, 'P_run')
    for epoch, counts in ((9, [[1, 5], [2, 7]]), (10, [[5, 1], [2, 7]])):  # 10 after 9: by number, not by name
        write_confusion(run_dir, ['a', 'b'], counts)
        os.rename(os.path.join(run_dir, 'confusion.csv'), os.path.join(run_dir, f'confusion_epoch{epoch}.csv'))
    drawn, draw = [], plot.plot_confusion
    monkeypatch.setattr(plot, 'plot_confusion', lambda *args: (drawn.append(args), draw(*args)))
    code, out, err = run_plot([run_dir, '--confusion'], capsys)
    target = os.path.join(run_dir, 'confusion_epoch10.png')
    assert code == 0 and err == '' and out.strip() == f"wrote {target}", err
    ((title, classes, counts, path),) = drawn
    assert title == 'P_run, epoch 10 (unfinished)' and counts.tolist() == [[5, 1], [2, 7]] and path == target
    assert_png(target, min_width=500)


def test_confusion_out_for_one_run(logs, tmp_path, capsys):
    """--out in a folder not made yet: made, as for the accuracy figure (a run's own figure is checked for whether it
    can be written there, --out is not)."""
    write_confusion(os.path.join(logs, 'P_run'), ['a', 'b'], [[5, 1], [2, 7]])
    cm = tmp_path / 'report' / 'cm.png'
    code, out, err = run_plot([os.path.join(logs, 'P_run'), '--confusion', '--out', cm], capsys)
    assert code == 0 and err == '' and out.strip() == f"wrote {cm}"
    assert_png(cm, min_width=500)


def test_confusion_out_refused_for_several_runs(logs, tmp_path, capsys):
    write_confusion(os.path.join(logs, 'P_run'), ['a', 'b'], [[5, 1], [2, 7]])
    code, out, err = run_plot([logs, '--confusion', '--out', tmp_path / 'cm.png'], capsys)
    assert code == 2 and out == ''
    line = one_line(err)
    assert line.startswith('plot.py: error: --out') and '3 runs' in line and 'drop --out' in line
    assert files_under(tmp_path) == [name for name in files_under(tmp_path) if name.startswith('logs/')]
    assert not os.path.exists(os.path.join(logs, 'P_run', 'confusion.png'))


def test_confusion_nowhere_is_an_error(logs, capsys):
    code, out, err = run_plot([logs, '--confusion'], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == '' and len(lines) == 4  # a warning per run, then the error
    assert lines[-1].startswith('plot.py: error: no confusion matrix to draw under')


BAD_CONFUSION = {
    'not_square': ('true\\predicted,a,b\na,1,2\n', '1 rows for the 2 classes'),
    'short_row': ('true\\predicted,a,b\na,1,2\nb,3\n', 'row 3 has 2 columns'),
    'wrong_order': ('true\\predicted,a,b\nb,1,2\na,3,4\n', "is class 'b', expected 'a'"),
    'fraction': ('true\\predicted,a,b\na,1,2.5\nb,3,4\n', 'not an integer'),
    'negative': ('true\\predicted,a,b\na,1,-2\nb,3,4\n', 'negative'),
    'minus_one': ('true\\predicted,a,b\na,1,2\nb,-1,4\n', 'row 3 has a negative count'),  # the smallest negative
    'zeros': ('true\\predicted,a,b\na,0,0\nb,0,0\n', 'all zero'),
    'empty': ('', 'empty'),
}


@pytest.mark.parametrize('case', sorted(BAD_CONFUSION))
def test_bad_confusion_is_skipped(case, logs, capsys):
    content, reason = BAD_CONFUSION[case]
    write_confusion(os.path.join(logs, 'F_run'), ['a', 'b'], [[5, 1], [2, 7]])
    bad = os.path.join(logs, 'P_run')
    with open(os.path.join(bad, 'confusion.csv'), 'w') as f:
        f.write(content)
    code, out, err = run_plot([os.path.join(logs, 'F_run'), bad, '--confusion'], capsys)
    assert code == 0 and out.strip() == f"wrote {os.path.join(logs, 'F_run', 'confusion.png')}"
    line = one_line(err)
    assert line.startswith(f'plot.py: warning: skipping run {bad}: confusion.csv') and reason in line


def test_confusion_and_cost_together_is_one_line_error(logs, capsys):
    code, out, err = run_plot([logs, '--confusion', '--cost'], capsys)
    assert code == 2 and out == '' and 'not allowed with' in one_line(err)


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


def test_cost_without_val_uses_the_final_epoch_not_the_oracle(tmp_path, capsys, monkeypatch):
    write_run(tmp_path, 'F_noval', 'F', 1000, [(70.0, 80.0, 10.0), (80.0, 75.0, 10.0)], checkpoint_bytes=4000)
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([tmp_path, '--cost'], capsys)
    assert code == 0, err
    assert points(figures[1].axes[0]).tolist() == [[1000, 75.0]]  # final 75, not the best 80
    for fig in figures:
        close_figure(fig)


def test_oracle_epoch_is_the_first_of_equal_test_accuracies(tmp_path, capsys):
    write_run(tmp_path, 'r', epochs=[(70.0, 80.0, 1.0), (80.0, 90.0, 1.0), (85.0, 90.0, 1.0)])
    code, out, _ = run_plot([tmp_path], capsys)
    assert code == 0 and table(out)['r'][4:6] == ('90.00%', '2')


def test_same_run_name_in_two_log_dirs_is_labelled_by_path(tmp_path, capsys, monkeypatch):
    """Two sweeps both hold grid_lr=1e-3: then every run is labelled by its path, not only those two (a bare
    grid_lr=5e-3 beside sweep_P/grid_lr=1e-3 would not say which sweep it came from); by as many of its last folders
    as tell the runs apart, not by whole paths that crowded the legend."""
    write_run(tmp_path / 'a', 'P_run', epochs=[(70.0, 80.0, 1.0)])
    write_run(tmp_path / 'b', 'P_run', epochs=[(70.0, 60.0, 1.0)])
    write_run(tmp_path / 'b', 'F_run', epochs=[(70.0, 50.0, 1.0)])
    code, out, _ = run_plot([tmp_path / 'a', tmp_path / 'b'], capsys)
    assert code == 0
    rows = table(out)
    assert set(rows) == {os.path.join('a', 'P_run'), os.path.join('b', 'P_run'), os.path.join('b', 'F_run')}
    assert rows[os.path.join('b', 'P_run')][6] == '60.00%'
    # the same sweep folder in two projects: the folders above it tell them apart
    for project in ('x', 'y'):
        write_run(tmp_path / project / 'sweep', 'grid', epochs=[(70.0, 40.0, 1.0)])
    code, out, _ = run_plot([tmp_path / 'x' / 'sweep', tmp_path / 'y' / 'sweep'], capsys)
    assert code == 0 and set(table(out)) == {os.path.join('x', 'sweep', 'grid'), os.path.join('y', 'sweep', 'grid')}
    monkeypatch.chdir(tmp_path / 'a')  # one run passed from its own folder: still labelled by where it is
    code, out, _ = run_plot(['P_run', os.path.join('..', 'b', 'P_run')], capsys)
    assert code == 0 and list(table(out)) == [os.path.join('a', 'P_run'), os.path.join('b', 'P_run')]


def test_cost_figure_styles_unfreeze_runs_as_their_method(tmp_path, capsys, monkeypatch):
    """main.py labels a P or linear run with --unfreeze 'P+unfreeze' / 'linear+unfreeze': drawn in its method's
    colour with a marker of its own, not as the grey cross of a run plot.py cannot place."""
    root = tmp_path / 'logs'
    for name, mode in (('p', 'P'), ('pu', 'P+unfreeze'), ('lu', 'linear+unfreeze')):
        write_run(root, name, mode, 1000, [(50.0, 50.0, 1.0)], checkpoint_bytes=1000)
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([str(root), '--cost'], capsys)
    assert code == 0, err
    legend = figures[1].legends[0]
    styles = {text.get_text(): (handle.get_color(), handle.get_marker())
              for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    assert styles == {'P': ('tab:blue', 'o'), 'P+unfreeze': ('tab:blue', 'v'), 'linear+unfreeze': ('tab:purple', 'v')}
    for fig in figures:
        close_figure(fig)


def test_one_epoch_runs_have_integer_epoch_ticks(tmp_path, capsys, monkeypatch):
    """Only one integer (1) lies on the epoch axis of one-epoch runs; it is the one tick, not 0.945, 0.96, ..."""
    for name in ('P_a', 'P_b'):
        write_run(tmp_path, name, epochs=[(70.0, 80.0, 4.1)])
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([tmp_path], capsys)
    assert code == 0, err
    for ax in figures[0].axes:
        low, high = ax.get_xlim()
        assert [tick for tick in ax.get_xticks() if low <= tick <= high] == [1]
    close_figure(figures[0])


def test_table_columns_line_up_with_wide_characters_in_run_names(tmp_path, capsys):
    """A CJK character takes two terminal columns: counted as one, every column after a Chinese run name slid left."""
    root = tmp_path / 'logs'
    write_run(root, '基线_P', 'P')
    write_run(root, 'baseline_P', 'P')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        code, out, err = run_plot([str(root), '--out', tmp_path / 'acc.png', '--cost'], capsys)
    assert code == 0, err
    # where no font has the characters, plot.py's own one warning says so, not matplotlib's one per glyph and figure
    assert not [str(w.message) for w in caught if 'Glyph' in str(w.message)]
    header, rows, _, _ = table_lines(out)
    import unicodedata
    columns = lambda text: sum(2 if unicodedata.east_asian_width(char) in 'WF' else 1 for char in text)
    mode_column = [columns(line[:line.index(' P ') + 1]) for line in rows]
    assert len(rows) == 2 and mode_column[0] == mode_column[1] == header.index('mode'), out


def check_cost_labels(fig, names_at):
    """Each panel of cost.png: one label per point, holding the names of the runs there (names_at(panel index) ->
    {(x, y): [names]}), inside its panel, off the other labels and the other points' markers, with a leader line back
    to its point when, and only when, it was moved away from it."""
    from matplotlib.patches import ConnectionPatch
    from matplotlib.transforms import Bbox
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for index, ax in enumerate(fig.axes):
        frame = ax.get_window_extent(renderer)
        expected = names_at(index)
        assert {tuple(label.xy): label.get_text().replace('\n', '') for label in ax.texts} == {
            point: ''.join(names) for point, names in expected.items()} and len(ax.texts) == len(expected)
        leaders = [tuple(patch.xy2) for patch in ax.patches if isinstance(patch, ConnectionPatch)]
        markers = []
        for points in ax.collections:
            offsets = points.get_offsets()
            radii = np.broadcast_to(np.sqrt(points.get_sizes()) / 2 * fig.dpi / 72, len(offsets))
            markers += [(tuple(point), Bbox.from_bounds(x - r, y - r, 2 * r, 2 * r))
                        for (x, y), point, r in zip(ax.transData.transform(offsets), offsets, radii)]
        boxes = []
        for label in ax.texts:
            box = label.get_window_extent(renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, label
            assert not any(box.overlaps(other) for other in boxes), label
            assert not any(box.overlaps(marker) for point, marker in markers if point != tuple(label.xy)), label
            boxes.append(box)
            x, y = ax.transData.transform(label.xy)
            away = math.hypot(x - min(max(x, box.x0), box.x1), y - min(max(y, box.y0), box.y1))
            assert leaders.count(tuple(label.xy)) == (away > label.get_fontsize() * fig.dpi / 72), label


def test_cost_labels_of_long_names_and_crowded_points_stay_readable(tmp_path, capsys, monkeypatch):
    """A run named by its path is wider than a panel: wrapped over lines and moved in from the panel's edge. Three
    runs at the top point share one label, taller than the room above it: moved down. Points close together keep their
    labels off each other's markers, and a label moved away from its point gets a line back to it."""
    root = tmp_path / 'logs'
    long_name = '_'.join(['P', 'vit_base_patch16_224.augreg_in21k'] + [f'20261126-01{i:02d}03' for i in range(6)])
    runs = [(long_name, 30_000, 10.0, 2_000_000, 70.0),
            ('P_top_a', 92170, 4.1, 1_874_000, 90.0), ('P_top_b', 92170, 4.1, 1_874_000, 90.0),
            ('P_top_c', 92170, 4.1, 1_874_000, 90.0), ('P_near_1', 300_000, 20.0, 6_000_000, 80.0),
            ('P_near_2', 330_000, 21.0, 6_300_000, 80.4), ('P_near_3', 360_000, 22.0, 6_600_000, 80.8),
            ('P_far', 85806346, 120.0, 343_000_000, 60.0)]
    for name, params, seconds, size, accuracy in runs:
        write_run(root, name, 'P', params, [(70.0, accuracy, seconds)], checkpoint_bytes=size)
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([root, '--cost'], capsys)
    assert code == 0, err

    def names_at(index):
        at = {}
        for name, params, seconds, size, accuracy in sorted(runs):
            at.setdefault(((params, seconds, size / 1e6)[index], accuracy), []).append(name)
        return at
    check_cost_labels(figures[1], names_at)
    assert all('\n' in label.get_text() for ax in figures[1].axes for label in ax.texts
               if label.get_text().replace('\n', '') == long_name)
    for fig in figures:
        close_figure(fig)


def test_shown_width_counts_fullwidth_and_combining_characters():
    """Fullwidth forms ('F', e.g. a fullwidth Ｐ) take two terminal columns like CJK ('W'); a combining accent (a
    decomposed é, as macOS file names have it) takes none: the table's columns after such run names line up."""
    assert plot.shown_width('基线_P') == 6
    assert plot.shown_width('Ｐ_run') == 6
    assert plot.shown_width('cafe\u0301') == 4


def test_up_to_twenty_runs_get_a_colour_each(tmp_path, capsys, monkeypatch):
    """Past 10 runs tab20's colours: 12 runs in 12 colours, all drawn as solid lines."""
    for i in range(12):
        write_run(tmp_path, f'P_run{i:02d}')
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path], capsys)[0] == 0
    lines = figures[0].axes[1].get_lines()
    assert len({matplotlib.colors.to_hex(line.get_color()) for line in lines}) == 12
    assert {line.get_linestyle() for line in lines} == {'-'}
    close_figure(figures[0])


# ---------------------------------------------------------------- behaviours a mutation round found unpinned


def test_run_paths_with_a_trailing_slash(logs, tmp_path, capsys, monkeypatch):
    """Shell completion ends directories with '/': the run keeps its name, a run reached both through logs/ and as
    logs/P_run/ is listed once, and same-named runs of two log directories are labelled by their paths as usual."""
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([os.path.join(logs, 'P_run') + os.sep, '--out', tmp_path / 'one.png'], capsys)
    assert code == 0 and err == '' and table(out) == {'P_run': EXPECTED['P_run']}
    assert [t.get_text() for t in figures[0].legends[0].get_texts()] == ['P_run (P)']
    code, out, err = run_plot([logs + os.sep, os.path.join(logs, 'F_run') + os.sep, '--out', tmp_path / 'a.png'],
                              capsys)
    assert code == 0 and err == ''
    assert [cells(line)[0] for line in table_lines(out)[1]] == sorted(RUNS)  # F_run once
    a = write_run(tmp_path / 'a', 'P_run')
    b = write_run(tmp_path / 'b', 'P_run')
    code, out, err = run_plot([a + os.sep, b + os.sep, '--out', tmp_path / 'b.png'], capsys)
    assert code == 0 and list(table(out)) == [os.path.join('a', 'P_run'), os.path.join('b', 'P_run')]
    for fig in figures:
        close_figure(fig)


def test_a_run_passed_as_dot_is_named_by_its_directory(logs, tmp_path, capsys, monkeypatch):
    """cd logs/P_run && plot.py . (or ../P_run/..): the run was named '.' in the table, the legend and the confusion
    matrix's title."""
    monkeypatch.chdir(os.path.join(logs, 'P_run'))
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot(['.', '--out', tmp_path / 'dot.png'], capsys)
    assert code == 0 and err == '' and table(out) == {'P_run': EXPECTED['P_run']}
    assert [t.get_text() for t in figures[0].legends[0].get_texts()] == ['P_run (P)']
    close_figure(figures[0])


def test_a_run_passed_as_dot_is_named_by_its_directory_in_confusion_and_mistakes(tmp_path, capsys, monkeypatch):
    """cd P_run && plot.py . --confusion (or --mistakes): the figure's title named the run '.'."""
    run_dir = folder_run(tmp_path, MIXED)
    write_confusion(run_dir, ['a', 'b', 'c'], [[1, 1, 0], [1, 0, 1], [1, 0, 1]])
    monkeypatch.chdir(run_dir)
    drawn = []
    monkeypatch.setattr(plot, 'plot_confusion', lambda *args: drawn.append(args))
    code, _, err = run_plot(['.', '--confusion'], capsys)
    assert code == 0 and err == '' and [title for title, _, _, _ in drawn] == ['P_run']
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot(['.', '--mistakes', '1', '--out', tmp_path / 'm.png'], capsys)
    assert code == 0 and err == '', err
    assert figures[0].get_suptitle().startswith('P_run, last checkpoint'), figures[0].get_suptitle()
    close_figure(figures[0])


def test_blank_lines_in_metrics_csv_are_ignored(tmp_path):
    run_dir = write_run(tmp_path, 'r', epochs=[(70.0, 80.0, 1.0), (80.0, 85.0, 1.0)])
    path = os.path.join(run_dir, 'metrics.csv')
    with open(path) as f:
        header, first, second = f.read().splitlines()
    with open(path, 'w') as f:
        f.write(f'{header}\n\n{first}\n\n{second}\n\n')
    assert [(row['epoch'], row['test_acc']) for row in plot.read_metrics(path)] == [(1, 80.0), (2, 85.0)]


MORE_BAD_METRICS = {
    'repeated_column': (HEADER + ',test_acc\n1,0.5,50.0,0.6,50.0,0.001,3.0,100.0,60.0\n', 'repeats a column'),
    'epoch_zero': (HEADER + '\n0,0.5,50.0,0.6,50.0,0.001,3.0,100.0\n', 'not a positive integer'),
    'epoch_repeated': (HEADER + '\n1,0.5,50.0,0.6,50.0,0.001,3.0,100.0\n1,0.4,60.0,0.5,60.0,0.001,3.0,100.0\n',
                       'epoch 1 does not follow 1'),
    'second_row_non_numeric': (HEADER + '\n1,0.5,50.0,0.6,50.0,0.001,3.0,100.0\n2,0.4,abc,0.5,60.0,0.001,3.0,100.0\n',
                               'row 3 has a non-numeric train_acc'),  # the header is row 1
}


@pytest.mark.parametrize('case', sorted(MORE_BAD_METRICS))
def test_more_bad_metrics_skip_the_run(case, tmp_path, capsys):
    """A repeated column would be read as its last copy, and an epoch 0 or an epoch written twice (two processes
    appending to one run) drawn as a curve that goes back on itself: the run is skipped, and the warning says why."""
    write_run(tmp_path, 'good')
    bad_dir = write_run(tmp_path, 'bad')
    with open(os.path.join(bad_dir, 'metrics.csv'), 'w') as f:
        f.write(MORE_BAD_METRICS[case][0])
    code, out, err = run_plot([tmp_path], capsys)
    assert code == 0 and list(table(out)) == ['good']
    line = one_line(err)
    assert line.startswith(f'plot.py: warning: skipping run {bad_dir}: metrics.csv')
    assert MORE_BAD_METRICS[case][1] in line


def test_config_or_summary_that_is_not_a_json_object(tmp_path, capsys):
    """config.json holding a list is a damaged run (skipped with a warning, not a traceback); a summary.json that is
    not an object is no summary (the run is plotted, as finished)."""
    write_run(tmp_path, 'good')
    bad = write_run(tmp_path, 'bad_config')
    with open(os.path.join(bad, 'config.json'), 'w') as f:
        f.write('["P"]')
    odd = write_run(tmp_path, 'odd_summary')
    with open(os.path.join(odd, 'summary.json'), 'w') as f:
        f.write('[2, 30]')
    code, out, err = run_plot([tmp_path], capsys)
    assert code == 0 and list(table(out)) == ['good', 'odd_summary'] and column(out, 'odd_summary', 'epochs') == '2'
    assert one_line(err) == f'plot.py: warning: skipping run {bad}: config.json is not a JSON object'


def test_hand_edited_values_out_of_reason_are_left_out_not_a_traceback(tmp_path, capsys):
    """Counts beyond float range overflowed the table's and --cost's arithmetic, a list as data_seed could not key the
    test-set warning, and JSON nested too deep for the decoder was a RecursionError (a number longer than Python's
    4,300-digit limit a ValueError): now such a value is read as missing, and such a config.json makes a damaged run.
    true is no count either."""
    def edit(run_dir, name, **values):
        path = os.path.join(run_dir, name)
        old = json.loads(open(path).read()) if os.path.exists(path) else {}
        with open(path, 'w') as f:
            json.dump(dict(old, **values), f)

    edit(write_run(tmp_path, 'good'), 'config.json', classes=['a', 'b'], test_images=10)
    odd = write_run(tmp_path, 'odd')
    edit(odd, 'config.json', trainable_params=10 ** 400, classes=['a', 'b'], test_images=10, test_samples=5,
         data_seed=[1, 2])
    with open(os.path.join(odd, 'summary.json'), 'w') as f:
        f.write('{"epochs": ' + '[' * 100000 + ']' * 100000 + '}')
    deep = write_run(tmp_path, 'deep')
    with open(os.path.join(deep, 'config.json'), 'w') as f:
        f.write('[' * 100000 + ']' * 100000)
    long = write_run(tmp_path, 'long')
    with open(os.path.join(long, 'config.json'), 'w') as f:
        f.write('{"test_images": 1' + '0' * 5000 + '}')
    for argv in ([tmp_path], [tmp_path, '--cost']):
        code, out, err = run_plot(argv, capsys)
        assert code == 0 and list(table(out)) == ['good', 'odd'] and column(out, 'odd', 'trainable params') == '?'
        warnings = err.strip().splitlines()
        assert len(warnings) == 3 and 'picked with --data_seed [1, 2]' in warnings[2], err
        assert warnings[0].startswith(f'plot.py: warning: skipping run {deep}: cannot read config.json (')
        assert warnings[1].startswith(f'plot.py: warning: skipping run {long}: cannot read config.json (')
    edit(odd, 'config.json', test_images=10 ** 400)
    os.remove(os.path.join(odd, 'summary.json'))
    edit(odd, 'summary.json', epochs=10 ** 400)
    code, out, err = run_plot([odd, '--cost'], capsys)
    assert code == 0 and column(out, 'odd', 'epochs') == '2' and err == '', err
    edit(odd, 'config.json', trainable_params=True)
    edit(odd, 'summary.json', epochs=True)
    code, out, err = run_plot([odd], capsys)
    assert code == 0 and column(out, 'odd', 'trainable params') == '?' and column(out, 'odd', 'epochs') == '2', err


def test_a_damaged_run_that_diverged_later_is_not_said_to_diverge_in_epoch_1(tmp_path, capsys):
    write_run(tmp_path, 'good')
    bad = write_run(tmp_path, 'bad')
    with open(os.path.join(bad, 'config.json'), 'w') as f:
        f.write('{"mode": "P", ')
    with open(os.path.join(bad, 'summary.json'), 'w') as f:
        json.dump(dict(epochs_done=2, epochs=30, finished=False, diverged=dict(epoch=3, step=17)), f)
    code, out, err = run_plot([tmp_path], capsys)
    assert code == 0 and 'cannot read config.json' in one_line(err) and 'epoch 1' not in err


def write_compiled_run(root, name, compiled, times):
    run_dir = write_run(root, name, epochs=[(70.0, 80.0, seconds) for seconds in times], peak=[None] * len(times))
    path = os.path.join(run_dir, 'metrics.csv')
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, 'w') as f:
        rows = [f'{line},{int(c)}' for line, c in zip(lines[1:], compiled)]
        f.write('\n'.join([lines[0] + ',includes_compile'] + rows) + '\n')


def test_time_per_epoch_leaves_out_the_epochs_that_compiled(tmp_path, capsys):
    """--compile: an epoch that compiled took 60 s against 4-5 s; time/epoch is over the others (as train.py's summary
    says), the total counts every epoch, and a run whose every epoch compiled (each a new process) still has one."""
    write_compiled_run(tmp_path, 'compiled', [1, 0, 0], [60.0, 4.0, 5.0])
    write_compiled_run(tmp_path, 'always_compiled', [1, 1], [60.0, 50.0])
    code, out, err = run_plot([tmp_path], capsys)
    assert code == 0 and err == ''
    assert table(out)['compiled'][7:9] == ('4.5s', '1m09s')
    assert table(out)['always_compiled'][7:9] == ('55.0s', '1m50s')


def test_out_in_the_current_directory_and_with_an_upper_case_extension(logs, tmp_path, capsys, monkeypatch):
    """`--out fig.png` (no directory part) and `--out Fig.PNG` write the figure, as the docstring's examples do."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_plot([logs, '--out', 'fig.png'], capsys)
    assert code == 0 and err == '' and out.strip().splitlines()[-1] == 'wrote fig.png'
    assert_png(tmp_path / 'fig.png')
    code, out, err = run_plot([logs, '--out', 'Fig.PNG'], capsys)
    assert code == 0 and err == ''
    assert_png(tmp_path / 'Fig.PNG')


def test_ten_runs_get_tab10s_colours(tmp_path, capsys, monkeypatch):
    """tab10 up to 10 runs: tab20's first ten are five light/dark pairs of one hue, hard to tell apart."""
    for i in range(10):
        write_run(tmp_path, f'P_run{i:02d}')
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path], capsys)[0] == 0
    colours = [matplotlib.colors.to_hex(line.get_color()) for line in figures[0].axes[1].get_lines()]
    assert colours == [matplotlib.colors.to_hex(c) for c in plt.get_cmap('tab10').colors]
    close_figure(figures[0])


def test_markers_at_every_epoch_of_short_runs_only(tmp_path, capsys, monkeypatch):
    """Up to 30 epochs each epoch gets a marker; past that the curves are plain lines, but a one-epoch run keeps its
    marker (a line of one point is not drawn at all)."""
    write_run(tmp_path / 'short', 'P_a')
    write_run(tmp_path / 'long', 'P_long', epochs=[(50.0 + i, 60.0 + i, 2.0) for i in range(31)])
    write_run(tmp_path / 'long', 'P_one', epochs=[(50.0, 60.0, 2.0)])
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path / 'short'], capsys)[0] == 0
    assert run_plot([tmp_path / 'long'], capsys)[0] == 0
    short, long = figures
    for ax in short.axes:
        assert [line.get_marker() for line in ax.get_lines()] == ['o']
    for ax in long.axes:
        assert {line.get_label(): line.get_marker() for line in ax.get_lines()} == {'P_long (P)': 'None',
                                                                                    'P_one (P)': 'o'}
    for fig in figures:
        close_figure(fig)


def test_accuracy_figure_both_panels_number_their_axes_and_the_legend_is_one_row(logs, tmp_path, capsys, monkeypatch):
    """The panels share their accuracy scale, yet the test panel keeps its numbers; both have a grid; three short run
    names fit one row of the legend under them."""
    figures = captured_figures(monkeypatch)
    assert run_plot([logs, '--out', tmp_path / 'acc.png'], capsys)[0] == 0
    fig = figures[0]
    fig.draw_without_rendering()
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_yticklabels() if t.get_visible() and t.get_text()]
        assert ax.xaxis.get_gridlines()[0].get_visible() and ax.yaxis.get_gridlines()[0].get_visible()
    renderer = fig.canvas.get_renderer()
    rows = {round(t.get_window_extent(renderer).y0) for t in fig.legends[0].get_texts()}
    assert len(fig.legends[0].get_texts()) == 3 and len(rows) == 1
    close_figure(fig)


def test_cost_figure_axes_legend_and_limits(cost_logs, tmp_path, capsys, monkeypatch):
    """Parameters on a log axis read as powers of ten, seconds and MB as plain numbers; the y axis stops at 101% where
    the margin would pass it; runs with and without validation: the y label claims neither accuracy, and the legend
    (modes, then filled/hollow) is one row; all with validation: no filled/hollow entries to explain."""
    write_run(cost_logs, 'P_top', 'P', 50_000, [(99.0, 99.5, 3.0)], val=[99.0], checkpoint_bytes=1_000_000)
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([cost_logs, '--cost'], capsys)
    assert code == 0, err
    fig = figures[1]
    fig.canvas.draw()
    params_ax, time_ax, size_ax = fig.axes
    assert params_ax.get_ylabel() == 'test accuracy (%)'
    assert 99.5 < params_ax.get_ylim()[1] <= 101
    assert all(ax.get_xscale() == 'log' for ax in fig.axes)
    visible = lambda ax: [t.get_text() for t in ax.get_xticklabels() if t.get_text() and
                          ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    assert visible(params_ax) and all('10^' in text for text in visible(params_ax)), visible(params_ax)
    for ax in (time_ax, size_ax):
        assert visible(ax) and all(re.fullmatch(r'[0-9.]+', text) for text in visible(ax)), visible(ax)
    renderer = fig.canvas.get_renderer()
    texts = fig.legends[0].get_texts()
    assert len(texts) == 5 and len({round(t.get_window_extent(renderer).y0) for t in texts}) == 1
    run_plot([os.path.join(cost_logs, 'P_val'), os.path.join(cost_logs, 'P_top'), '--cost', '--out',
              tmp_path / 'val.png'], capsys)
    assert [t.get_text() for t in figures[3].legends[0].get_texts()] == ['P']
    for fig in figures:
        close_figure(fig)


def test_an_empty_checkpoint_file_is_left_out_of_the_size_panel(tmp_path, capsys, monkeypatch):
    """A zero-byte trainable.safetensors (a copy that failed) has no place on a log axis of sizes."""
    write_run(tmp_path, 'P_a', 'P', 92170, [(70.0, 80.0, 4.0)], checkpoint_bytes=1_874_000)
    write_run(tmp_path, 'P_b', 'P', 92170, [(70.0, 81.0, 4.0)], checkpoint_bytes=0)
    write_run(tmp_path, 'P_c', 'P', 92170, [(70.0, 82.0, 4.0)], checkpoint_bytes=343_000_000)
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([tmp_path, '--cost'], capsys)
    assert code == 0, err
    assert points(figures[1].axes[2]) == pytest.approx(np.array([(1.874, 80.0), (343.0, 82.0)]))
    for fig in figures:
        close_figure(fig)


def test_confusion_cells_say_their_share_in_a_readable_colour():
    """Each cell's number sits in its cell (column predicted, row true): whole percentages from 10%, one decimal
    below (a 2.5% confusion does not read 2 or 3), 0 for none; white on dark cells, black on light, grey for zero.
    Colour on a square-root scale (1% already shows), with a colour bar that marks 1% and 5%; the title counts the
    test images, not the classes."""
    counts = np.array([[90, 7, 3, 0], [1, 39, 0, 0], [0, 0, 20, 0], [0, 5, 0, 35]])
    fig = plot.confusion_figure('P_run', ['a', 'b', 'c', 'd'], counts)
    ax = fig.axes[0]
    shares = 100 * counts / counts.sum(axis=1, keepdims=True)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(texts) == 16
    for (i, j), text in texts.items():
        value = shares[i, j]
        assert text.get_text() == (f'{value:.0f}' if value >= 10 or value == 0 else f'{value:.1f}'), (i, j)
        assert text.get_color() == ('white' if value > 36 else 'black' if value > 0 else '0.65'), (i, j)
    assert texts[1, 0].get_text() == '2.5' and texts[0, 2].get_text() == '3.0'
    norm = ax.images[0].norm
    assert norm(25) == pytest.approx(0.5) and norm(1) == pytest.approx(0.1)
    assert list(fig.axes[1].get_yticks()) == [0, 1, 5, 10, 25, 50, 75, 100]
    assert 'on 200 test images' in ax.get_title()
    close_figure(fig)


def test_confusion_numbers_up_to_twenty_classes():
    counts = confusion_counts(20)
    fig = plot.confusion_figure('P_run', [f'c{i}' for i in range(20)], counts)
    assert len(fig.axes[0].texts) == 400
    close_figure(fig)


def test_confusion_of_same_named_runs_titled_by_path(tmp_path, capsys, monkeypatch):
    a = write_run(tmp_path / 'a', 'P_run')
    b = write_run(tmp_path / 'b', 'P_run')
    for run_dir in (a, b):
        write_confusion(run_dir, ['x', 'y'], [[5, 1], [2, 7]])
    drawn = []
    monkeypatch.setattr(plot, 'plot_confusion', lambda *args: drawn.append(args))
    code, _, err = run_plot([a, b, '--confusion'], capsys)
    assert code == 0, err
    assert [(title, path) for title, _, _, path in drawn] == [
        (os.path.join('a', 'P_run'), os.path.join(a, 'confusion.png')),
        (os.path.join('b', 'P_run'), os.path.join(b, 'confusion.png'))]


def test_a_left_over_temp_file_is_not_the_newest_checkpoint_matrix(logs, capsys, monkeypatch):
    """--eval_only writes confusion_epoch<N>.csv.tmp<pid> first; one left by a killed process is no matrix."""
    run_dir = os.path.join(logs, 'P_run')
    write_confusion(run_dir, ['a', 'b'], [[5, 1], [2, 7]])
    os.rename(os.path.join(run_dir, 'confusion.csv'), os.path.join(run_dir, 'confusion_epoch10.csv'))
    with open(os.path.join(run_dir, 'confusion_epoch12.csv.tmp4242'), 'w') as f:
        f.write('true\\predicted,a,b\na,1')
    drawn = []
    monkeypatch.setattr(plot, 'plot_confusion', lambda *args: drawn.append(args))
    code, out, err = run_plot([run_dir, '--confusion'], capsys)
    assert code == 0 and err == '', err
    assert [title for title, _, _, _ in drawn] == ['P_run, epoch 10 (unfinished)']


def test_a_bad_confusion_csv_does_not_stop_the_runs_after_it(logs, capsys):
    write_confusion(os.path.join(logs, 'F_run'), ['a', 'b'], [[5, 1], [2, 7]])
    with open(os.path.join(logs, 'F_run', 'confusion.csv'), 'a') as f:
        f.write('c,1,2\n')  # a row more than the header's classes
    write_confusion(os.path.join(logs, 'P_run'), ['a', 'b'], [[5, 1], [2, 7]])
    code, out, err = run_plot([os.path.join(logs, 'F_run'), os.path.join(logs, 'P_run'), '--confusion'], capsys)
    assert code == 0 and out.strip() == f"wrote {os.path.join(logs, 'P_run', 'confusion.png')}"
    assert "3 rows for the 2 classes" in one_line(err) and os.path.join(logs, 'F_run') in err


@pytest.mark.parametrize('flag', ['--confusion', '--mistakes'])
@pytest.mark.parametrize('blocked', ['read-only', 'directory'])
def test_a_run_its_figure_cannot_be_written_into_does_not_stop_the_runs_after_it(blocked, flag, logs, capsys,
                                                                                  monkeypatch):
    """Another user's run in a shared logs/ (no write permission; the tests may run as root, so it is refused by
    hand), or a directory named like the figure: the failed write was an error that left the runs after it undrawn."""
    monkeypatch.setattr(plot, 'cifar_test_images', lambda path: np.zeros((1, 32, 32, 3), np.uint8))
    for name in ('F_run', 'PF_run', 'P_run'):  # in this order
        write_confusion(os.path.join(logs, name), ['a', 'b'], [[5, 1], [2, 7]])
        write_predictions(os.path.join(logs, name), [('0', 'a', 'b', 0.9, 0)])
        set_config(os.path.join(logs, name), dataset='cifar10', data_dir=str(logs))
    figure = 'confusion.png' if flag == '--confusion' else 'mistakes.png'
    first = os.path.join(logs, 'F_run')
    if blocked == 'directory':
        os.makedirs(os.path.join(first, figure, 'inside'))
    else:
        access = os.access
        monkeypatch.setattr(plot.os, 'access', lambda path, mode, **kwargs: (
            False if mode & os.W_OK and os.path.realpath(path) == os.path.realpath(first) else
            access(path, mode, **kwargs)))
    code, out, err = run_plot([logs, flag], capsys)
    assert code == 0
    assert out.strip().splitlines() == [f"wrote {os.path.join(logs, name, figure)}" for name in ('PF_run', 'P_run')]
    line = one_line(err)
    assert line.startswith(f'plot.py: warning: skipping run {first}: cannot write {figure} there (')
    assert ('a directory has its name' if blocked == 'directory' else f'no write permission in {first}') in line
    assert os.path.isdir(os.path.join(first, figure)) == (blocked == 'directory')


def test_a_file_for_a_path_says_to_pass_a_directory(logs, capsys):
    metrics = os.path.join(logs, 'P_run', 'metrics.csv')
    code, out, err = run_plot([logs, metrics], capsys)
    assert code == 2 and out == ''
    assert one_line(err) == (f'plot.py: error: {metrics} is not a directory; pass a run directory (holding '
                             f'metrics.csv) or a directory of runs such as logs/')
    assert not os.path.exists(os.path.join(logs, 'accuracy.png'))


def test_the_table_reports_what_summary_json_does(tmp_path):
    """plot.py reads metrics.csv without importing torch, so it applies train.summarize's rules itself: the first of
    equal best val epochs, the test accuracy there, and the time per epoch without the epochs that compiled. README
    promises that its table and summary.json agree; a change to either rule alone fails here."""
    import train
    history = [dict(epoch=epoch, train_loss=1.0, train_acc=50.0, test_loss=1.0, test_acc=test, lr=1e-3,
                    epoch_time_s=seconds, train_images_per_s=1000.0, val_loss=1.0, val_acc=val, peak_mem_gib=None,
                    includes_compile=compiled)
               for epoch, test, val, seconds, compiled in [(1, 60.0, 55.0, 40.0, 1), (2, 71.0, 66.0, 5.0, 0),
                                                           (3, 73.0, 66.0, 6.0, 0), (4, 74.0, 65.0, 30.0, 1)]]
    run_dir = tmp_path / 'run'
    os.makedirs(run_dir)
    (run_dir / 'metrics.csv').write_bytes(train.metrics_bytes(history))
    summary = train.summarize(history, 4, 0.1, 100)
    run = plot.load_run(str(run_dir))
    assert (run['val_epoch'], run['test_at_best_val']) == (summary['best_val_epoch'],
                                                           summary['test_acc_at_best_val']) == (2, 71.0)
    assert run['epoch_time_s'] == pytest.approx(summary['mean_epoch_time_s']) == 5.5
    assert run['final_acc'] == summary['final_test_acc'] and run['time_s'] == pytest.approx(summary['total_time_s'])


def test_the_table_rounds_test_accuracy_as_main_py_prints_it(tmp_path, capsys):
    """45 of 242 test images right is 18.595041...%: main.py and sweep.py print 18.60% from the count, while
    metrics.csv keeps 18.5950, which rounds to 18.59%. plot.py takes the count back from config.json's test_images."""
    import train
    history = [dict(epoch=epoch, train_loss=1.0, train_acc=50.0, test_loss=1.0, test_acc=100 * right / 242, lr=1e-3,
                    epoch_time_s=1.0, train_images_per_s=1000.0, val_loss=1.0, val_acc=val, peak_mem_gib=None,
                    includes_compile=0) for epoch, right, val in [(1, 45, 24.0), (2, 40, 20.0)]]
    run_dir = tmp_path / 'logs' / 'run'
    os.makedirs(run_dir)
    (run_dir / 'metrics.csv').write_bytes(train.metrics_bytes(history))
    (run_dir / 'config.json').write_text(json.dumps(dict(mode='linear', trainable_params=650, test_images=242)))
    summary = train.summarize(history, 2, 0.1, 242)
    run = plot.load_run(str(run_dir))
    assert run['test_at_best_val'] == summary['test_acc_at_best_val'] and run['final_acc'] == summary['final_test_acc']
    code, out, err = run_plot([tmp_path / 'logs'], capsys)
    assert code == 0, err
    assert table(out)['run'][2:7] == ('18.60%', '1', '18.60%', '1', '16.53%')  # every epoch's, not the last only


def test_the_table_keeps_a_test_accuracy_no_count_of_the_test_images_gives(tmp_path):
    """18.59% is no count of 242 test images (45 of them is 18.5950%): metrics.csv's value stays as it is, not the
    nearest count's 18.60%; a config.json saying 0 test images names no count to take it back to."""
    import train
    history = [dict(epoch=1, train_loss=1.0, train_acc=50.0, test_loss=1.0, test_acc=18.59, lr=1e-3, epoch_time_s=1.0,
                    train_images_per_s=1000.0, val_loss=None, val_acc=None, peak_mem_gib=None, includes_compile=0)]
    run_dir = tmp_path / 'run'
    os.makedirs(run_dir)
    (run_dir / 'metrics.csv').write_bytes(train.metrics_bytes(history))
    for images in (242, 0):
        (run_dir / 'config.json').write_text(json.dumps(dict(mode='linear', trainable_params=650, test_images=images)))
        run = plot.load_run(str(run_dir))
        assert (run['final_acc'], run['oracle_test_acc']) == (18.59, 18.59), images


# ---------------------------------------------------------------- more behaviours a second mutation round found unpinned


def test_every_sweep_left_out_of_a_log_directory_is_named(logs, capsys):
    """logs/ with runs and two sweep directories: one warning per sweep left out, each naming it, not only the first."""
    sweeps = [os.path.join(logs, name) for name in ('lr_sweep', 'wd_sweep')]
    for sweep in sweeps:
        write_run(sweep, 'P_trial', epochs=[(50.0, 55.0, 2.0)])
    code, out, err = run_plot([logs], capsys)
    assert code == 0 and list(table(out)) == sorted(RUNS)
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all('not plotting the runs in' in line for line in lines), err
    assert [sweep in line for sweep, line in zip(sweeps, lines)] == [True, True], err


def test_a_thirty_epoch_run_still_has_a_marker_at_every_epoch(tmp_path, capsys, monkeypatch):
    """MARKERS_UP_TO: markers while the longest run has at most 30 epochs, 30 included."""
    write_run(tmp_path, 'P_30', epochs=[(50.0 + i, 60.0 + i, 2.0) for i in range(30)])
    figures = captured_figures(monkeypatch)
    assert run_plot([tmp_path], capsys)[0] == 0
    for ax in figures[0].axes:
        assert [line.get_marker() for line in ax.get_lines()] == ['o']
    close_figure(figures[0])


def test_train_and_test_panels_share_one_accuracy_scale(logs, tmp_path, capsys, monkeypatch):
    """The fixture's train accuracies span 60-95%, its test accuracies 75-91%: on panels scaled apart a curve at the
    same height would mean different accuracies; the two panels have one y range, each with its numbers."""
    figures = captured_figures(monkeypatch)
    assert run_plot([logs, '--out', tmp_path / 'acc.png'], capsys)[0] == 0
    train_ax, test_ax = figures[0].axes
    assert train_ax.get_ylim() == test_ax.get_ylim()
    low, high = train_ax.get_ylim()
    assert low <= 60.5 and high >= 95.4  # every train and test point in view on both
    close_figure(figures[0])


def test_cost_png_goes_next_to_accuracy_png_under_the_first_path(cost_logs, tmp_path, capsys):
    """Several PATHs, no --out: cost.png is written where accuracy.png is, under the first PATH, as --help says."""
    other = tmp_path / 'other_logs'
    write_run(other, 'P_other', 'P', 50_000, [(60.0, 65.0, 3.0)], checkpoint_bytes=1_000_000)
    code, out, _ = run_plot([cost_logs, '--cost', other], capsys)  # a PATH after the option too, as people type it
    assert code == 0
    assert table_lines(out)[3] == [f"wrote {os.path.join(cost_logs, 'accuracy.png')}",
                                   f"wrote {os.path.join(cost_logs, 'cost.png')}"]
    assert_png(os.path.join(cost_logs, 'cost.png'))
    assert files_under(other) == ['P_other/config.json', 'P_other/metrics.csv', 'P_other/trainable.safetensors']


def test_confusion_out_refused_for_two_runs(logs, tmp_path, capsys):
    """Two runs into one --out file would leave the second's matrix in it and the first's nowhere: an error, as for
    three, and nothing written."""
    for name in ('F_run', 'P_run'):
        write_confusion(os.path.join(logs, name), ['a', 'b'], [[5, 1], [2, 7]])
    code, out, err = run_plot([os.path.join(logs, 'F_run'), os.path.join(logs, 'P_run'), '--confusion', '--out',
                               tmp_path / 'cm.png'], capsys)
    assert code == 2 and out == ''
    line = one_line(err)
    assert line.startswith('plot.py: error: --out') and '2 runs' in line and 'drop --out' in line
    assert not os.path.exists(tmp_path / 'cm.png')
    assert not any(name.endswith('confusion.png') for name in files_under(logs))


def refuse_listing(monkeypatch, folder):
    """plot.py's os.listdir of `folder` fails as without read permission (the tests may run as root)."""
    listdir = os.listdir

    def refusing(path='.'):
        if os.path.realpath(path) == os.path.realpath(folder):
            raise PermissionError(13, 'Permission denied', str(path))
        return listdir(path)
    monkeypatch.setattr(plot.os, 'listdir', refusing)


def test_a_log_directory_that_cannot_be_listed_says_so(tmp_path, capsys, monkeypatch):
    """A PATH plot.py may not read (no read permission; the tests may run as root, so listing is refused by hand):
    that is the error, not 'no runs found' with the advice to train one."""
    root = tmp_path / 'logs'
    write_run(root, 'P_run')
    refuse_listing(monkeypatch, root)
    code, out, err = run_plot([root], capsys)
    assert code == 2 and out == ''
    line = one_line(err)
    assert line.startswith(f'plot.py: error: cannot list {root}: ') and 'Permission denied' in line, line
    assert not os.path.exists(root / 'accuracy.png')


# ---------------------------------------------------------------- --mistakes


def write_predictions(run_dir, rows, suffix='', checkpoint='last', epoch=2):
    """test_predictions<suffix>.csv as main.py --eval_only writes it; rows: (image, label, prediction, probability,
    correct)."""
    with open(os.path.join(run_dir, f'test_predictions{suffix}.csv'), 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(['image', 'label', 'prediction', 'probability', 'correct', 'checkpoint', 'epoch'])
        writer.writerows([image, label, guess, f'{probability:.4f}', correct, checkpoint, epoch]
                         for image, label, guess, probability, correct in rows)


def set_config(run_dir, **keys):
    path = os.path.join(run_dir, 'config.json')
    with open(path) as f:
        config = json.load(f)
    with open(path, 'w') as f:
        json.dump(dict(config, **keys), f)


def write_image(path, pixels, **save):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.asarray(pixels)
    Image.fromarray(pixels if pixels.dtype == np.uint16 else pixels.astype(np.uint8)).save(path, **save)


def colour(i):
    return (20 * i, 255 - 20 * i, 100)  # test image i's: tells its tile apart


def folder_run(tmp_path, rows, name='P_run'):
    """A run whose --dataset folder holds a small solid-coloured PNG per row (test/<label>/<i>.png, coloured
    colour(i)) and whose test_predictions.csv has those rows; rows: (label, prediction, probability, correct)."""
    dataset = tmp_path / f'{name}_data'
    named = []
    for i, (label, guess, probability, correct) in enumerate(rows):
        image = f'test/{label}/{i}.png'
        write_image(dataset / image, np.full((6, 8, 3), colour(i)))
        named.append((image, label, guess, probability, correct))
    run_dir = write_run(tmp_path / 'logs', name)
    set_config(run_dir, dataset=str(dataset), data_dir=str(tmp_path / 'data'))
    write_predictions(run_dir, named)
    return run_dir


def tiles(fig):
    """(caption, name under it, image array) of each tile, in order."""
    return [(ax.get_title(), ax.get_xlabel(), ax.images[0].get_array()) for ax in fig.axes]


MIXED = [('a', 'a', 0.99, 1), ('a', 'b', 0.6, 0), ('b', 'a', 0.9, 0), ('b', 'c', 0.6, 0), ('c', 'a', 0.3, 0),
         ('c', 'c', 0.95, 1)]  # rows 0 and 5 right; rows 1 and 3 equally sure


def test_mistakes_are_the_most_confidently_wrong_test_images_in_order(tmp_path, capsys, monkeypatch):
    run_dir = folder_run(tmp_path, MIXED)
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([run_dir, '--mistakes', '3'], capsys)
    png = os.path.join(run_dir, 'mistakes.png')
    assert code == 0 and err == '' and out.strip() == f'wrote {png}'
    (fig,) = figures
    drawn = tiles(fig)
    assert [(caption, name) for caption, name, _ in drawn] == [  # the right rows never, the tie in the CSV's order
        ('b → a\nprobability 0.9000', 'test/b/2.png'), ('a → b\nprobability 0.6000', 'test/a/1.png'),
        ('b → c\nprobability 0.6000', 'test/b/3.png')]
    for (_, _, image), row in zip(drawn, (2, 1, 3)):  # each tile is its row's image
        assert (np.asarray(image) == colour(row)).all()
    title = fig.get_suptitle()
    assert title.startswith('P_run, last checkpoint (epoch 2): 4 of 6 test images wrong (66.7%)\n'), title
    assert 'the 3 most confident mistakes' in title
    assert not os.path.exists(os.path.join(run_dir, 'accuracy.png'))  # no table, no accuracy figure
    close_figure(fig)
    code, out, err = run_plot([run_dir, '--mistakes'], capsys)  # bare: up to 25, here all 4
    assert code == 0 and err == ''
    assert [name for _, name, _ in tiles(figures[-1])] == ['test/b/2.png', 'test/a/1.png', 'test/b/3.png',
                                                           'test/c/4.png']
    assert_png(png, min_width=900)
    with open(png, 'rb') as f:
        assert plot.MARK.encode() in f.read()  # so that a redraw at --out may replace it
    close_figure(figures[-1])


def test_mistakes_of_the_best_checkpoint_and_of_an_unfinished_runs_last(tmp_path, capsys, monkeypatch):
    """As --confusion: test_predictions.csv -> mistakes.png, test_predictions_best.csv -> mistakes_best.png, and for
    an unfinished run the newest test_predictions_epoch<N>.csv -> mistakes_epoch<N>.png; --out takes the last's."""
    run_dir = folder_run(tmp_path, MIXED)
    os.rename(os.path.join(run_dir, 'test_predictions.csv'), os.path.join(run_dir, 'last.csv'))
    for suffix, checkpoint, epoch, row in (('_best', 'best', 1, 1), ('_epoch9', 'last', 9, 3),
                                           ('_epoch10', 'last', 10, 4)):  # 10 after 9: by number, not by name
        write_predictions(run_dir, [(f'test/{MIXED[row][0]}/{row}.png', *MIXED[row])], suffix, checkpoint, epoch)
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 0 and err == ''
    assert out.strip().splitlines() == [f"wrote {os.path.join(run_dir, name)}"
                                        for name in ('mistakes_epoch10.png', 'mistakes_best.png')]
    assert [tiles(fig)[0][1] for fig in figures] == ['test/c/4.png', 'test/a/1.png']
    assert figures[0].get_suptitle().startswith('P_run, last checkpoint (epoch 10, unfinished): 1 of 1 test images')
    assert figures[1].get_suptitle().startswith('P_run, best checkpoint (epoch 1): 1 of 1 test images')
    os.rename(os.path.join(run_dir, 'last.csv'), os.path.join(run_dir, 'test_predictions.csv'))
    code, out, err = run_plot([run_dir, '--mistakes'], capsys)  # finished: the epoch files are set-aside history
    assert code == 0 and out.strip().splitlines() == [f"wrote {os.path.join(run_dir, name)}"
                                                      for name in ('mistakes.png', 'mistakes_best.png')]
    assert figures[2].get_suptitle().startswith('P_run, last checkpoint (epoch 2): 4 of 6')
    code, out, err = run_plot([run_dir, '--mistakes', '--out', tmp_path / 'report' / 'm.png'], capsys)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'report' / 'm.png'}" and len(figures) == 5  # one figure
    assert figures[4].get_suptitle().startswith('P_run, last checkpoint (epoch 2)')
    for fig in figures:
        close_figure(fig)


def test_mistakes_out_refused_for_two_runs(tmp_path, capsys):
    runs = [folder_run(tmp_path, MIXED, name) for name in ('F_run', 'P_run')]
    code, out, err = run_plot([*runs, '--mistakes', '--out', tmp_path / 'm.png'], capsys)
    assert code == 2 and out == ''
    line = one_line(err)
    assert line.startswith('plot.py: error: --out') and '2 runs' in line and 'drop --out' in line
    assert not os.path.exists(tmp_path / 'm.png') and not any(os.path.exists(os.path.join(run, 'mistakes.png'))
                                                              for run in runs)


def test_mistakes_show_photos_upright_and_small(tmp_path, capsys, monkeypatch):
    """A phone's photo stored sideways with an EXIF orientation is shown as a viewer shows it; a large one as a
    thumbnail, so a grid of 12 MP photos stays quick and small."""
    run_dir = folder_run(tmp_path, [('a', 'b', 0.9, 0), ('b', 'a', 0.8, 0)])
    dataset = tmp_path / 'P_run_data'
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (255, 0, 0)  # red on the stored left: on top once turned
    stored[:, 40:] = (0, 0, 255)
    write_image(dataset / 'test/a/0.png', stored, format='JPEG', exif=exif, quality=95)  # a JPEG, whatever its name
    write_image(dataset / 'test/b/1.png', np.full((1500, 2000, 3), 128), format='JPEG')
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 0 and err == ''
    upright, photo = [np.asarray(image).astype(int) for _, _, image in tiles(figures[0])]
    assert upright.shape == (80, 40, 3)
    assert abs(upright[:30] - (255, 0, 0)).max() < 40 and abs(upright[50:] - (0, 0, 255)).max() < 40
    assert max(photo.shape[:2]) <= plot.TILE_PIXELS and photo.shape[1] / photo.shape[0] == pytest.approx(4 / 3, 0.02)
    close_figure(figures[0])


def test_a_16_bit_grey_mistake_is_shown_grey_not_white(tmp_path, capsys, monkeypatch):
    """Pillow's convert('RGB') clips 16-bit values above 255 to white; the tile keeps the top 8 bits, as the run
    read the image (data.read_image)."""
    run_dir = folder_run(tmp_path, [('a', 'b', 0.9, 0)])
    write_image(tmp_path / 'P_run_data' / 'test' / 'a' / '0.png', np.full((4, 4), 30000, np.uint16))
    figures = captured_figures(monkeypatch)
    assert run_plot([run_dir, '--mistakes'], capsys)[0] == 0
    ((_, _, image),) = tiles(figures[0])
    assert (np.asarray(image) == 30000 >> 8).all()
    close_figure(figures[0])


def drawn_as_written(text):
    """What a matplotlib Text shows of its string: as it is, not read as mathematics between two $."""
    assert not matplotlib.cbook.is_math_text(text), text
    return text.replace('\\$', '$')


def test_dollars_in_run_and_class_names_are_drawn_as_they_are(tmp_path, capsys, monkeypatch):
    """matplotlib reads the text between two $ as mathematics: a currency dataset's mistake '$5_bill → $10_bill' was
    drawn as 5 with a subscript b, and a run named with two $ stopped the accuracy figure with a traceback. A class
    name with two $ of its own is drawn as written too, as a tick label and in a tile's file name."""
    classes = ['$5_bill', '$10_or_$20_bill']
    run_dir = folder_run(tmp_path, [('$10_or_$20_bill', '$5_bill', 0.9, 0), ('$5_bill', '$5_bill', 0.8, 1)],
                         name='cost_$5_to_$10')
    write_confusion(run_dir, classes, [[1, 0], [1, 0]])
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([run_dir, '--cost'], capsys)
    assert code == 0 and err == ''
    accuracy, cost = figures
    assert [drawn_as_written(t.get_text()) for t in accuracy.legends[0].get_texts()] == ['cost_$5_to_$10 (P)']
    assert [drawn_as_written(t.get_text()) for t in cost.axes[0].texts] == ['cost_$5_to_$10']
    code, out, err = run_plot([run_dir, '--confusion'], capsys)
    assert code == 0 and err == ''
    ax = figures[2].axes[0]
    assert [drawn_as_written(t.get_text()) for t in ax.get_yticklabels()] == classes
    assert [drawn_as_written(t.get_text()) for t in ax.get_xticklabels()] == classes
    assert drawn_as_written(ax.get_title()).startswith('cost_$5_to_$10: 50.00% accuracy')
    code, out, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 0 and err == ''
    ((caption, name, _),) = tiles(figures[3])
    assert drawn_as_written(caption) == '$10_or_$20_bill → $5_bill\nprobability 0.9000'
    assert drawn_as_written(name) == 'test/$10_or_$20_bill/0.png'
    assert drawn_as_written(figures[3].get_suptitle()).startswith('cost_$5_to_$10, last checkpoint')
    for fig in figures:
        close_figure(fig)


def test_a_mistake_whose_file_name_is_not_utf8_is_drawn(tmp_path, capsys, monkeypatch):
    """A zip from an old Windows machine: test_predictions.csv has the name's byte 0xe9 as \\xe9; the file is found
    by that byte."""
    run_dir = folder_run(tmp_path, [('a', 'b', 0.9, 0)])
    folder = os.fsencode(tmp_path / 'P_run_data' / 'test' / 'a')
    try:
        os.rename(os.path.join(folder, b'0.png'), os.path.join(folder, b'caf\xe9.png'))
    except OSError:  # a file system that holds only UTF-8 names
        pytest.skip('this file system refuses names that are not UTF-8')
    write_predictions(run_dir, [('test/a/caf\\xe9.png', 'a', 'b', 0.9, 0)])
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 0 and err == ''
    ((caption, name, image),) = tiles(figures[0])
    assert name == 'test/a/caf\\xe9.png' and (np.asarray(image) == colour(0)).all()
    close_figure(figures[0])


@pytest.mark.parametrize('dataset, pickled', [('cifar10', ('cifar-10-batches-py', 'test_batch', 'data', 'labels')),
                                              ('cifar100', ('cifar-100-python', 'test', b'data', b'fine_labels'))])
def test_cifar_mistakes_are_read_from_torchvisions_pickle(dataset, pickled, tmp_path, capsys, monkeypatch):
    """CIFAR's test images are test_predictions.csv's indices into the test set torchvision extracted under the run's
    --data_dir: rows of 3072 bytes, the red plane, then green, then blue. The Python 2 file's keys read as str the way
    torchvision reads it (encoding='latin1'), as bytes the way the CIFAR page's own snippet does: both are taken."""
    import pickle
    folder, file, data, labels = pickled
    pixels = np.random.default_rng(0).integers(0, 256, (12, 3072), dtype=np.uint8)
    os.makedirs(tmp_path / 'data' / folder)
    with open(tmp_path / 'data' / folder / file, 'wb') as f:
        pickle.dump({data: pixels, labels: [0] * 12}, f)
    run_dir = write_run(tmp_path / 'logs', 'P_run')
    set_config(run_dir, dataset=dataset, data_dir=str(tmp_path / 'data'))
    write_predictions(run_dir, [('0', 'cat', 'cat', 0.99, 1), ('3', 'dog', 'cat', 0.5, 0), ('7', 'cat', 'dog', 0.8, 0)])
    figures = captured_figures(monkeypatch)
    code, _, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 0 and err == ''
    drawn = tiles(figures[0])
    assert [name for _, name, _ in drawn] == ['#7', '#3']
    for (_, _, image), index in zip(drawn, (7, 3)):
        assert np.array_equal(image, pixels[index].reshape(3, 32, 32).transpose(1, 2, 0))
    write_predictions(run_dir, [('-1', 'cat', 'dog', 0.9, 0), ('12', 'cat', 'dog', 0.9, 0),
                                ('7', 'cat', 'dog', 0.8, 0)])
    code, _, err = run_plot([run_dir, '--mistakes'], capsys)  # no such index, not the last image counted back
    assert code == 0 and '2 of the 3 images' in one_line(err) and '-1 (' in err and '12 (' in err
    assert [name for _, name, _ in tiles(figures[1])] == ['#7']
    for fig in figures:
        close_figure(fig)


def test_mistakes_of_a_run_whose_data_moved_are_skipped_with_where_it_looked(tmp_path, capsys):
    moved = folder_run(tmp_path, MIXED, 'F_run')
    os.rename(tmp_path / 'F_run_data', tmp_path / 'elsewhere')
    there = folder_run(tmp_path, MIXED, 'P_run')
    code, out, err = run_plot([tmp_path / 'logs', '--mistakes'], capsys)
    assert code == 0 and out.strip() == f"wrote {os.path.join(there, 'mistakes.png')}"
    line = one_line(err)
    assert line.startswith(f'plot.py: warning: skipping run {moved}: its dataset folder {tmp_path / "F_run_data"} ')
    assert f'ln -s NEW_PATH {tmp_path / "F_run_data"}' in line
    code, out, err = run_plot([moved, '--mistakes'], capsys)  # nothing drawn: an error after the warning
    lines = err.strip().splitlines()
    assert code == 2 and out == '' and len(lines) == 2 and 'Traceback' not in err
    assert lines[1].startswith('plot.py: error: no mistakes to draw under')
    set_config(moved, dataset='cifar10', data_dir=str(tmp_path / 'data'))  # CIFAR: the pickle's path is named
    code, _, err = run_plot([moved, '--mistakes'], capsys)
    assert code == 2 and f"no cifar10 test set at {tmp_path / 'data' / 'cifar-10-batches-py' / 'test_batch'}" in err
    assert not os.path.exists(os.path.join(moved, 'mistakes.png'))


@pytest.mark.parametrize('dataset', [['cifar10'], {}])
def test_mistakes_of_a_run_whose_config_names_no_dataset_path_are_skipped(dataset, tmp_path, capsys):
    """A hand-edited config.json whose dataset is a list or an object: a TypeError (unhashable) traceback where the
    run is skipped with the warning for a config.json without a dataset, and the other runs are drawn."""
    broken = folder_run(tmp_path, MIXED, 'F_run')
    set_config(broken, dataset=dataset)
    there = folder_run(tmp_path, MIXED, 'P_run')
    code, out, err = run_plot([tmp_path / 'logs', '--mistakes'], capsys)
    assert code == 0 and out.strip() == f"wrote {os.path.join(there, 'mistakes.png')}"
    assert one_line(err).startswith(f"plot.py: warning: skipping run {broken}: its config.json does not say which "
                                    f"dataset")


def test_a_run_without_mistakes_or_predictions_says_so(tmp_path, capsys):
    perfect = folder_run(tmp_path, [('a', 'a', 0.9, 1), ('b', 'b', 0.8, 1)], 'F_run')
    unevaluated = write_run(tmp_path / 'logs', 'P_run')
    code, out, err = run_plot([tmp_path / 'logs', '--mistakes'], capsys)
    assert code == 0 and out == ''  # no figure, and no error: nothing went wrong
    no_mistakes, no_file = err.strip().splitlines()
    assert no_mistakes == (f'plot.py: warning: run {perfect}: no mistakes in test_predictions.csv: all 2 test images '
                           f'right')
    assert no_file.startswith(f'plot.py: warning: run {unevaluated}: no test_predictions.csv (a run writes it as it '
                              f'finishes); ')
    assert f'python main.py --eval_only --resume {unevaluated} writes one' in no_file
    assert not os.path.exists(os.path.join(perfect, 'mistakes.png'))
    code, out, err = run_plot([unevaluated, '--mistakes'], capsys)
    assert code == 2 and out == '' and err.strip().splitlines()[-1].startswith('plot.py: error: no mistakes to draw')


def test_unreadable_mistakes_are_left_out_in_one_warning(tmp_path, capsys, monkeypatch):
    run_dir = folder_run(tmp_path, [('a', 'b', 0.9, 0), ('a', 'b', 0.8, 0), ('b', 'a', 0.7, 0), ('b', 'a', 0.6, 0)])
    os.remove(tmp_path / 'P_run_data' / 'test' / 'a' / '0.png')
    (tmp_path / 'P_run_data' / 'test' / 'b' / '2.png').write_bytes(b'not an image')
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 0 and out.strip() == f"wrote {os.path.join(run_dir, 'mistakes.png')}"
    line = one_line(err)
    assert line.startswith(f'plot.py: warning: run {run_dir}: 2 of the 4 images to draw from test_predictions.csv '
                           f'cannot be read, left out: test/a/0.png (')
    assert 'test/b/2.png (' in line
    assert [name for _, name, _ in tiles(figures[0])] == ['test/a/1.png', 'test/b/3.png']
    assert '2 unreadable left out' in figures[0].get_suptitle()
    close_figure(figures[0])


def test_mistakes_in_a_folder_the_user_may_not_enter_are_not_called_missing(tmp_path, capsys, monkeypatch):
    """A test/<class>/ folder of another user's (chmod 700): its images were 'no file', as if the data had moved.
    Denial is played (the tests run as root, whom chmod denies nothing)."""
    run_dir = folder_run(tmp_path, [('a', 'b', 0.9, 0), ('b', 'a', 0.7, 0)])
    folder = str(tmp_path / 'P_run_data' / 'test' / 'a')
    stat = os.stat

    def denied(path, *args, **kwargs):
        if str(path).startswith(folder + os.sep):
            raise PermissionError(13, 'Permission denied', str(path))
        return stat(path, *args, **kwargs)
    monkeypatch.setattr(os, 'stat', denied)
    captured_figures(monkeypatch)
    code, _, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 0 and one_line(err) == (
        f"plot.py: warning: run {run_dir}: 1 of the 2 images to draw from test_predictions.csv cannot be read, left "
        f"out: test/a/0.png ([Errno 13] Permission denied: '{folder}/0.png')")


@pytest.mark.parametrize('value, reason', [('0', 'at least 1, got 0'), ('-3', 'at least 1, got -3'),
                                           ('2.5', "got '2.5'"), ('many', "got 'many'"),
                                           ('401', 'at most 400 (a larger grid takes minutes to draw')])
def test_a_bad_mistakes_count_is_one_line(value, reason, tmp_path, capsys):
    run_dir = folder_run(tmp_path, MIXED)
    code, out, err = run_plot([run_dir, '--mistakes', value], capsys)
    line = one_line(err)
    assert code == 2 and out == '' and line.startswith('plot.py: error: argument --mistakes: N is how many images')
    assert reason in line and not os.path.exists(os.path.join(run_dir, 'mistakes.png'))


def test_the_most_mistakes_the_help_offers_are_drawn():
    """--help says 'at most 400': 400 itself is taken."""
    assert plot.mistakes_count(str(plot.MISTAKES_MOST)) == plot.MISTAKES_MOST == 400


def test_a_path_after_a_bare_mistakes_says_where_it_goes(tmp_path, capsys):
    run_dir = folder_run(tmp_path, MIXED)
    code, _, err = run_plot(['--mistakes', run_dir], capsys)
    assert code == 2 and 'put --mistakes after the PATHs' in one_line(err)


@pytest.mark.parametrize('content, reason', [
    ('image,label,prediction\n0,a,b\n', 'lacks probability,correct,checkpoint,epoch'),
    ('image,label,prediction,probability,correct,checkpoint,epoch\n0,a,b,high,0,last,1\n', "probability 'high'"),
    ('image,label,prediction,probability,correct,checkpoint,epoch\n0,a,b,1.5,0,last,1\n', 'not one in [0, 1]'),
    ('image,label,prediction,probability,correct,checkpoint,epoch\n0,a,b,0.5,yes,last,1\n', "correct='yes'"),
    ('image,label,prediction,probability,correct,checkpoint,epoch\n0,a,b,0.5,0\n', 'row 2 has 5 columns'),
])
def test_a_bad_predictions_csv_skips_the_run(content, reason, tmp_path, capsys):
    good = folder_run(tmp_path, MIXED, 'F_run')
    bad = folder_run(tmp_path, MIXED, 'P_run')
    with open(os.path.join(bad, 'test_predictions.csv'), 'w') as f:
        f.write(content)
    code, out, err = run_plot([tmp_path / 'logs', '--mistakes'], capsys)
    assert code == 0 and out.strip() == f"wrote {os.path.join(good, 'mistakes.png')}"
    line = one_line(err)
    assert line.startswith(f'plot.py: warning: skipping run {bad}: test_predictions.csv') and reason in line


def test_mistakes_on_the_command_line_import_no_torch(tmp_path):
    run_dir = folder_run(tmp_path, MIXED)
    result = subprocess.run([sys.executable, '-c', "import sys, plot; plot.main(sys.argv[1:]); "
                             "print('torch' in sys.modules)", run_dir, '--mistakes', '2'],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == '', result.stderr
    assert result.stdout.splitlines() == [f"wrote {os.path.join(run_dir, 'mistakes.png')}", 'False']


def test_mistakes_of_a_run_recorded_with_relative_paths_say_where_to_run_from(tmp_path, capsys, monkeypatch):
    """A run from before main.py stored its paths absolute has config.json's --dataset (--data_dir) as typed, relative
    to the folder it was started in: plot.py draws its mistakes from there, and elsewhere says so, where it said the
    folder was gone."""
    run_dir = folder_run(tmp_path, MIXED)
    set_config(run_dir, dataset='P_run_data')
    monkeypatch.chdir(tmp_path / 'logs')
    code, _, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 2 and 'ln -s NEW_PATH P_run_data); P_run_data is relative to the folder the run was started in: ' \
                         'run plot.py from there' in err.splitlines()[0]
    set_config(run_dir, dataset='cifar10', data_dir='data')
    code, _, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 2 and '; data is relative to the folder the run was started in' in err
    set_config(run_dir, dataset='P_run_data')
    monkeypatch.chdir(tmp_path)
    code, out, err = run_plot([run_dir, '--mistakes'], capsys)
    assert code == 0 and err == '' and out.strip() == f"wrote {os.path.join(run_dir, 'mistakes.png')}"


def test_a_run_named_in_bytes_that_are_not_utf8_is_drawn_with_them_escaped(tmp_path, capsys, monkeypatch):
    """A run folder unzipped from an old Windows archive (cp1252 'café'): its name reaches plot.py as a surrogate,
    which matplotlib cannot draw (a TypeError traceback in every figure); legends, titles and the table show the byte
    as \\xe9, as main.py's tables and CSVs do."""
    name = os.fsdecode(b'caf\xe9')
    run_dir = folder_run(tmp_path, MIXED, name)
    write_confusion(run_dir, ['a', 'b'], [[3, 1], [0, 4]])
    figures = captured_figures(monkeypatch)
    code, out, err = run_plot([tmp_path / 'logs', '--cost'], capsys)
    assert code == 0, err
    assert list(table(out)) == ['caf\\xe9']
    assert [text.get_text() for text in figures[0].legends[0].get_texts()] == ['caf\\xe9 (P)']
    for flag in ('--confusion', '--mistakes'):
        code, _, err = run_plot([run_dir, flag], capsys)
        assert code == 0, err
        assert figures[-1].get_suptitle().startswith('caf\\xe9') or figures[-1].axes[0].get_title().startswith(
            'caf\\xe9'), flag
    code, out, err = run_plot([run_dir], capsys)  # the accuracy figure goes into the run directory: said escaped too
    assert code == 0 and out.strip().splitlines()[-1] == f"wrote {tmp_path / 'logs' / 'caf'}\\xe9/accuracy.png", err


def test_a_file_of_another_program_named_like_a_run_s_figure_is_kept(tmp_path, capsys):
    """confusion.png and mistakes.png are redrawn in place in each run directory, but a file there of that name that
    plot.py (or matplotlib) did not write, a photo of the user's own, is kept with a warning, not drawn over."""
    run_dir = folder_run(tmp_path, MIXED)
    write_confusion(run_dir, ['a', 'b'], [[3, 1], [0, 4]])
    for flag, name in (('--confusion', 'confusion.png'), ('--mistakes', 'mistakes.png')):
        code, out, err = run_plot([run_dir, flag], capsys)  # plot.py's own figure: drawn, and redrawn
        assert code == 0 and out.strip() == f"wrote {os.path.join(run_dir, name)}", err
        code, out, err = run_plot([run_dir, flag], capsys)
        assert code == 0 and out.strip() == f"wrote {os.path.join(run_dir, name)}", err
        with open(os.path.join(run_dir, name), 'wb') as f:
            f.write(b'\x89PNG my own picture')
        code, out, err = run_plot([run_dir, flag], capsys)
        assert code == 2 and out == '' and one_line(err.splitlines()[0]) == (
            f"plot.py: warning: run {run_dir}: {name} there is not a figure plot.py (or matplotlib) wrote, so it is "
            f"left as it is: move it away to draw it, or pass --out FILE with this run alone")
        with open(os.path.join(run_dir, name), 'rb') as f:
            assert f.read() == b'\x89PNG my own picture'


def test_a_run_s_figure_matplotlib_wrote_is_redrawn_and_one_it_may_not_write_is_skipped(tmp_path, capsys,
                                                                                       monkeypatch):
    """A confusion.png that matplotlib wrote (a plot.py before figures carried its mark) is redrawn in place; one this
    user may not write (another user's, chmod 444; refused by hand, as the tests may run as root) is skipped with a
    warning, not a 'cannot write' error that would stop the runs after it."""
    run_dir = folder_run(tmp_path, MIXED)
    write_confusion(run_dir, ['a', 'b'], [[3, 1], [0, 4]])
    target = os.path.join(run_dir, 'confusion.png')
    fig = plt.figure()
    fig.savefig(target)
    plt.close(fig)
    code, out, err = run_plot([run_dir, '--confusion'], capsys)
    assert code == 0 and out.strip() == f"wrote {target}" and err == '', err
    access = os.access
    monkeypatch.setattr(plot.os, 'access', lambda path, mode, **kwargs: (
        False if mode & os.W_OK and str(path) == target else access(path, mode, **kwargs)))
    code, out, err = run_plot([run_dir, '--confusion'], capsys)
    assert code == 2 and out == '' and one_line(err.splitlines()[0]) == (
        f"plot.py: warning: skipping run {run_dir}: cannot write confusion.png there (no write permission for it); "
        f"pass --out FILE with this run alone to draw it elsewhere")
