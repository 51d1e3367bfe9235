"""The training step and schedule: what P mode may and may not change, warmup + cosine."""
import signal
import warnings

import pytest
import torch

import data
import train
from model import PromptedViT, create_vit, set_trainable


@pytest.mark.parametrize('prompt_impl', ['kv', 'naive'])
def test_prompt_tuning_changes_only_prompts_and_head(prompt_impl):
    torch.manual_seed(0)
    model = PromptedViT(create_vit('test_vit', 10, 32, 4, pretrained=False), 5, prompt_dropout=0.1,
                        prompt_impl=prompt_impl)
    set_trainable(model, full=False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = train.make_optimizer(model, 'adamw', lr=1e-2, weight_decay=0.05, device=torch.device('cpu'))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (24,))
    preprocess = data.preprocessing(model.vit.pretrained_cfg, 'cpu', 32)
    batches = data.train_batches(images, labels, 8, torch.Generator().manual_seed(0), preprocess)
    result = train.train_epoch(model, optimizer, scheduler, batches, 3)
    assert result is not None
    trained = {'prompts.tokens', 'vit.head.weight', 'vit.head.bias'}
    after = model.state_dict()
    for name, tensor in before.items():
        if name in trained:
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name  # bit-identical: frozen, and not touched by weight decay
    assert len(before) > 50


def test_warmup_then_cosine_to_zero():
    warmup, total = 10, 100
    factors = [train.lr_factor(step, warmup, total) for step in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[warmup - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:warmup - 1], factors[1:warmup]))  # rising
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1:]))  # then falling
    assert factors[warmup] == pytest.approx(1.0)
    assert factors[-1] < 1e-3
    assert train.lr_factor(55, warmup, total) == pytest.approx(0.5)  # half way through the cosine
    assert train.lr_factor(0, 0, total) == pytest.approx(1.0)  # no warmup


def test_weight_decay_spares_biases_norms_and_embeddings():
    model = PromptedViT(create_vit('test_vit', 10, 32, 4, pretrained=False), 3)
    set_trainable(model, full=True)
    optimizer = train.make_optimizer(model, 'adamw', 1e-3, 0.05, torch.device('cpu'))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert 'vit.blocks.0.attn.qkv.weight' in decayed and 'prompts.tokens' in decayed
    for name in ('vit.pos_embed', 'vit.cls_token', 'vit.blocks.0.norm1.weight', 'vit.blocks.0.attn.qkv.bias'):
        assert name not in decayed
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(names)


def tiny_model_and_data(images=24, classes=3):
    torch.manual_seed(0)
    model = PromptedViT(create_vit('test_vit', classes, 32, 4, pretrained=False), 2)
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    y = torch.randint(0, classes, (images,), generator=generator)
    return model, x, y, data.preprocessing(model.vit.pretrained_cfg, 'cpu', 32)


def test_train_loss_and_accuracy_are_means_over_the_images():
    """metrics.csv's train_loss/train_acc: the cross-entropy and accuracy over every image the epoch trained on (the
    model as each batch saw it; lr 0 keeps it fixed, so one pass over the same batches must give the same numbers)."""
    model, images, labels, preprocess = tiny_model_and_data()
    set_trainable(model, full=False)
    optimizer = train.make_optimizer(model, 'adamw', 0.0, 0.0, torch.device('cpu'))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = lambda: data.train_batches(images, labels, 8, torch.Generator().manual_seed(0), preprocess)
    loss, accuracy = train.train_epoch(model, optimizer, scheduler, batches(), 3)
    model.eval()
    with torch.no_grad():
        inputs, targets = zip(*batches())
        logits, targets = model(torch.cat(inputs)), torch.cat(targets)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    assert accuracy == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())


def test_evaluation_does_not_depend_on_the_batch_size():
    """The last batch is padded to a full one (static shapes for --compile); the padding rows must count in neither
    the loss nor the accuracy, or test_loss would change with --batch_size and --eval_only would not reproduce it."""
    model, images, labels, preprocess = tiny_model_and_data(images=18)
    whole = train.evaluate_split(model, (images, labels), 18, preprocess, False)
    padded = train.evaluate_split(model, (images, labels), 5, preprocess, False)  # 4 batches, the last 3 of 5 real
    assert padded[0] == pytest.approx(whole[0], rel=1e-5) and padded[1] == whole[1]
    assert torch.equal(padded[2], whole[2])  # the confusion matrix
    with torch.no_grad():
        predicted = model(data.model_input(images, *preprocess)).argmax(1)
    expected = torch.zeros(3, 3, dtype=torch.long)
    for true, guess in zip(labels.tolist(), predicted.tolist()):
        expected[true, guess] += 1  # rows: the true class, as confusion.csv and per-class accuracy read it
    assert torch.equal(whole[2], expected)
    assert train.per_class_accuracy(expected, ['a', 'b', 'c']) == pytest.approx({
        name: 100 * expected[i, i].item() / expected[i].sum().item() for i, name in enumerate('abc')}, abs=1e-4)


def test_a_process_with_no_test_images_still_writes_every_prediction(monkeypatch):
    """Under torchrun with more processes than test images (here 1 image, 2 processes) rank 0's shard is empty: the
    predictions it gathers for test_predictions.csv are rank 1's, each naming a class, as one process writes them."""
    model, images, labels, preprocess = tiny_model_and_data(images=1)
    theirs = train.evaluate(model, data.eval_batches(images, labels, 2, preprocess, 1, 2), 3, False, per_image=True)
    assert len(list(data.eval_batches(images, labels, 2, preprocess, 0, 2))) == 0  # rank 0's shard
    their_totals = torch.cat([torch.tensor([theirs[0]], dtype=torch.float64), theirs[2].flatten().double()])
    monkeypatch.setattr(train.dist, 'is_initialized', lambda: True)  # rank 0 of 2, its collectives bringing rank 1's
    monkeypatch.setattr(train.dist, 'get_world_size', lambda: 2)
    monkeypatch.setattr(train.dist, 'all_reduce', lambda tensor: tensor.add_(their_totals))
    monkeypatch.setattr(train.dist, 'all_gather_object', lambda shards, mine: shards.__setitem__(
        slice(None), [mine, list(theirs[3])]))
    ours = train.evaluate(model, data.eval_batches(images, labels, 2, preprocess, 0, 2), 3, False, per_image=True)
    assert ours[1] == theirs[1] and torch.equal(ours[2], theirs[2])
    csv_of = lambda result: train.predictions_bytes(['0'], labels, *result[3], ['a', 'b', 'c'], 'last', 1).decode()
    assert csv_of(ours) == csv_of(theirs) and len(csv_of(ours).splitlines()) == 2


def test_best_val_epoch_is_the_first_of_equal_ones():
    """summary.json and best.safetensors take the first epoch with the best val accuracy, as plot.py and sweep.py
    read it: otherwise test_acc_at_best_val would differ between them on ties (common with small val sets)."""
    history = [dict(epoch=epoch, val_acc=val, test_acc=test, epoch_time_s=1.0)
               for epoch, val, test in ((1, 80.0, 70.0), (2, 90.0, 71.0), (3, 90.0, 75.0))]
    assert train.best_val_epoch(history) == 2
    assert train.summarize(history, 3, 0.1, 10)['test_acc_at_best_val'] == 71.0


def test_summary_peak_memory_is_the_maximum_over_epochs():
    rows = [dict(epoch=i + 1, test_acc=50.0, test_loss=1.0, epoch_time_s=1.0, peak_mem_gib=p)
            for i, p in enumerate([2.0, 3.5, 1.0])]
    assert train.summarize(rows, 3, 0.0, 10)['peak_mem_gib'] == 3.5


def test_summary_of_a_run_stopped_before_its_first_epoch_has_no_epoch_time():
    summary = train.summarize([], 3, 0.1, 10)
    assert summary['epochs_done'] == 0 and not summary['finished']
    assert summary['mean_epoch_time_s'] is None and summary['best_val_epoch'] is None  # no epoch, not 0.0 s


def test_confusion_csv_rows_are_true_classes():
    text = train.confusion_bytes(torch.tensor([[5, 1], [0, 6]]), ['a', 'b']).decode()
    assert text.splitlines() == ['true\\predicted,a,b', 'a,5,1', 'b,0,6']


def test_a_single_process_stops_at_the_next_step():
    """SIGTERM in one process: the epoch stops at its next step, not at the next 20-step sync."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stop = train.StopRequest()
    stop.signum = signal.SIGTERM
    steps = []

    def batches():
        for i in range(30):
            steps.append(i)
            yield torch.randn(2, 4), torch.tensor([0, 1])
    assert train.train_epoch(model, optimizer, scheduler, batches(), 30, amp=False, stop=stop) is None
    assert len(steps) == 1


def test_the_first_non_finite_step_is_the_one_reported():
    """The loss is checked at the 20-step sync, not per step; once NaN it stays NaN, and the step reported (the error
    line, summary.json's diverged.step) must be the first bad one, not the last before the sync."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [(torch.randn(2, 4) if step == 0 else torch.full((2, 4), float('nan')), torch.tensor([0, 1]))
               for step in range(6)]
    with pytest.raises(FloatingPointError) as error:
        train.train_epoch(model, optimizer, scheduler, iter(batches), 6, amp=False)
    assert error.value.args[0] == 2  # steps count from 1


def test_evaluation_is_in_eval_mode_whatever_the_model_was_left_in():
    """Prompt dropout must not act on val/test images: evaluate() puts the model in eval mode itself."""
    model, images, labels, preprocess = tiny_model_and_data(images=10)
    model.prompts.dropout.p = 0.5
    results = [train.evaluate_split(model.train(), (images, labels), 10, preprocess, False) for _ in range(2)]
    assert results[0][0] == results[1][0] and torch.equal(results[0][2], results[1][2])


def test_a_checkpoint_missing_a_trainable_tensor_or_holding_another_is_refused(tmp_path):
    """Loaded with strict=False (the frozen backbone is rebuilt, not stored), a file without the head would leave it
    randomly initialised: --eval_only would report a random head's accuracy, a resume train from it."""
    from safetensors.torch import save_file
    model, *_ = tiny_model_and_data()
    set_trainable(model, full=False)
    tensors = {name: tensor.detach().clone() for name, tensor in train.trainable_tensors(model).items()}
    for name, change in (('missing', lambda t: t.pop('vit.head.weight')),
                         ('unexpected', lambda t: t.update(extra=torch.zeros(1)))):
        damaged = dict(tensors)
        change(damaged)
        save_file(damaged, tmp_path / f'{name}.safetensors', metadata={'epoch': '1'})
        with pytest.raises(SystemExit, match=rf"does not match this run's model .*{name}"):
            train.load_trainable(tmp_path / f'{name}.safetensors', model)
    save_file(tensors, tmp_path / 'whole.safetensors', metadata={'epoch': '1'})
    assert train.load_trainable(tmp_path / 'whole.safetensors', model) == 1
    save_file(tensors, tmp_path / 'trainable.safetensors')  # no epoch: another tool's file, never a run's epoch 0
    with pytest.raises(SystemExit, match=r"trainable.safetensors records no epoch \(vpt did not write it\) "
                                         r"but state.pt is from epoch 0; start a new run$"):
        train.load_resumed_trainable(tmp_path, model, dict(epoch=0))


def test_time_per_epoch_falls_back_to_compiling_epochs_when_all_compiled():
    """--epoch 1 --compile True (or a one-epoch resume): every epoch compiled; summary.json's mean_epoch_time_s is
    then theirs, not 0."""
    rows = [dict(epoch=1, epoch_time_s=5.0, includes_compile=1, test_acc=1.0, test_loss=1.0)]
    assert train.summarize(rows, 1, 0.0, 10)['mean_epoch_time_s'] == 5.0


def test_schedule_counts_whole_steps_and_rounds_the_warmup():
    assert train.schedule_steps(10, 4, 2, 0.75) == (2, 2, 4)  # 2 steps an epoch (2 images dropped); 1.5 rounds to 2


def test_throughput_counts_the_images_trained_not_the_ones_dropped(tiny_dataset, tmp_path, capsys, monkeypatch):
    """metrics.csv's train_images_per_s: 48 images at batch 10 train 40 a epoch (the last incomplete batch is
    dropped), so 2 s of training is 20 images/s, not 24. The clock is faked: training takes exactly 2 s."""
    import time
    import types

    from conftest import TINY, read_metrics, run_main
    clock = [0.0]

    def perf_counter():
        clock[0] += 1e-9  # the progress bar divides by elapsed time
        return clock[0]
    monkeypatch.setattr(train, 'time', types.SimpleNamespace(perf_counter=perf_counter, time=time.time))
    train_epoch = train.train_epoch

    def two_seconds(*args, **kwargs):
        result = train_epoch(*args, **kwargs)
        clock[0] += 2.0
        return result
    monkeypatch.setattr(train, 'train_epoch', two_seconds)
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 10, '--log_dir', tmp_path,
                             '--name', 'r'], capsys)
    assert code == 0, err
    assert read_metrics(tmp_path / 'r')[0]['train_images_per_s'] == '20.0'


def test_a_stop_request_keeps_the_first_signal_and_gives_the_handlers_back():
    """torchrun forwards the terminal's Ctrl-C, then a SIGTERM may follow: the stop is the first signal's (its exit
    status and message). Once training ends, SIGINT and SIGTERM are main.py's again, not a flag nobody reads."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with train.StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGINT
    assert {s: signal.getsignal(s) for s in before} == before


def test_metrics_csv_keeps_every_value_to_its_precision():
    """metrics.csv is what plot.py, sweep.py and a reader compare runs by: a late cosine lr (1e-7) must not print as
    0.000000, nor accuracies lose the digits that tell two seeds apart; a missing value is an empty cell."""
    row = dict(epoch=3, train_loss=1.23456789, train_acc=12.3456789, test_loss=0.5, test_acc=50.00004, lr=1.2345678e-7,
               epoch_time_s=3.14159, train_images_per_s=1234.5678, val_loss=None, val_acc=None, peak_mem_gib=None,
               includes_compile=1)
    later = dict(row, epoch=4, val_loss=0.25, val_acc=75.0, peak_mem_gib=2.5, includes_compile=0)
    assert train.metrics_bytes([row, later]).decode().splitlines() == [
        ','.join(train.METRICS_HEADER),
        '3,1.234568,12.3457,0.500000,50.0000,1.23457e-07,3.142,1234.6,,,,1',
        '4,1.234568,12.3457,0.500000,50.0000,1.23457e-07,3.142,1234.6,0.250000,75.0000,2.500,0']


def test_a_resume_restores_every_random_stream():
    """rng_states and restore_rng round-trip Python's, NumPy's, torch's and the data generator's streams."""
    import random

    import numpy as np
    generator = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    saved = train.rng_states(generator)
    draws = lambda gen: (random.random(), np.random.rand(), torch.rand(2).tolist(),
                         torch.rand(2, generator=gen).tolist())
    expected = draws(generator)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    other = torch.Generator().manual_seed(9)
    train.restore_rng(saved, other, seed=0)
    assert draws(other) == expected


def test_a_state_of_an_older_vpt_is_refused_with_what_stays_usable(tmp_path):
    """state.pt from before the data order was drawn on the CPU (no per-rank streams) cannot resume exactly."""
    torch.save(dict(epoch=1, history=[], optimizer={}, scheduler={}, rng=dict(torch=torch.get_rng_state())),
               tmp_path / 'state.pt')
    with pytest.raises(SystemExit, match=r"state.pt was written by an older vpt whose data order depended on the "
                                         r"device; it cannot be resumed exactly. .*\(--eval_only\)"):
        train.load_state(str(tmp_path))


def test_a_val_accuracy_of_zero_is_a_score():
    """An epoch that got every val image wrong still has a val accuracy: the run has a best epoch, not none."""
    history = [dict(epoch=1, val_acc=0.0, test_acc=10.0, test_loss=1.0, epoch_time_s=1.0, train_acc=5.0)]
    assert train.best_val_epoch(history) == 1
    assert train.summarize(history, 1, 0.1, 10)['test_acc_at_best_val'] == 10.0


def test_evaluation_builds_no_autograd_graph():
    """No graph is kept for evaluation: it would hold every activation (far more GPU memory) for nothing."""
    torch.manual_seed(0)
    model = PromptedViT(create_vit('test_vit', 3, 32, 8, pretrained=False), 4)
    grad_enabled = []
    model.register_forward_hook(lambda module, inputs, output: grad_enabled.append(torch.is_grad_enabled()))
    images, labels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1])
    preprocess = data.preprocessing(model.vit.pretrained_cfg, torch.device('cpu'), 32)
    train.evaluate_split(model, (images, labels), 4, preprocess, amp=False)
    assert grad_enabled == [False, False]  # two batches


def test_mixed_precision_is_bf16_where_the_gpu_has_it_else_fp16_with_loss_scaling(monkeypatch):
    """A V100 or T4 emulates bf16 (slower than fp32): there --amp means fp16, whose gradients need loss scaling."""
    made = []
    monkeypatch.setattr(torch.amp, 'GradScaler', lambda device, enabled: made.append((device, enabled)))
    cuda = torch.device('cuda', 0)
    for capability, dtype, name in (((6, 1), torch.float16, 'float16'), ((7, 5), torch.float16, 'float16'),
                                    ((8, 0), torch.bfloat16, 'bfloat16'), ((9, 0), torch.bfloat16, 'bfloat16')):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device, found=capability: found)
        assert train.autocast_dtype(cuda) == dtype
        with warnings.catch_warnings():  # torch turns a CUDA autocast off where there is no GPU, keeping its dtype
            warnings.simplefilter('ignore')
            assert train.autocast(cuda, True).fast_dtype == dtype  # what training and evaluation run in
        assert (train.amp_name(cuda, True), train.amp_name(cuda, False)) == (name, None)  # config.json's amp_dtype
        made.clear()
        train.make_scaler(cuda, True), train.make_scaler(cuda, False)
        assert made == [('cuda', name == 'float16'), ('cuda', False)], capability
    cpu = torch.device('cpu')
    assert train.amp_name(cpu, True) is None  # autocast is off on the CPU: fp32
    made.clear()
    train.make_scaler(cpu, True)
    assert made == [('cpu', False)]


def test_fp16_loss_scaling_skips_a_step_whose_gradients_overflow_and_lowers_the_scale(monkeypatch, recwarn):
    """The fp16 path of a pre-Ampere GPU, on the CPU: the step goes through the scaler, which skips the update of an
    overflowed step (the schedule still counts it, without torch's warning about it) and trains at a lower scale."""
    monkeypatch.setattr(train, 'amp_name', lambda device, amp: 'float16' if amp else None)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = train.make_scaler(torch.device('cpu'), True)
    assert scaler.is_enabled()
    scaler.load_state_dict(dict(scale=2.0 ** 127, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                                _growth_tracker=0))
    before = [param.clone() for param in model.parameters()]
    batches = [(torch.randn(8, 4) * 100, torch.randint(0, 3, (8,))) for _ in range(2)]  # loss > 2: x 2^127 overflows
    assert train.train_epoch(model, optimizer, scheduler, iter(batches[:1]), 1, scaler=scaler) is not None
    assert all(torch.equal(param, old) for param, old in zip(model.parameters(), before))  # skipped
    assert scaler.get_scale() == 2.0 ** 126 and scheduler.last_epoch == 1
    assert not [w for w in recwarn if 'lr_scheduler' in str(w.message)]
    scaler.update(2.0 ** 10)
    train.train_epoch(model, optimizer, scheduler, iter(batches[1:]), 1, scaler=scaler)
    assert not any(torch.equal(param, old) for param, old in zip(model.parameters(), before))  # trained
    assert scaler.get_scale() == 2.0 ** 10


def test_mixed_precision_is_on_only_where_amp_asks_for_it_on_a_gpu(monkeypatch):
    """--amp False on a GPU trains and evaluates in fp32; on the CPU autocast stays off whatever --amp says."""
    made = []
    monkeypatch.setattr(torch, 'autocast', lambda device_type, dtype, enabled: made.append((device_type, enabled)))
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device: (8, 0))
    for device in (torch.device('cuda', 0), torch.device('cpu')):
        train.autocast(device, True), train.autocast(device, False)
    assert made == [('cuda', True), ('cuda', False), ('cpu', False), ('cpu', False)]
