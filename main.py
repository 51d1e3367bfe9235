"""vpt: Visual Prompt Tuning of a ViT-B/4 (timm ViT-B/16 IN-21k weights resampled to 4x4 patches) on CIFAR or a folder.

    python main.py                                            # P: prompt tuning, backbone frozen
    python main.py --full True --prompts 0                    # F: full fine-tuning
    python main.py --full True --prompts 50                   # P+F
    python main.py --resume logs/<run>                        # continue a run where it stopped
    torchrun --nproc_per_node=8 main.py ...                   # data parallel; --batch_size stays the global batch
"""
import argparse
import datetime
import json
import os
import sys

# flags a resumed run may change; every other flag belongs to the run and must match its config.json
RESUME_MAY_CHANGE = {'epoch', 'device', 'data_dir', 'compile', 'amp', 'eval_only', 'resume'}
# AdamW defaults per mode (batch 128): prompt tuning behind a frozen backbone takes a far larger lr than full tuning
DEFAULT_LR = {'P': 5e-3, 'linear': 5e-3, 'F': 1e-4, 'P+F': 1e-4}
DEFAULT_WEIGHT_DECAY = {'P': 1e-4, 'linear': 1e-4, 'F': 0.05, 'P+F': 0.05}


def str2bool(text):
    value = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True/False (or true/false, 1/0, yes/no), got {text!r}")
    return value


def int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def non_negative(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


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
    add('--seed', type=int, default=0, help='seeds model init, data order and augmentation')
    add('--lr', type=non_negative, default=None, help='AdamW peak lr (default 5e-3 for P/linear, 1e-4 for F/P+F)')
    add('--weight_decay', type=non_negative, default=None, help='AdamW weight decay (default 1e-4 P/linear, 0.05 F/P+F)')
    add('--warmup_epochs', type=non_negative, default=None,
        help='linear warmup length in epochs, may be fractional (default: 10%% of --epoch), then cosine to zero')
    add('--model', default='vit_base_patch16_224.augreg_in21k', help='timm ViT name (default: ViT-B/16 IN-21k)')
    add('--pretrained', type=str2bool, default=True, help='load pretrained weights (False: random backbone)')
    add('--weights', default=None, metavar='FILE',
        help='local timm checkpoint (.safetensors/.pth) instead of the hub download, for offline use')
    add('--img_size', type=int_at_least(1), default=32, help='input resolution (default 32)')
    add('--patch_size', type=int_at_least(1), default=4, help='patch size the embedding is resampled to (default 4)')
    add('--dataset', default='cifar10', help='cifar10, cifar100, or a folder with train/<class>/* and test/<class>/*')
    add('--data_dir', default='./data', help='where CIFAR is found or downloaded (default ./data)')
    add('--train_samples', type=int_at_least(0), default=0, help='use a seeded class-balanced subset (0: all)')
    add('--test_samples', type=int_at_least(0), default=0, help='likewise for the test set (0: all)')
    add('--device', default='auto', help='auto (CUDA when available), cpu, cuda or cuda:N')
    add('--amp', type=str2bool, default=True, help='bf16 autocast on CUDA (default True)')
    add('--compile', type=str2bool, default=False, help='torch.compile the model')
    add('--log_dir', default='logs', help='parent of the run directories (default logs/)')
    add('--name', default=None, help='run directory name (default: mode, model and time)')
    add('--resume', default=None, metavar='RUN_DIR', help='continue the run in RUN_DIR from its last finished epoch')
    add('--eval_only', type=str2bool, nargs='?', const=True, default=False,
        help='with --resume: evaluate the run\'s checkpoint on the test set and exit')
    return parser


def parse_args(argv=None):
    parser = make_parser()

    def error(message):  # one line, no usage dump
        print(f"main.py: error: {message} (python main.py --help lists the flags)", file=sys.stderr)
        sys.exit(2)
    parser.error = error
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    if args.resume:
        args = merge_resume(args, given, error)
    elif args.eval_only:
        error("--eval_only needs --resume RUN_DIR: the run whose checkpoint to evaluate")
    if args.img_size % args.patch_size:
        error(f"--img_size {args.img_size} is not divisible by --patch_size {args.patch_size}; "
              f"pick sizes such as --img_size 32 --patch_size 4")
    if args.weights and 'pretrained' in given and not args.pretrained:
        error("--weights loads pretrained weights but --pretrained False asks for none; drop one of them")
    if args.name and os.sep in args.name:
        error(f"--name {args.name!r} must be a plain directory name; put the parent in --log_dir")
    mode = mode_of(args)
    args.lr = DEFAULT_LR[mode] if args.lr is None else args.lr
    args.weight_decay = DEFAULT_WEIGHT_DECAY[mode] if args.weight_decay is None else args.weight_decay
    args.warmup_epochs = 0.1 * args.epoch if args.warmup_epochs is None else args.warmup_epochs
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


def merge_resume(args, given, error):
    run_dir = args.resume.rstrip('/') or args.resume
    config_path = os.path.join(run_dir, 'config.json')
    if not os.path.isfile(os.path.join(run_dir, 'state.pt')) or not os.path.isfile(config_path):
        error(f"--resume {run_dir}: no checkpoint there (config.json and state.pt); pass a run directory "
              f"such as logs/<run> that an earlier run wrote")
    with open(config_path) as f:
        config = json.load(f)
    for flag in sorted(given - RESUME_MAY_CHANGE):
        if flag in config and getattr(args, flag) != config[flag]:
            error(f"--{flag} {getattr(args, flag)} contradicts the run's config ({flag}={config[flag]}); "
                  f"drop --{flag} to resume {run_dir}, or start a new run")
    merged = dict(vars(args))
    merged.update({key: value for key, value in config.items() if key in merged and key not in given & RESUME_MAY_CHANGE})
    merged['resume'] = run_dir
    return argparse.Namespace(**merged)


def mode_of(args):
    return ('P+F' if args.prompts else 'F') if args.full else ('P' if args.prompts else 'linear')


def main(argv=None):
    args = parse_args(argv)
    mode = mode_of(args)
    check_log_dir(args)

    import torch
    import timm
    import data
    import train
    from model import PromptedViT, check_model_args, count_params, create_vit, set_trainable

    check_model_args(args.model, args.weights)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))  # set by torchrun
    if args.batch_size % world_size:
        raise SystemExit(f"error: --batch_size {args.batch_size} does not divide by the {world_size} processes; "
                         f"--batch_size is the global batch, use a multiple of {world_size}")
    rank, world_size, device = train.setup_distributed(args.device)

    *splits, classes = load_data_once(args, rank, world_size)
    if args.batch_size > len(splits[1]):
        raise SystemExit(f"error: --batch_size {args.batch_size} is larger than the {len(splits[1])} training "
                         f"images; lower --batch_size (or raise --train_samples)")

    torch.manual_seed(args.seed)  # the random parts of the model (head, prompts, a random backbone) are reproducible
    vit = create_vit(args.model, len(classes), args.img_size, args.patch_size, args.pretrained, args.weights)
    model = PromptedViT(vit, args.prompts, args.deep, args.prompt_dropout, args.prompt_impl).to(device)
    set_trainable(model, args.full)
    trainable, total = count_params(model, trainable_only=True), count_params(model)

    if args.eval_only:
        epoch = train.load_trainable(args.resume, model)
        norm = data.norm_tensors(vit.pretrained_cfg, device)
        loss, acc = train.evaluate(model, splits[2].to(device), splits[3].to(device), args.batch_size, norm,
                                   args.amp, device, rank, world_size)
        if rank == 0:
            print(f"{args.resume} (epoch {epoch}): test accuracy {acc:.4f}% test loss {loss:.6f} "
                  f"on {len(splits[3])} images")
        return

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = args.resume
    if rank == 0:
        print(f"mode {mode}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%); "
              f"{len(splits[1])} train / {len(splits[3])} test images, {len(classes)} classes; device {device}"
              + (f" x{world_size}" if world_size > 1 else ''), flush=True)
        if run_dir is None:
            run_dir = make_run_dir(args, mode)
            args.name = os.path.basename(run_dir)
        flags = {key: value for key, value in vars(args).items() if key not in ('resume', 'eval_only')}
        train.write_config(run_dir, dict(flags, mode=mode, trainable_params=trainable, total_params=total,
                                         num_classes=len(classes), classes=classes, world_size=world_size,
                                         prompt_impl=model.prompt_impl, device_name=device_name(device),
                                         torch_version=torch.__version__, timm_version=timm.__version__))
        print(f"run directory: {run_dir}", flush=True)
    run_dir = broadcast_run_dir(run_dir, world_size)
    train.fit(model, splits, args, run_dir, rank, world_size, device, resume=bool(args.resume))


def check_log_dir(args):
    """Fail before any work if the run directory cannot be made; create nothing yet."""
    if args.resume:
        return
    if args.name and os.path.exists(os.path.join(args.log_dir, args.name)):
        raise SystemExit(f"error: run {os.path.join(args.log_dir, args.name)} already exists; pick another --name, "
                         f"or continue it with --resume {os.path.join(args.log_dir, args.name)}")
    existing = os.path.abspath(args.log_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: cannot write to --log_dir {args.log_dir} ({existing} is not a writable directory); "
                         f"choose a writable --log_dir")


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


def load_data_once(args, rank, world_size):
    """Each process holds the whole dataset; the first process on each machine downloads it, the others wait."""
    import data
    import torch.distributed as dist
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if world_size > 1 and local_rank != 0:
        dist.barrier()
    loaded = data.load_dataset(args.dataset, args.data_dir, args.img_size, args.train_samples,
                               args.test_samples, args.seed)
    if world_size > 1 and local_rank == 0:
        dist.barrier()
    return loaded


def broadcast_run_dir(run_dir, world_size):
    if world_size == 1:
        return run_dir
    import torch.distributed as dist
    holder = [run_dir]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def device_name(device):
    import platform
    import torch
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == '__main__':
    main()
