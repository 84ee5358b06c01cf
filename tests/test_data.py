import pickle

import numpy as np
import pytest
import torch

from svdtrain.data import Dataset, load_cifar, load_dataset, load_digits_dataset, load_image_folder, write_fake_cifar
from svdtrain.loader import BatchLoader


def _decode(path, label_key=b"labels"):
    """Independent decode of one python-version CIFAR batch file."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return np.asarray(d[b"data"]).reshape(-1, 3, 32, 32), np.asarray(d[label_key])


def test_fake_cifar10_roundtrip(tmp_path):
    folder = write_fake_cifar(tmp_path, n_train=50, n_test=20, seed=1)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    ds = load_cifar(tmp_path, "cifar10")
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.in_channels == 3 and ds.image_size == 32
    assert 0 <= ds.y_train.min() and ds.y_train.max() < 10
    parts = [_decode(folder / f"data_batch_{i}") for i in range(1, 6)]
    assert np.array_equal(ds.x_train.numpy(), np.concatenate([p[0] for p in parts]))
    assert np.array_equal(ds.y_train.numpy(), np.concatenate([p[1] for p in parts]))
    x, y = _decode(folder / "test_batch")
    assert np.array_equal(ds.x_test.numpy(), x) and np.array_equal(ds.y_test.numpy(), y)
    # The batch folder itself is accepted too.
    ds2 = load_cifar(folder, "cifar10")
    assert torch.equal(ds2.x_train, ds.x_train)


def test_fake_cifar100_roundtrip(tmp_path):
    folder = write_fake_cifar(tmp_path, n_train=30, n_test=10, num_classes=100, name="cifar100")
    ds = load_dataset("cifar100", tmp_path)
    x, y = _decode(folder / "train", b"fine_labels")
    assert np.array_equal(ds.x_train.numpy(), x) and np.array_equal(ds.y_train.numpy(), y)
    assert ds.num_classes == 100 and ds.name == "cifar100" and ds.x_test.shape == (10, 3, 32, 32)


def test_fake_cifar_is_learnable(tmp_path):
    write_fake_cifar(tmp_path, n_train=100, n_test=10)
    ds = load_cifar(tmp_path)
    bright = torch.stack([ds.x_train[ds.y_train == c].float().mean() for c in range(10)])
    assert (bright.diff() > 0).all()  # class index shifts the brightness


def test_missing_cifar_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="svdtrain download cifar10 --data-dir") as e:
        load_cifar(tmp_path / "nowhere")
    assert "cifar-10-batches-py" in str(e.value) and "\n" not in str(e.value)


def test_mean_std(tmp_path):
    write_fake_cifar(tmp_path, n_train=40, n_test=10)
    ds = load_cifar(tmp_path)
    x = ds.x_train.numpy().astype(np.float64) / 255
    assert torch.allclose(ds.mean, torch.tensor(x.mean((0, 2, 3)), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(ds.std, torch.tensor(x.std((0, 2, 3)), dtype=torch.float32), atol=1e-5)


def _toy(n=24, c=3, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=g), torch.arange(n)


MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _norm(x):
    return (x.float() / 255 - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)


def test_loader_identity_without_crop_or_flip():
    x, y = _toy()
    loader = BatchLoader(x, y, 5, train=True, mean=MEAN, std=STD, pad=0, flip=False)
    assert len(loader) == 4  # drop_last defaults to train
    batches = list(loader)
    assert len(batches) == 4
    for xb, yb in batches:
        assert xb.dtype == torch.float32
        torch.testing.assert_close(xb, _norm(x[yb]))
    eval_loader = BatchLoader(x, y, 5, train=False, mean=MEAN, std=STD)
    assert len(eval_loader) == 5
    ys = torch.cat([yb for _, yb in eval_loader])
    assert torch.equal(ys, y)  # no shuffle, no drop, no augmentation
    torch.testing.assert_close(torch.cat([xb for xb, _ in eval_loader]), _norm(x))


@pytest.mark.parametrize("flip", [False, True])
def test_loader_crop_is_window_of_padded_input(flip):
    x, y = _toy(n=16)
    loader = BatchLoader(x, y, 16, train=True, mean=MEAN, std=STD, pad=4, flip=flip, seed=3)
    xb, yb = next(iter(loader))
    padded = _norm(torch.nn.functional.pad(x, (4, 4, 4, 4)))  # zero pixels, then normalized
    found = []
    for k in range(len(yb)):
        hits = []
        for dy in range(9):
            for dx in range(9):
                win = padded[yb[k], :, dy:dy + 8, dx:dx + 8]
                for f in ([False, True] if flip else [False]):
                    if torch.allclose(xb[k], win.flip(-1) if f else win, atol=1e-5):
                        hits.append((dy, dx, f))
        assert hits, f"sample {k} is not a window of the padded image"
        found.append(hits[0])
    assert len({h[:2] for h in found}) > 1  # offsets really vary per sample
    if flip:
        assert {h[2] for h in found} == {False, True}


def test_loader_deterministic_per_epoch():
    x, y = _toy(n=40)
    kw = dict(train=True, mean=MEAN, std=STD, seed=7)
    a, b = BatchLoader(x, y, 8, **kw), BatchLoader(x, y, 8, **kw)
    a.set_epoch(2), b.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    e2 = torch.cat([yb for _, yb in a])
    a.set_epoch(3)
    assert not torch.equal(e2, torch.cat([yb for _, yb in a]))


def test_loader_ddp_sharding():
    x, y = _toy(n=40)
    shards = [torch.cat([yb for _, yb in BatchLoader(x, y, 4, train=True, mean=MEAN, std=STD, seed=1, rank=r,
                                                     world_size=2, drop_last=False)]) for r in range(2)]
    s0, s1 = set(shards[0].tolist()), set(shards[1].tolist())
    assert len(shards[0]) == len(shards[1]) == 20
    assert not (s0 & s1) and s0 | s1 == set(range(40))
    # Uneven size: padded by repetition so both ranks have the same number of batches.
    x, y = _toy(n=41)
    loaders = [BatchLoader(x, y, 4, train=True, mean=MEAN, std=STD, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 6
    ys = [torch.cat([yb for _, yb in ld]) for ld in loaders]
    assert len(ys[0]) == len(ys[1]) == 21 and set(torch.cat(ys).tolist()) == set(range(41))
    # Evaluation: no shuffle, no padding, rank r takes r::world_size.
    for r in range(2):
        ev = torch.cat([yb for _, yb in BatchLoader(x, y, 4, train=False, mean=MEAN, std=STD, rank=r, world_size=2)])
        assert torch.equal(ev, y[r::2])


def test_loader_channels_last():
    x, y = _toy(n=8)
    xb, _ = next(iter(BatchLoader(x, y, 4, train=False, mean=MEAN, std=STD, channels_last=True)))
    assert xb.is_contiguous(memory_format=torch.channels_last)


def test_digits():
    ds = load_digits_dataset()
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert ds.num_classes == 10 and ds.name == "digits"
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape[1:] == (1, 8, 8)
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    assert set(ds.y_test.tolist()) == set(range(10))
    assert abs(len(ds.x_test) / 1797 - 0.25) < 0.01
    assert torch.equal(load_digits_dataset().y_test, ds.y_test)  # fixed split


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("folder")


def _write_images(split_dir, classes, sizes):
    from PIL import Image

    for ci, c in enumerate(classes):
        (split_dir / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.new("RGB", (w, h), (40 * ci, 10 * i, 200)).save(split_dir / c / f"{i}.png")


def test_image_folder(tmp_path):
    _write_images(tmp_path / "train", ["cat", "ant"], [(20, 12), (12, 30), (16, 16)])
    _write_images(tmp_path / "test", ["cat", "ant"], [(10, 10)])
    ds = load_image_folder(tmp_path, image_size=8)
    assert ds.x_train.shape == (6, 3, 8, 8) and ds.x_test.shape == (2, 3, 8, 8)
    assert ds.x_train.dtype == torch.uint8 and ds.num_classes == 2
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1]  # classes sorted: ant=0, cat=1
    assert (ds.x_train[:3, 0] == 40).all() and (ds.x_train[3:, 0] == 0).all() and (ds.x_train[:, 2] == 200).all()


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        load_image_folder(tmp_path)
    _write_images(tmp_path / "train", ["a"], [(8, 8)])
    with pytest.raises(FileNotFoundError, match="val"):
        load_image_folder(tmp_path)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(tmp_path)


def test_dataset_repr_is_short():
    ds = Dataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64),
                 torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), 3, "t")
    assert "\n" not in repr(ds) and "num_classes=3" in repr(ds)


def test_image_folder_scales_16_bit_grey_to_8_bits(tmp_path):
    """A 16-bit PNG holding 0, 32896 and 65535 loads as 0, 128 and 255 in each channel (by hand:
    65535 / 257 = 255, 32896 / 257 = 128), not clamped to 255."""
    from PIL import Image
    values = np.array([[0, 32896, 65535, 65535]] * 4, dtype=np.uint16)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(values).save(tmp_path / split / "a" / "x.png")
    ds = load_image_folder(tmp_path, image_size=4)
    assert ds.x_train[0, :, 0, :3].tolist() == [[0, 128, 255]] * 3


def test_image_folder_ignores_hidden_entries_and_reads_subfolders(tmp_path):
    from PIL import Image
    _write_images(tmp_path / "train", ["cat", "ant"], [(8, 8), (8, 8)])
    _write_images(tmp_path / "val", ["cat", "ant"], [(8, 8)])
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # a notebook's folder: no class
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / ".ipynb_checkpoints" / "x.png")
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    (tmp_path / "train" / "cat" / "more").mkdir()  # a subfolder of a class: its images count
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "train" / "cat" / "more" / "9.png")
    for f in (tmp_path / "val" / "ant").iterdir():  # an eval class folder without images: allowed
        f.unlink()
    ds = load_image_folder(tmp_path, image_size=8)
    assert ds.num_classes == 2 and ds.y_train.tolist() == [0, 0, 1, 1, 1] and ds.y_test.tolist() == [1]


def test_a_channel_that_never_varies_is_left_unscaled(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (4, 4), (50 + 100 * (c == "b"), 0, 0)).save(tmp_path / split / c / "x.png")
    ds = load_image_folder(tmp_path, image_size=4)
    assert ds.std[1] == ds.std[2] == 1.0 and ds.std[0] > 0


def test_16_bit_pgm_scales_by_its_format_not_its_values(tmp_path):
    """The same raw value 200 loads alike whatever else the image holds (200 / 257 -> 1)."""
    raw = np.array([[200, 200], [200, 60000]], dtype=">u2")
    for split, img in (("train", raw), ("val", np.full((2, 2), 200, dtype=">u2"))):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "x.pgm").write_bytes(b"P5\n2 2\n65535\n" + img.tobytes())
    ds = load_image_folder(tmp_path, image_size=2)
    assert ds.x_train[0, 0, 0, 0] == ds.x_test[0, 0, 0, 0] == round(200 / 257)


def test_32_bit_integer_images_scale_by_their_values(tmp_path):
    """A 32-bit integer TIFF holding 0..255 is an 8-bit image stored wide, not a 16-bit one."""
    from PIL import Image
    values = np.array([[0, 128, 255, 255]] * 4, dtype=np.int32)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(values, mode="I").save(tmp_path / split / "a" / "x.tif")
    ds = load_image_folder(tmp_path, image_size=4)
    assert ds.x_train[0, 0, 0, :3].tolist() == [0, 128, 255]


def _labelled(counts):
    """A dataset whose image i holds the value i (so rows can be traced) and classes of these sizes."""
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    x = torch.arange(len(y)).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return Dataset(x, y, x[:2], y[:2], len(counts), "toy")


def _ids(x):
    return set(x[:, 0, 0, 0].tolist())


@pytest.mark.parametrize("stratified", [False, True])
def test_validation_split_partitions_the_training_images_with_their_labels(stratified):
    data = _labelled([50, 30, 15, 5])
    split = data.with_validation(20, stratified=stratified)
    train, val = _ids(split.x_train), _ids(split.x_val)
    assert len(val) == 20 and not train & val and train | val == set(range(100))
    for x, y in ((split.x_train, split.y_train), (split.x_val, split.y_val)):
        assert torch.equal(data.y_train[x[:, 0, 0, 0]], y)  # each image keeps its label
    again = data.with_validation(20, stratified=stratified)
    assert torch.equal(again.x_val, split.x_val)  # one fixed split per seed
    if stratified:  # each class its share of 20 of 100: 50 -> 10, 30 -> 6, 15 -> 3, 5 -> 1
        assert torch.bincount(split.y_val, minlength=4).tolist() == [10, 6, 3, 1]


def test_a_random_split_that_misses_a_class_says_so_and_stratified_refuses_a_single_image(caplog):
    data = _labelled([99, 1])
    with caplog.at_level("WARNING", logger="svdtrain"):
        split = data.with_validation(1)
    assert split.y_val.tolist() == [0] and "no image of class(es) [1]" in caplog.text
    with pytest.raises(ValueError, match="stratified validation split of 1: .*least populated class"):
        data.with_validation(1, stratified=True)


def test_the_config_key_val_split_reaches_the_run_data(tmp_path):
    from svdtrain.config import ConfigError, load_config
    from svdtrain.context import run_dataset
    write_fake_cifar(tmp_path, n_train=200, n_test=20)
    cfg = load_config(None, [f"data_dir={tmp_path}", "val_size=50", "val_split=stratified"])
    data, labels = run_dataset(cfg), load_cifar(tmp_path).y_train
    # each class within one image of its share of the 50 (a shuffle of seed 0 misses that)
    assert (torch.bincount(data.y_val, minlength=10) - 50 * torch.bincount(labels, minlength=10) / 200).abs().max() < 1
    with pytest.raises(ConfigError, match="val_split.*random, stratified"):
        load_config(None, ["val_split=by_class"])
