"""The data path: uint8 tensors, balanced subsets, batched crop/flip, epoch order, rank slices, eval coverage."""
import errno
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
from conftest import REPO, deny_listing, run_main, TINY, write_folder_dataset


def test_crop_flip_matches_per_image_reference():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    shifts = torch.tensor([[0, 0], [8, 8], [4, 4], [0, 8], [3, 5], [7, 1]])
    flips = torch.tensor([False, True, False, True, True, False])
    out = data.crop_flip(images, shifts, flips)
    for i in range(6):  # torchvision's RandomCrop(32, padding=4) (zero fill) then RandomHorizontalFlip
        padded = F.pad(images[i], (4, 4, 4, 4))
        expected = padded[:, shifts[i, 0]:shifts[i, 0] + 32, shifts[i, 1]:shifts[i, 1] + 32]
        if flips[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)
    assert out.dtype == torch.uint8


def test_model_input_normalises_with_given_mean_std():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    out = data.model_input(images, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
    torch.testing.assert_close(out.flatten(), torch.tensor([-1.0, 2.0, 0.0]))


def test_model_input_resizes_per_batch():
    """--img_size 224 on 32 px CIFAR: stored images stay 32 px uint8, each batch is resized on its device."""
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = data.model_input(images, (0.5,) * 3, (0.5,) * 3, img_size=224)
    expected = F.interpolate(images.float(), size=(224, 224), mode='bilinear', antialias=True, align_corners=False)
    assert out.shape == (4, 3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out, (expected / 255 - 0.5) / 0.5)
    assert torch.equal(data.model_input(images, (0.5,) * 3, (0.5,) * 3, img_size=32),
                       data.model_input(images, (0.5,) * 3, (0.5,) * 3))  # no resize at the stored size


def test_model_input_shrinks_with_antialiasing():
    """--img_size below the stored size (16 px from CIFAR's 32): bilinear without antialiasing would alias."""
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(images.float(), size=(32, 32), mode='bilinear', antialias=True, align_corners=False)
    torch.testing.assert_close(data.model_input(images, (0.5,) * 3, (0.5,) * 3, img_size=32),
                               (expected / 255 - 0.5) / 0.5)


def test_train_batches_are_seeded_permutations():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 3, 8, 8).contiguous()
    labels = torch.arange(50)
    identity = ((0.,) * 3, (1.,) * 3, None)

    def epoch(seed):
        generator = torch.Generator().manual_seed(seed)
        return [(x.clone(), y.clone()) for x, y in data.train_batches(images, labels, 16, generator, identity)]
    first, again, other = epoch(0), epoch(0), epoch(1)
    assert len(first) == 3  # 50 // 16: the incomplete last batch is dropped
    seen = torch.cat([y for _, y in first])
    assert len(set(seen.tolist())) == 48  # no repeats within an epoch
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(seen, torch.cat([y for _, y in other]))
    for x, y in first:  # images travel with their labels (the centre pixel survives any 1-px crop and the flip)
        assert torch.equal(x[:, 0, 4, 4], y.float() / 255)


def test_augmentation_draws_every_shift_and_flips_half():
    """The seed's recipe: a random crop of the image padded by 1/8 of its side (4 px at 32: shifts 0..8 each way,
    every one of them) and a horizontal flip of half the images. Each pixel here holds its own row and column + 1
    (0 is padding), so the centre pixel of an augmented image says where it came from."""
    n, side, pad = 512, 32, 4
    rows = torch.arange(1, side + 1).view(side, 1).expand(side, side)
    image = torch.stack([rows, rows.T, rows]).to(torch.uint8)
    images = image[None].expand(n, -1, -1, -1).contiguous()
    identity = ((0.0,) * 3, (1 / 255,) * 3, None)  # model_input divides by 255: back to the stored values
    ((batch, _),) = data.train_batches(images, torch.zeros(n, dtype=torch.long), n, torch.Generator().manual_seed(0),
                                       identity)
    centre = batch[:, :2, side // 2, side // 2].round().long() - 1  # (source row, source column) of pixel (16, 16)
    flipped = batch[:, 1, side // 2, side // 2 + 1] < batch[:, 1, side // 2, side // 2]  # columns run backwards
    row_shifts = centre[:, 0] - side // 2 + pad
    col_shifts = torch.where(flipped, side - 1 - centre[:, 1], centre[:, 1]) - side // 2 + pad
    assert set(row_shifts.tolist()) == set(range(2 * pad + 1)) == set(col_shifts.tolist())
    assert 0.4 < flipped.float().mean().item() < 0.6


def test_preprocessing_uses_the_weights_mean_and_std_in_order():
    """0.5/0.5 for the default weights would hide a swap; DeiT's or CLIP's weights would not."""
    mean, std, size = data.preprocessing(dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)), 'cpu', 32)
    assert mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3]) and size == 32
    assert std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])


def test_augment_false_gives_the_same_order_unaltered():
    """--augment False (official VPT on VTAB): the epoch's permutation as with augmentation, each image untouched."""
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40)
    identity = ((0.,) * 3, (1.,) * 3, None)
    plain = list(data.train_batches(images, labels, 16, torch.Generator().manual_seed(2), identity, augment=False))
    augmented = list(data.train_batches(images, labels, 16, torch.Generator().manual_seed(2), identity))
    assert [y.tolist() for _, y in plain] == [y.tolist() for _, y in augmented]
    for x, y in plain:
        assert torch.equal(x, images[y].float() / 255)
    assert any(not torch.equal(x, images[y].float() / 255) for x, y in augmented)  # crops and flips, by contrast


def test_epoch_order_is_drawn_on_the_cpu():
    """The permutation comes from a CPU generator whatever the device, so a run resumed on another device (or on
    8 GPUs instead of 1) sees the same images in the same order; a CUDA generator would draw another sequence."""
    images = torch.zeros(40, 3, 8, 8, dtype=torch.uint8)
    labels = torch.arange(40)
    seen = torch.cat([y for _, y in data.train_batches(images, labels, 10, torch.Generator().manual_seed(5),
                                                        ((0.,) * 3, (1.,) * 3, None))])
    assert torch.equal(seen, torch.randperm(40, generator=torch.Generator().manual_seed(5)))


def test_an_epoch_trains_the_head_of_its_permutation():
    """45 images, batch 10: the 5 left out are the permutation's last, as every run so far trained (a resumed run
    and a published seed's numbers reproduce only with the same images in each epoch)."""
    images = torch.zeros(45, 3, 8, 8, dtype=torch.uint8)
    seen = torch.cat([y for _, y in data.train_batches(images, torch.arange(45), 10, torch.Generator().manual_seed(5),
                                                        ((0.,) * 3, (1.,) * 3, None))])
    assert torch.equal(seen, torch.randperm(45, generator=torch.Generator().manual_seed(5))[:40])


@pytest.mark.parametrize('world_size', [2, 4])
def test_rank_slices_reassemble_the_single_process_batch(world_size):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (40,), generator=generator)
    preprocess = ((0.5,) * 3, (0.5,) * 3, 32)
    single = list(data.train_batches(images, labels, 8, torch.Generator().manual_seed(3), preprocess))
    ranks = [list(data.train_batches(images, labels, 8, torch.Generator().manual_seed(3), preprocess, rank,
                                     world_size)) for rank in range(world_size)]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(world_size)]), x)  # same crops and flips too
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(world_size)]), y)


def test_validation_split_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    train_index, val_index = data.split_validation(labels, 0.1, seed=0)
    assert torch.bincount(labels[val_index]).tolist() == [50, 30, 20]
    assert len(set(train_index.tolist()) & set(val_index.tolist())) == 0
    assert sorted(train_index.tolist() + val_index.tolist()) == list(range(1000))
    again = data.split_validation(labels, 0.1, seed=0)[1]
    assert torch.equal(val_index, again) and not torch.equal(val_index, data.split_validation(labels, 0.1, seed=1)[1])


def test_validation_split_keeps_a_training_image_of_every_class():
    labels = torch.tensor([0] + [1] * 10 + [2] * 2)
    train_index, val_index = data.split_validation(labels, 0.6, seed=0)
    assert torch.bincount(labels[train_index]).tolist() == [1, 4, 1]  # round(0.6) = 1 of 1 would leave class 0 none
    assert torch.bincount(labels[val_index], minlength=3).tolist() == [0, 6, 1]


def test_16_bit_png_keeps_its_levels(tmp_path):
    levels = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472: most above 255
    Image.fromarray(levels).save(tmp_path / 'grey16.png')
    assert Image.open(tmp_path / 'grey16.png').mode.startswith('I')
    image = data.read_image(tmp_path / 'grey16.png')
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 1], levels >> 8)  # scaled to 8 bits, not clipped to white


def test_32_bit_integer_levels_outside_16_bits_are_clipped_not_wrapped(tmp_path):
    Image.fromarray(np.array([[-5, 70000, 300]], np.int32), 'I').save(tmp_path / 'int32.tif')
    assert data.read_image(tmp_path / 'int32.tif')[0, :, 0].tolist() == [0, 255, 1]  # 300 >> 8 is 1


def save_sideways(path, pixels):
    """`pixels` stored as a phone does a photo taken upright with the phone turned: rotated, with EXIF orientation 6
    ('turn 90 degrees clockwise to view'); viewers show `pixels`."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels, 1))).save(path, exif=exif)


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    pixels = np.random.RandomState(0).randint(0, 256, (8, 4, 3), np.uint8)  # taller than wide
    save_sideways(tmp_path / 'photo.png', pixels)
    assert np.array_equal(data.read_image(tmp_path / 'photo.png'), pixels)
    assert data.read_image(tmp_path / 'photo.png', upright=False).shape == (4, 8, 3)  # as stored (folder_reading 3)


def test_a_folder_dataset_reads_photos_upright_but_a_run_of_folder_reading_3_as_it_did(tmp_path):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    pixels = np.random.RandomState(1).randint(0, 256, (8, 8, 3), np.uint8)
    save_sideways(os.path.join(root, 'train', 'a', '0000.png'), pixels)
    train_images = data.load_dataset(root, img_size=8)[0]
    assert np.array_equal(train_images[0].permute(1, 2, 0).numpy(), pixels)
    train_images = data.load_dataset(root, img_size=8, reading=3)[0]
    assert np.array_equal(train_images[0].permute(1, 2, 0).numpy(), np.rot90(pixels, 1))


def test_a_photo_is_read_upright_whichever_way_it_was_turned(tmp_path):
    """Phones store 3 (upside down) and 8 (turned the other way) as well as 6; each is shown upright by viewers."""
    pixels = np.random.RandomState(2).randint(0, 256, (8, 4, 3), np.uint8)
    for orientation, stored in ((3, np.rot90(pixels, 2)), (8, np.rot90(pixels, -1)), (2, pixels[:, ::-1])):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / f'{orientation}.png', exif=exif)
        assert np.array_equal(data.read_image(tmp_path / f'{orientation}.png'), pixels), orientation


def test_a_sideways_photo_among_images_of_other_sizes_is_read_as_the_folder_reading_says(tmp_path):
    """Images of mixed sizes are all resized as decoded: a photo turned upright there too, but not for a run of
    folder_reading 3, which read it as stored."""
    pixels = np.random.RandomState(3).randint(0, 256, (8, 4, 3), np.uint8)
    save_sideways(tmp_path / 'photo.png', pixels)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / 'square.png')
    paths = [str(tmp_path / 'photo.png'), str(tmp_path / 'square.png')]
    for reading, upright in ((4, True), (3, False)):
        images = data.read_images(paths, 8, reading=reading)
        assert images.shape == (2, 3, 8, 8)
        assert np.array_equal(images[0].permute(1, 2, 0).numpy(), data.read_image(paths[0], 8, upright=upright))
    assert not np.array_equal(data.read_image(paths[0], 8), data.read_image(paths[0], 8, upright=False))


def save_photo(path, width, height):
    """A camera-like picture: smooth shapes and a little noise, saved as a JPEG (or as `path`'s format)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([128 + 100 * np.sin(9 * x + 4 * y), 128 + 90 * np.cos(7 * y), 255 * x * y], axis=2)
    noise = np.random.RandomState(4).normal(0, 6, pixels.shape)
    Image.fromarray((pixels + noise).clip(0, 255).astype(np.uint8)).save(path, quality=90)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_to_nearly_the_same_pixels(tmp_path, monkeypatch):
    """Camera photos for a 32 px model: libjpeg decodes a JPEG at 1/2, 1/4 or 1/8 scale, never below twice the
    size it is resized to (Pillow's thumbnail rule), a fraction of the work of the whole file."""
    save_photo(tmp_path / 'photo.jpg', 600, 400)
    resized_from, resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, 'resize', lambda image, *a, **k: resized_from.append(image.size)
                        or resize(image, *a, **k))
    reduced = data.read_image(tmp_path / 'photo.jpg', 32).astype(int)
    whole = data.read_image(tmp_path / 'photo.jpg', 32, draft=False).astype(int)
    assert resized_from == [(150, 100), (600, 400)]  # 1/4: 1/8 would be 75 x 50, under 64 on a side
    assert reduced.shape == whole.shape == (32, 32, 3)
    assert 0 < np.abs(reduced - whole).mean() < 1.5 and np.abs(reduced - whole).max() <= 12
    save_photo(tmp_path / 'small.jpg', 120, 400)  # under 4x32 on a side: decoded whole
    save_photo(tmp_path / 'photo.png', 600, 400)  # not a JPEG: decoded whole
    resized_from.clear()
    for name in ('small.jpg', 'photo.png'):
        assert np.array_equal(data.read_image(tmp_path / name, 32), data.read_image(tmp_path / name, 32, draft=False))
    assert resized_from == [(120, 400)] * 2 + [(600, 400)] * 2


def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_twice_img_size(tmp_path, monkeypatch):
    """The rule sets a run's pixels, which its resume and evaluation read again: 1/2 from 4x --img_size on a side,
    1/4 from 8x, 1/8 from 16x; a side 1 px short of one keeps the scale above it."""
    resized_from, resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, 'resize', lambda image, *a, **k: resized_from.append(image.size[0])
                        or resize(image, *a, **k))
    decoded = {127: 127, 128: 64, 255: 128, 256: 64, 511: 128, 512: 64}  # side -> side decoded, --img_size 32
    for side in decoded:
        save_photo(tmp_path / f'{side}.jpg', side, side)
        assert data.read_image(tmp_path / f'{side}.jpg', 32).shape == (32, 32, 3)
    assert resized_from == list(decoded.values())


def test_a_sideways_jpeg_is_decoded_at_a_reduced_scale_too(tmp_path, monkeypatch):
    """A phone stores most photos sideways with an EXIF orientation: reduced before it is turned upright (turned first,
    it is no longer a JPEG to reduce and is decoded whole, other pixels and the time saved lost)."""
    save_photo(tmp_path / 'upright.png', 400, 600)
    pixels = np.asarray(Image.open(tmp_path / 'upright.png'))
    save_sideways(tmp_path / 'photo.jpg', pixels)
    resized_from, resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, 'resize', lambda image, *a, **k: resized_from.append(image.size)
                        or resize(image, *a, **k))
    reduced = data.read_image(tmp_path / 'photo.jpg', 32).astype(int)
    assert resized_from == [(100, 150)]  # stored 600 x 400, decoded at 1/4, then turned upright
    whole = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR)).astype(int)
    assert np.abs(reduced - whole).mean() < 1.5  # upright, as viewers show it


def test_a_run_of_folder_reading_4_reads_its_jpegs_whole_as_it_did(tmp_path):
    """A run recorded before reduced-scale decoding resumes and evaluates on the pixels it was trained on, whether its
    other images are --img_size already or smaller (then every image is resized, in a second pass)."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    for name in ('a/0000', 'b/0001'):
        os.remove(os.path.join(root, 'train', f'{name}.png'))
        save_photo(os.path.join(root, 'train', f'{name}.jpg'), 160, 96)
    paths = sorted(data.image_files(os.path.join(root, 'train')))
    for smaller in (False, True):
        if smaller:
            Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(paths[1])
        for reading, draft in ((5, True), (4, False)):
            read = [image.permute(1, 2, 0).numpy() for image in data.load_dataset(root, img_size=8, reading=reading)[0]]
            assert all(np.array_equal(got, data.read_image(path, 8, draft=draft)) for got, path in zip(read, paths))
    assert not np.array_equal(data.read_image(paths[0], 8), data.read_image(paths[0], 8, draft=False))


def test_a_200_megapixel_phone_photo_is_read_without_a_bomb_warning(tmp_path):
    """A phone's 200 MP mode writes 16,320 x 12,240 JPEGs: Pillow refused them as decompression bombs (above 179 M
    pixels), and that one file failed the whole folder's load; 108 MP photos drew a "DOS attack" warning each."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    Image.new('L', (16400, 12300), 90).save(os.path.join(root, 'train', 'a', 'huge.jpg'), quality=50)  # 201.7 M
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        images = data.load_dataset(root, img_size=8)[0]
    assert images.shape == (5, 3, 8, 8) and int(images[2].float().mean()) in range(88, 93)  # a/huge.jpg sorts third


def test_photos_resized_as_they_are_read_are_noted_once(tmp_path, capsys):
    """A folder of photos trains at 32x32 by default: said, not silent; CIFAR-sized images are kept, without a note."""
    root = write_folder_dataset(tmp_path / 'photos', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=48)
    assert data.load_dataset(root, img_size=32)[0].shape == (4, 3, 32, 32)
    assert capsys.readouterr().err == (f"note: the images of {root} are resized to 32x32 (--img_size) as they are "
                                       f"read, not cropped; {os.path.join('train', 'a', '0000.png')} is 48x48\n")
    root = write_folder_dataset(tmp_path / 'small', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=32)
    assert data.load_dataset(root, img_size=224)[0].shape == (4, 3, 32, 32)  # resized per batch, on the device
    assert data.load_dataset(root, img_size=32)[0].shape == (4, 3, 32, 32)
    assert capsys.readouterr().err == ''
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(os.path.join(root, 'train', 'b', '0001.png'))  # the last
    data.load_dataset(root, img_size=32)
    assert capsys.readouterr().err.endswith(f"; {os.path.join('train', 'b', '0001.png')} is 30x20\n")
    for size, img_size, hint in (((300, 224), 32, True), ((300, 223), 32, False), ((300, 250), 224, False)):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(os.path.join(root, 'train', 'b', '0001.png'))
        data.load_dataset(root, img_size=img_size)  # a photo at 32 px: the way to train at VPT's own size is named
        err = capsys.readouterr().err
        assert err.endswith("; photos keep more detail at VPT's 224 px: --img_size 224 --patch_size 16\n") == hint
        assert ('--patch_size' in err) == hint and (img_size == 224 or f" is {size[0]}x{size[1]}" in err), err


def test_photos_resized_as_they_are_read_are_noted_however_few_and_wherever_they_lie(tmp_path, capsys):
    """A photo only taller than --img_size is squashed too; and one past the first 200 images is looked at (the 200
    headers read are spread over the split)."""
    root = write_folder_dataset(tmp_path / 'tall', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    Image.fromarray(np.zeros((12, 8, 3), np.uint8)).save(os.path.join(root, 'train', 'b', '0001.png'))
    data.load_dataset(root, img_size=8)
    assert capsys.readouterr().err.endswith(f"; {os.path.join('train', 'b', '0001.png')} is 8x12\n")
    root = tmp_path / 'many'
    shutil.copytree(tmp_path / 'tall' / 'test', root / 'test')
    for name in ('a', 'b'):
        os.makedirs(root / 'train' / name)
        for i in range(150):  # 300 train images: every second header is read
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'train' / name / f'{i:04d}.png')
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / 'train' / 'b' / '0148.png')  # the 299th
    data.load_dataset(str(root), img_size=8)
    assert capsys.readouterr().err.endswith(f"; {os.path.join('train', 'b', '0148.png')} is 16x16\n")


def test_test_split_holds_out_a_stratified_test_set_from_a_folder_without_one(tmp_path):
    """One's own data often comes as class folders alone: --test_split makes the test set, the same for every run."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b', 'c'), train_per_class=10, test_per_class=1, size=4)
    shutil.rmtree(os.path.join(root, 'test'))
    train_x, train_y, test_x, test_y, classes, available = data.load_dataset(root, img_size=4, test_split=0.2)
    assert classes == ['a', 'b', 'c'] and available == {'train': 24, 'test': 6}
    assert torch.bincount(test_y).tolist() == [2, 2, 2] and torch.bincount(train_y).tolist() == [8, 8, 8]
    images = lambda x: {bytes(image.flatten().tolist()) for image in x}
    assert len(images(train_x) | images(test_x)) == 30 and not images(train_x) & images(test_x)  # all, each once
    again = data.load_dataset(root, img_size=4, test_split=0.2)
    assert torch.equal(again[2], test_x) and torch.equal(again[3], test_y)  # --data_seed's, not a new draw
    other = data.load_dataset(root, img_size=4, test_split=0.2, seed=1)
    assert images(other[2]) != images(test_x)
    # a file renamed moves no other image between the sides: the test images stay ones the model never saw
    names = sorted(os.listdir(os.path.join(root, 'train', 'a')))
    kept, held_out = data.split_by_name([f'a/{name}' for name in names], torch.zeros(10, dtype=torch.long), 0.2, 0)
    renamed = list(names)
    renamed[kept[0]] = 'zzz_' + renamed[kept[0]]
    kept_after, held_out_after = data.split_by_name([f'a/{name}' for name in renamed], torch.zeros(10, dtype=torch.long),
                                                    0.2, 0)
    assert [names[i] for i in held_out] == [renamed[i] for i in held_out_after]


def test_test_split_names_what_is_wrong_with_a_folder_of_class_folders(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=4, test_per_class=1, size=4)
    shutil.rmtree(os.path.join(root, 'test'))
    for name in ('a', 'b'):  # the class folders right under the dataset, as one's own data often is
        os.rename(os.path.join(root, 'train', name), os.path.join(root, name))
    os.rmdir(os.path.join(root, 'train'))
    with pytest.raises(SystemExit, match=r"has no train/ folder \(its subfolders a, b hold images: move the class "
                                         r"folders into .*train/\); with --test_split a folder dataset needs train/"):
        data.load_dataset(root, img_size=4, test_split=0.25)
    with pytest.raises(SystemExit, match=r"move the class folders into .*train/, and pass --test_split 0.2, say, to "
                                         r"hold out a fraction of them as the test set\); a folder dataset needs"):
        data.load_dataset(root, img_size=4)  # without test/ either: one step to a dataset that loads, not two
    os.makedirs(os.path.join(root, 'train'))
    os.rename(os.path.join(root, 'a'), os.path.join(root, 'train', 'a'))
    os.makedirs(os.path.join(root, 'train', 'b'))
    os.rename(os.path.join(root, 'b'), os.path.join(root, 'train', 'b', '.thumbnails'))  # only a hidden folder
    with pytest.raises(SystemExit, match=r"train/b has no images .* outside hidden folders, which are left out "
                                         r"\(b/.thumbnails\); add images or remove the folder$"):
        data.load_dataset(root, img_size=4, test_split=0.25)
    shutil.rmtree(os.path.join(root, 'train', 'b', '.thumbnails'))
    shutil.copytree(os.path.join(root, 'train', 'a'), os.path.join(root, 'train', 'b'), dirs_exist_ok=True)
    os.makedirs(os.path.join(root, 'val'))
    data.load_dataset(root, img_size=4, test_split=0.25)
    assert capsys.readouterr().err.startswith(f"note: {os.path.join(root, 'val')} is not read: --test_split holds out")


def test_test_split_holds_out_the_same_files_wherever_the_dataset_lies(tmp_path):
    """The held-out files are fixed by their names under the dataset (and --data_seed): a copy of the dataset elsewhere,
    or this code in a later version, resumes a --test_split run on the test set it never trained on."""
    for where in ('here', 'there/deeper'):
        root = tmp_path / where / 'ds'
        for label, name in enumerate(('a', 'b')):
            os.makedirs(root / 'train' / name)
            for i in range(10):
                Image.fromarray(np.full((2, 2, 3), 10 * label + i, np.uint8)).save(root / 'train' / name / f'{i}.png')
        test_x, test_y = data.load_dataset(str(root), img_size=2, test_split=0.3)[2:4]
        assert sorted(test_x[:, 0, 0, 0].tolist()) == [0, 4, 5, 15, 17, 19] and test_y.tolist() == [0, 0, 0, 1, 1, 1]
    kept, held_out = data.split_by_name(['x/0', 'x/1', 'x/2', 'y/0', 'y/1', 'y/2', 'y/3'],
                                        torch.tensor([0, 0, 0, 1, 1, 1, 1]), 0.5, 7)
    assert (kept.tolist(), held_out.tolist()) == ([2, 3, 4], [0, 1, 5, 6])


def test_test_split_messages_name_train_alone(tmp_path):
    """With --test_split there is no test/ to put images in: a class without images names its own hidden folders,
    and one class folder asks for more in train/."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=4)
    shutil.rmtree(os.path.join(root, 'test'))
    os.makedirs(os.path.join(root, 'train', 'a', '.cache'))
    shutil.copy(os.path.join(root, 'train', 'a', '0000.png'), os.path.join(root, 'train', 'a', '.cache'))
    os.makedirs(os.path.join(root, 'train', 'b', '.thumbnails'))
    for name in os.listdir(os.path.join(root, 'train', 'b')):
        if name.endswith('.png'):
            os.rename(os.path.join(root, 'train', 'b', name), os.path.join(root, 'train', 'b', '.thumbnails', name))
    with pytest.raises(SystemExit) as error:
        data.load_dataset(root, img_size=4, test_split=0.5)
    assert str(error.value).endswith(f"which are left out ({os.path.join('b', '.thumbnails')}); add images or remove "
                                     f"the folder")
    shutil.rmtree(os.path.join(root, 'train', 'b'))
    with pytest.raises(SystemExit) as error:
        data.load_dataset(root, img_size=4, test_split=0.5)
    assert str(error.value).endswith("has one class folder (a); classification needs two or more, each class's images "
                                     "in train/<class>/")


def test_notes_about_a_folder_dataset_come_from_the_first_process_of_a_machine_only(tmp_path, capsys, monkeypatch):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    data.load_dataset(root, img_size=4)
    assert 'resized to 4x4' in capsys.readouterr().err
    os.rename(os.path.join(root, 'test'), os.path.join(root, 'val'))
    for local_rank, noted in (('1', False), ('0', True)):
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        data.load_dataset(root, img_size=4, test_split=0.5)
        err = capsys.readouterr().err
        assert ('is not read: --test_split' in err, 'resized to 4x4' in err) == (noted, noted), local_rank


def test_a_val_folder_beside_test_is_no_note_without_test_split(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    shutil.copytree(os.path.join(root, 'test'), os.path.join(root, 'val'))
    data.load_dataset(root, img_size=8)
    assert capsys.readouterr().err == ''


def test_a_float_image_is_refused_not_clipped(tmp_path):
    Image.fromarray(np.full((32, 32), 0.75, np.float32)).save(tmp_path / 'float.tif')  # mode F: 0.75 would become 0
    with pytest.raises(ValueError, match='floating-point pixels'):
        data.read_image(tmp_path / 'float.tif')


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_eval_batches_count_every_image_once(world_size):
    images = torch.zeros(23, 3, 4, 4, dtype=torch.uint8)
    labels = torch.arange(23)
    counted = []
    for rank in range(world_size):
        for x, y, valid in data.eval_batches(images, labels, 5, ((0.,) * 3, (1.,) * 3, None), rank, world_size):
            assert x.shape[0] == 5 and y.shape[0] == 5  # static shapes, padded
            counted += y[valid].tolist()
    assert sorted(counted) == list(range(23))


@pytest.mark.parametrize('seed', [0, 3])
def test_balanced_subset_picks_what_it_always_picked(seed):
    """The subset a --train_samples run keeps, as the first implementation chose it (it held an N x classes one-hot
    matrix: about 33 GB for ImageNet-1k's training set), so runs made before still resume on their own images."""
    labels = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(seed))
    labels[labels == 4] = 5  # a class with no images
    for num_samples in (1, 35, 123, 499):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        one_hot = F.one_hot(labels[order])
        rank_in_class = (one_hot.cumsum(0) * one_hot).sum(1)
        expected = order[torch.argsort(rank_in_class, stable=True)[:num_samples]].sort().values
        assert torch.equal(data.balanced_subset(labels, num_samples, seed), expected)


def test_balanced_subset():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    subset = data.balanced_subset(labels, 90, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [30, 30, 30]
    assert torch.equal(subset, data.balanced_subset(labels, 90, seed=0))
    assert not torch.equal(subset, data.balanced_subset(labels, 90, seed=1))
    assert torch.bincount(labels[data.balanced_subset(labels, 700, seed=0)]).tolist() == [250, 250, 200]
    assert len(data.balanced_subset(labels, 0, seed=0)) == 1000


def test_folder_dataset_loads_classes_in_sorted_order(tmp_path):
    root = write_folder_dataset(tmp_path / 'ds', classes=('b_dog', 'a_cat'), train_per_class=3, test_per_class=2, size=40)
    train_x, train_y, test_x, test_y, classes, _ = data.load_dataset(root, img_size=48)
    assert classes == ['a_cat', 'b_dog']
    assert train_x.shape == (6, 3, 40, 40) and train_x.dtype == torch.uint8  # no larger than 48: kept at its own size
    assert train_y.tolist() == [0, 0, 0, 1, 1, 1] and test_y.tolist() == [0, 0, 1, 1]
    # class 'a_cat' was written with the second colour of write_folder_dataset: its mean red is 60 + 80 * 1
    assert abs(train_x[:3, 0].float().mean().item() - 140) < 10


def test_folder_of_mixed_sizes_is_resized_to_img_size(tmp_path):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=40)
    from PIL import Image
    Image.new('RGB', (50, 30), (10, 20, 30)).save(os.path.join(root, 'train', 'b', 'odd.png'))
    train_x, train_y, test_x, *_ = data.load_dataset(root, img_size=48)
    assert train_x.shape == (5, 3, 48, 48) and test_x.shape == (2, 3, 40, 40)  # only the mixed split is resized
    assert train_y.tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize('first', ['large', 'small'])
def test_images_larger_than_img_size_are_shrunk_as_decoded(tmp_path, first):
    """However large the files, a split holds at most N x 3 x img_size^2 bytes: a folder of 12 MP photos must not
    need 36 MB per image (or, with one large image first, an array of the large size for every image)."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=3, test_per_class=1, size=24)
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    name = '0000.png' if first == 'large' else 'zzzz.png'  # decoded first or last
    Image.fromarray(photo).save(os.path.join(root, 'train', 'a', name))
    for test_file in os.listdir(os.path.join(root, 'test', 'b')):  # a split of large images only
        Image.fromarray(photo).save(os.path.join(root, 'test', 'b', test_file))
    Image.fromarray(photo).save(os.path.join(root, 'test', 'a', '0000.png'))
    train_x, train_y, test_x, *_ = data.load_dataset(root, img_size=32)
    assert train_x.shape == (6 + (first == 'small'), 3, 32, 32) and test_x.shape == (2, 3, 32, 32)
    expected = np.asarray(Image.fromarray(photo).resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
    assert torch.equal(test_x[0], torch.from_numpy(expected.copy()))


@pytest.mark.parametrize('reading, side', [(1, 64), (2, 32), (3, 32)])
def test_images_of_one_larger_size_are_shrunk_as_decoded_since_folder_reading_2(tmp_path, reading, side):
    """Runs recorded with folder_reading 1 kept such images whole (resized per batch); 2 and later shrink them as
    they are decoded. A resumed or evaluated run reads its images by its own recorded rule, so both stay."""
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(paths[-1])
    assert data.read_images(paths, 32, reading=reading).shape == (3, 3, side, side)


def test_images_no_larger_than_img_size_keep_their_own_size(tmp_path):
    """Only a larger image is shrunk as it is decoded: one whose longest side is --img_size (32x24) is kept as it is,
    and the batch resizes it on the device, as runs recorded it."""
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(paths[-1])
    assert data.read_images(paths, 32).shape == (3, 3, 24, 32)


def test_hidden_files_are_skipped_and_subfolders_searched(tmp_path):
    """What a macOS zip, Finder or Jupyter leaves in a dataset is not data; images in subfolders of a class are (as
    torchvision's ImageFolder finds them)."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1)
    (tmp_path / 'ds' / 'train' / 'a' / '._0000.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    (tmp_path / 'ds' / 'train' / '.DS_Store').write_bytes(b'Bud1')
    for junk in ('__MACOSX/a', '.ipynb_checkpoints', 'b/.ipynb_checkpoints'):
        os.makedirs(tmp_path / 'ds' / 'train' / junk)
    Image.new('RGB', (32, 32)).save(tmp_path / 'ds' / 'train' / '__MACOSX' / 'a' / 'x.png')
    os.makedirs(tmp_path / 'ds' / 'train' / 'b' / 'more' / 'deeper')
    for folder in ('more', 'more/deeper'):
        Image.new('RGB', (32, 32), (1, 2, 3)).save(tmp_path / 'ds' / 'train' / 'b' / folder / 'x.png')
    os.symlink(tmp_path / 'ds' / 'train' / 'b', tmp_path / 'ds' / 'train' / 'b' / 'more' / 'loop')  # walked once
    train_x, train_y, _, _, classes, _ = data.load_dataset(root, img_size=32)
    assert classes == ['a', 'b'] and train_y.tolist() == [0, 0, 1, 1, 1, 1]
    assert train_x[-1].flatten(1).T.unique(dim=0).tolist() == [[1, 2, 3]]  # more/deeper/x.png, sorted last


@pytest.mark.parametrize('where', ['train/b/more', 'train/b', 'train'])
def test_a_folder_that_cannot_be_listed_is_named_not_left_out(tmp_path, monkeypatch, where):
    """os.walk passes over a folder it may not list: a class's subfolder of another user's (chmod 700) was left out of
    the dataset without a word (fewer images, dataset_images counting them so), a whole class folder was said to have
    no images, and an unlistable train/ was a traceback."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1)
    os.makedirs(tmp_path / 'ds' / 'train' / 'b' / 'more')
    Image.new('RGB', (32, 32)).save(tmp_path / 'ds' / 'train' / 'b' / 'more' / 'x.png')
    deny_listing(monkeypatch, [tmp_path / 'ds' / where])
    with pytest.raises(SystemExit) as e:
        data.load_dataset(root, img_size=32)
    assert str(e.value) == (f"error: cannot read the folder {tmp_path / 'ds' / where} (Permission denied); give your "
                            f"user read and search permission on it (chmod u+rx, or ask its owner), or move it out of "
                            f"the way")


def test_a_folder_listed_but_not_entered_is_the_one_named(tmp_path, monkeypatch):
    """train/ with read but no search permission (chmod 600): its class folders are listed, but cannot be entered; the
    error named train/cat, whose own permissions are fine (and chmod on it fails too), not train/. Denial is played."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1)
    train = str(tmp_path / 'ds' / 'train')
    deny_listing(monkeypatch, [tmp_path / 'ds' / 'train' / 'a'])
    access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: access(p, mode, **kw) and not (
        str(p) == train and mode & os.X_OK))
    with pytest.raises(SystemExit) as e:
        data.load_dataset(root, img_size=32)
    assert str(e.value).startswith(f"error: cannot read the folder {train} (Permission denied); ")


def test_a_folder_that_cannot_be_read_for_another_reason_is_not_told_to_chmod(tmp_path):
    """os.walk's other errors (a folder removed while it is read, a link loop) are named with their own reason: the
    permission advice and the climb to a parent that cannot be entered are for a permission error only."""
    error = OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(tmp_path / 'gone' / 'cat'))
    with pytest.raises(SystemExit) as e:
        data.unreadable_folder(error)
    assert str(e.value) == (f"error: cannot read the folder {tmp_path / 'gone' / 'cat'} (No such file or directory); "
                            f"mend it, or move it out of the way")


@pytest.mark.parametrize('denied', [os.R_OK, os.X_OK])
def test_a_dataset_folder_the_user_may_not_read_is_named(tmp_path, monkeypatch, denied):
    """--dataset of another user's (chmod 700, or 600: listed but not entered): its train/ and test/ looked missing,
    and the hint that lists the folder was a PermissionError traceback. Denial is played (the tests run as root)."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=1, test_per_class=1, size=8)
    access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: access(p, mode, **kw) and not (
        str(p) == root and mode & denied))
    with pytest.raises(SystemExit) as e:
        data.load_dataset(root, img_size=8)
    assert str(e.value) == (f"error: cannot read the folder {root} (Permission denied); give your user read and search "
                            f"permission on it (chmod u+rx, or ask its owner), or move it out of the way")


def test_a_relative_folder_that_cannot_be_listed_is_named_not_a_hang(tmp_path):
    """--predict photos (a relative path) of another user's: the climb to a parent that cannot be entered must stop at
    the path's first part, whose parent '' os.access calls missing. Denial is played in the child process."""
    os.makedirs(tmp_path / 'photos')
    code = (f"import os, sys; sys.path.insert(0, {REPO!r}); import data; scandir = os.scandir\n"
            f"def listing(path='.'):\n"
            f"    if path == 'photos': raise PermissionError(13, 'Permission denied', path)\n"
            f"    return scandir(path)\n"
            f"os.scandir = listing; data.image_files('photos')")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: cannot read the folder photos (Permission denied); give your user read and search permission on it "
        "(chmod u+rx, or ask its owner), or move it out of the way"), result.stderr


def test_a_folder_of_a_run_of_folder_reading_1_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """A run made before folder_reading 2 lists each class folder once, without os.walk: one it may not list was a
    PermissionError traceback, not the one line of a later run."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=1, test_per_class=1, size=8)
    denied = os.path.join(root, 'train', 'b')
    listdir = os.listdir

    def listing(path='.'):
        if os.path.abspath(path) == denied:
            raise PermissionError(13, 'Permission denied', path)
        return listdir(path)
    monkeypatch.setattr(os, 'listdir', listing)
    with pytest.raises(SystemExit) as e:
        data.load_dataset(root, img_size=8, reading=1)
    assert str(e.value).startswith(f"error: cannot read the folder {denied} (Permission denied); ")


def test_a_hidden_folder_that_cannot_be_listed_stops_nothing(tmp_path, monkeypatch):
    """A NAS's @eaDir/ or a .Trash-1000/ of another user's is left out whatever its permissions: the check for images
    in it to name (a warning) must not make it an error that stops the run."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    hidden = [tmp_path / 'ds' / 'train' / '.Trash-1000', tmp_path / 'ds' / 'train' / 'a' / '@eaDir']
    for folder in hidden:
        os.makedirs(folder)
    deny_listing(monkeypatch, hidden)
    *_, classes, available = data.load_dataset(root, img_size=8)
    assert classes == ['a', 'b'] and available == {'train': 4, 'test': 2}


def test_a_synology_nas_thumbnail_folder_is_left_out_but_read_by_runs_of_folder_reading_5(tmp_path):
    """A Synology NAS keeps 3-5 JPEG thumbnails of each photo in @eaDir/<photo>/ beside it: read as images of the
    class, they multiplied its images, and with --test_split put thumbnails of test photos into train/."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1)
    for split, count in (('train', 2), ('test', 1)):
        for name in ('a', 'b'):
            for i in range(count):
                thumbs = tmp_path / 'ds' / split / name / '@eaDir' / f'{i:04d}.png'
                os.makedirs(thumbs)
                for size in ('XL', 'M', 'SM'):
                    Image.new('RGB', (16, 16)).save(thumbs / f'SYNOPHOTO_THUMB_{size}.jpg')
    *_, available = data.load_dataset(root, img_size=32)
    assert available == {'train': 4, 'test': 2}
    *_, available = data.load_dataset(root, img_size=32, reading=5)  # as the run recorded with 5 was trained
    assert available == {'train': 16, 'test': 8}


def test_a_synology_nas_folder_beside_the_class_folders_is_a_class_only_for_runs_of_folder_reading_5(tmp_path,
                                                                                                     capsys):
    """train/@eaDir/ and test/@eaDir/ (thumbnails of the folders): no class since folder_reading 6, and named as left
    out; a run recorded with 5 resumes on the classes it was trained on, without a warning about them."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=1, test_per_class=1, size=8)
    for split in ('train', 'test'):
        os.makedirs(tmp_path / 'ds' / split / '@eaDir')
        Image.new('RGB', (8, 8)).save(tmp_path / 'ds' / split / '@eaDir' / 'SYNOFILE_THUMB_M.jpg')
    assert data.load_dataset(root, img_size=8)[4] == ['a', 'b']
    assert 'folders are not classes, left out with their images: @eaDir' in capsys.readouterr().err
    assert data.load_dataset(root, img_size=8, reading=5)[4] == ['@eaDir', 'a', 'b']
    assert 'warning' not in capsys.readouterr().err


def test_a_fifo_named_like_an_image_is_unreadable_not_a_hang(tmp_path):
    """Opening a FIFO blocks until someone writes to it: a dataset load (or --predict on the folder) hung forever."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    os.mkfifo(tmp_path / 'ds' / 'train' / 'a' / 'zz.png')
    code = f"import sys; sys.path.insert(0, {REPO!r}); import data; data.load_dataset({root!r}, img_size=8)"
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: cannot read 1 of 5 images: {tmp_path / 'ds' / 'train' / 'a' / 'zz.png'} (ValueError: not a regular "
        f"file); remove or replace them")


def test_a_linked_folder_beside_its_target_is_read_once(tmp_path):
    """A class folder with 2019/ and a link latest -> 2019: the images once, not twice (a duplicate could land in the
    training set and in the val split)."""
    write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1)
    class_dir = tmp_path / 'ds' / 'train' / 'a'
    os.makedirs(class_dir / '2019')
    for name in ('0000.png', '0001.png'):
        os.rename(class_dir / name, class_dir / '2019' / name)
    os.symlink('2019', class_dir / 'latest')
    os.symlink(class_dir / '2019', class_dir / '0_first')  # sorted before its target: the link is read, once
    assert [os.path.relpath(path, class_dir) for path in data.image_files(str(class_dir))] == [
        os.path.join('0_first', '0000.png'), os.path.join('0_first', '0001.png')]
    # a run recorded with folder_reading 2 read them three times, and resumes on exactly that
    assert len(data.image_files(str(class_dir), reading=2)) == 6


def test_a_hidden_folder_with_images_is_named_when_left_out(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b', 'c'), train_per_class=2, test_per_class=1, size=8)
    os.makedirs(tmp_path / 'ds' / 'train' / '.ipynb_checkpoints')  # no images: left out quietly
    os.makedirs(tmp_path / 'ds' / 'train' / 'a' / '.ipynb_checkpoints')
    for split in ('train', 'test'):
        os.rename(tmp_path / 'ds' / split / 'c', tmp_path / 'ds' / split / '.c')
    os.makedirs(tmp_path / 'ds' / 'train' / 'b' / 'more' / '.old')  # inside a class, deeper: named too
    os.rename(tmp_path / 'ds' / 'train' / 'b' / '0001.png', tmp_path / 'ds' / 'train' / 'b' / 'more' / '.old' / 'x.png')
    _, train_y, _, _, classes, _ = data.load_dataset(root, img_size=8)
    assert classes == ['a', 'b'] and train_y.tolist() == [0, 0, 1]
    train, test = (os.path.join(root, split) for split in ('train', 'test'))
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: {train}: hidden (and __MACOSX) folders are not classes, left out with their images: .c",
        f"warning: {test}: hidden (and __MACOSX) folders are not classes, left out with their images: .c",
        f"warning: {train}: hidden (and __MACOSX) folders are left out with their images: {os.path.join('b', 'more', '.old')}"]


def test_images_outside_the_class_folders_are_named_when_left_out(tmp_path, capsys):
    """An image in train/ itself, beside the class folders, has no class: it is not read, with a warning, not
    without a word. --test_split reads train/ only."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    for name in ('x.jpg', 'y.PNG', 'z.png', 'w.png'):
        shutil.copy(tmp_path / 'ds' / 'train' / 'a' / '0000.png', tmp_path / 'ds' / 'train' / name)
    shutil.copy(tmp_path / 'ds' / 'test' / 'a' / '0000.png', tmp_path / 'ds' / 'test' / 'stray.png')
    (tmp_path / 'ds' / 'train' / 'notes.txt').write_text('not an image')
    (tmp_path / 'ds' / 'train' / '.DS_Store').write_bytes(b'')
    _, train_y, _, test_y, _, _ = data.load_dataset(root, img_size=8)
    assert len(train_y) == 4 and len(test_y) == 2
    train, test = (os.path.join(root, split) for split in ('train', 'test'))
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: {train}: 4 image files outside the class folders belong to no class and are not read (w.png, x.jpg, "
        f"y.PNG, ...); move each into its class's folder, train/<class>/",
        f"warning: {test}: 1 image file outside the class folders belongs to no class and is not read (stray.png); "
        f"move each into its class's folder, test/<class>/"]
    shutil.rmtree(test)
    data.load_dataset(root, img_size=8, test_split=0.5)
    assert capsys.readouterr().err.count('outside the class folders') == 1



def test_photos_in_a_format_not_read_are_named_when_left_out(tmp_path, capsys):
    """An iPhone's .HEIC photos (or a scanner's .tif) beside the JPEGs are not read: a warning, not fewer images
    without a word; a class folder holding only such files says so in its error."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    for name in ('a/IMG_1.HEIC', 'a/trip/IMG_2.heic', 'b/scan.tif', 'b/.IMG_3.HEIC', 'b/Thumbs.db'):
        os.makedirs(os.path.dirname(tmp_path / 'ds' / 'train' / name), exist_ok=True)
        (tmp_path / 'ds' / 'train' / name).write_bytes(b'not read')
    _, train_y, _, test_y, _, _ = data.load_dataset(root, img_size=8)
    assert len(train_y) == 4 and len(test_y) == 2
    train = os.path.join(root, 'train')
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: {train}: 3 files ({os.path.join('a', 'IMG_1.HEIC')}, {os.path.join('a', 'trip', 'IMG_2.heic')}, "
        f"{os.path.join('b', 'scan.tif')}) are in a format not read, left out; convert to JPEG or PNG to train on"]
    for name in ('0000.png', '0001.png'):
        os.remove(tmp_path / 'ds' / 'train' / 'b' / name)
    with pytest.raises(SystemExit) as error:
        data.load_dataset(root, img_size=8)
    assert str(error.value) == (f"error: class folder {os.path.join(train, 'b')} has no images (.jpg, .jpeg, .png, "
                                f".bmp, .gif, .webp); its 1 file ({os.path.join('b', 'scan.tif')}) is in a format not "
                                f"read: convert to JPEG or PNG, or remove the folder from both splits")

def test_the_loose_images_warning_names_only_visible_image_files_once_per_machine(tmp_path, capsys, monkeypatch):
    """Hidden files (macOS's ._ companions among them) are no images the user put there, and a class folder whose
    name ends in .jpg is a class; three loose images are all named, without '...'; under torchrun the first process
    of a machine warns, as for hidden folders."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b.jpg'), train_per_class=1, test_per_class=1, size=8)
    for name in ('x.png', 'y.png', 'z.png', '._x.png', '.hidden.jpg'):
        shutil.copy(tmp_path / 'ds' / 'train' / 'a' / '0000.png', tmp_path / 'ds' / 'train' / name)
    train = os.path.join(root, 'train')
    for local_rank, warned in (('1', False), ('0', True)):
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        assert data.load_dataset(root, img_size=8)[4] == ['a', 'b.jpg']
        assert capsys.readouterr().err.strip().splitlines() == [
            f"warning: {train}: 3 image files outside the class folders belong to no class and are not read (x.png, "
            f"y.png, z.png); move each into its class's folder, train/<class>/"][:warned]


def test_every_unreadable_image_is_named_in_one_error(tmp_path, monkeypatch):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=3, test_per_class=1)
    for name in ('a/0001.png', 'b/0002.png'):
        (tmp_path / 'ds' / 'train' / name).write_bytes(b'not an image')
    Image.new('RGB', (50, 50)).save(tmp_path / 'ds' / 'train' / 'b' / '0000.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1024)  # 32x32 passes; 50x50, over twice that, is a "bomb"
    with pytest.raises(SystemExit) as error:
        data.load_dataset(root, img_size=32)
    message = str(error.value)
    assert message.startswith('error: cannot read 3 of 6 images: ') and message.endswith('remove or replace them')
    for name in ('a/0001.png', 'b/0002.png', 'b/0000.png (DecompressionBombError'):
        assert os.path.join('train', name) in message, message


def test_split_class_mismatch_names_only_the_differences(tmp_path):
    root = write_folder_dataset(tmp_path / 'ds', classes=[f'class{i:03d}' for i in range(30)], train_per_class=1,
                                test_per_class=1, size=8)
    os.rename(tmp_path / 'ds' / 'test' / 'class007', tmp_path / 'ds' / 'test' / 'class007 ')
    with pytest.raises(SystemExit, match=r"'class007' only in train/; 'class007 ' only in test/; give each class "
                                         r"images in both, or remove its folder from both$") as error:
        data.load_dataset(root, img_size=8)
    assert 'class008' not in str(error.value)


def test_class_names_in_two_unicode_forms_are_told_apart(tmp_path):
    """'café' composed on one side and decomposed on the other (macOS) looks like the same name printed twice."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('caf\u00e9', 'dog'), train_per_class=1, test_per_class=1,
                                size=8)
    os.rename(tmp_path / 'ds' / 'test' / 'caf\u00e9', tmp_path / 'ds' / 'test' / 'cafe\u0301')
    with pytest.raises(SystemExit) as error:
        data.load_dataset(root, img_size=8)
    assert "('caf\\xe9')" in str(error.value) and "('cafe\\u0301')" in str(error.value)
    assert 'composed and decomposed' in str(error.value) and 'rename one folder to match the other' in str(error.value)


def test_a_single_class_is_refused(tmp_path):
    """One class trains nothing (softmax over one logit: loss 0, accuracy 100%): often the folder one level too deep."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('photos',), train_per_class=2, test_per_class=1, size=8)
    with pytest.raises(SystemExit, match=r"train has one class folder \(photos\); classification needs two or more"):
        data.load_dataset(root, img_size=8)


def test_val_folder_without_test_folder_gets_a_hint(tmp_path):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=1, test_per_class=1, size=8)
    os.rename(tmp_path / 'ds' / 'test', tmp_path / 'ds' / 'val')
    with pytest.raises(SystemExit, match=r'no test/ folder \(rename val/ to test/ to evaluate on it\)'):
        data.load_dataset(root, img_size=8)


def test_train_and_test_folders_spelt_another_way_get_a_rename_hint(tmp_path):
    """Train/ and Test/ (as many downloaded datasets have): the hint said to move their class folders into train/ and
    pass --test_split, which gave up the dataset's own test set."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=1, test_per_class=1, size=8)
    os.rename(tmp_path / 'ds' / 'train', tmp_path / 'ds' / 'Train')
    os.rename(tmp_path / 'ds' / 'test', tmp_path / 'ds' / 'test_set')
    with pytest.raises(SystemExit, match=r'no train/ folder \(rename its Train/ to train/ and test_set/ to test/\);'):
        data.load_dataset(root, img_size=8)
    with pytest.raises(SystemExit, match=r'no train/ folder \(rename its Train/ to train/\); with --test_split'):
        data.load_dataset(root, img_size=8, test_split=0.5)
    os.rename(tmp_path / 'ds' / 'Train', tmp_path / 'ds' / 'train')
    with pytest.raises(SystemExit, match=r'no test/ folder \(rename its test_set/ to test/\);'):
        data.load_dataset(root, img_size=8)
    os.rename(tmp_path / 'ds' / 'train', tmp_path / 'ds' / 'Training')
    os.rename(tmp_path / 'ds' / 'test_set', tmp_path / 'ds' / 'testing')
    with pytest.raises(SystemExit, match=r'no train/ folder \(rename its Training/ to train/ and testing/ to test/\);'):
        data.load_dataset(root, img_size=8)


def test_class_folders_right_under_the_dataset_are_named_in_the_hint(tmp_path):
    """Only the folders that hold images, and not hidden ones; three named, then ', ...'."""
    root = tmp_path / 'ds'
    for name in ('a', 'b', 'c', '.ipynb_checkpoints', 'Docs'):
        os.makedirs(root / name)
        if name != 'Docs':
            Image.new('RGB', (4, 4)).save(root / name / 'x.png')
    (root / 'Docs' / 'notes.txt').write_text('not an image')
    for extra, named in (('', 'a, b, c'), ('d', 'a, b, c, ...')):
        if extra:
            os.makedirs(root / extra)
            Image.new('RGB', (4, 4)).save(root / extra / 'x.png')
        with pytest.raises(SystemExit, match=rf"has no train/ folder \(its subfolders {named} hold images: move"):
            data.load_dataset(str(root), img_size=4)


def test_a_folder_that_cannot_be_listed_beside_the_class_folders_does_not_hide_the_hint(tmp_path, monkeypatch):
    """--dataset at a disk's mount point, its class folders right under it beside lost+found (root's, chmod 700): the
    error was 'cannot read the folder .../lost+found ... chmod u+rx', not the missing train/ and how to make it."""
    root = tmp_path / 'ds'
    for name in ('a', 'b', 'lost+found'):
        os.makedirs(root / name)
        if name != 'lost+found':
            Image.new('RGB', (4, 4)).save(root / name / 'x.png')
    deny_listing(monkeypatch, [root / 'lost+found'])
    with pytest.raises(SystemExit, match=r"has no train/ folder \(its subfolders a, b hold images: move"):
        data.load_dataset(str(root), img_size=4)


def test_a_subfolder_without_test_is_not_offered_as_the_dataset(tmp_path):
    os.makedirs(tmp_path / 'outer' / 'half' / 'train' / 'a')
    with pytest.raises(SystemExit) as error:
        data.load_dataset(str(tmp_path / 'outer'), img_size=4)
    assert str(error.value).startswith(f"error: --dataset {tmp_path / 'outer'} has no train/ folder; a folder dataset")



def test_the_train_folder_of_a_dataset_without_test_is_not_offered_its_own_train_folder(tmp_path):
    """--dataset photos/train, where photos/ holds train/ alone: pass photos with --test_split, not train/train."""
    root = write_folder_dataset(tmp_path / 'photos', classes=('a', 'b'), train_per_class=2, test_per_class=1, size=4)
    shutil.rmtree(os.path.join(root, 'test'))
    train_dir = os.path.join(root, 'train')
    for test_split, added in ((0.0, ' --test_split 0.2'), (0.5, '')):
        with pytest.raises(SystemExit) as error:
            data.load_dataset(train_dir, img_size=4, test_split=test_split)
        assert f"(it is the train/ folder of {root}: pass --dataset {root}{added}); " in str(error.value)
        assert 'train/train' not in str(error.value)

def _fake_cifar10(root, train_per_batch=6, test_count=8):
    """A cifar-10-batches-py folder in torchvision's format, made here: the same code path as the real download."""
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder)
    rng = np.random.default_rng(0)

    def batch(name, n):
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         'labels': rng.integers(0, 10, n).tolist()}, f)
    for i in range(1, 6):
        batch(f'data_batch_{i}', train_per_batch)
    batch('test_batch', test_count)
    classes = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': classes}, f)
    return folder


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """torchvision checks CIFAR's files against their published md5 sums; point those at the files made here."""
    from torchvision.datasets.utils import calculate_md5
    folder = _fake_cifar10(tmp_path / 'data')
    cls = torchvision.datasets.CIFAR10
    md5 = {name: calculate_md5(os.path.join(folder, name)) for name in os.listdir(folder)}
    monkeypatch.setattr(cls, 'train_list', [[n, md5[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, 'test_list', [[n, md5[n]] for n, _ in cls.test_list])
    monkeypatch.setitem(cls.meta, 'md5', md5['batches.meta'])
    return str(tmp_path / 'data')


@pytest.mark.parametrize('denied', ['data_batch_3', 'test_batch', ''])
def test_cifar_files_the_user_may_not_read_are_named(fake_cifar10, monkeypatch, denied):
    """Another user's copy of CIFAR (chmod 600 files, a 700 folder): a file was a PermissionError traceback, the folder
    'failed torchvision's checksum check (a partial download...)'. Denial is played (the tests run as root)."""
    import builtins
    import torchvision.datasets.utils as utils
    path = os.path.join(fake_cifar10, 'cifar-10-batches-py', denied).rstrip(os.sep)
    open_, access = builtins.open, os.access

    def opening(file, *args, **kwargs):
        if str(file) == path:
            raise PermissionError(13, 'Permission denied', str(file))
        return open_(file, *args, **kwargs)
    monkeypatch.setattr(utils, 'open', opening, raising=False)
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: access(p, mode, **kw) and str(p) != path)
    monkeypatch.setattr(os.path, 'isfile', lambda p, isfile=os.path.isfile: isfile(p) and not (
        not denied and str(p).startswith(path + os.sep)))  # a 700 folder's files look missing
    with pytest.raises(SystemExit) as e:
        data.load_dataset('cifar10', fake_cifar10)
    assert str(e.value) == (f"error: cannot read {path} (Permission denied); make it readable (chmod u+r, or ask its "
                            f"owner), or pass another --data_dir" if denied else
                            f"error: cannot read the folder {path} (Permission denied); give your user read and "
                            f"search permission on it (chmod u+rx, or ask its owner), or move it out of the way")


def test_a_cifar_folder_listed_but_not_entered_is_named(fake_cifar10, monkeypatch):
    """cifar-10-batches-py/ with read but no search permission (chmod 644): its files looked missing, and a download
    was tried beside them. Denial is played."""
    folder = os.path.join(fake_cifar10, 'cifar-10-batches-py')
    access, isfile = os.access, os.path.isfile
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: access(p, mode, **kw) and not (
        str(p) == folder and mode & os.X_OK))
    monkeypatch.setattr(os.path, 'isfile', lambda p: isfile(p) and not str(p).startswith(folder + os.sep))

    def offline(self):
        raise OSError('offline')
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'download', offline)
    with pytest.raises(SystemExit) as e:
        data.load_dataset('cifar10', fake_cifar10)
    assert str(e.value) == (f"error: cannot read the folder {folder} (Permission denied); give your user read and "
                            f"search permission on it (chmod u+rx, or ask its owner), or move it out of the way")


def test_a_cifar_archive_the_user_may_not_read_is_named(tmp_path, monkeypatch):
    """cifar-10-python.tar.gz of another user's in --data_dir, not extracted: torchvision's checksum of it raised
    PermissionError, which was said as a damaged copy ('failed torchvision's checksum check'). Denial is played."""
    import builtins
    import torchvision.datasets.utils as utils
    archive = tmp_path / 'data' / 'cifar-10-python.tar.gz'
    os.makedirs(archive.parent)
    archive.write_bytes(b'an archive this user may not read')
    open_ = builtins.open

    def opening(file, *args, **kwargs):
        if str(file) == str(archive):
            raise PermissionError(13, 'Permission denied', str(file))
        return open_(file, *args, **kwargs)
    monkeypatch.setattr(utils, 'open', opening, raising=False)
    with pytest.raises(SystemExit) as e:
        data.load_dataset('cifar10', str(tmp_path / 'data'))
    assert str(e.value) == (f"error: cannot read {archive} (Permission denied); make it readable (chmod u+r, or ask "
                            f"its owner), or pass another --data_dir")

def test_cifar10_from_data_dir(fake_cifar10):
    train_x, train_y, test_x, test_y, classes, available = data.load_dataset('cifar10', fake_cifar10)
    assert train_x.shape == (30, 3, 32, 32) and test_x.shape == (8, 3, 32, 32) and train_x.dtype == torch.uint8
    assert available == dict(train=30, test=8)
    assert classes[0] == 'airplane' and len(classes) == 10
    reference = torchvision.datasets.CIFAR10(fake_cifar10, train=True)
    image, label = reference[7]
    assert torch.equal(train_x[7], torch.from_numpy(np.array(image)).permute(2, 0, 1)) and train_y[7] == label


def test_cifar_without_a_readable_meta_file_is_one_line(fake_cifar10, tmp_path, monkeypatch):
    """torchvision checks the data files' md5 sums, not batches.meta's: one deleted or damaged passed the check, was
    not downloaded again, and failed as a RuntimeError traceback (found by a resume fuzz); so did a download that
    fails its md5 check."""
    meta = os.path.join(fake_cifar10, 'cifar-10-batches-py', 'batches.meta')
    for damage in (lambda: os.remove(meta), lambda: open(meta, 'wb').close()):
        damage()
        with pytest.raises(SystemExit) as error:
            data.load_dataset('cifar10', fake_cifar10)
        assert str(error.value) == (
            f"error: cifar-10-batches-py/ in --data_dir {fake_cifar10} holds cifar10's data files but no readable "
            f"batches.meta; replace the folder with the official cifar-10-python.tar.gz (from "
            f"{torchvision.datasets.CIFAR10.url}) extracted, or remove it and run again with network")
    def corrupted_download(self):
        raise RuntimeError('File not found or corrupted.')  # torchvision's words for a download that fails its md5 sum
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'download', corrupted_download)
    with pytest.raises(SystemExit) as error:
        data.load_dataset('cifar10', str(tmp_path / 'empty'))
    assert str(error.value) == (
        f"error: downloading cifar10 into --data_dir {tmp_path / 'empty'} failed (File not found or corrupted.); run "
        f"again, or put the official cifar-10-python.tar.gz (from {torchvision.datasets.CIFAR10.url}) into "
        f"{tmp_path / 'empty'}")
    # a copy short of a data file as well as of batches.meta is not said to hold the data files
    os.remove(os.path.join(fake_cifar10, 'cifar-10-batches-py', 'test_batch'))
    with pytest.raises(SystemExit) as error:
        data.load_dataset('cifar10', fake_cifar10)
    assert str(error.value).startswith(f"error: downloading cifar10 into --data_dir {fake_cifar10} failed (File not "
                                       f"found or corrupted.); run again"), str(error.value)


def test_a_data_dir_that_is_the_cifar_folder_itself_or_a_file_is_named(fake_cifar10, tmp_path):
    """--data_dir pointed at cifar-10-batches-py/ itself was told to put cifar-10-batches-py/ into it (online: a
    second copy downloaded inside); a file was 'File exists'."""
    folder = os.path.join(fake_cifar10, 'cifar-10-batches-py')
    for given in (folder, folder + os.sep):  # a shell's completion adds the slash
        with pytest.raises(SystemExit) as error:
            data.load_dataset('cifar10', given)
        assert str(error.value) == (f"error: --data_dir {given} is the extracted cifar-10-batches-py/ itself; pass the "
                                    f"folder that holds it: --data_dir {fake_cifar10}")
    assert data.load_dataset('cifar10', fake_cifar10)[4][0] == 'airplane'  # as it says
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(SystemExit, match=r"--data_dir .*a_file is a file; pass the folder where cifar10 is found"):
        data.load_dataset('cifar10', str(tmp_path / 'a_file'))


def test_a_subset_keeps_each_image_with_its_own_label(fake_cifar10, tmp_path):
    """--train_samples picks images and labels by one index, for CIFAR and for folders alike."""
    folder = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b', 'c'), train_per_class=6, test_per_class=2)
    for dataset, root in (('cifar10', fake_cifar10), (folder, None)):
        full_x, full_y, *_ = data.load_dataset(dataset, root or './data', train_samples=0)
        part_x, part_y, *_ = data.load_dataset(dataset, root or './data', train_samples=9, seed=3)
        assert len(part_y) == 9
        for image, label in zip(part_x, part_y):
            (index,) = [i for i in range(len(full_x)) if torch.equal(full_x[i], image)]
            assert full_y[index] == label, dataset


def test_test_names_name_the_image_in_each_slot(fake_cifar10, tmp_path):
    """--eval_only's test_predictions.csv names each test image: a folder's file, relative to the dataset (from
    test/, or from train/ when --test_split held it out), or CIFAR's index in torchvision's test set; a subset keeps
    each name with its own image and label."""
    folder = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b', 'c'), train_per_class=10, test_per_class=4)
    bare = shutil.copytree(os.path.join(folder, 'train'), tmp_path / 'bare' / 'train')  # class folders alone
    bare = str(bare.parent)
    for dataset, options in (('cifar10', dict(data_dir=fake_cifar10)), ('cifar10', dict(data_dir=fake_cifar10,
                             test_samples=5, seed=2)), (folder, {}), (folder, dict(test_samples=6, seed=1)),
                             (bare, dict(test_split=0.3)), (bare, dict(test_split=0.3, test_samples=3))):
        loaded = data.load_dataset(dataset, **options, names=True)
        assert len(loaded) == 7 and len(data.load_dataset(dataset, **options)) == 6
        _, _, test_x, test_y, classes, _, names = loaded
        assert len(names) == len(test_y) == len(set(names)) == options.get('test_samples', len(test_y))
        if dataset == 'cifar10':
            reference = torchvision.datasets.CIFAR10(fake_cifar10, train=False)
            for name, image, label in zip(names, test_x, test_y):
                picture, truth = reference[int(name)]
                assert torch.equal(image, torch.from_numpy(np.array(picture)).permute(2, 0, 1)) and label == truth
            continue
        split = 'train' if 'test_split' in options else 'test'
        for name, image, label in zip(names, test_x, test_y):
            assert name.split(os.sep)[:2] == [split, classes[label]], (options, name)
            assert torch.equal(image, torch.from_numpy(np.array(Image.open(os.path.join(dataset, name)).convert('RGB')))
                               .permute(2, 0, 1)), (options, name)


def test_cli_trains_on_cifar10_in_data_dir(fake_cifar10, tmp_path, capsys):
    code, out, err = run_main([*TINY, '--dataset', 'cifar10', '--data_dir', fake_cifar10, '--epoch', '1',
                               '--batch_size', '10', '--log_dir', tmp_path / 'logs', '--name', 'c10'], capsys)
    assert code == 0, err
    assert '30 train / 8 test images, 10 classes' in out
    # 8 test images of 10 classes, with no --test_samples to raise: the split itself lacks them
    (warning,) = [line for line in err.splitlines() if 'have no test images' in line]
    assert warning.endswith("test accuracy leaves them out (the dataset's test split has none of them)"), warning


@pytest.mark.parametrize('img_size', [96, 32])
def test_large_images_decode_in_threads_into_their_slots(tmp_path, monkeypatch, img_size):
    """Files above 64x64 are decoded by a thread pool (whatever size they are shrunk to: decoding is the cost), each
    written into its own slot of one tensor."""
    pools, pool = [], data.ThreadPoolExecutor
    monkeypatch.setattr(data, 'ThreadPoolExecutor', lambda *a, **k: pools.append(a) or pool(*a, **k))
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=5, test_per_class=1, size=80)
    train_x, train_y, *_ = data.load_dataset(root, img_size=img_size)
    assert len(pools) == 2  # train and test
    side = min(80, img_size)
    assert train_x.shape == (10, 3, side, side) and train_y.tolist() == [0] * 5 + [1] * 5
    for i, path in enumerate(sorted(os.listdir(os.path.join(root, 'train', 'b')))):
        image = Image.open(os.path.join(root, 'train', 'b', path)).convert('RGB').resize((side, side), Image.BILINEAR)
        assert torch.equal(train_x[5 + i], torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()))


def test_an_image_larger_on_one_side_only_is_shrunk(tmp_path):
    from PIL import Image
    import data
    Image.new('RGB', (40, 20)).save(tmp_path / 'wide.png')
    assert data.read_image(str(tmp_path / 'wide.png'), 32, larger_only=True).shape == (32, 32, 3)


def test_class_subfolders_are_read_in_sorted_order(tmp_path, monkeypatch):
    import data
    for sub in ('b', 'a', 'c'):
        os.makedirs(tmp_path / 'cls' / sub)
        (tmp_path / 'cls' / sub / 'x.png').write_bytes(b'')
    walk = os.walk

    def reversed_walk(*args, **kwargs):  # a filesystem that lists entries in another order
        for root, dirs, files in walk(*args, **kwargs):
            dirs.reverse()
            yield root, dirs, files
    monkeypatch.setattr(data.os, 'walk', reversed_walk)
    found = [os.path.basename(os.path.dirname(p)) for p in data.image_files(str(tmp_path / 'cls'))]
    assert found == ['a', 'b', 'c']


def test_augmentation_draws_the_order_then_every_shift_then_every_flip():
    """The seed's recipe draws, from the epoch's generator, the permutation, then the crop shifts of the whole epoch,
    then its flips: a published seed's augmentations, and a run resumed from the generator state it saved, reproduce
    only with the draws in that order (the next epoch starts where these end)."""
    n, batch, side = 20, 8, 16
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    identity = ((0.,) * 3, (1.,) * 3, None)
    generator = torch.Generator().manual_seed(4)
    drawn = list(data.train_batches(images, torch.arange(n), batch, generator, identity))
    reference = torch.Generator().manual_seed(4)
    steps, pad = n // batch, side // 8
    order = torch.randperm(n, generator=reference)[:steps * batch].view(steps, batch)
    shifts = torch.randint(0, 2 * pad + 1, (steps, batch, 2), generator=reference)
    flips = torch.randint(0, 2, (steps, batch), generator=reference, dtype=torch.bool)
    assert len(drawn) == steps
    for step, (x, y) in enumerate(drawn):
        assert torch.equal(y, order[step])
        assert torch.equal(x, data.model_input(data.crop_flip(images[order[step]], shifts[step], flips[step], pad),
                                               *identity))
    assert torch.equal(generator.get_state(), reference.get_state())


def test_image_extensions_are_matched_in_any_case(tmp_path):
    """Cameras and Windows tools write IMG_0001.JPG: such a class must not be 'a folder without images'."""
    for name in ('a.JPG', 'b.Png', 'c.jpeg', 'notes.TXT'):
        Image.new('RGB', (8, 8)).save(tmp_path / name, format='PNG')
    for reading in (1, 2, 3):
        assert [os.path.basename(p) for p in data.image_files(str(tmp_path), reading)] == ['a.JPG', 'b.Png', 'c.jpeg']


def test_a_link_to_a_subfolder_inside_it_is_walked_once_by_every_reading(tmp_path):
    """more/again -> more: a loop below the class folder (not back to it) must not repeat more/'s images down to the
    system's link limit, under folder_reading 2 (resumed runs) as under 3."""
    os.makedirs(tmp_path / 'cls' / 'more')
    Image.new('RGB', (8, 8)).save(tmp_path / 'cls' / 'more' / 'x.png')
    os.symlink('.', tmp_path / 'cls' / 'more' / 'again')
    for reading in (2, 3):
        assert data.image_files(str(tmp_path / 'cls'), reading) == [str(tmp_path / 'cls' / 'more' / 'x.png')], reading


def test_a_train_folder_without_class_folders_is_one_line(tmp_path):
    for split in ('train', 'test'):
        os.makedirs(tmp_path / 'ds' / split)
        Image.new('RGB', (8, 8)).save(tmp_path / 'ds' / split / 'loose.png')  # images straight in train/, no classes
    with pytest.raises(SystemExit, match=r"train has no class folders; put each class's images in train/<class>/$"):
        data.load_dataset(str(tmp_path / 'ds'), img_size=8)


def test_a_class_mismatch_lists_five_names_a_side_then_dots(tmp_path):
    for split, names in (('train', ['common', 'x1', 'x2', 'x3', 'x4', 'x5']),
                         ('test', ['common', 'y1', 'y2', 'y3', 'y4', 'y5', 'y6'])):
        for name in names:
            os.makedirs(tmp_path / 'ds' / split / name)
    with pytest.raises(SystemExit) as error:
        data.load_dataset(str(tmp_path / 'ds'), img_size=8)
    assert str(error.value).endswith("need the same class folders, but 'x1', 'x2', 'x3', 'x4', 'x5' only in train/; "
                                     "'y1', 'y2', 'y3', 'y4', 'y5' ... only in test/; give each class images in both, "
                                     "or remove its folder from both")


def test_runs_made_before_folder_reading_2_keep_their_hidden_class_folders(tmp_path):
    """folder_reading 1 took every folder for a class, '.c' too: a run recorded so resumes on the classes it had."""
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b', 'c'), train_per_class=1, test_per_class=1, size=8)
    for split in ('train', 'test'):
        os.rename(tmp_path / 'ds' / split / 'c', tmp_path / 'ds' / split / '.c')
    assert data.load_dataset(root, img_size=8, reading=1)[4] == ['.c', 'a', 'b']
    for reading in (2, 3):  # since 2, a hidden folder is not a class
        assert data.load_dataset(root, img_size=8, reading=reading)[4] == ['a', 'b']


def test_hidden_folders_are_named_by_the_first_process_of_a_machine_only(tmp_path, capsys, monkeypatch):
    root = write_folder_dataset(tmp_path / 'ds', classes=('a', 'b'), train_per_class=1, test_per_class=1, size=8)
    os.makedirs(tmp_path / 'ds' / 'train' / 'a' / '.old')
    Image.new('RGB', (8, 8)).save(tmp_path / 'ds' / 'train' / 'a' / '.old' / 'x.png')
    for local_rank, warned in (('1', False), ('2', False), ('0', True)):
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        data.load_dataset(root, img_size=8)
        assert ('left out with their images: ' + os.path.join('a', '.old') in capsys.readouterr().err) == warned


def test_more_than_three_unreadable_images_are_counted_not_listed(tmp_path):
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f'{i}.png'))
        (tmp_path / f'{i}.png').write_bytes(b'not an image')
    for count, rest in ((3, ''), (4, ' and 1 more')):
        with pytest.raises(SystemExit) as error:
            data.read_images(paths[:count], 8)
        message = str(error.value)
        assert message.startswith(f'error: cannot read {count} of {count} images: {paths[0]} (')
        assert message.endswith(f"{rest}; remove or replace them") and paths[2] in message and paths[3] not in message
        assert message.count(' more') == (count > 3)
