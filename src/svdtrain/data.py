"""Datasets kept in memory as uint8 tensors: CIFAR-10/100, scikit-learn's digits, image folders.

Everything is loaded once into N x C x H x W uint8 tensors (CIFAR-10 is 150 MB that way);
`svdtrain.loader.BatchLoader` then cuts, augments and normalizes whole batches as tensors:
no DataLoader workers, no per-image Python loop, same idea as airbench / hlb-cifar10.
"""
import hashlib
import logging
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

DATASET_NAMES = ["digits", "cifar10", "cifar100", "folder"]
DEFAULT_DATA_DIR = "data"

log = logging.getLogger("svdtrain")

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


def _stratified_holdout(labels: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices (kept, held out) with n held out, each class in proportion to its count
    (scikit-learn)."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("val_split=stratified needs scikit-learn: pip install 'svdtrain[cli]'") from None
    try:
        keep, val = train_test_split(torch.arange(len(labels)).numpy(), test_size=n, random_state=seed,
                                     stratify=labels.numpy())
    except ValueError as err:  # a class of one image, or fewer images than classes on a side
        raise ValueError(f"stratified validation split of {n}: {err}") from None
    return torch.from_numpy(keep).sort().values, torch.from_numpy(val).sort().values


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

    def with_validation(self, n: int, seed: int = 0, stratified: bool = False) -> "Dataset":
        """A copy whose `n` training images are held out as x_val/y_val (for choosing
        hyper-parameters without the test set): the last n of a fixed seeded shuffle, or with
        `stratified` each class in its share of the n (scikit-learn's stratified split). The
        split depends only on `seed`, not on the run's seed: every run that asks for n sees
        the same one. A class left with no validation image is logged (stratify then)."""
        if not 0 < n < len(self.x_train):
            raise ValueError(f"validation size must be in 1..{len(self.x_train) - 1}, got {n}")
        if stratified:
            keep, val = _stratified_holdout(self.y_train, n, seed)
        else:
            order = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
            keep, val = order[:-n].sort().values, order[-n:].sort().values
            missing = sorted(set(self.y_train.unique().tolist()) - set(self.y_train[val].unique().tolist()))
            if missing:
                log.warning("svdtrain: the validation split holds no image of class(es) %s; "
                            "val_split=stratified gives each class its share", missing[:10])
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
        # a channel that never varies (red-only images) would divide by 0: leave it unscaled
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
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

def _hidden(name: str) -> bool:
    """Names no dataset means: .ipynb_checkpoints, macOS's ._x.png and __MACOSX."""
    return name.startswith(".") or name == "__MACOSX"


def _images_under(cdir):
    """A class folder's images, its subfolders' too (as torchvision's ImageFolder reads them)."""
    return sorted(p for p in cdir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(_hidden(part) for part in p.relative_to(cdir).parts))


def _list_split(split_dir, classes=None):
    train = classes is None  # the eval split takes train's classes
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not _hidden(p.name))
    if classes is None:
        classes = found
        if not classes:
            raise FileNotFoundError(f"no class folders in {split_dir}")
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise ValueError(f"{split_dir} has classes not in train: {extra[:5]}")
    files, labels = [], []
    for i, c in enumerate(classes):
        cdir = split_dir / c
        if not cdir.is_dir():
            continue  # a class may simply have no images in the eval split
        imgs = _images_under(cdir)
        if not imgs and train:  # an eval split may hold a class without images
            raise FileNotFoundError(f"class folder {cdir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += imgs
        labels += [i] * len(imgs)
    if not files:
        raise FileNotFoundError(f"no images in {split_dir} ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, files, labels


def _to_rgb(im):
    """8-bit RGB, upright by its EXIF orientation; 16-bit grey (Pillow modes I;16*, and I as
    16-bit PNG and PGM files open, Pillow scaling any PGM maxval to 16 bits) scaled down to 8 bits
    first, by the format's range, not the image's values: Pillow's own convert clamps them at 255
    (a 16-bit image would load almost white). Other integer (I) and float (F) images: 0..1,
    0..255 or 16-bit, by their values (the format says nothing)."""
    from PIL import Image, ImageOps
    sixteen = im.mode.startswith("I;16") or (im.mode == "I" and im.format in ("PNG", "PPM"))
    im = ImageOps.exif_transpose(im)  # (its copy has no format: read before)
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if sixteen:
            top = 65535.0
        else:  # 32-bit integers (TIFF) or floats: the range their values show
            top = 1.0 if im.mode == "F" and a.max() <= 1.0 else (255.0 if a.max() <= 255 else 65535.0)
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def _load_images(files, image_size):
    from PIL import Image

    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = _to_rgb(im)
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
