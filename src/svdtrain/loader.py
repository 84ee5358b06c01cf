"""A fast batch loader over in-memory uint8 images: the whole batch is cut, augmented (random
crop + flip as one gather) and normalized as tensors, on the training device."""
import math

import torch
import torch.nn.functional as F


class BatchLoader:
    """Yields (normalized float images, labels) batches from in-memory uint8 tensors.

    Shuffle order and augmentation come from a generator seeded with (seed, epoch), so they are
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
        # One stream per (seed, epoch): seed + epoch would make seed s at epoch e replay seed 0's
        # epoch s + e, so runs of neighbouring seeds would see shifted copies of one order.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
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
