"""The real/fake detector: Inception-ResNet-v2 from timm with a 2-way head. Plain torch/timm.

Everything that touches the model without Ray lives here, so training, evaluation,
serving and scoring share it: building the network (`create`, `from_meta`), loading
pretrained weights (`load_pretrained`), THE preprocessing (`to_input`), and the plain
torch steps (`train_step`, `predict`).

Classes: 0 = real, 1 = fake; p_fake = softmax(logits)[:, 1]. A 2-way softmax with
cross-entropy is exactly binary cross-entropy on the logit difference.
"""
from __future__ import annotations

import io

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from deepfake_ray.errors import UsageError

ARCH = "inception_resnet_v2"
HUB_NAME = "inception_resnet_v2.tf_in1k"
CLASS_NAMES = ["real", "fake"]
INTERPOLATION = "bilinear"  # what to_input does (with antialias) for every consumer


def create(arch: str = ARCH, num_classes: int = 2, pretrained: str = "none",
           hub_name: str = HUB_NAME) -> nn.Module:
    """A fresh model; `pretrained` is `none`, `hub` or a weights file (local or s3://). Its
    pretrained config, where `preprocessing` reads the mean and std, is `hub_name`'s tag
    when that names this architecture: the arch's default tag may have been trained with
    another normalization (vit_base_patch16_224 0.5, its .mae weights ImageNet's)."""
    try:
        model = timm.create_model(hub_name if hub_name.partition(".")[0] == arch else arch,
                                  pretrained=False, num_classes=num_classes)
    except RuntimeError:  # a tag this timm does not know: the hub says so if it is fetched
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    return load_pretrained(model, pretrained, hub_name)


def from_meta(meta: dict, state: dict | None = None) -> nn.Module:
    """The architecture an exported model.json describes; with `state` (its weights),
    the trained model in eval mode."""
    model = create(meta.get("arch", ARCH), int(meta.get("num_classes", 2)))
    if state is not None:
        model.load_state_dict(state)
        model.eval()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def preprocessing(model: nn.Module) -> dict:
    """Normalization derived from the model's pretrained config (timm), not hard-coded."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "interpolation": INTERPOLATION}


def to_input(pixels, input_size: int, mean, std, interpolation: str = INTERPOLATION) -> torch.Tensor:
    """uint8 NHWC (numpy or torch, any device) -> normalized float NCHW at input_size."""
    x = torch.as_tensor(pixels)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode=interpolation,
                          align_corners=False, antialias=True)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def meta_input(pixels, meta: dict) -> torch.Tensor:
    """to_input with the preprocessing recorded in an exported model.json."""
    pre = meta["preprocessing"]
    return to_input(pixels, int(meta["input_size"]), pre["mean"], pre["std"],
                    pre.get("interpolation", INTERPOLATION))


# --- pretrained weights ----------------------------------------------------------

def head_prefix(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier", "classif") + "."


def load_pretrained(model: nn.Module, spec: str, hub_name: str = HUB_NAME) -> nn.Module:
    """Backbone weights into `model`; the source's classifier head is always dropped."""
    if spec in ("", "none"):
        return model
    state = hub_state_dict(hub_name) if spec == "hub" else read_weights(spec)
    prefix = head_prefix(model)
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    where = "the model hub" if spec == "hub" else spec
    architecture = model.pretrained_cfg.get("architecture", ARCH)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # the right names, other shapes (a variant of the architecture)
        raise UsageError(f"weights from {where} do not fit {architecture}: "
                         f"{str(e).split(chr(10))[1].strip()[:200]}: pass a state dict of that "
                         "architecture") from None
    missing = [k for k in result.missing_keys if not k.startswith(prefix)]
    if missing or result.unexpected_keys:
        raise UsageError(
            f"weights from {where} do not fit {architecture}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(result.unexpected_keys)} "
            f"unexpected (e.g. {result.unexpected_keys[:2]}): pass a state dict of that architecture")
    return model


def check_weights(spec: str, arch: str = ARCH) -> None:
    """load_pretrained's checks on a model that holds no memory (meta tensors): weights
    that do not fit fail once, in the driver, not in every Train worker after retries."""
    import warnings

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=2)
    with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": meant
        warnings.simplefilter("ignore", UserWarning)
        load_pretrained(model, spec)


def hub_state_dict(hub_name: str = HUB_NAME) -> dict:
    """ImageNet weights from the model hub, or a UsageError saying how to pass a file."""
    try:
        hub_model = timm.create_model(hub_name, pretrained=True)
    except RuntimeError as e:  # a tag this timm does not know (train.check_hub_name says so first)
        raise UsageError(f"detector.hub_name={hub_name}: {e}") from None
    except OSError as e:  # offline, DNS, HTTP errors, missing cache: all OSError subclasses
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        raise UsageError(f"cannot download {hub_name} from the model hub ({reason}): pass a local "
                         "or s3:// weights file with --set detector.pretrained=PATH")
    return hub_model.state_dict()


def read_weights(uri: str) -> dict:
    """A safetensors file or a torch state dict (.pth/.bin), never unpickling objects."""
    from deepfake_ray import storage  # pyarrow only; no Ray

    try:
        blob = storage.read_bytes(uri)
    except FileNotFoundError:
        raise UsageError(f"detector.pretrained={uri}: no such file; pass hub, none, or an "
                         "existing local or s3:// weights file") from None
    except OSError as e:
        if storage.is_s3(uri):  # explained, with the fix, where store errors are
            raise
        raise UsageError(f"detector.pretrained={uri}: cannot read it ({e.strerror or e}): pass a "
                         "weights file this user can read") from None
    if uri.endswith(".safetensors") or blob[8:9] == b"{":  # safetensors: u64 size, JSON header
        from safetensors.torch import load as st_load

        try:
            return st_load(blob)
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: one damaged file
            raise UsageError(f"detector.pretrained={uri} is not a readable safetensors file "
                             f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}): "
                             "download or export it again")
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise UsageError(f"detector.pretrained={uri} is not a safetensors file or a torch state "
                         f"dict ({type(e).__name__}): save one with torch.save(model.state_dict())")
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UsageError(f"detector.pretrained={uri} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


# --- plain torch steps -------------------------------------------------------------

def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Frozen: only the head learns, and batch-norm statistics stay as they are."""
    prefix = head_prefix(model)
    for name, param in model.named_parameters():
        param.requires_grad_(not frozen or name.startswith(prefix))


def train_mode(model: nn.Module, frozen: bool) -> None:
    model.train()
    if frozen:  # keep the (pretrained) batch-norm running statistics fixed
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Each image of an NCHW batch mirrored left-right with probability 1/2 (torch RNG)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def two_class_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The cross-entropy of [real, fake] logits, written as the logistic loss of their
    difference: the same numbers, without NLLLoss, which PyTorch lists among the ops with
    no deterministic CUDA form (deterministic=true on a GPU)."""
    margin = logits[:, 1] - logits[:, 0]
    return F.binary_cross_entropy_with_logits(margin, y.to(margin.dtype), reduction=reduction)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, autocast_dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (summed loss, correct predictions) as detached tensors,
    left on the device so a GPU loop does not wait for each step."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(x)
        loss = two_class_loss(logits.float(), y)
    loss.backward()
    optimizer.step()
    return loss.detach() * len(y), (logits.detach().argmax(1) == y).sum()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor],
                          autocast_dtype: torch.dtype | None = None) -> None:
    """Batch-norm running statistics recomputed from `batches` with the current weights.

    Running averages lag weights that move fast (from scratch, few steps): the demo's
    detector had 0.97 training accuracy but 0.5 in eval mode, every image at p_fake
    0.9999. Statistics recomputed from the epoch's last inputs ("precise BN") make eval
    mode agree with training. Only layers in training mode are touched: a frozen
    backbone keeps its pretrained statistics.
    """
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not layers or not batches:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
    for x in batches:
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            model(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None = None
            ) -> torch.Tensor:
    """Logits (float32) for a batch of prepared inputs."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return model(x).float()


def eval_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast_dtype: torch.dtype | None = None
              ) -> tuple[float, np.ndarray]:
    """One validation batch, the model in eval mode: (summed loss, P(fake) per image)."""
    logits = predict(model, x, autocast_dtype)
    return float(two_class_loss(logits, y, reduction="sum")), p_fake(logits)


class FromPixels(nn.Module):
    """uint8 NHWC pixels at the model's resolution -> float32 logits: THE preprocessing
    (`meta_input`) and the network as one module, so serving traces them together."""

    def __init__(self, model: nn.Module, meta: dict):
        super().__init__()
        self.model, self.meta = model, meta

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(meta_input(pixels, self.meta)).float()


def inference_graph(model: nn.Module, meta: dict) -> nn.Module:
    """A frozen TorchScript `FromPixels` of an eval-mode model, for serving on the CPU.

    Eager PyTorch takes the GIL back between every operator, so a forward pass on a
    worker thread crawls whenever the thread serving HTTP runs Python: measured 15x slower
    beside a busy thread, while the frozen graph runs whole in C++ (unaffected). The
    preprocessing is in the graph too: its eight eager operators alone took 5 -> 107 ms
    per batch beside a busy thread (each waits out the GIL's switch interval). Tracing
    costs ~3 s once per process. torch.jit is deprecated for torch.compile, but that
    compiles for minutes on a CPU; torch is pinned, so it stays until a replacement is
    measured. Returns the eager `FromPixels` if it cannot be traced.
    """
    import warnings

    wrapped = FromPixels(model, meta).eval()
    size = int(meta["resolution"])
    example = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecation notice
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # mean/std as constants
            return torch.jit.freeze(torch.jit.trace(wrapped, example, check_trace=False))
    except Exception as e:  # noqa: BLE001 - any timm network may be exported
        print(f"[deepfake-ray] {type(model).__name__} could not be traced ({e}); serving it eagerly")
        return wrapped


def p_fake(logits: torch.Tensor) -> np.ndarray:
    """P(fake) of two-class logits, in float64: the two-class softmax is the sigmoid of
    the logit gap, and in float32 every gap of 17 or more rounds to exactly 1.0, so a
    confident model's fakes would all tie, blurring its ROC-AUC and the threshold."""
    gap = logits[:, 1].double() - logits[:, 0].double()
    p = torch.sigmoid(gap)
    # a logit that is not finite is a broken model, NaN as the softmax made it (not 1.0)
    return torch.where(torch.isfinite(logits).all(dim=1), p, torch.nan).cpu().numpy()
