"""The GPU suite: what a user on a CUDA machine depends on, end to end. Skipped as a whole without CUDA.

    python -m pytest tests/test_gpu.py -rs -s      # -s shows the printed peak-memory line to paste into the README

Tiny models and data made here (timm's test_vit, random init; folder datasets from conftest), except the ViT-B/4
shape (vit_base_patch16_224, pretrained=False) for bf16 exactness and peak memory. A few minutes on one GPU, most of
it process start-up and the one torch.compile.
"""
import csv
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip(f"GPU SUITE NOT RUN: CUDA is not available here (torch {torch.__version__}); run "
                f"python -m pytest tests/test_gpu.py -rs on a machine with a GPU", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from conftest import (REPO, TINY, read_metrics, run_cli, run_main, signal_after_first_epoch,  # noqa: E402
                      write_folder_dataset)
from model import PromptedViT, create_vit, set_trainable  # noqa: E402

GPU_NAME = torch.cuda.get_device_name(0)
# columns that measure the machine rather than the training: they differ between any two runs
MACHINE_COLUMNS = ('epoch_time_s', 'train_images_per_s', 'peak_mem_gib', 'includes_compile')
# Two CUDA runs of one command are not bitwise equal by default (flash attention's backward accumulates dQ with
# atomics; cuBLAS may pick non-deterministic kernels). The runs compared bit for bit therefore go through main.main()
# with deterministic algorithms and the math attention kernel, so the comparison isolates what resuming must restore:
# weights, optimizer, schedule, data order and the CUDA RNG of prompt dropout.
DETERMINISTIC_MAIN = ("import torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                      "torch.backends.cuda.enable_flash_sdp(False); torch.backends.cuda.enable_mem_efficient_sdp(False); "
                      "torch.backends.cuda.enable_cudnn_sdp(False); import main; main.main()")
DETERMINISTIC_ENV = dict(CUBLAS_WORKSPACE_CONFIG=':4096:8')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    # 2400 training images: a CUDA epoch of the tiny model lasts long enough (75 steps) for a signal sent after
    # epoch 1 to land before the run ends; 200 test images for the cross-device accuracy tolerance
    return write_folder_dataset(tmp_path_factory.mktemp('gpu') / 'data', classes=('a', 'b', 'c', 'd'),
                                train_per_class=600, test_per_class=50)


def flags(dataset, log_dir, name, device, epochs, *extra):
    # TINY says --device cpu; the later --device wins (argparse keeps the last occurrence)
    return [*TINY, '--device', device, '--patch_size', 8, '--dataset', dataset, '--epoch', epochs, '--batch_size', 32,
            '--log_dir', log_dir, '--name', name, *extra]


def start(argv, deterministic=False):
    """main.py in a background process (to be signalled); with `deterministic`, through DETERMINISTIC_MAIN."""
    command = ['-c', DETERMINISTIC_MAIN] if deterministic else [os.path.join(REPO, 'main.py')]
    env = dict(os.environ, PYTHONUNBUFFERED='1', **(DETERMINISTIC_ENV if deterministic else {}))
    return subprocess.Popen([sys.executable, *command, *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def interrupt_after_first_epoch(argv, run_dir, epochs, deterministic=False):
    """Run, SIGINT once epoch 1 is logged; -> the epochs it kept. Wherever the signal lands (epoch 2 or later, since
    GPU epochs are short), the run stops before its last epoch, keeps what it finished and exits 130."""
    process = start(argv, deterministic)
    watcher = signal_after_first_epoch(process, run_dir, signal.SIGINT, timeout=600)
    code, out, err = finish(process)  # drains the pipes meanwhile: a full pipe would block the run before the signal
    watcher.join()
    assert code == 130, f"expected the SIGINT to stop the run (exit 130), got {code}: {err[-3000:]}"
    assert 'Traceback' not in err
    kept = len(read_metrics(run_dir))
    assert 1 <= kept < epochs
    return kept


def without_machine_columns(rows):
    return [{k: v for k, v in row.items() if k not in MACHINE_COLUMNS} for row in rows]


# ---------------------------------------------------------------- the CLI on CUDA


@pytest.mark.parametrize('device', ['cuda', 'auto'])
def test_default_run_on_cuda(tiny_dataset, tmp_path, device):
    """The default flags (bf16 autocast, kv prompts, eager) end to end; `--device cuda` has no index."""
    result = run_cli([*TINY, '--device', device, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8,
                      '--log_dir', tmp_path, '--name', 'run'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'device cuda:0' in result.stdout
    rows = read_metrics(tmp_path / 'run')
    assert [row['epoch'] for row in rows] == ['1', '2']
    for row in rows:
        assert 0 <= float(row['test_acc']) <= 100 and float(row['train_loss']) > 0
        if row.get('peak_mem_gib'):
            assert float(row['peak_mem_gib']) > 0
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert config['device_name'] == GPU_NAME and config['amp'] is True and config['prompt_impl'] == 'kv'
    assert config['amp_dtype'] == ('bfloat16' if torch.cuda.get_device_capability()[0] >= 8 else 'float16')


def test_a_gpu_without_bf16_units_trains_in_fp16_with_loss_scaling(tiny_dataset, tmp_path, capsys, monkeypatch):
    """On a V100 or T4 (compute capability < 8) bf16 is emulated, slower than fp32, so --amp means fp16 autocast with
    a loss scaler there. Played on this GPU, which reports capability 7.5 here: the tiny dataset is learnt as in
    test_cli.py's fp32 run, every step in fp16, and state.pt keeps the scale."""
    import train
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 5))
    autocast, dtypes = train.autocast, set()

    def recorded(device, amp):
        context = autocast(device, amp)
        dtypes.add(context.fast_dtype)
        return context
    monkeypatch.setattr(train, 'autocast', recorded)
    code, _, err = run_main([*TINY, '--device', 'cuda', '--prompts', 0, '--full', True, '--dataset', tiny_dataset,
                             '--epoch', 6, '--batch_size', 8, '--lr', 2e-3, '--log_dir', tmp_path, '--name', 'fp16'],
                            capsys)
    assert code == 0, err[-3000:]
    assert dtypes == {torch.float16}
    assert json.loads((tmp_path / 'fp16' / 'config.json').read_text())['amp_dtype'] == 'float16'
    assert float(read_metrics(tmp_path / 'fp16')[-1]['test_acc']) >= 80
    assert torch.load(tmp_path / 'fp16' / 'state.pt', weights_only=False)['scaler']['scale'] > 0


def test_interrupted_cuda_run_resumes_exactly(dataset, tmp_path):
    """SIGINT after epoch 1, --resume: the same metrics as the uninterrupted run, bit for bit (machine columns aside).
    Prompt dropout 0.1 draws its masks from the CUDA RNG, so its state must be saved and restored too."""
    extra = ('--prompt_dropout', 0.1)
    straight = start(flags(dataset, tmp_path, 'straight', 'cuda', 4, *extra), deterministic=True)
    code, _, err = finish(straight)
    assert code == 0, err[-3000:]
    interrupt_after_first_epoch(flags(dataset, tmp_path, 'interrupted', 'cuda', 4, *extra), tmp_path / 'interrupted',
                                4, deterministic=True)
    code, _, err = finish(start(['--resume', tmp_path / 'interrupted'], deterministic=True))
    assert code == 0, err[-3000:]
    resumed, expected = read_metrics(tmp_path / 'interrupted'), read_metrics(tmp_path / 'straight')
    assert len(resumed) == 4
    assert without_machine_columns(resumed) == without_machine_columns(expected)


@pytest.mark.parametrize('first, second', [('cpu', 'cuda'), ('cuda', 'cpu')])
def test_resume_on_another_device(dataset, tmp_path, first, second):
    """A run interrupted on one device resumes on the other (--device may change on resume) and trains what an
    uninterrupted run on that device trains, up to fp32 numerics: data order and augmentation come from a CPU
    generator and the model is initialised on the CPU, so with --amp False and no prompt dropout only the arithmetic
    differs (CUDA runs with TF32 matmuls). Tolerance: losses within 2% (+0.01), accuracies within 3 points (6 of the
    200 test images)."""
    extra = ('--amp', False, '--prompt_dropout', 0)
    code, _, err = finish(start(flags(dataset, tmp_path, 'straight', second, 3, *extra)))
    assert code == 0, err[-3000:]
    interrupt_after_first_epoch(flags(dataset, tmp_path, 'moved', first, 3, *extra), tmp_path / 'moved', 3)
    code, out, err = finish(start(['--resume', tmp_path / 'moved', '--device', second]))
    assert code == 0, err[-3000:]
    assert f"device {'cuda:0' if second == 'cuda' else 'cpu'}" in out
    resumed, expected = read_metrics(tmp_path / 'moved'), read_metrics(tmp_path / 'straight')
    assert [row['epoch'] for row in resumed] == [row['epoch'] for row in expected] == ['1', '2', '3']
    for got, want in zip(resumed, expected):
        for column in ('train_loss', 'test_loss'):
            assert float(got[column]) == pytest.approx(float(want[column]), rel=2e-2, abs=1e-2), (got['epoch'], column)
        for column in ('train_acc', 'test_acc'):
            assert float(got[column]) == pytest.approx(float(want[column]), abs=3.0), (got['epoch'], column)
        assert float(got['lr']) == pytest.approx(float(want['lr']), rel=1e-6)


def test_eval_only_reproduces_the_logged_test_accuracy(tiny_dataset, tmp_path):
    result = run_cli([*TINY, '--device', 'cuda', '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8,
                      '--log_dir', tmp_path, '--name', 'run'])
    assert result.returncode == 0, result.stderr[-3000:]
    logged = read_metrics(tmp_path / 'run')[-1]
    result = run_cli(['--eval_only', '--resume', tmp_path / 'run'])  # on the run's device, the GPU
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r'test accuracy ([0-9.]+)% test loss ([0-9.]+)', result.stdout)
    assert printed, result.stdout
    assert printed.group(1) == logged['test_acc']  # both formatted to 4 decimals: the same forward pass, bit for bit
    assert float(printed.group(2)) == pytest.approx(float(logged['test_loss']), rel=1e-5)
    with open(tmp_path / 'run' / 'test_predictions.csv') as f:  # each image's prediction, taken off the GPU
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and all(os.path.isfile(os.path.join(tiny_dataset, row['image'])) for row in rows)
    assert 100 * sum(row['correct'] == '1' for row in rows) / len(rows) == pytest.approx(float(printed.group(1)),
                                                                                         abs=1e-4)
    import numpy as np
    from PIL import Image
    import main
    cuda_rng = torch.cuda.get_rng_state()
    model, classes, to_input = main.load_model(tmp_path / 'run')  # in a notebook: on the GPU, CPU images moved there
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)  # the run's --seed did not reseed the notebook's GPU
    images = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(tiny_dataset, row['image']))))
                          for row in rows]).permute(0, 3, 1, 2)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):  # as --amp evaluated (another batch shape)
        probability, predicted = model(to_input(images)).float().softmax(1).max(1)
    assert next(model.parameters()).device.type == 'cuda'
    assert [classes[i] for i in predicted.tolist()] == [row['prediction'] for row in rows]
    assert probability.tolist() == pytest.approx([float(row['probability']) for row in rows], abs=0.02)


def test_compiled_run_recompiles_nothing_after_the_first_epoch(tiny_dataset, tmp_path):
    """--compile True: epoch 1 compiles the train graph and, at its evaluation, the eval graph; later epochs switch
    between those two cached graphs and must compile nothing (static shapes: drop_last training batches, padded eval
    batches). Checked in a subprocess through the CLI with TORCH_LOGS=recompiles, which logs every recompilation
    with its reason; stdout and stderr share one pipe (unbuffered), so a log line's position relative to the
    'epoch 1/2 ...' summary line says which epoch caused it. The CLI keeps this test independent of train.py's API."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', TORCH_LOGS='recompiles', TQDM_DISABLE='1')
    result = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *map(str, [
        *TINY, '--device', 'cuda', '--compile', True, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8,
        '--log_dir', tmp_path, '--name', 'run'])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, timeout=600)
    output = result.stdout
    assert result.returncode == 0, output[-3000:]
    first_epoch = re.search(r'epoch 1/2 +train loss', output)
    assert first_epoch and re.search(r'epoch 2/2 +train loss', output), output[-3000:]
    later = output[first_epoch.end():]
    assert 'Recompiling' not in later, later[:3000]
    print(f"\nrecompilations during epoch 1 (expected: the switch to eval): {output.count('Recompiling')}")
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['compile'] is True
    assert len(read_metrics(tmp_path / 'run')) == 2


def test_torchrun_on_cuda(tiny_dataset, tmp_path):
    """torchrun with one process per GPU. NCCL needs a GPU per rank, so with one GPU this is a 1-process launch
    (WORLD_SIZE=1: main.py then runs without a process group, so NCCL itself is only exercised with 2+ GPUs)."""
    nproc = min(2, torch.cuda.device_count())
    argv = [*TINY, '--device', 'cuda', '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8,
            '--log_dir', tmp_path, '--name', 'run']
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                             f'--nproc_per_node={nproc}', os.path.join(REPO, 'main.py'), *map(str, argv)],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TMPDIR=str(tmp_path)))  # not /tmp: torchrun leaves a folder there
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('run directory:') == 1  # only rank 0 reports and writes
    assert ('device cuda:0 x2' if nproc == 2 else 'device cuda:0') in result.stdout
    assert len(read_metrics(tmp_path / 'run')) == 2
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['world_size'] == nproc


# ---------------------------------------------------------------- numerics under bf16 autocast


@pytest.fixture
def no_tf32():
    """fp32 references in true fp32 (main.py turns TF32 on for training; a test in this process must not inherit it)."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def forward_backward(model, images, labels, impl, amp):
    model.prompt_impl = impl
    model.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    return logits.float().detach(), loss.item(), model.prompts.tokens.grad.flatten().clone()


@pytest.mark.parametrize('name, num_prompts, batch', [('test_vit', 4, 16), ('vit_base_patch16_224', 50, 64)],
                         ids=['tiny', 'ViT-B/4'])
def test_kv_matches_naive_under_bf16_autocast(no_tf32, name, num_prompts, batch):
    """The two prompt paths round different intermediate tensors to bf16 (8 significant bits; the kv path projects
    the prompts' K/V separately and runs only CLS through the last block), so they agree to bf16 accuracy, not
    bitwise. Stated tolerances: logits within atol 5e-2 + rtol 5e-2, loss within 2% relative, prompt gradients with
    cosine similarity > 0.99; and the kv path is no further from the fp32 result than 3x the naive path's own bf16
    error (+1e-3): it adds no error of its own beyond rounding (a real mistake is off by O(1))."""
    torch.manual_seed(0)
    model = PromptedViT(create_vit(name, 10, 32, 4, pretrained=False), num_prompts).cuda().eval()
    set_trainable(model, False)
    images = torch.randn(batch, 3, 32, 32, device='cuda')
    labels = torch.randint(0, 10, (batch,), device='cuda')
    logits32, loss32, _ = forward_backward(model, images, labels, 'naive', amp=False)
    logits_n, loss_n, grad_n = forward_backward(model, images, labels, 'naive', amp=True)
    logits_k, loss_k, grad_k = forward_backward(model, images, labels, 'kv', amp=True)
    torch.testing.assert_close(logits_k, logits_n, atol=5e-2, rtol=5e-2)
    assert loss_k == pytest.approx(loss_n, rel=2e-2)
    assert F.cosine_similarity(grad_k, grad_n, dim=0).item() > 0.99
    error_k, error_n = (logits_k - logits32).abs().max().item(), (logits_n - logits32).abs().max().item()
    assert error_k <= 3 * error_n + 1e-3, (error_k, error_n)


# ---------------------------------------------------------------- bench.py


def run_bench(tmp_path, *argv):
    out = tmp_path / 'bench.json'
    result = subprocess.run([sys.executable, 'bench.py', *map(str, argv), '--json', str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_tiny_on_cuda(tmp_path):
    report = run_bench(tmp_path, '--model', 'test_vit', '--batch_size', 32, '--steps', 3, '--warmup', 1,
                       '--eval_steps', 2, '--baseline_steps', 2, '--profile', True)
    assert report['device_type'] == 'cuda' and report['device'] == GPU_NAME and report['amp'] is True
    assert set(report['modes']) == {'P', 'F', 'P+F'}
    for mode, r in report['modes'].items():
        assert r['train_img_s'] > 0 and r['eval_img_s'] > 0 and r['peak_mem_gib'] > 0, mode
        kinds = r['profile']['ms_by_kind']  # GPU kernel time by the op that launched it
        assert r['profile']['steps'] == 10, r['profile']
        assert kinds['matmul'] > 0 and kinds['attention'] > 0 and kinds['optimizer'] > 0 and kinds['data'] > 0, kinds
    assert report['baseline']['train_img_s'] > 0 and report['baseline']['peak_mem_gib'] > 0


def test_peak_memory_of_prompt_tuning_vs_full_at_batch_512(tmp_path):
    """ViT-B/4 (random weights), batch 512, bf16, kv prompts (50): P keeps no backbone gradients or optimizer state
    and saves fewer activations (frozen linear layers need no inputs for weight gradients), so it must use less
    memory than F; the fast-path issue's target is P under 20 GB. Printed for the README (run with -s)."""
    report = run_bench(tmp_path, '--model', 'vit_base_patch16_224', '--batch_size', 512, '--modes', 'P,F',
                       '--steps', 2, '--warmup', 1, '--eval_steps', 1, '--no_baseline')
    p, f = (report['modes'][mode]['peak_mem_gib'] for mode in ('P', 'F'))
    print(f"\nGPU PEAK MEMORY ViT-B/4 batch 512 bf16 kv, 50 prompts ({report['device']}, torch {report['torch']}): "
          f"P {p:.2f} GiB, F {f:.2f} GiB (torch.cuda.max_memory_allocated; train "
          f"{report['modes']['P']['train_img_s']:.0f} / {report['modes']['F']['train_img_s']:.0f} img/s over 2 steps)")
    assert 0 < p < f
    assert p * 2**30 < 20e9
