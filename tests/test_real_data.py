"""Real CIFAR-10 images (the shared JPEG archive) through the folder-dataset path: a tiny ViT learns from scratch."""
from conftest import read_metrics, run_main


def test_tiny_vit_learns_cifar10_from_scratch(cifar_folder, tmp_path, capsys):
    # timm's 6-layer 64-wide test ViT, random init, 8x8 patches on 32x32 images: ~20 s on two CPU cores
    code, out, err = run_main(['--model', 'test_vit', '--pretrained', False, '--device', 'cpu', '--full', True,
                               '--prompts', 0, '--patch_size', 8, '--dataset', cifar_folder, '--train_samples', 20000,
                               '--test_samples', 1000, '--epoch', 2, '--batch_size', 64, '--lr', 2e-3,
                               '--log_dir', tmp_path, '--name', 'cifar'], capsys)
    assert code == 0, err
    assert '20000 train / 1000 test images, 10 classes' in out
    rows = read_metrics(tmp_path / 'cifar')
    assert float(rows[-1]['test_acc']) >= 30.0, rows  # chance is 10%
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
