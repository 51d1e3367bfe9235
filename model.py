"""The prompted Vision Transformer: a timm ViT (default ViT-B/16 IN-21k resampled to ViT-B/4 at 32x32) with VPT prompts.

Two forward implementations give the same logits and gradients:
- naive: prompts are concatenated into the token sequence and every timm block runs unchanged;
- kv (deep prompts only): prompt rows are only ever read as keys and values, since VPT-deep throws away each
  layer's prompt outputs and the head reads only CLS. So they get norm1 + the K/V projection and nothing else,
  and in the last block only the CLS row gets its query, output projection and MLP.
"""
import contextlib
import difflib
import fnmatch
import json
import logging
import math
import os
import sys
import zipfile

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from packaging.version import Version  # installed with matplotlib, which requires it
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from prompts import Prompts

# requirements.txt's floors, for an environment installed before they rose (pip keeps an older version that meets
# the floor it had): the kv path reads Attention.norm (timm 1.0.16), and timm before 1.0.21 cannot import
# huggingface_hub 2, so every hub download failed as if the package were missing
FLOORS = dict(torch='2.4', timm='1.0.21')


def check_versions(installed):
    """{package: version} -> a one-line error for one older than its floor."""
    for package, version in installed.items():
        if Version(version) < Version(FLOORS[package]):
            raise SystemExit(f"error: vpt needs {package} >= {FLOORS[package]}, and this Python has {version}; "
                             f"pip install -r requirements.txt")


check_versions(dict(torch=torch.__version__, timm=timm.__version__))


def create_vit(model_name, num_classes, img_size=32, patch_size=4, pretrained=True, weights=None):
    """timm's create_model; pretrained weights come from the hub, or from `weights` through the same loading path,
    which resamples the patch embedding (PI-resize) and the position grid to the new patch and image size."""
    check_model_args(model_name, weights)
    kwargs = dict(img_size=img_size, patch_size=patch_size, num_classes=num_classes, global_pool='token')
    # timm drops the checkpoint's classifier only when its class count differs from ours; when they agree (1,000
    # classes on an in1k ViT) it loads that head, strictly. The head here is always new, initialised under --seed: a
    # class count no checkpoint has (-1) makes timm drop it whatever the file holds.
    overlay = dict(num_classes=-1)
    run_checkpoint = None  # for a vpt run's checkpoint: the prompts it held, which are not loaded
    whole = False  # whether that checkpoint holds a whole ViT (a --full True run's), whatever its depth
    if weights and weights.lower().endswith('.npz'):
        kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=_npz_state_dict(model_name, weights, num_classes))
    elif weights:
        state, run_checkpoint = _backbone_state_dict(weights)
        whole = run_checkpoint is not None and any(name.startswith('blocks.0.') for name in state) and all(
            name in state for name in ('cls_token', 'pos_embed', 'patch_embed.proj.weight', 'norm.weight'))
        kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=state)
    elif pretrained:
        _check_hub_reachable(model_name)
        kwargs['pretrained_cfg_overlay'] = overlay
    try:
        with _timm_load_report() as load_report:
            vit = timm.create_model(model_name, pretrained=pretrained or bool(weights), **kwargs)
    except AssertionError as e:  # timm's constructor asserts, e.g. 'Token pooling needs the class token.'
        raise SystemExit(f"error: cannot build --model {model_name} for VPT ({_first_line(e) or 'AssertionError'}); "
                         "pick a timm ViT with a class token, e.g. vit_base_patch16_224.augreg_in21k")
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        if run_checkpoint is not None and not whole:  # of another width too: it would not start a run anyway
            raise SystemExit(_partial_run_checkpoint(weights))
        if weights:
            raise SystemExit(f"error: --weights {weights} does not fit --model {model_name}: "
                             f"{_first_line(e).rstrip('.')}{_run_model_hint(weights, model_name, whole)}")
        if 'Unknown model' in str(e) or not pretrained:
            raise SystemExit(f"error: cannot build --model {model_name}: {_first_line(e)}")
        raise SystemExit(_download_error(model_name, e))
    except Exception as e:  # network errors for the hub
        raise SystemExit(_download_error(model_name, e))
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
        what = ("has no class token" if isinstance(vit, VisionTransformer) else
                f"is timm's {type(vit).__name__}, not its VisionTransformer")
        raise SystemExit(f"error: --model {model_name} {what}; VPT here needs timm's VisionTransformer with a class "
                         "token, e.g. vit_base_patch16_224.augreg_in21k")
    vit.pretrained_cfg.pop('state_dict', None)  # an .npz's converted tensors: loaded, no need to keep a second copy
    if 'pretrained_cfg_overlay' in kwargs:
        vit.pretrained_cfg['num_classes'] = getattr(timm.models.get_pretrained_cfg(model_name), 'num_classes', None)
    missing, unexpected = _left_unplaced(vit, load_report)
    if run_checkpoint is not None and missing and not whole:  # a P, linear or --unfreeze run's: part of a ViT
        raise SystemExit(_partial_run_checkpoint(weights))
    _check_fit(missing, unexpected, f"--weights {weights} does not fit --model {model_name}" if weights else
               f"the pretrained weights of {model_name} do not fit the ViT that VPT builds from it",
               _run_model_hint(weights, model_name, whole))
    if run_checkpoint and os.environ.get('LOCAL_RANK', '0') == '0':
        print(f"note: --weights {weights} is a vpt run's checkpoint: its backbone is loaded, not its "
              f"prompts (this run's start anew under --seed)", file=sys.stderr)
    return vit


def _read_state_dict(weights):
    """A .safetensors/.pth/.bin file read as timm reads one (a 'model' or 'state_dict' entry, 'module.' prefixes
    dropped), here rather than inside create_model, so that a file that cannot be read is not taken for one that does
    not fit the model."""
    try:
        return timm.models.load_state_dict(weights)
    except Exception as e:  # safetensors/pickle/zip errors of a damaged file, or a pickled model object
        folder = os.path.dirname(os.path.abspath(weights))
        if os.path.basename(weights) == 'state.pt' and os.path.isfile(os.path.join(folder, 'trainable.safetensors')):
            raise SystemExit(f"error: --weights {weights} is a vpt run's resume state, not weights; continue that run "
                             f"with --resume {os.path.dirname(weights) or '.'}") from None
        reason = _first_line(e).split('. ')[0].rstrip('.')  # torch's long advice to trust the file stays out
        raise SystemExit(f"error: cannot read --weights {weights} ({type(e).__name__}: {reason}); it must be a whole "
                         f"timm state dict, saved with safetensors or torch.save(model.state_dict()) (a pickled model "
                         f"object is not read)")


def _backbone_state_dict(weights):
    """-> (state dict, None) for a timm checkpoint. A vpt run's trainable.safetensors or best.safetensors (its trained
    tensors, under 'vit.' and 'prompts.') -> (its ViT's tensors, the names of its prompt tensors): with --full True it
    trained the whole backbone, which another run can start from; its prompts, like its head, belong to its own task
    and are not loaded."""
    state = _read_state_dict(weights)
    if not state or not all(key.startswith(('vit.', 'prompts.')) for key in state):
        return state, None
    backbone = {key[len('vit.'):]: tensor for key, tensor in state.items() if key.startswith('vit.')}
    return backbone, sorted(key for key in state if key.startswith('prompts.'))


@contextlib.contextmanager
def _timm_load_report():
    """timm loads pretrained weights non-strictly whenever the head changes size (always, here) and only logs the
    keys it could not place: 'Missing keys (...)' at INFO, 'Unexpected keys (...)' at WARNING. -> {'Missing':
    [...], 'Unexpected': [...]}, filled from those records; timm's other records pass on as usual."""
    logger = logging.getLogger('timm.models._builder')
    records, handler = [], logging.Handler(logging.INFO)
    handler.emit = records.append
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    report = {'Missing': [], 'Unexpected': []}
    try:
        yield report
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        for record in records:
            message = record.getMessage()
            kind = message.split(' ', 1)[0]
            if kind in report and message.startswith(f'{kind} keys ('):
                report[kind] += message[message.index('(') + 1:message.rindex(')')].split(', ')
            elif record.levelno >= logging.WARNING and logger.isEnabledFor(record.levelno):  # the user's level too
                logger.handle(record)


def _left_unplaced(vit, load_report):
    """-> (the model's tensors the checkpoint did not hold, the checkpoint's tensors the model has no place for), the
    classifier aside: it is new for the new classes."""
    classifier = vit.pretrained_cfg.get('classifier') or 'head'
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple([key for key in load_report[kind] if key.rsplit('.', 1)[0] not in heads]
                 for kind in ('Missing', 'Unexpected'))


def _partial_run_checkpoint(weights):
    return (f"error: --weights {weights} is a vpt run's checkpoint of only what that run trained, not a whole "
            f"backbone (only a --full True run's holds one); start from the weights that run started from (its "
            f"config.json's weights_id), or continue it with --resume RUN")


def _run_model_hint(weights, model_name, whole):
    """'; the run that wrote it trained --model X: pass --model X' for a --full True run's checkpoint (a whole ViT)
    whose run directory (its config.json beside it) names another --model than this run's; '' otherwise. The file
    keeps no model name of its own, and the README's two-step example leaves --model out."""
    if not whole:
        return ''
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(weights)), 'config.json')) as f:
            trained = json.load(f).get('model')
    except (OSError, ValueError, AttributeError, RecursionError):
        return ''
    if not isinstance(trained, str) or trained == model_name:
        return ''
    return f"; the run that wrote it trained --model {trained}: pass --model {trained}"


def _check_fit(missing, unexpected, problem, hint=''):
    """A checkpoint that leaves backbone tensors at their random init, or holds tensors the model has no place for,
    is refused."""
    if not missing and not unexpected:
        return
    listed = lambda keys: ', '.join(keys[:3]) + (f' and {len(keys) - 3} more' if len(keys) > 3 else '')
    found = []
    if missing:
        found.append(f"the model's {listed(missing)} are not in it")
    if unexpected:
        found.append(f"it holds {listed(unexpected)}, which the model has no place for")
    raise SystemExit(f"error: {problem}: {'; '.join(found)}{hint}")


def _npz_state_dict(model_name, weights, num_classes):
    """Google's original JAX checkpoints (ViT-B_16.npz, the file official VPT loads) are read by timm's own .npz
    reader into the model at the checkpoint's own geometry (224 px, 16x16 patches for ViT-B_16): no resampling there,
    so the state dict then takes the same resampling path (PI-resize, position grid) as the hub's weights."""
    unreadable = (f"error: cannot read --weights {weights} ({{}}); an .npz must be one of Google's JAX ViT "
                  "checkpoints, e.g. imagenet21k/ViT-B_16.npz")
    if not zipfile.is_zipfile(weights):
        raise SystemExit(unreadable.format('not an .npz archive'))
    try:
        with np.load(weights) as npz:
            kernel = next((npz[name] for name in npz.files if name.endswith('embedding/kernel')), None)
            table = next((npz[name] for name in npz.files if name.endswith('pos_embedding')), None)
            blocks = {name.split('encoderblock_')[1].split('/')[0] for name in npz.files if 'encoderblock_' in name}
            heads = {npz[name].shape[1] for name in npz.files  # (dim, heads, head_dim) kernels
                     if name.endswith('MultiHeadDotProductAttention_1/query/kernel') and npz[name].ndim == 3}
    except Exception as e:  # a damaged archive, pickled objects
        raise SystemExit(unreadable.format(f"{type(e).__name__}: {_first_line(e)}"))
    if kernel is None or table is None or kernel.ndim != 4:
        raise SystemExit(unreadable.format("no ViT patch embedding 'embedding/kernel' and position table in it"))
    patch_size, rows = kernel.shape[0], table.shape[-2]
    grid = math.isqrt(rows) if math.isqrt(rows) ** 2 == rows else math.isqrt(rows - 1)  # with a class-token row
    try:
        with torch.random.fork_rng(devices=[]):  # the source's random init leaves the seeded head and prompts alone
            source = timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                                       img_size=grid * patch_size, patch_size=patch_size)
    except TypeError as e:  # not a ViT: no img_size/patch_size
        raise SystemExit(f"error: cannot build --model {model_name}: {_first_line(e)}")
    if not isinstance(source, VisionTransformer):
        raise SystemExit(f"error: --weights {weights}: timm reads JAX .npz checkpoints for its VisionTransformer only; "
                         f"pass a timm state dict (.safetensors or .pth) for --model {model_name}")
    if blocks and len(blocks) != len(source.blocks):  # timm's reader would quietly load only the first blocks
        raise SystemExit(f"error: --weights {weights} does not fit --model {model_name}: it holds {len(blocks)} "
                         f"encoder blocks, the model has {len(source.blocks)}")
    model_heads = {block.attn.num_heads for block in source.blocks if isinstance(block.attn, Attention)}
    if heads and model_heads and heads != model_heads:  # timm flattens the heads: the same tensors, another model
        counts = ['/'.join(map(str, sorted(numbers))) for numbers in (heads, model_heads)]
        raise SystemExit(f"error: --weights {weights} does not fit --model {model_name}: its attention has "
                         f"{counts[0]} heads, the model's {counts[1]}")
    try:
        source.load_pretrained(weights)
    except (KeyError, RuntimeError) as e:  # a parameter missing from the archive, or of another shape
        raise SystemExit(f"error: --weights {weights} does not fit --model {model_name}: {_first_line(e)}")
    except Exception as e:
        raise SystemExit(unreadable.format(f"{type(e).__name__}: {_first_line(e)}"))
    return source.state_dict()


def check_model_args(model_name, weights=None):
    """The checks that need no model built, so a typo fails before any data is loaded."""
    if not timm.is_model(model_name):
        raise SystemExit(f"error: unknown --model {model_name!r}; pick a timm ViT, e.g. vit_base_patch16_224.augreg_in21k "
                         f"(python -c \"import timm; print(timm.list_models('vit_*', pretrained=True))\")")
    if timm.models.model_entrypoint(model_name).__module__.endswith('_hybrid'):
        raise SystemExit(f"error: --model {model_name} is a hybrid ViT (a ResNet stem, then patches of its feature "
                         "map): --patch_size and VPT's prompt init mean image patches here; pick a plain ViT, e.g. "
                         "vit_base_patch16_224.augreg_in21k")
    module = sys.modules[timm.models.model_entrypoint(model_name).__module__]
    if not any(isinstance(value, type) and issubclass(value, VisionTransformer) for value in vars(module).values()):
        # a ResNet, Swin, EVA...: its module never builds a VisionTransformer. Said before timm fails on img_size or
        # patch_size as an unexpected argument, or the hub is asked for weights that could not be used anyway
        raise SystemExit(f"error: --model {model_name} is not one of timm's VisionTransformer models (it comes from "
                         f"{module.__name__}); VPT here needs a ViT with a class token, e.g. "
                         "vit_base_patch16_224.augreg_in21k")
    if weights and not os.path.isfile(weights):
        raise SystemExit(f"error: --weights {weights}: no such file; pass a timm checkpoint (.safetensors, .pth or "
                         ".bin) or a JAX .npz (ViT-B_16.npz)")


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's load_state_dict puts the useful part (missing key, size mismatch) on the second line
    text = lines[1] if len(lines) > 1 and lines[0].startswith('Error(s) in loading') else (lines[0] if lines else '')
    return text[:300]


def _check_hub_reachable(model_name):
    """One quick request before timm's download: without network, huggingface_hub retries each candidate file for
    ~25 s and logs a warning per attempt. Weights already in the local cache, or HF_HUB_OFFLINE, need no network."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id or huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    repo_id, _, revision = cfg.hf_hub_id.partition('@')
    if os.path.isdir(os.path.join(huggingface_hub.constants.HF_HUB_CACHE, 'models--' + repo_id.replace('/', '--'))):
        return  # something of this repo is cached: the hub falls back to it offline, without retries
    url = huggingface_hub.hf_hub_url(repo_id, cfg.hf_hub_filename or 'model.safetensors', revision=revision or None)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:
        return  # the hub answered (a 404 for a repo with only pytorch_model.bin, say): timm takes it from here
    except Exception as e:  # no answer at all: DNS, refused connection, timeout, proxy
        raise SystemExit(_download_error(model_name, e))


def _download_error(model_name, error):
    return (f"error: could not download the pretrained weights of {model_name} from the Hugging Face hub "
            f"({type(error).__name__}); offline, pass --weights FILE (a timm checkpoint, e.g. the hub's "
            f"model.safetensors) or --pretrained False for a random backbone")


def _supports_kv(block):
    attn = getattr(block, 'attn', None)
    return (type(block) is Block and type(attn) is Attention and getattr(attn, 'gate', None) is None
            and attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim)


def _pooling(vit):
    """What the head reads, for error messages: 'token' is the class token alone."""
    return 'attention pooling' if vit.attn_pool is not None else f"global_pool={vit.global_pool!r}"


def _head_reads_cls_only(vit):
    # the kv path hands forward_head a single row, the CLS token; register tokens are fine (ordinary rows before the
    # head), a distilled ViT's head also reads its dist token, so an overridden forward_head/pool is refused
    return (vit.global_pool == 'token' and vit.attn_pool is None
            and type(vit).forward_head is VisionTransformer.forward_head
            and getattr(type(vit), 'pool', None) is getattr(VisionTransformer, 'pool', None))


class PromptedViT(nn.Module):
    def __init__(self, vit: VisionTransformer, num_prompts=50, deep=True, prompt_dropout=0.0, prompt_impl='kv'):
        super().__init__()
        self.vit = vit
        self.deep = deep
        self.prompt_impl = prompt_impl if deep else 'naive'  # shallow prompts feed every later layer: no shortcut
        if num_prompts > 0 and (vit.global_pool != 'token' or vit.attn_pool is not None):
            raise SystemExit(f"error: VPT prompts need a head that reads the class token, but this ViT's head uses "
                             f"{_pooling(vit)} and would pool the prompts into it; build the ViT with "
                             f"global_pool='token' (create_vit does), or use --prompts 0")
        if self.prompt_impl == 'kv' and not _head_reads_cls_only(vit):
            raise SystemExit(f"error: --prompt_impl kv computes only the class token after the last block, but this "
                             f"ViT's head ({type(vit).__name__}, {_pooling(vit)}) reads more; use --prompt_impl naive")
        if self.prompt_impl == 'kv' and not all(_supports_kv(block) for block in vit.blocks):
            raise SystemExit("error: --prompt_impl kv needs timm's standard ViT Block/Attention in every layer; "
                             "use --prompt_impl naive for this --model")
        self.prompts = None
        if num_prompts > 0:
            self.prompts = Prompts(len(vit.blocks) if deep else 1, num_prompts, vit.embed_dim,
                                   vit.patch_embed.patch_size[0], prompt_dropout)

    @property
    def num_prompts(self):
        return 0 if self.prompts is None else self.prompts.num_tokens

    def forward(self, images):
        if self.prompt_impl == 'kv':
            return self._forward_kv(images)
        return self._forward_naive(images)

    def _embed(self, images):
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))

    def _forward_naive(self, images):
        vit = self.vit
        if self.prompts is None:
            return vit(images)
        x = self._embed(images)
        batch, prefix, n = x.shape[0], vit.num_prefix_tokens, self.num_prompts
        prompt_tokens = self.prompts(batch).expand(-1, batch, -1, -1)
        x = torch.cat([x[:, :prefix], prompt_tokens[0], x[:, prefix:]], dim=1)
        for i, block in enumerate(vit.blocks):
            if i > 0 and self.deep:  # VPT-deep: this layer's own prompts replace the previous layer's prompt outputs
                x = torch.cat([x[:, :prefix], prompt_tokens[i], x[:, prefix + n:]], dim=1)
            x = block(x)
        return vit.forward_head(vit.norm(x))

    def _forward_kv(self, images):
        vit = self.vit
        x = self._embed(images)
        prompt_tokens = None if self.prompts is None else self.prompts(x.shape[0])
        last = len(vit.blocks) - 1
        for i, block in enumerate(vit.blocks):
            x = _kv_block(block, x, None if prompt_tokens is None else prompt_tokens[i], cls_only=i == last)
        return vit.forward_head(vit.norm(x))  # x is (B, 1, dim) here: the CLS row


def _kv_block(block, x, prompt_tokens, cls_only):
    """timm Block.forward for the image rows `x` (B, T, dim), with `prompt_tokens` (B or 1, N, dim) taking part in
    attention as keys and values only. With cls_only, only the CLS row is computed past the keys and values."""
    attn = block.attn
    batch, rows, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    h = block.norm1(x)
    if cls_only:
        w_q, w_kv = attn.qkv.weight.split([heads * head_dim, 2 * heads * head_dim])
        b_q, b_kv = attn.qkv.bias.split([heads * head_dim, 2 * heads * head_dim]) if attn.qkv.bias is not None else (None, None)
        q = F.linear(h[:, :1], w_q, b_q).reshape(batch, 1, heads, head_dim).transpose(1, 2)
        k, v = F.linear(h, w_kv, b_kv).reshape(batch, rows, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = attn.qkv(h).reshape(batch, rows, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prompt_tokens is not None:
        w_kv = attn.qkv.weight[heads * head_dim:]
        b_kv = attn.qkv.bias[heads * head_dim:] if attn.qkv.bias is not None else None
        n = prompt_tokens.shape[1]
        prompt_k, prompt_v = (F.linear(block.norm1(prompt_tokens), w_kv, b_kv)
                              .reshape(-1, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4))
        prompt_k = attn.k_norm(prompt_k)
        k = torch.cat([k, prompt_k.expand(batch, -1, -1, -1)], dim=2)
        v = torch.cat([v, prompt_v.expand(batch, -1, -1, -1)], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, q.shape[2], heads * head_dim))))
    x = (x[:, :1] if cls_only else x) + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def set_trainable(model: PromptedViT, full: bool, unfreeze=()):
    """--full False trains prompts + head only; --full True trains everything. `unfreeze`: fnmatch patterns over the
    timm model's parameter names (model.vit.named_parameters(), e.g. 'patch_embed.*', 'pos_embed', 'norm.*') that
    train as well; each must match something. Returns the sorted names they made trainable."""
    for param in model.parameters():
        param.requires_grad_(full)
    heads = model.vit.get_classifier()  # a distilled DeiT has two: (head, head_dist), averaged at inference
    for head in heads if isinstance(heads, tuple) else (heads,):
        head.requires_grad_(True)
    if model.prompts is not None:
        model.prompts.tokens.requires_grad_(True)
    params = dict(model.vit.named_parameters())
    matched, already = set(), {name for name, param in params.items() if param.requires_grad}
    for pattern in unfreeze:
        # fnmatchcase matches the whole name: 'norm.*' is the final norm, never 'blocks.0.norm1.weight'
        hits = [name for name in params if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise SystemExit(f"error: --unfreeze pattern {pattern!r} matches no parameter of --model "
                             f"{model.vit.pretrained_cfg.get('architecture')}; "
                             f"closest names: {', '.join(_close_names(pattern, params))}")
        if not full and not set(hits) - already:  # with --full everything trains: nothing to say
            raise SystemExit(f"error: --unfreeze pattern {pattern!r} matches only {', '.join(hits[:3])}"
                             f"{', ...' if len(hits) > 3 else ''}, which train{'s' if len(hits) == 1 else ''} "
                             f"anyway; drop it, or name the backbone tensors to train as well")
        matched.update(hits)
    for name in matched:
        params[name].requires_grad_(True)
    return sorted(matched - already)  # what the patterns added (the head trains anyway)


def _close_names(pattern, names):
    """Parameter names and module patterns ('blocks.0.attn.*') nearest to a pattern that matched nothing."""
    modules = {name.rsplit('.', i)[0] + '.*' for name in names for i in range(1, name.count('.') + 1)}
    top_level = sorted(name for name in set(names) | modules if '.' not in name.removesuffix('.*'))
    return difflib.get_close_matches(pattern, sorted(set(names) | modules), n=3) or top_level


def count_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
