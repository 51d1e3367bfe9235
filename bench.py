"""bench: training/evaluation throughput, memory, TFLOP/s and MFU of the vpt modes on synthetic CIFAR-shaped data,
against the seed's recipe (fp32, naive prompts, a torchvision DataLoader of PIL images) measured in the same run.

    python bench.py                                        # P, F, P+F at batch 512 + the seed baseline, on CUDA if any
    python bench.py --compile True --json bench.json       # also write every number as JSON
    python bench.py --prompt_impl naive --modes P          # the concatenating prompt implementation
    python bench.py --device cpu --model test_vit --batch_size 8 --steps 2 --warmup 1 --eval_steps 2 --baseline_steps 2

Data: random uint8 (N, 3, 32, 32) images and random labels (10 classes) held on the device, batched by
data.train_batches (random crop + flip on the device) and data.eval_batches, as train.py does with CIFAR.
The backbone is randomly initialised (--model built with pretrained=False): speed does not depend on the weights.
Modes: P = prompts + head (backbone frozen), F = full fine-tuning without prompts, P+F = full fine-tuning with prompts.
The modes are timed through train.train_epoch and train.evaluate themselves, the code main.py runs: bf16 autocast on
CUDA (--amp; fp16 with loss scaling on GPUs before Ampere), fused AdamW (train.make_optimizer), loss/accuracy summed
on the device with a host sync every train.SYNC_EVERY steps for the progress bar; TF32 on.

FLOP convention (analytic, so that TFLOP/s and MFU compare across --prompt_impl and --compile):
- forward FLOPs = 2 x multiply-accumulates of the NAIVE path, the whole sequence of 1 + num_patches + prompts
  tokens through every block: per block with T tokens, width d, MLP hidden h:
  T*3d*d (qkv) + 2*T*T*d (QK^T and AV) + T*d*d (proj) + 2*T*d*h (MLP); plus the patch embedding
  (num_patches * 3*p*p * d) and the head (d * classes). Norms, softmax, GELU, biases and residuals are not counted.
  ViT-B/4 at 32x32 (d 768, 12 blocks, h 3072, 64 patches) gives 20.03 GFLOP/image with 50 prompts, 11.20 without.
- the KV-only path (--prompt_impl kv, model.py's default) is printed for information: prompt rows only get the
  K/V projection, and the last block computes only the CLS row past K/V: 11.96 GFLOP/image with 50 prompts when the
  prompt K/V is counted per image; model.py computes it once per batch when prompt dropout is off ("as run").
- training FLOPs per image = the forward plus the gradients computed, part by part (TRAIN_FACTORS): 3x forward when
  the backbone trains (F, P+F; the patch embedding 2x, its input being the image); in P the frozen linear layers 2x
  (input gradients back to the prompts), attention's two products 3x (both operands are activations), the patch
  embedding 1x; with nothing before the head to train (P with --prompts 0) the head's weight gradient only.
  ViT-B/4 with 50 prompts: P 40.54, F 33.60, P+F 60.08 GFLOP per training image (torch's FlopCounterMode agrees).
- MFU = achieved training TFLOP/s / the device's dense bf16 peak (table below, or --peak_tflops); n/a when unknown.
Peak memory is torch.cuda.max_memory_allocated, reset at the start of each mode (weights, optimizer state,
activations and the synthetic data pool held on the device, as main.py holds the dataset); for the baseline, whose
DataLoader reads host copies, less the pool; n/a on CPU.
Epoch estimate = 50,000 / train images/s + 10,000 / eval images/s (a CIFAR-10 epoch plus its test pass).

--profile True: after each mode's timed training and evaluation, torch.profiler records PROFILE_STEPS more training
steps and bench.py prints where a step's time goes. Each op's own time (on CUDA: the time of the kernels it launched)
is put under the first that fits: data (building the batch: gather, crop, flip, normalise), optimizer (inside
optimizer.step/zero_grad), elementwise for the kernels inductor fused under --compile (norms, GELU, adds, copies, and
whatever attention or matmul glue they absorbed), matmul (mm, addmm, bmm, linear, the patch-embedding convolution, and
inductor's matmul templates), attention (the SDPA ops, forward and backward), and elementwise for the rest. idle is
the step's wall time outside all ops: on CUDA the GPU waiting for Python, launches or a sync; on the CPU, Python
between ops. The profiled steps are a little slower than the timed ones (the profiler's own cost); take the headline
numbers from a run without --profile.
"""
import argparse
import datetime
import gc
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time


def stop_at_once(signum, frame):
    """SIGINT/SIGTERM outside the measuring and the writing of --json (which train.StopRequest takes over):
    importing torch and building the data take seconds and nothing is measured yet, so stop there in one line. The
    process ends here: an exception raised in a handler can be swallowed by torch's import (its C code initialising
    numpy), and bench.py went on measuring after saying it stopped."""
    for each in (signal.SIGINT, signal.SIGTERM):  # a terminal's Ctrl-C reaches the whole group: one line, not two
        signal.signal(each, lambda signum, frame: None)
    print(f"\n{signal.Signals(signum).name}: stopped", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)


if __name__ == '__main__':  # before the imports below; also where a shell's background job inherited SIGINT ignored
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, stop_at_once)

from main import device_flag, git_commit, int_at_least, not_creatable, str2bool  # main.py imports no torch

NUM_CLASSES = 10
IMG_SIZE, PATCH_SIZE = 32, 4
LR, WEIGHT_DECAY = 1e-4, 0.05  # any values: the speed of a step does not depend on them
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
MODES = {'P': (False, True), 'F': (True, False), 'P+F': (True, True)}  # name -> (full, with prompts)
# dense bf16 tensor-core peak, TFLOP/s; first match of the key in the device name wins (NVL and PCIe cards run at
# lower power than the SXM ones)
PEAK_BF16_TFLOPS = [('H100 PCIe', 756), ('H100 NVL', 835), ('H100', 989), ('H200 NVL', 835), ('H200', 989),
                    ('A100', 312)]
PROFILE_STEPS = 10
PROFILE_KINDS = ('matmul', 'attention', 'elementwise', 'optimizer', 'data', 'idle')
MATMUL_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::matmul', 'aten::linear', 'aten::addmv',
              'aten::mv', 'aten::_addmm_activation', 'aten::_scaled_mm', 'aten::convolution', 'aten::_convolution',
              'aten::cudnn_convolution', 'aten::mkldnn_convolution', 'aten::convolution_backward',
              'MmBackward0', 'AddmmBackward0', 'BmmBackward0', 'ConvolutionBackward0')
ATTENTION_OPS = ('aten::scaled_dot_product_attention', 'aten::_scaled_dot_product', 'aten::_flash_attention',
                 'aten::_efficient_attention', 'aten::_cudnn_attention', 'ScaledDotProduct')  # name prefixes


# ---------------------------------------------------------------- flags (checked before torch is imported)


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add('--model', default='vit_base_patch16_224.augreg_in21k', help='timm ViT (random weights); test_vit is tiny')
    add('--batch_size', type=int_at_least(1), default=512, help='train and eval batch of the modes (default 512)')
    add('--steps', type=int_at_least(1), default=50, help='timed train steps per mode (default 50)')
    add('--warmup', type=int_at_least(0), default=10, help='untimed steps before each timed region (default 10)')
    add('--eval_steps', type=int_at_least(1), default=20, help='timed eval batches per mode (default 20)')
    add('--baseline_steps', type=int_at_least(1), default=20, help='timed train steps of the baseline (default 20)')
    add('--baseline_batch_size', type=int_at_least(1), default=128, help="the seed's batch size (default 128)")
    add('--baseline', type=str2bool, default=True, help="measure the seed's recipe (default True)")
    add('--no_baseline', action='store_true', help='same as --baseline False')
    add('--prompts', type=int_at_least(0), default=50, help='prompt tokens per layer in P and P+F (default 50)')
    add('--modes', default='P,F,P+F', help='comma list of P, F, P+F (default all three)')
    add('--prompt_impl', choices=['kv', 'naive'], default='kv', help='prompt implementation of the modes (default kv)')
    add('--compile', type=str2bool, default=False, help='torch.compile the model after set_trainable')
    add('--amp', type=str2bool, default=True,
        help='mixed precision on CUDA: bf16 (fp16 with loss scaling before Ampere); False: fp32 (default True)')
    add('--device', type=device_flag, default='auto', help='auto (CUDA when available), cpu, cuda or cuda:N')
    add('--profile', type=str2bool, default=False,
        help=f'after each mode, profile {PROFILE_STEPS} more train steps and print where their time goes')
    add('--peak_tflops', type=float, default=None, help='dense bf16 peak TFLOP/s for MFU (default: by device name)')
    add('--json', type=os.path.expanduser, default=None, metavar='FILE',
        help='also write every number to FILE as JSON (a new file; missing parent folders are made)')
    return parser


def parse_args(argv=None):
    parser = make_parser()

    def error(message):  # one line, no usage dump
        print(f"bench.py: error: {message} (python bench.py --help lists the flags)", file=sys.stderr)
        sys.exit(2)
    parser.error = error
    args = parser.parse_args(argv)
    args.baseline = args.baseline and not args.no_baseline
    args.modes = [m.strip() for m in args.modes.split(',') if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from P, F, P+F")
    if len(set(args.modes)) < len(args.modes):  # each mode is one row of the table and one key of the JSON
        parser.error(f"--modes {','.join(args.modes)}: a mode is named twice; name each once")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
        parser.error(f"--peak_tflops must be a positive number, got {args.peak_tflops}")
    if args.json is not None:  # checked before minutes of measuring, not after
        if not args.json:  # `--json "$OUT"` with OUT unset: the numbers would be printed and never written
            parser.error("--json '' names no file; pass a file name such as bench.json")
        if os.path.lexists(args.json):  # a link to a missing file too: nothing is written through a link
            parser.error(f"--json {args.json} already exists and bench.py never replaces a file; pass a new name")
        if not os.path.basename(args.json):
            parser.error(f"--json {args.json} names a folder; pass a file name such as {args.json}bench.json")
        blocked = not_creatable(os.path.dirname(os.path.abspath(args.json)))
        if blocked:
            parser.error(f"cannot write --json {args.json} ({blocked}); choose another")
    return args


if __name__ == '__main__':
    parse_args()  # a mistyped flag is said at once, not after the seconds that importing torch takes

import timm
import torch
import torch.nn.functional as F
from PIL import Image

import data
import train
from model import PromptedViT, count_params, create_vit, set_trainable

# ---------------------------------------------------------------- analytic FLOPs


def vit_geometry(vit):
    """The numbers forward_flops needs, read off a timm VisionTransformer."""
    return dict(embed_dim=vit.embed_dim, depth=len(vit.blocks), mlp_hidden=vit.blocks[0].mlp.fc1.out_features,
                num_patches=vit.patch_embed.num_patches, patch_size=vit.patch_embed.patch_size[0],
                in_chans=vit.patch_embed.proj.in_channels, num_prefix=vit.num_prefix_tokens,
                num_classes=vit.num_classes)


def forward_flops(embed_dim, depth, mlp_hidden, num_patches, patch_size, num_prompts=0, num_classes=NUM_CLASSES,
                  in_chans=3, num_prefix=1, impl='naive', batch_size=None):
    """Forward FLOPs per image (2 x multiply-accumulates of the matmuls; see the module docstring).

    impl 'naive': every block runs the whole sequence num_prefix + num_patches + num_prompts.
    impl 'kv': image rows run the whole block, attending to image + prompt keys; prompt rows only get the K/V
    projection; in the last block only the CLS row gets its query, attention, output projection and MLP.
    The prompt K/V is counted per image, unless batch_size is given: then once per batch (model.py without
    prompt dropout), i.e. divided by batch_size.
    """
    if impl == 'naive':
        return 2 * sum(naive_macs(embed_dim, depth, mlp_hidden, num_patches, patch_size, num_prompts, num_classes,
                                  in_chans, num_prefix).values())
    if impl != 'kv':
        raise ValueError(f"impl must be 'naive' or 'kv', got {impl!r}")
    d, h, p = embed_dim, mlp_hidden, num_prompts
    rows = num_prefix + num_patches  # image rows (CLS + patches)
    keys = rows + p
    prompt_kv = p * 2 * d * d / (batch_size or 1)
    full_block = rows * 3 * d * d + 2 * rows * keys * d + rows * d * d + 2 * rows * d * h
    last_block = rows * 2 * d * d + d * d + 2 * keys * d + d * d + 2 * d * h  # K/V all rows; CLS q, attn, proj, MLP
    ends = naive_macs(d, depth, h, num_patches, patch_size, p, num_classes, in_chans, num_prefix)  # as the naive path
    return 2 * (ends['patch'] + ends['head'] + (depth - 1) * full_block + last_block + depth * prompt_kv)


def naive_macs(embed_dim, depth, mlp_hidden, num_patches, patch_size, num_prompts=0, num_classes=NUM_CLASSES,
               in_chans=3, num_prefix=1):
    """Multiply-accumulates per image of the naive path's forward, by part: the patch embedding, the blocks' linear
    layers (qkv, proj, MLP), attention's two products (QK^T, AV), the head."""
    d, t = embed_dim, num_prefix + num_patches + num_prompts
    return dict(patch=num_patches * in_chans * patch_size * patch_size * d,
                linear=depth * (t * 3 * d * d + t * d * d + 2 * t * d * mlp_hidden),
                attention=depth * 2 * t * t * d, head=d * num_classes)


# Training FLOPs of each part as a multiple of its forward: a weight gradient costs a forward where the weight trains,
# an input gradient one where something before the part trains. Full (F, P+F): both, but the patch embedding's input
# is the image. P: the frozen linear layers pass input gradients back to the prompts, attention's products need both
# operands' gradients (they multiply activations), the patch embedding needs none, the head both. Linear probe: the
# head's weight gradient only.
TRAIN_FACTORS = {'full': dict(patch=2, linear=3, attention=3, head=3),
                 'prompts': dict(patch=1, linear=2, attention=3, head=3),
                 'head': dict(patch=1, linear=1, attention=1, head=2)}


def train_flops(geometry, num_prompts, full):
    """Training FLOPs per image (forward + backward) of the naive path; geometry as vit_geometry gives it."""
    factors = TRAIN_FACTORS['full' if full else 'prompts' if num_prompts else 'head']
    parts = naive_macs(**geometry, num_prompts=num_prompts)
    return 2 * sum(parts[part] * factors[part] for part in parts)


def peak_bf16_tflops(name, override=None):
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


# ---------------------------------------------------------------- timing helpers


def driver_version(device):
    """The NVIDIA driver's version (torch does not report it), from nvidia-smi; None off CUDA or without it."""
    if device.type != 'cuda':
        return None
    try:
        return subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                              capture_output=True, text=True, timeout=10).stdout.split('\n')[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_memory(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None


def set_tf32(matmul, cudnn):
    """Set the TF32 flags (the legacy ones, as main.py does); -> the previous (matmul, cudnn) pair."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    return previous


# ---------------------------------------------------------------- where the time goes (--profile)


def op_kind(event):
    """The PROFILE_KINDS entry of one profiler op event (see the module docstring): the data or optimizer range it is,
    or lies in, first; then its own name."""
    node = event
    while node is not None:
        if node.name == 'data':
            return 'data'
        if node.name.startswith('Optimizer.'):
            return 'optimizer'
        node = node.cpu_parent
    name = event.name
    if name.startswith('triton_tem'):  # inductor's matmul templates (max-autotune), epilogue fused in
        return 'matmul'
    if name.startswith(('triton_', 'cpp_fused')):  # named after the ops fused in, attention or mm among them
        return 'elementwise'
    if name in MATMUL_OPS or name.startswith(('mkldnn::_linear', 'mkl::_mkl_linear')):
        return 'matmul'
    if name.startswith(ATTENTION_OPS):
        return 'attention'
    return 'elementwise'


def time_by_kind(events, on_gpu, wall_us):
    """{kind: microseconds} over the profiled events: each op's own time (on a GPU, its own kernels') under its kind;
    'idle' is what the wall time `wall_us` leaves."""
    totals = dict.fromkeys(PROFILE_KINDS, 0.0)
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels count through the op that launched them
        if on_gpu:
            own = getattr(event, 'self_device_time_total', None)
            own = event.self_cuda_time_total if own is None else own
        else:
            own = event.self_cpu_time_total
        if own > 0:
            totals[op_kind(event)] += own
    totals['idle'] = max(0.0, wall_us - sum(totals.values()))
    return totals


def labelled(batches, label):
    """`batches`, with the work of producing each one recorded as the profiler range `label`."""
    iterator = iter(batches)
    while True:
        with torch.profiler.record_function(label):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


def optimizer_steps(events):
    """The optimizer steps among profiler events: CPU ranges only, as with CUDA activity the profiler repeats each
    range as a GPU annotation."""
    return sum(1 for event in events
               if event.name.startswith('Optimizer.step') and event.device_type == torch.autograd.DeviceType.CPU)


def profile_steps(train_steps, device):
    """PROFILE_STEPS training steps under torch.profiler -> dict(steps (as the profiler counted optimizer steps),
    ms_per_step, ms_by_kind)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        train_steps(PROFILE_STEPS, label='data')
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    events = profiler.events()
    steps = optimizer_steps(events)
    totals = time_by_kind(events, device.type == 'cuda', wall_us)
    return dict(steps=steps, ms_per_step=wall_us / 1e3 / max(1, steps),
                ms_by_kind={kind: us / 1e3 / max(1, steps) for kind, us in totals.items()})


# ---------------------------------------------------------------- the optimised modes


def build_model(args, num_prompts, full, prompt_impl, device):
    torch.manual_seed(0)
    vit = create_vit(args.model, NUM_CLASSES, IMG_SIZE, PATCH_SIZE, pretrained=False)
    model = PromptedViT(vit, num_prompts, deep=True, prompt_dropout=0.0, prompt_impl=prompt_impl).to(device)
    set_trainable(model, full)
    return model


def run_mode(name, args, device, pool, test_set, stop):
    """Time train.train_epoch and train.evaluate themselves: the code main.py runs, progress bar and syncs included."""
    full, with_prompts = MODES[name]
    num_prompts = args.prompts if with_prompts else 0
    reset_memory(device)
    model = build_model(args, num_prompts, full, args.prompt_impl, device)
    trainable, total = count_params(model, trainable_only=True), count_params(model)
    if args.compile:
        model.compile()  # in place, as train.fit does
    optimizer = train.make_optimizer(model, 'adamw', LR, WEIGHT_DECAY, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = train.make_scaler(device, args.amp)  # as train.fit: one for the mode, whose scale carries over
    preprocess = data.preprocessing(model.vit.pretrained_cfg, device, IMG_SIZE)
    generator = torch.Generator().manual_seed(0)

    def train_steps(steps, label=None):  # one train.train_epoch over exactly `steps` batches of the pool
        images, labels = pool[0][:steps * args.batch_size], pool[1][:steps * args.batch_size]
        assert len(labels) == steps * args.batch_size, f"the synthetic pool holds fewer than {steps} batches"
        batches = data.train_batches(images, labels, args.batch_size, generator, preprocess)
        if label:
            batches = labelled(batches, label)
        result = train.train_epoch(model, optimizer, scheduler, batches, steps, args.amp, stop, desc=name,
                                   scaler=scaler)
        if result is None:
            raise KeyboardInterrupt
        return result

    start = time.perf_counter()
    if args.warmup:
        train_steps(args.warmup)
    sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    mean_loss, _ = train_steps(args.steps)  # returns host numbers: synced
    train_s = time.perf_counter() - start
    peak_gib = peak_memory_gib(device)

    test_images, test_labels = test_set
    warm = args.batch_size * args.warmup
    evaluate = lambda images, labels: train.evaluate_split(model, (images, labels), args.batch_size, preprocess,
                                                           args.amp)
    if warm:
        evaluate(test_images[:warm], test_labels[:warm])
    start = time.perf_counter()
    evaluate(test_images[warm:], test_labels[warm:])
    eval_s = time.perf_counter() - start
    profiled = profile_steps(train_steps, device) if args.profile else None  # after this mode's timed regions
    if args.compile:
        torch._dynamo.reset()
    return dict(full=full, prompts=num_prompts, trainable_params=trainable, total_params=total,
                train_img_s=args.steps * args.batch_size / train_s, eval_img_s=(len(test_labels) - warm) / eval_s,
                peak_mem_gib=peak_gib, warmup_s=warmup_s, train_s=train_s, eval_s=eval_s, mean_train_loss=mean_loss,
                profile=profiled)


# ---------------------------------------------------------------- the seed's recipe (baseline)


class SyntheticCIFAR(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's __getitem__ over the synthetic data: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images_hwc, targets, transform):
        self.data, self.targets, self.transform = images_hwc, targets, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img, target = Image.fromarray(self.data[index]), self.targets[index]
        return self.transform(img), target


def run_baseline(args, device, pool, stop):
    """fp32 (no autocast, TF32 off), eager, naive prompts, P mode, DataLoader of PIL images, plain AdamW, .item()."""
    from torchvision import transforms
    reset_memory(device)
    held = torch.cuda.memory_allocated(device) if device.type == 'cuda' else 0  # bench's data pool: not the recipe's
    model = build_model(args, args.prompts, False, 'naive', device)
    norm = (model.vit.pretrained_cfg['mean'], model.vit.pretrained_cfg['std'])  # as sequences, for torchvision
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(*norm)])
    images, labels = pool
    needed = min(CIFAR_TRAIN, args.baseline_batch_size * (args.warmup + args.baseline_steps))
    dataset = SyntheticCIFAR(images[:needed].permute(0, 2, 3, 1).contiguous().cpu().numpy(), labels[:needed].tolist(), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.baseline_batch_size, shuffle=True, num_workers=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)

    def endless():
        while True:
            yield from loader

    batches = endless()

    def train_steps(steps):
        count, running_loss = 0, 0.0
        for _ in range(steps):
            if stop.signum is not None:
                raise KeyboardInterrupt
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            count += len(y)
        return count

    previous = set_tf32(False, False)
    try:
        model.train()
        train_steps(args.warmup)
        sync(device)
        start = time.perf_counter()
        images_done = train_steps(args.baseline_steps)
        sync(device)
        train_s = time.perf_counter() - start
    finally:
        set_tf32(*previous)
    peak_gib = peak_memory_gib(device) - held / 2**30 if device.type == 'cuda' else None
    return dict(full=False, prompts=args.prompts, batch_size=args.baseline_batch_size, prompt_impl='naive',
                amp=False, tf32=False, train_img_s=images_done / train_s, train_s=train_s, peak_mem_gib=peak_gib)


# ---------------------------------------------------------------- report


def fmt(value, spec, missing='n/a'):
    return missing if value is None else format(value, spec)


def print_table(columns, rows):
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, (title, _) in enumerate(columns)]
    line = lambda cells: '  '.join(format(c, f'{a}{w}') for c, (_, a), w in zip(cells, columns, widths)).rstrip()
    print(line([title for title, _ in columns]))
    print('  '.join('-' * w for w in widths))
    for row in rows:
        print(line(row))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = parse_args(argv)
    _, _, device = train.setup_distributed(args.device)
    name = train.device_name(device)
    peak = peak_bf16_tflops(name, args.peak_tflops) if device.type == 'cuda' or args.peak_tflops else None
    train.configure_backends(device)

    geometry = vit_geometry(create_vit(args.model, NUM_CLASSES, IMG_SIZE, PATCH_SIZE, pretrained=False))
    print(f"device {name} | torch {torch.__version__} | timm {timm.__version__} | model {args.model} | "
          f"batch {args.batch_size} | compile {args.compile} | amp {train.amp_name(device, args.amp) or False} | "
          f"prompt_impl {args.prompt_impl} | peak bf16 {fmt(peak, 'g', 'unknown')} TFLOP/s", flush=True)
    print(f"geometry: embed {geometry['embed_dim']}, depth {geometry['depth']}, mlp {geometry['mlp_hidden']}, "
          f"{geometry['num_patches']} patches of {geometry['patch_size']}x{geometry['patch_size']}")

    flops = {}
    print("analytic FLOPs per image (2 x MACs of qkv, QK^T, AV, proj, MLP, patch embedding, head); TFLOP/s and MFU "
          "use the naive count for every --prompt_impl; train = forward + the gradients that are computed (about "
          "3x forward when the backbone trains, 2x for P: its frozen layers pass input gradients only):")
    for mode in args.modes:
        full, with_prompts = MODES[mode]
        p = args.prompts if with_prompts else 0
        naive = forward_flops(**geometry, num_prompts=p, impl='naive')
        kv = forward_flops(**geometry, num_prompts=p, impl='kv')
        kv_run = forward_flops(**geometry, num_prompts=p, impl='kv', batch_size=args.batch_size)
        trained = train_flops(geometry, p, full)
        flops[mode] = dict(fwd_gflop_naive=naive / 1e9, fwd_gflop_kv=kv / 1e9, fwd_gflop_kv_as_run=kv_run / 1e9,
                           train_gflop_per_img=trained / 1e9)
        print(f"  {mode:<4} {p:>3} prompts: fwd naive {naive / 1e9:.4g} GFLOP | kv {kv / 1e9:.4g} "
              f"(prompt K/V per image), {kv_run / 1e9:.4g} as model.py runs it (prompt K/V once per batch of "
              f"{args.batch_size}) | train {trained / 1e9:.4g} GFLOP")

    # one synthetic pool on the device, large enough for every timed (and profiled) region
    generator = torch.Generator(device).manual_seed(0)
    need = max(args.batch_size * (args.warmup + max(args.steps, PROFILE_STEPS if args.profile else 0)),
               args.baseline_batch_size * (args.warmup + args.baseline_steps) if args.baseline else 0)
    pool_size = max(args.batch_size, need)
    pool = (torch.randint(0, 256, (pool_size, 3, IMG_SIZE, IMG_SIZE), dtype=torch.uint8, device=device,
                          generator=generator),
            torch.randint(0, NUM_CLASSES, (pool_size,), device=device, generator=generator))
    test_size = args.batch_size * (args.warmup + args.eval_steps)
    test_set = (torch.randint(0, 256, (test_size, 3, IMG_SIZE, IMG_SIZE), dtype=torch.uint8, device=device,
                              generator=generator),
                torch.randint(0, NUM_CLASSES, (test_size,), device=device, generator=generator))

    # SIGINT/SIGTERM: finish nothing more, report what was measured, exit 128 + signal
    results, baseline = {}, None
    with train.StopRequest() as stop:
        try:
            for mode in args.modes:
                print(f"running {mode} ...", file=sys.stderr, flush=True)
                result = run_mode(mode, args, device, pool, test_set, stop)
                result.update(flops[mode], batch_size=args.batch_size, prompt_impl=args.prompt_impl,
                              compile=args.compile, amp=args.amp and device.type == 'cuda', tf32=device.type == 'cuda')
                results[mode] = result
                if stop.signum is not None:
                    raise KeyboardInterrupt
            if args.baseline:
                print("running the baseline ...", file=sys.stderr, flush=True)
                baseline = run_baseline(args, device, pool, stop)
                baseline.update(fwd_gflop_naive=forward_flops(**geometry, num_prompts=args.prompts) / 1e9,
                                train_gflop_per_img=train_flops(geometry, args.prompts, False) / 1e9)
        except KeyboardInterrupt:
            stop.signum = stop.signum or signal.SIGINT
    if stop.signum is not None:
        print(f"{signal.Signals(stop.signum).name}: stopped; reporting the {len(results)} mode(s) measured so far"
              + (', no baseline' if baseline is None else ''), file=sys.stderr, flush=True)
        if not results and baseline is None:
            sys.exit(128 + stop.signum)

    rows = []
    for mode, r in list(results.items()) + ([('baseline', baseline)] if baseline else []):
        r['train_tflops'] = r['train_img_s'] * r['train_gflop_per_img'] / 1e3
        r['mfu'] = r['train_tflops'] / peak if peak else None
        if 'eval_img_s' in r:
            r['epoch_s'] = CIFAR_TRAIN / r['train_img_s'] + CIFAR_TEST / r['eval_img_s']
        if mode != 'baseline':
            r['speedup_vs_baseline'] = r['train_img_s'] / baseline['train_img_s'] if baseline else None
        rows.append([mode if mode != 'baseline' else 'baseline (P fp32 naive DataLoader)', str(r['batch_size']),
                     f"{r['train_img_s']:.1f}", fmt(r.get('eval_img_s'), '.1f', '-'), fmt(r.get('epoch_s'), '.1f', '-'),
                     fmt(r['peak_mem_gib'], '.2f'), f"{r['train_tflops']:.3f}", fmt(r['mfu'], '.1%'),
                     f"{r['fwd_gflop_naive']:.4g}",
                     '1.00x' if mode == 'baseline' else fmt(r['speedup_vs_baseline'], '.2f', '-') + 'x' * bool(baseline)])
    print()
    print_table([('mode', '<'), ('batch', '>'), ('train img/s', '>'), ('eval img/s', '>'), ('epoch s', '>'),
                 ('peak GiB', '>'), ('train TFLOP/s', '>'), ('MFU', '>'), ('fwd GFLOP/img', '>'), ('speed-up', '>')], rows)
    print(f"\nepoch s = {CIFAR_TRAIN:,} / train img/s + {CIFAR_TEST:,} / eval img/s; peak GiB = "
          f"{'torch.cuda.max_memory_allocated per mode' if device.type == 'cuda' else 'n/a on CPU'}; MFU vs dense "
          f"bf16 peak ({fmt(peak, 'g', 'unknown')} TFLOP/s)"
          + ("; speed-up = train img/s over the baseline's" if baseline else ''))

    profiles = {mode: r['profile'] for mode, r in results.items() if r['profile']}
    if profiles:
        measured = ('kernel time by the op that launched it; idle = the GPU waiting' if device.type == 'cuda'
                    else 'CPU time of the ops; idle = Python')
        print(f"\nwhere a training step's time goes, ms per step (share of it): torch.profiler over {PROFILE_STEPS} "
              f"steps after the timed ones; {measured}")
        share = lambda p, kind: f"{p['ms_by_kind'][kind]:.2f} ({p['ms_by_kind'][kind] / p['ms_per_step']:.0%})"
        print_table([('mode', '<'), ('ms/step', '>')] + [(kind, '>') for kind in PROFILE_KINDS],
                    [[mode, f"{p['ms_per_step']:.2f}"] + [share(p, kind) for kind in PROFILE_KINDS]
                     for mode, p in profiles.items()])

    if args.json:
        report = dict(command=shlex.join(['python', 'bench.py', *argv]), git_commit=git_commit(),
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                      device=name, device_type=device.type, driver=driver_version(device),
                      python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                      timm=timm.__version__,
                      model=args.model, geometry=geometry, batch_size=args.batch_size, compile=args.compile,
                      amp=args.amp and device.type == 'cuda', amp_dtype=train.amp_name(device, args.amp),
                      prompt_impl=args.prompt_impl, prompts=args.prompts,
                      steps=args.steps, warmup=args.warmup, eval_steps=args.eval_steps,
                      baseline_steps=args.baseline_steps, peak_bf16_tflops=peak,
                      flop_convention="naive-path analytic FLOPs (2 x MACs); training = each part's forward x its "
                                      "train_factors entry (full: F, P+F; prompts: P; head: nothing before the head "
                                      "trains)",
                      train_factors=TRAIN_FACTORS,
                      peak_memory='torch.cuda.max_memory_allocated, reset per mode' if device.type == 'cuda'
                      else 'n/a on CPU',
                      modes=results, baseline=baseline)
        with train.StopRequest() as writing:  # a signal waits for the file: written whole, never cut off
            written = train.write_new(args.json, train.json_bytes(report), then='run bench.py again')
        stop.signum = stop.signum or writing.signum
        if written != args.json:
            print(f"note: {args.json} was written by another process meanwhile; kept it and wrote {written}",
                  file=sys.stderr)
        print(f"wrote {written}")
    if stop.signum is not None:
        sys.exit(128 + stop.signum)


if __name__ == '__main__':
    main()
