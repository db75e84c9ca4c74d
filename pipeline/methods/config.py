"""`method:` section: one frozen dataclass per method, chosen by `method.name` (torch-free, so that loading a
config imports none of the methods). `METHOD_CONFIGS` lists every subclass of `MethodConfig` by its name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pipeline.schema import Bound, ConfigError, Section

Positive = Annotated[float, Bound(gt=0)]
NonNegative = Annotated[float, Bound(ge=0)]
Momentum = Annotated[float, Bound(ge=0, le=1)]  # an EMA momentum; 1 freezes the target
# `negatives` and its class prior `tau_plus` in the InfoNCE family (SimCLR, MoCo v2/v3); see SimCLRConfig.
Negatives = Literal["all", "debiased", "hard"]
ClassPrior = Annotated[float, Bound(ge=0, lt=1)]


@dataclass(frozen=True)
class MethodConfig(Section, key="method"):
    """The base of every method's config: `name` is its key in `pipeline.methods.registry.METHODS`."""

    name: str

    @property
    def edits_gradients(self) -> bool:
        """True when a hook needs whole gradients or writes trained weights (see pipeline.methods.base):
        ZeRO >= 1 partitions them, so `pipeline.config.check_combinations` refuses that pairing."""
        return False


@dataclass(frozen=True)
class SimCLRConfig(MethodConfig):
    """gather: negatives from every rank (else only the local batch); chunk_size: blockwise NT-Xent for
    very large two-view batches (same value and gradients, flat memory); negatives: all | debiased
    (class prior tau_plus, the chance that two random images share a class: 0.1 for 10 balanced
    classes) | hard (concentration beta, debiased by tau_plus; tau_plus=0 for hard weighting alone):
    debiased when few classes make same-class "negatives" common, hard when plain SimCLR plateaus."""

    name: str = "simclr"
    temperature: Positive = 0.2
    gather: bool = True
    chunk_size: Annotated[int, Bound(gt=0)] | None = None
    negatives: Negatives = "all"
    tau_plus: ClassPrior = 0.1
    beta: NonNegative = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.negatives != "all" and self.chunk_size is not None:
            raise ConfigError(
                f"method.negatives={self.negatives} needs the full similarity matrix; "
                "set method.chunk_size=null"
            )


@dataclass(frozen=True)
class MoCoV2Config(MethodConfig):
    """momentum_end: None keeps `momentum` constant (the paper); a value follows a cosine to it.
    symmetric: also contrast view 2's query with view 1's key (a common CIFAR improvement).
    shuffle_group_size: shuffle the keys' batch within blocks of this many consecutive ranks (the
    processes per node keeps the images off the inter-node links); None shuffles over every rank.
    queue_between_directions (symmetric only): each key crop's keys join the queue before the next key
        crop's losses (two views: view 2's keys before the second direction's), so later queries also
        meet this batch's keys, fresh from the current key encoder, as negatives (lightly's order: its
        memory bank advances inside each loss call). False: every direction sees only the queue from
        before this batch (the MoCo CIFAR demo's order). BENCHMARKS.md, "Representation quality".
    negatives, tau_plus, beta: as SimCLR's, over the K queued keys: debiased when few classes fill the
        queue with same-class keys (a 65k queue of 10 classes holds ~6.5k of the query's class), hard to
        weight the queue towards the keys closest to the query.
    Multi-crop's local crops are extra queries against the same keys."""

    name: str = "mocov2"
    temperature: Positive = 0.2
    queue_size: Annotated[int, Bound(gt=0)] = 65536
    momentum: Momentum = 0.999
    momentum_end: Momentum | None = None
    shuffle_bn: bool = True
    symmetric: bool = False
    shuffle_group_size: Annotated[int, Bound(ge=2)] | None = None
    queue_between_directions: bool = True
    negatives: Negatives = "all"
    tau_plus: ClassPrior = 0.1
    beta: NonNegative = 1.0


@dataclass(frozen=True)
class MoCoV3Config(MethodConfig):
    """gather: keys from every rank (else only the local batch); negatives, tau_plus, beta: as SimCLR's,
    over the other keys of the (global) batch: debiased when few classes make same-class keys common,
    hard to weight them towards the keys closest to the query."""

    name: str = "mocov3"
    temperature: Positive = 0.2
    momentum: Momentum = 0.99
    momentum_end: Momentum | None = 1.0
    gather: bool = True
    negatives: Negatives = "all"
    tau_plus: ClassPrior = 0.1
    beta: NonNegative = 1.0


@dataclass(frozen=True)
class BYOLConfig(MethodConfig):
    name: str = "byol"
    momentum: Momentum = 0.99
    momentum_end: Momentum | None = 1.0


@dataclass(frozen=True)
class BarlowTwinsConfig(MethodConfig):
    name: str = "barlow_twins"
    lambd: NonNegative = 0.0051
    gather: bool = True


@dataclass(frozen=True)
class VICRegConfig(MethodConfig):
    name: str = "vicreg"
    sim_weight: NonNegative = 25.0
    var_weight: NonNegative = 25.0
    cov_weight: NonNegative = 1.0
    gather: bool = True


@dataclass(frozen=True)
class SupConConfig(MethodConfig):
    name: str = "supcon"
    temperature: Positive = 0.1
    gather: bool = True


@dataclass(frozen=True)
class DINOConfig(MethodConfig):
    """Defaults are the paper's ViT-S/16 settings. Schedules count optimizer steps (the paper's epochs
    times steps per epoch; see configs/imagenet_dino.yaml):
    teacher_temp_warmup_steps: the teacher temperature rises linearly from warmup_teacher_temp;
    freeze_last_layer_steps: the last layer gets no update (the paper: the first epoch);
    clip_grad: each parameter's gradient norm is clipped to it (null: off)."""

    name: str = "dino"
    out_dim: Annotated[int, Bound(ge=2)] = 65536  # a softmax over one logit is 1: the loss would be 0
    norm_last_layer: bool = True
    student_temp: Positive = 0.1
    teacher_temp: Positive = 0.04
    warmup_teacher_temp: Positive = 0.04
    teacher_temp_warmup_steps: Annotated[int, Bound(ge=0)] = 0
    center_momentum: Momentum = 0.9
    momentum: Momentum = 0.996
    momentum_end: Momentum | None = 1.0
    freeze_last_layer_steps: Annotated[int, Bound(ge=0)] = 0
    clip_grad: Positive | None = 3.0

    @property
    def edits_gradients(self) -> bool:
        """after_backward needs whole gradients (see pipeline.methods.base)."""
        return self.clip_grad is not None or self.freeze_last_layer_steps > 0


@dataclass(frozen=True)
class SwAVConfig(MethodConfig):
    """Defaults are the paper's ImageNet settings (batch 4096: 313 steps = one epoch of frozen
    prototypes). queue_size: past global-batch embeddings per global crop used in Sinkhorn, a multiple
    of the global batch (0: no queue); gather: Sinkhorn over the global batch (else each rank's own);
    queue_start_step: the queue starts filling at this optimizer step (the official epoch_queue_starts
    times steps per epoch: 15 epochs on ImageNet), and joins Sinkhorn once full."""

    name: str = "swav"
    num_prototypes: Annotated[int, Bound(ge=2)] = 3000  # one prototype: every code is 1, the loss 0
    temperature: Positive = 0.1
    epsilon: Positive = 0.05
    sinkhorn_iterations: Annotated[int, Bound(ge=1)] = 3
    freeze_prototypes_steps: Annotated[int, Bound(ge=0)] = 313
    queue_size: Annotated[int, Bound(ge=0)] = 0
    gather: bool = True
    queue_start_step: Annotated[int, Bound(ge=0)] = 0

    @property
    def edits_gradients(self) -> bool:
        """Prototypes are normalised in place after the step (see pipeline.methods.base)."""
        return True


@dataclass(frozen=True)
class TripletConfig(MethodConfig):
    """margin: in Euclidean distance between unit vectors (0..2); mining: hard | semi-hard;
    gather: negatives from every rank (else only the local batch)."""

    name: str = "triplet"
    margin: Annotated[float, Bound(gt=0, le=2)] = 0.5
    mining: Literal["hard", "semi-hard"] = "semi-hard"
    gather: bool = True


@dataclass(frozen=True)
class NNCLRConfig(MethodConfig):
    """Defaults are the paper's: temperature 0.1, a support set of queue_size past projections of the
    first global crop (98,304 on ImageNet at batch 4096). gather: the other view's predictions from
    every rank as candidates (else only the local batch); the support set is filled from the global
    batch either way, identical on every rank."""

    name: str = "nnclr"
    temperature: Positive = 0.1
    queue_size: Annotated[int, Bound(gt=0)] = 98304
    gather: bool = True


@dataclass(frozen=True)
class SimSiamConfig(MethodConfig):
    """No settings of its own: SimSiam is its heads (model.projector, model.predictor) and the
    stop-gradient."""

    name: str = "simsiam"


@dataclass(frozen=True)
class DCLConfig(MethodConfig):
    """weighting: none (DCL) | vmf (DCLW: the positive term weighted by the negative von Mises-Fisher
    weight of width sigma); gather: negatives from every rank (else only the local batch)."""

    name: str = "dcl"
    temperature: Positive = 0.1
    weighting: Literal["none", "vmf"] = "none"
    sigma: Positive = 0.5
    gather: bool = True


# Every method's config by its name: a new direct subclass of MethodConfig is listed without further work.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {cls.name: cls for cls in MethodConfig.__subclasses__()}
