"""Datasets as whole uint8 tensors, and batches cut from them with batched tensor ops (no Python per image).

Each split is one (N, 3, H, W) uint8 tensor plus an int64 label tensor; train.py moves them onto the training
device once. An epoch is a seeded permutation; augmentation (random crop with zero padding + horizontal flip,
the seed's recipe) is one gather over the whole batch.
"""
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
CIFAR_FOLDERS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}


def load_dataset(dataset, data_dir='./data', img_size=32, train_samples=0, test_samples=0, seed=0):
    """-> (train_images, train_labels, test_images, test_labels, class_names); images uint8 (N, 3, img_size, img_size).

    train_samples/test_samples > 0 keep a seeded class-balanced subset (for a folder, only those files are decoded).
    """
    if dataset in CIFAR_FOLDERS:
        splits = []
        loaded, classes = _load_cifar(dataset, data_dir)
        for (images, labels), num_samples in zip(loaded, (train_samples, test_samples)):
            keep = balanced_subset(labels, num_samples, seed)
            splits.append((_resize(images[keep], img_size), labels[keep]))
    elif os.path.isdir(dataset):
        splits, classes = _load_folder(dataset, img_size, (train_samples, test_samples), seed)
    else:
        raise SystemExit(f"error: --dataset {dataset!r} is neither cifar10, cifar100 nor a folder; "
                         "a folder dataset needs train/<class>/* and test/<class>/* images")
    (train_images, train_labels), (test_images, test_labels) = splits
    return train_images, train_labels, test_images, test_labels, classes


def _load_cifar(name, data_dir):
    import torchvision
    dataset_class = torchvision.datasets.CIFAR10 if name == 'cifar10' else torchvision.datasets.CIFAR100
    try:
        train = dataset_class(data_dir, train=True, download=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        _check_writable(data_dir, '--data_dir', f"to download {name} into it")
        try:
            train = dataset_class(data_dir, train=True, download=True)
        except OSError as e:
            raise SystemExit(
                f"error: could not download {name} into --data_dir {data_dir} ({type(e).__name__}: {e}); offline, put "
                f"{dataset_class.filename} (from {dataset_class.url}) or its extracted {CIFAR_FOLDERS[name]}/ into "
                f"{data_dir}, or pass --dataset FOLDER with train/<class>/* and test/<class>/* images")
    test = dataset_class(data_dir, train=False, download=False)
    splits = [(torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(split.targets))
              for split in (train, test)]
    return splits, list(train.classes)


def _load_folder(root, img_size, samples, seed):
    split_dirs = [os.path.join(root, split) for split in ('train', 'test')]
    for split_dir in split_dirs:
        if not os.path.isdir(split_dir):
            raise SystemExit(f"error: --dataset {root} has no {os.path.basename(split_dir)}/ folder; "
                             "a folder dataset needs train/<class>/* and test/<class>/* images")
    classes = sorted(entry.name for entry in os.scandir(split_dirs[0]) if entry.is_dir())
    if not classes:
        raise SystemExit(f"error: {split_dirs[0]} has no class folders; put each class's images in train/<class>/")
    test_classes = sorted(entry.name for entry in os.scandir(split_dirs[1]) if entry.is_dir())
    if test_classes != classes:
        raise SystemExit(f"error: the class folders of {split_dirs[1]} ({', '.join(test_classes)}) differ from those "
                         f"of {split_dirs[0]} ({', '.join(classes)}); both splits need the same classes")
    splits = []
    for split_dir, num_samples in zip(split_dirs, samples):
        paths, labels = [], []
        for label, name in enumerate(classes):
            class_dir = os.path.join(split_dir, name)
            files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise SystemExit(f"error: class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                 "add images or remove the folder from both splits")
            paths += [os.path.join(class_dir, file) for file in files]
            labels += [label] * len(files)
        labels = torch.tensor(labels)
        keep = balanced_subset(labels, num_samples, seed)
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # Pillow decodes without holding the GIL
            images = list(pool.map(lambda path: _read_image(path, img_size), [paths[i] for i in keep.tolist()]))
        splits.append((torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels[keep]))
    return splits, classes


def _read_image(path, img_size):
    try:
        with Image.open(path) as image:
            image = image.convert('RGB')
            if image.size != (img_size, img_size):
                image = image.resize((img_size, img_size), Image.BILINEAR)
            return np.asarray(image)
    except OSError as e:
        raise SystemExit(f"error: cannot read image {path} ({e}); remove or replace it")


def _resize(images, size):
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    resized = F.interpolate(images.float(), size=size, mode='bilinear', antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _check_writable(path, flag, purpose):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise SystemExit(f"error: cannot write to {flag} {path} {purpose} ({e.strerror or e}); "
                         f"choose a writable {flag}")


def balanced_subset(labels, num_samples, seed):
    """Indices of a seeded subset of `num_samples` with every class represented as equally as the data allows."""
    if num_samples <= 0 or num_samples >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    one_hot = F.one_hot(labels[order])
    rank_in_class = (one_hot.cumsum(0) * one_hot).sum(1)  # 1 for a class's first image in `order`, 2 for its second...
    return order[torch.argsort(rank_in_class, stable=True)[:num_samples]].sort().values


def norm_tensors(pretrained_cfg, device):
    """The model's own mean/std (0.5/0.5 for the augreg weights, not CIFAR's statistics), made once on the device."""
    return tuple(torch.tensor(pretrained_cfg[key], device=device).view(1, -1, 1, 1) for key in ('mean', 'std'))


def normalize(images, mean, std):
    """uint8 (B, 3, H, W) -> float32 normalised per channel (mean/std in [0, 1] units, tensors or sequences)."""
    mean = torch.as_tensor(mean, device=images.device).view(1, -1, 1, 1)  # no copy when already a device tensor
    std = torch.as_tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def crop_flip(images, shifts, flips, pad=4):
    """Per-image random crop (zero padding `pad`, as torchvision's RandomCrop(padding=pad)) and horizontal flip as
    one gather. shifts: (B, 2) ints in [0, 2*pad]; flips: (B,) bools."""
    batch, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = shifts[:, 0, None] + torch.arange(height, device=device)
    cols = torch.arange(width, device=device).expand(batch, -1)
    cols = torch.where(flips[:, None], width - 1 - cols, cols) + shifts[:, 1, None]
    return padded[torch.arange(batch, device=device)[:, None, None, None],
                  torch.arange(channels, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def train_batches(images, labels, batch_size, generator, mean, std, rank=0, world_size=1, pad=4):
    """One epoch of augmented training batches: (normalised images, labels) for this rank.

    `batch_size` is the global batch. The permutation and the augmentation draws are made for the whole global
    batch from the shared `generator`, then each rank takes its slice: every rank sees what a single process
    would have seen. The last incomplete batch is dropped so every step has the same shape.
    """
    n, device = len(labels), images.device
    order = torch.randperm(n, generator=generator, device=device)
    local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    for step in range(n // batch_size):
        index = order[step * batch_size:(step + 1) * batch_size][local]
        shifts = torch.randint(0, 2 * pad + 1, (batch_size, 2), generator=generator, device=device)[local]
        flips = torch.randint(0, 2, (batch_size,), generator=generator, device=device)[local].bool()
        yield normalize(crop_flip(images[index], shifts, flips, pad), mean, std), labels[index]


def eval_batches(images, labels, batch_size, mean, std, rank=0, world_size=1):
    """Test batches over this rank's contiguous shard: (normalised images, labels, valid). The last batch is padded
    to `batch_size` (static shapes for torch.compile); `valid` marks the real rows, so every image counts once."""
    n, device = len(labels), images.device
    shard = torch.arange(rank * n // world_size, (rank + 1) * n // world_size, device=device)
    for start in range(0, len(shard), batch_size):
        index = shard[start:start + batch_size]
        valid = torch.ones(batch_size, dtype=torch.bool, device=device)
        if len(index) < batch_size:
            valid[len(index):] = False
            index = torch.cat([index, index.new_zeros(batch_size - len(index))])
        yield normalize(images[index], mean, std), labels[index], valid
