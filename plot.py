"""Plot train/test accuracy per epoch for vpt runs and print a summary table.

    python plot.py logs/                                   # every run under logs/ -> logs/accuracy.png
    python plot.py logs/P_run logs/F_run --out fig.png     # chosen runs (run directories hold metrics.csv)
    python plot.py logs/ other_logs/ --out report/acc.pdf  # several log directories; format from the extension
"""
import argparse
import csv
import json
import math
import os
import sys

import matplotlib
matplotlib.use('Agg')  # files only, no display needed
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

# train.METRICS_HEADER, repeated rather than imported: plot.py stays free of torch and starts in a second
METRICS_HEADER = ['epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'lr', 'epoch_time_s',
                  'train_images_per_s']
MARKERS_UP_TO = 30  # draw a marker at every epoch while the longest run has at most this many


def error(message):
    """One line on stderr, exit code 2, nothing written."""
    print(f"plot.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def warn(message):
    print(f"plot.py: warning: {message}", file=sys.stderr)


def one_line(exc):
    return ' '.join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- finding runs


def is_run_dir(path):
    return os.path.isfile(os.path.join(path, 'metrics.csv'))


def find_run_dirs(paths):
    """Each path is a run directory or a directory of run directories (one level, sorted by name). Checks every
    path before anything is read; duplicates (the same run reached twice) are kept once, in first-seen order."""
    for path in paths:
        if not os.path.exists(path):
            error(f"{path} does not exist; pass a run directory (holding metrics.csv) or a directory of runs such as logs/")
        if not os.path.isdir(path):
            error(f"{path} is not a directory; pass a run directory (holding metrics.csv) or a directory of runs such as logs/")
    run_dirs, seen = [], set()
    for path in paths:
        if is_run_dir(path):
            candidates = [path]
        else:
            try:
                names = sorted(os.listdir(path))
            except OSError as e:
                error(f"cannot list {path}: {one_line(e)}")
            candidates = []
            for name in names:
                sub = os.path.join(path, name)
                if is_run_dir(sub):
                    candidates.append(sub)
                elif os.path.isfile(os.path.join(sub, 'config.json')):  # started, no metrics.csv yet
                    warn(f"skipping run {sub}: no metrics.csv (no epoch written yet)")
            if not candidates:
                error(f"no runs found under {path} (a run directory holds metrics.csv); "
                      f"train one with python main.py, or pass the directory that holds the runs")
        for run_dir in candidates:
            key = os.path.realpath(run_dir)
            if key not in seen:
                seen.add(key)
                run_dirs.append(run_dir)
    return run_dirs


# ---------------------------------------------------------------- reading a run


def read_metrics(path):
    """metrics.csv -> list of rows (dicts of floats, 'epoch' an int). Raises ValueError with a one-line reason."""
    try:
        with open(path, newline='') as f:
            rows = [row for row in csv.reader(f) if row]  # blank lines carry nothing
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read metrics.csv ({one_line(e)})")
    if not rows:
        raise ValueError("metrics.csv is empty")
    if rows[0] != METRICS_HEADER:
        raise ValueError(f"metrics.csv header is {','.join(rows[0])[:80]!r}, expected {','.join(METRICS_HEADER)!r}")
    if len(rows) == 1:
        raise ValueError("metrics.csv has only the header (no finished epoch yet)")
    history = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(METRICS_HEADER):
            raise ValueError(f"metrics.csv row {line} has {len(row)} columns, expected {len(METRICS_HEADER)}")
        try:
            values = {key: float(text) for key, text in zip(METRICS_HEADER, row)}
        except ValueError:
            raise ValueError(f"metrics.csv row {line} has a non-numeric value: {','.join(row)[:80]!r}")
        for key in ('epoch', 'train_acc', 'test_acc', 'epoch_time_s'):  # losses may legitimately be nan/inf
            if not math.isfinite(values[key]):
                raise ValueError(f"metrics.csv row {line}: {key} is {values[key]}")
        if values['epoch'] != int(values['epoch']) or values['epoch'] < 1:
            raise ValueError(f"metrics.csv row {line}: epoch {row[0]!r} is not a positive integer")
        values['epoch'] = int(values['epoch'])
        if history and values['epoch'] <= history[-1]['epoch']:
            raise ValueError(f"metrics.csv row {line}: epoch {values['epoch']} does not follow {history[-1]['epoch']}")
        history.append(values)
    return history


def read_config(path):
    """config.json -> dict. A missing config.json gives None (the run is still plotted, mode '?': its metrics are
    intact and worth seeing); a broken one raises ValueError (the run directory is damaged, so the run is skipped)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read config.json ({one_line(e)})")
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return config


def load_run(run_dir):
    """-> dict(name, mode, params, history, ...) or None after a warning naming the run and the reason."""
    try:
        history = read_metrics(os.path.join(run_dir, 'metrics.csv'))
        config = read_config(os.path.join(run_dir, 'config.json'))
    except ValueError as e:
        warn(f"skipping run {run_dir}: {e}")
        return None
    if config is None:
        warn(f"run {run_dir}: no config.json, plotting it with mode '?'")
        config = {}
    mode = config.get('mode')
    params = config.get('trainable_params')
    best = max(history, key=lambda row: row['test_acc'])  # the first epoch reaching the best, on ties
    # the directory name, not config['name']: it is what the user passed and what tells runs apart on disk
    return dict(dir=run_dir, name=os.path.basename(os.path.normpath(run_dir)),
                mode=mode if isinstance(mode, str) and mode else '?',
                params=params if isinstance(params, int) and not isinstance(params, bool) else None,
                history=history, best_acc=best['test_acc'], best_epoch=best['epoch'],
                final_acc=history[-1]['test_acc'], time_s=sum(row['epoch_time_s'] for row in history))


def label_runs(runs):
    """Runs with the same directory name (from different log directories) are labelled by their full path."""
    names = [run['name'] for run in runs]
    for run in runs:
        if names.count(run['name']) > 1:
            run['name'] = os.path.normpath(run['dir'])


# ---------------------------------------------------------------- table


def format_time(seconds):
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def print_table(runs):
    header = ['run', 'mode', 'epochs', 'best test acc', 'best epoch', 'final test acc', 'train time',
              'trainable params']
    rows = [[run['name'], run['mode'], str(len(run['history'])), f"{run['best_acc']:.2f}%", str(run['best_epoch']),
             f"{run['final_acc']:.2f}%", format_time(run['time_s']),
             f"{run['params']:,}" if run['params'] is not None else '?'] for run in runs]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:  # text columns left-aligned, numbers right-aligned
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        print('  '.join(cells).rstrip())


# ---------------------------------------------------------------- figure


def run_colours(count):
    cmap = plt.get_cmap('tab10' if count <= 10 else 'tab20')
    if count <= 20:
        return [cmap(i) for i in range(count)]
    return [plt.get_cmap('viridis')(i / (count - 1)) for i in range(count)]


def plot_runs(runs, out):
    longest = max(len(run['history']) for run in runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout='constrained')
    for run, colour in zip(runs, run_colours(len(runs))):
        epochs = [row['epoch'] for row in run['history']]
        marker = 'o' if longest <= MARKERS_UP_TO or len(epochs) == 1 else None
        for ax, key in zip(axes, ('train_acc', 'test_acc')):
            ax.plot(epochs, [row[key] for row in run['history']], color=colour, marker=marker, markersize=4,
                    linewidth=1.8, label=f"{run['name']} ({run['mode']})")
    for ax, title in zip(axes, ('train accuracy', 'test accuracy')):
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel('accuracy (%)')
    axes[1].tick_params(labelleft=True)  # shared scale, but each panel keeps its numbers
    handles, labels = axes[0].get_legend_handles_labels()
    longest_label = max(len(label) for label in labels)
    columns = max(1, min(len(labels), 110 // (longest_label + 6)))
    fig.legend(handles, labels, loc='outside lower center', ncol=columns, frameon=False)
    extension = os.path.splitext(out)[1][1:].lower()
    fmt = None if extension else 'png'  # no extension: still a PNG, written exactly at `out`
    try:
        if extension and extension not in fig.canvas.get_supported_filetypes():  # before creating any directory
            error(f"cannot write {out}: unknown figure format .{extension} (use .png, .pdf or .svg)")
        parent = os.path.dirname(out)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(out, dpi=150, format=fmt)
    except (OSError, ValueError) as e:
        error(f"cannot write {out}: {one_line(e)}")
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', metavar='PATH', help='run directories or directories of runs (logs/)')
    parser.add_argument('--out', default=None, metavar='FILE',
                        help='figure to write (default: <first PATH>/accuracy.png; .pdf/.svg also work)')
    parser.error = lambda message: error(f"{message} (python plot.py --help for usage)")  # one line, exit 2
    args = parser.parse_args(argv)

    run_dirs = find_run_dirs(args.paths)
    runs = [run for run in map(load_run, run_dirs) if run is not None]
    if not runs:
        error(f"no runs found under {', '.join(args.paths)} (a run directory holds metrics.csv): every run was "
              f"skipped, see the warnings above")
    label_runs(runs)
    out = args.out or os.path.join(args.paths[0], 'accuracy.png')
    plot_runs(runs, out)
    print_table(runs)
    print(f"wrote {out}")


if __name__ == '__main__':
    main()
