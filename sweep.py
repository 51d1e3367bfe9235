"""Hyperparameter sweep over main.py: a grid scored on a val split, then the winner again with fresh seeds.

    python sweep.py --grid lr=1e-3,5e-3,1e-2 weight_decay=0,1e-4 --seeds 3 --val_split 0.1 -- --full False --prompts 50
    python sweep.py ... --gpus 0,1,2,3               # one trial per GPU at a time on this machine
    python sweep.py ... --print_commands             # only print the main.py commands, for SLURM, GNU parallel, ...
    python sweep.py --collect logs/sweep-1a2b3c4d    # sweep.csv and sweep.md from whatever runs exist there
    python sweep.py --compare logs/sweep_P logs/sweep_F  # one row per sweep: P against F, mean ± std each

Stage 1 trains every grid point (any main.py flag; values separated by commas, \\, for a comma inside one; --grid
may be repeated) with the base seed (the --seed given after --, default 0) on the training set minus a
class-stratified --val_split, and scores it by its best val accuracy (the first of equal scores, in grid order,
wins); main.py's --data_seed, not --seed, picks the val images, so
every trial and seed holds out the same ones. Stage 2 trains the winner again with the fresh seeds
base+1 .. base+N (--seeds N). Each seed keeps the val split and uses it only to choose its checkpoint epoch: the
number a seed reports is its test accuracy at its best val epoch (test_acc_at_best_val). The result is the mean and
sample standard deviation (n-1) of those numbers, with min, max and n; the final-epoch test accuracy is given too.
The stage-1 winner is not one of the N: it won because its val score was the highest of the grid, which makes it an
optimistic draw of its own configuration; the fresh seeds are selected on nothing, so their mean is not. Test
accuracy plays no part in any choice.

Everything goes to --log_dir/<name> (default logs/sweep-<8 hex digits hashed from the grid, seeds, val split and
main.py flags as typed, so the same command finds the same sweep again; the same settings typed otherwise are
refused with the sweep's own command, unless --name asks for a second one): one run directory per trial
(grid_lr=1e-3_..., final_seed=1, ...), logs/<run>.log with each trial's output, sweep.json (the definition),
sweep.csv (one row per run), sweep.md (the report, also printed at the end) and sweep.log (what the sweep did,
when).

Re-launching the same command skips finished runs, resumes interrupted ones (main.py --resume), retries failed ones,
and moves a run directory without a checkpoint aside to <run>.failed-N before starting it afresh. A trial started on
data that differ from what the sweep's runs read (classes, image counts) stops the sweep and moves, with its log, to
set-aside/<run>.other-data-N. A run that stopped on a non-finite loss (main.py's exit status 3) is 'diverged': a
result of its settings, ranked last, left out of the seeds' mean (the report counts it) and not retried (its
summary.json says so, wherever it ran). A final run that trained another grid point than the winner (a failed grid
run, retried, won) is 'stale': not counted, and the sweep stops until it is moved aside; so is any run resumed by hand
with another --epoch or --amp (RESUMABLE_SETTINGS). Ctrl-C or SIGTERM reaches
the running trials, which keep their last finished epoch; the sweep writes its report, prints the command to
re-launch and exits 130 / 143. Exit status 1 when a run failed (the others still run; stage 2 runs if at least one
grid point finished; but two trials that failed with the same last line on one GPU (or the one slot) before their
first checkpoint, as all do when the data cannot be downloaded, stop further trials from starting there).
--print_commands prints stage 1's commands, or stage 2's once stage 1 has finished there.
"""
import os
import signal
import sys


def stop_at_once(signum, frame):
    """SIGINT/SIGTERM while Python imports the modules below (main.py's too), before run_cli() takes the signals over:
    nothing is written yet, so the process ends here, in run_cli()'s one line and exit status. It was a
    KeyboardInterrupt traceback, or a kill without a word."""
    for each in (signal.SIGINT, signal.SIGTERM):  # a terminal's Ctrl-C reaches the whole group: one line, not two
        signal.signal(each, lambda signum, frame: None)
    print(f"sweep.py: error: {signal.Signals(signum).name}: stopped before any trial started; run the same command "
          f"again to go on", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if __name__ == '__main__':  # before the imports below
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, stop_at_once)

import argparse
import contextlib
import csv
import datetime
import difflib
import hashlib
import io
import itertools
import json
import re
import shlex
import statistics
import subprocess
import time

import main as vpt  # argparse and the standard library only: main.py imports torch inside main()

MAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'main.py')
FOLDER_READING = 6  # data.FOLDER_READING, repeated: sweep.py stays free of torch (a test keeps them equal)
# main.py flags the sweep sets itself, and the fix to tell a user who sets one; --seed after -- is the base seed
CONTROLLED = {
    'seed': "sweep.py sets the seeds: stage 1 uses the --seed given after -- (default 0), stage 2 the next --seeds N",
    'val_split': "pass --val_split to sweep.py itself (before --): every trial uses the same split",
    'log_dir': "pass --log_dir to sweep.py itself (before --): runs go to <log_dir>/<sweep name>/<run>",
    'name': "pass --name to sweep.py itself (before --): it names the sweep; sweep.py names the runs",
    'resume': "sweep.py resumes its runs itself: re-launch the same sweep command",
    'eval_only': "sweep.py only trains; evaluate a run afterwards with python main.py --eval_only --resume RUN_DIR",
    'predict': "sweep.py only trains; classify images afterwards with python main.py --predict ... --resume RUN_DIR",
    'checkpoint': "sweep.py only trains; --checkpoint goes with main.py --eval_only/--predict --resume RUN_DIR",
    'out': "sweep.py only trains; --out goes with main.py --predict --resume RUN_DIR",
}

# flags that choose the images: the grid points must be scored on one val split, so they go after -- (every trial)
SAME_DATA = ('dataset', 'data_dir', 'data_seed', 'train_samples', 'test_samples', 'test_split')

# main.py's exits after a signal, or a child killed by one before it set its handlers (during its imports)
INTERRUPTED = {130, 143, -signal.SIGINT, -signal.SIGTERM}
DIVERGED = vpt.EXIT_DIVERGED  # main.py's exit after a non-finite loss: a result of the settings, not retried
# main.py flags a --resume may change (main.RESUME_MAY_CHANGE) that change what a run trains: a run resumed by hand with
# another value is not its trial any more
RESUMABLE_SETTINGS = ('epoch', 'amp')
RESULT_COLUMNS = ['status', 'epochs_done', 'epochs', 'best_val_acc', 'best_val_epoch', 'test_acc_at_best_val',
                  'final_test_acc', 'exit_code', 'message']
ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')  # tqdm's cursor moves in a log file
STOP = []  # the first SIGINT/SIGTERM the sweep received
CHILDREN = {}  # run name -> its running process, so that a signal reaches it


def fail(message, code=1):
    """A user mistake: one line on stderr, a non-zero exit, no traceback."""
    print(f"sweep.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def make_parser():
    parser = argparse.ArgumentParser(  # no abbreviations: --seed (main.py's) must not pass for --seeds
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        usage="python sweep.py --grid FLAG=V1,V2,... [FLAG=...] --val_split F [--seeds N] [options] -- [main.py flags]"
              "\n       python sweep.py --collect SWEEP_DIR\n       python sweep.py --compare SWEEP_DIR [SWEEP_DIR ...]")
    add = parser.add_argument
    add('--grid', nargs='+', action='extend', default=[], metavar='FLAG=V1,V2',
        help='main.py flags to sweep and their values, e.g. lr=1e-3,5e-3 weight_decay=0,1e-4 (every combination); '
             r"a comma inside a value is written \, as in unfreeze='pos_embed,cls_token\,pos_embed'")
    add('--seeds', type=int, default=3, help='stage 2: fresh seeds for the winning grid point (default 3)')
    add('--val_split', type=float, default=None,
        help='required, in (0, 1): the fraction of the training set every trial holds out to be scored on')
    add('--log_dir', type=os.path.expanduser, default='logs', help='parent of the sweep directory (default logs/)')
    add('--name', default=None, help='sweep directory name (default sweep-<hash of the definition>)')
    add('--gpus', default=None, metavar='IDS',
        help='e.g. 0,1,2,3: one trial per GPU at a time (CUDA_VISIBLE_DEVICES, and --device cuda unless the '
             'main.py flags set --device); default: one trial at a time, in this environment')
    add('--print_commands', action='store_true',
        help="print the main.py command of every trial still to run (stage 1, or stage 2 once stage 1 has "
             "finished), one per line, and run nothing")
    add('--collect', type=os.path.expanduser, default=None, metavar='SWEEP_DIR',
        help='write sweep.csv and sweep.md from the runs in SWEEP_DIR, running nothing')
    add('--compare', type=os.path.expanduser, nargs='+', default=None, metavar='SWEEP_DIR',
        help="print one markdown table of several sweeps' results (a sweep per method: P, F, P+F, linear), "
             "running and writing nothing")

    def error(message):  # one line, no usage dump
        fail(f"{message}{vpt.flag_hint(parser, message)} (python sweep.py --help; main.py flags go after --)", 2)
    parser.error = error
    return parser


def read_json(path):
    """The JSON object in the file at path; None if it cannot be read or holds no object (a damaged or hand-edited
    summary.json of "x" or [1]: every caller reads its keys)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def write_atomic(path, text):
    """Readers (and a crash) see the old file or the new one, never half of one; a failed write leaves no temp file."""
    temp = f"{path}.tmp{os.getpid()}"
    try:
        with open(temp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise


# ---------------------------------------------------------------- the definition, checked before anything runs


def given_main_flags(argv):
    """{flag: value} for the main.py flags typed in argv, abbreviations resolved as main.py resolves them."""
    parser = vpt.make_parser()
    ours = set(make_parser()._option_string_actions) - set(parser._option_string_actions)
    for arg in argv:
        if arg.split('=')[0] in ours:
            fail(f"{arg.split('=')[0]} is sweep.py's own flag: put it before the --, which starts main.py's flags", 2)
    for action in parser._actions:
        action.default = argparse.SUPPRESS

    def error(message):
        raise ValueError(message)
    parser.error = error
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return vars(parser.parse_args(argv))
    except ValueError as e:
        fail(f"main.py flags after --: {e}{vpt.flag_hint(parser, str(e))} (python main.py --help lists them)", 2)
    except SystemExit:  # -h
        fail("main.py flags after --: python main.py --help lists them", 2)


def check_trial(argv, label):
    """main.py's own parsing and checks of a trial's flags -> its resolved flags; one line naming the trial if not."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            return vpt.parse_args(argv)
    except SystemExit as e:
        lines = (e.code if isinstance(e.code, str) else errors.getvalue()).strip().splitlines() or ['rejected']
        fail(f"{label}: {lines[-1].removeprefix('main.py: ').removeprefix('error: ')}", 2)


def parse_grid(entries, given):
    """['lr=1e-3,5e-3', ...] -> {'lr': ['1e-3', '5e-3'], ...}, checked against main.py's flags."""
    flags = [option[2:] for action in vpt.make_parser()._actions for option in action.option_strings
             if option.startswith('--') and option != '--help']
    grid = {}
    for entry in entries:
        flag, equals, values = entry.partition('=')
        flag = flag.removeprefix('--')
        if not equals or not flag or not values:
            fail(f"--grid {entry!r}: write FLAG=V1,V2,... such as lr=1e-3,5e-3", 2)
        if flag not in flags:
            close = difflib.get_close_matches(flag, flags, 1)
            fail(f"--grid {entry!r}: main.py has no flag --{flag}"
                 + (f"; did you mean {close[0]}?" if close else " (python main.py --help lists them)"), 2)
        if flag in CONTROLLED:
            fail(f"--grid {entry!r}: {CONTROLLED[flag]}", 2)
        if flag in SAME_DATA:
            fail(f"--grid {entry!r}: --{flag} chooses the images, and the grid points must be ranked on the same val "
                 f"images; pass one --{flag} after -- (a sweep per value, to compare them)", 2)
        if flag in given:
            fail(f"--{flag} is both in --grid and after --; keep one of them", 2)
        if flag in grid:
            fail(f"--grid names {flag} twice; give all its values in one entry, {flag}=V1,V2,...", 2)
        values = [value.strip().replace('\\,', ',') for value in re.split(r'(?<!\\),', values)]
        if '' in values:
            fail(f"--grid {entry!r}: an empty value; list values separated by commas", 2)
        typed = [typed_value(flag, value) for value in values]  # as main.py reads them: 1e-3 and 0.001 are one
        if len(set(typed)) < len(typed):
            fail(f"--grid {entry!r}: a repeated value (main.py reads two of them alike); list distinct values", 2)
        grid[flag] = values
    return grid


def typed_value(flag, value):
    """`value` as main.py's parser reads it for --flag (the text itself when main.py rejects it: check_trial says so)."""
    parser = vpt.make_parser()

    def error(message):
        raise ValueError(message)
    parser.error = error
    try:
        return repr(getattr(parser.parse_known_args([f"--{flag}={value}"])[0], flag))
    except ValueError:
        return value


def check_command_line(args, passthrough):
    """-> (definition, base seed, whether the main.py flags set --device, the --model names to check). Exits with
    one line on a mistake."""
    if not args.grid:
        fail("--grid is required: the main.py flags to sweep, e.g. --grid lr=1e-3,5e-3 weight_decay=0,1e-4", 2)
    given = given_main_flags(passthrough)  # first: a --val_split typed after -- is misplaced, not missing
    for flag in sorted(set(given) & set(CONTROLLED) - {'seed'}):
        fail(f"--{flag} after --: {CONTROLLED[flag]}", 2)
    if args.val_split is None or not 0 < args.val_split < 1:
        fail("--val_split F with 0 < F < 1 is required: the grid is scored on that held-out part of the training "
             "set, never on the test set (e.g. --val_split 0.1)", 2)
    if args.seeds < 1:
        fail(f"--seeds {args.seeds}: stage 2 needs at least 1 seed (2 or more give a standard deviation)", 2)
    if args.name is not None and (not args.name or os.sep in args.name or args.name in ('.', '..')):
        fail(f"--name {args.name!r} must be a plain directory name; put the parent in --log_dir", 2)
    if args.gpus is not None:
        gpus = args.gpus.split(',')
        if '' in gpus or len(set(gpus)) < len(gpus) or any(' ' in gpu for gpu in gpus):
            fail(f"--gpus {args.gpus!r}: list distinct GPU ids separated by commas, e.g. --gpus 0,1,2,3", 2)
        if args.print_commands:
            fail("--print_commands leaves GPUs to your scheduler; drop --gpus", 2)
    definition = dict(grid=parse_grid(args.grid, given), seeds=args.seeds, val_split=args.val_split,
                      main_flags=passthrough)
    base_seed = given.get('seed', vpt.make_parser().get_default('seed'))
    if base_seed + args.seeds > vpt.SEED_MAX:
        fail(f"--seed {base_seed} after -- leaves no room for stage 2's seeds {base_seed + 1}..{base_seed + args.seeds}"
             f" (main.py takes at most {vpt.SEED_MAX}); pass a smaller --seed", 2)
    dataset = given.get('dataset')
    if dataset not in (None, *vpt.CIFAR) and not os.path.isdir(dataset):  # a re-launch after the folder moved?
        sweep_dir = os.path.join(args.log_dir, args.name or sweep_name(definition))
        if os.path.isfile(os.path.join(sweep_dir, 'sweep.json')):  # --dataset NEW_PATH would be another sweep
            old = os.path.abspath(dataset)
            fail(f"the dataset folder of {sweep_dir}, {old}, is gone; if it moved, link the old path to it (ln -s "
                 f"NEW_PATH {shlex.quote(old)}) and re-launch the same command"
                 + ('' if os.path.isabs(dataset) else ", from the directory the sweep was started in"))
    models = set()
    for trial in grid_trials(definition, base_seed, os.path.join(args.log_dir, 'sweep')):
        models.add(check_trial(trial['argv'], f"grid point {' '.join(f'{k}={v}' for k, v in trial['values'].items())}")
                   .model)
    models = sorted(models) if 'model' in given or 'model' in definition['grid'] else []  # the default needs none
    device_given = 'device' in given or 'device' in definition['grid']
    if args.gpus is not None and not device_given:
        check_cuda(args.gpus)
    return definition, base_seed, device_given, models


def check_cuda(gpus):
    """--gpus without a --device after --: each trial gets --device cuda, and on a machine where torch sees no GPU
    every one of them would fail in turn. One child process asks torch (it imports torch: a few seconds)."""
    result = subprocess.run([sys.executable, '-c', 'import torch; print(torch.cuda.device_count())'],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode == 0 and result.stdout.strip() == '0':
        fail(f"--gpus {gpus}: torch sees no CUDA GPU here, and each trial would run with --device cuda; drop --gpus "
             f"to run the trials one after another on the CPU", 2)


def check_models(names):
    """main.py checks --model once torch is imported, as each trial starts, so a typo would fail every trial in
    turn. One child process (timm imports torch: a few seconds) runs main.py's check on each model first."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from model import check_model_args\n"
            "for name in sys.argv[2:]: check_model_args(name)")
    result = subprocess.run([sys.executable, '-c', code, os.path.dirname(MAIN_PY), *names], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL)
    if result.returncode:
        lines = result.stderr.strip().splitlines() or [f"checking --model failed (exit {result.returncode})"]
        fail(lines[-1].removeprefix('error: '), 2)


def settings(definition):
    """What a sweep trains, as main.py reads its flags: the same however its command was typed (flag order, 1e-3 or
    0.001, False or false, a folder with or without a trailing /)."""
    flags = given_main_flags(definition['main_flags'])
    for flag in ('dataset', 'data_dir', 'weights'):
        if isinstance(flags.get(flag), str):
            flags[flag] = os.path.normpath(flags[flag])
    grid = {flag: sorted(typed_value(flag, value) for value in values) for flag, values in definition['grid'].items()}
    return json.dumps(dict(grid=grid, seeds=definition['seeds'], val_split=definition['val_split'],
                           main_flags={flag: repr(value) for flag, value in flags.items()}), sort_keys=True)


def same_settings_elsewhere(log_dir, definition):
    """-> (directory, command) of a sweep in log_dir that has these settings under another name, or None."""
    mine = settings(definition)
    try:
        names = sorted(os.listdir(log_dir))
    except OSError:
        return None
    for name in names:
        meta = read_json(os.path.join(log_dir, name, 'sweep.json'))
        if not isinstance(meta, dict) or not {'grid', 'seeds', 'val_split', 'main_flags'} <= set(meta):
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # a sweep.json main.py no longer reads is another sweep
                theirs = settings(meta)
        except (SystemExit, Exception):
            continue
        if theirs == mine:
            return os.path.join(log_dir, name), meta.get('command')
    return None


def sweep_name(definition):
    text = json.dumps(definition, separators=(',', ':'))
    return f"sweep-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def open_sweep(sweep_dir, definition, command, models):
    """Write sweep.json for a new sweep once its `models` pass main.py's check; for an existing one, insist on the
    same definition (its models were checked when it was written)."""
    path = os.path.join(sweep_dir, 'sweep.json')
    for denied in (sweep_dir, path):  # not damaged nor missing: removing the definition would be the wrong fix
        refuse_unreadable(denied, 're-launch the same command')
    saved = read_json(path)
    if saved is not None:
        changed = [key for key in definition if json.dumps(saved.get(key)) != json.dumps(definition[key])]
        if changed:
            logs = os.path.join(sweep_dir, 'logs')
            if not set(os.listdir(sweep_dir)) - {'sweep.json', 'sweep.lock'}:  # as --print_commands leaves it
                hint = f"; none of its runs has started: if its printed commands will never run, remove {sweep_dir}"
            elif not any(os.path.isdir(os.path.join(sweep_dir, name)) for name in os.listdir(sweep_dir)
                         if name != 'logs') and not sweep_running(sweep_dir):
                # every run failed at setup (main.py removes such a run's directory), and no sweep.py is at work on it
                why = f" (their logs in {logs} say why)" if os.path.isdir(logs) else ''
                hint = f"; none of its runs has trained{why}: to run this one in its place, remove {sweep_dir}"
            else:
                hint = ''
            fail(f"{sweep_dir} holds another sweep (its {', '.join(changed)} differ); re-launch it with its own "
                 f"command ({saved.get('command')}) or pick another --name{hint}")
        return saved
    if os.path.exists(path):
        fail(f"cannot read {path}; repair or remove it, or pick another --name")
    if os.path.isdir(sweep_dir) and os.listdir(sweep_dir):
        fail(f"{sweep_dir} exists and is not a sweep (no sweep.json); pick another --name or --log_dir")
    if models:
        check_models(models)
    meta = dict(definition, command=command, created=datetime.datetime.now().isoformat(timespec='seconds'))
    try:
        os.makedirs(sweep_dir, exist_ok=True)
        write_atomic(path, json.dumps(meta, indent=2) + '\n')
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror or e}); choose a writable --log_dir")
    return meta


def refuse_unreadable(path, then, why=''):
    """One line with the chmod for a file or directory (list and enter it) that exists but that this user may not
    read, whose contents would look missing; nothing when it is readable or absent."""
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        chmod = 'u+rx'
    elif os.path.isfile(path) and not os.access(path, os.R_OK):
        chmod = 'u+r'
    else:
        return
    fail(f"cannot read {path} (permission denied){why}; make it readable (chmod {chmod}, or ask its owner) and {then}")


def trial_names(meta, base_seed):
    """Every run directory the sweep may have: its grid points' and its seeds' (whichever grid point won)."""
    return ([trial['name'] for trial in grid_trials(meta, base_seed, '')]
            + [f"final_seed={seed}" for seed in range(base_seed + 1, base_seed + meta['seeds'] + 1)])


def check_runs_readable(sweep_dir, meta, base_seed, then):
    """A run's summary.json, config.json or log that this user may not read looks missing: a finished run would be
    called interrupted and resumed, another grid point would win, the seeds would be stale. Said before any is read."""
    paths = [os.path.join(sweep_dir, 'logs')]
    for name in trial_names(meta, base_seed):  # a directory before its files: the files of one not entered look absent
        run_dir = os.path.join(sweep_dir, name)
        paths += [run_dir, os.path.join(run_dir, 'summary.json'), os.path.join(run_dir, 'config.json')]
    paths += [log_path(sweep_dir, name) for name in trial_names(meta, base_seed)]
    for path in paths:
        refuse_unreadable(path, then, ', where sweep.py learns how a run ended')


def check_writable(sweep_dir, meta, base_seed):
    """A launch into a sweep this user may not write would plan and log, then stop at its first report or trial:
    said before anything runs."""
    paths = [sweep_dir, os.path.join(sweep_dir, 'logs'), os.path.join(sweep_dir, 'sweep.log')]
    paths += [log_path(sweep_dir, name) for name in trial_names(meta, base_seed)  # a finished run's log is not added to
              if not (read_json(os.path.join(sweep_dir, name, 'summary.json')) or {}).get('finished')]
    for path in paths + [os.path.join(sweep_dir, name) for name in trial_names(meta, base_seed)]:
        if os.path.islink(path) and not os.path.exists(path):  # written through, or failing once the sweep meets it
            fail(f"{path} is a link to a missing file ({os.readlink(path)}); remove the link, or restore what it "
                 f"names, and re-launch the same command")
    for path in paths:
        folder = os.path.isdir(path)
        if (folder or os.path.isfile(path)) and not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            mend = ("(read-only file system); mount it writable" if on_read_only_mount(path) else
                    "(permission denied); make it writable (chmod u+w, or ask its owner)")
            fail(f"cannot write {'into ' * folder}{path} {mend} and re-launch the same command")


def on_read_only_mount(path):
    """Whether `path` lies on a file system mounted read-only, where chmod cannot help."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def sweep_running(sweep_dir):
    """Whether a sweep.py holds sweep_dir's lock now (lock_sweep)."""
    import fcntl
    try:
        with open(os.path.join(sweep_dir, 'sweep.lock'), 'a') as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released as the file closes
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False


def lock_sweep(sweep_dir):
    """Two sweep.py processes on one sweep would resume (or set aside) each other's runs; --print_commands and
    --collect take the lock too, as they would print the resume command of a run in training, or report it."""
    path = os.path.join(sweep_dir, 'sweep.lock')
    try:
        handle = open(path, 'w')
    except OSError as e:  # the sweep exists by now: another --log_dir would be another sweep
        fail(f"cannot write {path if os.path.lexists(path) else 'into ' + sweep_dir} ({e.strerror or e})"
             + ("; make it writable (chmod u+w, or ask its owner)" if isinstance(e, PermissionError) else
                f"; it is a link to a missing file ({os.readlink(path)}): remove the link" if os.path.islink(path)
                else ''))
    import fcntl  # POSIX only: main checks first (vpt.not_posix)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"another sweep.py is running on {sweep_dir}; let it finish or stop it first")
    return handle  # held until this process exits


# ---------------------------------------------------------------- trials


def trial_argv(definition, values, seed, sweep_dir, name):
    flags = []
    skip = False
    for token in definition['main_flags']:  # the sweep sets --seed; an abbreviated one is overridden by the last
        if skip or token == '--seed' or token.startswith('--seed='):
            skip = token == '--seed'
            continue
        flags.append(token)
    for flag, value in values.items():
        flags += [f"--{flag}={value}"] if value.startswith('-') else [f"--{flag}", value]
    return flags + ['--val_split', str(definition['val_split']), '--seed', str(seed), '--log_dir', sweep_dir,
                    '--name', name]


def grid_trials(definition, base_seed, sweep_dir):
    flags = list(definition['grid'])
    trials = []
    for combination in itertools.product(*definition['grid'].values()):
        values = dict(zip(flags, combination))
        name = 'grid_' + '_'.join(f"{flag}={re.sub(r'[^A-Za-z0-9.+-]', '-', value)[:40]}"
                                  for flag, value in values.items())
        trials.append(dict(name=name, stage='grid', seed=base_seed, values=values))
    names = [trial['name'] for trial in trials]
    for trial in trials:  # values that differ only in characters a directory name cannot hold
        if names.count(trial['name']) > 1:
            trial['name'] += '-' + hashlib.sha1(json.dumps(trial['values']).encode()).hexdigest()[:6]
        trial['argv'] = trial_argv(definition, trial['values'], base_seed, sweep_dir, trial['name'])
    return trials


def final_trials(definition, base_seed, winner, sweep_dir):
    return [dict(name=f"final_seed={seed}", stage='final', seed=seed, values=winner['values'],
                 argv=trial_argv(definition, winner['values'], seed, sweep_dir, f"final_seed={seed}"))
            for seed in range(base_seed + 1, base_seed + definition['seeds'] + 1)]


def shown_path(path):
    """A file as the console names it: relative to the current directory when below it, else absolute."""
    try:
        relative = os.path.relpath(path)
    except OSError:  # the current directory was removed
        return path
    return os.path.abspath(path) if relative.startswith('..') else relative


def log_path(sweep_dir, name):
    # not inside the run directory: main.py refuses to start in one that exists
    return os.path.join(sweep_dir, 'logs', f"{name}.log")


def last_exit(path):
    """(exit code, last line it printed) of a trial's latest attempt, from the lines the sweep adds to its log;
    (None, '') when it never ran under the sweep, still runs, or the sweep died before it."""
    try:
        with open(path, 'rb') as f:
            f.seek(max(0, os.path.getsize(path) - 65536))
            tail = f.read().decode(errors='replace')
    except OSError:
        return None, ''
    lines = [line.strip() for line in re.split(r'[\r\n]+', ANSI.sub('', tail)) if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith('[sweep]'):
            match = re.search(r' exit code (-?\d+)$', lines[i])
            if not match:
                return None, ''
            message = next((line for line in reversed(lines[:i]) if not line.startswith('[sweep]')), '')
            return int(match.group(1)), message
    return None, ''


def trial_exit(sweep_dir, name):
    """last_exit of a trial, a kill named as one; a run that stopped on a non-finite loss outside the sweep (a
    --print_commands command) left no exit code in the sweep's log, but its summary.json says so."""
    code, message = last_exit(log_path(sweep_dir, name))
    # moved aside (a stale run, say): the settings that diverged went with it (main.py keeps the directory of a run
    # that diverged, as it has a checkpoint by then)
    if code == DIVERGED and not os.path.isdir(os.path.join(sweep_dir, name)):
        return None, ''
    diverged = (read_json(os.path.join(sweep_dir, name, 'summary.json')) or {}).get('diverged')
    if code is None and isinstance(diverged, dict):
        code, message = DIVERGED, (f"non-finite loss at epoch {diverged.get('epoch')}, step "
                                   f"{diverged.get('step')}")
    if code is not None and code < 0 and code not in INTERRUPTED:  # a kill: its last line is just where it was
        killer = " (as the kernel's out-of-memory killer does)" if code == -signal.SIGKILL else ''
        try:
            killed = f"killed by {signal.Signals(-code).name}{killer}"
        except ValueError:  # a real-time signal has no name
            killed = f"killed by signal {-code}"
        message = killed + (f" after: {message}" if message else '')
    return code, message


def trial_row(sweep_dir, trial):
    """What the disk says about a trial: one row of sweep.csv."""
    run_dir = os.path.join(sweep_dir, trial['name'])
    summary = read_json(os.path.join(run_dir, 'summary.json')) or {}
    code, message = trial_exit(sweep_dir, trial['name'])
    if summary.get('finished'):
        status = 'finished'
    elif trial['name'] in CHILDREN:
        status = 'running'
    elif code == DIVERGED:
        status = 'diverged'
    elif code is not None and code != 0 and code not in INTERRUPTED:
        status = 'failed'
    elif os.path.isdir(run_dir):
        status = 'interrupted'
    else:
        status = 'missing'
    row = dict(run=trial['name'], stage=trial['stage'], seed=trial['seed'], **trial['values'], status=status)
    for key in RESULT_COLUMNS[1:-2]:
        row[key] = summary.get(key)
    ended = status in ('failed', 'diverged')
    row.update(exit_code=code if ended else None, message=message if ended else '')
    return row


def sweep_state(sweep_dir, meta, base_seed):
    """-> (grid trials, their rows, winner row or None, final trials, their rows), all read from disk."""
    trials1 = grid_trials(meta, base_seed, sweep_dir)
    rows1 = [trial_row(sweep_dir, trial) for trial in trials1]
    mark_resumed_otherwise(sweep_dir, meta, trials1, rows1)
    if stale_runs(rows1):  # the grid's choice waits for it: it neither wins nor may be beaten, so no final run is judged
        return trials1, rows1, None, [], []
    scored = [row for row in rows1 if row['status'] == 'finished' and row['best_val_acc'] is not None]
    winner = max(scored, key=lambda row: row['best_val_acc']) if scored else None  # max keeps the first of ties
    if winner is None:
        return trials1, rows1, None, [], []
    winner = dict(winner, values=trials1[rows1.index(winner)]['values'], argv=trials1[rows1.index(winner)]['argv'])
    trials2 = final_trials(meta, base_seed, winner, sweep_dir)
    rows2 = [trial_row(sweep_dir, trial) for trial in trials2]
    if not stage1_done(rows1) and all(row['status'] == 'missing' for row in rows2):
        return trials1, rows1, winner, [], []  # stage 2 has not begun: its winner is not known yet
    for row, trained in zip(rows2, stale_values(sweep_dir, winner, trials2)):
        if trained:  # its row says what it trained, and it counts for nothing
            row.update(trained, status='stale', message=f"trained another grid point than the winner {winner['run']} "
                                                        f"(a grid run that failed before has finished since)")
    mark_resumed_otherwise(sweep_dir, meta, trials2, rows2)
    return trials1, rows1, winner, trials2, rows2


def count_statuses(rows):
    """'2 diverged, 1 failed'."""
    statuses = [row['status'] for row in rows]
    return ', '.join(f"{statuses.count(status)} {status}" for status in dict.fromkeys(statuses))


def stage1_done(rows1):
    return all(row['status'] in ('finished', 'failed', 'diverged') for row in rows1)


def stale_values(sweep_dir, winner, trials2):
    """Per final trial: the grid values it trained ({flag: value from its config.json}) when they are not the
    winner's (a grid run that failed once, was retried and then won), else None. Both sides are main.py's resolved
    values, read from the runs' config.json (paths absolute), so the check holds from any directory."""
    expected = read_json(os.path.join(sweep_dir, winner['run'], 'config.json')) or {}
    found = []
    for trial in trials2:
        config = read_json(os.path.join(sweep_dir, trial['name'], 'config.json'))
        stale = config and any(config.get(flag) != expected.get(flag) for flag in winner['values'])
        found.append({flag: str(config.get(flag)) for flag in winner['values']} if stale else None)
    return found


def mark_resumed_otherwise(sweep_dir, definition, trials, rows):
    """Mark stale, with what it trained, a run resumed by hand with another RESUMABLE_SETTINGS value than its trial's
    (main.py --resume RUN --epoch 10, which README allows for any run): its numbers are not those of the settings the
    sweep ranks or averages. Compared as main.py's parser reads the values, with its config.json's."""
    given = given_main_flags(definition['main_flags'])
    for trial, row in zip(trials, rows):
        config = read_json(os.path.join(sweep_dir, trial['name'], 'config.json')) or {}
        for flag in RESUMABLE_SETTINGS:
            asked = (typed_value(flag, trial['values'][flag]) if flag in trial['values'] else
                     repr(given.get(flag, vpt.make_parser().get_default(flag))))
            if flag in config and repr(config[flag]) != asked:
                row.update(status='stale', message=f"was resumed with --{flag} {config[flag]} (the sweep's runs "
                                                   f"train with --{flag} {asked})")
                break
        else:  # set back since: the epochs it trained meanwhile had other settings (the sweep never changes them)
            changed = [flag for flag in RESUMABLE_SETTINGS for entry in config.get('resumed') or []
                       if isinstance(entry, dict) and f'{flag}_before' in entry]
            if changed:
                row.update(status='stale', message=f"was resumed with another --{changed[0]} and then set back "
                                                   f"(config.json's resumed entries record the changes)")


def stale_error(sweep_dir, rows, then):
    """The one line that stops a sweep with stale runs: each one and what it trained."""
    return '; '.join(f"{row['run']} in {sweep_dir} {row['message']}" for row in rows if row['status'] == 'stale') + (
        f"; move {'it' if len(stale_runs(rows)) == 1 else 'them'} aside {then}")


def stale_runs(rows):
    """The runs sweep_state marked stale."""
    return [row['run'] for row in rows if row['status'] == 'stale']


def check_data(sweep_dir, trials, launched=True):
    """Every run of a sweep must have read one dataset, the one this launch reads, or its numbers do not compare.
    A relative --dataset resolves against the working directory, which the sweep's name does not hold; a folder may
    gain or lose images between two launches. Checked against each run's config.json (paths absolute there): where
    the folder is, its classes, and the images each split held before subsetting. (CIFAR is the same wherever
    --data_dir puts it: torchvision checks its files.)"""
    seen = {}
    for trial in trials:
        config = read_json(os.path.join(sweep_dir, trial['name'], 'config.json'))
        if not isinstance(config, dict):
            continue
        dataset = config.get('dataset')
        if launched and dataset not in vpt.CIFAR:
            reads = check_trial(trial['argv'], trial['name']).dataset
            if reads != dataset:
                fail(f"{trial['name']} of {sweep_dir} trained on --dataset {dataset}, but this launch reads --dataset "
                     f"as {reads}: re-launch from the directory the sweep was started in; for a sweep of this data, "
                     f"pick another --name")
        first = seen.setdefault(dataset, (trial['name'], data_read(config)))
        differ = data_difference(first[1], data_read(config))
        if differ:
            fail(f"{first[0]} and {trial['name']} of {sweep_dir} read different data from {dataset} ({differ}): the "
                 f"dataset changed while the sweep ran, so its numbers do not compare; move aside the runs of the "
                 f"data you do not want and re-launch, or sweep the data as it is now under another --name")


# the flags that choose which images a run's splits hold and how they are decoded: runs that agree on them and on the
# folder_reading rule trained and tested on the same images, so their data_sha256 must agree too
SELECTION = ('train_samples', 'test_samples', 'val_split', 'test_split', 'data_seed', 'img_size', 'pillow_version')


def data_read(config):
    """What a run's config.json says it read: the class names in order, each split's images before subsetting (not
    recorded before vpt counted them), how the folder was read (data.FOLDER_READING; 1 before it was recorded), the
    SELECTION flags, and each split's sha256 of its decoded images and labels (not recorded before data_sha256)."""
    return (config.get('classes'), config.get('dataset_images'), config.get('folder_reading', 1),
            tuple(config.get(flag) for flag in SELECTION), config.get('data_sha256'))


def data_difference(first, other):
    """How two data_read() differ, in words; '' when they agree. Runs that read the folder by different rules may
    count other images of the same data (the launch warns about them): only their classes are compared, as for runs
    that recorded no counts. Images are compared where the counts agree (an image replaced or moved to another class
    keeps them) and the runs chose their splits alike."""
    if first[0] != other[0]:
        return 'other classes'
    if first[2] == other[2] and None not in (first[1], other[1]) and first[1] != other[1]:
        return f"images per split {first[1]} against {other[1]}"
    if first[2:4] == other[2:4] and isinstance(first[4], dict) and isinstance(other[4], dict):
        changed = [split for split in ('train', 'val', 'test')
                   if split in first[4] and split in other[4] and first[4][split] != other[4][split]]
        if changed:
            return (f"other images in the {' and '.join(changed)} split{'s' * (len(changed) > 1)} though the counts "
                    f"agree, by config.json's data_sha256")
    return ''


def move_aside(run_dir, why, folder=None):
    """Rename a run directory to <run>.<why>-N, in `folder` if given (kept, not deleted: it may hold a clue) -> the
    new path, relative to the run directory's parent."""
    parent = os.path.dirname(run_dir)
    target = os.path.join(folder or parent, os.path.basename(run_dir) + f".{why}-")
    n = 1
    while os.path.lexists(f"{target}{n}"):  # a link to a missing file too: a directory is not renamed onto a link
        n += 1
    os.makedirs(folder or parent, exist_ok=True)
    os.rename(run_dir, f"{target}{n}")
    return os.path.relpath(f"{target}{n}", parent)


def set_aside(sweep_dir, name):
    """A trial that read other data, with its log, to set-aside/<run>.other-data-N: out of the sweep's report, its
    trial states (a logged exit status would still count) and plot.py SWEEP_DIR (which looks one level down)."""
    moved = move_aside(os.path.join(sweep_dir, name), 'other-data', os.path.join(sweep_dir, 'set-aside'))
    if os.path.exists(log_path(sweep_dir, name)):
        os.rename(log_path(sweep_dir, name), os.path.join(sweep_dir, moved + '.log'))
    return moved


# ---------------------------------------------------------------- running trials


def say(sweep_dir, message):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)
    with open(os.path.join(sweep_dir, 'sweep.log'), 'a') as f:
        f.write(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] {message}\n")


def on_signal(signum, frame):
    # no printing here: a handler that prints while the main thread prints raises "reentrant call"
    if not STOP:
        STOP.append(signum)
    for child in CHILDREN.values():  # a terminal's Ctrl-C reached them already; main.py ignores a repeated signal
        if child.poll() is None:
            child.send_signal(signum)


def child_command(trial, run_dir, gpu, add_device):
    """-> (command, environment, what it does) for a trial: resumed when it has a checkpoint, else from scratch."""
    if os.path.isfile(os.path.join(run_dir, 'state.pt')):
        done = (read_json(os.path.join(run_dir, 'summary.json')) or {}).get('epochs_done', 0)
        argv, what = ['--resume', run_dir], f"resume {trial['name']} after epoch {done}"
    else:
        argv, what = list(trial['argv']), f"start  {trial['name']}"
    env = dict(os.environ, PYTHONUNBUFFERED='1')  # its log file fills as it goes
    if gpu is not None:
        env['CUDA_VISIBLE_DEVICES'] = gpu
        argv += ['--device', 'cuda'] if add_device else []
        what += f" on GPU {gpu}"
    return [sys.executable, MAIN_PY, *argv], env, what


def start_trial(sweep_dir, trial, gpu, add_device):
    """Launch a trial -> Popen, or None when it has finished already."""
    run_dir = os.path.join(sweep_dir, trial['name'])
    summary = read_json(os.path.join(run_dir, 'summary.json')) or {}
    if summary.get('finished'):
        done = summary.get('epochs_done')
        say(sweep_dir, f"skip   {trial['name']}: finished ({done} epoch{'' if done == 1 else 's'})")
        return None
    if trial_exit(sweep_dir, trial['name'])[0] == DIVERGED:
        say(sweep_dir, f"skip   {trial['name']}: diverged (a non-finite loss); remove it and its log to run it again")
        return None
    if os.path.exists(run_dir) and not os.path.isfile(os.path.join(run_dir, 'state.pt')):
        moved = move_aside(run_dir, 'failed')
        say(sweep_dir, f"note   {trial['name']} stopped before its first checkpoint; moved it to {moved} and "
                       f"starting it afresh")
    command, env, what = child_command(trial, run_dir, gpu, add_device)
    path = log_path(sweep_dir, trial['name'])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a') as log:
        log.write(f"[sweep] {datetime.datetime.now():%Y-%m-%d %H:%M:%S} start"
                  + (f" CUDA_VISIBLE_DEVICES={gpu}" if gpu is not None else '') + f": {shlex.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    CHILDREN[trial['name']] = child
    if STOP:  # the signal came between the check and the launch
        child.send_signal(STOP[0])
    say(sweep_dir, f"{what} (log {shown_path(path)})")
    return child


def end_trial(sweep_dir, trial, child, started):
    del CHILDREN[trial['name']]
    with open(log_path(sweep_dir, trial['name']), 'a') as log:
        log.write(f"\n[sweep] {datetime.datetime.now():%Y-%m-%d %H:%M:%S} exit code {child.returncode}\n")
    row = trial_row(sweep_dir, trial)
    if row['status'] == 'finished':
        detail = f"best val acc {row['best_val_acc']:.2f}% at epoch {row['best_val_epoch']}"
    elif row['status'] in ('failed', 'diverged'):
        detail = f"exit {row['exit_code']}: {row['message']}"
    elif os.path.isfile(os.path.join(sweep_dir, trial['name'], 'state.pt')):
        detail = f"after epoch {row['epochs_done'] or 0}, resumable"
    else:  # stopped before its first checkpoint (still importing, say): a re-launch starts it afresh
        detail = "stopped before its first checkpoint, starts afresh on a re-launch"
    say(sweep_dir, f"end    {trial['name']}: {row['status']}, {detail} ({time.time() - started:.0f} s)")
    return row


def run_trials(sweep_dir, meta, base_seed, trials, gpus, add_device, compare_with):
    """Run the trials, one per slot (a GPU, or just one slot) at a time, until done or a signal arrives.
    A trial started afresh must read the data that the runs of `compare_with` read (a resumed one is checked by
    main.py itself): as soon as its config.json says otherwise, every trial is stopped, the ones of other data move
    aside to set-aside/<run>.other-data-N, and the sweep fails, before a number of other data can join the sweep's.
    Two trials that fail alike (the same last line) on one slot before their first checkpoint fail for a reason of
    their common settings or the machine (data that cannot be downloaded, a missing file, a broken GPU): that slot
    takes no further trial, and once no slot is left, no further trial starts."""
    pending, running = list(trials), {}  # slot -> (trial, child, start time)
    early_failures = {}  # (slot, last line) -> the trials that failed with it there before their first checkpoint
    slots = gpus or [None]
    first_read = {}  # dataset -> (run, data_read) the sweep's runs read
    for trial in compare_with:
        config = read_json(os.path.join(sweep_dir, trial['name'], 'config.json'))
        if isinstance(config, dict):
            first_read.setdefault(config.get('dataset'), (trial['name'], data_read(config)))
    fresh, unchecked, changed = [], set(), []

    def check_fresh_data():
        for name in sorted(unchecked):
            config = read_json(os.path.join(sweep_dir, name, 'config.json'))  # written once the data is read
            if isinstance(config, dict):
                unchecked.discard(name)
                first = first_read.setdefault(config.get('dataset'), (name, data_read(config)))
                differ = data_difference(first[1], data_read(config))
                if differ and not changed:
                    changed.append(f"{first[0]} and {name} of {sweep_dir} read different data from "
                                   f"{config.get('dataset')} ({differ})")
                    for _, child, _ in running.values():
                        if child.poll() is None:
                            child.send_signal(signal.SIGTERM)
    retired = {}  # slot -> (last line, the two trials that failed with it there)
    while running or (pending and not STOP and not changed and len(retired) < len(slots)):
        for slot in slots:
            while slot not in running and slot not in retired and pending and not STOP and not changed:
                trial = pending.pop(0)
                resumes = os.path.isfile(os.path.join(sweep_dir, trial['name'], 'state.pt'))
                child = start_trial(sweep_dir, trial, slot, add_device)
                if child is not None:
                    running[slot] = (trial, child, time.time())
                    if not resumes:
                        fresh.append(trial['name'])
                        unchecked.add(trial['name'])
        time.sleep(0.1)
        check_fresh_data()
        for slot, (trial, child, started) in list(running.items()):
            if child.poll() is not None:
                del running[slot]
                row = end_trial(sweep_dir, trial, child, started)
                early = row['status'] == 'failed' and not os.path.isfile(os.path.join(sweep_dir, trial['name'],
                                                                                       'state.pt'))
                if early and row['message']:
                    failures = early_failures.setdefault((slot, row['message']), [])
                    failures.append(trial['name'])
                    if len(failures) == 2 and slot not in retired:
                        retired[slot] = (row['message'], failures)
                        if slot is not None and len(retired) < len(slots):  # one bad GPU: the others go on
                            say(sweep_dir, f"note   GPU {slot}: {' and '.join(failures)} failed alike on it before "
                                           f"their first checkpoint; it takes no further trial")
                write_reports(sweep_dir, meta, base_seed)
    check_fresh_data()  # a trial that wrote its config.json and ended since the last look
    if changed:
        moved = []
        for name in fresh:
            config = read_json(os.path.join(sweep_dir, name, 'config.json'))
            if isinstance(config, dict) and data_difference(first_read[config.get('dataset')][1], data_read(config)):
                moved.append(f"{name} to {set_aside(sweep_dir, name)}")
        write_reports(sweep_dir, meta, base_seed)
        aside = f" and moved {', '.join(moved)}" if moved else ''  # one stopped before its checkpoint is gone
        fail(f"the dataset changed while the sweep ran: {changed[0]}; stopped the sweep{aside} before a number of "
             f"other data could count; restore the data and re-launch, or sweep the data as it is now under another "
             f"--name")
    if len(retired) == len(slots) and pending and not STOP:
        message, names = list(retired.values())[-1]
        fail(f"{' and '.join(names)} failed alike before their first checkpoint ({message}); the {len(pending)} "
             f"trial{'s' * (len(pending) != 1)} after them would fail the same way and did not start: mend that and "
             f"re-launch the same command, or, if a flag after -- was the cause, launch the mended command (a new "
             f"sweep)")


# ---------------------------------------------------------------- reports


def number(value, spec='.2f'):
    return '' if value is None else format(value, spec)


def mean_std(values):
    """'mean ± sample std (n-1)'; just the value for one seed."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def epochs(row):
    return '' if row['epochs'] is None else f"{row['epochs_done']}/{row['epochs']}"


def write_reports(sweep_dir, meta, base_seed):
    """sweep.csv and sweep.md from the runs on disk -> sweep.md's text."""
    trials1, rows1, winner, trials2, rows2 = sweep_state(sweep_dir, meta, base_seed)
    flags = list(meta['grid'])
    table = io.StringIO()
    writer = csv.DictWriter(table, ['run', 'stage', 'seed', *flags, *RESULT_COLUMNS], lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows1 + rows2)
    write_atomic(os.path.join(sweep_dir, 'sweep.csv'), table.getvalue())
    text = markdown(sweep_dir, meta, base_seed, rows1, winner, trials2, rows2)
    write_atomic(os.path.join(sweep_dir, 'sweep.md'), text)
    return text


def markdown(sweep_dir, meta, base_seed, rows1, winner, trials2, rows2):
    flags = list(meta['grid'])
    seeds = f"seeds {base_seed + 1}..{base_seed + meta['seeds']}" if meta['seeds'] > 1 else f"seed {base_seed + 1}"
    lines = [f"# Sweep {os.path.basename(os.path.normpath(sweep_dir))}", '', f"    {meta['command']}", '',
             f"Stage 1 trains each of the {len(rows1)} grid points with seed {base_seed} on the training set minus a "
             f"class-stratified {meta['val_split']:g} val split and ranks them by best val accuracy. Stage 2 trains "
             f"the winner with {seeds}; each seed reports its test accuracy at its own best-val epoch.", '',
             '## Stage 1: grid, by best val accuracy', '',
             '| | run | ' + ' | '.join(flags) + ' | status | epochs | best val acc | at epoch |',
             '|---|---|' + '---|' * len(flags) + '---|---|---|---|']
    ranked = sorted(rows1, key=lambda row: -row['best_val_acc'] if row['status'] == 'finished'
                    and row['best_val_acc'] is not None else float('inf'))
    for row in ranked:
        mark = ('**winner**' if stage1_done(rows1) else 'leading') if winner and row['run'] == winner['run'] else ''
        lines.append(f"| {mark} | {row['run']} | " + ' | '.join(row[flag] for flag in flags)
                     + f" | {row['status']} | {epochs(row)} | {number(row['best_val_acc'])} | "
                     f"{number(row['best_val_epoch'], '')} |")
    lines += ['', "Test accuracies of the grid runs are in sweep.csv; they play no part in the choice.", '']
    tied = [row['run'] for row in rows1 if winner and row['run'] != winner['run'] and row['status'] == 'finished'
            and row['best_val_acc'] == winner['best_val_acc']]
    if tied:  # common with small val splits; the choice is then the grid's order, not the data's
        lines += [f"{winner['run']} ties {', '.join(tied)} at {winner['best_val_acc']:.2f}% best val accuracy: the "
                  f"first in grid order {'won' if stage1_done(rows1) else 'leads'}. A larger --val_split (more val "
                  f"images) can tell them apart.", '']
    if not rows2:
        finished = sum(row['status'] == 'finished' for row in rows1)
        lines += ['## Result', '', f"No grid point finished ({count_statuses(rows1)}): nothing to select." if
                  stage1_done(rows1) else f"Stage 2 waits for stage 1: {finished} of {len(rows1)} grid runs finished."]
    else:
        lines += [f"## Stage 2: {winner['run']}, {seeds}", '',
                  '| run | seed | status | epochs | best val acc | at epoch | test acc at best val | final test acc |',
                  '|---|---|---|---|---|---|---|---|']
        for row in rows2:
            lines.append(f"| {row['run']} | {row['seed']} | {row['status']} | {epochs(row)} | "
                         f"{number(row['best_val_acc'])} | {number(row['best_val_epoch'], '')} | "
                         f"{number(row['test_acc_at_best_val'])} | {number(row['final_test_acc'])} |")
        done = [row for row in rows2 if row['status'] == 'finished']
        at_best = [row['test_acc_at_best_val'] for row in done]
        final = [row['final_test_acc'] for row in done]
        recipe = trials2[0]['argv'][:-4]  # without --log_dir/--name
        lines += ['', '## Result', '']
        if done:
            spread = (f"mean ± sample std over n = {len(done)} seeds, min {min(at_best):.2f}, max {max(at_best):.2f}"
                      if len(done) > 1 else "n = 1 seed, so no std")
            diverged = sum(row['status'] == 'diverged' for row in rows2)
            if diverged:
                spread += f"; {diverged} of {len(rows2)} seeds diverged (non-finite loss) and are not counted"
            stale = len(stale_runs(rows2))
            if stale:
                spread += (f"; {stale} of {len(rows2)} seeds trained otherwise than the sweep asks (stale) and are "
                           f"not counted")
            if len(done) + diverged + stale < len(rows2):
                spread += f"; {len(rows2) - len(done) - diverged - stale} of {len(rows2)} seeds not finished"
            lines += [f"**Test accuracy {mean_std(at_best)} %** ({spread}): each seed's test accuracy at its own "
                      f"best val epoch.", '', f"Final-epoch test accuracy: {mean_std(final)} %.", '']
            unsettled = [row for row in rows1 if row['status'] not in ('finished', 'diverged')]
            if unsettled:  # a failed grid point, or one retried now, may yet win
                named = ', '.join(f"{row['run']} ({row['status']})" for row in unsettled)
                lines += [f"**Provisional**: {named} did not finish, so {winner['run']} won among the other grid "
                          f"points; re-launching the same command retries or resumes "
                          f"{'them' if len(unsettled) > 1 else 'it'}, and a new winner's seeds replace these.", '']
        elif all(row['status'] == 'diverged' for row in rows2):
            lines += ["Every stage-2 seed diverged (non-finite loss): no result. The winning settings are unstable.",
                      '']
        elif stale_runs(rows2):
            lines += ["No result: the stage-2 runs trained otherwise than the sweep asks (stale).", '']
        else:
            lines += ["No stage-2 seed has finished yet.", '']
        lines += [f"Winning flags: {' '.join(f'--{flag} {value}' for flag, value in winner['values'].items())} "
                  f"(best val acc {winner['best_val_acc']:.2f}% with seed {base_seed}).", '',
                  *[line for note in edge_notes(meta, winner) for line in (note, '')],
                  f"main.py command of seed {base_seed + 1} (the sweep ran {seeds} as final_seed=<seed> in "
                  f"this directory):", '',
                  f"    {shlex.join(['python', vpt.script_path(MAIN_PY), *recipe])}"]
    for row in rows1 + rows2:
        if row['status'] == 'stale':
            lines += ['', f"**Warning**: {row['run']} {row['message']}; it counts for nothing until moved aside and the "
                          f"sweep re-launched."]
    failed = [row for row in rows1 + rows2 if row['status'] in ('failed', 'diverged')]
    if failed:
        lines += ['', '## Failed and diverged runs', '']
        lines += [f"- {row['run']} ({row['status']}): exit {row['exit_code']}: {row['message']} "
                  f"(log {shown_path(log_path(sweep_dir, row['run']))})" for row in failed]
    return '\n'.join(lines) + '\n'


def edge_notes(meta, winner):
    """A winner at the end of a numeric grid of three or more values (an lr grid, say) may have its best beyond it."""
    def as_number(flag, value):  # as main.py reads it; None for a value that is no number (True, 'adamw')
        with contextlib.suppress(ValueError):
            return float(typed_value(flag, value))
    notes = []
    for flag, values in meta['grid'].items():
        typed = [as_number(flag, value) for value in values]
        if len(typed) < 3 or None in typed:
            continue
        won = as_number(flag, winner['values'][flag])
        if won == max(typed) or won == min(typed) > 0:  # nothing below 0 to try (weight decay, warmup, prompts)
            side = 'largest' if won == max(typed) else 'smallest'
            notes.append(f"Note: --{flag} {winner['values'][flag]} is the grid's {side} value: the best may lie beyond "
                         f"it; a sweep whose grid extends {'above' if side == 'largest' else 'below'} it tells.")
    return notes


# ---------------------------------------------------------------- the three modes


def print_commands(sweep_dir, meta, base_seed):
    """Stage 1's commands still to run; stage 2's once every grid run has finished (or failed under sweep.py).
    Runs nothing."""
    trials1, rows1, winner, trials2, rows2 = sweep_state(sweep_dir, meta, base_seed)
    stage2 = stage1_done(rows1) and winner is not None
    if stale_runs(rows1 + rows2):
        fail(stale_error(sweep_dir, rows1 + rows2, 'first'))
    printed = 0
    for trial in trials2 if stage2 else trials1:
        run_dir = os.path.join(sweep_dir, trial['name'])
        if (read_json(os.path.join(run_dir, 'summary.json')) or {}).get('finished'):
            continue
        if trial_exit(sweep_dir, trial['name'])[0] == DIVERGED:
            print(f"sweep.py: note: {trial['name']} diverged (a non-finite loss): not printed again", file=sys.stderr)
            continue
        if os.path.exists(run_dir) and not os.path.isfile(os.path.join(run_dir, 'state.pt')):
            print(f"sweep.py: note: {run_dir} has no checkpoint yet (still starting, or it died before its first); "
                  f"if it died, move it aside and print the commands again", file=sys.stderr)
            continue
        command, env, what = child_command(trial, run_dir, None, False)
        print(shlex.join(['python', vpt.script_path(MAIN_PY), *command[2:]]))
        printed += 1
    failed1 = [row['run'] for row in rows1 if row['status'] == 'failed']
    if stage2 and not printed and all(row['status'] in ('finished', 'diverged') for row in rows2):
        retried = (f"{', '.join(failed1)} failed, and the sweep retries {'them' if len(failed1) > 1 else 'it'} when "
                   f"re-launched without --print_commands; every other run") if failed1 else 'every run'
        print(f"sweep.py: {retried} of {sweep_dir} has finished or diverged: nothing to run; python sweep.py --collect "
              f"{sweep_dir} writes its report", file=sys.stderr)
        return
    stage = 'stage 2' if stage2 else 'stage 1'
    then = (f"python sweep.py --collect {sweep_dir}" if stage2 else
            "print the commands again for stage 2, or python sweep.py --collect " + sweep_dir)
    print(f"sweep.py: {printed} {stage} command{'s' * (printed != 1)} to run from this directory; once "
          f"{'they have' if printed != 1 else 'it has'} finished: {then}",
          file=sys.stderr)


def base_seed_of(meta):
    """The --seed given after -- (main.py's default without one): stage 1's seed, stage 2's start from it."""
    return given_main_flags(meta['main_flags']).get('seed', vpt.make_parser().get_default('seed'))


def read_sweep(sweep_dir, action):
    for path in (sweep_dir, os.path.join(sweep_dir, 'sweep.json')):
        refuse_unreadable(path, 'run the same command again')
    meta = read_json(os.path.join(sweep_dir, 'sweep.json'))
    if not isinstance(meta, dict) or not {'grid', 'seeds', 'val_split', 'main_flags', 'command'} <= set(meta):
        inside = []  # the sweeps of a --log_dir passed for one of them
        with contextlib.suppress(OSError):
            inside = sorted(entry.name for entry in os.scandir(sweep_dir)
                            if os.path.isfile(os.path.join(entry.path, 'sweep.json')))
        hint = (f"; it holds the sweep{'s' * (len(inside) > 1)} {', '.join(inside[:5])}"
                + (f" and {len(inside) - 5} more" if len(inside) > 5 else '')
                + f": pass {'one' if action == '--collect' else 'their directories'}, such as "
                  f"{os.path.join(sweep_dir, inside[0])}" if inside else '')
        fail(f"{sweep_dir} has no readable sweep.json; {action} reads a directory that sweep.py made{hint}")
    return meta


# what two sweeps must share for their numbers to compare: the images (SAME_DATA but the data's place, with what the
# runs recorded they read), the model and its input, the starting weights, and the val split (main.py's config.json)
COMPARED = ('dataset', 'data_seed', 'train_samples', 'test_samples', 'test_split', 'model', 'img_size', 'patch_size',
            'weights_id')


def compare(sweep_dirs):
    """--compare: each sweep's result in one row, as its sweep.md states it; reads the runs, writes nothing."""
    lines = ['| sweep | mode | trainable params | winning flags | epochs | test acc at best val (%) | n | '
             'final test acc (%) | s/epoch | result |', '|---|---|---|---|---|---|---|---|---|---|']
    names = [os.path.basename(os.path.normpath(os.path.abspath(path))) for path in sweep_dirs]
    if len(set(names)) < len(names):  # two sweeps of one name, from two log directories
        names = [os.path.normpath(path) for path in sweep_dirs]
    warnings, first = [], None
    for sweep_dir, name in zip(sweep_dirs, names):
        meta = read_sweep(sweep_dir, '--compare')
        base_seed = base_seed_of(meta)
        check_runs_readable(sweep_dir, meta, base_seed, 'run the same command again')
        _, rows1, winner, _, rows2 = sweep_state(sweep_dir, meta, base_seed)
        done = [row for row in rows2 if row['status'] == 'finished']
        diverged = sum(row['status'] == 'diverged' for row in rows2)
        configs = [read_json(os.path.join(sweep_dir, row['run'], 'config.json')) for row in done + rows1 + rows2]
        config = next((config for config in configs if isinstance(config, dict)), {})  # a seed's, else a grid run's
        times = [summary['mean_epoch_time_s'] for summary in
                 (read_json(os.path.join(sweep_dir, row['run'], 'summary.json')) or {} for row in done)
                 if summary.get('mean_epoch_time_s')]
        if stale_runs(rows1 + rows2):
            result = 'a stale run: see its sweep.md'
        elif not stage1_done(rows1):
            result = 'stage 1 not finished'
        elif winner is None:  # every grid point failed or diverged: no stage 2 to wait for
            result = 'no grid point finished: see its sweep.md'
        elif not done:
            result = 'every seed diverged: no result' if rows2 and diverged == len(rows2) else 'no seed finished yet'
        elif any(row['status'] == 'failed' for row in rows1):
            result = 'provisional (a grid point failed)'
        elif len(done) + diverged < len(rows2):
            result = f"{len(done)} of {len(rows2)} seeds so far"
        else:
            result = 'final' + (f" ({diverged} of {len(rows2)} seeds diverged)" if diverged else '')
        if config:
            shared = dict({key: config.get(key) for key in COMPARED}, val_split=meta['val_split'],
                          data=data_read(config))
            first = first or (name, shared)
            differ = [f"{key} {shared[key]} against {first[1][key]}" for key in shared if key != 'data'
                      and shared[key] != first[1][key]]
            differ += list(filter(None, [data_difference(shared['data'], first[1]['data'])]))
            if differ:
                warnings.append(f"{name} and {first[0]} did not train on the same data and model ({'; '.join(differ)}): "
                                f"their numbers do not compare")
        flags = ' '.join(f'--{flag} {value}' for flag, value in winner['values'].items()) if winner else ''
        params = config.get('trainable_params')
        lines.append(
            f"| {name} | {config.get('mode', '')} | {f'{params:,}' if isinstance(params, int) else ''} | "
            f"{flags}{' (leading)' if flags and not stage1_done(rows1) else ''} | {config.get('epoch', '')} | "
            f"{mean_std([row['test_acc_at_best_val'] for row in done]) if done else ''} | {len(done)} | "
            f"{mean_std([row['final_test_acc'] for row in done]) if done else ''} | "
            f"{f'{statistics.mean(times):.1f}' if times else ''} | {result} |")
    lines += ['', "Mean ± sample std (n-1) over each sweep's stage-2 seeds, each seed's test accuracy at its own best "
                  "val epoch; the grid runs that chose the flags are not counted. s/epoch: training and evaluation, "
                  "mean over the seeds (the machine's, and its data's: compare it on one machine only)."]
    print('\n'.join(lines))
    for warning in warnings:
        print(f"sweep.py: warning: {warning}", file=sys.stderr)


def collect(sweep_dir):
    meta = read_sweep(sweep_dir, '--collect')
    lock = lock_sweep(sweep_dir)
    base_seed = base_seed_of(meta)
    check_runs_readable(sweep_dir, meta, base_seed, 'run the same command again')
    trials1, _, _, trials2, _ = sweep_state(sweep_dir, meta, base_seed)
    check_data(sweep_dir, trials1 + trials2, launched=False)
    try:
        report = write_reports(sweep_dir, meta, base_seed)
    except OSError as e:
        fail(f"cannot write the reports into {sweep_dir} ({e.strerror or e})"
             + ("; make it writable (chmod u+w, or ask its owner), or --collect a copy of it"
                if isinstance(e, PermissionError) else ''))
    print(report, end='')
    lock.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index('--') if '--' in argv else len(argv)
    ours, passthrough = argv[:split], argv[split + 1:]
    main_only = set(vpt.make_parser()._option_string_actions) - set(make_parser()._option_string_actions)
    for arg in ours:
        if arg.split('=')[0] in main_only:
            fail(f"{arg.split('=')[0]} is a main.py flag: put it after the --, with main.py's other flags", 2)
    args = make_parser().parse_args(ours)
    unsupported = vpt.not_posix()
    if unsupported:
        fail(unsupported)
    if args.compare is not None:
        if passthrough or [arg for arg in ours if arg.startswith('-') and not arg.startswith('--compare')]:
            fail("--compare takes only sweep directories: python sweep.py --compare logs/sweep_P logs/sweep_F", 2)
        return compare(args.compare)
    if args.collect is not None:
        if passthrough or [arg for arg in ours if arg.startswith('-') and not arg.startswith('--collect')]:
            fail("--collect takes only the sweep directory: python sweep.py --collect logs/sweep-1a2b3c4d", 2)
        return collect(args.collect)

    definition, base_seed, device_given, models = check_command_line(args, passthrough)
    sweep_dir = os.path.join(args.log_dir, args.name or sweep_name(definition))
    if args.name is None and not os.path.exists(os.path.join(sweep_dir, 'sweep.json')):
        twin = same_settings_elsewhere(args.log_dir, definition)  # a sweep's name hashes its command as typed
        if twin:
            fail(f"{twin[0]} is a sweep of these settings, typed differently; continue it with its own command "
                 f"({twin[1]}), or pass --name to start a second one", 2)
    script = vpt.script_path(os.path.abspath(__file__))
    relaunch = shlex.join(['python', script, *argv])
    recorded = [arg for i, arg in enumerate(argv) if i >= split or arg != '--print_commands']
    meta = open_sweep(sweep_dir, definition, shlex.join(['python', script, *recorded]), models)
    lock = lock_sweep(sweep_dir)
    check_runs_readable(sweep_dir, meta, base_seed, 're-launch the same command')
    if not args.print_commands:
        check_writable(sweep_dir, meta, base_seed)
    trials1, rows1, winner, trials2, rows2 = sweep_state(sweep_dir, meta, base_seed)
    check_data(sweep_dir, trials1 + trials2)
    if args.print_commands:
        return print_commands(sweep_dir, meta, base_seed)
    if stale_runs(rows1 + rows2):  # before anything runs: a stale run that stopped would be resumed as it was changed
        with contextlib.suppress(OSError):  # a full disk: the stale run's line is the one to say
            write_reports(sweep_dir, meta, base_seed)  # the last launch's counted it as it was
        fail(stale_error(sweep_dir, rows1 + rows2, 'and re-launch'))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    gpus = args.gpus.split(',') if args.gpus else None
    grid_size = len(list(itertools.product(*definition['grid'].values())))
    say(sweep_dir, f"sweep {sweep_dir}: stage 1, {grid_size} grid point{'s' * (grid_size != 1)}; then stage 2, "
                   f"{definition['seeds']} seed{'s' * (definition['seeds'] != 1)}")
    # a run that read its folder as an older vpt did (config.json's folder_reading; none recorded: 1) may have read
    # other images than a trial started beside it now
    configs = {trial['name']: read_json(os.path.join(sweep_dir, trial['name'], 'config.json'))
               for trial in trials1 + trials2}
    old_reading = [f"{name} (folder_reading {config.get('folder_reading', 1)})" for name, config in configs.items()
                   if config and config.get('folder_reading', 1) != FOLDER_READING
                   and config.get('dataset') not in vpt.CIFAR]
    if old_reading and None in configs.values():
        say(sweep_dir, f"warning: {', '.join(old_reading)} read the dataset folder as an older vpt did; a trial started "
                       f"now reads it as main.py does today (folder_reading {FOLDER_READING}), which may be other "
                       f"images: for numbers that compare, start this sweep afresh under another --name")
    run_trials(sweep_dir, meta, base_seed, trials1, gpus, not device_given, trials1)
    trials1, rows1, winner, trials2, rows2 = sweep_state(sweep_dir, meta, base_seed)
    check_data(sweep_dir, trials1, launched=False)  # before a winner goes on to stage 2
    stale = stale_runs(rows1 + rows2)
    if not STOP and stage1_done(rows1) and winner and not stale:
        say(sweep_dir, f"stage 2: {winner['run']} (best val acc {winner['best_val_acc']:.2f}%) with seeds "
                       f"{', '.join(str(trial['seed']) for trial in trials2)}")
        run_trials(sweep_dir, meta, base_seed, trials2, gpus, not device_given, trials1 + trials2)
        check_data(sweep_dir, trials1 + trials2, launched=False)
    print(write_reports(sweep_dir, meta, base_seed), end='', flush=True)
    lock.close()

    if STOP:
        print(f"sweep.py: {signal.Signals(STOP[0]).name}: stopped; the runs keep their last finished epoch. "
              f"Re-launch with:\n  {relaunch}", file=sys.stderr)
        sys.exit(128 + STOP[0])
    if stale:
        fail(stale_error(sweep_dir, rows1 + rows2, 'and re-launch'))
    trials1, rows1, winner, trials2, rows2 = sweep_state(sweep_dir, meta, base_seed)
    unfinished = [f"{row['run']} ({row['status']}" + (f", exit {row['exit_code']})" if row['exit_code'] is not None
                                                      else ')') for row in rows1 + rows2
                  if row['status'] not in ('finished', 'diverged')]
    if winner is None:
        if all(row['status'] == 'diverged' for row in rows1):
            fail(f"every grid point diverged (a non-finite loss), so there is nothing to select; sweep smaller "
                 f"learning rates (see {os.path.join(sweep_dir, 'sweep.md')})")
        fail(f"no grid point finished, so there is nothing to select: {', '.join(unfinished)}; see "
             f"{os.path.join(sweep_dir, 'logs')} and re-launch the same command to retry")
    if rows2 and all(row['status'] == 'diverged' for row in rows2):
        fail(f"every stage-2 seed of {winner['run']} diverged (a non-finite loss): no result; its settings are "
             f"unstable (see {os.path.join(sweep_dir, 'sweep.md')})")
    if unfinished:
        fail(f"{len(unfinished)} run{'s' * (len(unfinished) != 1)} did not finish: {', '.join(unfinished)}; see "
             f"{os.path.join(sweep_dir, 'logs')}, and re-launch the same command to resume or retry them")


def stop_trials():
    """The running trials stop at their next step, keeping their last finished epoch: left running, one would train on
    unseen and hold its run's lock, so that a re-launch found it failed."""
    on_signal(signal.SIGTERM, None)
    for child in CHILDREN.values():
        child.wait()


def run_cli():
    # until the trials' handlers (on_signal) take over, a signal stops by an exception, said in one line below: the
    # checks before them take seconds (the --model check imports torch), and nothing is at risk yet
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, vpt.interrupt)  # which ignores a repeat: one line, not a second exception
    try:
        main()
    except KeyboardInterrupt as e:  # from vpt.interrupt: no trial had started
        signum = e.args[0] if e.args else signal.SIGINT
        fail(f"{signal.Signals(signum).name}: stopped before any trial started; run the same command again to go on",
             128 + signum)
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes stdout
        stop_trials()
        sys.exit(1)
    except OSError as e:  # the disk filled up, or the sweep's folder was taken away or made read-only, while it ran
        stop_trials()
        where = f" ({e.filename})" if e.filename else ''
        fail(f"{e.strerror or e}{where}: stopped the sweep, its runs keep their last finished epoch; mend that (free "
             f"space, permissions) and re-launch the same command")


if __name__ == '__main__':
    run_cli()
