"""The model: ViT-B/4 geometry, weights loading through timm's resampling, prompt placement, trainable sets,
and the exactness of the KV-only prompt path against the naive one."""
import inspect
import os
import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from conftest import REPO, write_jax_npz
from model import PromptedViT, count_params, create_vit, set_trainable

VIT_B = 'vit_base_patch16_224.augreg_in21k'


@pytest.fixture(scope='module')
def vit_b4():
    torch.manual_seed(0)
    return PromptedViT(create_vit(VIT_B, 10, 32, 4, pretrained=False), num_prompts=50)


def test_vit_b4_geometry(vit_b4):
    proj = vit_b4.vit.patch_embed.proj
    assert proj.kernel_size == (4, 4) and proj.stride == (4, 4)
    assert vit_b4.vit.patch_embed.num_patches == 64
    assert vit_b4.vit.pos_embed.shape == (1, 65, 768)
    assert vit_b4.prompts.tokens.shape == (12, 50, 768)
    assert vit_b4.vit.head.out_features == 10


def test_trainable_counts_per_mode(vit_b4):
    backbone_and_head = 85_152_010  # ViT-B/4: 4x4 patch embedding, 65 positions, 12 blocks, final norm, 10-way head
    prompt_params = 12 * 50 * 768
    set_trainable(vit_b4, full=False)
    assert count_params(vit_b4, trainable_only=True) == 468_490 == prompt_params + 768 * 10 + 10  # P
    assert count_params(vit_b4) == backbone_and_head + prompt_params  # all of them, trainable or frozen
    trainable = {name for name, p in vit_b4.named_parameters() if p.requires_grad}
    assert trainable == {'prompts.tokens', 'vit.head.weight', 'vit.head.bias'}
    set_trainable(vit_b4, full=True)
    assert count_params(vit_b4, trainable_only=True) == count_params(vit_b4) == backbone_and_head + prompt_params  # P+F
    no_prompts = PromptedViT(vit_b4.vit, num_prompts=0)
    set_trainable(no_prompts, full=True)
    assert count_params(no_prompts, trainable_only=True) == backbone_and_head  # F
    set_trainable(no_prompts, full=False)
    assert count_params(no_prompts, trainable_only=True) == 7_690  # linear probe


def test_the_backbone_has_no_dropout_of_its_own(vit_b4):
    """Official VPT keeps its frozen encoder in eval() while prompts train; here the whole model is in train() mode,
    which computes the same only because the ViT-B/4 has no dropout, drop-path or patch dropout: prompt dropout
    (--prompt_dropout) is the one random op."""
    random_ops = [name for name, module in vit_b4.named_modules()
                  if isinstance(module, (torch.nn.Dropout, timm.layers.DropPath, timm.layers.PatchDropout))
                  and getattr(module, 'p', getattr(module, 'drop_prob', getattr(module, 'prob', 0))) > 0]
    assert random_ops == []


def test_prompt_init_uses_real_patch_size(vit_b4):
    bound = (6 / (3 * 4 * 4 + 768)) ** 0.5
    tokens = vit_b4.prompts.tokens
    assert tokens.abs().max() <= bound
    assert tokens.abs().max() > 0.95 * bound  # uniform over the whole range, not a narrower one
    assert abs(tokens.std().item() - bound / 3 ** 0.5) < 0.01 * bound


@pytest.mark.parametrize('suffix', ['safetensors', 'pth'])
def test_weights_file_goes_through_timm_resampling(tmp_path, suffix):
    source = timm.create_model('test_vit', img_size=224, num_classes=21)  # a ViT/16 at 224: 14x14 position grid
    state = source.state_dict()
    path = tmp_path / f'vit16.{suffix}'
    if suffix == 'safetensors':
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    vit = create_vit('test_vit', 10, img_size=32, patch_size=4, weights=str(path))
    expected_patch = resample_patch_embed(state['patch_embed.proj.weight'], [4, 4])
    assert torch.equal(vit.patch_embed.proj.weight.data, expected_patch)
    expected_pos = resample_abs_pos_embed(state['pos_embed'], (8, 8), num_prefix_tokens=1)
    assert vit.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(vit.pos_embed.data, expected_pos)
    assert torch.equal(vit.blocks[3].mlp.fc1.weight, state['blocks.3.mlp.fc1.weight'])
    assert vit.head.out_features == 10  # a new head: the checkpoint's 21-way head is dropped


@pytest.mark.parametrize('file_classes', [1000, 21843])
def test_the_head_is_new_even_when_the_class_counts_agree(tmp_path, file_classes):
    """timm keeps a checkpoint's classifier when its class count equals the model's (test_vit's pretrained cfg says
    1,000): a 1,000-class dataset would start from the file's head, the same for every --seed, and a file with another
    head size would be refused. The head is always new and seeded; the backbone still comes from the file."""
    assert timm.models.get_pretrained_cfg('test_vit').num_classes == 1000
    source = timm.create_model('test_vit', num_classes=file_classes)
    torch.save(source.state_dict(), tmp_path / 'weights.pth')
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vit = create_vit('test_vit', 1000, 32, 4, weights=str(tmp_path / 'weights.pth'))
        assert torch.equal(vit.blocks[2].attn.qkv.weight, source.blocks[2].attn.qkv.weight)
        heads.append(vit.head.weight.detach().clone())
    assert heads[0].shape == (1000, 64) and not torch.equal(heads[0], heads[1])
    if file_classes == 1000:
        assert not torch.equal(heads[0], source.head.weight)
    assert vit.pretrained_cfg['num_classes'] == 1000  # the cfg still describes the pretrained weights


def test_hub_weights_load_with_a_new_head_even_when_the_class_counts_agree(tmp_path, monkeypatch):
    """The default source of pretrained weights, the hub (here its offline cache, holding test_vit's file at 160 px):
    the backbone comes from it, resampled; its 1,000-class head is not kept for a 1,000-class dataset, the head is
    seeded like the rest."""
    import huggingface_hub.constants as constants
    from safetensors.torch import save_file
    snapshot = tmp_path / 'models--timm--test_vit.r160_in1k' / 'snapshots' / ('0' * 40)
    os.makedirs(snapshot)
    os.makedirs(snapshot.parent.parent / 'refs')
    (snapshot.parent.parent / 'refs' / 'main').write_text('0' * 40)
    source = timm.create_model('test_vit', img_size=160)
    save_file(source.state_dict(), snapshot / 'model.safetensors')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    torch.manual_seed(0)
    vit = create_vit('test_vit', 1000, 32, 4)
    assert torch.equal(vit.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert vit.pos_embed.shape == (1, 65, 64)
    assert not torch.equal(vit.head.weight, source.head.weight)
    torch.manual_seed(0)
    assert torch.equal(create_vit('test_vit', 1000, 32, 4).head.weight, vit.head.weight)


def load_both_ways(source, tmp_path, npz_name):
    """`source`'s weights through --weights as a JAX .npz named npz_name and as a timm state dict, each ViT-B/4-style
    at 32 px with 4 px patches and its new head seeded alike."""
    write_jax_npz(source, tmp_path / 'source.npz')  # numpy adds .npz to any other name, ViT.NPZ included
    os.rename(tmp_path / 'source.npz', tmp_path / npz_name)
    torch.save(source.state_dict(), tmp_path / 'source.pth')
    models = []
    for path in (tmp_path / npz_name, tmp_path / 'source.pth'):
        torch.manual_seed(0)
        models.append(create_vit('test_vit', 10, img_size=32, patch_size=4, weights=str(path)))
    return models


def test_jax_npz_weights_load_as_the_same_state_dict_would(tmp_path):
    """--weights ViT-B_16.npz (the file official VPT loads) gives exactly the model the same weights give as a timm
    state dict: same PI-resized patch embedding, same 8x8 position grid, same blocks, same seeded head."""
    torch.manual_seed(1)
    from_npz, from_state_dict = load_both_ways(timm.create_model('test_vit', img_size=224, num_classes=21), tmp_path,
                                               'ViT-T_16.npz')
    expected = from_state_dict.state_dict()
    loaded = from_npz.state_dict()
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name
    assert from_npz.pos_embed.shape == (1, 65, 64)
    assert not torch.equal(from_npz.blocks[0].attn.qkv.weight, timm.create_model('test_vit').blocks[0].attn.qkv.weight)
    assert 'state_dict' not in from_npz.pretrained_cfg  # the converted tensors are not kept alive a second time
    assert from_npz.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize('prompts', [0, 4])
def test_a_full_runs_checkpoint_is_the_backbone_of_another_run(tmp_path, capsys, prompts):
    """A --full True run's trainable.safetensors (F: its whole ViT under 'vit.'; P+F: its prompts besides) starts
    another run, on other data or at another patch size: its backbone loads and is resampled as any checkpoint's;
    its head and prompts belong to its own task and are not loaded, the prompts with a note."""
    from safetensors.torch import save_file
    from train import trainable_tensors
    torch.manual_seed(1)
    run_model = PromptedViT(timm.create_model('test_vit', img_size=32, patch_size=8, num_classes=3), prompts)
    set_trainable(run_model, full=True)
    path = tmp_path / 'trainable.safetensors'
    save_file(trainable_tensors(run_model), path)
    source = run_model.vit.state_dict()
    torch.manual_seed(0)
    vit = create_vit('test_vit', 10, img_size=32, patch_size=4, weights=str(path))
    assert torch.equal(vit.blocks[5].mlp.fc2.weight, source['blocks.5.mlp.fc2.weight'])
    assert torch.equal(vit.norm.weight, source['norm.weight']) and torch.equal(vit.cls_token, source['cls_token'])
    assert torch.equal(vit.patch_embed.proj.weight, resample_patch_embed(source['patch_embed.proj.weight'], [4, 4]))
    torch.testing.assert_close(vit.pos_embed.data, resample_abs_pos_embed(source['pos_embed'], (8, 8),
                                                                          num_prefix_tokens=1))
    assert vit.head.out_features == 10  # the run's 3-way head is not this run's
    err = capsys.readouterr().err
    assert (f"note: --weights {path} is a vpt run's checkpoint: its backbone is loaded, not its prompts" in err) == (
        prompts > 0), err


def test_a_checkpoint_with_some_vit_prefixed_keys_is_not_taken_for_a_runs(tmp_path):
    """Only a file whose every tensor is under 'vit.' or 'prompts.' is a vpt run's checkpoint: another one is a timm
    checkpoint, and its misplaced tensors are named."""
    state = {(f'vit.{name}' if name.startswith('blocks.0.') else name): tensor
             for name, tensor in timm.create_model('test_vit').state_dict().items()}
    torch.save(state, tmp_path / 'weights.pth')
    with pytest.raises(SystemExit) as error:
        create_vit('test_vit', 10, 32, 4, weights=str(tmp_path / 'weights.pth'))
    assert 'vit.blocks.0.' in str(error.value) and 'which the model has no place for' in str(error.value)
    assert "vpt run's checkpoint" not in str(error.value)


@pytest.mark.parametrize('change', ['deeper', 'shallower', 'avg_pool_norm'])
def test_weights_that_leave_tensors_unloaded_are_refused(tmp_path, change):
    """timm loads non-strictly when the head changes size and only logs what it could not place: a file that would
    leave backbone tensors at their random init, or drop some of its own, is refused with one line instead."""
    kwargs = dict(deeper=dict(depth=7), shallower=dict(depth=5), avg_pool_norm=dict(global_pool='avg'))[change]
    state = timm.create_model('test_vit', **kwargs).state_dict()
    expected = dict(deeper=['it holds blocks.6.norm1.weight, blocks.6.norm1.bias, blocks.6.attn.qkv.weight and 9 '
                            'more, which the model has no place for'],  # blocks.6's 12 tensors: 3 named
                    shallower=["the model's blocks.5.", 'not in it'],
                    avg_pool_norm=["the model's norm.weight, norm.bias are not in it", 'fc_norm.weight'])[change]
    torch.save(state, tmp_path / 'weights.pth')
    with pytest.raises(SystemExit) as error:
        create_vit('test_vit', 10, 32, 4, weights=str(tmp_path / 'weights.pth'))
    message = str(error.value)
    assert message.startswith(f'error: --weights {tmp_path / "weights.pth"} does not fit --model test_vit: ')
    assert '\n' not in message
    for text in expected:
        assert text in message, message


def _block_inputs(model, images):
    seen = []
    hooks = [block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
             for block in model.vit.blocks]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return seen


def test_each_layer_sees_its_own_prompts():
    torch.manual_seed(0)
    n = 5
    model = PromptedViT(create_vit('test_vit', 10, 32, 4, pretrained=False), n, prompt_impl='naive').eval()
    images = torch.randn(2, 3, 32, 32)
    inputs = _block_inputs(model, images)
    assert len(inputs) == 6
    for layer, x in enumerate(inputs):
        assert x.shape == (2, 1 + n + 64, 64)
        assert torch.equal(x[:, 1:1 + n], model.prompts.tokens[layer].expand(2, -1, -1))  # after CLS, replaced per layer
    with torch.no_grad():
        model.prompts.tokens[3] += 1.0
    changed = _block_inputs(model, images)
    for layer in range(6):  # layer 3's prompts reach layer 3 and what follows it, never the layers before
        assert torch.equal(changed[layer], inputs[layer]) == (layer < 3)


def test_shallow_prompts_are_carried_through():
    torch.manual_seed(0)
    model = PromptedViT(create_vit('test_vit', 10, 32, 4, pretrained=False), 3, deep=False).eval()
    assert model.prompt_impl == 'naive' and model.prompts.tokens.shape == (1, 3, 64)
    inputs = _block_inputs(model, torch.randn(2, 3, 32, 32))
    assert torch.equal(inputs[0][:, 1:4], model.prompts.tokens[0].expand(2, -1, -1))
    assert not torch.equal(inputs[1][:, 1:4], inputs[0][:, 1:4])  # layer 1 reads layer 0's prompt outputs


UNFREEZE_ALL_BUT_BLOCKS = ['patch_embed.*', 'pos_embed', 'cls_token', 'norm.*']


def tiny_vit(**kwargs):
    """timm's test_vit at 32x32 with 4x4 patches: 6 blocks of width 64, 64 patches; no dropout of its own."""
    if kwargs:  # timm directly: create_vit would force global_pool='token'
        return timm.create_model('test_vit', img_size=32, patch_size=4, num_classes=10, **kwargs)
    return create_vit('test_vit', 10, 32, 4, pretrained=False)


def forward_backward(model, images, labels, seed=0):
    """Logits and the gradient of every trainable tensor; the seed fixes the prompt dropout masks."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(result, expected):
    (logits, grads), (logits_expected, grads_expected) = result, expected
    torch.testing.assert_close(logits, logits_expected, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_expected.keys()
    for name in grads_expected:
        torch.testing.assert_close(grads[name], grads_expected[name], rtol=1e-4, atol=1e-6, msg=name)


def both_paths(model, images, labels):
    """{'naive': ..., 'kv': ...}: forward_backward through each prompt path of the same model."""
    results = {}
    for impl in ('naive', 'kv'):
        model.prompt_impl = impl
        results[impl] = forward_backward(model, images, labels)
    return results


@pytest.mark.parametrize('num_prompts', [1, 7, 50])
@pytest.mark.parametrize('trainable', ['P', 'F', 'P+unfreeze'])
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train-dropout'])
def test_kv_path_matches_naive(num_prompts, trainable, train):
    """Logits and every trainable gradient of the KV-only path equal the naive path (fp32). In train mode with
    prompt dropout, both paths draw the masks once, before the blocks, from the same RNG state."""
    torch.manual_seed(0)
    vit = tiny_vit()
    assert all(m.p == 0 for m in vit.modules() if isinstance(m, torch.nn.Dropout))  # only the prompts draw masks
    model = PromptedViT(vit, num_prompts, prompt_dropout=0.3 if train else 0.0)
    set_trainable(model, trainable == 'F', UNFREEZE_ALL_BUT_BLOCKS if trainable == 'P+unfreeze' else ())
    model.train(train)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    results = both_paths(model, images, labels)
    assert_same(results['kv'], results['naive'])
    logits, grads = results['naive']
    assert len(grads) == sum(p.requires_grad for p in model.parameters())
    assert grads['prompts.tokens'].abs().amax(dim=(1, 2)).min() > 0  # every layer's prompts get a gradient
    if train:  # the masks were really drawn: without them (eval) the logits differ
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model(images), logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('options, train', [
    (dict(qk_norm=True), False), (dict(init_values=0.5), False), (dict(scale_attn_norm=True), False),
    (dict(qkv_bias=False), False), (dict(no_embed_class=True), False), (dict(attn_drop_rate=0.2), False),
    (dict(drop_path_rate=0.5), True), (dict(init_values=0.5, qk_norm=True, reg_tokens=1), False)],
    ids=['qk_norm', 'layer_scale', 'scale_attn_norm', 'no_qkv_bias', 'no_embed_class', 'attn_drop',
         'drop_path-train', 'layer_scale+qk_norm+register'])
def test_kv_path_matches_naive_for_other_block_options(options, train):
    """Options of timm's Block and ViT that the kv path reimplements or must leave alone, in float64 so that a
    missing step (a k_norm near identity, a layer scale of 0.5) cannot hide in float32 rounding. Drop-path masks are
    (B, 1, 1) per block, drawn in the same order by both paths: equal in training too."""
    torch.manual_seed(0)
    model = PromptedViT(tiny_vit(global_pool='token', **options), 5).double().train(train)
    set_trainable(model, full=True)
    images, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (2,))
    results = both_paths(model, images, labels)
    (logits, grads), (logits_naive, grads_naive) = results['kv'], results['naive']
    torch.testing.assert_close(logits, logits_naive, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_naive.keys()
    for name in grads_naive:
        torch.testing.assert_close(grads[name], grads_naive[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize('rate', ['attn_drop_rate', 'drop_path_rate'])
def test_kv_path_applies_the_backbone_dropouts_in_training_only(rate):
    """Attention dropout draws different masks in each path (other key order), so it is checked by its effect:
    two training passes differ, two evaluation passes do not."""
    torch.manual_seed(0)
    model = PromptedViT(tiny_vit(global_pool='token', **{rate: 0.5}), 5, prompt_impl='kv')
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.train()(images), model(images))
        torch.testing.assert_close(model.eval()(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize('options', [{}, dict(pre_norm=True), dict(patch_drop_rate=0.5)],
                         ids=['plain', 'pre_norm', 'patch_drop'])
@pytest.mark.parametrize('full', [False, True])
def test_kv_without_prompts_equals_plain_timm(full, options):
    """prompts=0 through the KV path (last block: CLS row only) against an independently built timm model holding
    the same weights, in train mode: same logits, same gradients. The embedding is timm's own, with a CLIP-style norm
    before the blocks or patch dropout (the same patches dropped: drawn first, from the same seed) as well."""
    torch.manual_seed(0)
    vit = tiny_vit(global_pool='token', **options) if options else tiny_vit()
    model = PromptedViT(vit, 0, prompt_impl='kv')
    set_trainable(model, full)
    reference = timm.create_model('test_vit', img_size=32, patch_size=4, num_classes=10, global_pool='token',
                                  **options)
    reference.load_state_dict(vit.state_dict())
    for name, param in reference.named_parameters():
        param.requires_grad_(dict(model.named_parameters())[f'vit.{name}'].requires_grad)
    model.train(), reference.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, grads = forward_backward(model, images, labels)
    expected = forward_backward(reference, images, labels)
    assert_same((logits, {name.removeprefix('vit.'): g for name, g in grads.items()}), expected)
    assert len(grads) == (len(list(reference.parameters())) if full else 2)


def test_register_tokens_work_with_the_kv_path():
    """Register tokens are ordinary rows to the blocks; the head still reads only CLS (row 0)."""
    torch.manual_seed(0)
    model = PromptedViT(tiny_vit(reg_tokens=2, global_pool='token'), 5, prompt_impl='naive')
    set_trainable(model, True)
    images, labels = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    naive = forward_backward(model, images, labels)
    model.prompt_impl = 'kv'
    assert_same(forward_backward(model, images, labels), naive)


@pytest.mark.parametrize('pool', ['avg', 'avgmax', 'map'])
def test_heads_that_do_not_read_cls_are_refused(pool):
    vit = tiny_vit(global_pool=pool)
    for impl in ('kv', 'naive'):  # the prompts would be pooled into the head
        with pytest.raises(SystemExit, match=f"head uses .*{'attention pooling' if pool == 'map' else pool}.*"
                                             "global_pool='token'"):
            PromptedViT(vit, 4, prompt_impl=impl)
    with pytest.raises(SystemExit, match='computes only the class token .* use --prompt_impl naive'):
        PromptedViT(vit, 0, prompt_impl='kv')  # no prompts, but the kv path still hands the head the CLS row alone
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # no prompts, naive: the plain timm model, whatever its pooling
        assert torch.equal(PromptedViT(vit.eval(), 0, prompt_impl='naive')(images), vit(images))


def test_distilled_vit_needs_the_naive_path():
    vit = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, patch_size=4, depth=2, num_classes=10)
    with pytest.raises(SystemExit, match='VisionTransformerDistilled.*use --prompt_impl naive'):
        PromptedViT(vit, 4)
    model = PromptedViT(vit, 4, prompt_impl='naive').eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # prompts after CLS and dist; the head reads both
    for layer, x in enumerate(_block_inputs(model, torch.randn(2, 3, 32, 32))):  # rows 0 and 1 stay CLS and dist
        assert torch.equal(x[:, 2:6], model.prompts.tokens[layer].expand(2, -1, -1))
    set_trainable(model, full=False)  # P trains both heads, which the distilled ViT averages
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {'prompts.tokens', 'vit.head.weight', 'vit.head.bias', 'vit.head_dist.weight',
                         'vit.head_dist.bias'}


@pytest.mark.parametrize('pretrained', [False, True])
@pytest.mark.parametrize('name', ['resnet50', 'swin_tiny_patch4_window7_224', 'eva02_tiny_patch14_224'])
def test_a_model_that_is_not_a_vit_is_said_so_before_building(name, pretrained):
    """resnet50 failed inside timm ('unexpected keyword argument img_size'), and with pretrained weights that was
    reported as a failed download."""
    with pytest.raises(SystemExit, match=f"--model {name} is not one of timm's VisionTransformer models"):
        create_vit(name, 10, 32, 4, pretrained=pretrained)


@pytest.mark.parametrize('name', ['vit_tiny_r_s16_p8_224', 'vit_base_r50_s16_224'])
def test_hybrid_vit_is_refused_before_building(name):
    """A hybrid's --patch_size would patch the ResNet's feature map (the tiny one built at 32/4 as 4 tokens of 16 px,
    silently); r50 asserted inside timm, said as 'pick a ViT with a class token'."""
    with pytest.raises(SystemExit, match=f'--model {name} is a hybrid ViT .*patches of its feature map'):
        create_vit(name, 10, 32, 4, pretrained=False)


def test_model_without_class_token_is_one_line_error():
    with pytest.raises(SystemExit, match='cannot build --model vit_base_patch16_siglip_224 .*class token'):
        create_vit('vit_base_patch16_siglip_224', 10, pretrained=False)  # timm asserts before allocating weights


def test_unfreeze_patterns_add_to_prompt_tuning():
    model = PromptedViT(tiny_vit(), 4)
    matched = set_trainable(model, False, UNFREEZE_ALL_BUT_BLOCKS)
    assert matched == ['cls_token', 'norm.bias', 'norm.weight', 'patch_embed.proj.bias', 'patch_embed.proj.weight',
                       'pos_embed']  # 'norm.*' is the final norm only: fnmatch matches whole names, not suffixes
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {'prompts.tokens', 'vit.head.weight', 'vit.head.bias', *(f'vit.{name}' for name in matched)}
    d = 64
    assert count_params(model, trainable_only=True) == (6 * 4 * d + d * 10 + 10 + d + 65 * d + 2 * d
                                                        + d * 3 * 4 * 4 + d)
    assert set_trainable(model, False) == [] and count_params(model, trainable_only=True) == 6 * 4 * d + d * 10 + 10
    assert set_trainable(model, False, ['blocks.1.*', 'blocks.1*']) == sorted(  # overlapping patterns: a set
        name for name, _ in model.vit.named_parameters() if name.startswith('blocks.1.'))
    for pattern, named in (('head.*', "'head.*' matches only head.weight, head.bias, which train anyway"),
                           ('head.weight', "'head.weight' matches only head.weight, which trains anyway")):
        with pytest.raises(SystemExit, match=named):  # it would label the run P+unfreeze and unfreeze nothing
            set_trainable(model, False, [pattern])
    # a pattern that matches the head and backbone tensors as well adds those: it is not refused
    assert set_trainable(model, False, ['*.bias']) == sorted(
        name for name, _ in model.vit.named_parameters() if name.endswith('.bias') and name != 'head.bias')
    assert set_trainable(model, True, ['pos_embed']) == []  # harmless with --full True: nothing to add
    assert count_params(model, trainable_only=True) == count_params(model)


@pytest.mark.parametrize('pattern, close', [('patch_embed', 'patch_embed.*, patch_embed.proj.*, pos_embed'),
                                            ('norm', 'norm.*, norm.bias'), ('vit.pos_embed', 'pos_embed'),
                                            ('blocks.0.atn.*', 'blocks.0.attn.*, blocks.5.attn.*, blocks.4.attn.*'),
                                            ('xyz', 'blocks.*, cls_token, head.*, norm.*, patch_embed.*, pos_embed')])
def test_unfreeze_pattern_matching_nothing_names_close_names(pattern, close):
    model = PromptedViT(tiny_vit(), 4)
    with pytest.raises(SystemExit) as raised:
        set_trainable(model, False, ['pos_embed', pattern])
    message = str(raised.value.code)
    assert message.startswith(f"error: --unfreeze pattern '{pattern}' matches no parameter of --model test_vit; "
                              f"closest names: ")
    assert message.split('closest names: ')[1] == close  # up to 3, the closest first


def test_download_failure_is_one_quick_line(tmp_path):
    """No network and no HF_HUB_OFFLINE: the hub would retry every candidate file for ~25 s, printing a warning per
    attempt. create_vit asks once and fails with one line naming --weights. The endpoint is a closed local port, the
    cache an empty folder, so the internet is never reached."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ('hf_hub_offline', 'http_proxy', 'https_proxy',
                                                                     'all_proxy', 'no_proxy')}
    env.update(HF_ENDPOINT='http://127.0.0.1:9', HF_HOME=str(tmp_path / 'hf'), NO_PROXY='*', PYTHONUNBUFFERED='1')
    start = time.perf_counter()
    result = subprocess.run([sys.executable, '-c', 'from model import create_vit; create_vit("test_vit", 10)'],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no 'Retrying in 1s [Retry 1/5]' storm before our line
    assert lines[0].startswith('error: could not download the pretrained weights of test_vit')
    assert '--weights FILE' in lines[0] and '--pretrained False' in lines[0]
    assert elapsed < 20  # the retries alone sleep 2 x (1 + 2 + 4 + 8 + 8) s


def test_kv_path_rejects_blocks_it_cannot_shortcut():
    vit = timm.create_model('test_vit2', img_size=32, patch_size=4, num_classes=10, class_token=True,
                            global_pool='token')  # LayerScale blocks are fine...
    PromptedViT(vit, 2)
    vit.blocks[0] = timm.models.vision_transformer.ResPostBlock(64, 2)  # ...a post-norm block is not
    with pytest.raises(SystemExit, match='--prompt_impl naive'):
        PromptedViT(vit, 2)


def test_unfreeze_pattern_is_the_whole_name():
    from model import PromptedViT, create_vit, set_trainable
    model = PromptedViT(create_vit('test_vit', 3, 32, 4, pretrained=False), 4)
    with pytest.raises(SystemExit):
        set_trainable(model, False, ['proj.weight'])  # no parameter is named exactly proj.weight


def test_a_checkpoint_wrapped_as_training_scripts_save_it_loads(tmp_path):
    """--weights reads a file as timm does: a {'state_dict': ...} or {'model': ...} entry, 'module.' prefixes (a DDP
    model's state dict) dropped; a plain torch.load would hand timm a dict of one key."""
    torch.manual_seed(0)
    source = timm.create_model('test_vit', num_classes=21)
    state = {'module.' + name: tensor for name, tensor in source.state_dict().items()}
    for key in ('state_dict', 'model'):
        torch.save({key: state, 'epoch': 3}, tmp_path / f'{key}.pth')
        vit = create_vit('test_vit', 10, 32, 4, weights=str(tmp_path / f'{key}.pth'))
        assert torch.equal(vit.blocks[5].mlp.fc2.weight, source.blocks[5].mlp.fc2.weight)


def test_jax_npz_of_another_geometry_loads_at_its_own(tmp_path):
    """An .npz is read at the grid and patch size it holds (here 8x8 patches of 8 px, as a ViT fine-tuned at another
    resolution would hold), whatever its name's case, then resampled like the same weights as a state dict."""
    torch.manual_seed(1)
    from_npz, from_state_dict = load_both_ways(timm.create_model('test_vit', img_size=64, patch_size=8, num_classes=21),
                                               tmp_path, 'ViT-T_8.NPZ')
    expected = from_state_dict.state_dict()
    for name, tensor in from_npz.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize('source', ['shallower', 'deeper', 'wider', 'other heads'])
def test_jax_npz_that_does_not_fit_is_refused(tmp_path, source):
    """timm's .npz reader loads the first blocks of a deeper checkpoint without a word: fewer or more blocks are
    refused, and so is a wider ViT with as many blocks (a misfit, not an unreadable file), and one of as many
    tensors split into other heads (timm flattens them: it loaded, and the model was another one)."""
    kwargs = dict(shallower=dict(depth=5), deeper=dict(depth=7), wider=dict(embed_dim=96, num_heads=3),
                  **{'other heads': dict(num_heads=4)})[source]
    write_jax_npz(timm.create_model('test_vit', **kwargs), tmp_path / 'ViT.npz')
    with pytest.raises(SystemExit) as error:
        create_vit('test_vit', 10, 32, 4, weights=str(tmp_path / 'ViT.npz'))
    message = str(error.value)
    assert message.startswith(f'error: --weights {tmp_path / "ViT.npz"} does not fit --model test_vit: '), message
    if 'depth' in kwargs:
        assert message.endswith(f": it holds {kwargs['depth']} encoder blocks, the model has 6")
    if source == 'other heads':
        assert message.endswith(": its attention has 4 heads, the model's 2")


def test_jax_npz_without_a_patch_embedding_kernel_is_unreadable(tmp_path):
    import numpy as np
    np.savez(tmp_path / 'flat.npz', **{'embedding/kernel': np.zeros((16, 3, 64)),
                                       'Transformer/posembed_input/pos_embedding': np.zeros((1, 197, 64))})
    with pytest.raises(SystemExit, match="cannot read --weights .*no ViT patch embedding 'embedding/kernel'"):
        create_vit('test_vit', 10, 32, 4, weights=str(tmp_path / 'flat.npz'))


def test_weights_of_a_distilled_vit_load_with_both_heads_new(tmp_path):
    """A distilled DeiT's classifier is two pairs of tensors (head, head_dist), both replaced: neither is a misfit."""
    torch.manual_seed(0)
    source = timm.create_model('deit_tiny_distilled_patch16_224', num_classes=7)
    torch.save(source.state_dict(), tmp_path / 'deit.pth')
    vit = create_vit('deit_tiny_distilled_patch16_224', 10, 32, 4, weights=str(tmp_path / 'deit.pth'))
    assert torch.equal(vit.dist_token, source.dist_token)
    assert vit.head.out_features == vit.head_dist.out_features == 10


def test_reading_weights_leaves_timms_logger_as_it_was(tmp_path, caplog, monkeypatch, request):
    """timm's 'Missing keys'/'Unexpected keys' records become the one-line refusal, not log lines as well (they
    would print before it); the logger is handed back unchanged, and timm's other warnings still reach the user."""
    import logging

    from model import _timm_load_report
    logger = logging.getLogger('timm.models._builder')
    monkeypatch.setattr(logger, 'propagate', True)
    monkeypatch.setattr(logger, 'handlers', [])
    request.addfinalizer(lambda level=logger.level: logger.setLevel(level))
    logger.setLevel(logging.ERROR)  # a level of the user's own, not the INFO create_vit reads timm's records at
    torch.save(timm.create_model('test_vit', depth=7).state_dict(), tmp_path / 'deeper.pth')
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SystemExit, match='no place for'):
        create_vit('test_vit', 10, 32, 4, weights=str(tmp_path / 'deeper.pth'))
    assert (logger.level, logger.propagate, list(logger.handlers)) == (logging.ERROR, True, [])
    assert not [r for r in caplog.records if r.name == logger.name and 'keys' in r.getMessage()]
    logger.setLevel(logging.NOTSET)  # timm's own level: its warnings are shown, its info is not
    with _timm_load_report() as report:
        logger.info('Missing keys (blocks.0.norm1.weight, pos_embed) discovered while loading pretrained weights.')
        logger.warning('Unexpected keys (extra.weight) found while loading pretrained weights.')
        logger.warning('Missing classifier: a warning of another kind')
        logger.info('Loading pretrained weights from file (weights.pth)')
    assert report == {'Missing': ['blocks.0.norm1.weight', 'pos_embed'], 'Unexpected': ['extra.weight']}
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == [
        'Missing classifier: a warning of another kind']  # as they would have without create_vit
    assert (logger.level, logger.propagate, list(logger.handlers)) == (logging.NOTSET, True, [])
    caplog.clear()
    logger.setLevel(logging.ERROR)  # a user who silenced timm's warnings does not get them back through create_vit
    with _timm_load_report():
        logger.warning('Missing classifier: a warning of another kind')
        logger.error('an error of timm')
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == ['an error of timm']


@pytest.mark.parametrize('case', ['offline', 'cached', 'hub answers', 'no answer'])
def test_hub_is_asked_once_only_when_it_must_be(tmp_path, monkeypatch, case):
    """Before timm's download: HF_HUB_OFFLINE or a cached copy of the repo ask nothing; an answer from the hub (a 404
    for a repo without model.safetensors, say) leaves the rest to timm; no answer at all is the one-line error."""
    import types

    import huggingface_hub
    import huggingface_hub.constants as constants
    from huggingface_hub.errors import HfHubHTTPError

    from model import _check_hub_reachable
    asked = []

    def get_hf_file_metadata(url, timeout):
        asked.append(url)
        if case == 'hub answers':
            raise HfHubHTTPError('404 Client Error', response=types.SimpleNamespace(headers={}, request=None))
        raise ConnectionError('no route to host')
    monkeypatch.setattr(huggingface_hub, 'get_hf_file_metadata', get_hf_file_metadata)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', case == 'offline')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    if case == 'cached':
        os.makedirs(tmp_path / 'models--timm--vit_base_patch16_224.augreg_in21k' / 'snapshots')
    if case == 'no answer':
        with pytest.raises(SystemExit, match=f'could not download the pretrained weights of {VIT_B} from the '
                                             r'Hugging Face hub \(ConnectionError\)'):
            _check_hub_reachable(VIT_B)
    else:
        _check_hub_reachable(VIT_B)
    assert len(asked) == (case in ('hub answers', 'no answer'))
    assert all(url.endswith('/timm/vit_base_patch16_224.augreg_in21k/resolve/main/model.safetensors') for url in asked)


@pytest.mark.parametrize('pretrained', [False, True])
def test_a_model_that_fails_to_build_is_not_called_a_download_failure(monkeypatch, pretrained):
    """timm raising while it builds the model: without pretrained weights nothing was downloaded, so that is not what
    the line may say; with them (the hub offline here) it is. A reason is its first line, at most 300 characters."""
    def create_model(*args, **kwargs):
        raise RuntimeError('shape of something' + ' x' * 200 + '\nsecond line')
    monkeypatch.setattr(timm, 'create_model', create_model)
    with pytest.raises(SystemExit) as error:
        create_vit('test_vit', 10, 32, 4, pretrained=pretrained)
    assert str(error.value) == ('error: could not download the pretrained weights of test_vit from the Hugging Face '
                                'hub (RuntimeError); offline, pass --weights FILE (a timm checkpoint, e.g. the hub\'s '
                                'model.safetensors) or --pretrained False for a random backbone' if pretrained else
                                'error: cannot build --model test_vit: shape of something' + ' x' * 141)


def test_kv_path_computes_only_the_class_token_after_the_last_block():
    """The kv path's saving: the final norm and the head see one row per image, not the 65 rows of the naive path."""
    model = PromptedViT(tiny_vit(), 5, prompt_impl='kv')
    shapes = []
    model.vit.norm.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
        model.prompt_impl = 'naive'
        model(torch.randn(3, 3, 32, 32))
    assert shapes == [(3, 1, 64), (3, 1 + 5 + 64, 64)]


@pytest.mark.parametrize('rate', ['attn_drop_rate', 'proj_drop_rate', 'drop_path_rate'])
def test_kv_path_matches_naive_when_the_backbone_dropouts_drop_everything(rate):
    """The two paths draw a dropout's masks over differently shaped tensors, so at a rate below 1 they differ; at 1
    every mask is all zeros in both: the attention weights, the attention and MLP outputs, or whole residual branches.
    Equal logits and gradients then show that each dropout sits where timm's Block has it."""
    torch.manual_seed(0)
    model = PromptedViT(tiny_vit(global_pool='token', **{rate: 1.0}), 5).train()
    set_trainable(model, full=True)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    results = both_paths(model, images, labels)
    assert_same(results['kv'], results['naive'])
    model.eval()
    with torch.no_grad():  # the dropouts were really there: without them the logits differ
        assert not torch.allclose(model(images), results['naive'][0], rtol=1e-3, atol=1e-3)


def test_prompts_keep_a_batch_of_one_unless_dropout_draws_masks():
    """Without active dropout every image shares the prompts (batch dimension 1, so the kv path projects them once);
    with dropout in training each image draws its own mask, as VPT does."""
    from prompts import Prompts
    torch.manual_seed(0)
    prompts = Prompts(3, 10, 64, 4, dropout=0.5)
    assert prompts.eval()(8).shape == (3, 1, 10, 64)
    assert torch.equal(prompts(8)[:, 0], prompts.tokens)
    assert Prompts(3, 10, 64, 4, dropout=0.0).train()(8).shape == (3, 1, 10, 64)
    dropped = prompts.train()(8)
    assert dropped.shape == (3, 8, 10, 64)
    kept = dropped != 0
    assert all(not torch.equal(kept[:, 0], kept[:, i]) for i in range(1, 8))  # a mask of its own per image
    torch.testing.assert_close(dropped[kept], (prompts.tokens.unsqueeze(1).expand_as(dropped) * 2)[kept])


class _DoubledAttention(timm.layers.Attention):
    """An Attention subclass with a forward of its own, which the kv path would not run."""
    def forward(self, x, **kwargs):
        return 2 * super().forward(x, **kwargs)


class _MeanPooledViT(timm.models.vision_transformer.VisionTransformer):
    """A ViT whose pool reads every row, with timm's forward_head unchanged."""
    def pool(self, x, pool_type=None):
        return x.mean(dim=1)


@pytest.mark.parametrize('change', ['gated attention', 'attention subclass', 'pool override'])
def test_kv_path_refuses_what_it_would_compute_otherwise(change):
    """The kv path reimplements timm's Attention.forward and reads the CLS row alone: an attention gate, an attention
    with its own forward, or a pool over more than CLS would be skipped silently, so they need the naive path."""
    torch.manual_seed(0)
    if change == 'pool override':
        vit = _MeanPooledViT(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)
        expected = 'computes only the class token after the last block'
    else:
        if change == 'gated attention' and 'gated' not in inspect.signature(timm.layers.Attention).parameters:
            pytest.skip(f"timm {timm.__version__}'s Attention has no gate (timm 1.0.28 added it): nothing to refuse")
        vit = tiny_vit(global_pool='token')
        attention = (timm.layers.Attention(64, 2, qkv_bias=True, gated=True) if change == 'gated attention' else
                     _DoubledAttention(64, 2, qkv_bias=True))
        attention.load_state_dict(vit.blocks[4].attn.state_dict(), strict=False)
        vit.blocks[4].attn = attention
        expected = "needs timm's standard ViT Block/Attention in every layer"
    with pytest.raises(SystemExit, match=f'{expected}.*use --prompt_impl naive'):
        PromptedViT(vit, 3)
    model = PromptedViT(vit, 3, prompt_impl='naive').eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
