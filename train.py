"""Training and evaluation loops, optimizer and schedule, run directory (config, metrics, checkpoints), signals,
and the torchrun/DDP plumbing. One code path for CPU and GPU, one process or many."""
import csv
import io
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save as safetensors_bytes
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

import data

METRICS_HEADER = ['epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'lr', 'epoch_time_s',
                  'train_images_per_s']
SYNC_EVERY = 20  # steps between host<->device syncs (progress bar, non-finite check, stop agreement across ranks)


# ---------------------------------------------------------------- distributed


def setup_distributed(device_arg):
    """-> (rank, world_size, device). Under torchrun: one process per device, NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    if device_arg == 'auto':
        device_arg = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device_arg.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device_arg} but CUDA is not available here (torch {torch.__version__}); "
                         "use --device cpu or --device auto")
    device = torch.device(device_arg)
    if device.type == 'cuda':
        if world_size > 1:
            device = torch.device('cuda', local_rank)
        if (device.index or 0) >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {device} but only {torch.cuda.device_count()} CUDA device(s) exist")
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, device


def all_agree(flag: bool, device) -> bool:
    """True on every rank if `flag` is True on any rank (a collective: every rank must call it)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def all_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


# ---------------------------------------------------------------- optimizer and schedule


def make_optimizer(model, lr, weight_decay, device):
    """AdamW over the trainable parameters; no decay on biases, norms, position embedding and CLS (timm's split)."""
    no_decay = {f'vit.{name}' for name in model.vit.no_weight_decay()}
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == 'cuda')


def lr_factor(step, warmup_steps, total_steps):
    """Linear warmup to the peak, then cosine decay to zero at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- signals


class StopRequest:
    """SIGINT/SIGTERM set a flag; the training loop stops at its next step, so checkpoints are never half-written."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        # a repeated signal changes nothing: torchrun forwards the terminal's Ctrl-C, so workers often get two
        self.signum = self.signum or signum


# ---------------------------------------------------------------- loops


def train_epoch(model, optimizer, scheduler, train_images, train_labels, generator, args, norm, epoch, stop,
                rank, world_size, device):
    """One epoch. Returns (mean loss, accuracy %) over all ranks, or None once a stop is requested."""
    model.train()
    steps = len(train_labels) // args.batch_size
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    bad_step = torch.full((), -1, device=device, dtype=torch.long)  # first non-finite loss, tracked without a per-step sync
    count, start = 0, time.perf_counter()
    batches = data.train_batches(train_images, train_labels, args.batch_size, generator, *norm, rank, world_size)
    bar = tqdm(total=steps, desc=f'epoch {epoch}/{args.epoch}', disable=rank != 0, leave=False, dynamic_ncols=True)
    for step, (images, labels) in enumerate(batches, 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == 'cuda'):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss = loss.detach()
        loss_sum += loss * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
        count += len(labels)
        bar.update(1)
        sync = step % SYNC_EVERY == 0 or step == steps
        # one process checks the flag every step for free; several agree on it at sync steps only
        if (sync or world_size == 1) and all_agree(stop.signum is not None, device):
            bar.close()
            return None
        if sync:
            first_bad = _first_bad(bad_step)
            if first_bad >= 0:
                bar.close()
                raise SystemExit(f"error: non-finite training loss at epoch {epoch}, step {first_bad}; lower --lr "
                                 f"(it is {args.lr:g}); the checkpoint of epoch {epoch - 1} is intact")
            bar.set_postfix(loss=f'{loss_sum.item() / count:.3f}', acc=f'{100 * correct.item() / count:.1f}%',
                            img_s=f'{count * world_size / (time.perf_counter() - start):.0f}')
    bar.close()
    loss_sum, correct, count = all_sum(torch.stack([loss_sum, correct, loss_sum.new_tensor(count)])).tolist()
    return loss_sum / count, 100 * correct / count


def _first_bad(bad_step):
    if dist.is_initialized():
        found = bad_step.clone().float()
        found[found < 0] = float('inf')
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        return -1 if math.isinf(found.item()) else int(found.item())
    return int(bad_step.item())


@torch.no_grad()
def evaluate(model, test_images, test_labels, batch_size, norm, amp, device, rank=0, world_size=1):
    """-> (mean loss, accuracy in percent) over the whole test set, each image counted once across ranks."""
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    for images, labels, valid in data.eval_batches(test_images, test_labels, batch_size, *norm, rank, world_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == 'cuda'):
            logits = model(images)
        losses = F.cross_entropy(logits.float(), labels, reduction='none')
        totals += torch.stack([(losses * valid).sum().double(), ((logits.argmax(1) == labels) & valid).sum().double(),
                               valid.sum().double()])
    loss_sum, correct, count = all_sum(totals).tolist()
    return loss_sum / count, 100 * correct / count


# ---------------------------------------------------------------- run directory: config, metrics, checkpoints


def atomic_write(path, payload: bytes):
    """Write to a temp file, flush+fsync, then rename over `path`: a reader sees the old file or the new, never half."""
    temp = f'{path}.tmp'
    with open(temp, 'wb') as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def write_config(run_dir, config):
    atomic_write(os.path.join(run_dir, 'config.json'), (json.dumps(config, indent=2) + '\n').encode())


def write_metrics(run_dir, history):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(METRICS_HEADER)
    for row in history:
        writer.writerow([row['epoch'], f"{row['train_loss']:.6f}", f"{row['train_acc']:.4f}",
                         f"{row['test_loss']:.6f}", f"{row['test_acc']:.4f}", f"{row['lr']:.6g}",
                         f"{row['epoch_time_s']:.3f}", f"{row['train_images_per_s']:.1f}"])
    atomic_write(os.path.join(run_dir, 'metrics.csv'), out.getvalue().encode())


def trainable_tensors(model):
    """What a task ships: prompts + head in P mode (a few MB), the whole model in full modes."""
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def save_checkpoint(run_dir, model, optimizer, scheduler, generator, epoch, history):
    atomic_write(os.path.join(run_dir, 'trainable.safetensors'),
                 safetensors_bytes(trainable_tensors(model), metadata={'epoch': str(epoch)}))
    state = dict(epoch=epoch, history=history, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                          data=generator.get_state()))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(os.path.join(run_dir, 'state.pt'), buffer.getvalue())
    write_metrics(run_dir, history)


def load_trainable(run_dir, model):
    """Apply a run's trainable.safetensors to `model` (built from the same config); -> the epoch it was saved at."""
    from safetensors import safe_open
    path = os.path.join(run_dir, 'trainable.safetensors')
    try:
        with safe_open(path, 'pt') as f:
            epoch = int((f.metadata() or {}).get('epoch', -1))
        tensors = load_file(path)
    except Exception as e:
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}: {e}); the run's checkpoint is damaged")
    result = model.load_state_dict(tensors, strict=False)
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if result.unexpected_keys or expected - set(tensors):
        raise SystemExit(f"error: {path} does not match this run's model (unexpected {result.unexpected_keys[:3]}, "
                         f"missing {sorted(expected - set(tensors))[:3]})")
    return epoch


def load_state(run_dir):
    # to the CPU: RNG states must be CPU tensors, and optimizer.load_state_dict moves its state to each parameter
    return torch.load(os.path.join(run_dir, 'state.pt'), map_location='cpu', weights_only=False)


def restore_rng(rng, generator):
    random.setstate(rng['python'])
    np.random.set_state(rng['numpy'])
    torch.set_rng_state(rng['torch'])
    if rng['cuda'] is not None and torch.cuda.is_available() and len(rng['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng['cuda'])
    generator.set_state(rng['data'])


# ---------------------------------------------------------------- the run


def fit(model, splits, args, run_dir, rank, world_size, device, resume=False):
    """Train for args.epoch epochs (from the run's last finished epoch if `resume`), evaluating after each,
    checkpointing and logging on rank 0. Returns the metrics history."""
    train_images, train_labels, test_images, test_labels = (t.to(device) for t in splits)
    norm = data.norm_tensors(model.vit.pretrained_cfg, device)
    steps_per_epoch = len(train_labels) // args.batch_size
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    total_steps = args.epoch * steps_per_epoch
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    generator = torch.Generator(device).manual_seed(args.seed)
    history, done = [], 0
    if resume:
        state = load_state(run_dir)
        saved_epoch = load_trainable(run_dir, model)
        if saved_epoch != state['epoch']:
            raise SystemExit(f"error: {run_dir}: trainable.safetensors is from epoch {saved_epoch} but state.pt from "
                             f"epoch {state['epoch']} (killed while saving?); start a new run")
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        restore_rng(state['rng'], generator)
        history, done = state['history'], state['epoch']
        if done > args.epoch:
            raise SystemExit(f"error: {run_dir} has already finished {done} epochs; --epoch {args.epoch} cannot undo "
                             f"them: pass --epoch {done + 1} or more to train further")
        if done == args.epoch and rank == 0:
            print(f"{run_dir} has finished all {done} epochs; pass --epoch N to train further", flush=True)
    elif rank == 0:  # epoch 0: a run stopped in its first epoch can be resumed too
        save_checkpoint(run_dir, model, optimizer, scheduler, generator, 0, history)
    if args.compile:
        model.compile()  # in place: parameter names, checkpoints and DDP see the same module
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    with StopRequest() as stop:
        for epoch in range(done + 1, args.epoch + 1):
            start = time.perf_counter()
            train = train_epoch(net, optimizer, scheduler, train_images, train_labels, generator, args, norm,
                                epoch, stop, rank, world_size, device)
            if train is None:
                stopped(stop.signum or signal.SIGTERM, run_dir, epoch - 1, rank, world_size)
            train_time = time.perf_counter() - start
            test_loss, test_acc = evaluate(model, test_images, test_labels, args.batch_size, norm, args.amp, device,
                                           rank, world_size)
            row = dict(epoch=epoch, train_loss=train[0], train_acc=train[1], test_loss=test_loss, test_acc=test_acc,
                       lr=args.lr * lr_factor(epoch * steps_per_epoch - 1, warmup_steps, total_steps),
                       epoch_time_s=time.perf_counter() - start,
                       train_images_per_s=steps_per_epoch * args.batch_size / train_time)
            history.append(row)
            if rank == 0:
                save_checkpoint(run_dir, model, optimizer, scheduler, generator, epoch, history)
                print(f"epoch {epoch}/{args.epoch}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%  "
                      f"test loss {test_loss:.4f} acc {test_acc:.2f}%  lr {row['lr']:.2e}  "
                      f"{row['epoch_time_s']:.1f}s  {row['train_images_per_s']:.0f} img/s", flush=True)
            if all_agree(stop.signum is not None, device):
                stopped(stop.signum or signal.SIGTERM, run_dir, epoch, rank, world_size)
    return history


def stopped(signum, run_dir, last_epoch, rank, world_size):
    if rank == 0:
        launcher = 'python' if world_size == 1 else f'torchrun --nproc_per_node={world_size}'
        print(f"\n{signal.Signals(signum).name}: stopped; {run_dir} keeps the checkpoint and metrics of epoch "
              f"{last_epoch}. Resume with:\n  {launcher} main.py --resume {run_dir}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)
