"""Plot train/(val/)test accuracy per epoch for vpt runs and print a summary table; draw confusion matrices,
accuracy-against-cost figures and the test images a run got most confidently wrong.

    python plot.py logs/                                   # every run under logs/ -> logs/accuracy.png + table
    python plot.py logs/P_run logs/F_run --out fig.png     # chosen runs (run directories hold metrics.csv)
    python plot.py logs/ other_logs/ --out report/acc.pdf  # several log directories; format from the extension
    python plot.py logs/my_sweep/                          # a sweep directory is a directory of runs like logs/
    python plot.py logs/ --cost                            # and logs/cost.png: accuracy against trainable
                                                           # parameters, time per epoch, checkpoint size
    python plot.py logs/P_run --confusion                  # logs/P_run/confusion.png from its confusion.csv
    python plot.py logs/ --confusion                       # a confusion.png in every run directory that has one
    python plot.py logs/P_run --mistakes                   # logs/P_run/mistakes.png: the 25 test images it got
                                                           # most confidently wrong (--mistakes 50: 50 of them)

--out replaces an existing file only if plot.py wrote it (its .png/.pdf/.svg/.ps/.eps figures carry a mark in their
metadata); any other file there is refused before anything is drawn. A run's own confusion.png and mistakes.png are
redrawn in place, unless a file of another program has that name: it is kept, with a warning.

A PATH is a run directory or a directory of runs, one level deep: files next to the runs (sweep.csv, figures) and
directories that are not runs are ignored, so sweep directories inside logs/ are passed as PATHs of their own (a
warning names each one left out).

Table columns: `test@best val` is the test accuracy at the epoch with the best validation accuracy (the first such
epoch; `val epoch`), the number to report ('-' for runs trained without a validation split); `best test (oracle)`
is the highest test accuracy over all epochs, an epoch picked by looking at the test set, so optimistic. Then the final
epoch's test accuracy, the mean time per epoch and the total (training + evaluation), peak GPU memory ('-' on CPU),
the size of trainable.safetensors and the trainable parameter count. `epochs` reads 2/30 for a run that has not
finished (stopped, or still training: its summary.json plans more epochs), and a warning says its numbers are not final.

--cost writes cost.png next to accuracy.png (with --out report/acc.pdf: report/acc_cost.pdf): test@best val, or
the final test accuracy for runs without a validation split (hollow markers), against trainable parameters, mean
time per epoch and checkpoint size, one point per run (runs at the same point share its label); a run lacking a
quantity is left out of that panel.

--confusion draws only the confusion matrices (no accuracy figure, no table): rows are true classes, each row
normalised to 100%, colour on a square-root scale so that small confusions show. --out is allowed with a single run
only; for several runs drop it and every run gets <run>/confusion.png. A run that has not finished has no
confusion.csv; the newest confusion_epoch<N>.csv that main.py --eval_only wrote for its last checkpoint is drawn
instead, into <run>/confusion_epoch<N>.png. A run's confusion_best.csv (main.py --eval_only --checkpoint best: the
best val epoch, whose test accuracy is the number to report) is drawn too, into <run>/confusion_best.png (not with
--out, which takes one figure).

--mistakes [N] draws only a grid of the N test images (default 25) each run got most confidently wrong: the wrong rows
of its test_predictions.csv (written by a finished run's last epoch, and by main.py --eval_only for a checkpoint) with
the highest probability (ties in the CSV's order), each image titled true -> predicted class and that probability, its
name below (a CIFAR image's is its test-set index, #1234). Its files are picked and named as --confusion's:
<run>/mistakes.png, mistakes_best.png from test_predictions_best.csv, mistakes_epoch<N>.png for an unfinished run;
--out for a single run only. The images are read from the run's data, the dataset folder or the CIFAR test set under
--data_dir as config.json records them, photos upright as their EXIF orientation says and shrunk to 320 px. A run
whose data is not there any more is skipped with a warning naming where it looked, an image that cannot be read is
left out of the grid (one warning per figure), and a run without a mistake gets a warning and no figure.
"""
import argparse
import contextlib
import csv
import json
import logging
import math
import os
import pickle
import re
import sys
import warnings

import matplotlib
matplotlib.use('Agg')  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import font_manager
from matplotlib.colors import PowerNorm
from matplotlib.ft2font import FT2Font
from matplotlib.lines import Line2D
from matplotlib.patches import ConnectionPatch
from matplotlib.transforms import Bbox
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from PIL import Image, ImageOps  # matplotlib's own dependency

from main import flag_hint, not_creatable, shown, shown_width  # main.py imports torch only inside main()

# train.METRICS_HEADER, repeated rather than imported: plot.py stays free of torch and starts in a second.
# Columns are read by name: these must be there, the optional ones may be (empty cells = no value), others are ignored.
METRICS_HEADER = ['epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'lr', 'epoch_time_s',
                  'train_images_per_s']
# val_* empty without a validation split, peak_mem_gib on CPU; includes_compile (1: the epoch also compiled the model)
# missing in runs older than it
METRICS_OPTIONAL = ['val_loss', 'val_acc', 'peak_mem_gib', 'includes_compile']
MUST_BE_FINITE = ('epoch', 'train_acc', 'test_acc', 'epoch_time_s', 'val_acc', 'peak_mem_gib',
                  'includes_compile')  # losses may be nan
MARKERS_UP_TO = 30  # draw a marker at every epoch while the longest run has at most this many
ANNOTATE_UP_TO = 20  # write the percentage into every confusion-matrix cell up to this many classes
# train.predictions_bytes's columns, which --mistakes reads by name
PREDICTIONS_HEADER = ['image', 'label', 'prediction', 'probability', 'correct', 'checkpoint', 'epoch']
# data.CIFAR_FOLDERS and the test file torchvision reads in each (data.py imports torch, which plot.py does not)
CIFAR_TEST_FILES = {'cifar10': ('cifar-10-batches-py', 'test_batch'), 'cifar100': ('cifar-100-python', 'test')}
MISTAKES_SHOWN = 25  # --mistakes without N: a 5 x 5 grid
MISTAKES_MOST = 400  # 400 CIFAR tiles take 12 s to draw on the 2-core VM; time grows faster: 3,000 took 11 minutes
MISTAKE_COLUMNS = 10  # the grid's widest row; more mistakes make more rows
TILE_PIXELS = 320  # a photo's longest side in the grid: about its size at 150 dpi; 12 MP photos stay fast and small
# data.PHOTO_PIXELS (data.py imports torch): a phone's 200 MP photo is read, as the run read it, not refused as a bomb
PHOTO_PIXELS = 250_000_000
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < PHOTO_PIXELS:
    Image.MAX_IMAGE_PIXELS = PHOTO_PIXELS
MODE_STYLE = {'P': ('tab:blue', 'o'), 'P+unfreeze': ('tab:blue', 'v'), 'F': ('tab:orange', 's'),
              'P+F': ('tab:green', '^'), 'linear': ('tab:purple', 'D'), 'linear+unfreeze': ('tab:purple', 'v')}
OTHER_STYLE = ('tab:gray', 'X')  # mode '?' (no config.json) or one this script does not know
# plot.py marks its figures where the format keeps metadata, and replaces at --out only a figure so marked
MARK = 'vpt plot.py'
MARK_KEY = {'png': 'Software', 'pdf': 'Creator', 'svg': 'Creator', 'ps': 'Creator', 'eps': 'Creator'}


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


def not_looked_into(path):
    """Why the directory at path cannot be looked into (no permission to enter it), or None."""
    try:
        os.stat(os.path.join(path, 'metrics.csv'))
    except PermissionError as e:
        return one_line(e.strerror or e)
    except (OSError, ValueError):
        pass
    return None


def holds_runs(path):
    try:
        return os.path.isdir(path) and any(is_run_dir(os.path.join(path, name)) for name in os.listdir(path))
    except OSError:
        return False


def find_run_dirs(paths):
    """Each path is a run directory or a directory of run directories (one level, sorted by name). Checks every
    path before anything is read; duplicates (the same run reached twice) are kept once, in first-seen order."""
    for path in paths:
        if not os.path.exists(path):
            error(f"{path} does not exist; pass a run directory (holding metrics.csv) or a directory of runs such as logs/")
        if not os.path.isdir(path):
            error(f"{path} is not a directory; pass a run directory (holding metrics.csv) or a directory of runs such as logs/")
    run_dirs, seen = [], set()
    given = {os.path.realpath(path) for path in paths}
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
                elif reason := not_looked_into(sub):  # another user's run (mode 700): is_run_dir says no run
                    warn(f"skipping {sub}: cannot look into it ({reason}); if it is a run, it needs "
                         f"read permission for you (chmod -R a+rX {sub}, by its owner)")
            # sweep.py's set-aside/ holds runs of other data, left out of its results: no sweep to point to
            nested = [os.path.join(path, name) for name in names
                      if name != 'set-aside' and holds_runs(os.path.join(path, name))]
            # a PATH of its own, or runs of it passed one by one: what was chosen from it is plotted
            passed = [sub for sub, real in ((sub, os.path.realpath(sub)) for sub in nested)
                      if any(os.path.commonpath([chosen, real]) == real for chosen in given)]
            if candidates or passed:
                for sub in nested:
                    if sub not in passed:
                        warn(f"not plotting the runs in {sub} (a sweep?): pass it as a PATH of its own")
            else:
                hint = (f"; {nested[0]} holds runs (a sweep?): pass it" if len(nested) == 1 else
                        f"; {', '.join(nested)} hold runs (sweeps?): pass one or more of them" if nested else
                        "; train one with python main.py, or pass the directory that holds the runs")
                error(f"no runs found under {path} (a run directory holds metrics.csv){hint}")
        for run_dir in candidates:
            key = os.path.realpath(run_dir)
            if key not in seen:
                seen.add(key)
                run_dirs.append(run_dir)
    return run_dirs


# ---------------------------------------------------------------- reading a run


def read_metrics(path):
    """metrics.csv -> list of rows, dicts of floats ('epoch' an int) holding METRICS_HEADER and METRICS_OPTIONAL
    (None when the column is missing or the cell empty). Raises ValueError with a one-line reason."""
    try:
        with open(path, newline='') as f:
            rows = [row for row in csv.reader(f) if row]  # blank lines carry nothing
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read metrics.csv ({one_line(e)})")
    if not rows:
        raise ValueError("metrics.csv is empty")
    header = rows[0]
    missing = [key for key in METRICS_HEADER if key not in header]
    if missing:
        raise ValueError(f"metrics.csv header is {','.join(header)[:80]!r}, it lacks {','.join(missing)} "
                         f"(expected at least {','.join(METRICS_HEADER)!r})")
    if len(set(header)) != len(header):
        raise ValueError(f"metrics.csv header {','.join(header)[:80]!r} repeats a column")
    if len(rows) == 1:
        raise ValueError("metrics.csv has only the header (no finished epoch yet)")
    history = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"metrics.csv row {line} has {len(row)} columns, expected {len(header)}")
        cells = dict(zip(header, row))
        values = {}
        for key in METRICS_HEADER + METRICS_OPTIONAL:
            text = cells.get(key, '').strip()
            if key in METRICS_OPTIONAL and not text:
                values[key] = None
                continue
            try:
                values[key] = float(text)
            except ValueError:
                raise ValueError(f"metrics.csv row {line} has a non-numeric {key}: {','.join(row)[:80]!r}")
            if key in MUST_BE_FINITE and not math.isfinite(values[key]):
                raise ValueError(f"metrics.csv row {line}: {key} is {values[key]}")
        if values['epoch'] != int(values['epoch']) or values['epoch'] < 1:
            raise ValueError(f"metrics.csv row {line}: epoch {cells['epoch']!r} is not a positive integer")
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
    except (OSError, ValueError, RecursionError) as e:  # ValueError: also JSON's and the digit limit's
        raise ValueError(f"cannot read config.json ({one_line(e)})")
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return config


def count(value):
    """value if it is a count a run records (an int, not a bool), else None. A hand-edited 10**400 is None too: it
    would overflow the float arithmetic of the table and the figures."""
    return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 63 else None


def file_size(path):
    try:
        return os.path.getsize(path) if os.path.isfile(path) else None
    except OSError:
        return None


def load_run(run_dir):
    """-> dict(name, mode, params, history, ...) or None after a warning naming the run and the reason."""
    try:
        history = read_metrics(os.path.join(run_dir, 'metrics.csv'))
        config = read_config(os.path.join(run_dir, 'config.json'))
    except ValueError as e:
        diverged = read_summary(run_dir).get('diverged')
        if isinstance(diverged, dict) and diverged.get('epoch') == 1:  # nothing finished: not 'yet', and not resumable
            e = (f"it diverged (a non-finite loss) in epoch 1, step {diverged.get('step')}, before any epoch finished; "
                 f"a run with a lower --lr is the fix, not --resume")
        warn(f"skipping run {run_dir}: {e}")
        return None
    if config is None:
        warn(f"run {run_dir}: no config.json, plotting it with mode '?'")
        config = {}
    exact_test_accuracies(history, count(config.get('test_images')))
    mode = config.get('mode')
    params = count(config.get('trainable_params'))
    oracle = max(history, key=lambda row: row['test_acc'])  # chosen on test (the table says so); the first of ties
    validated = [row for row in history if row['val_acc'] is not None]
    best_val = max(validated, key=lambda row: row['val_acc']) if validated else None
    peaks = [row['peak_mem_gib'] for row in history if row['peak_mem_gib'] is not None]
    time_s = sum(row['epoch_time_s'] for row in history)
    # time per epoch as train.summarize reports it: the epochs that also compiled the model left out, unless all did
    timed = [row for row in history if not row['includes_compile']] or history
    summary = read_summary(run_dir)
    planned, started_with = count(summary.get('epochs')), first_plan(config)
    if started_with is not None and count(config.get('epoch')) is not None:
        planned = config['epoch']  # a resume with another --epoch writes config.json first, summary.json as it saves
    if isinstance(summary.get('diverged'), dict):
        warn(f"run {run_dir} diverged (a non-finite loss) in epoch {summary['diverged'].get('epoch')}: its numbers are "
             f"those of the epochs before; a run with a lower --lr is the fix, not --resume")
    elif planned is not None and len(history) < planned:
        warn(f"run {run_dir} has {len(history)} of {planned} epochs (stopped, or still training): its numbers are "
             f"not final (a stopped run finishes with --resume)")
    # the directory name, not config['name']: it is what the user passed and what tells runs apart on disk
    return dict(dir=run_dir, name=run_name(run_dir),
                mode=mode if isinstance(mode, str) and mode else '?',
                params=params,
                history=history, planned_epochs=planned, first_plan=started_with,
                oracle_test_acc=oracle['test_acc'], oracle_epoch=oracle['epoch'],
                val_epoch=best_val['epoch'] if best_val else None,
                test_at_best_val=best_val['test_acc'] if best_val else None,
                final_acc=history[-1]['test_acc'], time_s=time_s,
                epoch_time_s=sum(row['epoch_time_s'] for row in timed) / len(timed),
                peak_mem_gib=max(peaks) if peaks else None,
                checkpoint_bytes=file_size(os.path.join(run_dir, 'trainable.safetensors')),
                test_set=test_set(config))


def run_name(run_dir):
    """The run's directory name, also for '.' or a path ending in '..' (from inside a run)."""
    return os.path.basename(os.path.abspath(run_dir))


def first_plan(config):
    """The --epoch a run was started with, when a resume changed it (the first epoch_before in config.json's
    resumed list), else None."""
    resumed = config.get('resumed')
    for entry in resumed if isinstance(resumed, list) else []:
        if isinstance(entry, dict) and count(entry.get('epoch_before')) is not None:
            return entry['epoch_before']
    return None


def exact_test_accuracies(history, images):
    """Each test_acc back to the count it came from, 100 x right / images as train.evaluate has it: rounded again to
    the table's 2 decimals, metrics.csv's 4 would differ from what main.py and sweep.py print now and then (45 of 242
    is 18.595041...: 18.60%, but 18.5950 gives 18.59%). A value no count reproduces is left as it is."""
    if images is None or images <= 0:
        return
    for row in history:
        exact = 100 * round(row['test_acc'] * images / 100) / images
        if f"{exact:.4f}" == f"{row['test_acc']:.4f}":
            row['test_acc'] = exact


def test_set(config):
    """What a run's test accuracy was measured on, as its config.json records it: the classes, how many test images
    and, where --test_samples or --test_split picked them, the seed of the pick; None where config.json does not say.
    Not the dataset's path: the same data lies elsewhere on another machine."""
    classes, images = config.get('classes'), count(config.get('test_images'))
    if not isinstance(classes, list) or images is None:  # no config.json, or one from before they were
        return None
    picked = bool(config.get('test_samples') or config.get('test_split'))
    seed = config.get('data_seed')
    return tuple(map(str, classes)), images, json.dumps(seed) if picked and seed is not None else None


def warn_other_test_sets(runs):
    """One warning when the runs were not all tested on the same images: their test accuracies share the figure's
    axes and the table's columns, but do not compare across test sets (P on one dataset against F on another)."""
    groups = {}
    for run in runs:
        if run['test_set'] is not None:
            groups.setdefault(run['test_set'], []).append(run['name'])
    if len(groups) < 2:
        return
    described = []
    for (classes, images, seed), names in groups.items():
        listed = ', '.join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else '')
        what = [f"{len(classes)} classes ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''})",
                f"{images:,} test images"]
        if seed is not None:
            what.append(f"picked with --data_seed {seed}")
        described.append(f"{listed} ({', '.join(what)})")
    warn(f"these runs were tested on {len(groups)} different sets of test images, so their test accuracies do not "
         f"compare across them: {'; '.join(described)}")


def read_summary(run_dir):
    """summary.json -> dict ({} for runs without a readable one): the epochs the run was started (or last resumed)
    for, and whether it diverged."""
    try:
        with open(os.path.join(run_dir, 'summary.json')) as f:
            summary = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return summary if isinstance(summary, dict) else {}


def label_runs(runs):
    """Runs with the same directory name (from different log directories, such as two sweeps' grid_lr=1e-3) are
    told apart by the last folders of their paths, as few as tell every run apart (sweep_P/grid_lr=1e-3), and then
    so is every run: a bare name beside such paths would not say where it is from. Whole paths were long enough to
    crowd the legend. Names are shown as a terminal shows them (main.shown)."""
    names = [run['name'] for run in runs]
    if len(set(names)) < len(names):
        parts = [os.path.abspath(run['dir']).split(os.sep) for run in runs]
        # runs are distinct directories (find_run_dirs), so their paths but the root's empty first part tell them apart
        depth = next(depth for depth in range(2, max(map(len, parts)))
                     if len({tuple(folders[-depth:]) for folders in parts}) == len(runs))
        for run, folders in zip(runs, parts):
            run['name'] = os.path.join(*folders[-depth:])
    for run in runs:  # a name whose bytes are not UTF-8 (os.listdir's surrogates) as \xNN: matplotlib cannot draw it
        run['name'] = shown(run['name'])


# ---------------------------------------------------------------- table


def format_time(seconds):
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def format_bytes(size):
    """Decimal units as file managers and the README use: 1.9 MB, 342 MB."""
    for unit in ('B', 'kB', 'MB', 'GB'):
        if size < 9.95:
            return f"{size:.1f} {unit}" if unit != 'B' else f"{size:.0f} B"
        if size < 999.5:
            return f"{size:.0f} {unit}"
        size /= 1000
    return f"{size:.1f} TB" if size < 9.95 else f"{size:.0f} TB"


def percent(value):
    return f"{value:.2f}%" if value is not None else '-'


def epochs_done(run):
    """'3' for a finished run, '2/30' for one that has not finished."""
    done, planned = len(run['history']), run['planned_epochs']
    return f"{done}/{planned}" if planned is not None and done < planned else str(done)


def epochs_cell(run):
    """epochs_done, and '6 (extended from 4)' for a run resumed with another --epoch: its lr schedule is not the one
    of a run planned that long from the start; nor is it when the --epoch was set back to the first one since."""
    before, planned = run.get('first_plan'), run['planned_epochs']
    if before is None or planned is None:
        return epochs_done(run)
    change = ('--epoch changed on resume' if before == planned else
              f"{'extended' if before < planned else 'shortened'} from {before}")
    return f"{epochs_done(run)} ({change})"


def print_table(runs):
    header = ['run', 'mode', 'epochs', 'test@best val', 'val epoch', 'best test (oracle)', 'best epoch', 'final test',
              'time/epoch', 'total time', 'peak mem', 'checkpoint', 'trainable params']
    rows = [[run['name'], run['mode'], epochs_cell(run), percent(run['test_at_best_val']),
             str(run['val_epoch']) if run['val_epoch'] is not None else '-', percent(run['oracle_test_acc']),
             str(run['oracle_epoch']), percent(run['final_acc']), format_time(run['epoch_time_s']),
             format_time(run['time_s']),
             f"{run['peak_mem_gib']:.1f} GiB" if run['peak_mem_gib'] is not None else '-',
             format_bytes(run['checkpoint_bytes']) if run['checkpoint_bytes'] is not None else '-',
             f"{run['params']:,}" if run['params'] is not None else '?'] for run in runs]
    widths = [max(shown_width(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:  # text columns left-aligned, numbers right-aligned
        pads = [' ' * (w - shown_width(cell)) for cell, w in zip(row, widths)]
        cells = [cell + pad if i < 2 else pad + cell for i, (cell, pad) in enumerate(zip(row, pads))]
        print('  '.join(cells).rstrip())
    print("test@best val: test accuracy at the epoch of best validation accuracy, the number to report ('-': no "
          "validation split); best test (oracle): best test accuracy over epochs, chosen on the test set (optimistic)")


# ---------------------------------------------------------------- figures


def save_figure(fig, out):
    """Writes fig to out (format from the extension, PNG without one) and closes it; one-line error otherwise."""
    extension = os.path.splitext(out)[1][1:].lower()
    fmt = None if extension else 'png'  # no extension: still a PNG, written exactly at `out`
    try:
        if extension and extension not in fig.canvas.get_supported_filetypes():  # before creating any directory
            error(f"cannot write {out}: unknown figure format .{extension} (use .png, .pdf, .svg or another format "
                  f"matplotlib writes: {', '.join(sorted(fig.canvas.get_supported_filetypes()))})")
        parent = os.path.dirname(out)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fit_fonts(fig)
        key = MARK_KEY.get(extension or 'png')
        with quiet_font_search():
            fig.savefig(out, dpi=150, format=fmt, metadata={key: MARK} if key else None)
    except PermissionError:  # another user's logs/, a read-only folder: the way out is another place
        error(f"cannot write {out} (permission denied); pass --out FILE in a folder you may write to")
    except (OSError, ValueError) as e:
        error(f"cannot write {out}: {one_line(e)}")
    finally:
        plt.close(fig)


def fit_fonts(fig):
    """matplotlib's default font, DejaVu Sans, has no Chinese, Japanese or Korean characters, so class and run names
    in them would be drawn as empty boxes. Each text needing characters its font lacks gets, as a fallback, the
    installed font that has most of them; where none has them all, one warning says what to install."""
    lacking = {}
    for text in fig.findobj(matplotlib.text.Text):
        font = font_manager.findfont(text.get_fontproperties())
        chars = {char for char in text.get_text() if not char.isspace() and ord(char) not in font_charmap(font)}
        if chars:
            lacking[text] = chars
    if not lacking:
        return
    needed = set().union(*lacking.values())
    fonts = sorted({(entry.name, entry.fname) for entry in font_manager.fontManager.ttflist
                    if not entry.name.startswith('Last Resort')})  # matplotlib's: a box for every character
    covers = lambda font: len({ord(char) for char in needed} & font_charmap(font[1]).keys())
    best = max(fonts, key=covers, default=None)  # the first of equal coverage, in name order
    if best is not None and covers(best):
        for text in lacking:
            families = list(text.get_fontfamily())
            if best[0] not in families:
                text.set_fontfamily(families + [best[0]])
    unmet = sorted(needed - set(map(chr, font_charmap(best[1])))) if best is not None else sorted(needed)
    if unmet:
        warn(f"no installed font has {' '.join(unmet[:5])}{' ...' if len(unmet) > 5 else ''} (in the class or run "
             f"names): they are drawn as boxes; install a font that has them, e.g. Noto Sans CJK (apt install "
             f"fonts-noto-cjk), then delete matplotlib's font list {matplotlib.get_cachedir()}/fontlist-*.json")


def literal(text):
    """text to draw as it is: matplotlib reads what lies between two $ as mathematics, so a mistake's '$5_bill →
    $10_bill' (classes of a currency dataset) came out as 5 with a subscript b, and a run named 'x_$5_to_$10' stopped
    the figure with a parse error."""
    return text.replace('$', r'\$')


@contextlib.contextmanager
def quiet_font_search():
    """fit_fonts has said what is missing once; matplotlib would repeat it per character, and log that a fallback font
    comes in another weight ('Failed to find font weight normal for WenQuanYi Zen Hei, now using 500')."""
    logger = logging.getLogger('matplotlib.font_manager')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Glyph .* missing from font')
            yield
    finally:
        logger.setLevel(level)


_charmaps = {}


def font_charmap(path):
    """{code point: glyph} of a font file; empty for one FreeType cannot read."""
    if path not in _charmaps:
        try:
            _charmaps[path] = FT2Font(path).get_charmap()
        except (OSError, RuntimeError, ValueError):
            _charmaps[path] = {}
    return _charmaps[path]


def run_styles(count):
    """(colour, line style, marker) of each run: tab10, tab20 past 10 runs; past 20 the colours come round again with
    the next line style and marker (a continuous colour map would give neighbouring runs near-identical colours)."""
    colours = plt.get_cmap('tab10' if count <= 10 else 'tab20').colors
    styles = [('-', 'o'), ('--', 's'), (':', '^'), ('-.', 'D')]
    return [(colours[i % len(colours)], *styles[i // len(colours) % len(styles)]) for i in range(count)]


def plot_runs(runs, out):
    longest = max(len(run['history']) for run in runs)
    validated = any(run['val_epoch'] is not None for run in runs)  # val accuracy picks the epoch to report: shown
    keys = ('train_acc', 'val_acc', 'test_acc') if validated else ('train_acc', 'test_acc')
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), sharey=True, layout='constrained')
    for run, (colour, linestyle, marker) in zip(runs, run_styles(len(runs))):
        unfinished = f", {epochs_done(run)} epochs" if '/' in epochs_done(run) else ''  # its curves end early
        for ax, key in zip(axes, keys):
            rows = [row for row in run['history'] if row[key] is not None]
            ax.plot([row['epoch'] for row in rows], [row[key] for row in rows], color=colour, linestyle=linestyle,
                    marker=marker if longest <= MARKERS_UP_TO or len(rows) == 1 else None, markersize=4,
                    linewidth=1.8, label=literal(f"{run['name']} ({run['mode']}{unfinished})"))
        if run['val_epoch'] is not None:  # the number to report: test accuracy at the best val epoch
            axes[-1].plot([run['val_epoch']], [run['test_at_best_val']], marker='*', markersize=13, color=colour,
                          markeredgecolor='black', markeredgewidth=0.6, linestyle='none', zorder=3)
    titles = {'train_acc': 'train accuracy', 'val_acc': 'val accuracy',
              'test_acc': 'test accuracy (star: at the best val epoch)' if validated else 'test accuracy'}
    for ax, title in zip(axes, (titles[key] for key in keys)):
        ax.set_title(title)
        ax.set_xlabel('epoch')
        # min_n_ticks=1: with one epoch only 1 is an integer in view, and the default (2) falls back to fractions
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel('accuracy (%)')
    for ax in axes[1:]:
        ax.tick_params(labelleft=True)  # shared scale, but each panel keeps its numbers
    handles = axes[0].get_lines()  # each run's; get_legend_handles_labels leaves out labels that start with '_'
    add_legend_below(fig, handles, [line.get_label() for line in handles], panels_height=3.95)
    save_figure(fig, out)


def add_legend_below(fig, handles, labels, panels_height):
    """The legend under the panels, in as many columns as the figure's width holds; the figure's height becomes
    panels_height (inches: the panels with their titles and axis labels) plus the legend's, so the panels keep their
    size however many runs and however long their names."""
    renderer = fig.canvas.get_renderer()
    with quiet_font_search():  # measured in the default font: save_figure's fit_fonts says once what is missing
        legend = fig.legend(handles, labels, loc='outside lower center', ncol=1, frameon=False)
        entry_width = legend.get_window_extent(renderer).width  # one column: the widest entry
        spacing = legend.columnspacing * legend.prop.get_size_in_points() * fig.dpi / 72
        # no column is wider than the widest entry, so this many always fit
        columns = max(1, min(len(labels), int((fig.bbox.width + spacing) // (entry_width + spacing))))
        legend.remove()
        # matplotlib fills a legend column by column; runs read across, row by row, as the text they are
        order = [i for column in range(columns) for i in range(column, len(labels), columns)]
        legend = fig.legend([handles[i] for i in order], [labels[i] for i in order], loc='outside lower center',
                            ncol=columns, frameon=False)
        fig.set_figheight(panels_height + legend.get_window_extent(renderer).height / fig.dpi)


def cost_path(out, first_path):
    if out is None:
        return os.path.join(first_path, 'cost.png')
    stem, extension = os.path.splitext(out)
    return f"{stem}_cost{extension}"


def plot_cost(runs, out):
    """Accuracy against three costs, one point per run, coloured and shaped by mode."""
    def accuracy(run):
        return run['test_at_best_val'] if run['test_at_best_val'] is not None else run['final_acc']

    def x_of(run, key):
        value = run[key]
        if value is None or value <= 0:  # nothing to put on a log axis
            return None
        return value / 1e6 if key == 'checkpoint_bytes' else value

    panels = [('params', 'trainable parameters'), ('epoch_time_s', 'mean time per epoch (s)'),
              ('checkpoint_bytes', 'checkpoint size (MB, trainable.safetensors)')]
    order = list(MODE_STYLE)
    modes = sorted({run['mode'] for run in runs}, key=lambda m: (order.index(m) if m in order else len(order), m))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), sharey=True, layout='constrained')
    labels = []
    for ax, (key, xlabel) in zip(axes, panels):
        points = [(x_of(run, key), accuracy(run), run) for run in runs if x_of(run, key) is not None]
        for mode in modes:
            group = [(x, y, run) for x, y, run in points if run['mode'] == mode]
            if not group:
                continue
            colour, marker = MODE_STYLE.get(mode, OTHER_STYLE)
            faces = [colour if run['test_at_best_val'] is not None else 'none' for _, _, run in group]
            ax.scatter([x for x, _, _ in group], [y for _, y, _ in group], marker=marker, s=44, facecolors=faces,
                       edgecolors=colour, linewidths=1.4, label=mode, zorder=3)
        xs = [x for x, _, _ in points]
        if xs and max(xs) > 10 * min(xs):  # P beside F spans 180x in parameters; F beside P+F only 1.005x
            ax.set_xscale('log')
        if not points:
            ax.text(0.5, 0.5, 'no run has this', transform=ax.transAxes, ha='center', va='center', color='0.4')
        ax.margins(x=0.15, y=0.12)
        left, right = ax.get_xlim()
        if ax.get_xscale() == 'log' and key != 'params':  # seconds and MB read best as plain numbers, not 10^k
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if right / left < 300 else (1,)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif ax.get_xscale() == 'linear':  # a few plain ticks: no offset (+8.5e7) nor long digit strings
            # one value for every run (a sweep's parameters and checkpoint size): that value, not ticks around it
            ax.xaxis.set_major_locator(FixedLocator(xs[:1]) if len(set(xs)) == 1 else MaxNLocator(nbins=4))
            ax.xaxis.set_major_formatter(FuncFormatter(
                lambda value, _, key=key: f"{value / 1e6:.6g}M" if key == 'params' and abs(value) >= 1e6 else
                f"{value:,.6g}"))
        names_at = {}  # runs at the same point share one label, their names one under the other
        for x, y, run in points:
            names_at.setdefault((x, y), []).append(run['name'])
        for (x, y), names in names_at.items():  # in a panel's right part below-left of the point, else above-right
            where = ((math.log(x / left) / math.log(right / left)) if ax.get_xscale() == 'log' else
                     (x - left) / (right - left))
            label = ax.annotate(literal('\n'.join(names)), (x, y), xytext=(-5, -3) if where > 0.55 else (5, 3),
                                textcoords='offset points', ha='right' if where > 0.55 else 'left',
                                va='top' if where > 0.55 else 'bottom', fontsize=6.5, color='0.25')
            label.set_in_layout(False)  # fit_point_labels moves it into the axes once the layout is done
            labels.append(label)
        ax.set_xlabel(xlabel)
        ax.grid(True, which='major', alpha=0.3)
        ax.tick_params(labelleft=True)
    if axes[0].get_ylim()[1] > 101:  # margins would make room above 100%, which no accuracy reaches
        axes[0].set_ylim(top=101)
    with_val = [run['test_at_best_val'] is not None for run in runs]
    axes[0].set_ylabel('test accuracy at best val epoch (%)' if all(with_val) else
                       'final test accuracy (%)' if not any(with_val) else 'test accuracy (%)')
    handles = [Line2D([], [], linestyle='none', marker=MODE_STYLE.get(mode, OTHER_STYLE)[1], markersize=7,
                      color=MODE_STYLE.get(mode, OTHER_STYLE)[0], label=literal(mode)) for mode in modes]
    if any(with_val) and not all(with_val):
        handles += [Line2D([], [], linestyle='none', marker='o', markersize=7, color='0.3',
                           label='filled: at the best val epoch'),
                    Line2D([], [], linestyle='none', marker='o', markersize=7, color='0.3', markerfacecolor='none',
                           label='hollow: final epoch (no val split)')]
    fig.legend(handles=handles, loc='outside lower center', ncol=len(handles), frameon=False)
    with quiet_font_search():  # measured in the default font: save_figure's fit_fonts says once what is missing
        fit_point_labels(fig, labels)
    save_figure(fig, out)


def fit_point_labels(fig, labels):
    """Puts each point label (an annotation offset in points from its point) where it fits in its axes: its side of
    the point, the other side, or centred over it, else moved in from the edge; then down, or else up, off the labels
    placed before it (top to bottom) and the other points' markers. Run names are long enough to reach past a panel's
    edge (past the figure's at the outer panels), and near points would print their names over each other."""
    fig.draw_without_rendering()  # the layout, which leaves the labels out: the axes' final positions
    renderer = fig.canvas.get_renderer()
    pad = 2 * fig.dpi / 72  # pixels between a label and the axes' frame, another label or a marker
    placed = {}  # axes -> the boxes of its labels placed so far
    for label in sorted(labels, key=lambda label: -label.axes.transData.transform(label.xy)[1]):
        ax = label.axes
        frame = ax.get_window_extent(renderer)
        box = label.get_window_extent(renderer)
        if box.width > frame.width - 2 * pad:  # wider than the panel (a run named by its path): over several lines
            label.set_text(wrap_name(label.get_text(), len(label.get_text()) * (frame.width - 2 * pad) / box.width))
        (x, y), ha, va = label.xyann, label.get_ha(), label.get_va()
        other_side = ((-x, -y), 'right' if ha == 'left' else 'left', 'top' if va == 'bottom' else 'bottom')
        centred = ((0, math.copysign(5, y)), 'center', va)
        overhangs = []  # (pixels past the frame's left and right sides, place) of the places tried
        for place in ((x, y), ha, va), other_side, centred:
            box = put_label(label, place, renderer)
            overhangs.append((max(frame.x0 + pad - box.x0, 0) + max(box.x1 - frame.x1 + pad, 0), place))
            if not overhangs[-1][0]:
                break
        box = put_label(label, min(overhangs, key=lambda tried: tried[0])[1], renderer)  # else the least overhang
        dx = max(frame.x0 + pad - box.x0, 0) or min(frame.x1 - pad - box.x1, 0)
        dy = max(frame.y0 + pad - box.y0, 0) or min(frame.y1 - pad - box.y1, 0)
        box = box.translated(dx, dy)
        obstacles = placed.setdefault(ax, []) + marker_boxes(ax, fig.dpi, leaving_out=label.xy)
        for down in (True, False):
            shift = clearing_shift(box, obstacles, pad, down)
            if frame.y0 <= box.y0 + shift and box.y1 + shift <= frame.y1:
                break
        else:
            shift = 0  # no room either way: it stays, over something
        box = box.translated(0, shift)
        placed[ax].append(box)
        x, y = label.xyann
        label.xyann = (x + dx * 72 / fig.dpi, y + (dy + shift) * 72 / fig.dpi)
        point_x, point_y = ax.transData.transform(label.xy)
        nearest_x, nearest_y = min(max(point_x, box.x0), box.x1), min(max(point_y, box.y0), box.y1)  # of the label
        if math.hypot(point_x - nearest_x, point_y - nearest_y) > label.get_fontsize() * fig.dpi / 72:
            # a line from there back to its point; figure points, unlike pixels, stay put at savefig's dpi
            leader = ConnectionPatch((nearest_x * 72 / fig.dpi, nearest_y * 72 / fig.dpi), label.xy, 'figure points',
                                     'data', axesB=ax, color='0.6', linewidth=0.5, shrinkA=1, shrinkB=4)
            leader.set_in_layout(False)
            ax.add_artist(leader)


def put_label(label, place, renderer):
    """Gives label the offset and alignments of place, (offset, ha, va) -> the display box of its text."""
    label.xyann, ha, va = place
    label.set(ha=ha, va=va)
    return label.get_window_extent(renderer)


def marker_boxes(ax, dpi, leaving_out):
    """Display boxes of the scatter markers in ax but those at the data point leaving_out."""
    boxes = []
    for points in ax.collections:
        radii = np.broadcast_to(np.sqrt(points.get_sizes()) / 2 * dpi / 72, len(points.get_offsets()))
        for (x, y), point, radius in zip(ax.transData.transform(points.get_offsets()), points.get_offsets(), radii):
            if tuple(point) != tuple(leaving_out):
                boxes.append(Bbox.from_bounds(x - radius, y - radius, 2 * radius, 2 * radius))
    return boxes


def clearing_shift(box, obstacles, pad, down):
    """Pixels to move box down (negative) or up by until it is at least pad away from every one of obstacles."""
    shift = 0
    while True:
        hits = [other for other in obstacles if box.translated(0, shift).overlaps(other.padded(pad / 2))]
        if not hits:
            return shift
        shift = (min(other.y0 for other in hits) - pad - box.y1 if down else
                 max(other.y1 for other in hits) + pad - box.y0)


def wrap_name(text, characters):
    """Each line of text broken after a '/', '_' or '-' into lines of at most about `characters`."""
    lines = []
    for line in text.split('\n'):
        lines.append('')
        for piece in re.findall(r'[^/_-]*[/_-]?', line):
            if lines[-1] and len(lines[-1]) + len(piece) > characters:
                lines.append('')
            lines[-1] += piece
    return '\n'.join(lines)


# ---------------------------------------------------------------- confusion matrices


def read_confusion(path):
    """confusion.csv (header `true\\predicted,<class>,...`, then `<class>,<count>,...` per true class) ->
    (class names, counts as an int array). Raises ValueError with a one-line reason."""
    file = os.path.basename(path)
    try:
        with open(path, newline='') as f:
            rows = [row for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read {file} ({one_line(e)})")
    if not rows or len(rows[0]) < 2:
        raise ValueError(f"{file} is empty or its header names no class")
    names = rows[0][1:]
    if len(rows) - 1 != len(names):
        raise ValueError(f"{file} has {len(rows) - 1} rows for the {len(names)} classes of its header")
    counts = []
    for line, (row, name) in enumerate(zip(rows[1:], names), start=2):
        if len(row) != len(names) + 1:
            raise ValueError(f"{file} row {line} has {len(row)} columns, expected {len(names) + 1}")
        if row[0] != name:
            raise ValueError(f"{file} row {line} is class {row[0][:40]!r}, expected {name[:40]!r} "
                             f"(the header's order)")
        try:
            values = [int(cell) for cell in row[1:]]
        except ValueError:
            raise ValueError(f"{file} row {line} has a count that is not an integer")
        if min(values) < 0:
            raise ValueError(f"{file} row {line} has a negative count")
        counts.append(values)
    counts = np.array(counts, dtype=np.int64)
    if counts.sum() == 0:
        raise ValueError(f"{file} counts are all zero")
    return names, counts


def plot_confusion(name, classes, counts, out):
    save_figure(confusion_figure(name, classes, counts), out)


def confusion_figure(name, classes, counts):
    """The row-normalised heatmap of a confusion matrix (counts: rows true class, columns predicted) as a figure;
    train.py also sends it to TensorBoard."""
    counts = np.asarray(counts)
    n = len(classes)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid='ignore', divide='ignore'):
        shares = np.where(totals > 0, 100 * counts / np.maximum(totals, 1), np.nan)  # a class without images: blank
    accuracy = 100 * np.trace(counts) / counts.sum()
    side = min(18.0, 5 + 0.13 * max(0, n - 10))  # inches of matrix: 0.5 per cell at 10 classes, 0.17 at 100
    cell_pt = side / n * 72
    label_pt = min(9.0, max(5.0, 0.75 * cell_pt))
    step = max(1, math.ceil(1.15 * label_pt / cell_pt))  # label every step-th class when labels would overlap
    labelled = range(0, n, step)
    label_in = max(len(classes[i]) for i in labelled) * label_pt * 0.6 / 72 + 0.5
    fig, ax = plt.subplots(figsize=(side + label_in + 1.6, side + label_in + 0.9), layout='constrained')
    cmap = plt.get_cmap('Blues').with_extremes(bad='0.85')  # grey: a class without test images
    norm = PowerNorm(0.5, vmin=0, vmax=100)
    image = ax.imshow(shares, cmap=cmap, norm=norm, interpolation='nearest')
    if n <= ANNOTATE_UP_TO:
        text_pt = min(9.0, 0.3 * cell_pt)
        for i in range(n):
            for j in range(n):
                if not np.isnan(shares[i, j]):
                    value = shares[i, j]
                    colour = 'white' if norm(value) > 0.6 else 'black' if value > 0 else '0.65'
                    ax.text(j, i, f"{value:.0f}" if value >= 9.95 or value == 0 else f"{value:.1f}", ha='center',
                            va='center', fontsize=text_pt, color=colour)
    tick_labels = [literal(classes[i]) for i in labelled]
    ax.set_xticks(list(labelled), tick_labels, fontsize=label_pt, rotation=90 if n > 10 else 45,
                  ha='center' if n > 10 else 'right', rotation_mode='default' if n > 10 else 'anchor')
    ax.set_yticks(list(labelled), tick_labels, fontsize=label_pt)
    ax.tick_params(length=2)
    text_size = 11 if n <= ANNOTATE_UP_TO else 14  # the big figure is viewed from further away
    ax.set_xlabel('predicted class', fontsize=text_size)
    ax.set_ylabel('true class', fontsize=text_size)
    ax.set_title(f"{literal(name)}: {accuracy:.2f}% accuracy on {counts.sum():,} test images\n"
                 f"each row (true class) normalised to 100%", fontsize=text_size + 1)
    bar = fig.colorbar(image, ax=ax, shrink=0.8 if n > ANNOTATE_UP_TO else 1.0, pad=0.02)
    bar.set_ticks([0, 1, 5, 10, 25, 50, 75, 100])
    bar.set_label('% of the true class (square-root colour scale)', fontsize=text_size)
    return fig


def evaluated_files(run_dir, stem, out):
    """The <stem>.csv files (confusion, test_predictions) that the run and main.py --eval_only wrote, to draw, each
    with the checkpoint it describes: [(path, 'last' | 'best' | N)]. <stem>.csv is the last epoch's; a run that has not
    finished has none, and the newest <stem>_epoch<N>.csv (its last checkpoint's) stands in for it. <stem>_best.csv
    (--checkpoint best: the best val epoch, whose test accuracy is the number to report) comes too, but not with --out,
    which takes one figure: the last epoch's where there is one."""
    found = []
    if os.path.exists(os.path.join(run_dir, f'{stem}.csv')):
        found.append((os.path.join(run_dir, f'{stem}.csv'), 'last'))
    else:
        try:
            names = os.listdir(run_dir)
        except OSError as e:  # entered but not listed (mode 711), or moved away meanwhile (sweep.py's set-aside/)
            warn(f"run {run_dir}: cannot list it ({one_line(e)}) to look for its {stem}_epoch<N>.csv")
            names = []
        epochs = sorted(int(match[1]) for match in map(re.compile(rf'{stem}_epoch(\d+)\.csv$').match, names) if match)
        if epochs:
            found.append((os.path.join(run_dir, f'{stem}_epoch{epochs[-1]}.csv'), epochs[-1]))
    best = os.path.join(run_dir, f'{stem}_best.csv')
    if os.path.exists(best) and (out is None or not found):
        found.append((best, 'best'))
    return found


def draw_confusions(run_dirs, paths, out):
    if out is not None and len(run_dirs) > 1:
        error(f"--out names one file but {len(run_dirs)} runs were found under {', '.join(paths)}; drop --out to "
              f"write confusion.png into each run directory")
    runs = [dict(dir=run_dir, name=run_name(run_dir)) for run_dir in run_dirs]
    label_runs(runs)
    drawn = 0
    for run in runs:
        matrices = evaluated_files(run['dir'], 'confusion', out)
        if not matrices:
            warn(f"run {run['dir']}: no confusion.csv (it is written after the last epoch; for an unfinished run "
                 f"python main.py --eval_only --resume {run['dir']} writes its last checkpoint's)")
        for path, which in matrices:
            if which == 'best':
                epoch = read_summary(run['dir']).get('best_val_epoch')  # best.safetensors', which --eval_only read
                title = f"{run['name']}, best val epoch" + (f" {epoch}" if isinstance(epoch, int) else '')
            elif which == 'last':  # named: a resume that trains on keeps this figure as confusion_epoch<N>.png
                summary = read_summary(run['dir'])
                epoch = count(summary.get('final_epoch')) if summary.get('finished') is True else None
                title = run['name'] + (f", last epoch {epoch}" if epoch is not None else '')
            else:
                title = f"{run['name']}, epoch {which} (unfinished)"
            try:
                classes, counts = read_confusion(path)
            except ValueError as e:  # its reason names the file
                warn(f"skipping run {run['dir']}: {e}")
                continue
            target = out or os.path.join(run['dir'], os.path.basename(path)[:-len('.csv')] + '.png')
            if out is None and kept_as_it_is(run['dir'], target):
                continue
            plot_confusion(title, classes, counts, target)
            print(f"wrote {shown(target)}")
            drawn += 1
    if not drawn:
        error(f"no confusion matrix to draw under {', '.join(paths)}: see the warnings above")


# ---------------------------------------------------------------- mistakes


def read_predictions(path):
    """test_predictions.csv (image,label,prediction,probability,correct,checkpoint,epoch) -> its
    rows as dicts, probability a float and correct a bool. Raises ValueError with a one-line reason."""
    file = os.path.basename(path)
    try:
        with open(path, newline='', encoding='utf-8') as f:
            rows = [row for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read {file} ({one_line(e)})")
    if not rows:
        raise ValueError(f"{file} is empty")
    header = rows[0]
    missing = [key for key in PREDICTIONS_HEADER if key not in header]
    if missing:
        raise ValueError(f"{file} header is {','.join(header)[:80]!r}, it lacks {','.join(missing)}")
    if len(rows) == 1:
        raise ValueError(f"{file} has only the header (no test image)")
    predictions = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{file} row {line} has {len(row)} columns, expected {len(header)}")
        cells = dict(zip(header, row))
        try:
            cells['probability'] = float(cells['probability'])
        except ValueError:
            raise ValueError(f"{file} row {line} has a non-numeric probability {cells['probability'][:20]!r}")
        if not 0 <= cells['probability'] <= 1:  # nan too
            raise ValueError(f"{file} row {line} has probability {cells['probability']}, not one in [0, 1]")
        if cells['correct'] not in ('0', '1'):
            raise ValueError(f"{file} row {line} has correct={cells['correct'][:20]!r}, expected 0 or 1")
        cells['correct'] = cells['correct'] == '1'
        predictions.append(cells)
    return predictions


def tile_reader(run_dir):
    """-> (a function reading one of the run's test images, as test_predictions.csv names it, into a tile: uint8
    (H, W, 3), how a name is shown: '#' before a CIFAR index); or None after a warning naming where it looked."""
    try:
        config = read_config(os.path.join(run_dir, 'config.json')) or {}
    except ValueError as e:
        warn(f"skipping run {run_dir}: {e}")
        return None
    dataset, data_dir = config.get('dataset'), config.get('data_dir')
    # a main.py before 2026-11-25 recorded the paths as typed: relative to the folder the run was started in
    relative = lambda path: '' if os.path.isabs(path) else (f"; {path} is relative to the folder the run was started "
                                                            f"in: run plot.py from there")
    if isinstance(dataset, str) and dataset in CIFAR_TEST_FILES:  # a hand-edited list or {} is not hashable
        path = os.path.join(str(data_dir), *CIFAR_TEST_FILES[dataset])
        try:
            images = cifar_test_images(path)
        except FileNotFoundError:
            warn(f"skipping run {run_dir}: no {dataset} test set at {path} (config.json's data_dir); if it moved, link "
                 f"the old path to it (ln -s NEW_PATH {data_dir}){relative(str(data_dir))}")
            return None
        except Exception as e:  # not the pickle torchvision extracts: unpickling raises what it meets
            warn(f"skipping run {run_dir}: cannot read {dataset}'s test images from {path} ({type(e).__name__}: "
                 f"{one_line(e)})")
            return None

        def read(name):
            index = int(name)  # ValueError for a name that is no index: that tile is left out
            if not 0 <= index < len(images):
                raise IndexError(f"{dataset}'s test set has {len(images)} images")
            return images[index]
        return read, '#'
    if not isinstance(dataset, str) or not dataset:
        warn(f"skipping run {run_dir}: its config.json does not say which dataset it was tested on (no 'dataset')")
        return None
    if not os.path.isdir(dataset):
        warn(f"skipping run {run_dir}: its dataset folder {dataset} (config.json's dataset) is gone, so its test "
             f"images cannot be shown; if it moved, link the old path to it (ln -s NEW_PATH {dataset})"
             + relative(dataset))
        return None
    return (lambda name: read_tile(dataset_file(dataset, name))), ''


def cifar_test_images(path):
    """torchvision's CIFAR test set as uint8 (N, 32, 32, 3) in its order, from the pickle it extracts (rows of 3072:
    the red plane, the green, the blue); torchvision itself would import torch."""
    with open(path, 'rb') as f:
        batch = pickle.load(f, encoding='latin1')  # as torchvision reads it: the Python 2 file's keys come out as str
    pixels = batch['data'] if 'data' in batch else batch[b'data']  # b'data': bytes keys, as the CIFAR page reads it
    return np.asarray(pixels, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def dataset_file(root, name):
    """The file a test_predictions.csv name stands for: as written or, for a name whose bytes were not UTF-8 (the
    CSV has them as \\xNN, train.utf8_text), with those bytes back."""
    path = os.path.join(root, name)
    if '\\x' not in name or os.path.lexists(path):
        return path
    return os.path.join(root, os.fsdecode(re.sub(rb'\\x([0-9a-f]{2})', lambda hex: bytes([int(hex[1], 16)]),
                                                 name.encode())))


def read_tile(path):
    """An image file, upright as its EXIF orientation says (as a viewer shows it), at most TILE_PIXELS on a side."""
    if not os.path.isfile(path):  # missing, or a FIFO, which would block open()
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.stat(path)  # in a folder the user may not enter: said as Permission denied, not as missing
        raise FileNotFoundError(f"no file {path}")
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # a phone's 200 MP photo: no bomb here
        with Image.open(path) as image:
            image.draft('RGB', (2 * TILE_PIXELS, 2 * TILE_PIXELS))  # a large JPEG decoded at 1/2 to 1/8 scale: fast
            image = ImageOps.exif_transpose(image)
    if image.mode.startswith('I'):  # 16-bit grey (PNG): convert('RGB') would clip every value above 255 to white
        image = Image.fromarray((np.asarray(image).clip(0, 65535) >> 8).astype(np.uint8))
    image = image.convert('RGB')
    image.thumbnail((TILE_PIXELS, TILE_PIXELS))
    return np.asarray(image)


def mistakes_figure(title, tiles):
    """tiles: (image, caption, name) each -> a grid of the images, each captioned above and named below."""
    columns = min(MISTAKE_COLUMNS, math.ceil(math.sqrt(len(tiles))))
    rows = math.ceil(len(tiles) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(7.0, 2.3 * columns), 2.7 * rows + 0.7), squeeze=False,
                             layout='constrained')
    for ax, (image, caption, name) in zip(axes.flat, tiles):
        # CIFAR's 32 px as sharp squares; a thumbnail near the tile's size smoothed
        ax.imshow(image, interpolation='nearest' if max(image.shape[:2]) <= 64 else 'antialiased')
        ax.set_title(literal(caption), fontsize=8)
        ax.set_xlabel(literal(wrap_name(name, 40)), fontsize=6, color='0.35')
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(tiles):]:
        ax.remove()
    fig.suptitle(literal(title), fontsize=11)
    return fig


def mistake_caption(row):
    """'true → predicted' over the probability; the classes on two lines or more where one would overrun the tile."""
    between = ' → ' if len(row['label']) + len(row['prediction']) <= 30 else ' →\n'
    return (f"{wrap_name(row['label'], 32)}{between}{wrap_name(row['prediction'], 32)}\n"
            f"probability {row['probability']:.4f}")


def draw_mistakes(run_dirs, paths, out, count):
    if out is not None and len(run_dirs) > 1:
        error(f"--out names one file but {len(run_dirs)} runs were found under {', '.join(paths)}; drop --out to "
              f"write mistakes.png into each run directory")
    runs = [dict(dir=run_dir, name=run_name(run_dir)) for run_dir in run_dirs]
    label_runs(runs)
    drawn = flawless = 0
    for run in runs:
        files = evaluated_files(run['dir'], 'test_predictions', out)
        if not files:
            warn(f"run {run['dir']}: no test_predictions.csv (a run writes it as it finishes); python main.py "
                 f"--eval_only --resume {run['dir']} writes one for its checkpoint (with --checkpoint best, "
                 f"test_predictions_best.csv)")
        reader = None
        for path, which in files:
            file = os.path.basename(path)
            target = out or os.path.join(run['dir'], 'mistakes' + file[len('test_predictions'):-len('.csv')] + '.png')
            if out is None and kept_as_it_is(run['dir'], target):
                continue
            try:
                predictions = read_predictions(path)
            except ValueError as e:  # its reason names the file
                warn(f"skipping run {run['dir']}: {e}")
                continue
            wrong = [row for row in predictions if not row['correct']]
            if not wrong:
                warn(f"run {run['dir']}: no mistakes in {file}: all {len(predictions):,} test images right")
                flawless += 1
                continue
            reader = reader or tile_reader(run['dir'])
            if reader is None:  # said why; the run's other file would say it again
                break
            read, prefix = reader
            chosen = sorted(wrong, key=lambda row: -row['probability'])[:count]  # sorted() keeps ties in CSV order
            tiles, unread = [], []
            for row in chosen:
                try:
                    image = read(row['image'])
                except Exception as e:  # Pillow raises OSError, ValueError, DecompressionBombError...
                    unread.append(f"{row['image']} ({one_line(e)})")
                    continue
                tiles.append((image, mistake_caption(row), prefix + row['image']))
            if unread:
                warn(f"run {run['dir']}: {len(unread)} of the {len(chosen)} images to draw from {file} cannot be read, "
                     f"left out: {'; '.join(unread[:3])}{f' and {len(unread) - 3} more' if len(unread) > 3 else ''}")
            if not tiles:
                continue
            left_out = f", {len(unread)} unreadable left out" if unread else ''
            title = (f"{run['name']}, {predictions[0]['checkpoint']} checkpoint (epoch {predictions[0]['epoch']}"
                     f"{', unfinished' if isinstance(which, int) else ''}): {len(wrong):,} of {len(predictions):,} "
                     f"test images wrong ({100 * len(wrong) / len(predictions):.1f}%)\n"
                     f"the {len(chosen)} most confident mistakes{left_out}: true → predicted class, the prediction's "
                     f"probability")
            save_figure(mistakes_figure(title, tiles), target)
            print(f"wrote {shown(target)}")
            drawn += 1
    if not drawn and not flawless:
        error(f"no mistakes to draw under {', '.join(paths)}: see the warnings above")


def drawn_by_plot(path, matplotlib_too=False):
    """Whether the file at path is a figure plot.py marked (with matplotlib_too: or one matplotlib wrote)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(1 << 16)
            f.seek(max(0, os.path.getsize(path) - (1 << 16)))
            tail = f.read()
    except OSError:
        return False
    return MARK.encode() in head + tail or matplotlib_too and b'Matplotlib' in head + tail  # PNG/SVG/PS start, PDF end


def kept_as_it_is(run_dir, target):
    """A run's own figure (confusion.png, mistakes.png) is redrawn in place unless a file of another program has its
    name: that one is kept, with a warning. So is a run whose figure cannot be written (another user's run in a shared
    logs/, a directory of that name): a failed write would stop plot.py, and the runs after it would not be drawn."""
    folder = os.path.dirname(target)
    unwritable = ('a directory has its name' if os.path.isdir(target) else
                  'a link to a missing file has its name' if os.path.islink(target) and not os.path.exists(target) else
                  f'no write permission in {folder}' if not os.access(folder, os.W_OK) else
                  'no write permission for it' if os.path.isfile(target) and not os.access(target, os.W_OK) else None)
    if unwritable:
        warn(f"skipping run {run_dir}: cannot write {os.path.basename(target)} there ({unwritable}); pass --out FILE "
             f"with this run alone to draw it elsewhere")
        return True
    if not os.path.isfile(target) or drawn_by_plot(target, matplotlib_too=True):
        return False
    warn(f"run {run_dir}: {os.path.basename(target)} there is not a figure plot.py (or matplotlib) wrote, so it is "
         f"left as it is: move it away to draw it, or pass --out FILE with this run alone")
    return True


def check_replaceable(out, default=False):
    """--out names a file of its own: one there already is replaced only if plot.py wrote it (a redrawn figure), never
    a photo or a figure of the user's own. The default <first PATH>/accuracy.png and cost.png are redrawn in place:
    there a figure that matplotlib wrote (plot.py's own from before it marked them) is replaced too, but not a file
    of another program (a photo, an image of a dataset passed as PATH) that happens to have that name."""
    if os.path.isdir(out):
        if default:
            error(f"{out} is a directory, where plot.py writes its figure; pass --out FILE")
        error(f"--out {out} is a directory; pass a file name such as {os.path.join(out, 'accuracy.png')}")
    # a new file: save_figure makes the missing folders, which a file or another user's folder on the way stops
    blocked = not os.path.lexists(out) and not_creatable(os.path.dirname(os.path.abspath(out)))
    if blocked:
        error(f"cannot write {out} ({blocked}); "
              + ("pass --out FILE to write the figure elsewhere" if default else "choose another --out"))
    if os.path.islink(out) and not os.path.exists(out):  # savefig would make the file it names, or fail once drawn
        error(f"{out} is a link to a missing file ({os.readlink(out)}) and plot.py writes no new figure through a "
              f"link: " + ("pass --out FILE to write the figure elsewhere" if default else "choose another --out")
              + ", or remove the link first")
    if not os.path.isfile(out):  # nothing there, or /dev/null, a pipe: nothing to lose, and a pipe is not to be read
        return
    marked = drawn_by_plot(out, matplotlib_too=default)
    if not marked and default:
        error(f"{out} exists and is not a figure plot.py (or matplotlib) wrote, so it is not redrawn in place: pass "
              f"--out FILE to write the figure elsewhere, or move that file away first")
    if not marked:
        error(f"{out} exists and is not a figure plot.py wrote (--out replaces only plot.py's own .png, .pdf, .svg, "
              f".ps and .eps figures, and those written since it marks them): choose another --out, or remove that "
              f"file first")


# ---------------------------------------------------------------- main


def mistakes_count(text):
    try:
        count = int(text)
    except ValueError:
        if os.path.exists(os.path.expanduser(text)):  # a PATH after a bare --mistakes is taken for its N
            raise argparse.ArgumentTypeError(f"N is how many images to draw, got the path {text!r}; for the default "
                                             f"{MISTAKES_SHOWN}, put --mistakes after the PATHs: python plot.py PATH "
                                             f"--mistakes")
        raise argparse.ArgumentTypeError(f"N is how many images to draw, a whole number, got {text!r}")
    if count < 1:
        raise argparse.ArgumentTypeError(f"N is how many images to draw, at least 1, got {count}")
    if count > MISTAKES_MOST:
        raise argparse.ArgumentTypeError(f"N is how many images to draw, at most {MISTAKES_MOST} (a larger grid takes "
                                         f"minutes to draw and is too small to read), got {count}; every mistake is a "
                                         f"row of test_predictions.csv (correct 0)")
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', type=os.path.expanduser, nargs='+', metavar='PATH',
                        help='run directories or directories of runs (logs/)')
    parser.add_argument('--out', type=os.path.expanduser, default=None, metavar='FILE',
                        help='figure to write (default: <first PATH>/accuracy.png; .pdf/.svg also work)')
    what = parser.add_mutually_exclusive_group()
    what.add_argument('--cost', action='store_true',
                      help='also write cost.png (next to the accuracy figure): accuracy against trainable '
                           'parameters, time per epoch and checkpoint size')
    what.add_argument('--confusion', action='store_true',
                      help="only draw each run's confusion.csv as <run>/confusion.png, and its confusion_best.csv if "
                           "any (--out: one run, one figure)")
    what.add_argument('--mistakes', type=mistakes_count, nargs='?', const=MISTAKES_SHOWN, metavar='N',
                      help=f"only draw the N test images (default {MISTAKES_SHOWN}, at most {MISTAKES_MOST}) each run "
                           f"got most confidently "
                           f"wrong, from its test_predictions.csv, as <run>/mistakes.png, "
                           f"and from its test_predictions_best.csv if any (--out: one run, one figure)")
    parser.error = lambda message: error(f"{message}{flag_hint(parser, message)} (python plot.py --help for usage)")
    args = parser.parse_intermixed_args(argv)  # PATHs also after an option: plot.py logs/ --cost more_logs/

    if args.out is not None:  # before any work; the cost figure's name comes from it too
        for path in [args.out] + [cost_path(args.out, None)] * args.cost:
            check_replaceable(path)
    run_dirs = find_run_dirs(args.paths)
    if args.confusion:
        draw_confusions(run_dirs, args.paths, args.out)
        return
    if args.mistakes is not None:
        draw_mistakes(run_dirs, args.paths, args.out, args.mistakes)
        return
    runs = [run for run in map(load_run, run_dirs) if run is not None]
    if not runs:
        error(f"no runs found under {', '.join(args.paths)} (a run directory holds metrics.csv): every run was "
              f"skipped, see the warnings above")
    if args.out is None:  # the default figures, in the first PATH: not over a file of another program either
        for path in [os.path.join(args.paths[0], 'accuracy.png')] + [cost_path(None, args.paths[0])] * args.cost:
            check_replaceable(path, default=True)
    label_runs(runs)
    warn_other_test_sets(runs)
    out = args.out or os.path.join(args.paths[0], 'accuracy.png')
    plot_runs(runs, out)
    written = [out]
    if args.cost:
        written.append(cost_path(args.out, args.paths[0]))
        plot_cost(runs, written[-1])
    print_table(runs)
    for path in written:
        print(f"wrote {shown(path)}")


if __name__ == '__main__':
    try:
        main()
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes stdout
        sys.exit(1)
