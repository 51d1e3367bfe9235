"""bench.py: the tiny CPU run end to end (subprocess, --json), --profile, and the analytic FLOP counts of ViT-B/4."""
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
import train  # noqa: E402

VIT_B4 = dict(embed_dim=768, depth=12, mlp_hidden=3072, num_patches=64, patch_size=4)
TINY = ['--device', 'cpu', '--model', 'test_vit', '--batch_size', '8', '--steps', '2', '--warmup', '1',
        '--eval_steps', '2', '--baseline_steps', '2']


def positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_tiny_cpu_run(tmp_path):
    out = tmp_path / 'docs' / 'bench.json'  # a missing folder is made, as for docs/bench-h100.json
    result = subprocess.run([sys.executable, 'bench.py', *TINY, '--json', str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'train img/s' in result.stdout and 'baseline' in result.stdout
    report = json.loads(out.read_text())
    assert report['device_type'] == 'cpu' and report['model'] == 'test_vit' and report['batch_size'] == 8
    # what makes the figures traceable, as README's Speed section cites them: command, code, date, software
    assert report['command'] == shlex.join(['python', 'bench.py', *map(str, TINY), '--json', str(out)])
    assert report['git_commit'] is None or len(report['git_commit'].split('-')[0]) == 40
    assert report['date'].endswith('+00:00') and report['python'] == platform.python_version()
    assert report['driver'] is None and report['cuda'] == torch.version.cuda  # no GPU: no driver to name
    baseline = report['baseline']
    assert positive_finite(baseline['train_img_s'])
    assert baseline['prompt_impl'] == 'naive' and baseline['amp'] is False and baseline['batch_size'] == 128
    assert set(report['modes']) == {'P', 'F', 'P+F'}
    for mode, r in report['modes'].items():
        assert positive_finite(r['train_img_s']), mode
        assert positive_finite(r['eval_img_s']), mode
        assert positive_finite(r['epoch_s']), mode
        assert r['epoch_s'] == pytest.approx(50_000 / r['train_img_s'] + 10_000 / r['eval_img_s'])
        assert r['speedup_vs_baseline'] == pytest.approx(r['train_img_s'] / baseline['train_img_s'])
        assert positive_finite(r['fwd_gflop_naive']) and positive_finite(r['train_tflops'])
        assert r['mfu'] is None and r['peak_mem_gib'] is None  # CPU: no known peak, no CUDA allocator
    assert report['modes']['F']['prompts'] == 0 and report['modes']['P+F']['prompts'] == 50
    for mode, r in report['modes'].items():  # the printed rate is the counted work over the measured time
        assert r['train_tflops'] == pytest.approx(r['train_img_s'] * r['train_gflop_per_img'] / 1e3)
    assert report['modes']['P']['train_gflop_per_img'] < report['modes']['P+F']['train_gflop_per_img']
    assert report['train_factors']['prompts'] == dict(patch=1, linear=2, attention=3, head=3)  # what P's FLOPs count


def test_bench_profile_splits_a_step_into_kinds(tmp_path, capsys):
    # in this process: the run end to end as a command is test_bench_tiny_cpu_run's (a child process costs seconds)
    out = tmp_path / 'bench.json'
    bench.main([*TINY, '--modes', 'P,F', '--no_baseline', '--profile', 'True', '--json', str(out)])  # no SystemExit
    stdout = capsys.readouterr().out
    assert "where a training step's time goes" in stdout
    assert 'speed-up = ' not in stdout  # no baseline: no note on what the speed-up divides by
    header = next(line for line in stdout.splitlines() if line.startswith('mode  ms/step'))
    assert header.split() == ['mode', 'ms/step', *bench.PROFILE_KINDS]
    for mode, r in json.loads(out.read_text())['modes'].items():
        profile = r['profile']
        # all PROFILE_STEPS ran, though --steps 2 --warmup 1 alone would have sized the data pool for 3 batches
        assert profile['steps'] == bench.PROFILE_STEPS and positive_finite(profile['ms_per_step'])
        kinds = profile['ms_by_kind']
        assert set(kinds) == set(bench.PROFILE_KINDS) and min(kinds.values()) >= 0, (mode, kinds)
        # a tiny ViT step on the CPU does every kind of work
        working = ('matmul', 'attention', 'elementwise', 'optimizer', 'data')
        assert all(kinds[kind] > 0 for kind in working), (mode, kinds)


def test_profile_kinds_of_op_names():
    """Where --profile puts ops. Names seen in a torch 2.11 profile of the compiled ViT-B/4 P step on an H100 (the
    README's table), in CPU profiles here, and inductor's naming of fused kernels (after the ops fused in)."""
    from types import SimpleNamespace

    def op(name, parent=None):
        return SimpleNamespace(name=name, cpu_parent=parent)
    step, data_range = op('Optimizer.step#AdamW.step'), op('data')
    assert bench.op_kind(op('aten::addmm')) == 'matmul' and bench.op_kind(op('aten::mm')) == 'matmul'
    assert bench.op_kind(op('aten::convolution_backward')) == 'matmul'
    assert bench.op_kind(op('AddmmBackward0')) == 'matmul'
    assert bench.op_kind(op('triton_tem_fused_addmm_gelu_0')) == 'matmul'  # a max-autotune template
    assert bench.op_kind(op('aten::_cudnn_attention_backward')) == 'attention'
    assert bench.op_kind(op('aten::_efficient_attention_forward')) == 'attention'
    assert bench.op_kind(op('aten::_scaled_dot_product_flash_attention_for_cpu')) == 'attention'
    assert bench.op_kind(op('ScaledDotProductFlashAttentionForCpuBackward0')) == 'attention'
    assert bench.op_kind(op('triton_poi_fused_gelu_gelu_backward_view_11')) == 'elementwise'
    assert bench.op_kind(op('triton_poi_fused_cat_expand_permute_select_view_9')) == 'elementwise'
    # fused kernels named after an attention op they absorbed glue from are still fused elementwise work
    assert bench.op_kind(op('cpp_fused__scaled_dot_product_flash_attention_for_cpu_add_bmm_expand_12')) == 'elementwise'
    assert bench.op_kind(op('triton_per_fused__scaled_dot_product_cudnn_attention_native_layer_norm_3')) == \
        'elementwise'
    assert bench.op_kind(op('aten::native_layer_norm_backward')) == 'elementwise'
    assert bench.op_kind(op('aten::_fused_adamw_', op('aten::something', step))) == 'optimizer'
    assert bench.op_kind(op('aten::index', data_range)) == 'data' and bench.op_kind(data_range) == 'data'
    assert bench.op_kind(op('aten::mm', data_range)) == 'data'  # the enclosing range decides first


def test_profile_counts_each_optimizer_step_once():
    """With CUDA activity the profiler repeats each record_function range as a GPU annotation (seen on an H200:
    20 'Optimizer.step' events for 10 steps, which halved ms per step)."""
    from types import SimpleNamespace
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [SimpleNamespace(name=name, device_type=device) for _ in range(10)
              for name, device in (('Optimizer.step#AdamW.step', cpu), ('Optimizer.step#AdamW.step', gpu),
                                   ('Optimizer.zero_grad#AdamW.zero_grad', cpu), ('aten::mm', cpu))]
    assert bench.optimizer_steps(events) == 10



def test_a_tilde_in_json_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))  # the shell leaves ~ after --json= alone
    assert bench.parse_args([*TINY, '--json=~/bench.json']).json == str(tmp_path / 'bench.json')


def test_bench_refuses_before_measuring(tmp_path, capsys):
    existing = tmp_path / 'bench.json'
    existing.write_text('{"an earlier run": 1}')
    (tmp_path / 'a_file').write_text('x')
    os.symlink(tmp_path / 'gone.json', tmp_path / 'link.json')  # train.write_new looped forever on it
    # the command line itself once, then the parser in this process. A mistyped flag was said only after torch's
    # import (seconds): a torch that cannot be imported stands in for it here
    (tmp_path / 'no-torch' / 'torch').mkdir(parents=True)
    (tmp_path / 'no-torch' / 'torch' / '__init__.py').write_text("raise SystemExit('torch was imported')")
    result = subprocess.run([sys.executable, 'bench.py', *TINY, '--json', str(existing)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(tmp_path / 'no-torch')))
    assert result.returncode == 2 and result.stdout == '', result.stderr
    assert result.stderr.count('\n') == 1 and f"--json {existing} already exists" in result.stderr, result.stderr
    for flags, expect in (
            (['--json', existing], f"--json {existing} already exists"),  # never replaced
            (['--json', tmp_path], f"--json {tmp_path} already exists"),  # a directory
            (['--json', tmp_path / 'a_file' / 'x.json'], 'is not a writable directory'),
            (['--json', f"{tmp_path / 'new'}/"], 'names a folder'),
            (['--json', ''], "--json '' names no file"),  # `--json "$OUT"` with OUT unset: no JSON, no word
            (['--json', tmp_path / 'link.json'], f"--json {tmp_path / 'link.json'} already exists"),  # a dead link
            (['--device', 'tpu'], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
            (['--modes', 'Q'], '--modes: unknown mode(s) Q')):
        with pytest.raises(SystemExit) as error:
            bench.parse_args([*TINY, *map(str, flags)])
        captured = capsys.readouterr()
        assert error.value.code == 2 and captured.out == '', captured.err
        assert captured.err.count('\n') == 1 and expect in captured.err, captured.err  # one line, no usage dump
    assert existing.read_text() == '{"an earlier run": 1}'


def test_forward_flops_vit_b4():
    naive_50 = bench.forward_flops(**VIT_B4, num_prompts=50, impl='naive')
    assert naive_50 / 1e9 == pytest.approx(20.0, rel=0.01)
    # no prompts: the plain ViT-B/4, 65 tokens through 12 blocks, plus patch embedding and head
    d, h, t = 768, 3072, 65
    plain = 2 * (12 * (t * 3 * d * d + 2 * t * t * d + t * d * d + 2 * t * d * h) + 64 * 3 * 16 * d + d * 10)
    assert bench.forward_flops(**VIT_B4, num_prompts=0, impl='naive') == plain
    assert plain / 1e9 == pytest.approx(11.2, rel=0.01)
    kv_50 = bench.forward_flops(**VIT_B4, num_prompts=50, impl='kv')
    assert kv_50 / 1e9 == pytest.approx(12.0, rel=0.02)
    # once per batch, the prompt K/V cost (12 layers x 50 rows x 2d x d MACs) nearly vanishes
    kv_batch = bench.forward_flops(**VIT_B4, num_prompts=50, impl='kv', batch_size=512)
    assert kv_50 - kv_batch == pytest.approx(2 * 12 * 50 * 2 * d * d * (1 - 1 / 512))
    # training: the reference figures of the GPU issue, P made exact (attention's backward is 2x its forward in P)
    geometry = dict(VIT_B4, in_chans=3, num_prefix=1, num_classes=10)
    assert bench.train_flops(geometry, 50, False) / 1e9 == pytest.approx(40.54, abs=0.01)
    assert bench.train_flops(geometry, 0, True) / 1e9 == pytest.approx(33.60, abs=0.01)
    assert bench.train_flops(geometry, 50, True) / 1e9 == pytest.approx(60.08, abs=0.01)


def test_geometry_of_timm_model_matches():
    from model import create_vit
    geometry = bench.vit_geometry(create_vit('test_vit', 10, pretrained=False))
    assert geometry == dict(embed_dim=64, depth=6, mlp_hidden=192, num_patches=64, patch_size=4, in_chans=3,
                            num_prefix=1, num_classes=10)


def test_peak_table():
    assert bench.peak_bf16_tflops('NVIDIA H100 80GB HBM3') == 989
    assert bench.peak_bf16_tflops('NVIDIA H100 PCIe') == 756
    assert bench.peak_bf16_tflops('NVIDIA H200') == 989
    assert bench.peak_bf16_tflops('NVIDIA A100-SXM4-80GB') == 312
    assert bench.peak_bf16_tflops('cpu (x86_64, 2 cores)') is None
    assert bench.peak_bf16_tflops('whatever', 123.0) == 123.0


@pytest.mark.parametrize('impl', ['naive', 'kv'])
@pytest.mark.parametrize('prompts', [0, 7])
def test_forward_flops_match_torch_flop_counter(impl, prompts):
    """The analytic count equals torch's FlopCounterMode on the real model (matmuls, conv, SDPA), per image;
    with the KV path's prompt K/V computed once per batch, as model.py does without prompt dropout."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from model import PromptedViT, create_vit
    torch.manual_seed(0)
    model = PromptedViT(create_vit('test_vit', 10, pretrained=False), prompts, prompt_impl=impl).eval()
    batch = 3
    # the math SDPA backend: attention as matmuls the counter sees (torch 2.14 has no flop formula for the CPU flash kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(batch, 3, 32, 32))
    expected = bench.forward_flops(**bench.vit_geometry(model.vit), num_prompts=prompts, impl=impl, batch_size=batch)
    assert counter.get_total_flops() / batch == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize('full, prompts', [(False, 7), (True, 0), (True, 7), (False, 0)])
def test_train_flops_match_torch_flop_counter(full, prompts):
    """Forward and backward of one training step on the naive path, as torch's FlopCounterMode counts them: the
    gradients each mode computes (P: input gradients through the frozen blocks, both operands of attention's
    products, none for the patch embedding; linear probe: the head's weight gradient)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from model import PromptedViT, create_vit, set_trainable
    torch.manual_seed(0)
    model = PromptedViT(create_vit('test_vit', 10, pretrained=False), prompts, prompt_impl='naive')
    set_trainable(model, full)
    batch = 3
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        torch.nn.functional.cross_entropy(model(torch.randn(batch, 3, 32, 32)), torch.arange(batch)).backward()
    expected = bench.train_flops(bench.vit_geometry(model.vit), prompts, full)
    assert counter.get_total_flops() / batch == pytest.approx(expected, rel=1e-9)


def test_bench_eval_rate_counts_only_the_timed_images(monkeypatch):
    """eval img/s = images evaluated in the timed region / its time (the warm-up batches are not in it)."""
    import time
    import torch
    evaluated = []
    monkeypatch.setattr(bench.train, 'evaluate_split',
                        lambda model, split, *args: evaluated.append(len(split[1])) or time.sleep(0.01 * len(split[1])))
    args = bench.parse_args(['--device', 'cpu', '--model', 'test_vit', '--batch_size', '8', '--steps', '1',
                             '--warmup', '2', '--eval_steps', '1', '--no_baseline'])
    pool = (torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (24,)))
    test_set = (torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (24,)))
    result = bench.run_mode('P', args, torch.device('cpu'), pool, test_set, bench.train.StopRequest())
    assert evaluated == [16, 8]
    assert result['eval_img_s'] <= 105  # 8 images in >= 0.08 s; counting the 16 warm ones too would give ~300


class FakeClock:
    """time.perf_counter for bench: advanced by hand (by the stand-in train and eval loops)."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_bench_train_rate_counts_only_the_timed_steps(monkeypatch):
    """train img/s = --steps x --batch_size / the timed region (the warm-up steps before it are not in it); every
    mode's model is what the flags and the FLOP count say (deep prompts, no dropout, --prompt_impl), its loop the
    real one's (the stop request passed on)."""
    from types import SimpleNamespace
    clock, calls = FakeClock(), []

    def train_epoch(model, optimizer, scheduler, batches, steps, amp, stop, desc, scaler):
        calls.append(('train', steps, sum(len(labels) for _, labels in batches), model, stop, scaler))
        clock.now += 2.0 * steps  # 2 s a step
        return 1.5, 50.0

    def evaluate_split(model, split, batch_size, *args):
        calls.append(('eval', len(split[1])))
        clock.now += 0.5 * len(split[1])

    monkeypatch.setattr(bench, 'time', SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(bench.train, 'train_epoch', train_epoch)
    monkeypatch.setattr(bench.train, 'evaluate_split', evaluate_split)
    args = bench.parse_args(['--device', 'cpu', '--model', 'test_vit', '--batch_size', '4', '--steps', '3',
                             '--warmup', '2', '--eval_steps', '1', '--prompts', '5'])
    pool = (torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (20,)))
    test_set = (torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (12,)))
    stop = bench.train.StopRequest()
    result = bench.run_mode('P', args, torch.device('cpu'), pool, test_set, stop)
    assert [call[:3] for call in calls[:2]] == [('train', 2, 8), ('train', 3, 12)]  # warm-up, then the timed steps
    assert calls[2:] == [('eval', 8), ('eval', 4)]
    model = calls[0][3]
    assert model.deep and model.prompt_impl == 'kv' and model.prompts.dropout.p == 0.0  # kv: --prompt_impl's default
    assert all(call[4] is stop for call in calls[:2])
    assert calls[0][5] is calls[1][5] and not calls[0][5].is_enabled()  # one loss scaler a mode, as fit; off on a CPU
    assert result['warmup_s'] == 4.0 and result['train_s'] == 6.0 and result['eval_s'] == 2.0
    assert result['train_img_s'] == 2.0 and result['eval_img_s'] == 2.0  # 12 images in 6 s, 4 in 2 s
    assert result['mean_train_loss'] == 1.5 and result['prompts'] == 5 and result['full'] is False
    assert 0 < result['trainable_params'] < result['total_params']  # P: prompts + head


def test_bench_baseline_rate_precision_and_batches(monkeypatch):
    """The seed's recipe: its own batch size through the DataLoader, naive prompts, TF32 off while it runs and the
    flags as they were afterwards; img/s = the timed steps' images / their time (not the warm-up's)."""
    from types import SimpleNamespace
    clock, seen = FakeClock(), []
    build_model = bench.build_model

    def built(*args):
        model = build_model(*args)
        model.register_forward_hook(lambda module, inputs, output: seen.append(
            (len(inputs[0]), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or
            setattr(clock, 'now', clock.now + 1.0))
        seen.append(model.prompt_impl)
        return model

    monkeypatch.setattr(bench, 'time', SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(bench, 'build_model', built)
    args = bench.parse_args(['--device', 'cpu', '--model', 'test_vit', '--batch_size', '8', '--warmup', '1',
                             '--baseline_steps', '2', '--baseline_batch_size', '3', '--prompts', '2'])
    pool = (torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (9,)))
    previous = bench.set_tf32(True, True)
    try:
        result = bench.run_baseline(args, torch.device('cpu'), pool, bench.train.StopRequest())
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        bench.set_tf32(*previous)
    assert seen == ['naive', (3, False, False), (3, False, False), (3, False, False)]
    assert result['train_s'] == 2.0 and result['train_img_s'] == 3.0  # 2 timed steps of 3 images, 1 s each
    assert result['batch_size'] == 3 and result['prompts'] == 2 and result['full'] is False
    assert result['tf32'] is False and result['amp'] is False and result['peak_mem_gib'] is None


def fake_mode(name, args, device, pool, test_set, stop):
    """run_mode's result with round numbers: P 400 img/s, F 200, P+F 100; eval 1000 img/s."""
    full, with_prompts = bench.MODES[name]
    rate = {'P': 400.0, 'F': 200.0, 'P+F': 100.0}[name]
    return dict(full=full, prompts=args.prompts if with_prompts else 0, trainable_params=1, total_params=2,
                train_img_s=rate, eval_img_s=1000.0, peak_mem_gib=None, warmup_s=1.0, train_s=1.0, eval_s=1.0,
                mean_train_loss=2.3, profile=None)


def fake_baseline(args, device, pool, stop):
    return dict(full=False, prompts=args.prompts, batch_size=args.baseline_batch_size, prompt_impl='naive',
                amp=False, tf32=False, train_img_s=50.0, train_s=1.0, peak_mem_gib=None)


def table_rows(stdout, header_start='mode '):
    """The printed table under its header line: {first cell: cells}, the baseline row under 'baseline'."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start)) + 2
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = line.replace('baseline (P fp32 naive DataLoader)', 'baseline').split()
        rows[cells[0]] = cells
    return rows


def test_bench_json_written_meanwhile_is_kept(tmp_path, monkeypatch, capsys):
    """--json is checked before minutes of measuring; a file another process writes at that path meanwhile is kept,
    and this run's report goes to the next free name, said on stderr."""
    out = tmp_path / 'bench.json'

    def mode_then_another_process_writes(name, args, device, pool, test_set, stop):
        out.write_text('theirs')
        return fake_mode(name, args, device, pool, test_set, stop)
    monkeypatch.setattr(bench, 'run_mode', mode_then_another_process_writes)
    monkeypatch.setattr(bench, 'run_baseline', fake_baseline)
    monkeypatch.setattr(bench, 'git_commit', lambda: None)
    bench.main([*TINY, '--modes', 'P', '--json', str(out)])
    captured = capsys.readouterr()
    assert out.read_text() == 'theirs' and list(json.loads((tmp_path / 'bench-2.json').read_text())['modes']) == ['P']
    assert captured.err.splitlines()[-1] == (f"note: {out} was written by another process meanwhile; kept it and "
                                             f"wrote {tmp_path / 'bench-2.json'}")
    assert captured.out.strip().endswith(f"wrote {tmp_path / 'bench-2.json'}")


def test_bench_table_and_json_report_the_measured_numbers(tmp_path, monkeypatch, capsys):
    """What the table's columns and the JSON hold, from given measurements: train/eval img/s, the epoch estimate
    (50,000 / train + 10,000 / eval), TFLOP/s from the naive training FLOPs, MFU against --peak_tflops (on the CPU
    too), the naive forward GFLOP/img, the speed-up over the baseline's train img/s; the JSON's settings."""
    sizes = []
    monkeypatch.setattr(bench, 'run_mode', lambda name, args, device, pool, test_set, stop: sizes.append(
        (len(pool[1]), len(test_set[1]))) or fake_mode(name, args, device, pool, test_set, stop))
    monkeypatch.setattr(bench, 'run_baseline', fake_baseline)
    monkeypatch.setattr(bench, 'git_commit', lambda: None)
    out = tmp_path / 'bench.json'
    argv = [*TINY, '--prompts', '5', '--peak_tflops', '0.5', '--json', str(out)]
    bench.main(argv)
    # train pool: the baseline's 128 x (1 warm-up + 2 timed steps); test set: 8 x (1 warm-up + 2 timed batches)
    assert sizes == [(384, 24)] * 3
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    geometry = dict(embed_dim=64, depth=6, mlp_hidden=192, num_patches=64, patch_size=4, in_chans=3, num_prefix=1,
                    num_classes=10)
    assert report['geometry'] == geometry and report['peak_bf16_tflops'] == 0.5 and report['prompts'] == 5
    assert (report['steps'], report['warmup'], report['eval_steps'], report['baseline_steps']) == (2, 1, 2, 2)
    assert report['command'] == shlex.join(['python', 'bench.py', *argv]) and report['amp'] is False
    assert report['prompt_impl'] == 'kv' and report['compile'] is False and report['batch_size'] == 8
    rows = table_rows(stdout)
    assert list(rows) == ['P', 'F', 'P+F', 'baseline']
    for mode, r in report['modes'].items():
        full, with_prompts = bench.MODES[mode]
        p = 5 if with_prompts else 0
        assert r['amp'] is False and r['tf32'] is False and r['batch_size'] == 8 and r['prompt_impl'] == 'kv'
        train_gflop = bench.train_flops(geometry, p, full) / 1e9
        assert r['train_gflop_per_img'] == pytest.approx(train_gflop)
        assert r['fwd_gflop_naive'] == pytest.approx(bench.forward_flops(**geometry, num_prompts=p) / 1e9)
        assert r['fwd_gflop_kv'] == pytest.approx(bench.forward_flops(**geometry, num_prompts=p, impl='kv') / 1e9)
        assert r['fwd_gflop_kv_as_run'] == pytest.approx(
            bench.forward_flops(**geometry, num_prompts=p, impl='kv', batch_size=8) / 1e9)
        assert r['train_tflops'] == pytest.approx(r['train_img_s'] * train_gflop / 1e3)
        assert r['mfu'] == pytest.approx(r['train_tflops'] / 0.5)
        assert r['epoch_s'] == pytest.approx(50_000 / r['train_img_s'] + 10)
        assert r['speedup_vs_baseline'] == pytest.approx(r['train_img_s'] / 50)
        assert rows[mode] == [mode, '8', f"{r['train_img_s']:.1f}", '1000.0', f"{r['epoch_s']:.1f}", 'n/a',
                              f"{r['train_tflops']:.3f}", f"{r['mfu']:.1%}", f"{r['fwd_gflop_naive']:.4g}",
                              f"{r['train_img_s'] / 50:.2f}x"]
    assert [rows[mode][-1] for mode in ('P', 'F', 'P+F')] == ['8.00x', '4.00x', '2.00x']
    baseline = report['baseline']
    assert baseline['train_gflop_per_img'] == pytest.approx(bench.train_flops(geometry, 5, False) / 1e9)
    assert baseline['mfu'] == pytest.approx(50 * baseline['train_gflop_per_img'] / 1e3 / 0.5)
    assert rows['baseline'] == ['baseline', '128', '50.0', '-', '-', 'n/a', f"{baseline['train_tflops']:.3f}",
                                f"{baseline['mfu']:.1%}", f"{baseline['fwd_gflop_naive']:.4g}", '1.00x']
    assert 'baseline (P fp32 naive DataLoader)' in stdout and 'MFU vs dense bf16 peak (0.5 TFLOP/s)' in stdout
    assert "speed-up = train img/s over the baseline's" in stdout
    assert stdout.rstrip().endswith(f"wrote {out}")
    # the columns line up: every row's cells end where the header's right-aligned titles end
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('mode '))
    assert len({len(line) for line in lines[header:header + 6]}) == 1, lines[header:header + 6]


def test_bench_without_baseline_has_no_speed_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, 'run_mode', fake_mode)
    monkeypatch.setattr(bench, 'git_commit', lambda: None)
    out = tmp_path / 'bench.json'
    bench.main([*TINY, '--modes', 'F', '--baseline', 'False', '--json', str(out)])
    stdout = capsys.readouterr().out
    rows = table_rows(stdout)
    assert list(rows) == ['F'] and rows['F'][-1] == '-' and rows['F'][7] == 'n/a'  # no speed-up, no MFU
    assert 'speed-up = ' not in stdout and 'bf16 peak (unknown TFLOP/s)' in stdout
    report = json.loads(out.read_text())
    assert report['baseline'] is None and report['modes']['F']['speedup_vs_baseline'] is None
    assert report['modes']['F']['mfu'] is None and report['peak_bf16_tflops'] is None  # CPU, no --peak_tflops


def test_bench_profile_table_from_measurements(monkeypatch, capsys):
    """--profile's table: ms per step, then each kind's ms per step and its share of the step."""
    kinds = dict(matmul=4.0, attention=1.0, elementwise=2.0, optimizer=0.5, data=0.5, idle=2.0)

    def profiled_mode(*args):
        return dict(fake_mode(*args), profile=dict(steps=bench.PROFILE_STEPS, ms_per_step=10.0, ms_by_kind=kinds))
    monkeypatch.setattr(bench, 'run_mode', profiled_mode)
    bench.main([*TINY, '--modes', 'P', '--no_baseline', '--profile', 'True'])
    rows = table_rows(capsys.readouterr().out, 'mode  ms/step')
    assert rows == {'P': ['P', '10.00', '4.00', '(40%)', '1.00', '(10%)', '2.00', '(20%)', '0.50', '(5%)', '0.50',
                          '(5%)', '2.00', '(20%)']}


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_bench_signal_reports_what_was_measured(tmp_path, monkeypatch, capsys, signum):
    """A signal during the second mode: no more modes and no baseline; the first mode is reported (table, JSON) and
    bench.py exits 128 + the signal's number. A signal before anything was measured: no table, the same status."""
    ran = []

    def signalled_mode(name, args, device, pool, test_set, stop):
        ran.append(name)
        if name == 'F':
            stop.signum = signum  # as the handler sets it; train_epoch then returns None
            raise KeyboardInterrupt
        return fake_mode(name, args, device, pool, test_set, stop)

    def done_then_signalled(name, args, device, pool, test_set, stop):
        ran.append(name)
        stop.signum = signum  # arrives while evaluating: the mode's numbers are complete
        return fake_mode(name, args, device, pool, test_set, stop)

    monkeypatch.setattr(bench, 'run_baseline', lambda *args: ran.append('baseline') or fake_baseline(*args))
    monkeypatch.setattr(bench, 'git_commit', lambda: None)
    out = tmp_path / 'bench.json'
    monkeypatch.setattr(bench, 'run_mode', signalled_mode)
    with pytest.raises(SystemExit) as exit:
        bench.main([*TINY, '--json', str(out)])
    captured = capsys.readouterr()
    assert exit.value.code == 128 + signum and ran == ['P', 'F']
    assert f"{signal.Signals(signum).name}: stopped; reporting the 1 mode(s) measured so far, no baseline" \
        in captured.err
    assert list(table_rows(captured.out)) == ['P'] and list(json.loads(out.read_text())['modes']) == ['P']

    ran.clear()
    monkeypatch.setattr(bench, 'run_mode', done_then_signalled)
    with pytest.raises(SystemExit) as exit:
        bench.main([*TINY, '--json', str(tmp_path / 'second.json')])
    assert exit.value.code == 128 + signum and ran == ['P'] and list(table_rows(capsys.readouterr().out)) == ['P']

    ran.clear()
    monkeypatch.setattr(bench, 'run_mode', lambda *args: ran.append('P') or signalled_mode('F', *args[1:]))
    with pytest.raises(SystemExit) as exit:
        bench.main([*TINY, '--json', str(tmp_path / 'none.json')])
    captured = capsys.readouterr()
    assert exit.value.code == 128 + signum and 'reporting the 0 mode(s)' in captured.err
    assert 'train img/s' not in captured.out and not (tmp_path / 'none.json').exists()


def test_bench_signal_while_writing_json_writes_it_whole_and_exits_as_stopped(tmp_path, monkeypatch, capsys):
    """Ctrl-C as --json is written: the report is written whole (not cut off, nor lost to a traceback), and the exit
    status still says the run was stopped (130), for a script that checks it."""
    write_new = train.write_new

    def signalled_while_writing(path, payload, then):
        os.kill(os.getpid(), signal.SIGINT)
        return write_new(path, payload, then=then)
    monkeypatch.setattr(train, 'write_new', signalled_while_writing)
    monkeypatch.setattr(bench, 'run_mode', fake_mode)
    monkeypatch.setattr(bench, 'run_baseline', fake_baseline)
    monkeypatch.setattr(bench, 'git_commit', lambda: None)
    out = tmp_path / 'bench.json'
    try:
        with pytest.raises(SystemExit) as exit:
            bench.main([*TINY, '--modes', 'P', '--json', out])
    except KeyboardInterrupt:
        pytest.fail('the SIGINT broke into the writing of --json')
    assert exit.value.code == 128 + signal.SIGINT and list(json.loads(out.read_text())['modes']) == ['P']
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}")


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_bench_signal_while_importing_torch_is_one_line(signum):
    """Ctrl-C or SIGTERM in the seconds bench.py spends importing torch: one line and 128 + the signal's number. It was
    a KeyboardInterrupt traceback, or a kill without a word (found by a fuzz). Sent as torch imports numpy, whose C
    code swallows an exception raised there: a handler that raised one said 'stopped' and measured on."""
    signal_on_import = (f"import os, runpy, sys\n"
                        f"class Hook:\n"
                        f"    def find_spec(self, name, path, target=None):\n"
                        f"        if name == 'numpy':  # first imported by torch's C code\n"
                        f"            os.kill(os.getpid(), {int(signum)})\n"
                        f"sys.meta_path.insert(0, Hook())\n"
                        f"sys.argv = ['bench.py', *{TINY!r}]\n"
                        f"runpy.run_path('bench.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, '-c', signal_on_import], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 128 + signum and result.stderr.strip() == f"{signal.Signals(signum).name}: stopped"


def test_bench_second_signal_while_it_says_it_stopped_is_one_line():
    """A terminal's Ctrl-C reaches every process of its group (sweep.py or a shell script passes it on too): the
    second SIGINT arrives as the first's line is written, and must not write it again."""
    from conftest import signal_on_import
    result = signal_on_import('bench.py', TINY, signal.SIGINT, 'numpy', again=True)
    assert result.returncode == 128 + signal.SIGINT and result.stderr.strip() == 'SIGINT: stopped', result.stderr


def test_bench_parser_checks(capsys):
    for flags, expect in ((['--peak_tflops', '0'], '--peak_tflops must be a positive number, got 0.0'),
                          (['--peak_tflops', 'nan'], '--peak_tflops must be a positive number, got nan'),
                          (['--peak_tflops', 'inf'], '--peak_tflops must be a positive number, got inf'),
                          (['--modes', ' , '], '--modes: unknown mode(s) (none given)'),
                          (['--modes', 'P,Q,F'], '--modes: unknown mode(s) Q; choose from P, F, P+F'),
                          (['--modes', 'P,F,P'], '--modes P,F,P: a mode is named twice; name each once')):
        with pytest.raises(SystemExit) as error:
            bench.parse_args([*TINY, *flags])
        captured = capsys.readouterr()
        assert error.value.code == 2 and captured.err.count('\n') == 1 and expect in captured.err, captured.err
    assert bench.parse_args([*TINY, '--modes', ' P+F , P']).modes == ['P+F', 'P']
    assert bench.parse_args(TINY).baseline is True
    assert bench.parse_args([*TINY, '--no_baseline']).baseline is False
    assert bench.parse_args([*TINY, '--baseline', 'false']).baseline is False


def test_time_by_kind_and_profile_steps(monkeypatch):
    """Each CPU op's own time under its kind (on a GPU its own kernels' time; the kernel events themselves are not
    counted again), idle = the wall time left (never negative); ms per step and per kind over the optimizer steps."""
    from types import SimpleNamespace
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, device=cpu, cpu_us=0.0, gpu_us=None, cuda_us=0.0, parent=None):
        return SimpleNamespace(name=name, device_type=device, self_cpu_time_total=cpu_us, self_device_time_total=gpu_us,
                               self_cuda_time_total=cuda_us, cpu_parent=parent)
    step = event('Optimizer.step#AdamW.step', cpu_us=5, gpu_us=1)
    events = [step, event('aten::_fused_adamw_', cpu_us=20, gpu_us=30, parent=step),
              event('aten::addmm', cpu_us=100, gpu_us=300), event('aten::bmm', cpu_us=10, gpu_us=None, cuda_us=40),
              event('void gemm_kernel', device=gpu, cpu_us=0, gpu_us=300, cuda_us=300)]
    assert bench.op_kind(step) == 'optimizer'
    assert bench.time_by_kind(events, False, 1000) == dict(matmul=110, attention=0, elementwise=0, optimizer=25,
                                                           data=0, idle=865)
    assert bench.time_by_kind(events, True, 1000) == dict(matmul=340, attention=0, elementwise=0, optimizer=31,
                                                          data=0, idle=629)
    assert bench.time_by_kind(events, True, 100)['idle'] == 0  # ops overlapping the wall clock: no negative idle

    for name in ('mkldnn::_linear_pointwise', 'aten::_addmm_activation', 'BmmBackward0', 'aten::baddbmm'):
        assert bench.op_kind(event(name)) == 'matmul', name
    assert list(bench.labelled(iter([1, 2, 3]), 'data')) == [1, 2, 3]

    def train_steps(steps, label):  # stand-in steps: a sleep in each one's optimizer step
        assert (steps, label) == (bench.PROFILE_STEPS, 'data')
        for _ in range(steps):
            with torch.profiler.record_function('Optimizer.step#SGD.step'):
                time.sleep(0.002)
    profiled = bench.profile_steps(train_steps, torch.device('cpu'))
    assert profiled['steps'] == bench.PROFILE_STEPS and profiled['ms_per_step'] >= 2
    assert sum(profiled['ms_by_kind'].values()) == pytest.approx(profiled['ms_per_step'])
    assert profiled['ms_by_kind']['optimizer'] >= 2


def test_forward_flops_arguments():
    with pytest.raises(ValueError, match="impl must be 'naive' or 'kv', got 'flash'"):
        bench.forward_flops(**VIT_B4, impl='flash')
    # the head's cost follows num_classes: 2 x d x classes
    assert bench.forward_flops(**VIT_B4, num_classes=100) - bench.forward_flops(**VIT_B4) == 2 * 768 * 90


def test_peak_table_nvl():
    assert bench.peak_bf16_tflops('NVIDIA H100 NVL') == 835
    assert bench.peak_bf16_tflops('NVIDIA H200 NVL') == 835  # not the SXM H200's 989
    assert bench.peak_bf16_tflops('NVIDIA H200') == 989


# ---------------------------------------------------------------- behaviours a mutation round found unpinned


def test_bench_json_records_compile_and_prompt_impl_and_the_baselines_flops(tmp_path, monkeypatch, capsys):
    """--compile True --prompt_impl naive: the JSON says so, at the top and in every mode (the README's numbers are
    read back from it); the baseline, P with the same prompts, has P's naive forward FLOPs per image."""
    monkeypatch.setattr(bench, 'run_mode', fake_mode)
    monkeypatch.setattr(bench, 'run_baseline', fake_baseline)
    monkeypatch.setattr(bench, 'git_commit', lambda: None)
    out = tmp_path / 'bench.json'
    bench.main([*TINY, '--prompts', '5', '--compile', 'True', '--prompt_impl', 'naive', '--json', str(out)])
    stdout = capsys.readouterr().out
    assert 'compile True' in stdout.splitlines()[0] and 'prompt_impl naive' in stdout.splitlines()[0]
    report = json.loads(out.read_text())
    assert report['compile'] is True and report['prompt_impl'] == 'naive'
    for mode, r in report['modes'].items():
        assert r['compile'] is True and r['prompt_impl'] == 'naive', mode
    geometry = report['geometry']
    baseline = report['baseline']
    assert baseline['prompt_impl'] == 'naive'
    assert baseline['fwd_gflop_naive'] == pytest.approx(bench.forward_flops(**geometry, num_prompts=5) / 1e9)
    assert baseline['fwd_gflop_naive'] == report['modes']['P']['fwd_gflop_naive']
    rows = table_rows(stdout)
    assert rows['baseline'][8] == rows['P'][8] == f"{baseline['fwd_gflop_naive']:.4g}"


def test_bench_defaults_are_the_documented_ones():
    """`python bench.py` is README's headline measurement: ViT-B at batch 512, 50 prompts, bf16 autocast, the kv
    prompts, no compile, 10 warm-up + 50 timed steps and 20 eval batches per mode, the seed's batch 128 for 20 steps."""
    args = bench.parse_args([])
    assert args.model == 'vit_base_patch16_224.augreg_in21k' and args.batch_size == 512 and args.prompts == 50
    assert args.amp is True and args.prompt_impl == 'kv' and args.compile is False and args.profile is False
    assert (args.warmup, args.steps, args.eval_steps) == (10, 50, 20)
    assert (args.baseline, args.baseline_batch_size, args.baseline_steps) == (True, 128, 20)
    assert args.modes == ['P', 'F', 'P+F'] and args.device == 'auto' and args.json is None
    assert args.peak_tflops is None
