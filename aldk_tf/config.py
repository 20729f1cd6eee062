"""One configuration object shared by train, evaluate and export.

Saved as ``config.json`` beside the weights, so ``evaluate.py -c weights/run`` and
``export.py -c weights/run`` need nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field

from aldk_tf.networks.bases import student_variant_name

CONFIG_NAME = "config.json"

#: The most shared-weight repetitions of a cascade a tool accepts (``-r``,
#: ``--teacher-rep``): each one adds the cascade again to the graph, so a typing slip such
#: as ``-r 1000000`` would build (or hang) instead of failing.
MAX_REP = 100


@dataclass
class ModelConfig:
    """Which registration network: a teacher (VTN/VoxelMorph cascades) or a student."""
    role: str = "student"                 # "teacher" | "student"
    base: str = "student"                 # a key of aldk_tf.networks.bases.BASES
    n_cascades: int = 1
    rep: int = 1
    affine: str | None = "student"        # "vtn" | "student" | None
    channels: int = 16
    student_variant: str = "paper"        # "paper" | "release" (networks.bases)
    image_size: tuple[int, int, int] = (128, 128, 128)
    resolution_factor: int = 1            # > 1: cross-resolution student (CRD)
    matrix_gain: float = 0.1              # affine W = head output x this (networks.affine;
                                          # runs saved before it existed: 1.0)

    def __post_init__(self):
        # Runs saved before the rename say "seed"; stored as today's name, so resuming one
        # with today's flags is no change of its settings.
        self.student_variant = student_variant_name(self.student_variant)

    def build(self, rep: int | None = None, name: str | None = None):
        from aldk_tf.networks.cascade import RecursiveCascade
        return RecursiveCascade(self.image_size, base=self.base, n_cascades=self.n_cascades,
                                rep=self.rep if rep is None else rep, affine=self.affine,
                                channels=self.channels,
                                student_variant=self.student_variant,
                                resolution_factor=self.resolution_factor,
                                matrix_gain=self.matrix_gain, name=name or self.role)


@dataclass
class LossWeights:
    similarity: float = 1.0
    smoothness: float = 1.0
    det: float = 0.1
    ortho: float = 0.1
    label: float = 0.0                    # > 0: soft Dice of the warped label maps (pairs
                                          # that carry labels: the pair generator's)


@dataclass
class ALDKConfig:
    """Distillation from a teacher's flows: adversarial (ALDK, the paper's Algorithm 1, when
    ``enabled``) and/or a plain flow term (``flow_weight``)."""
    enabled: bool = False
    beta: float = 0.1                     # phi_hat = beta * teacher + (1 - beta) * student
    gamma: float = 0.3                    # L = gamma * l_rec + (1 - gamma) * l_dis
    lamb: float = 0.1                     # gradient-penalty weight
    critic_lr: float = 1e-4
    critic_output: str = "sigmoid"        # "sigmoid" (paper's figure) | "raw" (WGAN score)
    critic_input: str = "flow"            # what the critic judges: "flow" (the paper's) or
                                          # "images" (fixed beside the moving image warped
                                          # by the student's / the teacher's flow)
    adversarial_period: int = 3           # the adversarial term on every k-th step ...
    adversarial_until: int = 8000         # ... until this step; pure l_rec afterwards
    critic_period: int = 3                # critic updated on every k-th step
    teacher_online: bool = False          # run the teacher per batch, not stored flows
    flow_weight: float = 0.0              # > 0: add flow_weight * mean |phi_s - phi_t|^2
                                          # (plain flow distillation; with enabled=False
                                          # the student learns from the targets, no critic)
    flow_target: str = "flow"             # what the plain term compares: "flow" (the
                                          # squared flow difference) or "warped" (the
                                          # similarity of the student's warped image to
                                          # the moving image warped by the teacher's flow)
    refine: int = 0                       # > 0: targets refined by this many instance-
                                          # optimisation steps per pair (refine.py)


@dataclass
class CRDConfig:
    """Cross-resolution distillation (CRD); the factor is ModelConfig's."""
    enabled: bool = False
    flow_weight: float = 0.1
    feature_weight: float = 0.05
    levels: int = 3
    gate: str = "always"                  # "always" | "teacher_better" (see crd.py)
    anneal_steps: int = 0                 # > 0: weights decay linearly to 0 by this step


@dataclass
class TeacherConfig:
    """The one teacher that every distillation term (ALDK, flow, CRD) learns from."""
    run: str | None = None                # weights/<teacher run>
    rep: int = 0                          # > 0: the teacher applied with this many
                                          # shared-weight repetitions (0: as trained)


@dataclass
class TrainConfig:
    batch: int = 4
    round: int = 20000                    # steps per epoch
    epochs: int = 5
    lr: float = 1e-4
    seed: int = 0
    augment: bool = True
    augment_field: str = "bspline"        # "bspline" (the release's) | "spline" (stronger)
    checkpoint_every: int = 500
    validate_every: int = 1000
    validation_pairs: int = 16
    schedule: str = "auto"                # "auto" | "step" | "cosine" | "constant"
    clip_norm: float = 0.0                # > 0: clip the gradients' global norm to this
    # Pairs drawn on the fly instead of the dataset's training scheme (the dataset then
    # gives validation pairs only): aldk_tf.data.synth.GeneratorSettings as a dict.
    generator: dict | None = None
    # "float32", or "bfloat16": mixed precision, the feature layers (convolutions,
    # activations, concatenations) computing in bfloat16 on float32 variables, the geometry
    # (affine heads, flows, warps) and the losses in float32 (aldk_tf.deploy.inference.
    # use_bfloat16_layers). Fast only where the CPU has AMX or AVX512-BF16.
    precision: str = "float32"


@dataclass
class RunConfig:
    dataset: str = ""                     # path of the dataset JSON (RCN layout)
    model: ModelConfig = field(default_factory=ModelConfig)
    losses: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=TrainConfig)
    aldk: ALDKConfig = field(default_factory=ALDKConfig)
    crd: CRDConfig = field(default_factory=CRDConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # The dataset's data-preparation settings (its JSON's "preprocessing", see
    # aldk_tf.data.preprocess.PreprocessSettings), carried on to export_info.json so that
    # register prepares new scans the same way; None when the data did not record them.
    preprocessing: dict | None = None
    #: Settings changed on resume, oldest first: ``{"at_step", "changes": {setting:
    #: [old, new]}, "override"}`` (``train.py -c``; see
    #: :func:`aldk_tf.training.runs.check_settings`).
    history: list = field(default_factory=list)

    def check_teacher(self) -> None:
        """ValueError unless every distillation term that needs a teacher names one."""
        for flag, used in (("--aldk", self.aldk.enabled),
                           ("--flow-distill", self.aldk.flow_weight > 0),
                           ("--crd", self.crd.enabled)):
            if used and not self.teacher.run:
                raise ValueError(f"{flag} needs --teacher weights/<teacher run>")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """TypeError naming the setting unless ``data`` holds settings of the right
        types (a model's settings are required: their defaults are no trained model)."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise TypeError("expected a JSON object with a 'model' object")
        model = dict(data["model"])
        if model and "matrix_gain" not in model:   # a run from before the affine gain
            model["matrix_gain"] = 1.0
        teacher, aldk, crd = _teacher_sections(data)
        return cls(dataset=data.get("dataset", ""),
                   model=_section(ModelConfig, model, "model"),
                   losses=_section(LossWeights, data.get("losses", {}), "losses"),
                   train=_section(TrainConfig, data.get("train", {}), "train"),
                   aldk=_section(ALDKConfig, aldk, "aldk"),
                   crd=_section(CRDConfig, crd, "crd"),
                   teacher=_section(TeacherConfig, teacher, "teacher"),
                   preprocessing=data.get("preprocessing"),
                   history=list(data.get("history", [])))

    def save(self, run_dir: str) -> str:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, CONFIG_NAME)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: str) -> "RunConfig":
        path = os.path.join(run_dir, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{run_dir}: no {CONFIG_NAME} here; expected a run directory written by "
                f"train.py (weights/<run>)")
        with open(path) as handle:
            try:
                return cls.from_dict(json.load(handle))
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(f"{path}: not a valid run configuration ({error})") \
                    from None


#: JSON types a setting of each annotated type may have (bool is no int here).
_SETTING_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                  "str | None": (str, type(None)),
                  "tuple[int, int, int]": (list, tuple),
                  "dict | None": (dict, type(None))}


#: Where a config.json written before the teacher section kept it, in "aldk" and "crd".
_OLD_TEACHER_KEYS = {"teacher": "run", "teacher_rep": "rep"}


def _teacher_sections(data: dict) -> tuple:
    """``(teacher, aldk, crd)`` sections of a config.json. Older ones held the teacher
    (``teacher``, ``teacher_rep``) in both "aldk" and "crd": it moves to "teacher", taken
    from the section training used (ALDK's when it distils, else CRD's if it names one)."""
    aldk, crd = data.get("aldk", {}), data.get("crd", {})
    if "teacher" in data or not (isinstance(aldk, dict) and isinstance(crd, dict)):
        return data.get("teacher", {}), aldk, crd       # _section names a bad section
    old = [{new: section[key] for key, new in _OLD_TEACHER_KEYS.items() if key in section}
           for section in (aldk, crd)]
    aldk, crd = ({key: value for key, value in section.items()
                  if key not in _OLD_TEACHER_KEYS} for section in (aldk, crd))
    weight = aldk.get("flow_weight", 0)
    distilling = aldk.get("enabled") is True or (isinstance(weight, (int, float))
                                                 and weight > 0)
    return (old[0] if distilling or not old[1].get("run") else old[1]), aldk, crd


def _section(cls, data, name: str):
    """``cls(**data)``; TypeError naming the setting whose value has another type."""
    if not isinstance(data, dict):
        raise TypeError(f"'{name}' is {type(data).__name__}, expected an object")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise TypeError(f"'{name}.{key}' is not a setting")
        allowed = _SETTING_TYPES.get(fields[key], (object,))
        if (isinstance(value, bool) and bool not in allowed
                or not isinstance(value, allowed)):
            raise TypeError(f"'{name}.{key}' is {value!r}, expected {fields[key]}")
    if "image_size" in data:
        data = {**data, "image_size": tuple(data["image_size"])}
    return cls(**data)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename; an OS error
    (a full disk, a read-only folder) names ``path`` and leaves it as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    except OSError as error:
        raise OSError(f"{path}: cannot write ({error.strerror or error})") from None
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)      # mkstemp's 0600 would hide the file
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError):
            raise OSError(f"{path}: cannot write ({error.strerror or error}); it is as it "
                          "was") from None
        raise
