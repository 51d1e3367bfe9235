"""bench.py: the tiny CPU run end to end (subprocess, --json), --profile, and the analytic FLOP counts of ViT-B/4."""
import json
import math
import os
import platform
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402

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


def test_bench_profile_splits_a_step_into_kinds(tmp_path):
    out = tmp_path / 'bench.json'
    result = subprocess.run([sys.executable, 'bench.py', *TINY, '--modes', 'P,F', '--no_baseline', '--profile', 'True',
                             '--json', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "where a training step's time goes" in result.stdout
    assert 'speed-up = ' not in result.stdout  # no baseline: no note on what the speed-up divides by
    header = next(line for line in result.stdout.splitlines() if line.startswith('mode  ms/step'))
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


def test_bench_refuses_before_measuring(tmp_path, capsys):
    existing = tmp_path / 'bench.json'
    existing.write_text('{"an earlier run": 1}')
    (tmp_path / 'a_file').write_text('x')
    # the command line itself once (a subprocess pays ~3 s of imports), then the parser in this process
    result = subprocess.run([sys.executable, 'bench.py', *TINY, '--json', str(existing)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == '', result.stderr
    assert result.stderr.count('\n') == 1 and f"--json {existing} already exists" in result.stderr, result.stderr
    for flags, expect in (
            (['--json', existing], f"--json {existing} already exists"),  # never replaced
            (['--json', tmp_path], f"--json {tmp_path} already exists"),  # a directory
            (['--json', tmp_path / 'a_file' / 'x.json'], 'is not a writable directory'),
            (['--json', f"{tmp_path / 'new'}/"], 'names a folder'),
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
