"""Typed configuration: frozen dataclasses are the source of truth, presets are YAML.

A config is built from a preset (package data), an optional `--config FILE` and
`--set a.b=value` overrides, each layer type-checked against the dataclasses.
Unknown keys and wrong types raise UsageError naming the key and the valid choices.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from deepfake_ray.errors import UsageError


@dataclass(frozen=True)
class DataConfig:
    source: str = "sample:2000"  # DIR | s3://bucket/prefix | kaggle:OWNER/DATASET | sample[:N]
    resolution: int = 64  # side of the square images every stage trains on
    sample_size: int = 2000  # N for a bare `sample` source
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test by content hash
    jpeg_quality: int = 95  # reals are re-encoded at this quality, and fakes too
    max_pixels: int = 40_000_000  # header pixel count above which a file is a decompression bomb
    kaggle_dataset: str = "greg115/celebrities-100k"  # used by `kaggle:` with no name
    cache_dir: str = "~/.cache/deepfake-ray"  # downloads (Kaggle) are kept here and reused
    decode_batch_size: int = 64  # images per Ray Data decode batch


@dataclass(frozen=True)
class GanConfig:
    epochs: int = 3
    batch_size: int = 64  # per worker
    # 2e-4 is the DCGAN paper's rate and what every preset uses. The study printed 0.002,
    # which with Adam(beta1=0.5) tends to collapse D early; set gan.lr=0.002 to reproduce it.
    lr: float = 2e-4
    beta1: float = 0.5  # Adam's, the DCGAN paper's
    latent_dim: int = 100  # length of the noise vector z
    g_width: int = 64  # channels of the generator's last layer (x2 per layer towards z)
    d_width: int = 64  # channels of the discriminator's first layer
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    max_failures: int = 2  # lost workers retried this many times per run
    sample_grid: int = 64  # images in the fixed-noise grid saved each epoch
    num_fakes: int = 0  # 0: as many as the real train+val+test splits hold
    generate_batch_size: int = 256
    fail_at_epoch: int = -1  # TEST ONLY: the last rank exits once at this epoch
    mixed_precision: bool = True  # channels_last on GPU, and bfloat16 autocast where it computes in it


@dataclass(frozen=True)
class DetectorConfig:
    arch: str = "inception_resnet_v2"
    epochs: int = 2
    batch_size: int = 32  # per worker
    lr: float = 3e-4
    # AdamW's decoupled decay (Adam: L2). AdamW shrinks weights by lr x this a step: at 1e-4
    # barely at all (0.02% over celeb100k's 20 epochs); augmentation regularises instead.
    # 0.01-0.05 is AdamW's usual strength, if a run overfits
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adam | adamw
    input_size: int = 128  # side the images are resized to for the network (75 or more)
    pretrained: str = "none"  # hub | none | PATH (local or s3:// safetensors / state dict)
    hub_name: str = "inception_resnet_v2.tf_in1k"  # timm weights (and normalization) for pretrained=hub
    freeze_backbone_epochs: int = 0  # epochs that train the classifier head alone first
    hflip: bool = True  # random horizontal flips of training images
    # bfloat16 autocast on GPUs that compute in it: on an H200 it trained Inception-ResNet-v2
    # slower than fp32 (2,396 against 2,836 images/s; docs/performance.md), and a model is
    # evaluated and served in the precision it was validated in
    mixed_precision: bool = False
    # after each epoch, batch-norm statistics are recomputed from this many of the
    # epoch's last training inputs (0: off); see models.detector.recalibrate_batchnorm
    bn_recalibration_images: int = 256
    # Wang et al. 2020: random JPEG re-compression and Gaussian blur of training images.
    # Without them a detector of UTKFace photos caught 9% of fakes once blurred (sigma 1)
    # and 19% once downscaled by half; with them 99.8% of both, clean as before (README)
    jpeg_aug_prob: float = 0.5
    jpeg_aug_quality: tuple[int, int] = (30, 100)
    blur_aug_prob: float = 0.5
    blur_aug_sigma: tuple[float, float] = (0.0, 3.0)
    max_train_per_class: int = 0  # 0: all; celeb100k uses 29,500 as the study
    keep_checkpoints: int = 2  # the best ones by val_score, and the newest
    max_failures: int = 2
    fail_at_epoch: int = -1  # TEST ONLY: the last rank exits once at the end of this epoch, before its checkpoint


@dataclass(frozen=True)
class TuneConfig:
    enabled: bool = False  # the pipeline runs `tune` instead of `train-detector`
    samples: int = 4  # trials, each a learning rate drawn log-uniformly from lr_min..lr_max
    lr_min: float = 1e-5
    lr_max: float = 1e-3
    epochs: int = 2  # per trial (ASHA max_t)
    grace_period: int = 1  # ASHA: epochs a trial runs before it can be stopped
    # 0: all at once on a cluster (its autoscaler adds nodes for them), as many as fit in-process
    max_concurrent_trials: int = 0


@dataclass(frozen=True)
class ResourcesConfig:
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # and torch threads: each Train worker's, and CPU scoring actor's
    data_cpus: float = 1.0  # per Ray Data decode task


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    # how long a batch waits to fill: about one batch-1 forward pass. 0.01 s suits a GPU;
    # on CPU cores (Inception-ResNet-v2 ~0.1 s per image) the demo preset uses 0.1 s
    batch_wait_timeout_s: float = 0.01
    max_body_bytes: int = 10 * 1024 * 1024
    # a request whose body sends nothing for this long, or averages under 500 bytes/s past
    # it, gets a 408: a stalled or trickling upload would otherwise hold one of the
    # replica's max_ongoing_requests slots until it hangs up (or for Serve's 300 s)
    body_idle_timeout_s: float = 30.0
    # request bodies a replica holds at once, in bytes (0: 16 x max_body_bytes): past it a
    # request gets a 503 to retry, instead of the replica running out of memory (its
    # max_ongoing_requests bodies of max_body_bytes: 1.3 GB by default)
    max_buffered_bytes: int = 0
    # files in one multipart request: each is parsed, decoded and scored by the replica
    max_files_per_request: int = 64
    min_replicas: int = 1  # Serve autoscaling: replicas kept at the least
    max_replicas: int = 1
    target_ongoing_requests: int = 16  # per replica, above which Serve adds replicas
    gpus_per_replica: float = 0.0  # 0: one GPU per replica when the cluster has GPUs (or resources.use_gpu)
    score_batch_size: int = 32  # images per forward pass in `score` and `evaluate`
    # `score` keeps each part of this many files as it is done, and a stopped run resumes
    # from them: each part starts its own actors (seconds), so not too few files
    score_part_files: int = 100_000
    # per replica; 0: 8 x max_batch_size. Never below max_batch_size (batches could not
    # fill); generous, because a full replica makes Serve's router back off and retry,
    # which starves the batch queue (measured: batch 7 instead of 16 at 64 clients)
    max_ongoing_requests: int = 0
    cpus_per_replica: float = 1.0
    score_actors: int = 0  # batch-scoring actor pool; 0: one a GPU (resources.workers at least), else CPUs // 4
    access_log: bool = True  # one log line per request from each replica
    # uploads decoded in helper processes: a file that crashes the image library ends a
    # helper, not the replica (its request gets a 422); +0.3 ms at p50 for a lone request,
    # within the noise under load (docs/performance.md)
    isolate_decoding: bool = False


@dataclass(frozen=True)
class Config:
    workdir: str = "runs/demo"
    seed: int = 0
    # train-gan and train-detector on CPUs give the same weights on a rerun over the same
    # data/ and fakes/: Ray Data keeps block order (slower) and the seed draws each epoch's
    # block order and augmentation (README, Reproducibility: not on GPUs, nor across a resume)
    deterministic: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def preset_names() -> list[str]:
    files = resources.files("deepfake_ray").joinpath("configs").iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    path = resources.files("deepfake_ray").joinpath("configs", f"{name}.yaml")
    if name not in preset_names() or not path.is_file():  # a name, not a path: that is --config's
        raise UsageError(f"unknown preset '{name}': choose one of {', '.join(preset_names())}")
    return yaml.safe_load(path.read_text()) or {}


def load_file(path: str) -> dict:
    from deepfake_ray import s3, storage

    try:
        data = yaml.load(storage.read_bytes(path), NumbersAsTyped)
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found: pass an existing YAML file to --config")
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a folder: pass a YAML file to --config")
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path} is not valid YAML: {yaml_problem(e)}")
    except OSError as e:  # an S3 problem the user can fix (network, bucket, keys), no permission
        raise UsageError(s3.explain(e) or f"config file {path} cannot be read ({e.strerror or e}): "
                         "check it, or pass another YAML file to --config")
    if data is None:  # empty, or comments only: a file that changes nothing yet
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of sections, e.g. 'gan: {{epochs: 5}}'")
    return data


def yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong and where (`expected <block end>, but found '<block mapping start>'
    (line 3, column 2)`): the message's first line is only what the parser was doing."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not problem:
        return str(e).splitlines()[0]
    return f"{problem}" + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")


@dataclass(frozen=True)
class Typed:
    """A value as typed after `--set a.b=`: a text field takes it verbatim (a folder named
    `faces #1` or `0123` stays that, where YAML would read a comment or an octal number);
    any other field takes it parsed as YAML (3e-4, true, [1, 2])."""
    text: str

    def parsed(self) -> Any:
        try:
            return yaml.load(self.text, DecimalNumbers) if self.text.strip() else ""
        except (yaml.YAMLError, ValueError):  # ValueError: an int of more digits than Python reads
            return self.text


class DecimalNumbers(yaml.SafeLoader):
    """YAML with whole numbers read in base 10, in lists too: YAML 1.1 reads 060 as the
    octal 48 and 1:30 as the base-60 90 (kept as text here, which a number field refuses)."""

    BASE_60 = re.compile(r"[+-]?\d+(:[0-5]?\d)+(\.\d*)?")

    def decimal_int(self, node):
        text = self.construct_scalar(node)
        if re.fullmatch(r"[+-]?\d+", digits := text.replace("_", "")):
            return int(digits, 10)
        return text if self.BASE_60.fullmatch(text) else self.construct_yaml_int(node)  # 0x1f

    def plain_float(self, node):
        text = self.construct_scalar(node)
        return text if self.BASE_60.fullmatch(text) else self.construct_yaml_float(node)


DecimalNumbers.add_constructor("tag:yaml.org,2002:int", DecimalNumbers.decimal_int)
DecimalNumbers.add_constructor("tag:yaml.org,2002:float", DecimalNumbers.plain_float)


class NumbersAsTyped(yaml.SafeLoader):
    """A --config file read with its numbers, dates and yes/no words kept as typed, as a
    --set value is: a text field takes `source: 0123` as that folder, not as the octal
    number 83, and `workdir: 2024-06-01` as that folder, not as a date."""


for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
             "tag:yaml.org,2002:timestamp"):
    NumbersAsTyped.add_constructor(_tag, lambda loader, node: Typed(node.value))


def keys_once(loader: yaml.SafeLoader, node: yaml.MappingNode):
    """A mapping, refused where a key appears twice: YAML keeps the last silently, and a
    second `data:` section would drop every setting of the first."""
    seen = set()
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode):  # `[a]: 1`: no setting is named by a list
            raise yaml.constructor.ConstructorError(None, None, "a key must be a name, not a list or mapping",
                                                    key.start_mark)
        if key.value in seen:
            raise yaml.constructor.ConstructorError(None, None, f"'{key.value}' appears twice in one mapping",
                                                    key.start_mark)
        seen.add(key.value)
    return (yield from loader.construct_yaml_map(node))


NumbersAsTyped.add_constructor("tag:yaml.org,2002:map", keys_once)


def parse_override(text: str) -> dict:
    """`a.b=value` -> {"a": {"b": Typed(value)}}."""
    key, sep, raw = text.partition("=")
    if not sep and key.strip():  # `--set workdir`: a top-level key needs no section
        raise UsageError(f"--set '{text}' must look like KEY=VALUE, e.g. --set {key.strip()}=VALUE")
    if not sep or not all(part.strip() for part in key.split(".")):  # `.lr=1`, `detector..lr=1` too
        raise UsageError(f"--set '{text}' must look like section.key=value, e.g. detector.lr=3e-4")
    return nested(key.strip(), Typed(raw))


def nested(key: str, value: Any) -> dict:
    """`a.b`, value -> {"a": {"b": value}}: a dotted key as merge takes it."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def build(preset: str = "demo", config_file: str | None = None, overrides: list[str] = (),
          **top: Any) -> Config:
    """Layers: dataclass defaults < preset < config file < --set < explicit keyword values."""
    cfg = Config()
    layers = [load_preset(preset)]
    from_file = None
    if config_file is not None:  # `--config ""` (an unset variable) is no file, not none given
        if not config_file.strip():
            raise UsageError("--config names no file: pass a YAML file, or leave --config out")
        layers.append(from_file := load_file(config_file))
    layers += [parse_override(o) for o in overrides]
    layers.append({k: v for k, v in top.items() if v is not None})
    for layer in layers:
        try:
            cfg = merge(cfg, layer)
        except UsageError as e:  # an unknown key or a wrong type reads as a --set's would: say where
            if layer is not from_file:
                raise
            raise UsageError(f"in --config {config_file}: {e}") from None
    check_limits(cfg)
    return cfg


# Values no command can run with: refused when the config is built, before any Ray process
# starts or any stage's output is touched. key -> (lowest, highest or None, why: optional).
LIMITS = {
    "seed": (0, 2**31 - 1, "numpy's and Ray Data's generators take 32-bit seeds"),
    "data.resolution": (16, 1024, "32, 64 or 128 for the DCGAN"), "data.sample_size": (1, None),
    "data.jpeg_quality": (1, 100), "data.max_pixels": (1, None), "data.decode_batch_size": (1, None),
    "gan.epochs": (1, None), "gan.batch_size": (2, None, "batch norm needs a batch"),
    "gan.beta1": (0.0, 0.999), "gan.latent_dim": (1, None), "gan.g_width": (1, None),
    "gan.d_width": (1, None), "gan.checkpoint_every": (1, None), "gan.keep_checkpoints": (1, None),
    "gan.max_failures": (-1, None, "-1 retries without end"), "gan.sample_grid": (1, 256, "drawn at once each epoch"),
    "gan.num_fakes": (0, None, "0 makes as many as the reals"), "gan.generate_batch_size": (1, None),
    "detector.epochs": (1, None), "detector.batch_size": (2, None, "batch norm needs a batch"),
    "detector.weight_decay": (0.0, 1.0, "AdamW shrinks weights by lr x this a step; 0.01-0.05 is usual"),
    "detector.input_size": (1, 1024, "128 as the study; memory grows with its square"), "detector.freeze_backbone_epochs": (0, None),
    "detector.bn_recalibration_images": (0, None), "detector.jpeg_aug_prob": (0.0, 1.0),
    "detector.blur_aug_prob": (0.0, 1.0), "detector.max_train_per_class": (0, None, "0 takes all"),
    "detector.keep_checkpoints": (1, None), "detector.max_failures": (-1, None, "-1 retries without end"),
    "tune.samples": (1, None), "tune.epochs": (1, None), "tune.grace_period": (1, None),
    "tune.max_concurrent_trials": (0, None, "0 runs as many as fit"), "resources.workers": (1, None),
    "serve.port": (1, 65535), "serve.max_batch_size": (1, None), "serve.batch_wait_timeout_s": (0.0, 10.0, "a lone request waits this long for others"),
    "serve.max_body_bytes": (1, None), "serve.max_files_per_request": (1, None),
    "serve.max_buffered_bytes": (0, None, "0: 16 x max_body_bytes"),
    "serve.min_replicas": (0, None), "serve.max_replicas": (1, None),
    "serve.target_ongoing_requests": (1, None), "serve.gpus_per_replica": (0.0, None),
    "serve.score_batch_size": (1, None), "serve.score_part_files": (1, None),
    "serve.max_ongoing_requests": (0, None, "0: 8 x max_batch_size"),
    "serve.cpus_per_replica": (0.0, None), "serve.score_actors": (0, None, "0 sizes the pool itself"),
    # above 1 every weight diverges at once
    **{key: (0.0, 1.0, "Adam's learning rate: 1e-5 to 1e-2 train these models")
       for key in ("gan.lr", "detector.lr", "tune.lr_min", "tune.lr_max")},
}
# rates and CPU shares: any value above 0 (fractions such as 0.5 CPUs are fine)
ABOVE_ZERO = ("gan.lr", "detector.lr", "tune.lr_min", "tune.lr_max", "resources.cpus_per_worker",
              "resources.data_cpus", "serve.body_idle_timeout_s")
# Ray counts resources in steps of 0.0001: a smaller share was refused once Ray had started
RESOURCE_SHARES = ("resources.cpus_per_worker", "resources.data_cpus", "serve.cpus_per_replica",
                   "serve.gpus_per_replica")


def value_of(cfg: Config, key: str) -> Any:
    """`section.name`, or a top-level `name` (seed)."""
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def check_limits(cfg: Config) -> None:
    for key, (low, high, *why) in LIMITS.items():
        value = value_of(cfg, key)
        if value < low or (high is not None and value > high):
            allowed = f"{low}..{high}" if high is not None else f"{low} or more"
            raise UsageError(f"{key}={value} is out of range: use {allowed}"
                             + (f" ({why[0]})" if why else ""))
    for key in ABOVE_ZERO:
        if (value := value_of(cfg, key)) <= 0:
            raise UsageError(f"{key}={value} is out of range: use a value above 0")
    for key in RESOURCE_SHARES:
        if 0 < (value := value_of(cfg, key)) < 0.0001:
            raise UsageError(f"{key}={value} is out of range: use 0.0001 or more (Ray's smallest share)")
    if cfg.detector.pretrained == "":  # an unset shell variable: it trained from random weights
        raise UsageError("detector.pretrained is empty: use hub, none, or the path of a weights file")
    if cfg.data.max_pixels < cfg.data.resolution ** 2:
        raise UsageError(f"data.max_pixels={cfg.data.max_pixels} is below data.resolution squared "
                         f"({cfg.data.resolution ** 2}): every image would be refused; use "
                         f"{cfg.data.resolution ** 2} or more")


def merge(obj: Any, updates: dict, prefix: str = "") -> Any:
    if updates is None and prefix:  # a section of a --config file with only comments under it
        return obj
    if not isinstance(updates, dict):
        section = prefix.rstrip(".")
        raise UsageError(f"'{section}' is a section, not a value: give it keys, e.g. --set {prefix}KEY=VALUE, "
                         f"or in a --config file '{section}: {{KEY: VALUE}}'")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in updates.items():
        key = key.text if isinstance(key, Typed) else key  # `1:` in a --config file
        name = f"{prefix}{key}"
        if key not in fields:
            raise unknown_key(name, [prefix + k for k in fields if k not in TEST_ONLY])
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, f"{name}.")
        elif isinstance(value, dict):  # no field holds a mapping: `--set data.resolution.x=1`
            below = f": '{name}.{next(iter(value))}' names nothing" if value else ""
            raise UsageError(f"config key '{name}' is a value, not a section{below}; set {name}=VALUE")
        else:
            changes[key] = coerce(name, value, hints[key], example=current)
    return dataclasses.replace(obj, **changes)


TEST_ONLY = ("fail_at_epoch",)  # accepted, not offered


def unknown_key(name: str, valid: list[str]) -> UsageError:
    close = [k for k in valid if k.startswith(name)] or difflib.get_close_matches(name, valid, n=1, cutoff=0.75)
    guess = f" (did you mean {close[0]}?)" if close else ""
    return UsageError(f"unknown config key '{name}'{guess}: valid keys are {', '.join(valid)}")


def shown(value: Any) -> str:
    """A value as an error line quotes it: a 5,000-digit one would be the whole screen."""
    text = repr(value.text if isinstance(value, Typed) else as_read(value))
    return text if len(text) <= 80 else text[:77] + "..."


def as_read(value: Any) -> Any:
    """A --config file's list or mapping with its numbers as YAML reads them: [0.8, 0.1],
    not the Typed wrappers they are kept in until a field takes them."""
    if isinstance(value, Typed):
        return value.parsed()
    if isinstance(value, list):
        return [as_read(v) for v in value]
    return {as_read(k): as_read(v) for k, v in value.items()} if isinstance(value, dict) else value


def coerce(name: str, value: Any, hint: Any, example: Any = None) -> Any:
    """Check `value` against a field's annotation; allow int->float and list->tuple.
    `example`, the key's value now, shows the form a wrong one should take."""
    if isinstance(value, Typed):
        value = value.text if hint is str else value.parsed()
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return coerce(name, value, option)
            except UsageError:
                continue
        raise UsageError(f"config key '{name}' expects {hint}, got {shown(value)}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            form = example if isinstance(example, tuple) and len(example) == len(args) else [a.__name__ for a in args]
            raise UsageError(f"config key '{name}' expects a list of {len(args)} values, e.g. "
                             f"{name}=[{','.join(map(str, form))}]; got {shown(value)}")
        return tuple(coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # more digits than any float holds
            raise UsageError(f"config key '{name}' expects a finite number, got a number of "
                             f"{len(str(value))} digits") from None
    if hint in (int, float) and isinstance(value, str):  # YAML reads 3e-4 as a string
        try:
            value = hint(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"  # quoted in YAML, as "3" is taken for 3
    if value is None:  # `lr:` with nothing after it
        raise UsageError(f"config key '{name}' has no value: give it one{example_of(name, example)}, "
                         "or leave the key out to take the preset's")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        # text is quoted as it is shown; `1e3` typed for an int reads as text, not a number
        kind = "" if isinstance(value, str) else f" ({type(value).__name__})"
        wanted = "a whole number (int)" if hint is int else hint.__name__
        raise UsageError(f"config key '{name}' expects {wanted}, got {shown(value)}{kind}"
                         f"{example_of(name, example)}")
    if hint is float and not math.isfinite(value):  # every check against nan passes
        raise UsageError(f"config key '{name}' expects a finite number, got {shown(value)}")
    return value


def example_of(name: str, example: Any) -> str:
    """", e.g. detector.lr=0.0003": the key's value now, in the form --set takes."""
    if example is None or isinstance(example, tuple):
        return ""
    return f", e.g. {name}={str(example).lower() if isinstance(example, bool) else example}"


def to_dict(cfg: Config) -> dict:
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else plain(v))
            for k, v in dataclasses.asdict(cfg).items()}


def from_dict(data: dict) -> Config:
    return merge(Config(), data)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
