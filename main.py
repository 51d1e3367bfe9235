"""vpt: Visual Prompt Tuning of a ViT-B/4 (timm ViT-B/16 IN-21k weights resampled to 4x4 patches) on CIFAR or a folder.

    python main.py                                            # P: prompt tuning, backbone frozen
    python main.py --full True --prompts 0                    # F: full fine-tuning
    python main.py --full True --prompts 50                   # P+F
    python main.py --val_split 0.1                            # hold out 10% of train; best.safetensors by val acc
    python main.py --resume logs/<run>                        # continue a run where it stopped
    python main.py --eval_only --resume logs/<run> --checkpoint best
    python main.py --predict img.png photos/ --resume logs/<run>   # classify images with a run's model
    torchrun --nproc_per_node=8 main.py ...                   # data parallel; --batch_size stays the global batch

In Python (a notebook): model, classes, to_input = main.load_model('logs/<run>'); model(to_input(uint8_images)).
"""
import os
import signal
import sys


def stop_at_once(signum, frame):
    """SIGINT/SIGTERM while Python imports the modules below, before main() takes the signals over: nothing is made
    yet, so the process ends here, in main()'s one line and exit status. It was a KeyboardInterrupt traceback, or a
    kill without a word (these imports are a tenth of a second of the start)."""
    for each in (signal.SIGINT, signal.SIGTERM):  # a terminal's Ctrl-C reaches the whole group: one line, not two
        signal.signal(each, lambda signum, frame: None)
    if os.environ.get('LOCAL_RANK', '0') == '0':  # as say_once: torchrun signals every process
        print(f"\n{signal.Signals(signum).name}: stopped", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if __name__ == '__main__':  # before the imports below; also where a shell's background job inherited SIGINT ignored
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, stop_at_once)

import argparse
import atexit
import contextlib
import datetime
import difflib
import hashlib
import json
import math
import re
import shlex
import shutil
import subprocess
import time
import unicodedata

# flags that act on an existing run without being part of it (never stored in config.json)
ACTIONS = {'resume', 'eval_only', 'predict', 'checkpoint', 'out'}
# what a run's numbers were computed on: config.json keeps the first process's, and each resume's in 'resumed'
MACHINE = ('device_name', 'cpu_threads', 'torch_version', 'timm_version', 'pillow_version', 'cuda_version',
           'cudnn_version', 'amp_dtype')  # the GPU decides it (train.autocast_dtype)
# flags a resumed run may change; every other flag belongs to the run and must match its config.json. --dataset and
# --data_dir may point to a moved copy: load_splits checks that it holds the run's classes and images
RESUME_MAY_CHANGE = ACTIONS | {'epoch', 'device', 'dataset', 'data_dir', 'compile', 'amp', 'tensorboard'}
CIFAR = ('cifar10', 'cifar100')  # --dataset names that are not folders (data.CIFAR_FOLDERS), even where one exists
SEED_MAX = 2**32 - 1
PREDICTIONS_SHOWN = 50  # --predict prints this many rows; predictions.csv holds them all
ARCHIVES = ('.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tar.xz', '.zip', '.7z', '.rar')  # a --dataset not yet extracted
SIGNALLED = []  # the signal main()'s start-up handler (interrupt) raised a KeyboardInterrupt for
EXIT_DIVERGED = 3  # exit status of a run stopped by a non-finite loss: a result of its settings, not a crash (sweep.py)
# AdamW defaults per mode (batch 128): prompt tuning behind a frozen backbone takes a far larger lr than full tuning
DEFAULT_LR = {'P': 5e-3, 'linear': 5e-3, 'F': 1e-4, 'P+F': 1e-4}
DEFAULT_WEIGHT_DECAY = {'P': 1e-4, 'linear': 1e-4, 'F': 0.05, 'P+F': 0.05}


def str2bool(text):
    value = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True/False (or true/false, 1/0, yes/no), got {text!r}")
    return value


def eval_only_flag(text):
    """--eval_only takes an optional True/False; a run directory there belongs to --resume."""
    try:
        return str2bool(text)
    except argparse.ArgumentTypeError:
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"takes no run directory, --resume does: pass --eval_only --resume "
                                             f"{shlex.quote(text)}") from None
        raise


def int_at_least(minimum, maximum=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    return parse


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def non_negative(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device_flag(text):
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add('--epoch', type=int_at_least(1), default=5, help='epochs to train (default 5)')
    add('--batch_size', type=int_at_least(1), default=128,
        help='global batch size: under torchrun it is split across the processes and must divide by their number')
    add('--full', type=str2bool, default=False, help='True: train the whole model; False: prompts + head only')
    add('--prompts', type=int_at_least(0), default=50, help='prompt tokens per layer (0: no prompts)')
    add('--deep', type=str2bool, default=True, help='VPT-deep (new prompts at every layer) or shallow (first layer)')
    add('--prompt_dropout', type=fraction, default=0.0, help='dropout on the prompt tokens (default 0)')
    add('--prompt_impl', choices=['kv', 'naive'], default='kv',
        help='kv: prompts only as keys/values (exact, faster); naive: concatenate and run the timm blocks')
    add('--seed', type=int_at_least(0, SEED_MAX), default=0,
        help='seeds model init, data order, augmentation and prompt dropout')
    add('--data_seed', type=int_at_least(0, SEED_MAX), default=0,
        help='seeds which images --train_samples/--test_samples keep and which --val_split/--test_split hold out '
             '(default 0): '
             'fixed while --seed varies, so runs with different seeds see the same train, val and test images')
    add('--unfreeze', default='', metavar='PATTERNS',
        help="comma-separated globs over the timm model's parameter names trained in addition to prompts + head "
             "with --full False, e.g. 'patch_embed.*,pos_embed,cls_token,norm.*' (the seed's trainable set)")
    add('--optimizer', choices=['adamw', 'adam', 'sgd'], default='adamw',
        help='adamw (default); adam (L2 weight decay, as the seed); sgd (momentum 0.9, as official VPT tunes '
             'prompts; needs --lr)')
    add('--lr', type=positive, default=None,
        help='peak lr, absolute: not scaled by the batch size (official VPT uses base_lr * batch / 256); '
             'default for adamw/adam 5e-3 for P/linear, 1e-4 for F/P+F')
    add('--weight_decay', type=non_negative, default=None, help='weight decay (default 1e-4 P/linear, 0.05 F/P+F)')
    add('--warmup_epochs', type=non_negative, default=None,
        help='linear warmup length in epochs, may be fractional (default: 10%% of --epoch), then cosine to zero')
    add('--model', default='vit_base_patch16_224.augreg_in21k', help='timm ViT name (default: ViT-B/16 IN-21k)')
    add('--pretrained', type=str2bool, default=True, help='load pretrained weights (False: random backbone)')
    add('--weights', type=os.path.expanduser, default=None, metavar='FILE',
        help='local timm checkpoint (.safetensors/.pth), Google JAX .npz (ViT-B_16.npz, as official VPT), or a '
             '--full True run\'s trainable.safetensors as the backbone, instead of the hub download')
    add('--img_size', type=int_at_least(1), default=32, help='input resolution (default 32)')
    add('--patch_size', type=int_at_least(1), default=4, help='patch size the embedding is resampled to (default 4)')
    add('--dataset', type=os.path.expanduser, default='cifar10',
        help='cifar10, cifar100, or a folder with train/<class>/* and test/<class>/*')
    add('--data_dir', type=os.path.expanduser, default='./data',
        help='where CIFAR is found or downloaded (default ./data)')
    add('--train_samples', type=int_at_least(0), default=0, help='use a class-balanced subset (0: all; see --data_seed)')
    add('--test_samples', type=int_at_least(0), default=0, help='likewise for the test set (0: all)')
    add('--augment', type=str2bool, default=True,
        help='random crop (zero padding of 1/8 of the side) and horizontal flip of the training images; False: none '
             '(as official VPT trains on VTAB)')
    add('--test_split', type=fraction, default=0.0,
        help='a folder dataset without test/: hold out this class-stratified fraction of train/ as the test set '
             '(seeded by --data_seed)')
    add('--val_split', type=fraction, default=0.0,
        help='hold out this class-stratified fraction of the training images for validation (never trained on or '
             'augmented; see --data_seed); best.safetensors keeps the best-val epoch, summary.json its test accuracy')
    add('--device', type=device_flag, default='auto', help='auto (CUDA when available), cpu, cuda or cuda:N')
    add('--amp', type=str2bool, default=True,
        help='mixed precision on CUDA: bf16, or fp16 with loss scaling on NVIDIA GPUs without bf16 units '
             '(compute capability below 8: V100, T4, RTX 20xx); False: fp32 (default True)')
    add('--compile', type=str2bool, default=False, help='torch.compile the model')
    add('--tensorboard', type=str2bool, default=False,
        help='also write TensorBoard event files into the run directory (needs pip install tensorboard)')
    add('--log_dir', type=os.path.expanduser, default='logs',
        help='parent of the run directories (default logs/)')
    add('--name', default=None, help='run directory name (default: mode, model and time)')
    add('--resume', type=os.path.expanduser, default=None, metavar='RUN_DIR',
        help='continue the run in RUN_DIR from its last finished epoch')
    add('--eval_only', type=eval_only_flag, nargs='?', const=True, default=False,
        help='with --resume: evaluate the run\'s checkpoint on the test set (and val split), write its confusion '
             'matrix and each test image\'s prediction (test_predictions.csv), and exit')
    add('--predict', type=os.path.expanduser, nargs='+', default=None, metavar='PATH',
        help='with --resume: classify these images (files or folders) with the run\'s model and exit')
    add('--checkpoint', choices=['last', 'best'], default='last',
        help='which checkpoint --eval_only and --predict use: last (trainable.safetensors) or best (best val epoch)')
    add('--out', type=os.path.expanduser, default=None, metavar='FILE',
        help='where --predict writes its CSV (default: predictions.csv in the run directory, never overwritten)')
    return parser


def say_once(message, code=1):
    """Exit with a one-line error that every torchrun process finds alike: the first process on each machine prints
    it (every machine's log says why it stopped; one machine's copy of the data may differ), the others are quiet."""
    if os.environ.get('LOCAL_RANK', '0') == '0':
        # one write: torchrun starts its workers with python -u, where print writes the newline apart, and torchrun's
        # own log line ("Sending process ... closing signal SIGTERM") could land between the two, glued to this one
        sys.stderr.write(message + '\n')
    elif code < 128 and os.environ.get('TORCHELASTIC_RUN_ID'):  # an error, not a signal, under torchrun
        wait_for_the_first_process()
    sys.exit(code)


def wait_for_the_first_process(limit=60):
    """A quiet torchrun process that met an error every process meets lets the first one say it: exiting before it,
    this one had torchrun stop it before it could (a first process slowed by a loaded machine left only torchrun's
    report). torchrun ends this one as the first exits; a signal ends it at once, without a word."""
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, signal.SIG_DFL)
    time.sleep(limit)


def flag_hint(parser, message):
    """'; did you mean --epoch?' for argparse's 'unrecognized arguments: --epochs 3' (main.py, sweep.py, plot.py)."""
    if not message.startswith('unrecognized arguments: '):
        return ''
    flags = [option for action in parser._actions for option in action.option_strings]
    close = [match for word in message.split()[2:] if word.startswith('--')
             for match in difflib.get_close_matches(word.split('=')[0], flags, 1)]
    return f"; did you mean {' '.join(dict.fromkeys(close))}?" if close else ''


def parse_args(argv=None):
    parser = make_parser()

    def error(message):  # one line, no usage dump; under torchrun from the first process only
        say_once(f"main.py: error: {message}{flag_hint(parser, message)} (python main.py --help lists the flags)", 2)
    parser.error = error
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    if args.resume is not None and not args.resume.strip():
        error("--resume needs a run directory such as logs/<run>, got an empty string")
    # paths are stored absolute, so that a run resumes, evaluates and predicts from any working directory
    if args.dataset not in CIFAR and os.path.isdir(args.dataset):
        args.dataset = os.path.abspath(args.dataset)
    args.data_dir = os.path.abspath(args.data_dir)
    if args.weights and os.path.isfile(args.weights):
        args.weights = os.path.abspath(args.weights)
    if not args.deep:
        if 'prompt_impl' in given and args.prompt_impl == 'kv':
            error("--prompt_impl kv needs --deep True: shallow prompts pass through every layer, so they take "
                  "--prompt_impl naive")
        args.prompt_impl = 'naive'
    if args.eval_only and args.predict:  # before the run is read: the command itself is wrong
        error("--eval_only and --predict are two actions; run them one at a time")
    if args.resume:
        args = merge_resume(args, given, error)
    elif args.eval_only or args.predict:
        error(f"--{'eval_only' if args.eval_only else 'predict'} needs --resume RUN_DIR: the run whose model to use")
    if (not args.resume or 'dataset' in given) and args.dataset not in CIFAR and not os.path.isdir(args.dataset):
        archive = os.path.isfile(args.dataset) and args.dataset.lower().endswith(ARCHIVES)
        error(f"--dataset {args.dataset!r} is neither cifar10, cifar100 nor a folder; "
              + (f"did you mean {args.dataset.lower()}?" if args.dataset.lower() in CIFAR else
                 "it is an archive: extract it, then pass the folder that holds train/ and test/" if archive else
                 "a folder dataset needs train/<class>/* and test/<class>/* images"))  # before torch loads
    if 'weights' in given and os.path.isdir(args.weights):  # e.g. a hub download's folder
        found = sorted(name for name in os.listdir(args.weights)
                       if name.endswith(('.safetensors', '.pth', '.bin', '.npz')))
        run = None
        with contextlib.suppress(SystemExit):  # a hub download's config.json is no run's, or may be missing
            run = read_json(os.path.join(args.weights, 'config.json'))
        if isinstance(run, dict) and 'mode' in run:  # a vpt run's folder: only a --full True run holds a backbone
            found = ['trainable.safetensors'] if run.get('full') else []
            if not found:
                error(f"--weights {args.weights} is a {run['mode']} run's folder, whose checkpoints hold only what it "
                      f"trained, not a backbone; start from the weights it started from (its config.json's weights_id), "
                      f"or continue it with --resume {args.weights}")
        error(f"--weights {args.weights} is a folder; pass the checkpoint file in it"
              + (f", e.g. {os.path.join(args.weights, found[0])}" if found else " (.safetensors, .pth, .bin or .npz)"))
    if 'weights' in given and not os.path.isfile(args.weights):
        error(f"--weights {args.weights}: no such file; pass a timm checkpoint (.safetensors, .pth or .bin) or a JAX "
              f".npz (ViT-B_16.npz)")
    if args.weights and os.path.isfile(args.weights) and not os.access(args.weights, os.R_OK):  # also a resumed run's
        error(f"--weights {args.weights}: cannot read it (permission denied); make it readable (chmod u+r, or ask its "
              f"owner)")  # safetensors says 'No such file or directory', an .npz would be 'not an .npz archive'
    if args.test_split and args.dataset in CIFAR:
        error(f"--test_split is for a folder dataset without test/; {args.dataset} has its own test set")
    if 'checkpoint' in given and not (args.eval_only or args.predict):
        error("--checkpoint goes with --eval_only or --predict")
    if args.checkpoint == 'best' and args.resume and not os.path.isfile(checkpoint_path(args)):
        done = False  # an epoch has ended: metrics.csv has a row
        with contextlib.suppress(OSError), open(os.path.join(args.resume, 'metrics.csv')) as f:
            done = len(f.read().split()) > 1
        if not args.val_split:
            why = ("best.safetensors needs a run with --val_split > 0 (the epoch is chosen on val accuracy): use "
                   "--checkpoint last, this run's only checkpoint")
        elif not done:
            why = "it is written as the run's first epoch ends, and none has yet: use --checkpoint last"
        else:
            why = "the run has finished epochs, so it was removed: restore it, or use --checkpoint last"
        error(f"{checkpoint_path(args)} does not exist; {why}")
    if args.out is not None and not args.predict:
        error("--out goes with --predict")
    if args.out == '':  # `--out "$OUT"` with OUT unset: the CSV would go to the run directory without a word
        error("--out '' names no file; pass a file name such as predictions.csv, or drop --out")
    if args.img_size % args.patch_size:
        error(f"--img_size {args.img_size} is not divisible by --patch_size {args.patch_size}; "
              f"pick sizes such as --img_size 32 --patch_size 4")
    if args.weights and 'pretrained' in given and not args.pretrained:
        error("--weights loads pretrained weights but --pretrained False asks for none; drop one of them")
    if args.name is not None and (not args.name or os.sep in args.name or args.name in ('.', '..')):
        error(f"--name {args.name!r} must be a plain directory name; put the parent in --log_dir")
    if args.name is not None and args.name != args.name.strip():  # logs/ x: a run no one finds by typing its name
        error(f"--name {args.name!r} starts or ends with a space; pass --name {shlex.quote(args.name.strip())}")
    if unfreeze_patterns(args.unfreeze) and args.full:
        error("--unfreeze adds to what --full False trains; with --full True everything trains already")
    if args.optimizer == 'sgd' and args.lr is None:
        error("--optimizer sgd has no default lr here; pass --lr (official VPT's prompt lrs are base_lr * batch / 256 "
              "with base_lr in 0.05..50, so try e.g. --lr 0.1 for a batch of 128)")
    mode = mode_of(args)
    args.lr = DEFAULT_LR[mode] if args.lr is None else args.lr
    args.weight_decay = DEFAULT_WEIGHT_DECAY[mode] if args.weight_decay is None else args.weight_decay
    args.warmup_epochs = args.epoch / 10 if args.warmup_epochs is None else args.warmup_epochs  # 0.3, not 0.1 * 3
    if args.warmup_epochs and args.warmup_epochs >= args.epoch and not (args.resume or args.predict):
        error(f"--warmup_epochs {args.warmup_epochs:g} is not shorter than --epoch {args.epoch}: the lr would never "
              f"reach --lr nor decay; warm up for part of the run (default: 10% of --epoch)")
    if args.prompt_dropout and not args.prompts and not args.resume and os.environ.get('LOCAL_RANK', '0') == '0':
        # a warning, not an error: a sweep's grid over prompts=0,50 sets the dropout for both
        print(f"warning: --prompt_dropout {args.prompt_dropout:g} does nothing with --prompts 0: there are no prompts "
              f"to drop", file=sys.stderr, flush=True)
    return args


def explicit_flags(parser, argv):
    """Names of the flags the user actually typed."""
    saved = {action.dest: action.default for action in parser._actions}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]


def not_a_run(path):
    """Why `path` is no run to resume, and what to pass instead."""
    def runs_in(folder):
        with contextlib.suppress(OSError):
            return sorted((entry.name for entry in os.scandir(folder) if entry.is_dir()
                           and os.path.isfile(os.path.join(entry.path, 'state.pt'))),
                          key=lambda name: os.path.getmtime(os.path.join(folder, name, 'state.pt')))
        return []
    if not os.path.exists(path):
        parent = os.path.dirname(path) or '.'
        close = difflib.get_close_matches(os.path.basename(path), runs_in(parent), n=1)
        return ("no such directory" + (f"; did you mean {os.path.join(os.path.dirname(path), close[0])}?" if close
                                        else "; pass a run directory such as logs/<run> that an earlier run wrote"))
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):  # its files would look missing
        return "cannot read that directory (permission denied); make it readable (chmod u+rx, or ask its owner)"
    if os.path.isfile(path):  # logs/<run>/metrics.csv, by tab completion
        folder = os.path.dirname(path) or '.'
        return ("a file, not a run's directory: pass the folder that holds it, " + folder if
                os.path.isfile(os.path.join(folder, 'state.pt')) else
                "a file; pass a run directory such as logs/<run> that an earlier run wrote")
    if os.path.isfile(os.path.join(path, 'sweep.json')):
        return ("a sweep's directory, not a run's: re-launch the sweep's own command (sweep.json's command) to resume "
                "its runs, or pass one run of it, " + os.path.join(path, '<run>'))
    if os.path.isfile(os.path.join(path, 'trainable.safetensors')):
        return "its state.pt is missing (a run writes it as training begins): restore it, or start a new run"
    if os.path.isfile(os.path.join(path, 'config.json')):
        return ("no checkpoint yet: the run is still starting (state.pt is written as training begins), or was killed "
                "before; resume it once it has one, or start a new run")
    inside = runs_in(path)
    if inside:
        return (f"a folder of {len(inside)} run{'s' * (len(inside) != 1)}, not a run: pass one of them, such as the "
                f"newest, {os.path.join(path, inside[-1])}")
    return ("no checkpoint there (config.json and state.pt); pass a run directory such as logs/<run> that an earlier "
            "run wrote")


def merge_resume(args, given, error):
    run_dir = args.resume.rstrip('/') or args.resume
    config_path = os.path.join(run_dir, 'config.json')
    if not os.path.isfile(os.path.join(run_dir, 'state.pt')) or not os.path.isfile(config_path):
        error(f"--resume {run_dir}: {not_a_run(run_dir)}")
    with said_once():
        config = read_json(config_path)
    if not isinstance(config, dict):
        error(f"--resume {run_dir}: its config.json is not a vpt run's (not a JSON object); pass a run directory that "
              f"main.py wrote")
    missing = [key for key in ALWAYS_RECORDED if key not in config]
    if missing:  # a run's own flags would silently become today's defaults (and CIFAR-10 be downloaded for it)
        error(f"--resume {run_dir}: its config.json lacks {', '.join(missing)}, which every vpt run records; the run "
              f"directory is damaged: restore its config.json, or start a new run")
    may_change = RESUME_MAY_CHANGE | ({'batch_size'} if args.eval_only or args.predict else set())
    if config.get('weights'):  # a --weights file that moved: build_model checks it is the same file (its sha256)
        may_change = may_change | {'weights'}
    for flag in sorted(given - may_change):
        if flag in config and getattr(args, flag) != config[flag] and not locates(flag, getattr(args, flag), run_dir):
            action = 'eval_only' if args.eval_only else 'predict' if args.predict else None
            error(f"--{flag} {getattr(args, flag)} contradicts the run's config ({flag}={config[flag]}); "
                  + (f"drop --{flag}: --{action} takes the run as it was trained" if action else
                     f"drop --{flag} to resume {run_dir}, or start a new run"))
    for key, fits in RECORDED.items():
        if key in config and not fits(config[key]):
            error(f"--resume {run_dir}: its config.json holds {key}={json.dumps(config[key])[:80]}, not what main.py "
                  f"records there; the run directory is damaged: restore its config.json, or start a new run")
    merged = dict(vars(args))
    actions = {action.dest: action for action in make_parser()._actions}
    for key, value in config.items():
        if key in merged and key not in given & may_change:
            merged[key] = config_value(actions[key], value, run_dir, error)
    merged['resume'] = run_dir
    merged['folder_reading'] = config.get('folder_reading', 1)  # data.FOLDER_READING; runs before it was recorded: 1
    if merged.get('weights') and 'weights' not in given and not os.path.isfile(merged['weights']):
        error(f"the run's --weights file {merged['weights']} is gone; if it moved, pass --weights NEW_PATH (it must be "
              f"the same file: its sha256 is checked)")
    return argparse.Namespace(**merged)


def locates(flag, value, run_dir):
    """--log_dir or --name typed otherwise than config.json has them, yet naming where the run is (./logs for logs,
    or the place it moved to)."""
    where = os.path.abspath(run_dir)
    return (flag == 'log_dir' and os.path.realpath(value) == os.path.realpath(os.path.dirname(where))
            or flag == 'name' and value == os.path.basename(where))


def config_value(action, value, run_dir, error):
    """A flag's value as config.json holds it, checked for its kind, not its range: a hand-edited config.json
    ("batch_size": "big", "epoch": null) is a damaged run rather than a TypeError deep inside, while a value an older
    vpt accepted (--lr 0, a negative --seed) still belongs to its run."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if value is None and action.default is None:
        fits = True
    elif action.type is str2bool:
        fits = isinstance(value, bool)
    elif action.type in (None, device_flag, os.path.expanduser):  # text and paths
        fits = isinstance(value, str)
    elif isinstance(action.default, int):  # --epoch, --batch_size, --prompts, --seed, ...: a count
        fits = number and value == int(value)
        value = int(value) if fits else value
    else:  # --lr, --weight_decay, --warmup_epochs, --prompt_dropout, --val_split
        fits = number
    if fits and (not action.choices or value in action.choices):
        return value
    error(f"--resume {run_dir}: its config.json holds {action.dest}={json.dumps(value)}, which --{action.dest} does "
          f"not take; the run directory is damaged: restore its config.json, or start a new run")


ALWAYS_RECORDED = ('model', 'dataset', 'full', 'prompts', 'epoch', 'classes')  # in every config.json since vpt began
# what a run's config.json records besides its flags, as the code that reads it back needs it
RECORDED = dict(classes=lambda v: isinstance(v, list) and all(isinstance(name, str) for name in v),
                dataset_images=lambda v: isinstance(v, dict) and all(type(n) is int for n in v.values()),
                folder_reading=lambda v: type(v) is int, resumed=lambda v: isinstance(v, list),
                data_sha256=lambda v: isinstance(v, dict) and all(isinstance(d, str) for d in v.values()),
                **{f'{split}_images': lambda v: type(v) is int for split in ('train', 'val', 'test')})


def mode_of(args):
    """The method, which picks the default lr and weight decay: P, F, P+F or linear."""
    return ('P+F' if args.prompts else 'F') if args.full else ('P' if args.prompts else 'linear')


def mode_label(args):
    """What the run is called in its config, name and plots: a P or linear run that trains backbone tensors too
    (--unfreeze) is not the method with the backbone frozen."""
    return mode_of(args) + ('+unfreeze' if unfreeze_patterns(args.unfreeze) else '')


def unfreeze_patterns(text):
    """--unfreeze's comma-separated patterns; '' and ',' name none (the plain method)."""
    return [pattern.strip() for pattern in text.split(',') if pattern.strip()]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    # Outside the training loop (which takes both signals over: train.StopRequest) SIGINT and SIGTERM stop by an
    # exception: a run being set up removes its half-made directory, and the exit is one line rather than a kill. Set
    # here, not left to Python, as a shell script's background job inherits SIGINT ignored, and training hears it.
    SIGNALLED.clear()
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = parse_args(argv)
        start(args, argv, mode_label(args))
    except FloatingPointError as e:  # train.fit: a non-finite loss, said with its epoch and step
        say_once(str(e), EXIT_DIVERGED)
    except KeyboardInterrupt as e:  # parsing, importing torch, loading data, building the model: no state at risk
        signum = e.args[0] if e.args else signal.SIGINT
        say_once(f"\n{signal.Signals(signum).name}: stopped", 128 + signum)  # torchrun signals every process
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupt(signum, frame):
    # a repeat must not break into the handling of the first: sweep.py passes a terminal's Ctrl-C on to its trials,
    # which the terminal signalled too, and a second exception there was a traceback and exit 1. A Python handler
    # that does nothing, not SIG_IGN: Python reports a signal it caught but finds ignored as it runs its handlers
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, lambda signum, frame: None)
    SIGNALLED.append(signum)
    raise KeyboardInterrupt(signum)


def stop_if_signalled():
    """Raise interrupt's KeyboardInterrupt again where C code swallowed it: an extension module that imports another
    as it loads (torch's triton imports rocm_sdk, torchvision's ElementTree pyexpat) clears the error of that import,
    and the run trained on after a Ctrl-C, its handlers doing nothing (found by an import-hook fuzz)."""
    if SIGNALLED:
        raise KeyboardInterrupt(SIGNALLED[0])


@contextlib.contextmanager
def said_once():
    """One-line errors that every process meets alike (the same flags, files and data): under torchrun the first
    process on each machine says them (say_once). Not for errors of one process (its GPU, its memory)."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str):
            say_once(e.code)
        raise


def start(args, argv, mode):
    """Check what the parser could not (what needs no torch first), open the process group (under torchrun), run."""
    unsupported = not_posix()
    if unsupported:
        say_once(f"error: {unsupported}")
    world_size = int(os.environ.get('WORLD_SIZE', '1'))  # set by torchrun
    if args.batch_size % world_size:
        say_once(f"error: --batch_size {args.batch_size} does not divide by the {world_size} processes; "
                 f"--batch_size is the global batch, use a multiple of {world_size}")
    if args.predict and world_size > 1:
        say_once("error: --predict runs in one process; launch it with python, not torchrun")
    with said_once():
        check_log_dir(args)
        from model import check_model_args
        check_model_args(args.model, args.weights)
        import train
        if args.tensorboard and not (args.eval_only or args.predict):
            train.check_tensorboard()
    stop_if_signalled()  # the imports of torch, timm and torchvision above
    with said_once():  # its GPU-count error, one process's own, is printed by that process itself
        rank, world_size, device = train.setup_distributed(args.device)
    try:
        run(args, argv, mode, rank, world_size, device)
    except RuntimeError as e:
        if not train.lost_peer(e):
            raise
        first = ' '.join(str(e).split())[:160]
        if rank != 0:
            say_once(f"error: process {rank} lost the others ({first}); the first process's error above says why")
        # another process ended: on its own error, which it said, or killed without a word (the out-of-memory killer)
        run_dir = args.resume or (os.path.join(args.log_dir, args.name) if args.name else None)
        kept = not (args.eval_only or args.predict) and run_dir and os.path.exists(os.path.join(run_dir, 'state.pt'))
        resume = f"; {run_dir} keeps its last finished epoch: {train.resume_command(run_dir, world_size)}"
        say_once(f"error: process 0 lost another process ({train.first_sentence(e, 120)}); its error above says why, "
                 f"else it was killed (out of memory?){resume if kept else ''}")
    finally:
        train.close_distributed()


def run(args, argv, mode, rank, world_size, device):
    """Train, evaluate (--eval_only) or predict (--predict) on the device set up by start."""
    import train
    train.configure_backends(device)
    if args.predict:
        return predict(args, device)
    if args.eval_only:
        with said_once():
            splits, classes, _, test_names, _ = load_splits(args, rank, world_size)
            model, _ = build_model(args, len(classes), device)
        return evaluate_checkpoint(args, model, splits, classes, test_names, device)
    with contextlib.ExitStack() as held:  # the run's lock, released when training ends, however it ends
        train_run(args, argv, mode, rank, world_size, device, held)


def train_run(args, argv, mode, rank, world_size, device, held):
    """A new run, or a resumed one: check, load, build, write config.json, fit."""
    import train
    state = None
    with said_once():  # everything that can refuse a resume comes before config.json is rewritten
        if args.resume:
            if rank == 0:
                held.callback(os.close, lock_run(args.resume))
                finished_save = train.finish_interrupted_save(args.resume)
                if finished_save is not None:
                    print(f"note: {args.resume}: the save of epoch {finished_save} was cut short (killed between its "
                          f"files' renames); its files are complete now: the run stands at epoch {finished_save}",
                          file=sys.stderr, flush=True)
            train.any_rank(False, device)  # the other processes read state.pt once the first has finished its save
            state = train.load_state(args.resume)
            if rank == 0:  # not before: beside a damaged state.pt the temps may hold the only whole copy of the run
                removed = train.remove_dead_save_temps(args.resume)
                if removed:
                    print(f"note: {args.resume}: removed {len(removed)} temp file{'s' * (len(removed) > 1)} of saves a "
                          f"kill cut short ({', '.join(removed)})", file=sys.stderr, flush=True)
            if not check_resume_epoch(args, state['epoch']):  # nothing to train: the run stays as it is
                if rank == 0:
                    config = read_json(os.path.join(args.resume, 'config.json'))
                    rewritten = train.complete_finished(args.resume, state, args.val_split, config.get('test_images'),
                                                        config['classes'])
                    done = 'its 1 epoch' if args.epoch == 1 else f'all {args.epoch} epochs'
                    print(f"{args.resume} has finished {done}; pass --epoch N to train further"
                          + (f" ({' and '.join(rewritten)} written again from its state.pt: missing or of an "
                             f"earlier epoch)" if rewritten else ''))
                return
        splits, classes, available, test_names, digests = load_splits(args, rank, world_size)
        check_schedule(args, len(splits['train'][1]), state['epoch'] if state else 0)
        model, unfrozen = build_model(args, len(classes), device)
        if args.resume:
            train.load_resumed_trainable(args.resume, model, state)
            train.check_optimizer_state(args.resume, model, state['optimizer'], args.weight_decay)
        on_device = train.splits_to_device(splits, device)
    run_dir = args.resume
    if rank == 0:
        from model import count_params
        trainable, total = count_params(model, trainable_only=True), count_params(model)
        counts = ' / '.join(f"{len(split[1])} {name}" for name, split in splits.items() if split is not None)
        print(f"mode {mode}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%); "
              f"{counts} images, {len(classes)} classes; device {device}"
              + (f" x{world_size}" if world_size > 1 else ''), flush=True)
        if run_dir is None:
            run_dir = make_run_dir(args, mode)
            held.callback(os.close, lock_run(run_dir))
            args.name = os.path.basename(run_dir)
    try:
        if rank == 0:  # config.json: the resolved flags, counts, data, and what makes the numbers traceable
            config = dict({key: value for key, value in vars(args).items() if key not in ACTIONS}, mode=mode,
                          trainable_params=trainable, total_params=total, unfrozen_params=unfrozen,
                          num_classes=len(classes), classes=classes, dataset_images=available, world_size=world_size,
                          prompt_impl=model.prompt_impl, folder_reading=folder_reading(args),
                          **{f'{name}_images': len(split[1]) if split else 0 for name, split in splits.items()},
                          data_sha256=digests,
                          **provenance(args, argv, world_size, device))
            if args.resume:
                config = resumed_config(config, read_json(os.path.join(run_dir, 'config.json')), args, state['epoch'])
            train.write_config(run_dir, config)
            print(f"run directory: {run_dir}" + (f" (resumed after epoch {state['epoch']} of {args.epoch})"
                                                 if args.resume else ''), flush=True)
        run_dir = broadcast_run_dir(run_dir, world_size)
        stop_if_signalled()  # the last moment before training's own handlers
        train.fit(model, on_device, classes, args, run_dir, device, state, test_names)  # leaves signals ignored
    except BaseException:
        # a stop, an error or a non-finite loss on its way out: fit gave main()'s start-up handler back, and a signal
        # now (torchrun's, or a second Ctrl-C) added a second line and turned the exit status into its own
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, lambda signum, frame: None)
        if rank == 0 and not args.resume and not os.path.exists(os.path.join(run_dir, 'state.pt')):
            shutil.rmtree(run_dir, ignore_errors=True)  # it holds only this run's config.json: nothing to resume
        raise


def resumed_config(config, previous, args, from_epoch):
    """A resumed run's config.json: this process's `config`, with the run's first command, code and machine kept from
    `previous` and this resume added to its list; says what a change of machine does to exactness."""
    run_dir, world_size = args.resume, config['world_size']
    # from_epoch and, when --epoch changed, the plan before: the lr schedule was re-laid over the new one
    resume = dict(command=config['command'], git_commit=config['git_commit'], from_epoch=from_epoch,
                  **({'epoch_before': previous.get('epoch')} if previous.get('epoch') != args.epoch else {}),
                  **({'amp_before': previous['amp']} if previous.get('amp', args.amp) != args.amp else {}),
                  **{key: config[key] for key in MACHINE})
    last = previous['resumed'][-1] if previous.get('resumed') else previous
    last = last if isinstance(last, dict) else {}  # a hand-edited entry says nothing
    if str(resume['device_name']).startswith('cpu') and str(last.get('device_name')).startswith('cpu') \
            and last.get('cpu_threads') not in (None, resume['cpu_threads']):
        threads = f"{last['cpu_threads']} thread{'s' * (last['cpu_threads'] != 1)}"
        print(f"note: {run_dir} trained on the CPU with {threads}, now {resume['cpu_threads']}: "
              f"CPU kernels add up in another order, so the run goes on equal to rounding, not bit for bit; "
              f"OMP_NUM_THREADS={last['cpu_threads']} before the command continues it exactly", file=sys.stderr,
              flush=True)
    if args.prompt_dropout and args.prompts and previous.get('world_size', world_size) != world_size:
        print(f"note: {run_dir} ran in {previous['world_size']} process(es), now in {world_size}: the data order is "
              f"the same, but each process draws its own prompt-dropout masks, so the run goes on as it could have, "
              f"not bit for bit as it would have", file=sys.stderr, flush=True)
    return dict(config, command=previous.get('command'), git_commit=previous.get('git_commit'),
                **{key: previous.get(key) for key in MACHINE},  # None: an older vpt did not record it
                resumed=previous.get('resumed', []) + [resume])


def build_model(args, num_classes, device):
    """The run's model: the base ViT (hub, --weights or random) with prompts; -> (model, unfrozen parameter count)."""
    import torch
    from model import PromptedViT, create_vit, set_trainable
    if args.resume and args.weights:  # same path, other contents: another frozen backbone, without a word
        recorded = str(read_json(os.path.join(args.resume, 'config.json')).get('weights_id'))
        if 'sha256:' in recorded and weights_sha256(args.weights) != recorded.split('sha256:')[-1]:
            raise SystemExit(f"error: --weights {args.weights} is not the file {args.resume} was trained from (its "
                             f"sha256 differs from config.json's weights_id {recorded.split('sha256:')[-1][:12]}...); "
                             f"pass --weights with the file it was trained from")
    torch.manual_seed(args.seed)  # the random parts of the model (head, prompts, a random backbone) are reproducible
    vit = create_vit(args.model, num_classes, args.img_size, args.patch_size, args.pretrained, args.weights)
    model = PromptedViT(vit, args.prompts, args.deep, args.prompt_dropout, args.prompt_impl).to(device)
    unfrozen = set_trainable(model, args.full, unfreeze_patterns(args.unfreeze))
    return model, sum(param.numel() for name, param in model.vit.named_parameters() if name in set(unfrozen))


def load_splits(args, rank, world_size):
    """-> ({'train', 'val' (None without --val_split), 'test'}: (uint8 images, labels)), class names, the image
    counts of the train and test splits before --train_samples/--test_samples (config.json's dataset_images), the
    test images' names (data.load_dataset's), for test_predictions.csv, and each split's data_sha256."""
    import data
    if args.resume and args.dataset not in CIFAR and not os.path.isdir(args.dataset):
        raise SystemExit(f"error: the dataset folder of {args.resume}, {args.dataset}, is gone; if it moved, pass "
                         f"--dataset NEW_PATH (or, for a sweep's runs, link the old path to it)")
    if args.resume and args.test_split and os.path.isdir(os.path.join(args.dataset, 'test')):
        raise SystemExit(f"error: {args.resume} held out its test set from train/ (--test_split {args.test_split}), but "
                         f"{args.dataset} now has a test/ folder; pass --dataset with the run's own copy, or move test/ "
                         f"away")
    train_images, train_labels, test_images, test_labels, classes, available, test_names = load_data_once(
        args, rank, world_size)
    val, all_train_labels = None, train_labels
    if args.val_split:
        train_index, val_index = data.split_validation(train_labels, args.val_split, args.data_seed)
        val = (train_images[val_index], train_labels[val_index])
        train_images, train_labels = train_images[train_index], train_labels[train_index]
    splits = dict(train=(train_images, train_labels), val=val, test=(test_images, test_labels))
    digests = data_sha256(splits)
    if args.resume:  # other data first: what the counts below would say follows from it
        check_same_data(args, splits, classes, available, digests)
    check_splits(args, splits, classes, all_train_labels, rank)
    return splits, classes, available, test_names, digests


def check_splits(args, splits, classes, all_train_labels, rank):
    """Refuse splits a run cannot train on; warn (rank 0) where they differ from what the flags asked for."""
    train_labels, test_labels = splits['train'][1], splits['test'][1]
    val_labels = splits['val'][1] if splits['val'] else None
    for flag, asked, labels in (('train', args.train_samples, all_train_labels), ('test', args.test_samples,
                                                                                 test_labels)):
        if asked > len(labels) and rank == 0:  # config.json keeps both numbers; the log should say it too
            print(f"warning: --{flag}_samples {asked} is more than the {len(labels)} {flag} images there are; all are "
                  f"used", file=sys.stderr, flush=True)
    if args.val_split:
        per_class = "it is rounded per class: each holds out round(fraction x its images), keeping one to train on"
        if len(val_labels) == 0 or len(train_labels) == 0:
            fix = ("pick a fraction that leaves images on both sides" if all_train_labels.bincount().max() > 1 else
                   "no class has a second image to hold out: drop --val_split, or add images")
            raise SystemExit(f"error: --val_split {args.val_split} of {len(all_train_labels)} training images leaves "
                             f"{len(val_labels)} for validation and {len(train_labels)} for training ({per_class}); "
                             f"{fix}")
        held_out = len(val_labels) / len(all_train_labels)
        no_val = (all_train_labels.bincount(minlength=len(classes)) > 0) & (
            val_labels.bincount(minlength=len(classes)) == 0)
        if rank == 0 and (abs(held_out - args.val_split) >= 0.01 or no_val.any()):
            missing = f" and no image of {int(no_val.sum())} of the {len(classes)} classes" if no_val.any() else ''
            print(f"warning: --val_split {args.val_split} holds out {len(val_labels)} of {len(all_train_labels)} "
                  f"training images ({100 * held_out:.1f}%){missing}: {per_class}", file=sys.stderr, flush=True)
    for split, labels, consequence in (
            ('training', train_labels, "the model cannot learn them: " + (
                "raise --train_samples or use" if args.train_samples else "use") + " a dataset with images of every "
                "class"),
            ('test', test_labels, "test accuracy leaves them out" + (
                f": raise --test_samples to {len(classes)} or more" if 0 < args.test_samples < len(classes) else
                f" (--test_split {args.test_split} holds out round({args.test_split} x its images) of a class, keeping "
                f"one to train on: none of a class this small; raise --test_split, or add images)" if args.test_split
                else " (the dataset's test split has none of them)"))):
        absent = [name for name, count in zip(classes, labels.bincount(minlength=len(classes)).tolist()) if not count]
        if absent and rank == 0:
            print(f"warning: {len(absent)} of {len(classes)} classes have no {split} images ({', '.join(absent[:5])}"
                  f"{', ...' if len(absent) > 5 else ''}); {consequence}", file=sys.stderr, flush=True)
    if args.batch_size > len(train_labels) and not args.eval_only:  # evaluation pads its last batch
        raise SystemExit(f"error: --batch_size {args.batch_size} is larger than the {len(train_labels)} training "
                         f"images; lower --batch_size, e.g. --batch_size {small_batch(len(train_labels))}"
                         + (" (or raise --train_samples)" if args.train_samples else ''))


def small_batch(train_images):
    """A --batch_size to suggest for a small training set: a power of two giving at least 4 steps an epoch, under
    torchrun rounded down to a multiple of the process count."""
    processes = int(os.environ.get('WORLD_SIZE', '1'))
    batch = 2 ** max(0, int(math.log2(max(1, train_images // 4))))
    return max(processes, batch // processes * processes)


def check_resume_epoch(args, done):
    """A resume may lower --epoch, neither below the `done` epochs nor into the run's warmup. -> False when the run
    has finished all --epoch epochs already (nothing to train)."""
    config = read_json(os.path.join(args.resume, 'config.json'))
    smallest = smallest_resume_epoch(args, done, config.get('train_images'))
    if done > args.epoch:
        raise SystemExit(f"error: {args.resume} has already finished {done} epochs; --epoch {args.epoch} cannot undo "
                         f"them: pass --epoch {smallest} or more to train further")
    if args.warmup_epochs >= args.epoch:
        raise SystemExit(f"error: --epoch {args.epoch} would end {args.resume} within its {args.warmup_epochs:g} "
                         f"warmup epochs: the lr would never reach --lr nor decay; pass --epoch {smallest} or more")
    if done == args.epoch != config.get('epoch'):  # cut short here, it would stay unfinished: no result files
        raise SystemExit(f"error: {args.resume} stopped after {done} of its {config.get('epoch')} epochs; --epoch "
                         f"{args.epoch} would end it untrained and still unfinished: drop --epoch to resume it, or "
                         f"evaluate it as it is with --eval_only")
    return done < args.epoch


def smallest_resume_epoch(args, done, train_images=None):
    """The fewest epochs a resumed run can be set to: past the `done` ones, and past its warmup by at least one step
    of cosine decay (counted in steps when the number of training images is known)."""
    smallest = max(done + 1, math.floor(args.warmup_epochs) + 1)
    if train_images:
        import train
        per_epoch, warmup, _ = train.schedule_steps(train_images, args.batch_size, 1, args.warmup_epochs)
        if warmup and per_epoch:
            smallest = max(smallest, -(-(warmup + 2) // per_epoch))
    return smallest


def check_schedule(args, train_images, done=0):
    """parse_args compared --warmup_epochs with --epoch; in whole steps the cosine may still have no step to run.
    `done`: the epochs a resumed run has trained (a suggested --epoch must exceed them)."""
    import train
    per_epoch, warmup, total = train.schedule_steps(train_images, args.batch_size, args.epoch, args.warmup_epochs)
    if warmup and warmup >= total - 1:  # the warmup's last step is the peak; the decay starts the step after
        steps = f"{warmup} of the {total} steps ({per_epoch} per epoch): the lr would never decay"
        if args.resume:
            raise SystemExit(f"error: --epoch {args.epoch} would end {args.resume} inside its warmup "
                             f"({args.warmup_epochs:g} epochs, {steps}); pass --epoch "
                             f"{smallest_resume_epoch(args, done, train_images)} or more")
        largest = max(0, math.floor((total - 2) / per_epoch * 1e4))  # in 1e-4 epochs, rounded down, printed exactly
        raise SystemExit(f"error: --warmup_epochs {args.warmup_epochs:g} is {steps}; pass --warmup_epochs "
                         f"{f'{largest / 1e4:.4f}'.rstrip('0').rstrip('.') or 0} or less")


def check_same_data(args, splits, classes, available, digests):
    """A resumed or evaluated run must see the data it was trained on: a renamed class folder would reassign the
    labels, added images would change the numbers its records hold (and, under --train_samples/--test_samples, which
    images the subset keeps), a replaced image the pixels. Compared: the class names in order, the counts before and
    after subsetting, then the images and labels themselves (data_sha256, where recorded)."""
    config = read_json(os.path.join(args.resume, 'config.json'))
    differences = []
    if config.get('classes', classes) != classes:
        gone = [name for name in config['classes'] if name not in classes]
        new = [name for name in classes if name not in config['classes']]
        changes = [f"{', '.join(map(repr, names[:3]))}{' ...' if len(names) > 3 else ''} {what}"
                   for names, what in ((gone, 'gone'), (new, 'new')) if names]
        differences.append('classes ' + ' and '.join(changes) if changes else 'the classes are in another order')
    held = config.get('dataset_images', {})
    changed = [f"its {name} split holds {count} images where it held {held[name]}"
               for name, count in available.items() if held.get(name, count) != count]
    if not changed:  # the dataset's own counts agree, or were not recorded (older runs): the counts the run used
        sizes = {name: len(split[1]) if split else 0 for name, split in splits.items()}
        changed = [f"{name} has {count} images where the run had {config[f'{name}_images']}"
                   for name, count in sizes.items() if config.get(f'{name}_images', count) != count]
    differences += changed
    if not differences and config.get('data_sha256'):  # as many images: are they the same ones?
        differences = [f"its {name} images are not the run's (as many, but other pixels, another order or other "
                       f"classes: an image replaced, renamed or moved)" for name, digest in digests.items()
                       if config['data_sha256'].get(name, digest) != digest]
    if differences:
        raise SystemExit(f"error: --dataset {args.dataset} is not the data {args.resume} was trained on: "
                         f"{'; '.join(differences)}; restore it (or pass --dataset with the run's copy), or train a "
                         f"new run on this data")


def data_sha256(splits):
    """{split: sha256 of its uint8 images and labels, in order}: what a run trained and tested on, so a resume finds
    an image replaced, renamed into another place in the order, or moved to another class, which keep the counts."""
    digests = {}
    for name, split in splits.items():
        if split is not None:
            digest = hashlib.sha256(split[1].long().numpy().tobytes())
            digest.update(split[0].contiguous().numpy().data)
            digests[name] = digest.hexdigest()
    return digests


def checkpoint_path(args):
    return os.path.join(args.resume, 'best.safetensors' if args.checkpoint == 'best' else 'trainable.safetensors')


def evaluate_checkpoint(args, model, splits, classes, test_names, device):
    """--eval_only: the checkpoint's accuracy on val (if the run has a split) and test, its confusion matrix
    (confusion.csv, or confusion_best.csv for --checkpoint best), each test image's prediction (test_predictions.csv,
    named alike) and per-class accuracy (in summary.json)."""
    import data
    import train
    with said_once():
        epoch = train.load_trainable(checkpoint_path(args), model)
    preprocess = data.preprocessing(model.vit.pretrained_cfg, device, args.img_size)
    results = {}
    on_device = train.splits_to_device(dict(val=splits['val'], test=splits['test']), device)
    for name, split in on_device.items():
        if split is not None:
            with train.explain_out_of_memory(args.batch_size, args.amp, f'evaluating {name}'):
                results[name] = train.evaluate_split(model, split, args.batch_size, preprocess, args.amp,
                                                     name == 'test')  # per image
    if train.rank_and_world_size()[0] != 0:
        return
    # the last checkpoint of an unfinished run is not the run's result: its matrix is named by its epoch
    planned = read_json(os.path.join(args.resume, 'config.json')).get('epoch', epoch)  # not an --epoch given here
    suffix = '_best' if args.checkpoint == 'best' else '' if epoch >= planned else f'_epoch{epoch}'
    loss, acc, confusion, (predicted, probability) = results['test']
    per_class = train.per_class_accuracy(confusion, classes)
    per_image = train.predictions_bytes(test_names, splits['test'][1], predicted, probability, classes, args.checkpoint,
                                        epoch)
    report = []
    if 'val' in results:
        report.append(f"{args.resume} ({args.checkpoint}, epoch {epoch}): val accuracy {results['val'][1]:.4f}% "
                      f"on {len(splits['val'][1])} images")
    report.append(f"{args.resume} ({args.checkpoint}, epoch {epoch}): test accuracy {acc:.4f}% test loss {loss:.6f} "
                  f"on {len(splits['test'][1])} images")
    names = {name: shown(name) for name in per_class}
    width = max(map(shown_width, names.values()))
    counts = zip(confusion.diagonal().tolist(), confusion.sum(1).tolist())  # a class of 3 images says so
    count_width = len(str(confusion.sum(1).max().item()))
    report += [f"  {padded(names[name], width)}  " + (f"{100 * right / total:7.2f}%  ({right:>{count_width}} of "
                                                       f"{total})" if total else '      -  (no test images)')
               for name, (right, total) in zip(per_class, counts)]  # from the counts: per_class has 4 decimals
    try:  # the files first, so that a reader gone (| head) does not stop them; the report even if they fail (disk full)
        said, stream = write_evaluation(args, epoch, suffix, confusion, per_class, classes, per_image)
    finally:
        print('\n'.join(report), flush=True)
    print(said, file=stream)


def write_evaluation(args, epoch, suffix, confusion, per_class, classes, per_image):
    """--eval_only's confusion<suffix>.csv and test_predictions<suffix>.csv, and per_class_acc<suffix> in
    summary.json unless the checkpoint is named by its epoch; -> (what it did, the stream to say it on)."""
    import train
    summary_path = os.path.join(args.resume, 'summary.json')
    describes_the_run = not suffix.startswith('_epoch')  # _epochN names its checkpoint; the others, what is there now
    lock = try_lock_run(args.resume) if describes_the_run else None  # held while writing: no training can begin
    try:
        changed = describes_the_run and checkpoint_changed(args, epoch, lock)
        if changed:
            return (f"note: {changed}: confusion{suffix}.csv, test_predictions{suffix}.csv and per_class_acc{suffix} "
                    f"would not describe its {args.checkpoint} checkpoint, so they are not written; evaluate again "
                    f"once it has stopped", sys.stderr)
        # read before anything is written: a damaged summary.json refuses with the run's files as they were
        summary = (read_json(summary_path) if os.path.isfile(summary_path) else {}) if describes_the_run else {}
        if not isinstance(summary, dict):
            raise SystemExit(f"error: {summary_path} is not a vpt run's summary (not a JSON object); the run "
                             f"directory is damaged")
        written = [os.path.join(args.resume, f'{name}{suffix}.csv') for name in ('confusion', 'test_predictions')]
        files = {written[0]: train.confusion_bytes(confusion, classes), written[1]: per_image}
        wrote = f"wrote {written[0]}{',' if describes_the_run else ' and'} {written[1]}"
        if describes_the_run:  # with the CSVs, all three or none
            summary[f'per_class_acc{suffix}'] = per_class
            files[summary_path] = train.json_bytes(summary)
            wrote += f" and per_class_acc{suffix} in {summary_path}"
        train.write_files(files, then='evaluate again')
        return wrote, sys.stdout
    finally:
        if lock is not None:
            os.close(lock)


def checkpoint_changed(args, epoch, lock):
    """Why --eval_only's files would not describe the run's checkpoint it evaluated at `epoch`, or None: training
    replaces best.safetensors, or (resumed) a finished run's last checkpoint. `lock`: try_lock_run's."""
    import train
    if lock is None:
        return f"{args.resume} is being trained by another process"
    try:
        now = train.checkpoint_epoch(checkpoint_path(args))
    except Exception as e:  # removed or damaged meanwhile
        now = type(e).__name__
    return None if now == epoch else f"{checkpoint_path(args)} changed while this evaluated its epoch {epoch} " \
                                      f"(now: {now})"


def load_model(run_dir, checkpoint='last', device='auto', weights=None):
    """A run's model in your own Python (a notebook, your own look at its prompts or its errors):

        model, classes, to_input = main.load_model('logs/<run>', checkpoint='best')
        logits = model(to_input(images))  # images: uint8 (N, 3, H, W), resized to the run's --img_size

    -> the model in eval mode on `device` (auto: CUDA when there is one), built as --eval_only and --predict build
    it (the run's base weights, then its checkpoint's trainable tensors), its class names, and the function that
    normalises images as the run's batches were. It computes in fp32 unless called under torch.autocast. `weights`
    is --weights: the run's base weights file where it moved to. A mistake (no such run, a missing best.safetensors)
    is a SystemExit whose one line is printed first, as on the command line."""
    import torch
    import data
    import train
    argv = ['--resume', os.fspath(run_dir), '--eval_only', '--checkpoint', checkpoint, '--device', str(device)]
    args = parse_args(argv + (['--weights', os.fspath(weights)] if weights is not None else []))
    with said_once():  # printed, as parse_args prints its own
        device = train.pick_device(args.device)
        # build_model seeds torch with the run's --seed: the notebook's own random numbers go on as they were
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            model, classes, _ = checkpoint_model(args, device)
    mean, std, img_size = data.preprocessing(model.vit.pretrained_cfg, device, args.img_size)

    def to_input(images):
        check_uint8_images(images)
        return data.model_input(images.to(mean.device), mean, std, img_size)
    return model.eval(), classes, to_input


def check_uint8_images(images):
    """load_model's to_input divides by 255: float images in [0, 1] (torchvision's ToTensor) would give wrong
    predictions without a word, and (N, H, W, 3) ones (numpy's layout for PIL images) an error about tensor sizes."""
    import torch
    shape = tuple(getattr(images, 'shape', ()))
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        given = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        channels_last = '.permute(0, 3, 1, 2)' if len(shape) == 4 and shape[3] == 3 else ''  # PIL's layout in numpy
        raise ValueError(f"to_input takes a uint8 torch tensor (N, 3, H, W) of 0-255 pixels, got {given}; for floats "
                         f"in [0, 1] pass (images * 255).round().to(torch.uint8), for numpy "
                         f"torch.from_numpy(images){channels_last}")
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"to_input takes images of shape (N, 3, H, W), got {shape}; "
                         + ("for (N, H, W, 3) pass images.permute(0, 3, 1, 2)" if len(shape) == 4 and shape[3] == 3
                            else "for one (3, H, W) image pass image[None]" if len(shape) == 3 and shape[0] == 3
                            else "stack RGB images (image.convert('RGB') in PIL) into a batch"))


def checkpoint_model(args, device):
    """The model of run args.resume with its --checkpoint's trainable tensors -> (model, classes, the epoch saved)."""
    import train
    classes = read_json(os.path.join(args.resume, 'config.json'))['classes']
    model, _ = build_model(args, len(classes), device)
    epoch = train.load_trainable(checkpoint_path(args), model)
    if epoch == 0:
        try:
            summary = read_json(os.path.join(args.resume, 'summary.json'))
        except SystemExit:  # missing or damaged: this warning's hint is no reason to stop
            summary = None
        # a resume of a run that diverged keeps its --lr and diverges again
        fix = ("the run diverged (a non-finite loss): start a new run with a lower --lr"
               if isinstance(summary, dict) and summary.get('diverged') else "resume the run to train it")
        print(f"warning: {checkpoint_path(args)} was saved before the run's first epoch ended: its head is untrained, "
              f"so its predictions are chance; {fix}", file=sys.stderr, flush=True)
    return model, classes, epoch


def predict(args, device):
    """--predict: classify image files (and the images in folders) with the run's model; print a table and write
    a CSV. Images are resized to --img_size and normalised as the run's batches were."""
    import torch
    import data
    import train
    model, classes, epoch = checkpoint_model(args, device)  # one process: main refuses --predict under torchrun
    out = args.out or train.fresh_path(os.path.join(args.resume, 'predictions.csv'))
    check_writable_file(out)
    paths = image_paths(args.predict)
    preprocess = data.preprocessing(model.vit.pretrained_cfg, device, args.img_size)
    model.eval()
    rows, top, skipped = [], min(5, len(classes)), 0
    for start in range(0, len(paths), args.batch_size):
        chunk, inputs = [], []
        for path in paths[start:start + args.batch_size]:
            try:  # as the run's folder images were read
                image = data.read_image(path, args.img_size if folder_reading(args) >= 2 else None, larger_only=True,
                                        upright=folder_reading(args) >= 4, draft=folder_reading(args) >= 5)
            except Exception as e:  # Pillow raises OSError, ValueError, DecompressionBombError...
                print(f"skipping {path}: cannot read it as an image ({type(e).__name__}: {e})", file=sys.stderr)
                skipped += 1
                continue
            chunk.append(path)
            inputs.append(data.model_input(torch.tensor(image).permute(2, 0, 1)[None].to(device), *preprocess))
        if not chunk:
            continue
        with train.explain_out_of_memory(args.batch_size, args.amp, 'predicting'), torch.no_grad(), \
                train.autocast(device, args.amp):
            probs = model(torch.cat(inputs)).float().softmax(1)
        values, indices = probs.topk(top, dim=1)
        for path, value, index in zip(chunk, values.tolist(), indices.tolist()):
            rows.append([path, classes[index[0]], f"{value[0]:.4f}",
                         '; '.join(f"{classes[i]} {v:.4f}" for i, v in zip(index, value)), args.checkpoint, epoch])
    if not rows:
        raise SystemExit(f"error: none of {', '.join(args.predict)} could be read as an image; pass image files "
                         f"({', '.join(data.IMAGE_EXTENSIONS)}) or folders holding them")
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['file', 'prediction', 'probability', f'top{top}', 'checkpoint', 'epoch'])  # which model said it
    writer.writerows(rows)
    chosen, out = out, train.write_new(out, train.csv_bytes(buffer.getvalue()), then='classify the images again')
    if out != chosen:
        print(f"note: {chosen} was written by another process meanwhile; kept it and wrote {out}", file=sys.stderr)
    table = [[shown(cell) for cell in row[:4]] for row in rows[:PREDICTIONS_SHOWN]]  # 10,000 rows: the CSV's job
    width = max(shown_width(row[0]) for row in table)
    label_width = max(len('prediction'), *(shown_width(row[1]) for row in table))
    print(f"{padded('file', width)}  {padded('prediction', label_width)}  prob    top-{top}")
    for path, label, prob, best in table:
        print(f"{padded(path, width)}  {padded(label, label_width)}  {prob}  {best}")
    if len(rows) > len(table):
        print(f"... and {len(rows) - len(table)} more in {out}")
    print(f"{len(rows)} image{'s' * (len(rows) != 1)} classified by {args.resume} ({args.checkpoint}, epoch {epoch}); "
          f"wrote {out}"
          + (f"; {skipped} unreadable file{'s' * (skipped > 1)} skipped (above)" if skipped else ''))


def shown(text):
    """text as one terminal line shows it: control characters (a newline in a file name) escaped as Python would, and
    a name's bytes that are not UTF-8 (os.listdir's surrogates) as \\xNN, by the codecs' rule the CSVs are written
    with (train.utf8_text; main.py imports no torch at module level, so the rule is spelled here again)."""
    text = text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    return ''.join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def shown_width(text):
    """Terminal columns of text: wide (CJK) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in 'WF' else 1
               for char in text)


def padded(text, width):
    return text + ' ' * (width - shown_width(text))


def image_paths(paths):
    """Files as given; folders walked for image files, listed as a file browser lists them (img2 before img10). A
    missing path or a folder without images is an error before any work: a CSV without them would look complete."""
    import data
    found = []
    for path in paths:
        if os.path.isdir(path):
            unread = []
            images = data.image_files(path, unread=unread)
            unread_text = data.unread_files([os.path.relpath(file, path) for file in unread]) if unread else ''
            if not images:
                raise SystemExit(f"error: no image files ({', '.join(data.IMAGE_EXTENSIONS)}) in {path}"
                                 + (f"; its {unread_text} in a format not read: convert to JPEG or PNG" if unread
                                    else ''))
            if unread:  # the CSV would look complete without them
                print(f"warning: {path}: {unread_text} in a format not read, not classified; convert to JPEG or PNG "
                      f"to classify", file=sys.stderr, flush=True)
            found += sorted(images, key=natural_order)
        elif os.path.exists(path):
            found.append(path)
        else:
            raise SystemExit(f"error: --predict {path}: no such file or folder")
    return found


def natural_order(path):
    """Sort key: runs of digits compare as numbers (frame_9 before frame_10), the rest as text whatever its case
    (apple before Banana); names equal but for case keep image_files' order."""
    return [int(part) if i % 2 else part.casefold() for i, part in enumerate(re.split('([0-9]+)', path))]  # odd: digits


def check_writable_file(path):
    if os.path.isdir(path):
        raise SystemExit(f"error: --out {path} is a directory; pass a file name such as "
                         f"{os.path.join(path, 'predictions.csv')}")
    if os.path.lexists(path):  # a link to a missing file too: nothing is written through a link
        raise SystemExit(f"error: --out {path} already exists and predictions never replace a file; pass a new name, "
                         f"or drop --out to write a fresh predictions-N.csv in the run directory")
    blocked = not_creatable(os.path.dirname(os.path.abspath(path)))  # missing folders are made as it is written
    if blocked:
        raise SystemExit(f"error: cannot write {path} ({blocked}); choose another --out")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except PermissionError:  # not damaged: another user's file, or one made unreadable
        raise SystemExit(f"error: cannot read {path} (permission denied); make it readable (chmod u+r, or ask its "
                         f"owner)")
    except (OSError, ValueError, RecursionError) as e:  # ValueError: also JSON's and the digit limit's
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}: {e}); the run directory is damaged")


def script_path(path):
    """A script (main.py, sweep.py) as a recorded or printed command names it: its bare name when run from its own
    folder, as a user types it there; absolute from anywhere else, as the command is kept without its directory."""
    try:
        here = os.getcwd()
    except OSError:  # the current directory was removed
        return path
    return os.path.basename(path) if os.path.dirname(path) == here else path


def provenance(args, argv, world_size, device):
    """What makes a run's numbers traceable: the command, the code, the software and hardware, the weights."""
    import PIL
    import torch
    import timm
    import train
    if args.weights:
        weights = f"file {os.path.abspath(args.weights)} sha256:{weights_sha256(args.weights)}"
    elif args.pretrained:
        cfg = timm.models.get_pretrained_cfg(args.model)
        weights = f"hf-hub:{cfg.hf_hub_id if cfg and cfg.hf_hub_id else args.model}"
    else:
        weights = 'random init (--pretrained False)'
    return dict(command=f"{train.launcher(world_size)} {shlex.join(argv)}", git_commit=git_commit(),
                device_name=train.device_name(device), torch_version=torch.__version__,
                timm_version=timm.__version__, pillow_version=PIL.__version__, cuda_version=torch.version.cuda,
                cudnn_version=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                cpu_threads=torch.get_num_threads(),  # CPU kernels add up in an order that depends on it
                amp_dtype=train.amp_name(device, args.amp), weights_id=weights)


def git_commit(folder=os.path.dirname(os.path.abspath(__file__))):
    """The commit of this code, '-dirty' when its tracked code (Python files, requirements.txt) differs from it; None
    outside a git checkout. Other files leave it clean: an edited README, or the old bench JSON deleted for a new one."""
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=folder, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = commit and subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '*.py',
                                           'requirements.txt'], cwd=folder, capture_output=True, text=True,
                                          timeout=10).stdout.strip()
        return commit and commit + ('-dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return None


def weights_sha256(path):
    sha256 = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            sha256.update(block)
    return sha256.hexdigest()


def killed_before_its_first_checkpoint(path):
    """A run directory that a new run made and was killed in (kill -9, the out-of-memory killer) before its first
    state.pt: what it can hold by then (config.json, trainable.safetensors, write_files' temps), no process training
    it. A run that stopped otherwise removed its directory."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if not all(name in ('config.json', 'trainable.safetensors') or re.fullmatch(r'.+\.tmp\d+', name)
               for name in names):
        return False
    # still starting, or killed; waiting out a moment's hold: under torchrun every process checks, each taking the lock
    descriptor = try_lock_run(path)
    if descriptor is None:
        return False
    os.close(descriptor)
    return True


def check_log_dir(args):
    """Fail before any work if the run directory cannot be made, or a resumed run's written; create nothing yet."""
    if args.resume:
        writes = ('its predictions' if args.predict else "its confusion matrix, per-class accuracy and each test "
                  "image's prediction" if args.eval_only else 'its checkpoints')
        if not (args.predict and args.out) and not os.access(args.resume, os.W_OK | os.X_OK):
            raise SystemExit(f"error: cannot write to {args.resume} ({writes} go there); make it writable, or work "
                             f"on a copy of the run" + (", or pass --out FILE" if args.predict else ''))
        return
    if args.name and killed_before_its_first_checkpoint(os.path.join(args.log_dir, args.name)):
        path = os.path.join(args.log_dir, args.name)  # --resume says it has nothing to resume: not a way out
        raise SystemExit(f"error: run {path} already exists but holds no checkpoint: it was killed before its first, "
                         f"so there is nothing to resume; remove it (rm -r {shlex.quote(path)}) and run the command "
                         f"again, or pick another --name")
    if args.name and os.path.exists(os.path.join(args.log_dir, args.name)):
        raise SystemExit(f"error: run {os.path.join(args.log_dir, args.name)} already exists; pick another --name, "
                         f"or continue it with --resume {os.path.join(args.log_dir, args.name)}")
    blocked = not_creatable(args.log_dir)
    if blocked:
        raise SystemExit(f"error: cannot write to --log_dir {args.log_dir} ({blocked}); choose a writable --log_dir")


def not_creatable(path):
    """Why creating the folder `path` would fail, naming the closest existing path at or above it, when that is not a
    writable directory ('/data is not a writable directory'); None when `path` can be made (or is a writable
    directory)."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):  # a link to a missing folder (a drive not mounted) is in the way too
        existing = os.path.dirname(existing)
    if os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK):
        return None
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"{existing} is a link to a missing folder, {os.readlink(existing)}"
    return f"{existing} is not a writable directory"


def make_run_dir(args, mode):
    """Create the run's directory; never reuse one that exists."""
    name = args.name or f"{mode}_{args.model}_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    for attempt in range(1, 100):
        path = os.path.join(args.log_dir, name if attempt == 1 else f"{name}-{attempt}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            if args.name:
                raise SystemExit(f"error: run {path} already exists; pick another --name")
        except OSError as e:
            raise SystemExit(f"error: cannot create {path} ({e.strerror or e}); choose a writable --log_dir")
    raise SystemExit(f"error: could not create a fresh run directory under {args.log_dir}")


def not_posix():
    """Why this system cannot run vpt, or None: run directories (and sweeps) are locked with fcntl, which Windows
    lacks."""
    import importlib
    try:
        importlib.import_module('fcntl')
    except ImportError:
        return ("vpt needs a POSIX system such as Linux or macOS (it locks run directories with fcntl); on Windows, "
                "run it in WSL2")
    return None


def lock_run(run_dir):
    """-> a file descriptor holding the run directory's lock (close it to release): one process trains a run at a
    time, as two (a second --resume, a sweep's --print_commands run by hand) would interleave their checkpoints and
    metrics. The lock is on the directory itself, so nothing is written, and it goes with the process however it ends."""
    descriptor = try_lock_run(run_dir)
    if descriptor is None:
        raise SystemExit(f"error: {run_dir} is being trained by another process; let it finish, or stop it (it keeps "
                         f"its last epoch) and --resume {run_dir}")
    return descriptor


def try_lock_run(run_dir, wait_s=0.5):
    """lock_run's lock, or None while another process holds it after `wait_s` seconds (an --eval_only holds it for the
    milliseconds it writes)."""
    import fcntl
    try:
        descriptor = os.open(run_dir, os.O_RDONLY)
    except OSError as e:
        raise SystemExit(f"error: cannot open {run_dir} to lock it ({e.strerror}); make it readable (chmod u+r)")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return descriptor
        except OSError:
            if time.monotonic() >= deadline:
                os.close(descriptor)
                return None
            time.sleep(0.05)


def load_data_once(args, rank, world_size):
    """Each process holds the whole dataset; the first process on each machine downloads it, the others wait."""
    import data
    import torch.distributed as dist
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if world_size > 1 and local_rank != 0:
        dist.barrier()
    try:
        loaded = data.load_dataset(args.dataset, args.data_dir, args.img_size, args.train_samples,
                                   args.test_samples, args.data_seed, folder_reading(args), args.test_split,
                                   names=True)
    except SystemExit:  # a problem of the data, which every process then finds alike (said once: said_once)
        if world_size > 1 and local_rank == 0:
            dist.barrier()  # release the processes waiting for this download or check; they fail the same way
        raise
    if world_size > 1 and local_rank == 0:
        dist.barrier()
    return loaded


def folder_reading(args):
    """How a folder dataset is read (data.FOLDER_READING): a resumed run's own way, the current one for a new run."""
    import data
    return getattr(args, 'folder_reading', data.FOLDER_READING)


def broadcast_run_dir(run_dir, world_size):
    if world_size == 1:
        return run_dir
    import torch.distributed as dist
    holder = [run_dir]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def exit_now(status):
    """-> a signal handler that ends the process at once with `status` (end_process): once main() has returned or
    exited, a run is saved and said, and a signal as the process exits, or a repeat of the one that stopped it
    (sweep.py and torchrun forward the terminal's), must neither turn the exit status into a kill nor wait."""
    return lambda signum, frame: end_process(status)


def end_process(status):
    """Flush the output and end the process with `status`. main.py's last atexit handler: the libraries' own have
    run, and what Python's shutdown does next is free torch's modules (0.8 s on the CPU VM), with SIGINT and SIGTERM
    back at their default action, a kill: a Ctrl-C then ended a finished run with status -2."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == '__main__':
    for signum in (signal.SIGINT, signal.SIGTERM):  # main() sets its own handlers, and puts these back
        signal.signal(signum, signal.SIG_IGN)
    status = 1  # an error's: a traceback, or main.py's one line
    atexit.register(lambda: end_process(status))  # the first registered runs last; reads `status` at exit
    try:
        main()
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        raise
    except BrokenPipeError:  # the reader went away (| head): stop with a line, not a traceback; files are written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes stdout
        sys.exit("main.py: stopped: the program reading its output (head, say) exited")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, exit_now(status))
