"""Training and evaluation loops, optimizer and schedule, run directory (config, metrics, summary, checkpoints),
signals, and the torchrun/DDP plumbing. One code path for CPU and GPU, one process or many."""
import contextlib
import csv
import io
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save as safetensors_bytes
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

import data

METRICS_HEADER = ['epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'lr', 'epoch_time_s',
                  'train_images_per_s', 'val_loss', 'val_acc', 'peak_mem_gib', 'includes_compile']
# what describes the best checkpoint until now (--eval_only --checkpoint best's files, plot.py's figures of them):
# removed once a better epoch replaces best.safetensors
BEST_VIEWS = ('confusion_best.csv', 'confusion_best.png', 'test_predictions_best.csv', 'mistakes_best.png')
# the files a checkpoint save may write (save_checkpoint's order), each through a temp file and then all renamed
SAVE_FILES = ('trainable.safetensors', 'best.safetensors', 'confusion.csv', 'test_predictions.csv', 'state.pt',
              'metrics.csv', 'summary.json')
SYNC_EVERY = 20  # steps between host<->device syncs (progress bar, non-finite check, stop agreement across ranks)


# ---------------------------------------------------------------- devices and processes


def setup_distributed(device_arg):
    """-> (rank, world_size, device). Under torchrun: one process per device, NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    device = pick_device(device_arg)
    if device.type == 'cuda':
        # set_device needs an index: one process uses the given or current device, torchrun's use their local rank
        index = local_rank if world_size > 1 else (torch.cuda.current_device() if device.index is None else device.index)
        if index >= torch.cuda.device_count():  # this process's own error (torchrun: more processes than GPUs)
            print(f"error: --device {device} but only {torch.cuda.device_count()} CUDA device(s) exist",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
        device = torch.device('cuda', index)
        torch.cuda.set_device(device)
    if 'WORLD_SIZE' in os.environ and not dist.is_initialized():  # launched by torchrun, even with one process
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, device


def pick_device(device_arg):
    """--device -> torch.device: auto is CUDA when torch finds a GPU, else the CPU."""
    if device_arg == 'auto':
        device_arg = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device_arg.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device_arg} but CUDA is not available here (torch {torch.__version__}); "
                         "use --device cpu or --device auto")
    return torch.device(device_arg)


def close_distributed():
    """Every process that opened a process group closes it: gloo can abort at interpreter exit otherwise."""
    if dist.is_initialized():
        dist.destroy_process_group()


def configure_backends(device):
    """TF32 matmuls on CUDA, for training and --eval_only alike (so evaluation reproduces the logged accuracy)."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def rank_and_world_size():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def lost_peer(error):
    """A collective failed because another process has gone: it stopped on an error of its own, which it reports."""
    text = str(error)
    return (isinstance(error, dist.DistBackendError) or 'Connection closed by peer' in text
            or 'Connection reset by peer' in text)


def any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is True on any rank (a collective: every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:  # no host sync for one process
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def all_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@contextlib.contextmanager
def explain_out_of_memory(batch_size, amp, where):
    """A CUDA out-of-memory error becomes one line with the fixes; nothing of the run directory is touched."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        hint = '' if amp else ' or --amp True (mixed precision halves the activations)'
        raise SystemExit(f"error: out of GPU memory {where} at --batch_size {batch_size}; lower --batch_size "
                         f"(e.g. {max(1, batch_size // 2)}){hint}") from None


def splits_to_device(splits, device):
    """{name: (uint8 images, labels) or None} onto the device, once (CIFAR-10's 60,000 images are 184 MB)."""
    try:
        return {name: None if split is None else tuple(t.to(device) for t in split) for name, split in splits.items()}
    except torch.cuda.OutOfMemoryError:
        size = sum(t.numel() * t.element_size() for split in splits.values() if split is not None for t in split)
        raise SystemExit(f"error: out of GPU memory moving the dataset ({size / 2**20:,.0f} MiB of uint8 images) "
                         f"onto the device; a new run can keep fewer images (--train_samples/--test_samples) or a "
                         f"smaller --img_size (a folder's larger images are shrunk as decoded); a run resumed or "
                         f"evaluated needs a GPU with more free memory, or --device cpu") from None


# ---------------------------------------------------------------- optimizer and schedule


def make_optimizer(model, name, lr, weight_decay, device):
    """AdamW, Adam (L2 decay, as the seed) or SGD with momentum 0.9 over the trainable parameters; no decay on biases,
    norms, position embedding and CLS (timm's split); prompts are decayed, as in VPT."""
    groups = parameter_groups(model, weight_decay)
    fused = device.type == 'cuda'
    if name == 'sgd':  # not fused: fused SGD fills no momentum on a step fp16's loss scaling skips, then diverges
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    optimizer_class = torch.optim.Adam if name == 'adam' else torch.optim.AdamW
    return optimizer_class(groups, lr=lr, fused=fused)


def parameter_groups(model, weight_decay):
    no_decay = {f'vit.{param_name}' for param_name in model.vit.no_weight_decay()}
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)


def schedule_steps(train_images, batch_size, epochs, warmup_epochs):
    """-> (steps per epoch, warmup steps, total steps): the last incomplete batch is dropped, the warmup rounded."""
    steps_per_epoch = train_images // batch_size
    return steps_per_epoch, round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch


def lr_factor(step, warmup_steps, total_steps):
    """Linear warmup to the peak, then cosine decay towards zero (reached one step after the last)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- signals


class StopRequest:
    """SIGINT/SIGTERM set a flag; the training loop stops at its next step, so checkpoints are never half-written.
    Once `finished` is set (the run is saved and said), the block leaves both signals ignored, not as it found them:
    a signal from there to the process's exit changes nothing."""

    def __init__(self):
        self.signum = None
        self.finished = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_IGN if self.finished else handler)

    def _handle(self, signum, frame):
        # a repeated signal changes nothing: torchrun forwards the terminal's Ctrl-C, so workers often get two
        self.signum = self.signum or signum


# ---------------------------------------------------------------- loops


def autocast_dtype(device):
    """bf16 on GPUs with bf16 units (NVIDIA compute capability 8 on: A100, H100, RTX 30xx and later; AMD's report
    their gfx major, 9 and up); fp16 on older NVIDIA ones (V100, T4, RTX 20xx, GTX 10xx), where bf16 is emulated and
    slower than fp32. Only --amp on a GPU uses it."""
    if device.type == 'cuda' and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


def amp_name(device, amp):
    """What config.json and bench.py record of the precision: 'bfloat16', 'float16', or None (fp32)."""
    return str(autocast_dtype(device)).split('.')[-1] if amp and device.type == 'cuda' else None


def autocast(device, amp):
    """Mixed precision (autocast_dtype) where --amp asks for it and the device is a GPU; a no-op on the CPU."""
    return torch.autocast(device.type, dtype=autocast_dtype(device), enabled=amp and device.type == 'cuda')


def make_scaler(device, amp):
    """The loss scaling fp16 needs (its small gradients underflow to zero without it); disabled, a pass-through,
    under bf16 or fp32. A step it skips for an overflow still counts in the lr schedule, which torch warns about."""
    enabled = amp_name(device, amp) == 'float16'
    if enabled:
        warnings.filterwarnings('ignore', message=r'Detected call of `lr_scheduler\.step\(\)` before')
    return torch.amp.GradScaler(device.type, enabled=enabled)


def train_epoch(model, optimizer, scheduler, batches, steps, amp=True, stop=None, desc='train', scaler=None):
    """One pass over `steps` training `batches` -> (mean loss, accuracy %) over all ranks, or None once `stop` (a
    StopRequest) has caught a signal. A non-finite loss raises FloatingPointError(its step, 'training loss').
    `scaler`: the run's make_scaler (its scale carries over from epoch to epoch); None makes one for this epoch."""
    model.train()
    device = next(model.parameters()).device
    scaler = make_scaler(device, amp) if scaler is None else scaler
    rank, world_size = rank_and_world_size()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    bad_step = torch.full((), -1, device=device, dtype=torch.long)  # first non-finite loss, tracked without a per-step sync
    count, start = 0, time.perf_counter()
    # None: on a terminal only; in a log file (2> run.log, sweep.py's trial logs) its redraws bury the epoch lines
    bar = tqdm(total=steps, desc=desc, disable=True if rank != 0 else None, leave=False, dynamic_ncols=True)
    with bar:  # closed (and its line cleared) however the epoch ends, so an error message starts on a clean line
        for step, (images, labels) in enumerate(batches, 1):
            with autocast(device, amp):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss = loss.detach()
            loss_sum += loss * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
            count += len(labels)
            bar.update(1)
            sync = step % SYNC_EVERY == 0 or step == steps
            stopping = stop is not None and stop.signum is not None
            # one process checks the flag every step for free; several agree on it at sync steps only
            if (sync or world_size == 1) and any_rank(stopping, device):
                return None
            if sync:
                first_bad = _first_bad(bad_step)
                if first_bad >= 0:
                    raise FloatingPointError(first_bad, 'training loss')
                bar.set_postfix(loss=f'{loss_sum.item() / count:.3f}', acc=f'{100 * correct.item() / count:.1f}%',
                                img_s=f'{count * world_size / (time.perf_counter() - start):.0f}')
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
def evaluate(model, batches, num_classes, amp=True, per_image=False):
    """-> (mean loss, accuracy %, confusion matrix) over (images, labels, valid) `batches`, summed over ranks.
    The confusion matrix is an int64 CPU tensor: rows the true class, columns the predicted one. With `per_image`, a
    4th element: (predicted class, its softmax probability), CPU tensors over every rank's images in rank order (the
    ranks' contiguous shards), the predictions the confusion matrix counts."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    predicted, probability, kept = [], [], []
    for images, labels, valid in batches:
        with autocast(device, amp):
            logits = model(images)
        loss_sum += (F.cross_entropy(logits.float(), labels, reduction='none') * valid).sum()
        top = logits.argmax(1)
        confusion.index_add_(0, labels * num_classes + top, valid.long())  # no host sync, unlike bincount
        if per_image:  # the padding rows are dropped once, after the loop: a boolean index syncs with the host
            predicted.append(top)
            probability.append(logits.float().softmax(1).gather(1, top[:, None]).squeeze(1))
            kept.append(valid)
    totals = all_sum(torch.cat([loss_sum.view(1), confusion.double()])).cpu()
    confusion = totals[1:].long().view(num_classes, num_classes)
    count = confusion.sum().item()
    result = totals[0].item() / count, 100 * confusion.trace().item() / count, confusion
    if not per_image:
        return result
    mine = [torch.zeros(0, dtype=torch.long), torch.zeros(0)]  # a rank whose shard is empty
    if predicted:
        valid = torch.cat(kept)
        mine = [torch.cat(predicted)[valid].cpu(), torch.cat(probability)[valid].cpu()]
    shards = [mine]
    if dist.is_initialized():
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, mine)
    return result + (tuple(torch.cat([shard[i] for shard in shards]) for i in range(2)),)


def evaluate_split(model, split, batch_size, preprocess, amp, per_image=False):
    """evaluate() over a whole (images, labels) split on the model's device, sharded across ranks."""
    rank, world_size = rank_and_world_size()
    images, labels = split
    return evaluate(model, data.eval_batches(images, labels, batch_size, preprocess, rank, world_size),
                    model.vit.num_classes, amp, per_image)


# ---------------------------------------------------------------- run directory: config, metrics, checkpoints


def write_files(files, then='run the command again'):
    """{path: bytes, or a function making them}: each written to a temp file (flush + fsync), then all renamed over
    their paths, so a reader sees the old files or the new ones, never half of one, and a full disk or a lost
    permission fails before any of them changes: the temps are removed and one line says what to do, then `then`."""
    temps = []
    try:
        for path, payload in files.items():
            content = payload() if callable(payload) else payload
            temps.append((f'{path}.tmp{os.getpid()}', path))  # per process: --eval_only may write beside training
            with open(temps[-1][0], 'wb') as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
    except BaseException as e:  # a full disk, a lost permission, a signal, or a payload that failed: no fragments
        for temp, _ in temps:
            with contextlib.suppress(OSError):
                os.remove(temp)
        if not isinstance(e, OSError):
            raise
        raise cannot_write(path, e, then) from None
    for temp, path in temps:
        os.replace(temp, path)


def cannot_write(path, error, then):
    return SystemExit(f"error: cannot write {path} ({error.strerror or error}); the files already there are unchanged: "
                      f"free disk space or make {os.path.dirname(path) or '.'} writable, then {then}")


def atomic_write(path, payload: bytes):
    write_files({path: payload})


def fresh_path(path):
    """`path`, or path-2, path-3... : the first that does not exist, so earlier outputs are kept. A link to a missing
    file is taken too: write_new's exclusive open refuses it, and would ask for a fresh path again forever."""
    stem, extension = os.path.splitext(path)
    attempt = 1
    while os.path.lexists(path):
        attempt += 1
        path = f"{stem}-{attempt}{extension}"
    return path


def write_new(path, payload: bytes, then='run the command again'):
    """Write a new file, never replacing one: should `path` exist by now (another process took it after this one
    checked it, minutes ago), write the first free path-2, path-3... instead; missing folders are made. Returns the
    path written."""
    while True:
        path = fresh_path(path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # checked at the start, yet may fail
        except OSError as e:  # a file took the folder's name (FileExistsError: not a name to skip)
            raise cannot_write(path, e, then) from None
        try:
            f = open(path, 'xb')  # exclusive: a rename or a plain open could replace a file made since the check
        except FileExistsError:
            continue
        except OSError as e:
            raise cannot_write(path, e, then) from None
        try:
            with f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            return path
        except BaseException as e:  # a full disk or a signal: no fragment left under the name
            with contextlib.suppress(OSError):
                os.remove(path)
            if not isinstance(e, OSError):
                raise
            raise cannot_write(path, e, then) from None


def json_bytes(payload):
    return (json.dumps(payload, indent=2) + '\n').encode()


def write_json(path, payload):
    atomic_write(path, json_bytes(payload))


def write_config(run_dir, config):
    write_json(os.path.join(run_dir, 'config.json'), config)


def metrics_bytes(history):
    formats = dict(train_loss='.6f', train_acc='.4f', test_loss='.6f', test_acc='.4f', lr='.6g', epoch_time_s='.3f',
                   train_images_per_s='.1f', val_loss='.6f', val_acc='.4f', peak_mem_gib='.3f', includes_compile='d')
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(METRICS_HEADER)
    for row in history:  # a missing value (no val split, no GPU) is an empty cell
        writer.writerow([row['epoch']] + ['' if row.get(key) is None else format(row[key], formats[key])
                                          for key in METRICS_HEADER[1:]])
    return out.getvalue().encode()


def remove_stale(run_dir, name):
    """Remove a file that describes a checkpoint the run has replaced (--eval_only writes it again)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, name))


def keep_as_epoch(run_dir, epoch):
    """A finished run's confusion.csv and test_predictions.csv, and plot.py's confusion.png and mistakes.png of them,
    once a resume trains on from its last epoch `epoch`: no longer the run's result, kept under the names
    --eval_only (plot.py) gives an unfinished run's."""
    for name, extension in (('confusion', '.csv'), ('confusion', '.png'), ('test_predictions', '.csv'),
                            ('mistakes', '.png')):
        with contextlib.suppress(FileNotFoundError):
            os.replace(os.path.join(run_dir, f'{name}{extension}'),
                       os.path.join(run_dir, f'{name}_epoch{epoch}{extension}'))


def utf8_text(text):
    """text that UTF-8 (a CSV, a figure's font) can hold: file and folder names whose bytes are not UTF-8 (a zip from
    an old Windows machine; os.listdir hands them over as surrogates) get those bytes as \\xNN escapes."""
    return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


def csv_bytes(text):
    """A CSV's text as UTF-8, which every reader expects (utf8_text)."""
    return utf8_text(text).encode()


def confusion_bytes(confusion, classes):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(['true\\predicted', *classes])
    for name, row in zip(classes, confusion.tolist()):
        writer.writerow([name, *row])
    return csv_bytes(out.getvalue())


def predictions_bytes(names, labels, predicted, probability, classes, checkpoint, epoch):
    """test_predictions.csv: a row per test image, in the test split's order (`names`: data.load_dataset's)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(['image', 'label', 'prediction', 'probability', 'correct', 'checkpoint', 'epoch'])
    assert len(names) == len(labels) == len(predicted), (len(names), len(labels), len(predicted))  # no row lost
    for name, label, guess, prob in zip(names, labels.tolist(), predicted.tolist(), probability.tolist()):
        writer.writerow([name, classes[label], classes[guess], f"{prob:.4f}", int(label == guess), checkpoint, epoch])
    return csv_bytes(out.getvalue())


def per_class_accuracy(confusion, classes):
    """{class: accuracy %}, None for a class with no test images."""
    return {name: round(100 * hits / total, 4) if total else None for name, hits, total in
            zip(classes, confusion.diagonal().tolist(), confusion.sum(1).tolist())}


def best_val_epoch(history):
    """The first epoch with the highest validation accuracy; None without a val split."""
    scored = [row for row in history if row.get('val_acc') is not None]
    return max(scored, key=lambda row: row['val_acc'])['epoch'] if scored else None


def summarize(history, planned_epochs, val_split, test_images):
    """summary.json: what a run reports, made anew from the metrics history after every epoch (per-class accuracy
    is added once the run finishes). With a val split the headline is the test accuracy at the best-val epoch,
    never the best test epoch."""
    final = history[-1] if history else {}
    best = best_val_epoch(history)
    best_row = next((row for row in history if row['epoch'] == best), {})
    peaks = [row['peak_mem_gib'] for row in history if row.get('peak_mem_gib') is not None]
    timed = steady_epochs(history)
    return dict(epochs_done=final.get('epoch', 0), epochs=planned_epochs,
                finished=final.get('epoch', 0) >= planned_epochs,
                final_epoch=final.get('epoch'), final_test_acc=final.get('test_acc'),
                final_test_loss=final.get('test_loss'), val_split=val_split, best_val_epoch=best,
                best_val_acc=best_row.get('val_acc'), test_acc_at_best_val=best_row.get('test_acc'),
                total_time_s=sum(row['epoch_time_s'] for row in history),
                mean_epoch_time_s=sum(row['epoch_time_s'] for row in timed) / len(timed) if timed else None,
                peak_mem_gib=max(peaks) if peaks else None, test_images=test_images)


def steady_epochs(history):
    """The epochs whose time is training and evaluation alone: not those that also compiled the model (a process's
    first with --compile), unless every epoch did."""
    return [row for row in history if not row.get('includes_compile')] or history


def trainable_tensors(model):
    """What a task ships: prompts + head in P mode (a few MB), the whole model in full modes."""
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def trainable_bytes(model, epoch):
    return safetensors_bytes(trainable_tensors(model), metadata={'epoch': str(epoch)})


def best_view(run_dir):
    """{'per_class_acc_best': ...} that --eval_only --checkpoint best wrote into summary.json (read anew each epoch:
    it may run beside the training), kept while its epoch stays the best; {} when there is none."""
    with contextlib.suppress(OSError, ValueError, AttributeError, RecursionError):
        with open(os.path.join(run_dir, 'summary.json')) as f:
            return {key: value for key, value in json.load(f).items() if key == 'per_class_acc_best'}
    return {}


def rng_states(generator):
    """Every RNG a run draws from. The torch CPU and CUDA states are gathered from every rank (a collective), so
    each process resumes its own stream (prompt dropout); the data generator is a CPU one shared by all."""
    mine = dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    return dict(python=random.getstate(), numpy=np.random.get_state(), data=generator.get_state(), ranks=ranks)


def restore_rng(rng, generator, seed):
    rank = rank_and_world_size()[0]
    random.setstate(rng['python'])
    np.random.set_state(rng['numpy'])
    generator.set_state(rng['data'])
    if rank >= len(rng['ranks']):  # a run resumed on more processes than saved it: a rank's own stream, as in fit
        torch.manual_seed(seed + rank)
        return
    mine = rng['ranks'][rank]
    torch.set_rng_state(mine['torch'])
    if mine['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine['cuda'])  # the current device; a run resumed on the CPU keeps no CUDA stream


def save_checkpoint(run_dir, model, optimizer, scheduler, scaler, generator, epoch, history, summary, extra=None):
    """Every rank calls this (the RNG states are gathered); rank 0 writes the checkpoint and its metrics, and the
    `extra` files ({name: bytes}), all or none of them (write_files)."""
    rng = rng_states(generator)
    rank, world_size = rank_and_world_size()
    if rank != 0:
        return

    def state_bytes():
        buffer = io.BytesIO()
        torch.save(dict(epoch=epoch, history=history, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng=rng), buffer)
        return buffer.getvalue()
    files = {'trainable.safetensors': lambda: trainable_bytes(model, epoch), **(extra or {}), 'state.pt': state_bytes,
             'metrics.csv': metrics_bytes(history), 'summary.json': json_bytes(summary)}
    then = (f"resume it, from epoch {epoch - 1}: {resume_command(run_dir, world_size)}" if epoch else
            "run the command again")
    write_files({os.path.join(run_dir, name): payload for name, payload in files.items()}, then)


def first_sentence(error, limit=200):
    """An exception's message for one line: torch's runs on for three sentences of advice after what went wrong."""
    text = ' '.join(str(error).split()) or 'no message'
    text = text.split('. ')[0].rstrip('.')
    return text if len(text) <= limit else text[:limit].rsplit(' ', 1)[0] + ' ...'


def checkpoint_epoch(path):
    """The epoch a trainable.safetensors or best.safetensors was saved at (-1 if it does not say)."""
    from safetensors import safe_open
    with safe_open(path, 'pt') as f:
        return int((f.metadata() or {}).get('epoch', -1))


def unreadable_file(path):
    """A checkpoint the user may not read is said so, not called damaged (safetensors reports it as 'No such file or
    directory')."""
    if not os.access(path, os.R_OK):
        raise SystemExit(f"error: cannot read {path} (permission denied); make it readable (chmod u+r, or ask its "
                         f"owner)")


def load_trainable(path, model):
    """Apply a run's trainable.safetensors (or best.safetensors) to `model`, built from the same config;
    -> the epoch it was saved at."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; " + (
            "best.safetensors needs a run with --val_split > 0" if os.path.basename(path) == 'best.safetensors' else
            "a run writes it when it has finished its setup, so this run directory is incomplete"))
    try:
        epoch = checkpoint_epoch(path)
        tensors = load_file(path)
    except Exception as e:
        unreadable_file(path)
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}: {first_sentence(e)}); the run's checkpoint "
                         f"is damaged")
    own = model.state_dict()
    other_shapes = [f"{name} {tuple(tensor.shape)} where the model has {tuple(own[name].shape)}"
                    for name, tensor in tensors.items() if name in own and tensor.shape != own[name].shape]
    if other_shapes:  # load_state_dict would raise a traceback-sized RuntimeError
        raise SystemExit(f"error: {path} does not match this run's model ({'; '.join(other_shapes[:2])}): the file "
                         f"comes from another run, or the run's config.json was edited")
    result = model.load_state_dict(tensors, strict=False)
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if result.unexpected_keys or expected - set(tensors):
        raise SystemExit(f"error: {path} does not match this run's model (unexpected {result.unexpected_keys[:3]}, "
                         f"missing {sorted(expected - set(tensors))[:3]})")
    return epoch


def finish_interrupted_save(run_dir):
    """A checkpoint save that a crash (kill -9, the out-of-memory killer, power loss) cut short between write_files'
    renames, finished: trainable.safetensors (renamed first) is an epoch newer than state.pt, and the save's other
    files wait in its temps, each whole (written and fsynced before the first rename). Without this the run could
    only start anew. Call it holding the run's lock. -> the epoch whose save was finished, or None."""
    temps = [name for name in os.listdir(run_dir) if name.startswith('state.pt.tmp')]
    if not temps:  # every save that reached its renames: state.pt's temp goes only once renamed
        return None
    try:
        epoch = checkpoint_epoch(os.path.join(run_dir, 'trainable.safetensors'))
        if torch.load(os.path.join(run_dir, 'state.pt'), map_location='cpu', weights_only=False)['epoch'] != epoch - 1:
            return None
    except Exception:  # load_state and load_trainable say what is wrong with them
        return None
    for temp in temps:
        suffix = temp[len('state.pt'):]
        if os.path.exists(os.path.join(run_dir, 'trainable.safetensors' + suffix)):
            continue  # a save killed before its renames began (an earlier process's): not the one cut short
        with contextlib.suppress(Exception):  # a temp cut short as it was written: not this save's
            if torch.load(os.path.join(run_dir, temp), map_location='cpu', weights_only=False)['epoch'] == epoch:
                break
    else:
        return None
    for name in SAVE_FILES[1:]:  # after trainable.safetensors, as save_checkpoint renames them
        path = os.path.join(run_dir, name)
        if os.path.isfile(path + suffix) and (name != 'best.safetensors' or checkpoint_epoch(path + suffix) == epoch):
            os.replace(path + suffix, path)
    best = os.path.join(run_dir, 'best.safetensors')
    if os.path.isfile(best) and checkpoint_epoch(best) == epoch:  # fit's removal after a new best's save
        for name in BEST_VIEWS:
            remove_stale(run_dir, name)
    return epoch


def remove_dead_save_temps(run_dir):
    """The temps of saves a crash cut short before all their renames (a full model's state.pt temp is hundreds of MB),
    removed. Call it holding the run's lock, after finish_interrupted_save and a load_state that succeeded: only the
    lock's holder saves, so every such temp is a dead process's (--eval_only and --predict write without the lock only
    files of other names); beside a damaged state.pt they are kept, as they may be the run's one whole copy.
    -> the names removed."""
    removed = []
    for name in sorted(os.listdir(run_dir)):
        saved, tmp, pid = name.rpartition('.tmp')
        if tmp and pid.isdigit() and saved in SAVE_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, name))
            removed.append(name)
    return removed


def load_resumed_trainable(run_dir, model, state):
    """A resumed run's trainable.safetensors into `model`, checked to be from the epoch of its state.pt."""
    saved_epoch = load_trainable(os.path.join(run_dir, 'trainable.safetensors'), model)
    if saved_epoch != state['epoch']:
        saved = f"is from epoch {saved_epoch}" if saved_epoch >= 0 else "records no epoch (vpt did not write it)"
        raise SystemExit(f"error: {run_dir}: trainable.safetensors {saved} but state.pt is from epoch {state['epoch']}"
                         f"{' (killed while saving?)' if saved_epoch >= 0 else ''}; start a new run")


def check_optimizer_state(run_dir, model, saved, weight_decay):
    """state.pt's optimizer state must be of this model: torch loads moments of other shapes (another run's file, an
    edited --prompts) without a word, and the first step fails with a traceback after config.json was rewritten."""
    groups = [group['params'] for group in parameter_groups(model, weight_decay)]
    try:
        saved_groups = [group['params'] for group in saved['param_groups']]
        misfits = [f"{tuple(tensor.shape)} where the model has {tuple(param.shape)}"
                   for indices, params in zip(saved_groups, groups) for index, param in zip(indices, params)
                   for tensor in saved['state'].get(index, {}).values()
                   if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape != param.shape]
    except (KeyError, TypeError, AttributeError):
        misfits, saved_groups = ['a form torch does not write'], []
    other_count = [len(indices) for indices in saved_groups] != [len(params) for params in groups]
    if misfits or other_count:
        held = (f"{sum(map(len, saved_groups))} tensors where the model trains {sum(map(len, groups))}"
                if other_count and saved_groups else misfits[0])
        raise SystemExit(f"error: {run_dir}/state.pt does not match this run's model (its optimizer state holds "
                         f"{held}): the file comes from another run, or the run's config.json was edited; restore it, "
                         f"or --eval_only still evaluates its trainable.safetensors")


def complete_finished(run_dir, state, val_split, test_images, classes):
    """A finished run's metrics.csv and summary.json made again from its state.pt where they lag it: deleted, or a
    crash between write_files' renames (state.pt is renamed before them) left the previous epoch's, and sweep.py would
    launch the run again on every relaunch. A file that does not lag (a damaged or hand-edited one) is left as it is.
    -> the names rewritten."""
    history, epoch = state['history'], state['epoch']
    summary_path, metrics_path = os.path.join(run_dir, 'summary.json'), os.path.join(run_dir, 'metrics.csv')
    files = {}
    try:
        with open(summary_path) as f:
            done = json.load(f).get('epochs_done', 0)  # none: --eval_only's per_class_acc in a summary.json it made
    except FileNotFoundError:
        done = 0
    except (ValueError, RecursionError, AttributeError):  # not JSON, or not an object: the sweep's loop goes on
        done = None
        print(f"note: {summary_path} is no summary vpt can read (damaged, or edited by hand), so sweep.py and plot.py "
              f"take the run for unfinished; it is left as it is: remove it and resume the run again to write it "
              f"from its state.pt", file=sys.stderr, flush=True)
    except OSError:
        done = None
    if type(done) is int and done < epoch:
        last_is_best = best_val_epoch(history) == epoch  # as fit: a new best drops the older best's per-class view
        summary = dict(summarize(history, epoch, val_split, test_images),
                       **({} if last_is_best else best_view(run_dir)))
        confusion = read_confusion(os.path.join(run_dir, 'confusion.csv'), classes)
        if confusion is not None:
            summary['per_class_acc'] = per_class_accuracy(confusion, classes)
        files[summary_path] = json_bytes(summary)
    try:
        with open(metrics_path, newline='') as f:
            rows = sum(1 for _ in csv.reader(f)) - 1
    except FileNotFoundError:
        rows = 0
    except (OSError, ValueError, csv.Error):  # csv.Error: a field past csv's size limit (a file of no newline)
        rows = None
    if rows is not None and rows < len(history):
        files[metrics_path] = metrics_bytes(history)
    write_files(files, then='resume it again')
    return [os.path.basename(path) for path in files]


def read_confusion(path, classes):
    """confusion.csv (confusion_bytes) as a tensor, or None when it is missing or not one of `classes`."""
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError, csv.Error):
        with open(path, newline='', encoding='utf-8') as f:
            rows = list(csv.reader(f))
        names = [utf8_text(name) for name in classes]  # as confusion_bytes wrote them
        if rows and rows[0][1:] == names and [row[:1] for row in rows[1:]] == [[name] for name in names]:
            return torch.tensor([[int(count) for count in row[1:]] for row in rows[1:]])
    return None


def load_state(run_dir):
    path = os.path.join(run_dir, 'state.pt')
    try:  # to the CPU: RNG states must be CPU tensors, and optimizer.load_state_dict moves its state to each parameter
        state = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        unreadable_file(path)
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}: {first_sentence(e)}); the "
                         f"run's state is damaged: --eval_only still evaluates its trainable.safetensors, or start a "
                         f"new run")
    if not isinstance(state, dict) or not {'epoch', 'history', 'optimizer', 'scheduler', 'rng'} <= set(state):
        raise SystemExit(f"error: {path} is not a vpt run's state (epoch, history, optimizer, scheduler and rng); the "
                         f"run directory is damaged: --eval_only still evaluates its trainable.safetensors, or start a "
                         f"new run")
    if not isinstance(state['rng'], dict) or 'ranks' not in state['rng']:
        raise SystemExit(f"error: {run_dir}/state.pt was written by an older vpt whose data order depended on the "
                         f"device; it cannot be resumed exactly. Its metrics and trainable.safetensors stay usable "
                         f"(--eval_only); start a new run to train further")
    return state


# ---------------------------------------------------------------- the run


def fit(model, splits, classes, args, run_dir, device, state=None, test_names=None):
    """Train for args.epoch epochs, evaluating val (if any) and test after each, checkpointing and logging on rank 0.
    A resumed run passes `state` (load_state) and has its trainable tensors in `model` (load_resumed_trainable).
    `splits`: {'train', 'val' (or None), 'test'} -> (uint8 images, labels) on the device (splits_to_device).
    `test_names` (data.load_dataset's) name the rows of the last epoch's test_predictions.csv."""
    rank, world_size = rank_and_world_size()
    train_images, train_labels = splits['train']
    preprocess = data.preprocessing(model.vit.pretrained_cfg, device, args.img_size)
    steps_per_epoch, warmup_steps, total_steps = schedule_steps(len(train_labels), args.batch_size, args.epoch,
                                                                args.warmup_epochs)
    optimizer = make_optimizer(model, args.optimizer, args.lr, args.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    scaler = make_scaler(device, args.amp)
    generator = torch.Generator().manual_seed(args.seed)  # data order and augmentation: CPU, device-independent
    summary_of = lambda history: summarize(history, args.epoch, args.val_split, len(splits['test'][1]))
    with StopRequest() as stop:  # from here a signal stops at a step's end, or before the first, never mid-write
        history, done = [], 0
        if state is not None:
            optimizer.load_state_dict(state['optimizer'])
            scheduler.load_state_dict(state['scheduler'])
            if state.get('scaler') and scaler.is_enabled():  # {} from a bf16 or fp32 run (or an older vpt): fresh
                scaler.load_state_dict(state['scaler'])
            # a changed --epoch re-lays the schedule
            for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
                group['lr'] = base_lr * lr_factor(scheduler.last_epoch, warmup_steps, total_steps)
            restore_rng(state['rng'], generator, args.seed)
            history, done = state['history'], state['epoch']
            # main.py resumes only a run with epochs left; after a raised --epoch it is no longer finished
            if rank == 0:
                write_json(os.path.join(run_dir, 'summary.json'), dict(summary_of(history), **best_view(run_dir)))
                keep_as_epoch(run_dir, done)  # so its confusion.csv, if it had finished, is no longer the result
        else:  # epoch 0: a run stopped in its first epoch can be resumed too
            if rank > 0:  # every rank built the same model; from here each draws its own prompt-dropout masks
                torch.manual_seed(args.seed + rank)
            save_checkpoint(run_dir, model, optimizer, scheduler, scaler, generator, 0, history, summary_of(history))
        writer = open_tensorboard(run_dir) if args.tensorboard and rank == 0 else None
        if args.compile:
            model.compile()  # in place: parameter names, checkpoints and DDP see the same module
        compiling = args.compile  # the first epoch of this process also compiles the training and evaluation graphs
        net = model
        if world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(model,
                                                            device_ids=[device] if device.type == 'cuda' else None)
        evaluate_on = lambda split, per_image=False: evaluate_split(model, split, args.batch_size, preprocess, args.amp,
                                                                   per_image)
        if any_rank(stop.signum is not None, device):  # came while the run was set up: its checkpoint is saved
            stopped(stop.signum or signal.SIGTERM, run_dir, done, rank, world_size)
        for epoch in range(done + 1, args.epoch + 1):
            start = time.perf_counter()
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            batches = data.train_batches(train_images, train_labels, args.batch_size, generator, preprocess, rank,
                                         world_size, args.augment)
            try:
                with explain_out_of_memory(args.batch_size, args.amp, f'in training epoch {epoch}'):
                    trained = train_epoch(net, optimizer, scheduler, batches, steps_per_epoch, args.amp, stop,
                                          desc=f'epoch {epoch}/{args.epoch}', scaler=scaler)
                if trained is None:
                    stopped(stop.signum or signal.SIGTERM, run_dir, epoch - 1, rank, world_size)
                train_time = time.perf_counter() - start
                with explain_out_of_memory(args.batch_size, args.amp, f'evaluating epoch {epoch}'):
                    val_loss, val_acc, _ = evaluate_on(splits['val']) if splits['val'] else (None, None, None)
                    # the run's result: which images it missed
                    test_loss, test_acc, confusion, *per_image = evaluate_on(
                        splits['test'], epoch == args.epoch and test_names is not None)
                # the epoch's last update is checked by no training loss: weights it broke compute non-finite logits,
                # whose argmax is class 0, an accuracy that looks like one
                broken = [name for name, loss in (('val', val_loss), ('test', test_loss))
                          if loss is not None and not math.isfinite(loss)]
                if broken:
                    raise FloatingPointError(steps_per_epoch, f'{broken[0]} loss after the update')
            except FloatingPointError as e:
                if rank == 0:  # on record for plot.py: this run is not one to --resume, as it would diverge again
                    write_json(os.path.join(run_dir, 'summary.json'),
                               dict(summary_of(history), diverged=dict(epoch=epoch, step=e.args[0])))
                fp16 = (" or with --amp False (this GPU has no bf16 units, so --amp trains in fp16, whose range is "
                        "narrow)" if amp_name(device, args.amp) == 'float16' else "")
                raise FloatingPointError(f"error: non-finite {e.args[1]} at epoch {epoch}, step {e.args[0]}; start a "
                                         f"new run with a lower --lr (it is {args.lr:g}: a resume keeps it and would "
                                         f"diverge again){fp16}; the checkpoint of epoch {epoch - 1} is intact")
            row = dict(epoch=epoch, train_loss=trained[0], train_acc=trained[1], test_loss=test_loss, test_acc=test_acc,
                       lr=args.lr * lr_factor(epoch * steps_per_epoch - 1, warmup_steps, total_steps),
                       epoch_time_s=time.perf_counter() - start,
                       train_images_per_s=steps_per_epoch * args.batch_size / train_time,
                       val_loss=val_loss, val_acc=val_acc,
                       peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None,
                       includes_compile=int(compiling))
            compiling = False
            history.append(row)
            new_best = best_val_epoch(history) == epoch
            summary = dict(summary_of(history), **({} if new_best else best_view(run_dir)))
            if epoch == args.epoch:  # the finished run's per-class view
                summary['per_class_acc'] = per_class_accuracy(confusion, classes)
            extra = {}  # saved with the checkpoint, all or none
            if rank == 0 and new_best:
                extra['best.safetensors'] = trainable_bytes(model, epoch)
            if rank == 0 and epoch == args.epoch:
                extra['confusion.csv'] = confusion_bytes(confusion, classes)
            if rank == 0 and per_image:
                extra['test_predictions.csv'] = predictions_bytes(test_names, splits['test'][1], *per_image[0],
                                                                  classes, 'last', epoch)
            save_checkpoint(run_dir, model, optimizer, scheduler, scaler, generator, epoch, history, summary, extra)
            if rank == 0 and new_best:  # --eval_only's, of the best checkpoint until now, and plot.py's figures
                for name in BEST_VIEWS:
                    remove_stale(run_dir, name)
            if rank == 0:
                print(epoch_line(row, args.epoch), flush=True)
                if writer:
                    steps = range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch)
                    step_lrs = {step + 1: args.lr * lr_factor(step, warmup_steps, total_steps) for step in steps}
                    log_tensorboard(writer, row, step_lrs, confusion if epoch == args.epoch else None, classes)
            if any_rank(stop.signum is not None, device):
                if epoch < args.epoch:
                    stopped(stop.signum or signal.SIGTERM, run_dir, epoch, rank, world_size)
                elif rank == 0:
                    print(f"{signal.Signals(stop.signum or signal.SIGTERM).name} came after the last epoch was saved: "
                          f"{run_dir} is finished", file=sys.stderr, flush=True)
        if writer:  # still under StopRequest: a signal now changes nothing, the run is saved
            writer.close()
        summary = summary_of(history)
        if rank == 0 and summary['best_val_epoch'] is not None:
            print(f"best val epoch {summary['best_val_epoch']}: val acc {summary['best_val_acc']:.2f}%, test acc "
                  f"{summary['test_acc_at_best_val']:.2f}% (best.safetensors); final test acc "
                  f"{summary['final_test_acc']:.2f}%; results in {run_dir}", flush=True)
        elif rank == 0:
            print(f"final test acc {summary['final_test_acc']:.2f}% (without --val_split no epoch is chosen); results "
                  f"in {run_dir}", flush=True)
        stop.finished = True  # main() puts its caller's handlers back


def epoch_line(row, epochs):
    """The line an epoch prints: its metrics.csv row."""
    val_text = f"val acc {row['val_acc']:.2f}%  " if row['val_acc'] is not None else ''
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%  "
            f"{val_text}test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  lr {row['lr']:.2e}  "
            f"{row['epoch_time_s']:.1f}s  {row['train_images_per_s']:.0f} img/s"
            + ('  (includes compiling)' if row['includes_compile'] else ''))


def stopped(signum, run_dir, last_epoch, rank, world_size):
    if rank == 0:
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopped; {run_dir} keeps the checkpoint and metrics of "
                         f"epoch {last_epoch}. Resume with:\n  {resume_command(run_dir, world_size)}\n")  # one write
        sys.stderr.flush()
    raise SystemExit(128 + signum)


def launcher(world_size):
    """How to start main.py as this process was: python or torchrun with its layout (torchrun sets
    LOCAL_WORLD_SIZE), then main.py's path (main.script_path: bare in its own folder, else absolute)."""
    import main
    script = shlex.quote(main.script_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'main.py')))
    if world_size == 1:
        return f'python {script}'
    per_node = int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
    nodes = world_size // per_node
    return 'torchrun ' + (f'--nnodes={nodes} ' if nodes > 1 else '') + f'--nproc_per_node={per_node} {script}'


def resume_command(run_dir, world_size):
    command = f"{launcher(world_size)} --resume {shlex.quote(str(run_dir))}"
    nodes = world_size // int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
    # the rendezvous flags (and the node rank) differ from machine to machine: only the user knows them
    return command + (f"  # on each of the {nodes} machines, with the rendezvous flags it was started with"
                      if nodes > 1 else '')


# ---------------------------------------------------------------- TensorBoard (optional dependency)


def check_tensorboard():
    import importlib
    try:
        importlib.import_module('tensorboard')  # torch.utils.tensorboard needs the tensorboard package
    except ImportError:
        raise SystemExit("error: --tensorboard True needs the tensorboard package; pip install tensorboard "
                         "(or pass --tensorboard False)")


def open_tensorboard(run_dir):
    from torch.utils.tensorboard import SummaryWriter
    # events are written after each epoch's checkpoint, so a resumed run never repeats a step: no purge needed
    return SummaryWriter(run_dir)


def log_tensorboard(writer, row, step_lrs, confusion, classes):
    """The epoch's metrics.csv row as scalars (x: epoch), the lr of every step ({step: lr}, x: step counted from 1),
    the final confusion matrix as a figure."""
    for key in METRICS_HEADER[1:]:
        if row.get(key) is not None and key != 'includes_compile':
            writer.add_scalar(f"epoch/{key}", row[key], row['epoch'])
    for step, lr in step_lrs.items():
        writer.add_scalar('step/lr', lr, step)
    if confusion is not None:
        import plot
        figure = plot.confusion_figure(f"epoch {row['epoch']}", list(map(utf8_text, classes)), confusion.numpy())
        plot.fit_fonts(figure)
        with plot.quiet_font_search():
            writer.add_figure('confusion', figure, row['epoch'])
    writer.flush()
