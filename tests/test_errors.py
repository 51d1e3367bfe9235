"""A user's mistake gets one clear line naming the problem and the fix, a non-zero exit, and nothing written."""
import json
import os
import shutil

import pytest
import timm
import torch

import model
import sweep
import train
from conftest import TINY, read_metrics, run_cli, run_main, write_folder_dataset, write_jax_npz


def snapshot(root):
    return sorted((path, os.path.getsize(os.path.join(path, f)) if os.path.isfile(os.path.join(path, f)) else -1, f)
                  for path, dirs, files in os.walk(root) for f in files + dirs)


@pytest.fixture
def cli(tmp_path, tiny_dataset, capsys):
    """Run main.py's main() with a tiny model/dataset, a log dir holding one earlier run, and assert the contract."""
    log_dir = tmp_path / 'logs'
    os.makedirs(log_dir / 'earlier_run')
    (log_dir / 'earlier_run' / 'metrics.csv').write_text('epoch\n')

    def run(*flags, expect, code=None):
        before = snapshot(tmp_path)
        tiny = TINY if '--weights' not in flags and '--pretrained' not in flags else [
            a for a in TINY if a not in ('--pretrained', 'False')]
        argv = [*tiny, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8, '--log_dir', log_dir, *flags]
        exit_code, out, err = run_main(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert exit_code != 0 and (code is None or exit_code == code), (exit_code, err)
        assert len(lines) == 1, err
        assert 'Traceback' not in err
        for word in expect:
            assert word in lines[0], lines[0]
        assert snapshot(tmp_path) == before  # nothing written, nothing overwritten
        return lines[0]
    run.tmp_path, run.log_dir, run.tiny_dataset = tmp_path, log_dir, tiny_dataset
    return run


@pytest.mark.parametrize('flags, expect', [
    (['--lr', 0], ['--lr', 'must be a finite number > 0, got 0']),
    (['--epoch', 2, '--warmup_epochs', 2], ['--warmup_epochs 2 is not shorter than --epoch 2', 'never reach']),
    (['--epoch', 1, '--warmup_epochs', 5], ['--warmup_epochs 5 is not shorter than --epoch 1', '10% of --epoch']),
    (['--name', '..'], ["--name '..' must be a plain directory name"]),
    (['--name', ''], ["--name '' must be a plain directory name"]),
    (['--name', '.'], ["--name '.' must be a plain directory name"]),
    (['--name', 'sub/run'], ["--name 'sub/run' must be a plain directory name; put the parent in --log_dir"]),
    (['--name', 'my run '], ["--name 'my run ' starts or ends with a space; pass --name 'my run'"]),
])
def test_settings_that_cannot_mean_what_they_say(cli, flags, expect):
    """--lr 0 trains nothing and a warmup as long as the run never reaches the lr nor decays: both ran silently."""
    cli(*flags, expect=expect, code=2)


def test_a_run_directory_after_eval_only_points_to_resume(cli):
    """--eval_only takes an optional True/False, so `--eval_only logs/run` was refused as a bad boolean."""
    run_dir = cli.log_dir / 'earlier_run'
    cli('--eval_only', run_dir, code=2,
        expect=[f"argument --eval_only: takes no run directory, --resume does: pass --eval_only --resume {run_dir}"])
    cli('--eval_only', 'maybe', code=2, expect=["argument --eval_only: expected True/False", "got 'maybe'"])


def test_a_warmup_that_rounds_to_every_step_is_refused(cli, capsys):
    """--warmup_epochs is compared with --epoch in epochs; rounded to whole steps, 0.9 of 1 epoch at 6 steps an epoch
    is 5 warmup steps, the 6th at the peak lr: the cosine never ran. The suggested value leaves a step to decay."""
    cli('--warmup_epochs', 0.9, code=1, expect=[
        '--warmup_epochs 0.9 is 5 of the 6 steps (6 per epoch): the lr would never decay',
        'pass --warmup_epochs 0.6666 or less'])
    code, _, err = run_main([*TINY, '--dataset', cli.tiny_dataset, '--epoch', 1, '--batch_size', 8, '--lr', 1e-3,
                             '--warmup_epochs', 0.6666, '--log_dir', cli.log_dir, '--name', 'ok'], capsys)
    assert code == 0, err
    # step 5 of 6 after 4 warmup steps: half-way down the cosine
    assert float(read_metrics(cli.log_dir / 'ok')[-1]['lr']) == pytest.approx(5e-4)


def test_epoch_zero(cli):
    cli('--epoch', 0, expect=['--epoch', 'at least 1'], code=2)


def test_epoch_not_a_whole_number(cli):
    cli('--epoch', 2.5, expect=['--epoch', "expected an integer, got '2.5'"], code=2)


def test_epoch_negative(cli):
    cli('--epoch', -3, expect=['--epoch', 'at least 1'], code=2)


def test_batch_size_zero(cli):
    cli('--batch_size', 0, expect=['--batch_size', 'at least 1'], code=2)


def test_prompts_negative(cli):
    cli('--prompts', -1, expect=['--prompts', 'at least 0'], code=2)


def test_empty_resume(cli, monkeypatch):
    # `--resume "$RUN"` with RUN unset: not a new run trained into the current directory
    os.makedirs(cli.tmp_path / 'cwd')
    monkeypatch.chdir(cli.tmp_path / 'cwd')  # inside the snapshot: a run written here fails the test
    cli('--resume', '', expect=['--resume needs a run directory', 'empty string'], code=2)


@pytest.mark.parametrize('flag, value', [('--warmup_epochs', 'inf'), ('--lr', 'nan'), ('--lr', 'inf'),
                                         ('--weight_decay', 'inf')])
def test_non_finite_number(cli, flag, value):
    cli(flag, value, expect=[flag, 'finite number'], code=2)


def test_unknown_device(cli):
    cli('--device', 'gpu', expect=['--device', 'auto, cpu, cuda or cuda:N', "'gpu'"], code=2)


@pytest.mark.parametrize('device', ['cpu0', 'cuda:1x', 'cuda:', 'autocpu'])
def test_a_device_that_only_starts_like_one_is_refused(cli, device):
    """The whole value must be auto, cpu, cuda or cuda:N: 'cpu0' or 'cuda:1x' reached torch.device as a traceback."""
    cli('--device', device, expect=['--device', 'auto, cpu, cuda or cuda:N', repr(device)], code=2)


@pytest.mark.parametrize('flag', ['--seed', '--data_seed'])
def test_seed_out_of_range(cli, flag):
    cli(flag, 99999999999999999999, expect=[flag, 'at most 4294967295'], code=2)


def test_kv_prompts_need_deep(cli):
    cli('--deep', 'False', '--prompt_impl', 'kv', expect=['--prompt_impl kv needs --deep True', 'naive'], code=2)


def test_boolean_flag_garbage(cli):
    cli('--full', 'maybe', expect=['--full', 'True/False'], code=2)


def test_img_size_not_divisible_by_patch_size(cli):
    cli('--img_size', 30, expect=['--img_size 30', '--patch_size 4'], code=2)


def test_unknown_model(cli):
    cli('--model', 'vit_nonexistent_patch3', expect=['unknown --model', 'vit_nonexistent_patch3', 'timm'])


def test_weights_missing(cli):
    cli('--weights', cli.tmp_path / 'nope.safetensors', expect=['--weights', 'no such file'])


def test_weights_with_pretrained_false_is_a_contradiction(cli):
    """--weights loads pretrained weights: a --pretrained False beside it cannot be honoured, and is not ignored."""
    path = cli.tmp_path / 'w.safetensors'
    path.write_bytes(b'')
    cli('--weights', path, '--pretrained', 'False', code=2,
        expect=['--weights loads pretrained weights but --pretrained False asks for none; drop one of them'])


def test_weights_folder_names_the_file_in_it(cli):
    os.makedirs(cli.tmp_path / 'hub')
    (cli.tmp_path / 'hub' / 'model.safetensors').write_bytes(b'')
    for config in (None, '{}', 'not json'):  # a folder of weights alone, a hub download's, a damaged one
        if config is not None:
            (cli.tmp_path / 'hub' / 'config.json').write_text(config)
        cli('--weights', cli.tmp_path / 'hub', code=2, expect=[
            f"--weights {cli.tmp_path / 'hub'} is a folder; pass the checkpoint file in it, e.g. "
            f"{cli.tmp_path / 'hub' / 'model.safetensors'}"])


def test_weights_of_a_run_say_what_to_pass(cli):
    """A run's folder or its state.pt as --weights: only a --full True run's trainable.safetensors holds a backbone."""
    for name, full in (('P_run', False), ('F_run', True)):
        os.makedirs(cli.tmp_path / name)
        (cli.tmp_path / name / 'config.json').write_text(json.dumps(dict(mode='F' if full else 'P', full=full)))
        for checkpoint in ('trainable.safetensors', 'best.safetensors', 'state.pt'):
            (cli.tmp_path / name / checkpoint).write_bytes(b'')
    cli('--weights', cli.tmp_path / 'P_run', code=2, expect=[
        f"--weights {cli.tmp_path / 'P_run'} is a P run's folder, whose checkpoints hold only what it trained, not a "
        f"backbone; start from the weights it started from (its config.json's weights_id), or continue it with "
        f"--resume {cli.tmp_path / 'P_run'}"])
    cli('--weights', cli.tmp_path / 'F_run', code=2, expect=[
        f"--weights {cli.tmp_path / 'F_run'} is a folder; pass the checkpoint file in it, e.g. "
        f"{cli.tmp_path / 'F_run' / 'trainable.safetensors'}"])
    cli('--weights', cli.tmp_path / 'P_run' / 'state.pt', code=1, expect=[
        f"error: --weights {cli.tmp_path / 'P_run' / 'state.pt'} is a vpt run's resume state, not weights; continue "
        f"that run with --resume {cli.tmp_path / 'P_run'}"])


@pytest.mark.parametrize('name', ['w.safetensors', 'ViT-B_16.npz'])
def test_weights_the_user_may_not_read(cli, monkeypatch, name):
    """Another user's checkpoint (chmod 600) was 'No such file or directory' (safetensors' words), or an .npz 'not an
    .npz archive'. Denial is played (the tests run as root, whom chmod denies nothing)."""
    path = cli.tmp_path / name
    path.write_bytes(b'')
    access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: access(p, mode, **kw) and str(p) != str(path))
    cli('--weights', path, code=2, expect=[f"--weights {path}: cannot read it (permission denied); make it readable "
                                           f"(chmod u+r, or ask its owner)"])


@pytest.mark.parametrize('suffix', ['safetensors', 'pth'])
def test_weights_corrupt(cli, suffix):
    path = cli.tmp_path / f'corrupt.{suffix}'
    path.write_bytes(b'this is not a checkpoint' * 10)
    cli('--weights', path, expect=['cannot read --weights', str(path)])


@pytest.mark.parametrize('damage', ['truncated', 'whole model'])
def test_weights_unreadable_are_not_called_a_misfit(cli, damage):
    """An interrupted copy, or torch.save(model) instead of its state dict: the file cannot be read, which is not
    the same as weights that do not fit the model, and torch's advice to load with weights_only=False is left out."""
    model = timm.create_model('test_vit')
    path = cli.tmp_path / 'weights.pth'
    if damage == 'truncated':
        torch.save(model.state_dict(), path)
        path.write_bytes(path.read_bytes()[:100_000])
    else:
        torch.save(model, path)
    line = cli('--weights', path, expect=['cannot read --weights', str(path), 'torch.save(model.state_dict())'])
    assert 'does not fit' not in line and 'weights_only=False' not in line
    reason = line.split(f'--weights {path} (')[1].split('); it must be')[0]
    assert '. ' not in reason and '\x1b' not in reason, reason  # one sentence of torch's, without its terminal colours


@pytest.mark.parametrize('content', [b'this is not a checkpoint' * 10, 'arrays'])
def test_weights_npz_unreadable(cli, content):
    import numpy as np
    path = cli.tmp_path / 'ViT-B_16.npz'
    if content == 'arrays':
        np.savez(path, embedding=np.zeros(3))  # an .npz, but not of a ViT
    else:
        path.write_bytes(content)
    cli('--weights', path, expect=['cannot read --weights', str(path), 'ViT-B_16.npz',
                                   "no ViT patch embedding 'embedding/kernel'" if content == 'arrays' else
                                   '(not an .npz archive)'])


def test_weights_npz_of_another_architecture(cli):
    path = cli.tmp_path / 'ViT-S_16.npz'
    write_jax_npz(timm.create_model('vit_small_patch16_224', depth=2), path)  # 384-dim, 2 blocks; test_vit: 64, 6
    cli('--weights', path, expect=['does not fit --model test_vit', 'encoder blocks'])


@pytest.mark.parametrize('trained', ['prompts', 'linear', 'unfreeze', 'unfreeze_first', 'seed_recipe',
                                     'other_width'])
def test_weights_of_a_vpt_run_without_its_backbone(cli, trained):
    """A P run's trainable.safetensors holds prompts and head (a linear probe's the head, --unfreeze a few tensors
    more, README's seed recipe the patch embedding among them): no whole backbone to start from, and no note that
    one was loaded. A --full True run's is one (test_model). Its first block alone is no whole ViT either, and one of
    a ViT of another width is named as what it is, not as a size mismatch."""
    from safetensors.torch import save_file
    from model import PromptedViT, set_trainable
    from train import trainable_tensors
    vit = (timm.create_model('vit_small_patch16_224', depth=1, num_classes=3) if trained == 'other_width' else
           timm.create_model('test_vit', num_classes=3))  # 384-dim, test_vit is 64-dim
    model = PromptedViT(vit, 0 if trained == 'linear' else 4)
    set_trainable(model, full=False, unfreeze=dict(unfreeze=['blocks.5.*', 'norm.*'], unfreeze_first=['blocks.0.*'],
                                                   other_width=['blocks.0.*'], seed_recipe=[
        'patch_embed.*', 'pos_embed', 'cls_token', 'norm.*']).get(trained, ()))
    path = cli.tmp_path / 'trainable.safetensors'
    save_file(trainable_tensors(model), path)
    cli('--weights', path, expect=[f"--weights {path} is a vpt run's checkpoint of only what that run trained, not a "
                                   "whole backbone (only a --full True run's holds one)", "config.json's weights_id",
                                   '--resume RUN'])


def full_run_checkpoint(folder, vit, model_name):
    """A --full True run's trainable.safetensors (its whole ViT under 'vit.') in a run directory whose config.json
    names the --model it trained."""
    from safetensors.torch import save_file
    from model import PromptedViT, set_trainable
    from train import trainable_tensors
    model = PromptedViT(vit, 0)
    set_trainable(model, full=True)
    os.makedirs(folder)
    save_file(trainable_tensors(model), folder / 'trainable.safetensors')
    (folder / 'config.json').write_text(json.dumps(dict(model=model_name, full=True, prompts=0)))
    return folder / 'trainable.safetensors'


def test_weights_of_a_full_run_of_another_model_name_its_model(cli):
    """README's two steps (an upstream --full True run, then --weights its trainable.safetensors) with an upstream
    --model other than the default: the refusal says which --model the file's run trained."""
    path = full_run_checkpoint(cli.tmp_path / 'upstream', timm.create_model('vit_small_patch16_224', depth=1,
                                                                             num_classes=3), 'vit_small_patch16_224')
    line = cli('--weights', path, expect=['does not fit --model test_vit', 'size mismatch for',
                                          'the run that wrote it trained --model vit_small_patch16_224: pass --model '
                                          'vit_small_patch16_224'])
    assert '.;' not in line  # torch's sentence ends in a full stop: the hint follows it as one clause


def test_weights_of_a_full_run_with_fewer_blocks_is_not_called_partial(cli):
    """A --full True run's checkpoint holds a whole backbone: one of a shallower ViT of the same width does not fit,
    which is not 'only what that run trained'."""
    path = full_run_checkpoint(cli.tmp_path / 'upstream', timm.create_model('test_vit', depth=3, num_classes=3),
                               'shallow_vit')
    line = cli('--weights', path, expect=['does not fit --model test_vit', 'blocks.3.', 'are not in it',
                                          'the run that wrote it trained --model shallow_vit'])
    assert 'only what that run trained' not in line


@pytest.mark.parametrize('config', ['{"model": "vit_small_patch16_2', '["vit_small_patch16_224"]', '{"full": true}'],
                         ids=['cut_short', 'a_list', 'no_model'])
def test_weights_of_a_full_run_beside_a_config_json_that_names_no_model(cli, config):
    """The --model hint reads the config.json beside the file: one cut short, not an object, or without 'model' (not
    main.py's) leaves the refusal without a hint, still one line."""
    path = full_run_checkpoint(cli.tmp_path / 'upstream', timm.create_model('vit_small_patch16_224', depth=1,
                                                                             num_classes=3), 'vit_small_patch16_224')
    (cli.tmp_path / 'upstream' / 'config.json').write_text(config)
    line = cli('--weights', path, expect=['does not fit --model test_vit', 'size mismatch for'])
    assert 'the run that wrote it' not in line and '--model None' not in line


def test_weights_of_a_timm_checkpoint_beside_a_runs_config_json_get_no_run_hint(cli):
    """Only a vpt run's own checkpoint is what the config.json beside it trained: a timm checkpoint saved into a
    run directory (or any folder with such a config.json) was not written by that run."""
    folder = cli.tmp_path / 'upstream'
    os.makedirs(folder)
    torch.save(timm.create_model('vit_small_patch16_224', depth=1).state_dict(), folder / 'vit_small.pth')
    (folder / 'config.json').write_text(json.dumps(dict(model='vit_small_patch16_224', full=True)))
    line = cli('--weights', folder / 'vit_small.pth', expect=['does not fit --model test_vit', 'size mismatch for'])
    assert 'the run that wrote it' not in line


def test_weights_of_another_architecture(cli):
    path = cli.tmp_path / 'vit_small.pth'
    torch.save(timm.create_model('vit_small_patch16_224', depth=2).state_dict(), path)  # 384-dim, test_vit is 64-dim
    line = cli('--weights', path, expect=['does not fit --model test_vit', 'size mismatch for', '384])'])
    assert 'blocks.' in line or 'patch_embed' in line or 'cls_token' in line


def test_paths_are_checked_before_torch_loads_and_in_order(tmp_path, capsys):
    """A missing --dataset folder or --weights file is a usage error of parse_args (so sweep.py refuses it before
    writing anything); with --resume, a typo in a --dataset given for a moved copy is named as such."""
    import main
    for argv, expected in (
            (['--dataset', 'nowhere'], "--dataset 'nowhere' is neither cifar10, cifar100 nor a folder; a folder "
                                       "dataset needs train/<class>/* and test/<class>/* images"),
            (['--dataset', 'CIFAR10'], "--dataset 'CIFAR10' is neither cifar10, cifar100 nor a folder; did you mean "
                                       "cifar10?"),
            (['--epochs', '3', '--wieght_decay', '0'], "unrecognized arguments: --epochs 3 --wieght_decay 0; did you "
                                                       "mean --epoch --weight_decay?"),
            (['--weights', 'nope.npz'], '--weights nope.npz: no such file'),
            (['--eval_only', '--dataset', 'nowhere'], '--eval_only needs --resume RUN_DIR'),
            (['--resume', tmp_path / 'run', '--dataset', 'nowhere'], "--dataset 'nowhere' is neither")):
        os.makedirs(tmp_path / 'run', exist_ok=True)
        (tmp_path / 'run' / 'state.pt').write_text('{}')
        (tmp_path / 'run' / 'config.json').write_text(json.dumps(dict(model='test_vit', dataset='ds', full=False,
                                                                      prompts=4, epoch=1, classes=['a', 'b'])))
        with pytest.raises(SystemExit) as error:
            main.parse_args([str(arg) for arg in argv])
        assert error.value.code == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and expected in err, err


def test_a_data_error_is_said_by_the_first_process_of_every_machine(monkeypatch, capsys):
    """Under torchrun on several machines, the one whose copy of the data is bad must say why it stopped."""
    import main
    for rank, local_rank, printed in (('0', '0', True), ('3', '0', True), ('1', '1', False)):
        monkeypatch.setenv('RANK', rank)
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        with pytest.raises(SystemExit):
            main.say_once('error: cannot read 1 of 25 images')
        assert (capsys.readouterr().err == 'error: cannot read 1 of 25 images\n') == printed


def test_no_process_but_the_first_of_a_machine_repeats_an_error(monkeypatch, capsys):
    """torchrun --nproc_per_node=8: local ranks 1..7 stay quiet, so an error is one line, not eight."""
    import main
    for local_rank in ('1', '2', '7'):
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        with pytest.raises(SystemExit) as stopped:
            main.say_once('error: cannot read 1 of 25 images')
        assert stopped.value.code == 1 and capsys.readouterr().err == '', local_rank


def test_dataset_folder_without_splits(cli):
    os.makedirs(cli.tmp_path / 'flat' / 'cat')
    cli('--dataset', cli.tmp_path / 'flat', expect=['no train/ folder', 'train/<class>'])
    train_dir = os.path.join(cli.tiny_dataset, 'train')  # one level too deep: the parent is the dataset
    cli('--dataset', train_dir, expect=[f"--dataset {train_dir} has no train/ folder (its parent {cli.tiny_dataset} "
                                        f"has both: pass --dataset {cli.tiny_dataset}); a folder dataset needs"])
    for folder in ('half/train/a', 'half/ds/train/a'):  # a parent with train/ alone is no dataset either
        os.makedirs(cli.tmp_path / folder)
    line = cli('--dataset', cli.tmp_path / 'half' / 'ds', expect=['has no test/ folder (or pass --test_split 0.2, say, '
                                                                 'to hold out a fraction of train/ as the test set); a '
                                                                 'folder dataset needs'])
    assert 'its parent' not in line and 'its subfolder' not in line
    above = os.path.dirname(cli.tiny_dataset)  # one level too shallow: an archive extracted into a folder of its own
    cli('--dataset', above, expect=[f"--dataset {above} has no train/ folder (its subfolder {cli.tiny_dataset} has "
                                    f"both: pass --dataset {cli.tiny_dataset}); a folder dataset needs"])


def test_test_split_mistakes(cli):
    root = write_folder_dataset(cli.tmp_path / 'ds', classes=('a', 'b'), train_per_class=4, test_per_class=2)
    cli('--dataset', root, '--test_split', 0.25, code=1, expect=[
        f"--dataset {root} has a test/ folder, and --test_split 0.25 would hold out another test set from train/; "
        f"drop --test_split to test on test/"])
    cli('--dataset', 'cifar10', '--test_split', 0.25, code=2,
        expect=["--test_split is for a folder dataset without test/; cifar10 has its own test set"])
    shutil.rmtree(os.path.join(root, 'test'))
    cli('--dataset', root, code=1, expect=[f"--dataset {root} has no test/ folder (or pass --test_split 0.2, say, to "
                                           f"hold out a fraction of train/ as the test set)"])
    cli('--dataset', root, '--test_split', 0.01, code=1, expect=[
        "--test_split 0.01 of 8 images holds out none (it is rounded per class, keeping one to train on); pick a "
        "larger fraction"])


def test_dataset_archive_says_to_extract_it(cli):
    archive = cli.tmp_path / 'pets.tar.gz'
    archive.write_bytes(b'')
    cli('--dataset', archive, code=2, expect=[f"--dataset '{archive}' is neither cifar10, cifar100 nor a folder; it is "
                                              f"an archive: extract it, then pass the folder that holds train/ and test/"])


def test_dataset_with_empty_class(cli):
    root = write_folder_dataset(cli.tmp_path / 'ds', classes=('a', 'b'), train_per_class=4, test_per_class=2)
    for f in os.listdir(os.path.join(root, 'train', 'b')):
        os.remove(os.path.join(root, 'train', 'b', f))
    cli('--dataset', root, expect=[os.path.join('train', 'b'), 'has no images'])


def test_unwritable_data_dir(cli):
    blocker = cli.tmp_path / 'a_file'
    blocker.write_text('x')  # a directory under a regular file cannot be created, even by root
    cli('--dataset', 'cifar10', '--data_dir', blocker / 'data', expect=['cannot write to --data_dir', 'writable'])


def test_unwritable_log_dir(cli):
    blocker = cli.tmp_path / 'a_file'
    blocker.write_text('x')
    cli('--log_dir', blocker / 'logs', expect=['cannot write to --log_dir', 'writable --log_dir'])


def test_name_of_existing_run(cli):
    cli('--name', 'earlier_run', expect=['already exists', '--name', '--resume'])


def test_resume_without_checkpoint(cli):
    cli('--resume', cli.log_dir / 'earlier_run', expect=['--resume', 'no checkpoint'], code=2)


def test_resume_of_a_run_killed_before_its_first_checkpoint(cli):
    """A run killed (SIGKILL, power) after writing config.json but before state.pt has nothing to resume or evaluate:
    the same one line as any directory without a checkpoint, not an error about a missing state.pt or a traceback."""
    (cli.log_dir / 'earlier_run' / 'config.json').write_text('{"epoch": 1}')
    for action in ([], ['--eval_only']):
        cli('--resume', cli.log_dir / 'earlier_run', *action, code=2,
            expect=[f"--resume {cli.log_dir / 'earlier_run'}: no checkpoint yet: the run is still starting (state.pt "
                    f"is written as training begins), or was killed before; resume it once it has one, or start a new "
                    f"run"])
    (cli.log_dir / 'earlier_run' / 'trainable.safetensors').write_bytes(b'')  # a run that trained: state.pt removed
    cli('--resume', cli.log_dir / 'earlier_run', code=2,
        expect=[f"--resume {cli.log_dir / 'earlier_run'}: its state.pt is missing (a run writes it as training "
                f"begins): restore it, or start a new run"])


def test_resume_of_what_is_not_a_run_says_what_to_pass(cli):
    """A typo, the log folder itself or a sweep's folder each get their own fix, not one 'no checkpoint there'."""
    logs = cli.log_dir
    for age, name in enumerate(('P_run_2', 'P_run_1')):  # P_run_2 is the newest
        os.makedirs(logs / name)
        (logs / name / 'state.pt').write_bytes(b'')
        (logs / name / 'config.json').write_text('{}')
        os.utime(logs / name / 'state.pt', (1e9 - age, 1e9 - age))
    cli('--resume', logs / 'P_rnu_1', code=2, expect=[f"--resume {logs / 'P_rnu_1'}: no such directory; did you mean "
                                                      f"{logs / 'P_run_1'}?"])
    cli('--resume', logs, code=2, expect=[f"--resume {logs}: a folder of 2 runs, not a run: pass one of them, such as "
                                          f"the newest, {logs / 'P_run_2'}"])
    (logs / 'sweep.json').write_text('{}')
    cli('--resume', logs, '--eval_only', code=2,
        expect=[f"--resume {logs}: a sweep's directory, not a run's: re-launch the sweep's own command (sweep.json's "
                f"command) to resume its runs, or pass one run of it, {logs / '<run>'}"])
    cli('--resume', cli.tmp_path / 'nowhere' / 'run', code=2,
        expect=['no such directory; pass a run directory such as logs/<run> that an earlier run wrote'])
    cli('--resume', logs / 'P_run_1' / 'config.json', code=2,  # tab completion went one step too far
        expect=[f"--resume {logs / 'P_run_1' / 'config.json'}: a file, not a run's directory: pass the folder that "
                f"holds it, {logs / 'P_run_1'}"])
    cli('--resume', logs / 'sweep.json', code=2, expect=["a file; pass a run directory such as logs/<run>"])


def test_no_network_for_cifar_download(cli, monkeypatch):
    for var in ('https_proxy', 'HTTPS_PROXY', 'http_proxy', 'HTTP_PROXY'):
        monkeypatch.setenv(var, 'http://127.0.0.1:9')  # a closed port: the download fails at once, as offline
    empty = cli.tmp_path / 'empty_data'
    os.makedirs(empty)
    cli('--dataset', 'cifar10', '--data_dir', empty, expect=['could not download cifar10', 'cifar-10-python.tar.gz',
                                                            'cifar-10-batches-py', '--dataset FOLDER'])
    os.makedirs(cli.tmp_path / 'cwd' / 'cifar10' / 'train')  # the user's own folder, named like the CIFAR dataset
    monkeypatch.chdir(cli.tmp_path / 'cwd')
    assert 'the folder cifar10/ here' not in cli('--dataset', 'cifar10', '--data_dir', empty, expect=[])  # no test/
    os.makedirs(cli.tmp_path / 'cwd' / 'cifar10' / 'test')
    cli('--dataset', 'cifar10', '--data_dir', empty,
        expect=['could not download cifar10', 'the folder cifar10/ here holds train/ and test/: --dataset ./cifar10'])


@pytest.mark.parametrize('damaged', ['cifar-10-python.tar.gz', 'cifar-10-batches-py/data_batch_1'])
def test_a_damaged_cifar_copy_is_named_not_asked_for(cli, monkeypatch, damaged):
    """A truncated archive or batch file is in --data_dir: "put cifar-10-python.tar.gz into DIR" would send the user
    round in a circle; the error says the copy there failed torchvision's checksum."""
    for var in ('https_proxy', 'HTTPS_PROXY', 'http_proxy', 'HTTP_PROXY'):
        monkeypatch.setenv(var, 'http://127.0.0.1:9')
    data_dir = cli.tmp_path / 'damaged_data'
    os.makedirs((data_dir / damaged).parent)
    (data_dir / damaged).write_bytes(b'the first bytes of a download that stopped')
    cli('--dataset', 'cifar10', '--data_dir', data_dir,
        expect=[f"{damaged.split('/')[0]} in --data_dir {data_dir} failed torchvision's checksum check",
                'replace it with the official cifar-10-python.tar.gz', 'or remove it'])


def test_no_network_for_cifar_download_leaves_no_folder(cli, monkeypatch):
    for var in ('https_proxy', 'HTTPS_PROXY', 'http_proxy', 'HTTP_PROXY'):
        monkeypatch.setenv(var, 'http://127.0.0.1:9')
    # the folders the download would have filled are made for it, and removed again when it fails (snapshot check)
    cli('--dataset', 'cifar10', '--data_dir', cli.tmp_path / 'new' / 'data', expect=['could not download cifar10'])


def test_no_network_for_pretrained_weights(cli):
    # conftest sets HF_HUB_OFFLINE=1: the hub download fails through the same path as with no network
    cli('--pretrained', 'True', expect=['could not download the pretrained weights', '--weights FILE'])


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
@pytest.mark.parametrize('device', ['cuda', 'cuda:1'])
def test_device_cuda_without_cuda(cli, device):
    """An indexed GPU on a machine without CUDA is the same mistake: not 'only 0 CUDA device(s) exist'."""
    cli('--device', device, expect=[f'--device {device} but CUDA is not available', '--device cpu'])


def test_batch_larger_than_data(cli):
    """--train_samples is named only where it is given: all the images are read without it, none to add."""
    line = cli('--batch_size', 1000, expect=['--batch_size 1000 is larger than the 48 training images; lower '
                                              '--batch_size, e.g. --batch_size 8'])
    assert line.endswith('e.g. --batch_size 8'), line
    cli('--batch_size', 40, '--train_samples', 30, expect=['--batch_size 40 is larger than the 30 training images; '
                                                           'lower --batch_size, e.g. --batch_size 4 (or raise '
                                                           '--train_samples)'])


def test_the_suggested_batch_size_gives_four_steps_an_epoch_and_divides_by_the_processes(monkeypatch):
    """A power of two with at least 4 full batches an epoch (the last incomplete one is dropped), at least 1, and
    under torchrun a multiple of the process count, which --batch_size must be."""
    import main
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert [main.small_batch(n) for n in (1, 7, 8, 30, 64, 127, 1000)] == [1, 1, 2, 4, 16, 16, 128]
    monkeypatch.setenv('WORLD_SIZE', '3')
    assert [main.small_batch(n) for n in (1, 8, 30, 100, 1000)] == [3, 3, 3, 15, 126]  # never below one per process


def test_eval_only_without_resume(cli):
    cli('--eval_only', expect=['--eval_only needs --resume'], code=2)


def test_val_split_out_of_range(cli):
    cli('--val_split', 1.5, expect=['--val_split', '[0, 1)'], code=2)


@pytest.mark.parametrize('flag', ['--val_split', '--prompt_dropout'])
def test_a_fraction_of_one_is_refused(cli, flag):
    """--val_split 1 would leave nothing to train on, --prompt_dropout 1 drop every prompt: [0, 1) excludes 1."""
    cli(flag, 1, expect=[flag, 'must be in [0, 1), got 1'], code=2)


def test_eval_only_and_predict_together_are_refused(cli):
    for name in ('config.json', 'state.pt'):  # a run to act on (its config.json is all the parser reads)
        (cli.log_dir / 'earlier_run' / name).write_text('{}')
    cli('--resume', cli.log_dir / 'earlier_run', '--eval_only', '--predict', cli.tiny_dataset,
        expect=['--eval_only and --predict are two actions; run them one at a time'], code=2)


def test_val_split_too_small_for_the_data(cli):
    cli('--val_split', 0.01, expect=['--val_split 0.01 of 48 training images leaves 0 for validation'])


def test_unfreeze_pattern_matching_nothing(cli):
    cli('--unfreeze', 'patch_embed', expect=["--unfreeze pattern 'patch_embed' matches no parameter", 'patch_embed.*'])


def test_unfreeze_with_full(cli):
    cli('--unfreeze', 'norm.*', '--full', 'True', expect=['--unfreeze adds to what --full False trains'], code=2)


def test_sgd_needs_an_lr(cli):
    cli('--optimizer', 'sgd', expect=['--optimizer sgd has no default lr', '--lr'], code=2)


@pytest.mark.parametrize('flags,expect', [(['--checkpoint', 'best'], '--checkpoint goes with --eval_only or --predict'),
                                          (['--predict', 'x.png'], '--predict needs --resume'),
                                          (['--out', 'p.csv'], '--out goes with --predict')])
def test_action_flags_alone(cli, flags, expect):
    cli(*flags, expect=[expect], code=2)


def test_best_checkpoint_of_a_run_without_val_split(cli, capsys):
    from conftest import run_main
    argv = [*TINY, '--dataset', write_folder_dataset(cli.tmp_path / 'ds', train_per_class=4, test_per_class=2),
            '--epoch', 1, '--batch_size', 8, '--log_dir', cli.tmp_path / 'runs', '--name', 'noval']
    assert run_main(argv, capsys)[0] == 0
    code, _, err = run_main(['--eval_only', '--resume', cli.tmp_path / 'runs' / 'noval', '--checkpoint', 'best'], capsys)
    assert code == 2 and err.strip().count('\n') == 0 and 'best.safetensors needs a run with --val_split > 0' in err
    assert "use --checkpoint last, this run's only checkpoint" in err  # the fix, not only the cause
    argv = [*argv[:-2], '--name', 'val', '--val_split', 0.25]
    assert run_main(argv, capsys)[0] == 0
    best = cli.tmp_path / 'runs' / 'val' / 'best.safetensors'
    os.remove(best)
    code, _, err = run_main(['--eval_only', '--resume', cli.tmp_path / 'runs' / 'val', '--checkpoint', 'best'], capsys)
    assert code == 2 and err.strip() == (
        f"main.py: error: {best} does not exist; the run has finished epochs, so it was removed: restore it, or use "
        f"--checkpoint last (python main.py --help lists the flags)")
    (cli.tmp_path / 'runs' / 'val' / 'metrics.csv').write_text('epoch,train_loss\n')  # as before its first epoch ended
    code, _, err = run_main(['--eval_only', '--resume', cli.tmp_path / 'runs' / 'val', '--checkpoint', 'best'], capsys)
    assert code == 2 and f"{best} does not exist; it is written as the run's first epoch ends, and none has yet: " \
                         f"use --checkpoint last" in err
    code, _, err = run_main(['--resume', cli.tmp_path / 'runs' / 'val', '--checkpoint', 'best'], capsys)
    assert code == 2 and '--checkpoint goes with --eval_only or --predict' in err  # that mistake first
    os.remove(cli.tmp_path / 'runs' / 'noval' / 'trainable.safetensors')
    code, _, err = run_main(['--eval_only', '--resume', cli.tmp_path / 'runs' / 'noval'], capsys)
    assert code == 1 and err.strip() == (f"error: {cli.tmp_path / 'runs' / 'noval' / 'trainable.safetensors'} does "
                                         f"not exist; a run writes it when it has finished its setup, so this run "
                                         f"directory is incomplete")


@pytest.mark.parametrize('flags,code,expect', [(['--epoch', '0'], 2, '--epoch'),
                                                (['--model', 'nope', '--device', 'cpu'], 1, 'unknown --model')])
def test_real_process_prints_one_line(tmp_path, flags, code, expect):
    result = run_cli([*flags, '--log_dir', tmp_path / 'logs'])
    assert result.returncode == code
    assert result.stderr.strip().count('\n') == 0 and expect in result.stderr and 'Traceback' not in result.stderr
    assert not os.path.exists(tmp_path / 'logs')


def test_an_environment_older_than_the_requirements_is_one_line(tiny_dataset, tmp_path):
    """pip keeps an installed timm that met an older floor: timm 1.0.15 crashed in the kv path (no Attention.norm),
    1.0.16-1.0.20 could not import huggingface_hub 2 and called every download failed. One line names the fix."""
    import subprocess
    import sys
    from conftest import REPO
    from model import check_versions
    check_versions(dict(torch='2.4.0', timm='1.0.22rc1'))  # the floors themselves, a release candidate above one
    with pytest.raises(SystemExit, match=r"^error: vpt needs timm >= 1\.0\.21, and this Python has 1\.0\.20; pip "
                                         r"install -r requirements\.txt$"):
        check_versions(dict(torch='2.14.1+cu130', timm='1.0.20'))
    with pytest.raises(SystemExit, match='needs torch >= 2.4, and this Python has 2.3.1'):
        check_versions(dict(torch='2.3.1', timm='1.0.31'))
    as_if_old = ("import runpy, sys, timm; timm.__version__ = '1.0.15'; sys.argv = ['main.py', *sys.argv[1:]]; "
                 "runpy.run_path('main.py', run_name='__main__')")
    result = subprocess.run([sys.executable, '-c', as_if_old, *TINY, '--dataset', tiny_dataset, '--log_dir', tmp_path],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == ("error: vpt needs timm >= 1.0.21, and this Python has 1.0.15; "
                                                        "pip install -r requirements.txt\n"), result.stderr
    assert os.listdir(tmp_path) == []


def test_a_system_without_fcntl_is_one_line_naming_wsl(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Windows has no fcntl, which locks run directories: one line saying so before anything is written, not an
    ImportError's traceback once a run directory exists."""
    import sys
    from conftest import run_main
    monkeypatch.setitem(sys.modules, 'fcntl', None)  # `import fcntl` raises ImportError, as on Windows
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--log_dir', tmp_path], capsys)
    assert code == 1 and err == ("error: vpt needs a POSIX system such as Linux or macOS (it locks run directories "
                                 "with fcntl); on Windows, run it in WSL2\n"), err
    assert os.listdir(tmp_path) == []


def test_json_nested_too_deep_reads_as_a_damaged_file_not_a_recursion_error(tmp_path):
    """json.load raises RecursionError (not a ValueError) on a file of 100,000 '['. The readers that take a damaged
    file as none (sweep.py's trial summaries, the best checkpoint's per-class view, --weights's run config) now do so
    for it too."""
    (tmp_path / 'summary.json').write_text('[' * 100000 + ']' * 100000)
    (tmp_path / 'config.json').write_text('[' * 100000 + ']' * 100000)
    assert sweep.read_json(tmp_path / 'summary.json') is None
    assert train.best_view(tmp_path) == {}
    assert model._run_model_hint(str(tmp_path / 'weights.safetensors'), 'test_vit', whole=True) == ''
