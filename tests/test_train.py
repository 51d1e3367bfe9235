"""The training step and schedule: what P mode may and may not change, warmup + cosine."""
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
