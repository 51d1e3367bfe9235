"""The model: ViT-B/4 geometry, weights loading through timm's resampling, prompt placement, trainable sets,
and the exactness of the KV-only prompt path against the naive one."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed

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
    trainable = {name for name, p in vit_b4.named_parameters() if p.requires_grad}
    assert trainable == {'prompts.tokens', 'vit.head.weight', 'vit.head.bias'}
    set_trainable(vit_b4, full=True)
    assert count_params(vit_b4, trainable_only=True) == count_params(vit_b4) == backbone_and_head + prompt_params  # P+F
    no_prompts = PromptedViT(vit_b4.vit, num_prompts=0)
    set_trainable(no_prompts, full=True)
    assert count_params(no_prompts, trainable_only=True) == backbone_and_head  # F
    set_trainable(no_prompts, full=False)
    assert count_params(no_prompts, trainable_only=True) == 7_690  # linear probe


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


def test_no_prompts_equals_plain_timm():
    torch.manual_seed(0)
    vit = create_vit('test_vit', 10, 32, 4, pretrained=False).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = vit(images)
        assert torch.equal(PromptedViT(vit, 0, prompt_impl='naive')(images), expected)
        torch.testing.assert_close(PromptedViT(vit, 0, prompt_impl='kv')(images), expected, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize('num_prompts', [0, 1, 7, 50])
@pytest.mark.parametrize('full', [False, True])
@pytest.mark.parametrize('prompt_dropout', [0.0, 0.3])
def test_kv_path_matches_naive(num_prompts, full, prompt_dropout):
    """Logits, loss and every trainable gradient of the KV-only path equal the naive path (fp32, eval mode)."""
    torch.manual_seed(0)
    vit = create_vit('test_vit', 10, 32, 4, pretrained=False)
    model = PromptedViT(vit, num_prompts, prompt_dropout=prompt_dropout, prompt_impl='naive')
    set_trainable(model, full)
    model.eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    results = {}
    for impl in ('naive', 'kv'):
        model.prompt_impl = impl
        model.zero_grad(set_to_none=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        results[impl] = (logits.detach(), loss.detach(),
                         {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    (logits_n, loss_n, grads_n), (logits_k, loss_k, grads_k) = results['naive'], results['kv']
    torch.testing.assert_close(logits_k, logits_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_k, loss_n, rtol=1e-6, atol=1e-6)
    assert grads_k.keys() == grads_n.keys()
    assert len(grads_n) == count_trainable_tensors(model)
    for name in grads_n:
        torch.testing.assert_close(grads_k[name], grads_n[name], rtol=1e-4, atol=1e-6, msg=name)
    if num_prompts:
        assert grads_n['prompts.tokens'].abs().amax(dim=(1, 2)).min() > 0  # every layer's prompts get a gradient


def count_trainable_tensors(model):
    return sum(p.requires_grad for p in model.parameters())


def test_kv_path_rejects_blocks_it_cannot_shortcut():
    vit = timm.create_model('test_vit2', img_size=32, patch_size=4, num_classes=10, class_token=True,
                            global_pool='token')  # LayerScale blocks are fine...
    PromptedViT(vit, 2)
    vit.blocks[0] = timm.models.vision_transformer.ResPostBlock(64, 2)  # ...a post-norm block is not
    with pytest.raises(SystemExit, match='--prompt_impl naive'):
        PromptedViT(vit, 2)
