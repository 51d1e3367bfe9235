import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Never reach for the Hugging Face hub from a test: a test that wants a download failure asks for it explicitly.
os.environ['HF_HUB_OFFLINE'] = '1'
CIFAR_JPG = os.environ.get('VPT_CIFAR_JPG', os.path.join(REPO, '..', 'shared', 'data', 'cifar10-jpg.tar.gz'))

# A tiny CLI run: timm's registered 6-layer, 64-dim test ViT, random init, a few images, CPU.
TINY = ['--model', 'test_vit', '--pretrained', 'False', '--device', 'cpu', '--prompts', '4']


def write_folder_dataset(root, classes=('cat', 'dog', 'frog'), train_per_class=16, test_per_class=6, size=32, seed=0):
    """A small learnable image-folder dataset: each class has its own mean colour plus noise."""
    from PIL import Image
    generator = torch.Generator().manual_seed(seed)
    for split, count in (('train', train_per_class), ('test', test_per_class)):
        for label, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name))
            colour = torch.tensor([60 + 80 * label, 200 - 70 * label, 40 + 50 * (label % 2)]).view(3, 1, 1)
            for i in range(count):
                noise = torch.randint(-40, 41, (3, size, size), generator=generator)
                image = (colour + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(root, split, name, f'{i:04d}.png'))
    return str(root)


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp('tiny') / 'data')


@pytest.fixture(scope='session')
def cifar_folder(tmp_path_factory):
    """The real CIFAR-10 JPEGs (../shared/data/cifar10-jpg.tar.gz), extracted once per session."""
    if not os.path.isfile(CIFAR_JPG):  # a data file outside the repo, not a package: say so loudly (pytest -rs)
        pytest.skip(f"REAL-DATA TEST NOT RUN: {os.path.abspath(CIFAR_JPG)} is missing; set VPT_CIFAR_JPG to "
                    f"cifar10-jpg.tar.gz (train/<class>/*.jpg, test/<class>/*.jpg) to run it")
    # 60,000 small files: on a VM's disk creating them takes 20-40 s, in a RAM-backed /dev/shm about 4 s
    shm = '/dev/shm'
    in_memory = os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 ** 30
    root = tempfile.mkdtemp(prefix='vpt-cifar10jpg-', dir=shm) if in_memory else tmp_path_factory.mktemp('cifar10jpg')
    try:
        with tarfile.open(CIFAR_JPG) as archive:
            archive.extractall(root, filter='data')
        yield str(root)
    finally:
        if in_memory:  # not under pytest's tmp_path, so nobody else removes it
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def one_torch_thread():
    """One torch thread in this process for the test, as each worker of torchrun and each trial of the sweep tests
    (OMP_NUM_THREADS=1) has: a run in this process (run_main) beside such child processes, or beside other work on a
    small CPU, with a thread per core spends most of its time with one thread waiting on the other (a DDP test's
    one-process run: ~20 s with two threads, 2 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def deny_listing(monkeypatch, denied):
    """os.scandir (which os.walk lists with) as for a user without read permission on the folders `denied`: the tests
    run as root, for whom chmod denies nothing."""
    scandir = os.scandir

    def listing(path='.'):
        if os.path.abspath(path) in map(str, denied):
            raise PermissionError(13, 'Permission denied', path)
        return scandir(path)
    monkeypatch.setattr(os, 'scandir', listing)


def run_main(argv, capsys):
    """main.main(argv) in this process -> (exit code, stdout, stderr). Same parsing, checks and messages as the
    command line, without paying ~6 s of torch/torchvision imports per call."""
    import main
    code = 0
    try:
        main.main([str(a) for a in argv])
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli(argv, script='main.py', timeout=300, **kwargs):
    """The real entry point in a subprocess."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.update(kwargs.pop('env', {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


def stderr_when_the_reader_goes_away(argv, script):
    """Run a script with its stdout a pipe nobody reads (as `| head` leaves it once head exits): -> (exit code,
    stderr)."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, argv)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    process.stdout.close()  # before the script writes anything: its first write finds no reader
    err = process.stderr.read()
    return process.wait(timeout=120), err


def signal_on_import(script, argv, signum, module, swallowed=False, again=False):
    """`python script argv...` that sends itself `signum` as Python first looks up `module` -> CompletedProcess.
    `swallowed`: the exception its handler raises there is then cleared, as C code that imports a module does (an
    extension module importing another as it loads: torch's triton, ElementTree's pyexpat). `again`: a second
    `signum` once the first line has been written to stderr (a terminal's Ctrl-C that sweep.py passes on too)."""
    send = f"os.kill(os.getpid(), {int(signum)})"
    code = (f"import os, runpy, sys, time\n"
            f"class SignalAgain:  # stderr that sends the signal again once it has written the first line\n"
            f"    sent = False\n"
            f"    def write(self, text):\n"
            f"        sys.__stderr__.write(text)\n"
            f"        if not SignalAgain.sent:\n"
            f"            SignalAgain.sent = True\n"
            f"            {send}\n"
            f"    def flush(self):\n"
            f"        sys.__stderr__.flush()\n"
            f"class Hook:\n"
            f"    def find_spec(self, name, path, target=None):\n"
            f"        if name == {module!r}:\n"
            + ("            sys.stderr = SignalAgain()\n" if again else '')
            + (f"            try:\n"
               f"                {send}; time.sleep(5)\n"
               f"            except KeyboardInterrupt:\n"
               f"                pass\n" if swallowed else f"            {send}\n") +
            f"sys.meta_path.insert(0, Hook())\n"
            f"sys.argv = [{script!r}, *{list(map(str, argv))!r}]\n"
            f"sys.path.insert(0, {REPO!r})\n"
            f"runpy.run_path({os.path.join(REPO, script)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


def read_metrics(run_dir):
    import csv
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


def signal_after_first_epoch(process, run_dir, signum, group=False, timeout=240):
    """In a background thread: send `signum` to `process` (its whole process group with `group`, as a terminal's
    Ctrl-C does) as soon as epoch 1's metrics row exists, that is while epoch 2 runs. Returns the thread."""
    def watch():
        deadline = time.time() + timeout
        path = os.path.join(run_dir, 'metrics.csv')
        while time.time() < deadline and process.poll() is None:
            if os.path.exists(path) and len(open(path).read().splitlines()) >= 2:
                os.killpg(process.pid, signum) if group else process.send_signal(signum)
                return
            time.sleep(0.02)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def write_jax_npz(vit, path):
    """A timm ViT saved in the layout of Google's original JAX checkpoints (imagenet21k/ViT-B_16.npz): the inverse
    of the name and axis mapping timm's .npz reader applies."""
    state = {name: tensor.detach().numpy() for name, tensor in vit.state_dict().items()}
    heads = vit.blocks[0].attn.num_heads
    dim = vit.embed_dim
    npz = {'embedding/kernel': state['patch_embed.proj.weight'].transpose(2, 3, 1, 0),  # OIHW -> HWIO
           'embedding/bias': state['patch_embed.proj.bias'], 'cls': state['cls_token'],
           'Transformer/posembed_input/pos_embedding': state['pos_embed'],
           'Transformer/encoder_norm/scale': state['norm.weight'], 'Transformer/encoder_norm/bias': state['norm.bias'],
           'head/kernel': state['head.weight'].T, 'head/bias': state['head.bias']}
    for i in range(len(vit.blocks)):
        block, jax = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
        attention = jax + 'MultiHeadDotProductAttention_1/'
        for norm, name in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_2')):
            npz[f'{jax}{name}/scale'] = state[f'{block}{norm}.weight']
            npz[f'{jax}{name}/bias'] = state[f'{block}{norm}.bias']
        for part, weight, bias in zip(('query', 'key', 'value'), state[block + 'attn.qkv.weight'].reshape(3, dim, dim),
                                      state[block + 'attn.qkv.bias'].reshape(3, dim)):
            npz[f'{attention}{part}/kernel'] = weight.T.reshape(dim, heads, -1)
            npz[f'{attention}{part}/bias'] = bias.reshape(heads, -1)
        npz[f'{attention}out/kernel'] = state[block + 'attn.proj.weight'].reshape(dim, heads, -1).transpose(1, 2, 0)
        npz[f'{attention}out/bias'] = state[block + 'attn.proj.bias']
        for r in range(2):
            npz[f'{jax}MlpBlock_3/Dense_{r}/kernel'] = state[f'{block}mlp.fc{r + 1}.weight'].T
            npz[f'{jax}MlpBlock_3/Dense_{r}/bias'] = state[f'{block}mlp.fc{r + 1}.bias']
    np.savez(path, **dict(sorted(npz.items())))  # in the order of Google's files: 'Transformer/...' first
