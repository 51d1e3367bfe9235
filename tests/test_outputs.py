"""What a researcher looks at after a run: predictions on image files, the confusion matrix and per-class accuracy,
TensorBoard event files."""
import csv
import json
import os
import re
import shutil
import sys

import pytest

from conftest import (TINY, deny_listing, read_metrics, run_cli, run_main, stderr_when_the_reader_goes_away,
                      write_folder_dataset)


@pytest.fixture(scope='module')
def run_dir(tiny_dataset, tmp_path_factory):
    """One finished 2-epoch run of the tiny model, shared by the tests that only read it."""
    log_dir = tmp_path_factory.mktemp('outputs')
    result = run_cli([*TINY, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8, '--lr', 0.02,
                      '--log_dir', log_dir, '--name', 'run'])
    assert result.returncode == 0, result.stderr
    return log_dir / 'run'


def read_confusion(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == 'true\\predicted'
    return rows[0][1:], {row[0]: [int(v) for v in row[1:]] for row in rows[1:]}


def test_confusion_and_per_class_accuracy_match_the_test_accuracy(run_dir):
    classes, confusion = read_confusion(run_dir / 'confusion.csv')
    assert classes == ['cat', 'dog', 'frog'] and list(confusion) == classes
    total = sum(map(sum, confusion.values()))
    correct = sum(confusion[name][i] for i, name in enumerate(classes))
    assert total == 18  # every test image once
    final = read_metrics(run_dir)[-1]
    assert 100 * correct / total == pytest.approx(float(final['test_acc']), abs=1e-3)
    summary = json.loads((run_dir / 'summary.json').read_text())
    for i, name in enumerate(classes):
        assert summary['per_class_acc'][name] == pytest.approx(100 * confusion[name][i] / sum(confusion[name]), abs=1e-3)


def test_a_finished_run_writes_the_test_predictions_eval_only_writes(tiny_dataset, tmp_path, capsys):
    """The last epoch writes test_predictions.csv beside confusion.csv (plot.py --mistakes reads it): a row per test
    image that counts up to the matrix, byte for byte what --eval_only then writes for the same checkpoint."""
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8, '--log_dir', tmp_path,
                             '--name', 'r'], capsys)
    assert code == 0, err
    written = (tmp_path / 'r' / 'test_predictions.csv').read_bytes()
    assert b'\r' not in written  # lines end in \n, as confusion.csv's do (grep, cut, diff)
    rows = list(csv.DictReader(written.decode().splitlines()))
    assert len(rows) == 18 and {(row['checkpoint'], row['epoch']) for row in rows} == {('last', '2')}
    classes, confusion = read_confusion(tmp_path / 'r' / 'confusion.csv')
    tallied = {name: [0] * len(classes) for name in classes}
    for row in rows:
        tallied[row['label']][classes.index(row['prediction'])] += 1
    assert tallied == confusion
    code, _, err = run_main(['--eval_only', '--resume', tmp_path / 'r'], capsys)
    assert code == 0, err
    assert (tmp_path / 'r' / 'test_predictions.csv').read_bytes() == written


def test_predictions_on_image_files_equal_eval_only(run_dir, tiny_dataset, tmp_path, capsys):
    """--predict on the test images as files: per true class (the folder), the predicted classes must count up to
    exactly the confusion matrix --eval_only computes on the same images, and each file gets the prediction that
    --eval_only's test_predictions.csv gives it."""
    code, out, err = run_main(['--eval_only', '--resume', run_dir], capsys)
    assert code == 0, err
    classes, confusion = read_confusion(run_dir / 'confusion.csv')
    with open(run_dir / 'test_predictions.csv') as f:
        per_image = list(csv.DictReader(f))
    assert list(per_image[0]) == ['image', 'label', 'prediction', 'probability', 'correct', 'checkpoint', 'epoch']
    assert len(per_image) == 18 and {(row['checkpoint'], row['epoch']) for row in per_image} == {('last', '2')}
    tallied = {name: [0] * len(classes) for name in classes}
    for row in per_image:
        assert row['image'].split(os.sep)[:2] == ['test', row['label']]  # relative to --dataset, in its class folder
        assert os.path.isfile(os.path.join(tiny_dataset, row['image']))
        assert row['correct'] == str(int(row['label'] == row['prediction'])) and 1 / 3 <= float(row['probability']) <= 1
        tallied[row['label']][classes.index(row['prediction'])] += 1
    assert tallied == confusion
    per_class = [line.split() for line in out.splitlines() if line.startswith('  ')]  # each class with its counts
    assert [(name, right, total) for name, _, right, _, total in per_class] == [
        (name, f'({confusion[name][i]}', f'{sum(confusion[name])})') for i, name in enumerate(classes)]
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    out_csv = tmp_path / 'predictions.csv'
    code, out, err = run_main(['--predict', os.path.join(tiny_dataset, 'test'), tmp_path / 'broken.png',
                               '--resume', run_dir, '--out', out_csv], capsys)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.strip()] == [
        line for line in err.splitlines() if line.startswith(f"skipping {tmp_path / 'broken.png'}: cannot read it")]
    assert len(err.strip().splitlines()) == 1  # the unreadable file, in one line; the rest classified
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and list(rows[0]) == ['file', 'prediction', 'probability', 'top3', 'checkpoint', 'epoch']
    assert {(row['checkpoint'], row['epoch']) for row in rows} == {('last', '2')}
    counted = {name: [0] * len(classes) for name in classes}
    for row in rows:
        true_class = os.path.basename(os.path.dirname(row['file']))
        counted[true_class][classes.index(row['prediction'])] += 1
        top = row['top3'].split('; ')
        assert top[0].split()[0] == row['prediction'] and len(top) == 3
        assert 1 / 3 <= float(row['probability']) <= 1
    assert counted == confusion
    predicted = {row['file']: (row['prediction'], float(row['probability'])) for row in rows}
    for row in per_image:
        label, probability = predicted[os.path.join(tiny_dataset, row['image'])]
        assert label == row['prediction'] and probability == pytest.approx(float(row['probability']), abs=2e-4)
    assert f"18 images classified by {run_dir} (last, epoch 2)" in out and '; 1 unreadable file skipped' in out
    assert len(out.strip().splitlines()) == 1 + 18 + 1  # the header, a row per image, the summary


@pytest.mark.parametrize('shown', [5, 17, 18])
def test_predict_prints_the_first_rows_and_writes_them_all(run_dir, tiny_dataset, tmp_path, capsys, monkeypatch,
                                                           shown):
    """A folder of 10,000 images printed 10,002 lines; the CSV is where they all are. Even one row left out of the
    table is said (18 images, 17 shown), so the table never passes for all the predictions."""
    import main
    monkeypatch.setattr(main, 'PREDICTIONS_SHOWN', shown)
    code, out, err = run_main(['--predict', os.path.join(tiny_dataset, 'test'), '--resume', run_dir, '--out',
                               tmp_path / 'p.csv'], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    if shown < 18:
        assert len(lines) == 1 + shown + 2 and lines[-2] == f"... and {18 - shown} more in {tmp_path / 'p.csv'}"
    else:  # all shown: no such line
        assert len(lines) == 1 + 18 + 1 and ' more in ' not in out
    assert len((tmp_path / 'p.csv').read_text().splitlines()) == 1 + 18


def train_one_epoch(dataset, run_dir, capsys):
    """A 1-epoch run of the tiny model on 8-pixel images of `dataset`, into run_dir."""
    code, _, err = run_main([*TINY, '--patch_size', 4, '--img_size', 8, '--dataset', dataset, '--epoch', 1,
                             '--batch_size', 4, '--log_dir', run_dir.parent, '--name', run_dir.name], capsys)
    assert code == 0, err


def test_predict_lists_the_five_most_likely_classes(tmp_path, capsys):
    """With more than five classes (CIFAR-10's ten) the table and the CSV give the top five, most likely first."""
    dataset = write_folder_dataset(tmp_path / 'ds', classes=tuple('abcdef'), train_per_class=2, test_per_class=1,
                                   size=8)
    train_one_epoch(dataset, tmp_path / 'r', capsys)
    code, out, err = run_main(['--predict', os.path.join(dataset, 'test'), '--resume', tmp_path / 'r', '--out',
                               tmp_path / 'p.csv'], capsys)
    assert code == 0, err
    assert out.splitlines()[0].endswith('prob    top-5')
    with open(tmp_path / 'p.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0])[3] == 'top5'
    for row in rows:
        top = [(entry.split()[0], float(entry.split()[1])) for entry in row['top5'].split('; ')]
        assert len(top) == 5 and top[0][0] == row['prediction'] and [p for _, p in top] == sorted(
            (p for _, p in top), reverse=True)


def test_predict_on_nothing_readable_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys):
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    code, _, err = run_main(['--predict', tmp_path / 'broken.png', '--resume', run_dir, '--out', tmp_path / 'p.csv'],
                            capsys)
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: none of {tmp_path / 'broken.png'} could be read as an image; pass image files (.jpg, .jpeg, .png, "
        f".bmp, .gif, .webp) or folders holding them"), err
    assert not (tmp_path / 'p.csv').exists()


def test_predict_paths_that_name_no_image_are_refused_before_any_work(run_dir, tiny_dataset, tmp_path, capsys):
    """A typo among the paths is an error, not a CSV that silently lacks it; so is a folder without images."""
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    code, _, err = run_main(['--predict', image, tmp_path / 'typo.png', '--resume', run_dir, '--out',
                             tmp_path / 'p.csv'], capsys)
    assert code == 1 and err.strip() == f"error: --predict {tmp_path / 'typo.png'}: no such file or folder", err
    os.makedirs(tmp_path / 'empty')
    (tmp_path / 'empty' / 'notes.txt').write_text('')
    code, _, err = run_main(['--predict', tmp_path / 'empty', '--resume', run_dir, '--out', tmp_path / 'p.csv'], capsys)
    assert code == 1 and err.strip() == (f"error: no image files (.jpg, .jpeg, .png, .bmp, .gif, .webp) in "
                                         f"{tmp_path / 'empty'}"), err
    code, _, err2 = run_main(['--predict', image, tmp_path / 'empty', '--resume', run_dir, '--out', tmp_path / 'p.csv'],
                             capsys)  # beside an image, too
    assert code == 1 and err2 == err, err2
    assert not (tmp_path / 'p.csv').exists()



def test_predict_names_the_photos_of_a_folder_it_cannot_read(run_dir, tiny_dataset, tmp_path, capsys):
    """A phone's .HEIC photos in a folder are not classified: a warning (the CSV would look complete without them),
    and the error of a folder that holds nothing else names them."""
    os.makedirs(tmp_path / 'phone')
    shutil.copy(os.path.join(tiny_dataset, 'test', 'cat', '0000.png'), tmp_path / 'phone' / 'IMG_1.JPG')
    (tmp_path / 'phone' / 'IMG_2.HEIC').write_bytes(b'not read')
    code, _, err = run_main(['--predict', tmp_path / 'phone', '--resume', run_dir, '--out', tmp_path / 'p.csv'], capsys)
    assert code == 0 and err.strip() == (f"warning: {tmp_path / 'phone'}: 1 file (IMG_2.HEIC) is in a format not read, "
                                         f"not classified; convert to JPEG or PNG to classify"), err
    os.remove(tmp_path / 'phone' / 'IMG_1.JPG')
    code, _, err = run_main(['--predict', tmp_path / 'phone', '--resume', run_dir, '--out', tmp_path / 'q.csv'], capsys)
    assert code == 1 and err.strip() == (f"error: no image files (.jpg, .jpeg, .png, .bmp, .gif, .webp) in "
                                         f"{tmp_path / 'phone'}; its 1 file (IMG_2.HEIC) is in a format not read: "
                                         f"convert to JPEG or PNG"), err
    assert not (tmp_path / 'q.csv').exists()

def test_predict_names_a_subfolder_it_may_not_list(run_dir, tiny_dataset, tmp_path, capsys, monkeypatch):
    """A subfolder of another user's (chmod 700) was walked past: the CSV looked complete without its images."""
    os.makedirs(tmp_path / 'photos' / 'theirs')
    for name in ('photos/mine.png', 'photos/theirs/x.png'):
        shutil.copy(os.path.join(tiny_dataset, 'test', 'cat', '0000.png'), tmp_path / name)
    deny_listing(monkeypatch, [tmp_path / 'photos' / 'theirs'])
    code, _, err = run_main(['--predict', tmp_path / 'photos', '--resume', run_dir, '--out', tmp_path / 'p.csv'],
                            capsys)
    assert code == 1 and err.strip() == (
        f"error: cannot read the folder {tmp_path / 'photos' / 'theirs'} (Permission denied); give your user read and "
        f"search permission on it (chmod u+rx, or ask its owner), or move it out of the way"), err
    assert not (tmp_path / 'p.csv').exists()


def test_predict_lists_a_folder_as_a_file_browser_does(run_dir, tiny_dataset, tmp_path, capsys):
    """frame_2 before frame_10 (string order put frame_10 first) in the table and in the CSV; files named on the
    command line keep their order."""
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    for name in ('frame_10', 'frame_2', 'frame_1', 'frame_9', 'clip_1/frame_3', 'clip_12/frame_1', 'clip_2/frame_1'):
        os.makedirs(os.path.dirname(tmp_path / 'photos' / name), exist_ok=True)
        shutil.copy(image, tmp_path / 'photos' / f'{name}.png')
    shutil.copy(image, tmp_path / 'z.png')
    code, out, err = run_main(['--predict', tmp_path / 'z.png', tmp_path / 'photos', '--resume', run_dir, '--out',
                               tmp_path / 'p.csv'], capsys)
    assert code == 0, err
    with open(tmp_path / 'p.csv') as f:
        listed = [os.path.relpath(row['file'], tmp_path) for row in csv.DictReader(f)]
    assert listed == ['z.png', *(os.path.join('photos', f'{name}.png') for name in (
        'clip_1/frame_3', 'clip_2/frame_1', 'clip_12/frame_1', 'frame_1', 'frame_2', 'frame_9', 'frame_10'))]
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == [str(tmp_path / path) for path in listed]


def test_predict_lists_a_folder_regardless_of_case_as_a_file_browser_does(run_dir, tiny_dataset, tmp_path, capsys):
    """apple before Banana, Cherry9 before cherry10 (code-point order put every capital letter first)."""
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    os.makedirs(tmp_path / 'photos')
    for name in ('Banana', 'apple', 'cherry10', 'Cherry9'):
        shutil.copy(image, tmp_path / 'photos' / f'{name}.png')
    code, out, err = run_main(['--predict', tmp_path / 'photos', '--resume', run_dir, '--out', tmp_path / 'p.csv'],
                              capsys)
    assert code == 0, err
    with open(tmp_path / 'p.csv') as f:
        listed = [os.path.basename(row['file']) for row in csv.DictReader(f)]
    assert listed == ['apple.png', 'Banana.png', 'Cherry9.png', 'cherry10.png']


def test_predict_lists_numbered_names_by_the_number_then_the_text_after_it(tmp_path):
    """cam1_top before cam2_side (the number decides, then the text: not the count of its digits), cam007 between
    cam2 and cam10; dog_1 and Dog_2 before dogs, '_' before a letter as a file browser puts it (not after 'S')."""
    import main
    names = ('dogs', 'cam10_back', 'Dog_2', 'cam2_side', 'cam007_front', 'dog_1', 'cam1_top')
    os.makedirs(tmp_path / 'photos')
    for name in names:
        (tmp_path / 'photos' / f'{name}.png').write_bytes(b'')  # listed, not read
    assert [os.path.basename(path) for path in main.image_paths([str(tmp_path / 'photos')])] == [
        f'{name}.png' for name in ('cam1_top', 'cam2_side', 'cam007_front', 'cam10_back', 'dog_1', 'Dog_2', 'dogs')]


def test_predict_resume_and_out_take_a_tilde_after_equals(run_dir, tiny_dataset, tmp_path, capsys, monkeypatch):
    """The shell expands ~ only at the start of a word: --resume=~/run --predict=~/cat.png --out=~/p.csv are
    expanded by main.py, as the other path flags are."""
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.chdir(tmp_path)  # where an unexpanded --out=~/p.csv would go: not into the repository
    os.symlink(run_dir, tmp_path / 'run')
    shutil.copy(os.path.join(tiny_dataset, 'test', 'cat', '0000.png'), tmp_path / 'cat.png')
    code, out, err = run_main(['--resume=~/run', '--predict=~/cat.png', '--out=~/p.csv'], capsys)
    assert code == 0, err
    with open(tmp_path / 'p.csv') as f:
        rows = list(csv.reader(f))
    assert len(rows) == 2 and rows[1][0] == str(tmp_path / 'cat.png'), rows


def test_predict_reads_images_as_the_runs_folder_images_were_read(tiny_dataset, tmp_path, capsys, monkeypatch):
    """A run recorded with folder_reading 2 or later shrank larger images to --img_size as they were decoded, one
    recorded with 1 kept them whole; one recorded with 4 turned photos upright by their EXIF orientation, and 5 decodes
    large JPEGs at a reduced scale: --predict reads its images the same way."""
    import data
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8, '--log_dir', tmp_path,
                             '--name', 'r'], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'r' / 'config.json').read_text())
    sizes, read_image = [], data.read_image
    monkeypatch.setattr(data, 'read_image', lambda path, size, **kwargs: sizes.append(
        (size, kwargs['upright'], kwargs['draft'])) or read_image(path, size, **kwargs))
    for reading, size in ((1, (None, False, False)), (2, (32, False, False)), (3, (32, False, False)),
                          (4, (32, True, False)), (5, (32, True, True))):
        (tmp_path / 'r' / 'config.json').write_text(json.dumps(dict(config, folder_reading=reading)))
        code, _, err = run_main(['--predict', os.path.join(tiny_dataset, 'test', 'cat'), '--resume', tmp_path / 'r'],
                                capsys)
        assert code == 0, err
        assert set(sizes) == {size}, reading
        sizes.clear()


def eval_only_with_confusion(run_dir, tmp_path, capsys, monkeypatch, confusion):
    """--eval_only on a copy of run_dir, its evaluation counting `confusion` (rows: true class) -> (copy, stdout)."""
    import torch

    import train
    copy = shutil.copytree(run_dir, tmp_path / 'copy')
    evaluate_split = train.evaluate_split

    def counted(model, split, *args):
        loss, acc, _, *per_image = evaluate_split(model, split, *args)
        return loss, acc, torch.tensor(confusion), *per_image
    monkeypatch.setattr(train, 'evaluate_split', counted)
    code, out, err = run_main(['--eval_only', '--resume', copy], capsys)
    assert code == 0, err
    return copy, out


def test_eval_only_rounds_each_class_from_its_counts(run_dir, tmp_path, capsys, monkeypatch):
    """45 of 242 is 18.595041...%: the per-class table says 18.60% beside "(45 of 242)", not 18.59% from
    per_class_acc's 4 decimals (18.595) rounded again."""
    _, out = eval_only_with_confusion(run_dir, tmp_path, capsys, monkeypatch, [[45, 197, 0], [0, 6, 0], [0, 0, 6]])
    assert re.search(r'^  cat +18\.60%  \( 45 of 242\)$', out, re.M), out


def test_eval_only_shows_a_class_it_never_got_right_as_0_percent_and_says_what_it_wrote(run_dir, tmp_path, capsys,
                                                                                        monkeypatch):
    """'-  (no test images)' is for a class without test images; one whose 6 images were all missed is 0.00%. The
    last line names the files the evaluation wrote."""
    copy, out = eval_only_with_confusion(run_dir, tmp_path, capsys, monkeypatch, [[6, 0, 0], [6, 0, 0], [0, 0, 0]])
    lines = out.strip().splitlines()
    assert [line for line in lines if line.startswith('  ')] == [
        '  cat    100.00%  (6 of 6)', '  dog      0.00%  (0 of 6)', '  frog        -  (no test images)'], out
    assert lines[-1] == (f"wrote {copy / 'confusion.csv'}, {copy / 'test_predictions.csv'} and per_class_acc in "
                         f"{copy / 'summary.json'}")


def test_eval_only_predictions_of_a_checkpoint_that_errs_are_the_ones_predict_gives(run_dir, tiny_dataset, tmp_path,
                                                                                   capsys):
    """test_predictions_best.csv of a best checkpoint that misses images: each row's label is the image's own class
    (its folder), its prediction and probability are what --predict gives that file, correct is 0 for a miss, and
    checkpoint/epoch say best and the epoch best.safetensors was saved at."""
    from safetensors.torch import load_file, save_file
    copy = shutil.copytree(run_dir, tmp_path / 'r')
    weights = load_file(copy / 'trainable.safetensors')
    for name in ('vit.head.weight', 'vit.head.bias'):
        weights[name] = weights[name].roll(1, 0)  # the head answers with the class after the one it learned
    save_file(weights, copy / 'best.safetensors', metadata={'epoch': '1'})
    code, _, err = run_main(['--eval_only', '--resume', copy, '--checkpoint', 'best'], capsys)
    assert code == 0, err
    with open(copy / 'test_predictions_best.csv') as f:
        per_image = list(csv.DictReader(f))
    code, _, err = run_main(['--predict', os.path.join(tiny_dataset, 'test'), '--resume', copy, '--checkpoint', 'best',
                             '--out', tmp_path / 'p.csv'], capsys)
    assert code == 0, err
    with open(tmp_path / 'p.csv') as f:
        predict_rows = list(csv.DictReader(f))
    predicted = {row['file']: (row['prediction'], float(row['probability'])) for row in predict_rows}
    assert len(per_image) == len(predicted) == 18 and {(row['checkpoint'], row['epoch']) for row in per_image} == {
        ('best', '1')} == {(row['checkpoint'], row['epoch']) for row in predict_rows}
    assert any(row['correct'] == '0' for row in per_image)
    for row in per_image:
        assert row['image'].split(os.sep)[:2] == ['test', row['label']]
        assert row['correct'] == str(int(row['label'] == row['prediction']))
        prediction, probability = predicted[os.path.join(tiny_dataset, row['image'])]
        assert row['prediction'] == prediction and float(row['probability']) == pytest.approx(probability, abs=2e-4)


@pytest.mark.parametrize('denied', ['config.json', 'trainable.safetensors', 'best.safetensors', '.'])
def test_a_run_file_the_user_may_not_read_is_said_so_not_called_damaged(run_dir, tmp_path, capsys, monkeypatch,
                                                                          denied):
    """Another user's run (chmod 600 files, or a 700 directory): an unreadable checkpoint was 'damaged' with
    safetensors' 'No such file or directory', config.json 'damaged' too, and the run directory 'no checkpoint there'.
    Denial is played here (the tests run as root, whom chmod denies nothing)."""
    import builtins
    import main
    import train
    run = tmp_path / 'run'
    shutil.copytree(run_dir, run)
    shutil.copy(run / 'trainable.safetensors', run / 'best.safetensors')
    path = os.path.normpath(run / denied)
    access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: access(p, mode, **kw) and os.path.normpath(p) != path)
    if denied == '.':  # a directory without read and search permission: nothing in it seems to exist
        isfile = os.path.isfile
        monkeypatch.setattr(os.path, 'isfile', lambda p: isfile(p) and not str(p).startswith(path + os.sep))
    open_ = builtins.open

    def opening(file, *args, **kwargs):
        if os.path.normpath(str(file)) == path:
            raise PermissionError(13, 'Permission denied', str(file))
        return open_(file, *args, **kwargs)
    monkeypatch.setattr(main, 'open', opening, raising=False)

    def safetensors_reading(file, *args):  # what safetensors says of a file it may not open
        if os.path.normpath(str(file)) == path:
            raise FileNotFoundError(f"No such file or directory: {file}")
        return load(file, *args)
    load, epoch_of = train.load_file, train.checkpoint_epoch
    monkeypatch.setattr(train, 'load_file', safetensors_reading)
    monkeypatch.setattr(train, 'checkpoint_epoch', lambda file: epoch_of(safetensors_reading(file) and file))
    before = sorted(os.listdir(run))
    code, _, err = run_main(['--eval_only', '--resume', run, '--checkpoint', 'best' if denied == 'best.safetensors'
                             else 'last'], capsys)
    assert code != 0 and err.strip() == (
        f"main.py: error: --resume {run}: cannot read that directory (permission denied); make it readable (chmod "
        f"u+rx, or ask its owner) (python main.py --help lists the flags)" if denied == '.' else
        f"error: cannot read {path} (permission denied); make it readable (chmod u+r, or ask its owner)"), err
    assert sorted(os.listdir(run)) == before


def test_a_run_directory_that_can_be_listed_but_not_entered_is_said_so(run_dir, tmp_path, capsys, monkeypatch):
    """`chmod -R 644 logs` leaves a run's directory readable but not searchable (no x): its files seem missing, and
    it was called no run. Denial played as above."""
    run = tmp_path / 'run'
    shutil.copytree(run_dir, run)
    access, isfile = os.access, os.path.isfile
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: access(p, mode, **kw) and not (
        os.path.normpath(p) == str(run) and mode & os.X_OK))
    monkeypatch.setattr(os.path, 'isfile', lambda p: isfile(p) and not str(p).startswith(str(run) + os.sep))
    code, _, err = run_main(['--eval_only', '--resume', run], capsys)
    assert code == 2 and err.strip() == (
        f"main.py: error: --resume {run}: cannot read that directory (permission denied); make it readable (chmod "
        f"u+rx, or ask its owner) (python main.py --help lists the flags)"), err


def test_eval_only_of_an_unfinished_run_names_its_predictions_by_its_epoch(run_dir, tmp_path, capsys):
    """The last checkpoint of a run stopped before its planned epochs (2 of 3) is not the run's result: its
    predictions go to test_predictions_epoch2.csv beside confusion_epoch2.csv, every row of epoch 2, and the last
    line names the two files (no per_class_acc: summary.json describes the run, and is not even read: a damaged one
    does not stop this evaluation)."""
    copy = shutil.copytree(run_dir, tmp_path / 'r')
    config = json.loads((copy / 'config.json').read_text())
    config['epoch'] = 3
    (copy / 'config.json').write_text(json.dumps(config))
    (copy / 'summary.json').write_text('[1, 2]')
    code, out, err = run_main(['--eval_only', '--resume', copy], capsys)
    assert code == 0, err
    assert (copy / 'summary.json').read_text() == '[1, 2]'
    assert out.strip().splitlines()[-1] == (f"wrote {copy / 'confusion_epoch2.csv'} and "
                                            f"{copy / 'test_predictions_epoch2.csv'}")
    with open(copy / 'test_predictions_epoch2.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {(row['checkpoint'], row['epoch']) for row in rows} == {('last', '2')}


def test_eval_only_that_cannot_write_test_predictions_writes_no_confusion_either(run_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """confusion.csv and test_predictions.csv describe one evaluation: a disk that fills while the second is written
    leaves neither file, and the error names the file and says to evaluate again."""
    import errno

    import train
    copy = shutil.copytree(run_dir, tmp_path / 'r')
    for name in ('confusion.csv', 'test_predictions.csv'):
        if os.path.exists(copy / name):
            os.remove(copy / name)
    summary = (copy / 'summary.json').read_bytes()

    def disk_full_at_the_predictions(path, *args, **kwargs):
        if os.path.basename(path).startswith('test_predictions.csv'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(train, 'open', disk_full_at_the_predictions, raising=False)
    code, out, err = run_main(['--eval_only', '--resume', copy], capsys)
    assert code == 1 and 'test accuracy' in out, err
    assert err.strip().splitlines()[-1] == (
        f"error: cannot write {copy / 'test_predictions.csv'} ({os.strerror(errno.ENOSPC)}); the files already there "
        f"are unchanged: free disk space or make {copy} writable, then evaluate again")
    assert sorted(name for name in os.listdir(copy) if name.startswith(('confusion', 'test_predictions'))) == []
    assert (copy / 'summary.json').read_bytes() == summary


def test_eval_only_that_cannot_read_summary_json_writes_no_csv_either(run_dir, tmp_path, capsys, monkeypatch):
    """summary.json of another user's (chmod 600) in a run directory the user may write: confusion.csv and
    test_predictions.csv were written (replacing the old ones) before summary.json failed to read, and the run was
    left with CSVs its summary.json has no per_class_acc for. Denial is played (the tests run as root)."""
    import builtins
    import main
    copy = shutil.copytree(run_dir, tmp_path / 'r')
    os.remove(copy / 'confusion.csv')
    before = {name: (copy / name).read_bytes() for name in os.listdir(copy)}
    open_ = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == str(copy / 'summary.json'):
            raise PermissionError(13, 'Permission denied', str(file))
        return open_(file, *args, **kwargs)
    monkeypatch.setattr(main, 'open', denied, raising=False)
    code, out, err = run_main(['--eval_only', '--resume', copy], capsys)
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: cannot read {copy / 'summary.json'} (permission denied); make it readable (chmod u+r, or ask its "
        f"owner)"), err
    assert {name: (copy / name).read_bytes() for name in os.listdir(copy)} == before


def test_test_predictions_keep_each_image_beside_its_own_label(tmp_path, capsys):
    """Class 'sea' comes before 'sea-ice' (as the classes are sorted) though its files' names sort after them as text
    ('sea-ice/' < 'sea/'): each row of test_predictions.csv still names an image of its label's folder."""
    dataset = write_folder_dataset(tmp_path / 'ds', classes=('sea', 'sea-ice'), train_per_class=2, test_per_class=2,
                                   size=8)
    train_one_epoch(dataset, tmp_path / 'r', capsys)
    code, _, err = run_main(['--eval_only', '--resume', tmp_path / 'r'], capsys)
    assert code == 0, err
    with open(tmp_path / 'r' / 'test_predictions.csv') as f:
        rows = list(csv.DictReader(f))
    assert [(row['image'], row['label']) for row in rows] == [
        (os.path.join('test', name, f'{i:04d}.png'), name) for name in ('sea', 'sea-ice') for i in range(2)]


def test_load_model_gives_in_python_the_predictions_eval_only_writes(run_dir, tiny_dataset, tmp_path, capsys):
    """main.load_model, for a notebook: the run's model (eval mode), its classes and the function that makes its
    input; their softmax on each test image is test_predictions.csv's prediction and probability, for the last
    checkpoint and, with checkpoint='best', for best.safetensors (here a head that errs)."""
    import torch
    from safetensors.torch import load_file, save_file
    import main
    copy = shutil.copytree(run_dir, tmp_path / 'r')
    weights = load_file(copy / 'trainable.safetensors')
    for name in ('vit.head.weight', 'vit.head.bias'):
        weights[name] = weights[name].roll(1, 0)
    save_file(weights, copy / 'best.safetensors', metadata={'epoch': '1'})
    for checkpoint, suffix in (('last', ''), ('best', '_best')):
        code, _, err = run_main(['--eval_only', '--resume', copy, '--checkpoint', checkpoint], capsys)
        assert code == 0, err
        with open(copy / f'test_predictions{suffix}.csv') as f:
            rows = list(csv.DictReader(f))
        model, classes, to_input = main.load_model(copy, checkpoint=checkpoint)
        assert classes == ['cat', 'dog', 'frog'] and not model.training
        assert next(model.parameters()).device.type == ('cuda' if torch.cuda.is_available() else 'cpu')  # auto
        images = assert_predicts_as(rows, model, classes, to_input, tiny_dataset)
        assert any(row['correct'] == '0' for row in rows) == (checkpoint == 'best')
    assert to_input(images[:1].repeat_interleave(2, 2).repeat_interleave(2, 3)).shape == (1, 3, 32, 32)


def assert_predicts_as(rows, model, classes, to_input, dataset):
    """load_model's model gives each test_predictions.csv row's prediction and probability; -> the images read."""
    import numpy as np
    import torch
    from PIL import Image
    images = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(dataset, row['image']))))
                          for row in rows]).permute(0, 3, 1, 2)
    with torch.no_grad():
        probability, predicted = model(to_input(images)).softmax(1).max(1)
    assert [classes[i] for i in predicted] == [row['prediction'] for row in rows]
    assert probability.tolist() == pytest.approx([float(row['probability']) for row in rows], abs=6e-5)
    return images


def test_load_model_mistakes_are_one_line(run_dir, tmp_path, capsys):
    """A mistake in a notebook is a SystemExit after one line that says what is wrong, as on the command line."""
    import torch
    import main
    from safetensors.torch import save_file
    damaged = shutil.copytree(run_dir, tmp_path / 'damaged')
    save_file({'vit.head.weight': torch.zeros(2, 2)}, damaged / 'trainable.safetensors')
    mistakes = [(lambda: main.load_model(tmp_path / 'nowhere'), f"{tmp_path / 'nowhere'}"),
                (lambda: main.load_model(run_dir, checkpoint='best'), "best.safetensors does not exist"),
                (lambda: main.load_model(damaged), "does not match this run's model")]  # raised after parsing
    if not torch.cuda.is_available():
        mistakes.append((lambda: main.load_model(run_dir, device='cuda'), "CUDA is not available here"))
    for call, expected in mistakes:
        with pytest.raises(SystemExit) as exit_info:
            call()
        err = capsys.readouterr().err
        assert exit_info.value.code != 0 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_load_model_input_refuses_float_and_channels_last_images(run_dir):
    """to_input divides by 255: torchvision's float images in [0, 1] gave the model near-black inputs and confident
    wrong answers without a word, and numpy's (N, H, W, 3) an error about tensor sizes. Each is one line naming the
    conversion."""
    import numpy as np
    import torch
    import main
    _, _, to_input = main.load_model(run_dir)
    black = torch.zeros(2, 40, 40, 3, dtype=torch.uint8)
    for images, fix in ((torch.rand(2, 3, 32, 32), "got torch.float32; for floats in [0, 1] pass (images * 255)"),
                        (np.zeros((2, 3, 32, 32), np.uint8), "got ndarray; for floats in [0, 1] pass"),
                        # np.array of PIL images: both steps in one line, not a second error after the first fix
                        (np.zeros((2, 32, 32, 3), np.uint8), "for numpy torch.from_numpy(images).permute(0, 3, 1, 2)"),
                        (black, "got (2, 40, 40, 3); for (N, H, W, 3) pass images.permute(0, 3, 1, 2)"),
                        (black[0].permute(2, 0, 1), "got (3, 40, 40); for one (3, H, W) image pass image[None]")):
        with pytest.raises(ValueError, match=re.escape(fix)) as error:
            to_input(images)
        assert len(str(error.value).splitlines()) == 1
    # the permute only for PIL's (N, H, W, 3): numpy already (N, 3, H, W), or one image's (H, W, 3), has none to take
    for images in (np.zeros((2, 3, 32, 32), np.uint8), np.zeros((32, 32, 3), np.uint8), np.zeros(3, np.float32)):
        with pytest.raises(ValueError, match=re.escape("for numpy torch.from_numpy(images)") + '$'):
            to_input(images)
    assert to_input(black.permute(0, 3, 1, 2)).shape == (2, 3, 32, 32)


def test_load_model_takes_the_weights_file_where_it_moved(tiny_dataset, tmp_path, capsys, one_torch_thread):
    """A run trained from a --weights file that has since moved: the command line takes --weights NEW_PATH, as the
    error says; load_model takes it as weights=, where it had no way to name the file at all."""
    import timm
    import torch
    from safetensors.torch import save_file
    import main
    save_file(timm.create_model('test_vit').state_dict(), tmp_path / 'vit.safetensors')
    code, _, err = run_main([*TINY, '--pretrained', 'True', '--weights', tmp_path / 'vit.safetensors', '--dataset',
                             tiny_dataset, '--patch_size', 8, '--epoch', 1, '--batch_size', 8, '--log_dir', tmp_path,
                             '--name', 'r'], capsys)
    assert code == 0, err
    os.rename(tmp_path / 'vit.safetensors', tmp_path / 'moved.safetensors')
    with pytest.raises(SystemExit):
        main.load_model(tmp_path / 'r')
    assert 'is gone; if it moved, pass --weights NEW_PATH' in capsys.readouterr().err
    model, classes, to_input = main.load_model(tmp_path / 'r', weights=tmp_path / 'moved.safetensors')
    with torch.no_grad():
        assert model(to_input(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))).shape == (1, 3)


def test_load_model_normalises_with_the_model_s_own_mean_and_std(run_dir, tiny_dataset, tmp_path, capsys,
                                                                 monkeypatch):
    """Weights whose mean and std differ (ImageNet's, as DeiT's; timm's test ViTs have 0.5 and 0.5): to_input
    normalises as the run's evaluation does, so load_model's probabilities are --eval_only's test_predictions.csv."""
    import data
    import main
    preprocessing = data.preprocessing
    monkeypatch.setattr(data, 'preprocessing', lambda cfg, *args: preprocessing(
        dict(cfg, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)), *args))
    copy = shutil.copytree(run_dir, tmp_path / 'r')
    code, _, err = run_main(['--eval_only', '--resume', copy], capsys)
    assert code == 0, err
    with open(copy / 'test_predictions.csv') as f:
        rows = list(csv.DictReader(f))
    import torch
    assert_predicts_as(rows, *main.load_model(copy, device=torch.device('cpu')), tiny_dataset)  # a device as torch's


def test_predict_with_a_checkpoint_from_before_the_first_epoch_warns(run_dir, tiny_dataset, tmp_path, capsys):
    """A run stopped in its first epoch has a trainable.safetensors of epoch 0: its head untrained, its answers chance."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(run_dir, tmp_path / 'r')
    checkpoint = tmp_path / 'r' / 'trainable.safetensors'
    save_file(load_file(checkpoint), checkpoint, metadata={'epoch': '0'})
    code, _, err = run_main(['--predict', os.path.join(tiny_dataset, 'test', 'cat'), '--resume', tmp_path / 'r'], capsys)
    assert code == 0 and err.splitlines()[0] == (
        f"warning: {checkpoint} was saved before the run's first epoch ended: its head is untrained, so its "
        f"predictions are chance; resume the run to train it"), err
    with open(tmp_path / 'r' / 'predictions.csv') as f:
        assert {row['epoch'] for row in csv.DictReader(f)} == {'0'}  # the CSV says so too
    save_file(load_file(checkpoint), checkpoint)  # no epoch recorded (vpt did not write it): nothing to warn of
    code, _, err = run_main(['--predict', os.path.join(tiny_dataset, 'test', 'cat'), '--resume', tmp_path / 'r',
                             '--out', tmp_path / 'unknown.csv'], capsys)
    assert code == 0 and 'warning' not in err, err
    code, _, err = run_main(['--predict', os.path.join(tiny_dataset, 'test', 'cat'), '--resume', run_dir, '--out',
                             tmp_path / 'p.csv'], capsys)
    assert code == 0 and 'warning' not in err


def test_predict_with_the_first_checkpoint_of_a_run_that_diverged_says_to_start_a_new_run(tiny_dataset, tmp_path,
                                                                                          capsys):
    """A run whose loss turned non-finite in its first epoch keeps epoch 0's checkpoint; resuming it keeps its --lr
    and diverges again, so the warning's way out is a new run with a lower --lr, not a resume."""
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--full', True, '--lr', 1e30, '--warmup_epochs', 0,
                             '--epoch', 1, '--batch_size', 8, '--log_dir', tmp_path, '--name', 'r'], capsys)
    assert code == 3, err
    code, _, err = run_main(['--predict', os.path.join(tiny_dataset, 'test', 'cat'), '--resume', tmp_path / 'r'],
                            capsys)
    assert code == 0 and err.splitlines()[0] == (
        f"warning: {tmp_path / 'r' / 'trainable.safetensors'} was saved before the run's first epoch ended: its head "
        f"is untrained, so its predictions are chance; the run diverged (a non-finite loss): start a new run with a "
        f"lower --lr"), err
    os.remove(tmp_path / 'r' / 'summary.json')  # a run killed in its first epoch may have none: the warning still is
    code, _, err = run_main(['--predict', os.path.join(tiny_dataset, 'test', 'cat'), '--resume', tmp_path / 'r',
                             '--out', tmp_path / 'p.csv'], capsys)
    assert code == 0 and err.splitlines()[0].endswith("so its predictions are chance; resume the run to train it"), err


def test_predict_runs_the_model_in_eval_mode(tiny_dataset, tmp_path, capsys, monkeypatch):
    """A run trained with --prompt_dropout predicts without dropping prompts, as evaluation does."""
    import model
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8, '--prompt_dropout',
                             0.5, '--log_dir', tmp_path, '--name', 'r'], capsys)
    assert code == 0, err
    training, forward = [], model.PromptedViT.forward
    monkeypatch.setattr(model.PromptedViT, 'forward', lambda self, x: training.append(self.training) or forward(self, x))
    code, _, err = run_main(['--predict', os.path.join(tiny_dataset, 'test'), '--resume', tmp_path / 'r'], capsys)
    assert code == 0, err
    assert training and not any(training)


def test_predict_never_overwrites_and_needs_a_run(run_dir, tiny_dataset, capsys):
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    for expected in ('predictions.csv', 'predictions-2.csv'):
        code, out, err = run_main(['--predict', image, '--resume', run_dir], capsys)
        assert code == 0, err
        assert out.strip().endswith(f"wrote {run_dir / expected}")
    code, _, err = run_main(['--predict', image], capsys)
    assert code == 2 and '--predict needs --resume RUN_DIR' in err


def test_predict_under_torchrun_is_refused_before_any_work(run_dir, tiny_dataset, capsys, monkeypatch):
    """--predict runs in one process: under torchrun every process would classify the same images and write a CSV."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    before = sorted(os.listdir(run_dir))
    code, _, err = run_main(['--predict', os.path.join(tiny_dataset, 'test'), '--resume', run_dir], capsys)
    assert code == 1 and err.strip() == "error: --predict runs in one process; launch it with python, not torchrun"
    assert sorted(os.listdir(run_dir)) == before


def test_the_bar_shows_on_a_terminal_only_and_the_last_line_says_where_the_results_are(tiny_dataset, tmp_path, capsys,
                                                                                       monkeypatch):
    """In a log file (2> run.log, sweep.py's trial logs) the bar's redraws would bury the epoch lines."""
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8,
                               '--log_dir', tmp_path], capsys)
    assert code == 0 and 'it/s' not in err and 'epoch 1/1  train loss' in out, err
    run_dir = tmp_path / os.listdir(tmp_path)[0]  # the run's last line: its final number and where the files are
    final = float(read_metrics(run_dir)[-1]['test_acc'])
    assert out.strip().splitlines()[-1] == (f"final test acc {final:.2f}% (without --val_split no epoch is chosen); "
                                            f"results in {run_dir}")
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True, raising=False)
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8,
                               '--log_dir', tmp_path], capsys)
    assert code == 0 and 'epoch 1/1: 100%' in err and 'it/s' in err, err


def test_tensorboard_event_files_hold_the_metrics(tiny_dataset, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 2, '--batch_size', 8, '--val_split', 0.25,
                               '--tensorboard', True, '--log_dir', tmp_path, '--name', 'tb'], capsys)
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / 'tb'), size_guidance={'scalars': 0, 'images': 0})
    events.Reload()
    tags = events.Tags()
    rows = read_metrics(tmp_path / 'tb')
    for key in ('train_loss', 'train_acc', 'test_acc', 'val_acc'):
        values = [(event.step, event.value) for event in events.Scalars(f'epoch/{key}')]
        assert [step for step, _ in values] == [1, 2]
        assert [value for _, value in values] == pytest.approx([float(row[key]) for row in rows], abs=1e-3)
    lrs = events.Scalars('step/lr')
    assert [event.step for event in lrs] == list(range(1, 9))  # 36 train images / batch 8 = 4 steps per epoch
    assert lrs[-1].value == pytest.approx(float(rows[-1]['lr']), rel=1e-4)
    assert 'confusion' in tags['images']
    assert 'epoch/includes_compile' not in tags['scalars']  # a flag for the time columns, not a metric


def test_tensorboard_missing_is_one_line(tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorboard', None)  # as if it were not installed
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--tensorboard', True, '--log_dir', tmp_path], capsys)
    assert code == 1 and err.strip() == ("error: --tensorboard True needs the tensorboard package; pip install "
                                         "tensorboard (or pass --tensorboard False)")
    assert os.listdir(tmp_path) == []


def test_run_logged_to_tensorboard_is_usable_without_it(tiny_dataset, tmp_path, capsys, monkeypatch):
    """A run directory handed to someone without tensorboard: --eval_only and --predict need no event writer."""
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 16, '--tensorboard', True,
                             '--log_dir', tmp_path, '--name', 'tb'], capsys)
    assert code == 0, err
    monkeypatch.setitem(sys.modules, 'tensorboard', None)
    assert run_main(['--eval_only', '--resume', tmp_path / 'tb'], capsys)[0] == 0
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    assert run_main(['--predict', image, '--resume', tmp_path / 'tb'], capsys)[0] == 0
    code, _, err = run_main(['--resume', tmp_path / 'tb', '--epoch', 2], capsys)
    assert code == 1 and 'pass --tensorboard False' in err
    code, _, err = run_main(['--resume', tmp_path / 'tb', '--epoch', 2, '--tensorboard', False], capsys)
    assert code == 0, err


def test_predict_out_never_replaces_a_file(run_dir, tiny_dataset, capsys):
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    before = (run_dir / 'metrics.csv').read_bytes()
    code, _, err = run_main(['--predict', image, '--resume', run_dir, '--out', run_dir / 'metrics.csv'], capsys)
    assert code == 1 and err.strip().startswith(f"error: --out {run_dir / 'metrics.csv'} already exists")
    assert (run_dir / 'metrics.csv').read_bytes() == before


def test_predict_out_a_link_to_a_missing_file_is_refused(run_dir, tiny_dataset, tmp_path, capsys):
    """--out naming a link whose file is gone (and bench.py's --json, through train.write_new): the exclusive open
    refuses the link and fresh_path offered the same name again, forever; now it is an existing name (found by a
    fuzz)."""
    import train
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    os.symlink(tmp_path / 'gone.csv', tmp_path / 'link.csv')
    assert train.fresh_path(str(tmp_path / 'link.csv')) == str(tmp_path / 'link-2.csv')  # first: no endless loop
    code, _, err = run_main(['--predict', image, '--resume', run_dir, '--out', tmp_path / 'link.csv'], capsys)
    assert code == 1 and err.strip().startswith(f"error: --out {tmp_path / 'link.csv'} already exists")
    assert sorted(os.listdir(tmp_path)) == ['link.csv']


def test_predict_out_empty_is_refused_not_taken_for_no_out(run_dir, tiny_dataset, tmp_path, capsys):
    """`--out "$OUT"` with OUT unset wrote predictions-N.csv into the run directory without a word."""
    before = sorted(os.listdir(run_dir))
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    code, _, err = run_main(['--predict', image, '--resume', run_dir, '--out', ''], capsys)
    assert code == 2 and err.strip() == ("main.py: error: --out '' names no file; pass a file name such as "
                                         "predictions.csv, or drop --out (python main.py --help lists the flags)"), err
    assert sorted(os.listdir(run_dir)) == before
    code, _, err = run_main(['--eval_only', '--resume', run_dir, '--out', ''], capsys)  # the mistake is --out itself
    assert code == 2 and err.strip().startswith("main.py: error: --out goes with --predict"), err


def test_predict_out_whose_folder_cannot_be_made_at_the_end_is_one_line(run_dir, tiny_dataset, tmp_path, monkeypatch,
                                                                        capsys):
    """--out's missing folder is checked at the start and made at the end: when making it fails then (a file took
    its name meanwhile; /proc, where access() says yes), one line, not a traceback after the work (found by a fuzz)."""
    import main
    image_paths = main.image_paths

    def then_a_file_takes_the_folder_name(paths):
        (tmp_path / 'new').write_text('')
        return image_paths(paths)
    monkeypatch.setattr(main, 'image_paths', then_a_file_takes_the_folder_name)
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    code, _, err = run_main(['--predict', image, '--resume', run_dir, '--out', tmp_path / 'new' / 'p.csv'], capsys)
    assert code == 1 and err.count('\n') == 1 and err.startswith(f"error: cannot write {tmp_path / 'new' / 'p.csv'}")


def test_eval_only_of_an_unfinished_run_names_its_epoch(tiny_dataset, tmp_path, capsys):
    code, _, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 8, '--log_dir', tmp_path,
                             '--name', 'r'], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / 'r' / 'config.json').read_text())
    config['epoch'] = 3  # as a run stopped after epoch 1 of 3 looks
    (tmp_path / 'r' / 'config.json').write_text(json.dumps(config))
    os.remove(tmp_path / 'r' / 'confusion.csv')
    summary = (tmp_path / 'r' / 'summary.json').read_bytes()
    code, out, err = run_main(['--eval_only', '--resume', tmp_path / 'r'], capsys)
    assert code == 0, err
    assert os.path.isfile(tmp_path / 'r' / 'confusion_epoch1.csv')  # not confusion.csv: not the run's result
    assert not os.path.exists(tmp_path / 'r' / 'confusion.csv')
    assert (tmp_path / 'r' / 'summary.json').read_bytes() == summary
    code, out, err = run_main(['--eval_only', '--resume', tmp_path / 'r', '--epoch', 1], capsys)  # the run decides
    assert code == 0 and not os.path.exists(tmp_path / 'r' / 'confusion.csv'), err


def test_eval_only_on_a_run_directory_it_cannot_write_still_shows_the_accuracy(run_dir, capsys, monkeypatch):
    """A read-only (or full) run directory: the evaluation is done, so its accuracy is printed before the one line
    saying the confusion matrix could not be written, and nothing of the run changes."""
    import errno
    before = {name: open(os.path.join(run_dir, name), 'rb').read() for name in os.listdir(run_dir)
              if os.path.isfile(os.path.join(run_dir, name))}

    def read_only(descriptor):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(os, 'fsync', read_only)
    code, out, err = run_main(['--eval_only', '--resume', run_dir], capsys)
    assert code == 1 and re.search(r'test accuracy [0-9.]+% test loss', out), (out, err)
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {os.path.join(run_dir, 'confusion.csv')} "
                                                   f"(Read-only file system)"), err
    assert {name: open(os.path.join(run_dir, name), 'rb').read() for name in os.listdir(run_dir)
            if os.path.isfile(os.path.join(run_dir, name))} == before


def test_class_without_images(tiny_dataset, tmp_path, capsys):
    # 2 test images of 3 classes: one class has none, and its accuracy is unknown, not 0%; likewise 2 training images
    code, out, err = run_main([*TINY, '--dataset', tiny_dataset, '--epoch', 1, '--batch_size', 2, '--train_samples', 2,
                               '--test_samples', 2, '--log_dir', tmp_path, '--name', 'r'], capsys)
    assert code == 0, err
    warnings = err.strip().splitlines()
    assert warnings[0].startswith('warning: 1 of 3 classes have no training images (')
    assert warnings[1].startswith('warning: 1 of 3 classes have no test images (') and 'to 3 or more' in warnings[1]
    per_class = json.loads((tmp_path / 'r' / 'summary.json').read_text())['per_class_acc']
    assert list(per_class.values()).count(None) == 1
    code, out, err = run_main(['--eval_only', '--resume', tmp_path / 'r'], capsys)
    assert code == 0 and '(no test images)' in out, err


@pytest.mark.parametrize('absent, named', [(5, 'b, c, d, e, f)'), (6, 'b, c, d, e, f, ...)')])
def test_the_classes_without_images_are_named_up_to_five(capsys, absent, named):
    """The warning names the first five classes a split lacks, and '...' when there are more."""
    import argparse
    import main
    import torch
    classes = list('abcdefg')[:absent + 1]
    train_labels, test_labels = torch.arange(len(classes)).repeat(2), torch.zeros(2, dtype=torch.long)
    args = argparse.Namespace(train_samples=0, test_samples=0, val_split=0, test_split=0, batch_size=2,
                              eval_only=False)
    main.check_splits(args, dict(train=(None, train_labels), val=None, test=(None, test_labels)), classes,
                      train_labels, 0)
    assert capsys.readouterr().err.strip() == (
        f"warning: {absent} of {absent + 1} classes have no test images ({named}; test accuracy leaves them out (the "
        f"dataset's test split has none of them)")


def test_predict_out_makes_missing_folders_but_not_under_a_file(run_dir, tiny_dataset, tmp_path, capsys):
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    (tmp_path / 'a_file').write_text('')
    code, _, err = run_main(['--predict', image, '--resume', run_dir, '--out', tmp_path / 'a_file' / 'p.csv'], capsys)
    assert code == 1 and f"({tmp_path / 'a_file'} is not a writable directory)" in err
    code, out, err = run_main(['--predict', image, '--resume', run_dir, '--out', tmp_path / 'new' / 'sub' / 'p.csv'],
                              capsys)
    assert code == 0, err
    assert (tmp_path / 'new' / 'sub' / 'p.csv').read_text().startswith('file,prediction,')


def test_predict_table_columns_line_up_with_long_class_names(tmp_path, capsys):
    dataset = write_folder_dataset(tmp_path / 'ds', classes=('a', 'a rather long class name'), train_per_class=4,
                                   test_per_class=2, size=8)
    train_one_epoch(dataset, tmp_path / 'r', capsys)
    code, out, err = run_main(['--predict', os.path.join(dataset, 'test'), '--resume', tmp_path / 'r'], capsys)
    assert code == 0, err
    header, *table = out.splitlines()[:-1]
    assert len(table) == 4
    for line in table:  # each probability under 'prob', whatever class name comes before it
        assert re.match(r'[01]\.\d{4}  ', line[header.index('prob'):]), (header, line)


def test_predict_and_eval_tables_line_up_with_wide_class_names_and_odd_file_names(tmp_path, capsys):
    """A class named in CJK (two terminal columns a character) keeps the columns after it in line, in --predict's
    table and --eval_only's per-class one; a newline in a file name is shown escaped, one row per image, while the
    CSV keeps the name as it is."""
    dataset = write_folder_dataset(tmp_path / 'ds', classes=('猫', 'dog'), train_per_class=4, test_per_class=2,
                                   size=8)
    odd = os.path.join(dataset, 'test', 'dog', 'two\nlines.png')
    os.rename(os.path.join(dataset, 'test', 'dog', '0001.png'), odd)
    train_one_epoch(dataset, tmp_path / 'r', capsys)
    code, out, err = run_main(['--predict', os.path.join(dataset, 'test'), '--resume', tmp_path / 'r', '--out',
                               tmp_path / 'p.csv'], capsys)
    assert code == 0, err
    header, *table, summary = out.splitlines()
    assert len(table) == 4 and sum('two\\nlines.png' in line for line in table) == 1
    columns = lambda text: sum(2 if '\u4e00' <= char <= '\u9fff' else 1 for char in text)
    prob_column = columns(header[:header.index('prob')])
    for line in table:
        start = next(i for i in range(len(line)) if columns(line[:i]) == prob_column)
        assert re.match(r'[01]\.\d{4}  ', line[start:]), (header, line)
    with open(tmp_path / 'p.csv', newline='') as f:
        assert odd in [row['file'] for row in csv.DictReader(f)]
    code, out, err = run_main(['--eval_only', '--resume', tmp_path / 'r'], capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith('  ')]
    assert len(rows) == 2 and len({columns(line[:line.index('%')]) for line in rows}) == 1, rows


def test_predict_out_must_be_a_file(run_dir, tiny_dataset, tmp_path, capsys):
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    code, _, err = run_main(['--predict', image, '--resume', run_dir, '--out', tmp_path], capsys)
    assert code == 1 and err.strip() == (f"error: --out {tmp_path} is a directory; pass a file name such as "
                                         f"{tmp_path / 'predictions.csv'}")
    assert os.listdir(tmp_path) == []


def test_fresh_path_skips_every_existing_name(tmp_path):
    """--predict's default CSV: predictions.csv, then -2, -3...; never an existing file."""
    import train
    for name in ('p.csv', 'p-2.csv'):
        (tmp_path / name).write_text('')
    assert train.fresh_path(str(tmp_path / 'p.csv')) == str(tmp_path / 'p-3.csv')


def test_write_new_never_replaces_and_leaves_no_fragment(tmp_path, monkeypatch):
    """The CSV of --predict and bench.py's --json: a file that appeared after the name was checked is kept and the
    output goes to the next free name; a failed write (a full disk) leaves no half file under any name."""
    import errno
    import train
    (tmp_path / 'p.csv').write_text('theirs')
    assert train.write_new(str(tmp_path / 'p.csv'), b'ours') == str(tmp_path / 'p-2.csv')
    assert (tmp_path / 'p.csv').read_text() == 'theirs' and (tmp_path / 'p-2.csv').read_text() == 'ours'
    fresh_path = train.fresh_path

    def taken_right_after_the_check(path):  # another process creates the name this one has just found free
        chosen = fresh_path(path)
        if chosen == str(tmp_path / 'r.csv'):
            (tmp_path / 'r.csv').write_text('theirs')
        return chosen
    monkeypatch.setattr(train, 'fresh_path', taken_right_after_the_check)
    assert train.write_new(str(tmp_path / 'r.csv'), b'ours') == str(tmp_path / 'r-2.csv')
    assert (tmp_path / 'r.csv').read_text() == 'theirs' and (tmp_path / 'r-2.csv').read_text() == 'ours'
    monkeypatch.setattr(train, 'fresh_path', fresh_path)
    for name in ('r.csv', 'r-2.csv'):
        os.remove(tmp_path / name)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full_disk)
    with pytest.raises(SystemExit) as exit:
        train.write_new(str(tmp_path / 'q.csv'), b'ours', then='classify the images again')
    assert str(exit.value) == (f"error: cannot write {tmp_path / 'q.csv'} ({os.strerror(errno.ENOSPC)}); the files "
                               f"already there are unchanged: free disk space or make {tmp_path} writable, then "
                               f"classify the images again")
    assert sorted(os.listdir(tmp_path)) == ['p-2.csv', 'p.csv']


def test_predict_keeps_a_csv_written_meanwhile(run_dir, tiny_dataset, tmp_path, monkeypatch, capsys):
    """Two --predict runs on one run directory, or --out named twice: the CSV that appears while images are being
    classified is another process's, and stays; this one's goes to the next free name, said on stderr."""
    import data
    out_csv = tmp_path / 'p.csv'
    read_image = data.read_image

    def another_process_writes(*args, **kwargs):
        if not out_csv.exists():
            out_csv.write_text('theirs')
        return read_image(*args, **kwargs)
    monkeypatch.setattr(data, 'read_image', another_process_writes)
    image = os.path.join(tiny_dataset, 'test', 'cat', '0000.png')
    code, out, err = run_main(['--predict', image, '--resume', run_dir, '--out', out_csv], capsys)
    assert code == 0, err
    assert out_csv.read_text() == 'theirs' and (tmp_path / 'p-2.csv').read_text().startswith('file,prediction,')
    assert err.strip() == (f"note: {out_csv} was written by another process meanwhile; kept it and wrote "
                           f"{tmp_path / 'p-2.csv'}")
    assert out.strip().splitlines()[-1] == (f"1 image classified by {run_dir} (last, epoch 2); wrote "
                                            f"{tmp_path / 'p-2.csv'}")


def test_a_reader_that_goes_away_is_one_line_not_a_traceback(run_dir, tiny_dataset, tmp_path):
    """python main.py --predict ... | head, --eval_only ... | head, python plot.py logs/ | head: the CSVs are written
    before the table is printed, and the closed pipe is one line (main.py) or nothing (plot.py), not Python's
    BrokenPipeError traceback."""
    code, err = stderr_when_the_reader_goes_away(['--predict', os.path.join(tiny_dataset, 'test'), '--resume', run_dir,
                                                  '--out', tmp_path / 'p.csv'], 'main.py')
    assert code == 1 and err.strip() == "main.py: stopped: the program reading its output (head, say) exited", err
    assert len((tmp_path / 'p.csv').read_text().splitlines()) == 1 + 18  # header + every test image
    code, err = stderr_when_the_reader_goes_away([os.path.dirname(run_dir), '--out', tmp_path / 'a.png'], 'plot.py')
    assert code == 1 and err == '', err
    copy = shutil.copytree(run_dir, tmp_path / 'copy')  # --eval_only | head: its files are written all the same
    os.remove(copy / 'confusion.csv')
    code, err = stderr_when_the_reader_goes_away(['--eval_only', '--resume', copy], 'main.py')
    assert code == 1 and err.strip() == "main.py: stopped: the program reading its output (head, say) exited", err
    assert read_confusion(copy / 'confusion.csv') == read_confusion(run_dir / 'confusion.csv')


@pytest.mark.skipif(sys.platform == 'darwin', reason="macOS refuses file names that are not UTF-8")
def test_names_that_are_not_utf8_are_escaped_in_every_csv_not_a_crash(tiny_dataset, tmp_path, capsys):
    """A photo folder unzipped from an old Windows archive holds cp1252 names (b'caf\\xe9'), which Python hands over as
    surrogates: a class folder so named crashed the last epoch's confusion.csv (and --tensorboard's figure of it), and
    a file so named crashed --test_split's hash, --eval_only's test_predictions.csv and --predict's CSV. Each CSV is
    UTF-8 with the bytes escaped as \\xe9, as the tables print them."""
    root = tmp_path / 'data'
    shutil.copytree(os.path.join(tiny_dataset, 'train'), root / 'train')  # class folders alone: --test_split
    train = os.fsencode(root / 'train')
    os.rename(os.path.join(train, b'dog'), os.path.join(train, b'd\xe9g'))
    os.rename(os.path.join(train, b'cat', b'0000.png'), os.path.join(train, b'cat', b'caf\xe9.png'))
    code, out, err = run_main([*TINY, '--dataset', root, '--test_split', 0.5, '--epoch', 1, '--batch_size', 4,
                               '--tensorboard', True, '--log_dir', tmp_path, '--name', 'r'], capsys)
    assert code == 0 and 'font' not in err, err  # TensorBoard's confusion figure too, its class names escaped
    text = lambda path: path.read_bytes().decode('utf-8')  # strict: a reader's default
    assert text(tmp_path / 'r' / 'confusion.csv').splitlines()[0] == 'true\\predicted,cat,d\\xe9g,frog'
    code, out, err = run_main(['--eval_only', '--resume', tmp_path / 'r'], capsys)
    assert code == 0 and re.search(r'^  d\\xe9g +[0-9.]+%', out, re.M), err + out
    rows = list(csv.DictReader(text(tmp_path / 'r' / 'test_predictions.csv').splitlines()))
    assert len(rows) == 24 and {row['label'] for row in rows} == {'cat', 'd\\xe9g', 'frog'}
    assert all(row['image'].startswith(os.path.join('train', row['label'], '')) for row in rows)
    code, out, err = run_main(['--predict', os.path.join(root, 'train', 'cat'), '--resume', tmp_path / 'r', '--out',
                               tmp_path / 'p.csv'], capsys)
    assert code == 0 and 'caf\\xe9.png' in out, err
    assert os.path.join(str(root), 'train', 'cat', 'caf\\xe9.png') in text(tmp_path / 'p.csv')


def test_load_model_leaves_the_notebook_s_random_numbers_alone(run_dir):
    """Building the model seeds torch with the run's --seed (its random head and prompts); in a notebook that reseeded
    the caller's own random numbers: after load_model they went on as if load_model had not been called."""
    import torch
    import main
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    main.load_model(run_dir, device='cpu')
    assert torch.equal(torch.rand(4), expected)
