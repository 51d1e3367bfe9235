"""Datasets as whole uint8 tensors, and batches cut from them with batched tensor ops (no Python per image).

Each split is one (N, 3, H, W) uint8 tensor plus an int64 label tensor, kept at the images' own size when they all
share one no larger than the model's input (CIFAR: 32x32; other folder images are resized as they are decoded);
train.py moves them onto the training device once. An epoch is a seeded permutation; augmentation (random
crop with zero padding + horizontal flip, the seed's recipe) is one gather over the whole batch; resizing to the
model's input size (e.g. CIFAR at 224 px) and normalisation happen per batch on the device.
"""
import contextlib
import errno
import hashlib
import os
import stat
import sys
import tempfile
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
# photo formats not read (an iPhone's HEIC, a scanner's TIFF, a camera's raw files): said, never left out silently
UNREAD_EXTENSIONS = ('.heic', '.heif', '.avif', '.tif', '.tiff', '.jfif', '.dng', '.cr2', '.cr3', '.nef', '.arw',
                     '.raf', '.orf', '.rw2')
CIFAR_FOLDERS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}
# How a folder dataset's files are found and decoded; config.json records it, so a run resumes and evaluates on the
# images it was trained on. 6: as 5, and a Synology NAS's @eaDir/ folders (its thumbnails of every photo, 3-5 JPEGs
# each) left out as __MACOSX/ is. 5: as 4, and a JPEG at least 4x --img_size on both sides decoded at 1/2, 1/4 or 1/8
# scale (libjpeg's DCT scaling, as Pillow's thumbnail() does), never below twice --img_size, before it is resized: 4-6x
# faster for camera photos. 4: as 3, and a photo turned upright by its EXIF orientation (as viewers show it; stored
# sideways, a phone photo was read so). 3: as 2, and a linked folder beside its target read once. 2: a class's subfolders
# searched, hidden files and folders left out, images larger than img_size shrunk as decoded. 1 (runs made before):
# one folder level, every image file, all kept at their own size when they share one.
FOLDER_READING = 6
# Pillow takes an image above 2 x 89 million pixels for a decompression bomb and refuses it (warning above 89 M), but
# a phone's 200 MP mode (16,320 x 12,240) is an ordinary photo here: such a file failed the whole dataset's load.
# Refused above 2 x PHOTO_PIXELS now, with Pillow's warning above PHOTO_PIXELS; a JPEG that large decodes at 1/8 scale.
PHOTO_PIXELS = 250_000_000
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < PHOTO_PIXELS:
    Image.MAX_IMAGE_PIXELS = PHOTO_PIXELS


def load_dataset(dataset, data_dir='./data', img_size=32, train_samples=0, test_samples=0, seed=0,
                 reading=FOLDER_READING, test_split=0.0, names=False):
    """-> (train_images, train_labels, test_images, test_labels, class_names, available); images uint8 (N, 3, H, W);
    available: {'train': N, 'test': N}, the images each split holds before train_samples/test_samples. With `names`,
    a 7th element names each test image in order: its file's path relative to the folder dataset, or for CIFAR its
    index in torchvision's test set.

    Images keep their own size when all of a split share one no larger than `img_size` (CIFAR: 32x32): batches are
    resized on the device, so a 224 px run holds no more host memory than a 32 px one. Other folder images are resized
    to `img_size` as they are decoded. train_samples/test_samples > 0 keep a seeded class-balanced subset (for a
    folder, only those files are decoded). test_split > 0: a folder without test/ gives that seeded, class-stratified
    fraction of train/ as its test split.
    """
    if dataset in CIFAR_FOLDERS:
        splits = []
        loaded, classes = _load_cifar(dataset, data_dir)
        available = dict(train=len(loaded[0][1]), test=len(loaded[1][1]))
        for (images_hwc, labels), num_samples in zip(loaded, (train_samples, test_samples)):
            keep = balanced_subset(labels, num_samples, seed)
            subset = images_hwc if len(keep) == len(labels) else images_hwc[keep.numpy()]
            splits.append((torch.from_numpy(subset).permute(0, 3, 1, 2).contiguous(), labels[keep]))
        test_names = [str(index) for index in keep.tolist()]  # the test split's, the loop's last
    elif os.path.isdir(dataset):
        splits, classes, available, test_names = _load_folder(dataset, img_size, (train_samples, test_samples), seed,
                                                              reading, test_split)
    else:
        raise SystemExit(f"error: --dataset {dataset!r} is neither cifar10, cifar100 nor a folder; "
                         "a folder dataset needs train/<class>/* and test/<class>/* images")
    (train_images, train_labels), (test_images, test_labels) = splits
    return (train_images, train_labels, test_images, test_labels, classes, available) + ((test_names,) if names else ())


def _load_cifar(name, data_dir):
    import torchvision
    dataset_class = torchvision.datasets.CIFAR10 if name == 'cifar10' else torchvision.datasets.CIFAR100
    if os.path.isfile(data_dir):
        raise SystemExit(f"error: --data_dir {data_dir} is a file; pass the folder where {name} is found or is to be "
                         f"downloaded (it holds {dataset_class.filename} or {CIFAR_FOLDERS[name]}/)")
    folder = os.path.join(data_dir, CIFAR_FOLDERS[name])
    if os.path.isdir(folder) and not os.access(folder, os.R_OK | os.X_OK):  # its files would look missing or altered
        unreadable_folder(PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder))
    try:
        train = dataset_class(data_dir, train=True, download=False)
    except PermissionError as e:  # torchvision's checksum opens each file
        _unreadable_file(e)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        if os.path.basename(os.path.normpath(data_dir)) == CIFAR_FOLDERS[name]:  # a download would nest a second copy
            raise SystemExit(f"error: --data_dir {data_dir} is the extracted {CIFAR_FOLDERS[name]}/ itself; pass the "
                             f"folder that holds it: --data_dir {os.path.dirname(os.path.normpath(data_dir))}")
        created = _missing_folders(data_dir)
        _check_writable(data_dir, '--data_dir', f"to download {name} into it")
        try:
            train = dataset_class(data_dir, train=True, download=True)
        except RuntimeError as e:  # torchvision checks the data files' md5 sums, not the metadata file's
            intact = lambda file, md5: torchvision.datasets.utils.check_integrity(
                os.path.join(data_dir, CIFAR_FOLDERS[name], file), md5)
            bad_meta = (all(intact(file, md5) for file, md5 in dataset_class.train_list + dataset_class.test_list)
                        and not intact(dataset_class.meta['filename'], dataset_class.meta['md5']))
            if bad_meta:
                raise SystemExit(f"error: {CIFAR_FOLDERS[name]}/ in --data_dir {data_dir} holds {name}'s data files "
                                 f"but no readable {dataset_class.meta['filename']}; replace the folder with the "
                                 f"official {dataset_class.filename} (from {dataset_class.url}) extracted, or remove it "
                                 f"and run again with network") from None
            raise SystemExit(f"error: downloading {name} into --data_dir {data_dir} failed ({str(e).strip()}); run "
                             f"again, or put the official {dataset_class.filename} (from {dataset_class.url}) into "
                             f"{data_dir}") from None
        except OSError as e:
            if isinstance(e, PermissionError):  # a cifar-10-python.tar.gz there that may not be read
                _unreadable_file(e)
            for folder in created:  # a failed download leaves no empty ./data behind
                try:
                    os.rmdir(folder)
                except OSError:
                    break
            present = [found for found in (dataset_class.filename, CIFAR_FOLDERS[name])
                       if os.path.exists(os.path.join(data_dir, found))]
            if present:  # torchvision found them, but not with the published md5 sums: "put them there" would not help
                raise SystemExit(
                    f"error: {' and '.join(present)} in --data_dir {data_dir} failed torchvision's checksum check (a "
                    f"partial download, or an altered copy), and downloading a fresh copy failed ({type(e).__name__}: "
                    f"{e}); replace it with the official {dataset_class.filename} (from {dataset_class.url}), or "
                    f"remove it and run again with network")
            # --dataset cifar10 names torchvision's copy, never a folder of that name: say how to read one
            here = (f"; the folder {name}/ here holds train/ and test/: --dataset ./{name} reads it" if
                    all(os.path.isdir(os.path.join(name, split)) for split in ('train', 'test')) else '')
            raise SystemExit(
                f"error: could not download {name} into --data_dir {data_dir} ({type(e).__name__}: {e}); offline, put "
                f"{dataset_class.filename} (from {dataset_class.url}) or its extracted {CIFAR_FOLDERS[name]}/ into "
                f"{data_dir}, or pass --dataset FOLDER with train/<class>/* and test/<class>/* images{here}")
    try:
        test = dataset_class(data_dir, train=False, download=False)
    except PermissionError as e:
        _unreadable_file(e)
    return [(split.data, torch.tensor(split.targets)) for split in (train, test)], list(train.classes)


def _unreadable_file(e):
    raise SystemExit(f"error: cannot read {e.filename} ({e.strerror}); make it readable (chmod u+r, or ask its owner), "
                     f"or pass another --data_dir")


def _load_folder(root, img_size, samples, seed, reading, test_split=0.0):
    split_dirs = [os.path.join(root, split) for split in ('train', 'test')]
    if not os.access(root, os.R_OK | os.X_OK):  # its train/ and test/ would look missing
        unreadable_folder(PermissionError(errno.EACCES, os.strerror(errno.EACCES), root))
    if test_split and os.path.isdir(split_dirs[1]):
        raise SystemExit(f"error: --dataset {root} has a test/ folder, and --test_split {test_split} would hold out "
                         f"another test set from train/; drop --test_split to test on test/")
    if test_split and os.path.isdir(os.path.join(root, 'val')) and os.environ.get('LOCAL_RANK', '0') == '0':
        print(f"note: {os.path.join(root, 'val')} is not read: --test_split holds out the test set from train/ (rename "
              f"val/ to test/ to test on it instead)", file=sys.stderr, flush=True)
    for split_dir in split_dirs[:1] if test_split else split_dirs:
        if not os.path.isdir(split_dir):
            raise SystemExit(f"error: --dataset {root} has no {os.path.basename(split_dir)}/ folder"
                             f"{_missing_split_hint(root, os.path.basename(split_dir), test_split)}; "
                             + ("with --test_split a folder dataset needs train/<class>/* images" if test_split else
                                "a folder dataset needs train/<class>/* and test/<class>/* images"))
    classes = _class_folders(split_dirs[0], reading)
    if not classes:
        raise SystemExit(f"error: {split_dirs[0]} has no class folders; put each class's images in train/<class>/")
    if len(classes) == 1:  # one logit: every prediction right and the loss zero whatever the model does
        raise SystemExit(f"error: {split_dirs[0]} has one class folder ({classes[0]}); classification needs two or more, "
                         f"each class's images in train/<class>/" + ('' if test_split else " and test/<class>/"))
    test_classes = classes if test_split else _class_folders(split_dirs[1], reading)
    if test_classes != classes:
        only_train, only_test = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        composed = {unicodedata.normalize('NFC', name): name for name in only_test}
        for name in only_train:  # 'café' with é as one character or as e + accent (as macOS writes names)
            if unicodedata.normalize('NFC', name) in composed:
                raise SystemExit(f"error: class folder {name!r} is written with other Unicode characters in "
                                 f"{split_dirs[0]} ({ascii(name)}) than in {split_dirs[1]} "
                                 f"({ascii(composed[unicodedata.normalize('NFC', name)])}): the same letters, composed "
                                 f"and decomposed, so two classes; rename one folder to match the other")
        raise SystemExit(f"error: {split_dirs[0]} and {split_dirs[1]} need the same class folders, but "
                         + '; '.join(f"{', '.join(map(repr, names[:5]))}{' ...' if len(names) > 5 else ''} only in "
                                     f"{where}/" for names, where in ((only_train, 'train'), (only_test, 'test'))
                                     if names)
                         + "; give each class images in both, or remove its folder from both")
    listed = []
    for split_dir in split_dirs[:1] if test_split else split_dirs:
        _warn_loose_images(split_dir)
        paths, labels, hidden, unread = [], [], [], []
        for label, name in enumerate(classes):
            files = image_files(os.path.join(split_dir, name), reading, hidden, unread)
            if not files:
                inside = [os.path.relpath(path, split_dir) for path in hidden
                          if path.startswith(os.path.join(split_dir, name, ''))]
                formats = [os.path.relpath(path, split_dir) for path in unread
                           if path.startswith(os.path.join(split_dir, name, ''))]
                raise SystemExit(f"error: class folder {os.path.join(split_dir, name)} has no images "
                                 f"({', '.join(IMAGE_EXTENSIONS)})"
                                 + (f" outside hidden folders, which are left out ({', '.join(inside[:3])})" if inside
                                    else '')
                                 + (f"; its {unread_files(formats)} in a format not read: convert to JPEG or "
                                    f"PNG, or remove the folder" if formats else "; add images or remove the folder")
                                 + ('' if test_split else " from both splits"))
            paths += files
            labels += [label] * len(files)
        _warn_hidden(split_dir, "hidden (and __MACOSX) folders are left out with their images",
                     [os.path.relpath(path, split_dir) for path in hidden[:5]] + (['...'] if len(hidden) > 5 else []))
        if unread and os.environ.get('LOCAL_RANK', '0') == '0':
            print(f"warning: {split_dir}: {unread_files([os.path.relpath(path, split_dir) for path in unread])} "
                  f"in a format not read, left out; convert to JPEG or PNG to train on", file=sys.stderr,
                  flush=True)
        listed.append((paths, torch.tensor(labels)))
    if test_split:
        paths, labels = listed[0]
        kept, held_out = split_by_name([os.path.relpath(path, root) for path in paths], labels, test_split, seed)
        if len(held_out) == 0:
            raise SystemExit(f"error: --test_split {test_split} of {len(labels)} images holds out none (it is rounded "
                             f"per class, keeping one to train on); pick a larger fraction")
        listed = [([paths[i] for i in index.tolist()], labels[index]) for index in (kept, held_out)]
    splits, available = [], {}
    for name, (paths, labels), num_samples in zip(('train', 'test'), listed, samples):
        available[name] = len(labels)
        keep = balanced_subset(labels, num_samples, seed)
        splits.append((read_images([paths[i] for i in keep.tolist()], img_size, reading), labels[keep]))
        if name == 'train':
            _note_resized(root, [paths[i] for i in keep.tolist()], splits[0][0].shape[2:], img_size)
    return splits, classes, available, [os.path.relpath(paths[i], root) for i in keep.tolist()]  # the test split's


def _missing_split_hint(root, split, test_split=0.0):
    """' (what the folder looks like, and what to pass)' for a --dataset without train/ or test/; '' if nothing."""
    parent = os.path.dirname(os.path.abspath(root))
    below = [entry.path for entry in sorted(os.scandir(root), key=lambda entry: entry.name) if entry.is_dir()
             and all(os.path.isdir(os.path.join(entry.path, name)) for name in ('train', 'test'))]
    if below:  # one level too shallow (an archive extracted into a folder of its own)
        return f" (its subfolder {below[0]} has both: pass --dataset {below[0]})"
    if all(os.path.isdir(os.path.join(parent, name)) for name in ('train', 'test')):  # one level too deep
        return f" (its parent {parent} has both: pass --dataset {parent})"
    if split == 'train' and os.path.isdir(os.path.join(parent, 'train')) and os.path.samefile(
            os.path.join(parent, 'train'), root):  # the train/ folder of a dataset without test/, not the dataset
        return (f" (it is the train/ folder of {parent}: pass --dataset {parent}"
                f"{'' if test_split else ' --test_split 0.2'})")
    spellings = _split_spellings(root, ('train',) if test_split else ('train', 'test'))
    if split in spellings:  # Train/ and Test/ (as many downloaded datasets have), training_set/...
        return f" (rename its {' and '.join(f'{found}/ to {name}/' for name, found in spellings.items())})"
    if split == 'test':
        return (" (rename val/ to test/ to evaluate on it)" if os.path.isdir(os.path.join(root, 'val')) else
                " (or pass --test_split 0.2, say, to hold out a fraction of train/ as the test set)")
    classes_here = [entry.name for entry in sorted(os.scandir(root), key=lambda entry: entry.name)
                    if entry.is_dir() and _visible(entry.name) and image_files(entry.path, strict=False)]
    if classes_here:  # class folders right under the dataset
        return (f" (its subfolders {', '.join(classes_here[:3])}{', ...' if len(classes_here) > 3 else ''} hold "
                f"images: move the class folders into {os.path.join(root, 'train')}/"
                + ('' if test_split or os.path.isdir(os.path.join(root, 'test')) else
                   ", and pass --test_split 0.2, say, to hold out a fraction of them as the test set") + ")")
    return ''


def _split_spellings(root, splits):
    """{'train': 'Train', 'test': 'testing_set'}: the folder of `root` taken for each of the `splits` that is missing,
    spelt another way."""
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    found = {}
    for split in splits:
        ways = (split, split + 'ing', split + '_set', split + 'ing_set')
        spelt = [name for name in folders if name.casefold() in ways]
        if spelt and split not in folders:
            found[split] = spelt[0]
    return found


def _note_resized(root, paths, stored, img_size):
    """Photos trained at 32x32 (the default --img_size) are a surprise unless said. Up to 200 image headers are
    looked at, spread over the split (CIFAR's 50,000 would take seconds)."""
    if tuple(stored) != (img_size, img_size) or os.environ.get('LOCAL_RANK', '0') != '0':
        return  # kept at their own size: resized per batch, not squashed here
    for path in paths[::-(-len(paths) // 200) or 1]:
        with contextlib.suppress(Exception), Image.open(path) as image:
            if image.size != (img_size, img_size):
                photo = img_size < 224 <= min(image.size)  # VPT's protocol is ViT-B/16's own geometry
                print(f"note: the images of {root} are resized to {img_size}x{img_size} (--img_size) as they are "
                      f"read, not cropped; {os.path.relpath(path, root)} is {image.width}x{image.height}"
                      + ("; photos keep more detail at VPT's 224 px: --img_size 224 --patch_size 16" if photo else ''),
                      file=sys.stderr, flush=True)
                return


def _visible(name, reading=FOLDER_READING):
    return (not name.startswith('.') and name != '__MACOSX'  # .DS_Store, ._x.jpg, .ipynb_checkpoints, macOS zips
            and not (reading >= 6 and name == '@eaDir'))


def _class_folders(split_dir, reading=FOLDER_READING):
    try:
        folders = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    except OSError as e:
        unreadable_folder(e)
    if reading < 2:
        return folders
    hidden = [name for name in folders
              if not _visible(name, reading) and image_files(os.path.join(split_dir, name), strict=False)]
    # '.cat', say
    _warn_hidden(split_dir, "hidden (and __MACOSX) folders are not classes, left out with their images", hidden)
    return [name for name in folders if _visible(name, reading)]


def _warn_loose_images(split_dir):
    """Images lying in train/ or test/ itself, beside the class folders, belong to no class and are not read: say so,
    as for a hidden folder, rather than train on fewer images than the folder shows."""
    loose = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_file() and _visible(entry.name)
                   and entry.name.lower().endswith(IMAGE_EXTENSIONS))
    if loose and os.environ.get('LOCAL_RANK', '0') == '0':
        shown = ', '.join(loose[:3]) + (', ...' if len(loose) > 3 else '')
        print(f"warning: {split_dir}: {len(loose)} image file{'s' * (len(loose) > 1)} outside the class folders "
              f"belong{'s' * (len(loose) == 1)} to no class and {'is' if len(loose) == 1 else 'are'} not read "
              f"({shown}); move each into its class's folder, {os.path.basename(split_dir)}/<class>/",
              file=sys.stderr, flush=True)


def _warn_hidden(split_dir, what, names):
    """Images left out for a hidden folder must not vanish without a word (once per machine under torchrun)."""
    if names and os.environ.get('LOCAL_RANK', '0') == '0':
        print(f"warning: {split_dir}: {what}: {', '.join(names)}", file=sys.stderr, flush=True)


def unread_files(names):
    """'3 files (a.HEIC, b.HEIC, c.tif)' or '5 files (a.HEIC, b.HEIC, c.tif, ...)': the UNREAD_EXTENSIONS found."""
    return (f"{len(names)} file{'s' * (len(names) != 1)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
            f"{'is' if len(names) == 1 else 'are'}")


def unreadable_folder(e):
    """os.walk's onerror: a folder that cannot be listed (no read or search permission) is said, not walked past
    without a word as os.walk does, which left its images out of the dataset."""
    folder = e.filename
    while (isinstance(e, PermissionError) and isinstance(folder, str)
           and os.path.dirname(folder) not in ('', folder) and not os.access(os.path.dirname(folder), os.X_OK)):
        folder = os.path.dirname(folder)  # a parent that may not be entered (chmod 600) is the one to mend
    fix = ("give your user read and search permission on it (chmod u+rx, or ask its owner)"
           if isinstance(e, PermissionError) else "mend it")  # a link loop's ELOOP, a folder removed while read
    raise SystemExit(f"error: cannot read the folder {folder} ({e.strerror}); {fix}, or move it out of the way")


def image_files(folder, reading=FOLDER_READING, hidden=None, unread=None, strict=True):
    """The image files in `folder` and its subfolders (as torchvision's ImageFolder finds them), sorted; hidden files
    and folders left out (those holding images are added to the list `hidden`, when one is given; photos in a format
    not read, UNREAD_EXTENSIONS, to the list `unread`). A folder that cannot be listed is an error (`strict`), or
    taken for empty."""
    try:
        if reading < 2:
            return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    except OSError as e:
        return unreadable_folder(e) if strict else []
    found, seen = [], {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, onerror=unreadable_folder if strict else None, followlinks=True):
        kept = []
        for name in sorted(dirs):  # a linked folder once (reading 2: not when it is beside its target), no loops
            real = os.path.realpath(os.path.join(root, name))
            if not _visible(name, reading):  # a hidden folder's own permissions (a NAS's @eaDir) stop nothing
                if hidden is not None and image_files(os.path.join(root, name), strict=False):
                    hidden.append(os.path.join(root, name))
            elif real not in seen:
                kept.append(name)
                if reading >= 3:
                    seen.add(real)
        seen.update(os.path.realpath(os.path.join(root, name)) for name in kept)  # reading 2 marked them only here
        dirs[:] = kept
        visible = [os.path.join(root, f) for f in sorted(files) if _visible(f, reading)]
        found += [path for path in visible if path.lower().endswith(IMAGE_EXTENSIONS)]
        if unread is not None:
            unread += [path for path in visible if path.lower().endswith(UNREAD_EXTENSIONS)]
    return found


def read_images(paths, img_size, reading=FOLDER_READING):
    """Decode image files into one uint8 (N, 3, H, W) tensor, each written straight into its slot (no second copy
    of the split). Images that all share one size no larger than img_size keep it (CIFAR-like 32x32 images stay so
    for a 224 px model: batches are resized on the device); otherwise every image is resized to img_size x img_size as
    it is decoded, so a split never holds more than N x 3 x img_size^2 bytes, however large the files."""
    ways = dict(upright=reading >= 4, draft=reading >= 5)
    images = _decode_all(paths, img_size if reading >= 2 else None, larger_only=True, **ways)
    return images if images is not None else _decode_all(paths, img_size, **ways)


def _decode_all(paths, size, larger_only=False, upright=True, draft=True):
    """-> uint8 tensor, or None when the decoded images do not all share the first one's size. Unreadable files are
    collected and named together in one error."""
    out, unreadable = None, []

    def fill(i):
        nonlocal out
        try:
            image = read_image(paths[i], size, larger_only, upright, draft)
        except Exception as e:  # Pillow raises OSError, ValueError, DecompressionBombError...
            unreadable.append(f"{paths[i]} ({type(e).__name__}: {e})")
            return True
        if out is None:  # the first readable image sets the size, before any thread starts
            out = np.empty((len(paths), 3, *image.shape[:2]), np.uint8)
        if image.shape[:2] != out.shape[2:]:
            return False
        out[i] = image.transpose(2, 0, 1)
        return True
    first = 0
    while out is None and first < len(paths):
        fill(first)
        first += 1
    if out is None or _pixels(paths[first - 1]) <= 64 * 64:  # small files (CIFAR): threads only contend for the GIL
        filled = all(map(fill, range(first, len(paths))))
    else:  # Pillow decodes and resizes a large image without holding the GIL
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            filled = all(pool.map(fill, range(first, len(paths))))
    if not filled:
        return None
    if unreadable:
        raise SystemExit(f"error: cannot read {len(unreadable)} of {len(paths)} images: {'; '.join(unreadable[:3])}"
                         f"{f' and {len(unreadable) - 3} more' if len(unreadable) > 3 else ''}; remove or replace them")
    return torch.from_numpy(out)


def _pixels(path):
    """The file's own pixel count (its header only): what decoding costs, whatever the image is resized to."""
    with Image.open(path) as image:
        return image.width * image.height


def read_image(path, size=None, larger_only=False, upright=True, draft=True):
    """-> uint8 (H, W, 3); resized to size x size (bilinear, antialiased) when `size` is given and differs, or with
    `larger_only` only when the image is larger than `size` on a side; `upright`: turned as its EXIF orientation says;
    `draft`: a large JPEG decoded at a reduced scale first (FOLDER_READING 5)."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO named *.png would block the whole load on open
        raise ValueError("not a regular file")
    with Image.open(path) as image:
        if draft and size:  # a no-op for other formats, and for a JPEG under 4x size on a side
            image.draft('RGB', (2 * size, 2 * size))
        if upright and image.getexif().get(0x0112, 1) != 1:  # 0x0112: Orientation; 1 is as stored
            image = ImageOps.exif_transpose(image)
        if image.mode == 'F':  # convert('RGB') would clip to 0..255 as it stands: values in [0, 1] turn black
            raise ValueError("floating-point pixels, whose range is unknown; save it as an 8- or 16-bit image")
        if image.mode.startswith('I'):  # 16-bit grey (PNG): convert('RGB') would clip every value above 255 to white
            image = Image.fromarray((np.asarray(image).clip(0, 65535) >> 8).astype(np.uint8))
        image = image.convert('RGB')
        if size and image.size != (size, size) and not (larger_only and max(image.size) <= size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image)


def _missing_folders(path):
    """The folders that creating `path` would make, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


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
    # each image's rank within its class in `order` (0 for the class's first image there), in O(N) memory
    by_class = torch.argsort(labels[order], stable=True)
    class_sizes = torch.bincount(labels)
    class_starts = class_sizes.cumsum(0) - class_sizes
    rank_in_class = torch.empty_like(by_class)
    rank_in_class[by_class] = torch.arange(len(labels)) - class_starts[labels[order][by_class]]
    return order[torch.argsort(rank_in_class, stable=True)[:num_samples]].sort().values


def split_by_name(names, labels, fraction, seed):
    """-> (kept_index, held_out_index): per class, the round(fraction x its images) whose names hash lowest under
    `seed` (never its last image), both sorted. An image's side depends on its own name, not on its place in the list:
    a file renamed, added or removed moves no other image between the sides (--test_split's test set stays unseen)."""
    # a name's own bytes: also those of a name that is not UTF-8 (os.listdir's surrogates)
    rank = [hashlib.sha256(f"{seed}/{name}".encode('utf-8', 'surrogateescape')).digest() for name in names]
    return _hold_out(labels, fraction, torch.tensor(sorted(range(len(names)), key=rank.__getitem__), dtype=torch.long))


def split_validation(labels, fraction, seed):
    """-> (train_index, val_index): a seeded `fraction` of every class held out (never its last training image),
    both sorted."""
    return _hold_out(labels, fraction, torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)))


def _hold_out(labels, fraction, order):
    """-> (kept_index, held_out_index), both sorted: of each class, the first round(fraction x its images) in `order`
    (a permutation of the indices), never its last image."""
    held_out = [members[:min(round(fraction * len(members)), len(members) - 1)]
                for members in (order[labels[order] == label] for label in labels.unique())]
    is_held_out = torch.zeros(len(labels), dtype=torch.bool)
    is_held_out[torch.cat(held_out)] = True
    return (~is_held_out).nonzero().squeeze(1), is_held_out.nonzero().squeeze(1)


def preprocessing(pretrained_cfg, device, img_size):
    """(mean, std, img_size): the model's own mean/std (0.5/0.5 for the augreg weights, not CIFAR's statistics),
    made once on the device, and the input size batches are resized to."""
    mean, std = (torch.tensor(pretrained_cfg[key], device=device).view(1, -1, 1, 1) for key in ('mean', 'std'))
    return mean, std, img_size


def model_input(images, mean, std, img_size=None):
    """uint8 (B, 3, H, W) -> float32 normalised per channel (mean/std in [0, 1] units), resized to img_size x img_size
    (bilinear, antialiased) when it differs."""
    images = images.float()
    if img_size and tuple(images.shape[-2:]) != (img_size, img_size):
        images = F.interpolate(images, size=(img_size, img_size), mode='bilinear', antialias=True, align_corners=False)
    mean = torch.as_tensor(mean, device=images.device).view(1, -1, 1, 1)  # no copy when already a device tensor
    std = torch.as_tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images / 255 - mean) / std


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


def train_batches(images, labels, batch_size, generator, preprocess, rank=0, world_size=1, augment=True):
    """One epoch of training batches, augmented unless `augment` is False: (model input, labels) for this rank.

    `batch_size` is the global batch. The permutation and the crop/flip draws of the whole epoch come from the CPU
    `generator` (so the images and their order do not depend on the device, or on how many there are, and its state
    resumes anywhere) and cross to the device once; each rank takes its slice of every global batch. The padding is
    1/8 of the stored image side (4 px for CIFAR's 32). The last incomplete batch is dropped: every step has the
    same shape.
    """
    steps, device = len(labels) // batch_size, images.device
    pad = min(images.shape[-2:]) // 8
    order = torch.randperm(len(labels), generator=generator)[:steps * batch_size].view(steps, batch_size)
    local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    order = order[:, local].to(device)
    if not augment:
        for step in range(steps):
            yield model_input(images[order[step]], *preprocess), labels[order[step]]
        return
    shifts = torch.randint(0, 2 * pad + 1, (steps, batch_size, 2), generator=generator)
    flips = torch.randint(0, 2, (steps, batch_size), generator=generator, dtype=torch.bool)
    shifts, flips = (t[:, local].to(device) for t in (shifts, flips))
    for step in range(steps):
        index = order[step]
        yield model_input(crop_flip(images[index], shifts[step], flips[step], pad), *preprocess), labels[index]


def eval_batches(images, labels, batch_size, preprocess, rank=0, world_size=1):
    """Batches over this rank's contiguous shard: (model input, labels, valid). The last batch is padded to
    `batch_size` (static shapes for torch.compile); `valid` marks the real rows, so every image counts once."""
    n, device = len(labels), images.device
    shard = torch.arange(rank * n // world_size, (rank + 1) * n // world_size, device=device)
    for start in range(0, len(shard), batch_size):
        index = shard[start:start + batch_size]
        valid = torch.ones(batch_size, dtype=torch.bool, device=device)
        if len(index) < batch_size:
            valid[len(index):] = False
            index = torch.cat([index, index.new_zeros(batch_size - len(index))])
        yield model_input(images[index], *preprocess), labels[index], valid
