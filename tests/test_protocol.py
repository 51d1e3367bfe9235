"""The research protocol: held-out validation, the best-val checkpoint and its honest test number, --unfreeze,
--optimizer, provenance in config.json."""
import csv
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import TINY, read_metrics, run_main, write_folder_dataset, write_jax_npz

FAKE_VAL_ACC = {1: 50.0, 2: 90.0, 3: 70.0}  # the best val epoch is 2, neither the first nor the last


def test_val_split_best_checkpoint_and_summary(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Train 3 epochs with a val split whose accuracies are fixed (50, 90, 70 %): best.safetensors must hold the
    tensors of epoch 2, summary.json the test accuracy of epoch 2 (not the best test epoch), and --eval_only
    --checkpoint best reproduce it."""
    saved, evaluate_split = {}, train.evaluate_split
    save_checkpoint = train.save_checkpoint

    def record(run_dir, model, *args):
        saved[args[4]] = {name: t.clone() for name, t in train.trainable_tensors(model).items()}  # args[4]: epoch
        return save_checkpoint(run_dir, model, *args)

    def fixed_val(model, split, *args):
        loss, acc, *rest = evaluate_split(model, split, *args)  # rest: the confusion, and the test's per-image view
        return (loss, FAKE_VAL_ACC[len(saved)], *rest) if len(split[1]) == 12 else (loss, acc, *rest)
    monkeypatch.setattr(train, 'save_checkpoint', record)
    monkeypatch.setattr(train, 'evaluate_split', fixed_val)
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--val_split', 0.25, '--epoch', 3, '--batch_size', 8,
                               '--lr', 0.05, '--log_dir', tmp_path, '--name', 'val'], capsys)
    assert code == 0, err
    run_dir = tmp_path / 'val'
    config = json.loads((run_dir / 'config.json').read_text())
    assert (config['train_images'], config['val_images'], config['test_images']) == (36, 12, 18)  # 25% of 48
    rows = read_metrics(run_dir)
    assert [float(row['val_acc']) for row in rows] == [50.0, 90.0, 70.0] and all(row['val_loss'] for row in rows)
    best = load_file(run_dir / 'best.safetensors')
    assert set(best) == set(saved[2]) and all(torch.equal(best[name], saved[2][name]) for name in best)
    assert not all(torch.equal(best[name], saved[3][name]) for name in best)  # epoch 3 trained on

    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['best_val_epoch'] == 2 and summary['best_val_acc'] == 90.0 and summary['finished']
    assert summary['test_images'] == 18  # the test split's, not the 36 training images'
    assert summary['test_acc_at_best_val'] == pytest.approx(float(rows[1]['test_acc']), abs=1e-4)
    assert summary['final_test_acc'] == pytest.approx(float(rows[2]['test_acc']), abs=1e-4)
    assert out.strip().splitlines()[-1] == (
        f"best val epoch 2: val acc 90.00%, test acc {float(rows[1]['test_acc']):.2f}% (best.safetensors); final test "
        f"acc {float(rows[2]['test_acc']):.2f}%; results in {run_dir}")
    for row in rows:  # each epoch's line shows its metrics.csv row, val between train and test
        line = re.search(rf"epoch {row['epoch']}/3  train loss (\S+) acc (\S+)%  val acc (\S+)%  test loss (\S+) acc "
                         rf"(\S+)%  lr ", out)
        assert line, out
        for shown, column in zip(line.groups(), ('train_loss', 'train_acc', 'val_acc', 'test_loss', 'test_acc')):
            places = 4 if column.endswith('loss') else 2  # rounded from the value metrics.csv keeps more digits of
            assert float(shown) == pytest.approx(float(row[column]), abs=0.5 * 10**-places + 1e-9), (column, out)

    monkeypatch.setattr(train, 'evaluate_split', evaluate_split)
    code, out, err = run_main(['--eval_only', '--resume', run_dir, '--checkpoint', 'best'], capsys)
    assert code == 0, err
    assert f"(best, epoch 2): test accuracy {float(rows[1]['test_acc']):.4f}%" in out
    assert f"{run_dir} (best, epoch 2): val accuracy " in out and '% on 12 images' in out  # the split it was picked on
    assert (run_dir / 'confusion_best.csv').is_file()
    # --predict with the best checkpoint says which model answered: on screen and in every CSV row
    code, out, err = run_main(['--predict', os.path.join(tiny_dataset, 'test', 'cat'), '--resume', run_dir,
                               '--checkpoint', 'best', '--out', tmp_path / 'p.csv'], capsys)
    assert code == 0 and f"6 images classified by {run_dir} (best, epoch 2); wrote {tmp_path / 'p.csv'}" in out, err
    with open(tmp_path / 'p.csv') as f:
        assert {(row['checkpoint'], row['epoch']) for row in csv.DictReader(f)} == {('best', '2')}


def test_val_split_is_held_out_of_training(tiny_dataset, tmp_path, capsys, monkeypatch):
    """The training loop draws exactly the train-minus-val images; val is never trained on or augmented."""
    import data
    loaded, drawn, seen_val = [], [], []
    load, batches, split = data.load_dataset, data.train_batches, data.split_validation
    monkeypatch.setattr(data, 'load_dataset', lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    monkeypatch.setattr(data, 'train_batches', lambda images, *a, **k: drawn.append(images) or batches(images, *a, **k))
    monkeypatch.setattr(data, 'split_validation', lambda *a: seen_val.append(split(*a)) or seen_val[-1])
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--val_split', 0.25, '--epoch', 1, '--batch_size', 8,
                             '--log_dir', tmp_path], capsys)
    assert code == 0, err
    train_images = loaded[0][0]
    train_index, val_index = seen_val[0]
    assert (len(train_index), len(val_index)) == (36, 12) and not set(train_index.tolist()) & set(val_index.tolist())
    assert torch.equal(drawn[0], train_images[train_index])


def test_data_seed_fixes_the_images_while_seed_varies(tiny_dataset):
    """Runs that differ in --seed (a sweep's stage 2) train, validate and test on the same images."""
    import main
    def splits(*flags):
        args = main.parse_args([*map(str, TINY), '--dataset', tiny_dataset, '--val_split', '0.25', '--train_samples', '40',
                                '--test_samples', '9', '--batch_size', '8', *flags])
        return main.load_splits(args, 0, 1)[0]
    first, other_seed, other_data = splits('--seed', '0'), splits('--seed', '7'), splits('--data_seed', '7')
    for name in ('train', 'val', 'test'):
        assert all(torch.equal(a, b) for a, b in zip(first[name], other_seed[name])), name
    assert not torch.equal(first['val'][0], other_data['val'][0])


def test_val_split_rounding_per_class_is_said(tmp_path, capsys):
    """--val_split rounds per class: on 2 images a class, 0.3 holds out half of the training set and 0.2 none. Neither
    may pass as the fraction asked for."""
    import main
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b', 'c'), train_per_class=2, test_per_class=1, size=8)
    split = lambda fraction: main.load_splits(main.parse_args([*map(str, TINY), '--dataset', root, '--val_split',
                                                               fraction, '--batch_size', '1']), 0, 1)[0]
    assert len(split('0.3')['val'][1]) == 3
    assert capsys.readouterr().err.strip() == (
        "warning: --val_split 0.3 holds out 3 of 6 training images (50.0%): it is rounded per class: each holds out "
        "round(fraction x its images), keeping one to train on")
    with pytest.raises(SystemExit, match=r'leaves 0 for validation and 6 for training \(it is rounded per class'):
        split('0.2')
    assert len(split('0.5')['val'][1]) == 3 and capsys.readouterr().err == ''  # exactly what was asked: no warning
    os.remove(tmp_path / 'ds' / 'train' / 'a' / '0001.png')  # a class of one image keeps it for training
    assert len(split('0.5')['val'][1]) == 2
    assert '2 of 5 training images (40.0%) and no image of 1 of the 3 classes: it is rounded' in capsys.readouterr().err
    for name in ('b', 'c'):  # one image a class: no fraction holds one out, and the error does not ask for one
        os.remove(tmp_path / 'ds' / 'train' / name / '0001.png')
    with pytest.raises(SystemExit, match=r'leaves 0 for validation and 3 for training \(.*\); no class has a second '
                                         r'image to hold out: drop --val_split, or add images$'):
        split('0.5')


def test_val_split_a_percent_or_more_off_is_said(tiny_dataset, capsys):
    """README: where the per-class rounding is 1% or more off --val_split overall, a warning says so. 16 images a
    class: 0.1 holds out 2 each, 12.5% (2.5 points off: said); 0.13 also 12.5% (0.5 points off: not said)."""
    import main
    split = lambda fraction: main.load_splits(main.parse_args([*map(str, TINY), '--dataset', tiny_dataset,
                                                               '--val_split', fraction, '--batch_size', '1']), 0, 1)[0]
    assert len(split('0.1')['val'][1]) == 6
    assert capsys.readouterr().err.strip() == (
        "warning: --val_split 0.1 holds out 6 of 48 training images (12.5%): it is rounded per class: each holds out "
        "round(fraction x its images), keeping one to train on")
    assert len(split('0.13')['val'][1]) == 6 and capsys.readouterr().err == ''


def test_a_class_left_without_val_images_is_said_even_when_the_fraction_is_met(capsys):
    """README: a val split that leaves a class without validation images gets a warning, even where the fraction held
    out overall is within 1% of --val_split: that class's accuracy plays no part in choosing the best epoch."""
    import argparse
    import main
    all_train = torch.tensor([0] + [1] * 50 + [2] * 50)  # class a has one image, which it keeps for training
    val, train_labels = torch.tensor([1] * 25 + [2] * 25), torch.tensor([0] + [1] * 25 + [2] * 25)
    args = argparse.Namespace(train_samples=0, test_samples=0, val_split=0.5, test_split=0, batch_size=2,
                              eval_only=False)
    main.check_splits(args, dict(train=(None, train_labels), val=(None, val), test=(None, torch.tensor([0, 1, 2]))),
                      ['a', 'b', 'c'], all_train, 0)
    assert capsys.readouterr().err.strip() == (
        "warning: --val_split 0.5 holds out 50 of 101 training images (49.5%) and no image of 1 of the 3 classes: it "
        "is rounded per class: each holds out round(fraction x its images), keeping one to train on")


def test_augment_false_reaches_the_training_batches(tiny_dataset, tmp_path, capsys, monkeypatch):
    import data
    seen, batches = [], data.train_batches
    monkeypatch.setattr(data, 'train_batches', lambda *a: seen.append(a[7]) or batches(*a))
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 16, '--augment', 'False',
                             '--log_dir', tmp_path, '--name', 'plain'], capsys)
    assert code == 0, err
    assert seen == [False] and json.loads((tmp_path / 'plain' / 'config.json').read_text())['augment'] is False


def test_seed_sets_the_data_order_and_augmentation(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Stage-2 seeds must differ in data order and augmentation too, not only in the head and prompts: --seed seeds
    the epoch's generator. (--data_seed chooses images, not their order.)"""
    import data
    seen, batches = [], data.train_batches

    def recorded(*args, **kwargs):
        for inputs, labels in batches(*args, **kwargs):
            seen[-1].append((inputs.clone(), labels.clone()))
            yield inputs, labels
    monkeypatch.setattr(data, 'train_batches', recorded)
    for name, seeds in (('s0', []), ('s1', ['--seed', 1]), ('d5', ['--data_seed', 5])):
        seen.append([])
        code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 16, '--log_dir',
                                 tmp_path, '--name', name, *seeds], capsys)
        assert code == 0, err
    same = lambda a, b: all(torch.equal(x, y) and torch.equal(l, m) for (x, l), (y, m) in zip(a, b))
    assert not same(seen[0], seen[1])
    assert [l.tolist() for _, l in seen[0]] != [l.tolist() for _, l in seen[1]]  # the order itself differs
    assert same(seen[0], seen[2])  # all images are used either way: --data_seed alone changes nothing here


def test_more_samples_than_images_is_said(tmp_path, capsys):
    import main
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=3, test_per_class=2, size=8)
    args = main.parse_args([*map(str, TINY), '--dataset', root, '--train_samples', '1000', '--test_samples', '4',
                            '--batch_size', '2'])
    splits, *_ = main.load_splits(args, 0, 1)
    assert len(splits['train'][1]) == 6 and len(splits['test'][1]) == 4
    assert capsys.readouterr().err.strip() == ("warning: --train_samples 1000 is more than the 6 train images there "
                                               "are; all are used")
    # with a val split the count is the dataset's, before the split: 6 asked of 6 is no warning, 1000 names 6
    for asked, said in (('6', ''), ('1000', 'warning: --train_samples 1000 is more than the 6 train images there are; '
                                            'all are used')):
        main.load_splits(main.parse_args([*map(str, TINY), '--dataset', root, '--train_samples', asked,
                                          '--val_split', '0.34', '--batch_size', '2']), 0, 1)
        assert capsys.readouterr().err.strip() == said
    with pytest.raises(SystemExit, match=r'--val_split 0.01 of 6 training images leaves 0 for validation'):
        main.load_splits(main.parse_args([*map(str, TINY), '--dataset', root, '--val_split', '0.01']), 0, 1)


def test_training_draws_from_a_cpu_generator(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Data order and augmentation come from a CPU generator whatever --device is, so a run resumes on another device
    (a CUDA generator's state cannot be loaded into a CPU one, nor the reverse)."""
    made, generator = [], torch.Generator
    monkeypatch.setattr(torch, 'Generator', lambda *a, **k: made.append((a, k)) or generator(*a, **k))
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 16, '--log_dir', tmp_path,
                             '--name', 'run'], capsys)
    assert code == 0, err
    assert made and all(a in ((), ('cpu',)) and k.get('device', 'cpu') == 'cpu' for a, k in made)
    state = torch.load(tmp_path / 'run' / 'state.pt', weights_only=False)
    generator().set_state(state['rng']['data'])  # a CPU generator's state


def test_resume_with_more_epochs_follows_the_new_schedule_from_its_first_step(tiny_dataset, tmp_path, capsys,
                                                                               monkeypatch):
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8, '--log_dir', tmp_path,
                             '--name', 'run'], capsys)
    assert code == 0, err
    used = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, 'step', lambda self, *a, **k: used.append(self.param_groups[0]['lr'])
                        or step(self, *a, **k))
    code, _, err = run_main(['--resume', tmp_path / 'run', '--epoch', 4], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    steps_per_epoch, total = 6, 24  # 48 images / 8
    warmup = round(config['warmup_epochs'] * steps_per_epoch)
    expected = [config['lr'] * train.lr_factor(s, warmup, total) for s in range(2 * steps_per_epoch, total)]
    assert used == pytest.approx(expected, rel=1e-12) and used[0] > 0  # the finished schedule had reached 0


@pytest.mark.parametrize('text', ['', ',', ' , '])
def test_unfreeze_naming_no_pattern_is_the_plain_method(text):
    """--unfreeze ',' unfroze nothing but labelled the run P+unfreeze (config.json, run name, plot.py), while
    --unfreeze '' was P: both name no pattern, and --full True takes them too."""
    import main
    assert main.mode_label(main.parse_args(['--unfreeze', text])) == 'P'
    assert main.mode_label(main.parse_args(['--unfreeze', text, '--prompts', '0'])) == 'linear'
    assert main.mode_label(main.parse_args(['--unfreeze', text, '--full', 'True'])) == 'P+F'
    assert main.mode_label(main.parse_args(['--unfreeze', f'{text}pos_embed'])) == 'P+unfreeze'


def test_unfreeze_trains_exactly_the_matched_tensors(tiny_dataset, tmp_path, capsys, monkeypatch):
    import main
    models = []
    fit = train.fit
    monkeypatch.setattr(train, 'fit', lambda model, *a, **k: models.append(model) or fit(model, *a, **k))
    argv = [*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8, '--unfreeze', 'pos_embed,norm.*',
            '--log_dir', tmp_path, '--name', 'seedlike']
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'seedlike' / 'config.json').read_text())
    assert config['mode'] == 'P+unfreeze' and 'mode P+unfreeze: ' in out  # not P: the backbone is not all frozen
    assert config['lr'] == main.DEFAULT_LR['P']  # the method's defaults still
    tensors = load_file(tmp_path / 'seedlike' / 'trainable.safetensors')
    assert set(tensors) == {'prompts.tokens', 'vit.head.weight', 'vit.head.bias', 'vit.pos_embed', 'vit.norm.weight',
                            'vit.norm.bias'}
    assert config['trainable_params'] == sum(t.numel() for t in tensors.values())
    assert config['unfrozen_params'] == tensors['vit.pos_embed'].numel() + 2 * tensors['vit.norm.weight'].numel()
    fresh, _ = main.build_model(main.parse_args(list(map(str, argv))), 3, torch.device('cpu'))
    trained = models[0].state_dict()
    for name, tensor in fresh.state_dict().items():
        if name in tensors:
            assert not torch.equal(trained[name], tensor), name
        else:
            assert torch.equal(trained[name], tensor), name  # frozen: bit-identical (the blocks' norms too)


@pytest.mark.parametrize('optimizer,lr', [('sgd', 0.05), ('adam', 2e-3)])
def test_other_optimizers_learn(tiny_dataset, tmp_path, capsys, optimizer, lr):
    code, _, err = run_main([*TINY, '--prompts', 0, '--full', True, '--dataset', tiny_dataset, '--epoch', 6,
                             '--batch_size', 8, '--optimizer', optimizer, '--lr', lr, '--log_dir', tmp_path,
                             '--name', 'run'], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['optimizer'] == optimizer
    assert float(read_metrics(tmp_path / 'run')[-1]['test_acc']) >= 80  # three colour-coded classes


def test_make_optimizer_kinds():
    from model import PromptedViT, create_vit, set_trainable
    model = PromptedViT(create_vit('test_vit', 10, 32, 4, pretrained=False), 3)
    set_trainable(model, full=False)
    cpu = torch.device('cpu')
    sgd = train.make_optimizer(model, 'sgd', 0.1, 1e-4, cpu)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults['momentum'] == 0.9 and sgd.defaults['lr'] == 0.1
    assert type(train.make_optimizer(model, 'adam', 1e-3, 5e-5, cpu)) is torch.optim.Adam
    assert type(train.make_optimizer(model, 'adamw', 1e-3, 5e-5, cpu)) is torch.optim.AdamW


@pytest.mark.parametrize('suffix', ['safetensors', 'npz'])
def test_weights_file_identity_is_recorded(tiny_dataset, tmp_path, capsys, suffix):
    import hashlib
    import timm
    from safetensors.torch import save_file
    weights = tmp_path / f'test_vit.{suffix}'
    source = timm.create_model('test_vit', img_size=224)
    save_file(source.state_dict(), weights) if suffix == 'safetensors' else write_jax_npz(source, weights)
    code, _, err = run_main([a for a in TINY if a not in ('--pretrained', 'False')] + [
        '--weights', weights, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 16, '--log_dir', tmp_path / 'logs',
        '--name', 'w'], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'logs' / 'w' / 'config.json').read_text())
    assert config['weights_id'].endswith(f"sha256:{hashlib.sha256(weights.read_bytes()).hexdigest()}")


def test_a_full_run_is_the_backbone_of_a_prompt_run_on_other_data(tiny_dataset, tmp_path, capsys):
    """Fine-tune on one data set (F), then prompt-tune from that backbone on another: --weights takes the F run's
    trainable.safetensors, and the second run's backbone is the first one's as trained, recorded by its sha256."""
    import hashlib
    import main
    from safetensors.torch import load_file
    common = ['--model', 'test_vit', '--device', 'cpu', '--epoch', 1, '--batch_size', 16, '--log_dir', tmp_path / 'logs']
    code, _, err = run_main(common + ['--pretrained', 'False', '--full', True, '--prompts', 0, '--dataset', tiny_dataset,
                                      '--name', 'upstream'], capsys)
    assert code == 0, err
    backbone = tmp_path / 'logs' / 'upstream' / 'trainable.safetensors'
    other_data = write_folder_dataset(tmp_path / 'other', classes=('ship', 'truck'))
    argv = common + ['--weights', backbone, '--prompts', 4, '--dataset', other_data, '--name', 'downstream']
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'logs' / 'downstream' / 'config.json').read_text())
    assert config['weights_id'] == f"file {backbone} sha256:{hashlib.sha256(backbone.read_bytes()).hexdigest()}"
    model, _ = main.build_model(main.parse_args([str(arg) for arg in argv]), 2, torch.device('cpu'))
    trained = load_file(backbone)
    for name, tensor in model.vit.named_parameters():
        if not name.startswith('head.'):
            assert torch.equal(tensor, trained['vit.' + name]), name


def test_seed_recipe_trainable_count_on_vit_b4():
    """README's 'Reproducing the seed': the seed's trainable set on ViT-B/4 is P's 468,490 plus 89,856."""
    import main
    argv = ['--pretrained', 'False', '--unfreeze', 'patch_embed.*,pos_embed,cls_token,norm.*', '--optimizer', 'adam',
            '--lr', '1e-3', '--weight_decay', '5e-5', '--warmup_epochs', '0']
    model, unfrozen = main.build_model(main.parse_args(argv), 10, torch.device('cpu'))
    assert unfrozen == 89_856
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 468_490 + 89_856


def test_hub_weights_are_recorded_by_their_hub_id():
    """config.json's weights_id for the default hub download names the repository the weights come from (README:
    hf-hub:timm/<model>), not just the timm model name."""
    import main
    args = main.parse_args([])
    weights_id = main.provenance(args, [], 1, torch.device('cpu'))['weights_id']
    assert weights_id == 'hf-hub:timm/vit_base_patch16_224.augreg_in21k'
