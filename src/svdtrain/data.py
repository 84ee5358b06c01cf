"""Datasets kept in memory as uint8 tensors, and a fast batch loader with GPU-friendly augmentation.

Everything is loaded once into N x C x H x W uint8 tensors (CIFAR-10 is 150 MB that way), and
batches are cut, augmented and normalized as whole tensors: no DataLoader workers, no
per-image Python loop, same idea as airbench / hlb-cifar10.
"""
import hashlib
import math
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASET_NAMES = ["digits", "cifar10", "cifar100", "folder"]
DEFAULT_DATA_DIR = "data"

_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"],
        test=["test"],
        label_key=b"fine_labels",
        num_classes=100,
    ),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(repr=False, eq=False)
class Dataset:
    """Train/test images as uint8 N x C x H x W tensors, labels as int64 tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    x_val: torch.Tensor | None = None  # held out of the training images (see with_validation)
    y_val: torch.Tensor | None = None

    def __repr__(self):
        val = "" if self.x_val is None else f", val={tuple(self.x_val.shape)}"
        return (f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}{val}, test={tuple(self.x_test.shape)}, "
                f"num_classes={self.num_classes})")

    def with_validation(self, n: int, seed: int = 0) -> "Dataset":
        """A copy whose last `n` training images of a fixed seeded shuffle are held out as
        x_val/y_val (for choosing hyper-parameters without the test set). The split depends
        only on `seed`, not on the run's seed: every run that asks for n sees the same one."""
        if not 0 < n < len(self.x_train):
            raise ValueError(f"validation size must be in 1..{len(self.x_train) - 1}, got {n}")
        order = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
        keep, val = order[:-n].sort().values, order[-n:].sort().values
        return Dataset(self.x_train[keep], self.y_train[keep], self.x_test, self.y_test,
                       self.num_classes, self.name, self.x_train[val], self.y_train[val])

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[2]

    @cached_property
    def _moments(self):
        # Chunked float64 sums: converting all of CIFAR to float at once would take 600 MB.
        s = torch.zeros(self.in_channels, dtype=torch.float64)
        s2 = torch.zeros_like(s)
        for chunk in self.x_train.split(4096):
            c = chunk.to(torch.float64).div_(255)
            s += c.sum((0, 2, 3))
            s2 += c.square().sum((0, 2, 3))
        n = self.x_train.numel() / self.in_channels
        mean = s / n
        std = (s2 / n - mean.square()).clamp_min(0).sqrt()
        return mean.float(), std.float()

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean of x_train / 255."""
        return self._moments[0]

    @property
    def std(self) -> torch.Tensor:
        """Per-channel (population) std of x_train / 255."""
        return self._moments[1]


# ----------------------------------------------------------------------------- CIFAR

def _cifar_spec(name):
    if name not in _CIFAR:
        raise ValueError(f"unknown CIFAR name {name!r}; expected 'cifar10' or 'cifar100'")
    return _CIFAR[name]


def _cifar_dir(data_dir, name):
    """The folder holding the batch files: DIR/<standard folder>, or DIR itself."""
    spec = _cifar_spec(name)
    data_dir = Path(data_dir).expanduser()
    if (data_dir / spec["folder"]).is_dir():
        return data_dir / spec["folder"]
    if data_dir.name == spec["folder"] or (data_dir / spec["test"][0]).is_file():
        return data_dir
    return data_dir / spec["folder"]


def _read_cifar_batches(folder, files, label_key, name):
    data_dir = folder.parent  # what --data-dir should be, whichever form the user passed
    xs, ys = [], []
    for f in files:
        path = folder / f
        if not path.is_file():
            hint = f"run `svdtrain download {name} --data-dir {data_dir}`"
            raise FileNotFoundError(f"{name}: missing {path}; {hint}")
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(data_dir, name="cifar10") -> Dataset:
    """Load CIFAR-10/100 from the standard python-version layout under data_dir."""
    spec = _cifar_spec(name)
    folder = _cifar_dir(data_dir, name)
    x_train, y_train = _read_cifar_batches(folder, spec["train"], spec["label_key"], name)
    x_test, y_test = _read_cifar_batches(folder, spec["test"], spec["label_key"], name)
    return Dataset(x_train, y_train, x_test, y_test, spec["num_classes"], name)


def _safe_extract(tar, dest):
    if hasattr(tarfile, "data_filter"):  # Python 3.12+ and security backports
        tar.extractall(dest, filter="data")
        return
    # Older Pythons: refuse absolute paths, '..' escapes and links before extracting.
    root = os.path.realpath(dest)
    for m in tar.getmembers():
        target = os.path.realpath(os.path.join(dest, m.name))
        if os.path.commonpath([root, target]) != root or m.issym() or m.islnk() or m.isdev():
            raise RuntimeError(f"refusing to extract unsafe archive member {m.name!r}")
    tar.extractall(dest)


def download_cifar(name, data_dir) -> Path:
    """Download and extract CIFAR-10/100 into data_dir (md5-checked); no-op if already there."""
    spec = _cifar_spec(name)
    data_dir = Path(data_dir).expanduser()
    folder = data_dir / spec["folder"]
    if all((folder / f).is_file() for f in spec["train"] + spec["test"]):
        return folder
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tar.gz", dir=data_dir)
    try:
        md5 = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec["url"], timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
        if md5.hexdigest() != spec["md5"]:
            raise RuntimeError(f"md5 mismatch for {spec['url']}: got {md5.hexdigest()}, expected {spec['md5']}")
        with tarfile.open(tmp, "r:gz") as tar:
            _safe_extract(tar, data_dir)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return folder


def write_fake_cifar(data_dir, n_train=200, n_test=100, num_classes=10, seed=0, name="cifar10") -> Path:
    """Write a tiny random CIFAR in the exact python-version layout; returns the batch folder.

    The class index shifts the image brightness, so even a tiny net can learn it.
    """
    spec = _cifar_spec(name)
    folder = Path(data_dir).expanduser() / spec["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)

    def make(n, tag):
        labels = rng.permutation(np.arange(n) % num_classes)
        shift = np.round(labels * 191 / max(num_classes - 1, 1)).astype(np.uint8)
        data = (rng.randint(0, 64, size=(n, 3072)) + shift[:, None]).astype(np.uint8)
        filenames = [f"fake_{tag}_{i:05d}.png".encode() for i in range(n)]
        return data, [int(v) for v in labels], filenames

    def dump(fname, obj):
        with open(folder / fname, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)

    label_names = [f"class_{i}".encode() for i in range(num_classes)]
    if name == "cifar10":
        data, labels, fnames = make(n_train, "train")
        bounds = np.linspace(0, n_train, 6).astype(int)
        for i, f in enumerate(spec["train"]):
            a, b = bounds[i], bounds[i + 1]
            dump(f, {b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": labels[a:b],
                     b"data": data[a:b], b"filenames": fnames[a:b]})
        data, labels, fnames = make(n_test, "test")
        dump("test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                            b"data": data, b"filenames": fnames})
        dump("batches.meta", {b"label_names": label_names, b"num_cases_per_batch": int(bounds[1]), b"num_vis": 3072})
    else:
        for f, n in (("train", n_train), ("test", n_test)):
            data, labels, fnames = make(n, f)
            dump(f, {b"batch_label": f"{f}ing batch 1 of 1".encode(), b"fine_labels": labels,
                     b"coarse_labels": [v % 20 for v in labels], b"data": data, b"filenames": fnames})
        dump("meta", {b"fine_label_names": label_names,
                      b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)]})
    return folder


# ----------------------------------------------------------------------------- digits

def load_digits_dataset(test_fraction=0.25, seed=0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), stratified fixed split, uint8 1x8x8."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None]  # N x 1 x 8 x 8
    y = d.target.astype(np.int64)
    rng = np.random.RandomState(seed)
    test_idx = []
    for c in np.unique(y):  # stratified: the same fraction of every class goes to test
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[: int(round(test_fraction * len(idx)))])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return Dataset(t(x[~is_test]), t(y[~is_test]), t(x[is_test]), t(y[is_test]), 10, "digits")


# ----------------------------------------------------------------------------- image folder

def _list_split(split_dir, classes=None):
    if classes is None:
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders in {split_dir}")
    else:
        extra = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise ValueError(f"{split_dir} has classes not in train: {extra[:5]}")
    files, labels = [], []
    for i, c in enumerate(classes):
        cdir = split_dir / c
        if not cdir.is_dir():
            continue  # a class may simply have no images in the eval split
        imgs = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not imgs:
            raise FileNotFoundError(f"class folder {cdir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += imgs
        labels += [i] * len(imgs)
    return classes, files, labels


def _load_images(files, image_size):
    from PIL import Image

    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = image_size / min(w, h)  # shorter side -> image_size, then center crop
            nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            out[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(out)


def load_image_folder(root, image_size=64) -> Dataset:
    """ImageNet-style root/train/<class>/* and root/val (or root/test)/<class>/*, resized and center-cropped."""
    root = Path(root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"missing {train_dir} (expected {root}/train/<class>/*.jpg)")
    eval_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if eval_dir is None:
        raise FileNotFoundError(f"missing {root / 'val'} (or {root / 'test'}) with <class>/*.jpg inside")
    classes, train_files, train_labels = _list_split(train_dir)
    _, eval_files, eval_labels = _list_split(eval_dir, classes)
    if not eval_files:
        raise FileNotFoundError(f"no images in {eval_dir}")
    return Dataset(
        _load_images(train_files, image_size), torch.tensor(train_labels, dtype=torch.int64),
        _load_images(eval_files, image_size), torch.tensor(eval_labels, dtype=torch.int64),
        len(classes), root.name or "folder",
    )


def load_dataset(name, data_dir=None, **kw) -> Dataset:
    """Load 'digits', 'cifar10', 'cifar100' or 'folder' (an ImageNet-style folder at data_dir)."""
    name = name.lower()
    if name == "digits":
        return load_digits_dataset(**kw)
    if name in _CIFAR:
        return load_cifar(DEFAULT_DATA_DIR if data_dir is None else data_dir, name, **kw)
    if name == "folder":
        if data_dir is None:
            raise ValueError("dataset 'folder' needs data_dir (a folder with train/ and val/ inside)")
        return load_image_folder(data_dir, **kw)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


# ----------------------------------------------------------------------------- loader

class BatchLoader:
    """Yields (normalized float images, labels) batches from in-memory uint8 tensors.

    Shuffle order and augmentation come from a generator seeded with seed + epoch, so they are
    reproducible and identical on every rank; call set_epoch(epoch) before each epoch (as with
    DistributedSampler). Random crop pads with zeros in uint8 space (black pixels), as
    torchvision's RandomCrop(padding=4) does in the usual CIFAR pipeline.
    """

    def __init__(self, x_uint8, y, batch_size, *, train, mean, std, augment=True, pad=4, flip=True,
                 drop_last=None, seed=0, rank=0, world_size=1, device="cpu", channels_last=False):
        self.x = torch.as_tensor(x_uint8)
        self.y = torch.as_tensor(y)
        assert self.x.dtype == torch.uint8 and self.x.ndim == 4, "x must be uint8 N x C x H x W"
        assert len(self.x) == len(self.y), "x and y lengths differ"
        assert 0 <= rank < world_size
        self.batch_size = batch_size
        self.train = train
        self.augment = augment and train
        self.pad = pad
        self.flip = flip
        self.drop_last = train if drop_last is None else drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.epoch = 0
        # Fold /255 and normalization into one multiply-add.
        std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std)).to(self.device)
        self.shift = (-mean / std).to(self.device)

    def set_epoch(self, epoch):
        """Select the epoch whose shuffle order and augmentations the next iteration uses."""
        self.epoch = epoch

    def _num_local(self):
        n = len(self.x)
        if self.train:
            return math.ceil(n / self.world_size)
        return len(range(self.rank, n, self.world_size))

    def __len__(self):
        n = self._num_local()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _plan(self):
        """This rank's indices for the epoch, plus per-sample crop offsets and flip flags (or None)."""
        n = len(self.x)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size), None
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.randperm(n, generator=g)
        total = math.ceil(n / self.world_size) * self.world_size
        if total > n:  # repeat from the start so every rank gets the same count (DistributedSampler)
            idx = idx.repeat(math.ceil(total / n))[:total]
        aug = None
        if self.augment:
            # Drawn for the whole global order, then sharded: a sample's augmentation at a given
            # position does not depend on world_size, and ranks do not share random streams.
            k = 2 * self.pad + 1
            dy = torch.randint(0, k, (total,), generator=g)
            dx = torch.randint(0, k, (total,), generator=g)
            fl = torch.randint(0, 2, (total,), generator=g).bool()
            if not self.flip:
                fl.zero_()  # still drawn above, so the stream does not depend on flip
            aug = (dy[self.rank::self.world_size], dx[self.rank::self.world_size], fl[self.rank::self.world_size])
        return idx[self.rank::self.world_size], aug

    def _augment(self, xb, dy, dx, fl):
        """Random crop (zero pad then per-sample window) and horizontal flip as one gather."""
        B, C, H, W = xb.shape
        dev = xb.device
        p = self.pad
        xp = F.pad(xb, (p, p, p, p)) if p else xb
        ar_h, ar_w = torch.arange(H, device=dev), torch.arange(W, device=dev)
        rows = dy[:, None] + ar_h  # B x H
        # Flip is folded into the column index: read the window right-to-left.
        cols = dx[:, None] + torch.where(fl[:, None], W - 1 - ar_w, ar_w)  # B x W
        b = torch.arange(B, device=dev)[:, None, None, None]
        c = torch.arange(C, device=dev)[None, :, None, None]
        return xp[b, c, rows[:, None, :, None], cols[:, None, None, :]]

    def __iter__(self):
        idx, aug = self._plan()
        n = len(idx)
        stop = n - n % self.batch_size if self.drop_last else n
        src = self.x.device
        pin = self.device.type == "cuda" and src.type == "cpu"
        for i in range(0, stop, self.batch_size):
            j = idx[i:i + self.batch_size].to(src)
            xb, yb = self.x[j], self.y[j.to(self.y.device)]
            if aug is not None:
                dy, dx, fl = (a[i:i + self.batch_size].to(src) for a in aug)
                xb = self._augment(xb, dy, dx, fl)
            if pin:  # async host-to-device copy needs pinned memory
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
            # uint8 crosses the bus (4x less than float); conversion happens on the device.
            xb = xb.float().mul_(self.scale).add_(self.shift)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb
